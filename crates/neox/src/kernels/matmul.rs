//! Matrix products through the `gemm` crate (AVX-512/AVX2 kernels picked at run time), in the three shapes a
//! Linear layer needs, plus a strided raw form for per-head attention. Row-major everywhere; a weight `w` is
//! `(OC, IC)` as in PyTorch's `nn.Linear`. Deterministic: no split-k reductions, fixed bias-sum order.

use super::SendPtr;
use gemm::Parallelism;
use rayon::prelude::*;

/// Parallelism for one whole-matrix product: all rayon threads.
pub(crate) fn par_all() -> Parallelism {
    if rayon::current_num_threads() > 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    }
}

/// The sizes of a Linear product: `n` rows of `ic` inputs to `oc` outputs; the weight is (OC, IC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub n: usize,
    pub ic: usize,
    pub oc: usize,
}

/// A strided matrix view for `gemm`: `rows x cols`, element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<P> {
    pub ptr: P,
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

impl<P> Mat<P> {
    /// Row-major with leading dimension `ld` (the row stride).
    pub fn rm(ptr: P, rows: usize, cols: usize, ld: usize) -> Self {
        Mat { ptr, rows, cols, rs: ld as isize, cs: 1 }
    }

    /// Column-major with leading dimension `ld` (the column stride): the transpose of a row-major buffer.
    pub fn cm(ptr: P, rows: usize, cols: usize, ld: usize) -> Self {
        Mat { ptr, rows, cols, rs: 1, cs: ld as isize }
    }
}

/// dst = lhs · rhs · `scale`, added to dst when `accumulate`.
///
/// # Safety
/// Every view must be valid for every element its strides reach; `dst` must not overlap `lhs`/`rhs`, and no
/// other thread may touch the part of `dst` written here.
pub(crate) unsafe fn gemm(
    dst: Mat<*mut f32>,
    accumulate: bool,
    lhs: Mat<*const f32>,
    rhs: Mat<*const f32>,
    scale: f32,
    par: Parallelism,
) {
    assert!(dst.rows == lhs.rows && lhs.cols == rhs.rows && rhs.cols == dst.cols, "gemm shapes");
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    gemm::gemm(
        m, n, k, dst.ptr, dst.cs, dst.rs, accumulate, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs, rhs.rs, 1.0, scale,
        false, false, false, par,
    );
}

/// out (N, OC) = inp (N, IC) · wᵀ + bias, or `out +=` that when `accumulate`; `w` is (OC, IC) as stored. The
/// model uses `linear_fwd_t` instead (gemm packs this transposed operand more slowly, see
/// docs/benchmarks.md#training-step-tuning); the tests' reference.
#[cfg(test)]
pub fn linear_fwd(out: &mut [f32], inp: &[f32], w: &[f32], bias: Option<&[f32]>, d: Dims, accumulate: bool) {
    assert!(w.len() >= d.oc * d.ic);
    // rhs = wᵀ (IC, OC): the (OC, IC) buffer read column-major
    linear_fwd_into(out, inp, Mat::cm(w.as_ptr(), d.ic, d.oc, d.ic), bias, d, accumulate)
}

/// out (N, OC) = inp (N, IC) · wt + bias (or `+=`), where `wt` (IC, OC) is the transposed weight, row-major.
pub fn linear_fwd_t(out: &mut [f32], inp: &[f32], wt: &[f32], bias: Option<&[f32]>, d: Dims, accumulate: bool) {
    assert!(wt.len() >= d.oc * d.ic);
    linear_fwd_into(out, inp, Mat::rm(wt.as_ptr(), d.ic, d.oc, d.oc), bias, d, accumulate)
}

/// Shared body of the forward products: `rhs` (IC, OC), which the caller checked stays inside its buffer.
fn linear_fwd_into(
    out: &mut [f32],
    inp: &[f32],
    rhs: Mat<*const f32>,
    bias: Option<&[f32]>,
    d: Dims,
    accumulate: bool,
) {
    let Dims { n, ic, oc } = d;
    assert!(out.len() >= n * oc && inp.len() >= n * ic);
    if let Some(b) = bias {
        assert_eq!(b.len(), oc);
        add_bias_rows(&mut out[..n * oc], b, accumulate);
    }
    // SAFETY: sizes asserted here and by the callers; out is exclusively borrowed.
    unsafe {
        let (dst, lhs) = (Mat::rm(out.as_mut_ptr(), n, oc, oc), Mat::rm(inp.as_ptr(), n, ic, ic));
        gemm(dst, accumulate || bias.is_some(), lhs, rhs, 1.0, par_all())
    }
}

