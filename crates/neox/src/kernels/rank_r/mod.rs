//! The LoRA branch's products, which all have the rank r (small) as one dimension, in three forms:
//!
//! - `rank_rows`: C (M, r) = α · drop(x) · Pᵀ, x (M, K) row-major, Pᵀ given as (r, K) (u = drop(x)·Aᵀ, du = dout·B);
//! - `rank_cols`: C (M, r) = α · drop(x)ᵀ · P, x (K, M) row-major, P (K, r) (dB = doutᵀ·u, dAᵀ = drop(x)ᵀ·du);
//! - `rank_update`: out (M, W) += α · drop(U · V), U (M, r), V (r, W) (out += s·u·Bᵀ, dinp += drop(du·A)).
//!
//! `gemm` is slow on these shapes (a 16-wide output or a 16-deep sum; docs/benchmarks.md) and cannot fuse the
//! dropout mask, which here is applied to sixteen elements in registers as they are loaded or stored. Each output
//! element is summed by one thread in a fixed order: results do not depend on the thread count or on the other
//! rows of the call.

use super::dropout::Mask;
use rayon::prelude::*;

/// Columns of x summed per block in `rank_rows`: 16 rows of Pᵀ of this length (32 KiB) stay in L1.
const KB: usize = 512;

/// Columns of x per `rank_cols` task: a multiple of every tile's row count (24, 12, 6) and of 16.
const COLS: usize = 48;

/// Below this many multiply-adds a product runs on the calling thread.
const SERIAL: usize = 1 << 16;

fn chunks_par<T: Send>(c: &mut [T], chunk: usize, work: usize, f: impl Fn((usize, &mut [T])) + Sync + Send) {
    if work < SERIAL {
        c.chunks_mut(chunk).enumerate().for_each(f);
    } else {
        c.par_chunks_mut(chunk).enumerate().for_each(f);
    }
}

/// Whether the AVX-512 kernels run (else the portable loops, which the tests also run).
fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// C (M, r) = α · drop(x) · Pᵀ (+ C when `accumulate`): x (M, K) row-major with row stride `ld`, `pt` = Pᵀ (r, K)
/// row-major, the mask on x's (row, column).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rank_rows(
    c: &mut [f32],
    accumulate: bool,
    alpha: f32,
    x: (&[f32], usize),
    mask: Option<&Mask>,
    mk: (usize, usize),
    pt: &[f32],
    r: usize,
) {
    rank_rows_on(simd(), c, accumulate, alpha, x, mask, mk, pt, r)
}

/// C (M, r) = α · drop(x)ᵀ · P (+ C when `accumulate`): x (K, M) row-major with row stride `ld`, P (K, r)
/// row-major, the mask on x's (row, column).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rank_cols(
    c: &mut [f32],
    accumulate: bool,
    alpha: f32,
    x: (&[f32], usize),
    mask: Option<&Mask>,
    mk: (usize, usize),
    p: &[f32],
    r: usize,
) {
    rank_cols_on(simd(), c, accumulate, alpha, x, mask, mk, p, r)
}

/// out (M, W) += α · drop(U · V): `out` with row stride `ld`, U (M, r) and V (r, W) row-major; the mask (on out's
/// (row, column)) drops elements of the product before they are added.
pub(crate) fn rank_update(
    out: (&mut [f32], usize),
    alpha: f32,
    u: &[f32],
    v: &[f32],
    mask: Option<&Mask>,
    mw: (usize, usize),
    r: usize,
) {
    rank_update_on(simd(), out, alpha, u, v, mask, mw, r)
}

/// Pᵀ (r, K) for the AVX-512 `rows` kernel: for each group of 16 rows (zero rows past r) and each 16 columns
/// (zero columns past K), the 16 × 16 block contiguous, so a kernel step reads 1 KiB in one stream (rows of Pᵀ
/// 16 KiB apart share L1 sets and evict each other).
fn pack_pt(pt: &[f32], r: usize, k: usize) -> Vec<f32> {
    let kc = k.div_ceil(16);
    let mut out = vec![0f32; r.div_ceil(16) * kc * 256];
    for j in 0..r {
        let (q, jj) = (j / 16, j % 16);
        for (cc, src) in pt[j * k..(j + 1) * k].chunks(16).enumerate() {
            let at = ((q * kc + cc) * 16 + jj) * 16;
            out[at..at + src.len()].copy_from_slice(src);
        }
    }
    out
}

/// V (r, W) for the AVX-512 `update` kernel: for each 64 columns (zero past W), the r × 64 block contiguous.
fn pack_v(v: &[f32], r: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.div_ceil(64) * r * 64];
    for j in 0..r {
        for (q, src) in v[j * w..(j + 1) * w].chunks(64).enumerate() {
            let at = (q * r + j) * 64;
            out[at..at + src.len()].copy_from_slice(src);
        }
    }
    out
}

/// dst = drop(src) for the slice of x's row `row` starting at column `col0` (src itself without a mask).
fn dropped(dst: &mut [f32], src: &[f32], mask: Option<&Mask>, row: usize, col0: usize) {
    match mask {
        Some(m) => m.apply(dst, src, row, col0),
        None => dst.copy_from_slice(src),
    }
}

