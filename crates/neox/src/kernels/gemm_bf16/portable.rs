//! The portable path: blocks of k widened to f32 (each element rounded to bf16 first) and multiplied by the f32
//! `gemm` crate, block after block into C. Same definition as the AVX512_BF16 kernel (bf16 operands, f32 sums);
//! memory stays bounded by (m + n)·KB floats whatever the operands.

use super::{Data, Elem, Operand};
use crate::kernels::matmul::{gemm as gemm_f32, par_all, Mat};
use rayon::prelude::*;

/// k per widened block.
const KB: usize = 256;

/// `super::gemm` on any CPU (shapes already checked).
pub(super) fn gemm(c: &mut [f32], ldc: usize, accumulate: bool, a: Operand<'_>, b: Operand<'_>) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if super::empty_product(c, ldc, accumulate, m, n, k) {
        return;
    }
    let (mut ab, mut bb) = (vec![0f32; m * KB.min(k)], vec![0f32; KB.min(k) * n]);
    for k0 in (0..k).step_by(KB) {
        let kb = KB.min(k - k0);
        // ab (m, kb) = A[:, k0..k0 + kb]; bb (kb, n) = B[k0..k0 + kb, :], both row-major
        ab[..m * kb].par_chunks_mut(kb).enumerate().for_each(|(i, row)| widen_row(row, &a, i, k0));
        bb[..kb * n].par_chunks_mut(n).enumerate().for_each(|(kk, row)| widen_row(row, &b, k0 + kk, 0));
        // SAFETY: C holds m rows of n at stride ldc (checked by the caller); ab/bb sized above; C is exclusively
        // borrowed.
        unsafe {
            let dst = Mat::rm(c.as_mut_ptr(), m, n, ldc);
            let (lhs, rhs) = (Mat::rm(ab.as_ptr(), m, kb, kb), Mat::rm(bb.as_ptr(), kb, n, n));
            gemm_f32(dst, accumulate || k0 > 0, lhs, rhs, 1.0, par_all());
        }
    }
}

/// `dst[j] = bf16(op(i, j0 + j))`: part of row i of `op`, widened.
fn widen_row(dst: &mut [f32], op: &Operand<'_>, i: usize, j0: usize) {
    fn go<E: Elem>(dst: &mut [f32], s: &[E], start: usize, step: usize) {
        for (j, d) in dst.iter_mut().enumerate() {
            *d = f32::from_bits(s[start + j * step].bf16_bits() << 16);
        }
    }
    let (start, step) = (i * op.rs + j0 * op.cs, op.cs);
    match op.data {
        Data::F32(s) => go(dst, s, start, step),
        Data::Bf16(s) => go(dst, s, start, step),
    }
}