pub(crate) fn add_bias_rows(out: &mut [f32], b: &[f32], accumulate: bool) {
    let oc = b.len();
    out.par_chunks_mut(oc * 16).for_each(|rows| {
        rows.chunks_mut(oc).for_each(|r| {
            if accumulate {
                r.iter_mut().zip(b).for_each(|(o, b)| *o += b)
            } else {
                r.copy_from_slice(b)
            }
        })
    });
}

/// dinp (N, IC) = dout (N, OC) · w (OC, IC), or `+=` when `accumulate`.
pub fn linear_bwd_input(dinp: &mut [f32], dout: &[f32], w: &[f32], d: Dims, accumulate: bool) {
    assert!(w.len() >= d.oc * d.ic);
    bwd_input_into(dinp, dout, Mat::rm(w.as_ptr(), d.oc, d.ic, d.ic), d, accumulate)
}

/// `linear_bwd_input` reading the weight from its transposed (IC, OC) copy `wt` (gemm packs it transposed, which
/// is slower; used where only that copy holds the values wanted, as in bf16 compute).
pub fn linear_bwd_input_t(dinp: &mut [f32], dout: &[f32], wt: &[f32], d: Dims) {
    assert!(wt.len() >= d.oc * d.ic);
    // W[o][i] = wt[i * oc + o]
    bwd_input_into(dinp, dout, Mat::cm(wt.as_ptr(), d.oc, d.ic, d.oc), d, false)
}

/// dinp (N, IC) (+)= dout (N, OC) · W, W (OC, IC) a view the caller checked stays inside its buffer.
fn bwd_input_into(dinp: &mut [f32], dout: &[f32], w: Mat<*const f32>, d: Dims, accumulate: bool) {
    let Dims { n, ic, oc } = d;
    assert!(dinp.len() >= n * ic && dout.len() >= n * oc);
    // SAFETY: sizes asserted above and by the callers; dinp is exclusively borrowed.
    unsafe {
        let (dst, lhs) = (Mat::rm(dinp.as_mut_ptr(), n, ic, ic), Mat::rm(dout.as_ptr(), n, oc, oc));
        gemm(dst, accumulate, lhs, w, 1.0, par_all())
    }
}

/// dw (OC, IC) += doutᵀ (OC, N) · inp (N, IC); dbias (OC) += column sums of dout.
pub fn linear_bwd_weight(dw: &mut [f32], dbias: Option<&mut [f32]>, dout: &[f32], inp: &[f32], d: Dims) {
    linear_bwd_weight_t(dw, dout, inp, d);
    if let Some(db) = dbias {
        col_sum_acc(db, dout, d.n, d.oc);
    }
}

/// The product of `linear_bwd_weight` (without the bias), computed as dWᵀ (IC, OC) += inpᵀ · dout with dW
/// addressed column-major: `gemm` then never packs a transposed (OC, N) operand (measurably faster, see
/// docs/benchmarks.md#training-step-tuning).
pub fn linear_bwd_weight_t(dw: &mut [f32], dout: &[f32], inp: &[f32], d: Dims) {
    let Dims { n, ic, oc } = d;
    assert!(dw.len() >= oc * ic && dout.len() >= n * oc && inp.len() >= n * ic);
    // SAFETY: sizes asserted above; dw is exclusively borrowed.
    unsafe {
        let dst = Mat::cm(dw.as_mut_ptr(), ic, oc, ic);
        gemm(dst, true, Mat::cm(inp.as_ptr(), ic, n, ic), Mat::rm(dout.as_ptr(), n, oc, oc), 1.0, par_all())
    }
}