/// d = α·s, or d += α·s when accumulating.
#[inline(always)]
fn store(d: &mut f32, s: f32, alpha: f32, accumulate: bool) {
    *d = if accumulate { *d + alpha * s } else { alpha * s };
}

/// `rank_rows` on the AVX-512 kernel (`simd`) or the portable loop.
#[allow(clippy::too_many_arguments)]
fn rank_rows_on(
    simd: bool,
    c: &mut [f32],
    accumulate: bool,
    alpha: f32,
    (x, ld): (&[f32], usize),
    mask: Option<&Mask>,
    (m, k): (usize, usize),
    pt: &[f32],
    r: usize,
) {
    assert!(c.len() >= m * r && pt.len() >= r * k && r > 0);
    assert!(m == 0 || k == 0 || x.len() >= (m - 1) * ld + k);
    const ROWS: usize = 16;
    let packed = if simd { pack_pt(pt, r, k) } else { Vec::new() };
    chunks_par(&mut c[..m * r], ROWS * r, m * k * r, |(t, ct)| {
        let m0 = t * ROWS;
        let rows = ct.len() / r;
        #[cfg(target_arch = "x86_64")]
        if simd {
            let xp = x[m0 * ld..].as_ptr();
            // SAFETY: AVX-512F checked; x holds rows m0..m0 + rows of k values, `packed` is `pack_pt`'s, ct rows × r.
            return unsafe { x86::rows(ct, accumulate, alpha, (xp, ld), mask, (m0, rows), k, &packed, r) };
        }
        let mut xr = vec![0f32; k];
        for i in 0..rows {
            dropped(&mut xr, &x[(m0 + i) * ld..(m0 + i) * ld + k], mask, m0 + i, 0);
            for j in 0..r {
                let s: f32 = xr.iter().zip(&pt[j * k..(j + 1) * k]).map(|(a, b)| a * b).sum();
                store(&mut ct[i * r + j], s, alpha, accumulate);
            }
        }
    });
}

/// `rank_cols` on the AVX-512 kernel (`simd`) or the portable loop.
#[allow(clippy::too_many_arguments)]
fn rank_cols_on(
    simd: bool,
    c: &mut [f32],
    accumulate: bool,
    alpha: f32,
    (x, ld): (&[f32], usize),
    mask: Option<&Mask>,
    (m, k): (usize, usize),
    p: &[f32],
    r: usize,
) {
    assert!(c.len() >= m * r && p.len() >= k * r && r > 0);
    assert!(m == 0 || k == 0 || x.len() >= (k - 1) * ld + m);
    chunks_par(&mut c[..m * r], COLS * r, m * k * r, |(t, ct)| {
        let m0 = t * COLS;
        let cols = ct.len() / r;
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX-512F checked; x holds k rows with columns m0..m0 + cols, p k × r, ct cols × r.
            return unsafe { x86::cols(ct, accumulate, alpha, (x, ld), mask, (m0, cols), k, p, r) };
        }
        let mut acc = vec![0f32; cols * r];
        let mut xr = vec![0f32; cols];
        for kk in 0..k {
            dropped(&mut xr, &x[kk * ld + m0..kk * ld + m0 + cols], mask, kk, m0);
            for (i, &a) in xr.iter().enumerate() {
                for (s, &pv) in acc[i * r..(i + 1) * r].iter_mut().zip(&p[kk * r..(kk + 1) * r]) {
                    *s += a * pv;
                }
            }
        }
        ct.iter_mut().zip(&acc).for_each(|(d, &s)| store(d, s, alpha, accumulate));
    });
}

/// `rank_update` on the AVX-512 kernel (`simd`) or the portable loop.
#[allow(clippy::too_many_arguments)]
fn rank_update_on(
    simd: bool,
    (out, ld): (&mut [f32], usize),
    alpha: f32,
    u: &[f32],
    v: &[f32],
    mask: Option<&Mask>,
    (m, w): (usize, usize),
    r: usize,
) {
    assert!(u.len() >= m * r && v.len() >= r * w && ld >= w);
    assert!(m == 0 || w == 0 || out.len() >= (m - 1) * ld + w);
    if m == 0 || w == 0 {
        return;
    }
    const ROWS: usize = 8;
    let packed = if simd { pack_v(v, r, w) } else { Vec::new() };
    let out = &mut out[..(m - 1) * ld + w];
    chunks_par(out, ROWS * ld, m * w * r, |(t, ot)| {
        let m0 = t * ROWS;
        let rows = ot.len().div_ceil(ld);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX-512F checked; ot holds rows × W values at stride ld (the last row may be short of ld),
            // u rows m0.. of r values, v r × w.
            return unsafe { x86::update((ot, ld), alpha, &u[m0 * r..], &packed, mask, (m0, rows), w, r) };
        }
        let mut y = vec![0f32; w];
        for i in 0..rows {
            y.fill(0.0);
            for j in 0..r {
                let a = u[(m0 + i) * r + j];
                y.iter_mut().zip(&v[j * w..(j + 1) * w]).for_each(|(s, &b)| *s += a * b);
            }
            y.iter_mut().for_each(|s| *s *= alpha);
            let dst = &mut ot[i * ld..i * ld + w];
            match mask {
                Some(msk) => msk.add(dst, &y, m0 + i, 0),
                None => dst.iter_mut().zip(&y).for_each(|(d, s)| *d += s),
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;