/// acc (C) += Σ_rows x (N, C). Columns are split across threads; each column is summed in row order, so the
/// result does not depend on the thread count.
pub fn col_sum_acc(acc: &mut [f32], x: &[f32], n: usize, c: usize) {
    assert!(acc.len() == c && x.len() >= n * c);
    const COLS: usize = 256;
    let xp = SendPtr(x.as_ptr() as *mut f32);
    acc.par_chunks_mut(COLS).enumerate().for_each(|(ci, a)| {
        let c0 = ci * COLS;
        for r in 0..n {
            // SAFETY: r < n and c0 + a.len() <= c, inside x (asserted); read-only.
            let row = unsafe { std::slice::from_raw_parts(xp.get().add(r * c + c0), a.len()) };
            pulp::Arch::new().dispatch(|| {
                for (a, &v) in a.iter_mut().zip(row) {
                    *a += v;
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matvec_bf16::{linear_panels, pack_bf16, packed_lines, Line};
    use crate::kernels::matvec_f32::linear_rows;
    use crate::kernels::transpose::transpose;

    fn naive(inp: &[f32], w: &[f32], b: &[f32], n: usize, ic: usize, oc: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * oc];
        for i in 0..n {
            for o in 0..oc {
                let mut s = b[o] as f64;
                for k in 0..ic {
                    s += inp[i * ic + k] as f64 * w[o * ic + k] as f64;
                }
                out[i * oc + o] = s as f32;
            }
        }
        out
    }

    #[test]
    fn linear_matches_naive_forward_and_backward() {
        let (n, ic, oc) = (7, 37, 5);
        let mut r = common::Rng::new(1);
        let mut v = |k: usize| (0..k).map(|_| r.normal() as f32).collect::<Vec<_>>();
        let (inp, w, b, dout) = (v(n * ic), v(oc * ic), v(oc), v(n * oc));
        let mut out = vec![0f32; n * oc];
        linear_fwd(&mut out, &inp, &w, Some(&b), Dims { n, ic, oc }, false);
        for (a, e) in out.iter().zip(naive(&inp, &w, &b, n, ic, oc)) {
            assert!((a - e).abs() < 1e-5);
        }
        let mut wt = vec![0f32; ic * oc];
        transpose(&mut wt, &w, oc, ic);
        let mut out_t = vec![0f32; n * oc];
        linear_fwd_t(&mut out_t, &inp, &wt, Some(&b), Dims { n, ic, oc }, false);
        for (a, e) in out_t.iter().zip(&out) {
            assert!((a - e).abs() < 1e-5);
        }
        let mut out_r = vec![0f32; n * oc];
        linear_rows(&mut out_r, &inp, &w, Some(&b), Dims { n, ic, oc }, false);
        linear_rows(&mut out_r, &inp, &w, None, Dims { n, ic, oc }, true);
        for ((a, e), bb) in out_r.iter().zip(&out).zip(b.iter().cycle()) {
            assert!((a - (2.0 * e - bb)).abs() < 1e-4);
        }
        let mut wb = vec![Line::default(); packed_lines(oc, ic)];
        pack_bf16(&mut wb, &w, oc, ic);
        let mut out_b = vec![0f32; n * oc];
        linear_panels(&mut out_b, &inp, &wb, Some(&b), Dims { n, ic, oc }, false);
        for (a, e) in out_b.iter().zip(&out) {
            assert!((a - e).abs() < 0.05 * (1.0 + e.abs()), "bf16 {a} vs {e}");
        }
        let mut dinp = vec![0f32; n * ic];
        linear_bwd_input(&mut dinp, &dout, &w, Dims { n, ic, oc }, false);
        for i in 0..n {
            for k in 0..ic {
                let e: f32 = (0..oc).map(|o| dout[i * oc + o] * w[o * ic + k]).sum();
                assert!((dinp[i * ic + k] - e).abs() < 1e-5);
            }
        }
        let mut dw = vec![1f32; oc * ic];
        let mut db = vec![1f32; oc];
        linear_bwd_weight(&mut dw, Some(&mut db), &dout, &inp, Dims { n, ic, oc });

        for o in 0..oc {
            let e: f32 = 1.0 + (0..n).map(|i| dout[i * oc + o]).sum::<f32>();
            assert!((db[o] - e).abs() < 1e-5);
            for k in 0..ic {
                let e: f32 = 1.0 + (0..n).map(|i| dout[i * oc + o] * inp[i * ic + k]).sum::<f32>();
                assert!((dw[o * ic + k] - e).abs() < 1e-4);
            }
        }
    }
}
