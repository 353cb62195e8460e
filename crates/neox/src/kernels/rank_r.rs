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
            let src = &x[(m0 + i) * ld..(m0 + i) * ld + k];
            match mask {
                Some(msk) => msk.apply(&mut xr, src, m0 + i, 0),
                None => xr.copy_from_slice(src),
            }
            for j in 0..r {
                let s: f32 = xr.iter().zip(&pt[j * k..(j + 1) * k]).map(|(a, b)| a * b).sum();
                let d = &mut ct[i * r + j];
                *d = if accumulate { *d + alpha * s } else { alpha * s };
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
            let src = &x[kk * ld + m0..kk * ld + m0 + cols];
            match mask {
                Some(msk) => msk.apply(&mut xr, src, kk, m0),
                None => xr.copy_from_slice(src),
            }
            for (i, &a) in xr.iter().enumerate() {
                for (s, &pv) in acc[i * r..(i + 1) * r].iter_mut().zip(&p[kk * r..(kk + 1) * r]) {
                    *s += a * pv;
                }
            }
        }
        for (d, &s) in ct.iter_mut().zip(&acc) {
            *d = if accumulate { *d + alpha * s } else { alpha * s };
        }
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
mod x86 {
    use crate::kernels::dropout::{x86::RowMask, Mask};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// The first `n` lanes (0 to 16).
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    }

    /// [Σ lanes of v[0], …, Σ lanes of v[15]]: a transpose-and-add tree (15 adds instead of 16 full reductions).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sum16(v: &[__m512; 16]) -> __m512 {
        // pairs: within each 128-bit lane [a0+a2, b0+b2, a1+a3, b1+b3]
        let w: [__m512; 8] = std::array::from_fn(|j| {
            let (a, b) = (v[2 * j], v[2 * j + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // quads: within each 128-bit lane the partial sums of 4 vectors
        let q: [__m512; 4] = std::array::from_fn(|j| {
            let (a, b) = (w[2 * j], w[2 * j + 1]);
            _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xee>(a, b))
        });
        // across 128-bit lanes
        let h = |a: __m512, b: __m512| {
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xdd>(a, b))
        };
        let (y0, y1) = (h(q[0], q[1]), h(q[2], q[3]));
        h(y0, y1)
    }

    /// Row `x` (k values) against NW ≤ 16 rows of one 16-row group of packed Pᵀ, in k-blocks; adds each
    /// block's sums to `sums`.
    #[inline]
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn dots<const NW: usize>(x: *const f32, rm: Option<&RowMask>, k: usize, pp: *const f32, sums: &mut __m512) {
        for k0 in (0..k).step_by(super::KB) {
            let kb = super::KB.min(k - k0);
            let mut acc = [_mm512_setzero_ps(); 16];
            let mut c = 0;
            while c < kb {
                let mut xv = _mm512_maskz_loadu_ps(lanes(kb - c), x.add(k0 + c));
                if let Some(rm) = rm {
                    xv = rm.apply(xv, k0 + c);
                }
                let blk = pp.add((k0 + c) * 16);
                for j in 0..NW {
                    acc[j] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(blk.add(16 * j)), acc[j]);
                }
                c += 16;
            }
            *sums = _mm512_add_ps(*sums, sum16(&acc));
        }
    }

    /// `rank_rows` for rows m0..m0 + rows (x points at row m0).
    ///
    /// # Safety
    /// AVX-512F available; x holds `rows` rows of k values at stride ld, `pp` is `pack_pt` of Pᵀ (r, k), c
    /// rows × r.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows(
        c: &mut [f32],
        accumulate: bool,
        alpha: f32,
        (x, ld): (*const f32, usize),
        mask: Option<&Mask>,
        (m0, rows): (usize, usize),
        k: usize,
        pp: &[f32],
        r: usize,
    ) {
        let al = _mm512_set1_ps(alpha);
        let group = k.div_ceil(16) * 256;
        for i in 0..rows {
            let rm = mask.map(|m| RowMask::new(m, m0 + i));
            let xr = x.add(i * ld);
            for j0 in (0..r).step_by(16) {
                let nw = 16.min(r - j0);
                let p = pp.as_ptr().add(j0 / 16 * group);
                let mut sums = _mm512_setzero_ps();
                macro_rules! go {
                    ($($n:literal)*) => {
                        match nw {
                            $($n => dots::<$n>(xr, rm.as_ref(), k, p, &mut sums),)*
                            _ => dots::<16>(xr, rm.as_ref(), k, p, &mut sums),
                        }
                    };
                }
                go!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
                let (dst, valid) = (c.as_mut_ptr().add(i * r + j0), lanes(nw));
                let val = if accumulate {
                    _mm512_fmadd_ps(al, sums, _mm512_maskz_loadu_ps(valid, dst))
                } else {
                    _mm512_mul_ps(al, sums)
                };
                _mm512_mask_storeu_ps(dst, valid, val);
            }
        }
    }

    /// Columns of x per `cols` task, and rows of x per packed panel (48 × 128 values: 24 KiB, in L1).
    const COLS: usize = super::COLS;
    const KR: usize = 128;

    /// sums (MR rows of stride r, columns j0..j0 + cols) += panel rows (kb of them, MR values at column b0 of
    /// each) against P's rows; `first`: the sums start from zero.
    #[inline]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn col_tile<const MR: usize, const NV: usize>(
        sums: *mut f32,
        first: bool,
        panel: *const f32,
        (b0, mb): (usize, usize),
        kb: usize,
        (p, r): (*const f32, usize),
        (j0, cols): (usize, usize),
    ) {
        let pm: [__mmask16; NV] = std::array::from_fn(|v| lanes(cols.saturating_sub(16 * v)));
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        if !first {
            for i in 0..mb.min(MR) {
                for v in 0..NV {
                    acc[i][v] = _mm512_maskz_loadu_ps(pm[v], sums.add(i * r + j0 + 16 * v));
                }
            }
        }
        for kk in 0..kb {
            let pr = p.add(kk * r + j0);
            let pv: [__m512; NV] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(pm[v], pr.add(16 * v)));
            let src = panel.add(kk * COLS + b0);
            for i in 0..MR {
                let a = _mm512_set1_ps(*src.add(i));
                for v in 0..NV {
                    acc[i][v] = _mm512_fmadd_ps(a, pv[v], acc[i][v]);
                }
            }
        }
        for i in 0..mb.min(MR) {
            for v in 0..NV {
                _mm512_mask_storeu_ps(sums.add(i * r + j0 + 16 * v), pm[v], acc[i][v]);
            }
        }
    }

    /// `rank_cols` for C rows (x columns) m0..m0 + cols ≤ COLS: rows of x are packed KR at a time (through the
    /// mask), then tiles of the panel run against P.
    ///
    /// # Safety
    /// AVX-512F available; x holds k rows of ld values covering columns m0..m0 + cols, p k × r, c cols × r.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn cols(
        c: &mut [f32],
        accumulate: bool,
        alpha: f32,
        (x, ld): (&[f32], usize),
        mask: Option<&Mask>,
        (m0, cols): (usize, usize),
        k: usize,
        p: &[f32],
        r: usize,
    ) {
        // rows per tile by the vectors of r it holds: at most 24 accumulators
        let (mr, chunk) = if r <= 16 {
            (24, 16)
        } else if r <= 32 {
            (12, 32)
        } else {
            (6, 64)
        };
        let mut panel = [0f32; COLS * KR];
        let mut sums = vec![0f32; cols * r];
        let sp = sums.as_mut_ptr();
        for k0 in (0..k).step_by(KR) {
            let kb = KR.min(k - k0);
            for kk in 0..kb {
                let row = x.as_ptr().add((k0 + kk) * ld + m0);
                let rm = mask.map(|m| RowMask::new(m, k0 + kk));
                for h in 0..COLS / 16 {
                    let mut v = _mm512_maskz_loadu_ps(lanes(cols.saturating_sub(16 * h)), row.add(16 * h));
                    if let Some(rm) = &rm {
                        v = rm.apply(v, m0 + 16 * h);
                    }
                    _mm512_storeu_ps(panel.as_mut_ptr().add(kk * COLS + 16 * h), v);
                }
            }
            let pp = (p.as_ptr().add(k0 * r), r);
            for b0 in (0..cols).step_by(mr) {
                let at = (b0, mr.min(cols - b0));
                let sb = sp.add(b0 * r);
                for j0 in (0..r).step_by(chunk) {
                    let j = (j0, chunk.min(r - j0));
                    let (first, pn) = (k0 == 0, panel.as_ptr());
                    match (mr, j.1.div_ceil(16)) {
                        (24, _) => col_tile::<24, 1>(sb, first, pn, at, kb, pp, j),
                        (12, 1) => col_tile::<12, 1>(sb, first, pn, at, kb, pp, j),
                        (12, _) => col_tile::<12, 2>(sb, first, pn, at, kb, pp, j),
                        (_, 1) => col_tile::<6, 1>(sb, first, pn, at, kb, pp, j),
                        (_, 2) => col_tile::<6, 2>(sb, first, pn, at, kb, pp, j),
                        (_, 3) => col_tile::<6, 3>(sb, first, pn, at, kb, pp, j),
                        _ => col_tile::<6, 4>(sb, first, pn, at, kb, pp, j),
                    }
                }
            }
        }
        for (d, &s) in c.iter_mut().zip(&sums) {
            *d = if accumulate { *d + alpha * s } else { alpha * s };
        }
    }

    /// `rank_update` for rows m0..m0 + rows: 4 rows × 64 columns of accumulators, r multiply-adds deep.
    ///
    /// # Safety
    /// AVX-512F available; out holds `rows` rows of w values at stride ld, u rows × r, `pv` is `pack_v` of
    /// V (r, w).
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn update(
        (out, ld): (&mut [f32], usize),
        alpha: f32,
        u: &[f32],
        pv: &[f32],
        mask: Option<&Mask>,
        (m0, rows): (usize, usize),
        w: usize,
        r: usize,
    ) {
        const RB: usize = 4;
        const CV: usize = 4;
        let al = _mm512_set1_ps(alpha);
        for i0 in (0..rows).step_by(RB) {
            let rb = RB.min(rows - i0);
            let rms: [Option<RowMask>; RB] = std::array::from_fn(|i| mask.map(|m| RowMask::new(m, m0 + i0 + i)));
            for c0 in (0..w).step_by(16 * CV) {
                let vm: [__mmask16; CV] = std::array::from_fn(|q| lanes((w - c0).saturating_sub(16 * q)));
                let mut acc = [[_mm512_setzero_ps(); CV]; RB];
                let blk = pv.as_ptr().add(c0 / 64 * r * 64);
                for j in 0..r {
                    let vr = blk.add(j * 64);
                    let vv: [__m512; CV] = std::array::from_fn(|q| _mm512_loadu_ps(vr.add(16 * q)));
                    for i in 0..RB {
                        // rows past the block repeat its last row (computed, not stored)
                        let a = _mm512_set1_ps(*u.as_ptr().add((i0 + i.min(rb - 1)) * r + j));
                        for q in 0..CV {
                            acc[i][q] = _mm512_fmadd_ps(a, vv[q], acc[i][q]);
                        }
                    }
                }
                for i in 0..rb {
                    for q in 0..CV {
                        if vm[q] == 0 {
                            continue;
                        }
                        let dst = out.as_mut_ptr().add((i0 + i) * ld + c0 + 16 * q);
                        let mut y = _mm512_mul_ps(al, acc[i][q]);
                        if let Some(rm) = &rms[i] {
                            y = rm.apply(y, c0 + 16 * q);
                        }
                        _mm512_mask_storeu_ps(dst, vm[q], _mm512_add_ps(_mm512_maskz_loadu_ps(vm[q], dst), y));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(rng: &mut common::Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.next_f64() as f32 - 0.5).collect()
    }

    /// x's element (row, col) through the mask, in float64 (Mask::keeps is the mask's definition).
    fn dropped(x: &[f32], ld: usize, mask: Option<&Mask>, p: f64, row: usize, col: usize) -> f64 {
        match mask {
            Some(m) if !m.keeps(row, col) => 0.0,
            Some(_) => x[row * ld + col] as f64 / (1.0 - p),
            None => x[row * ld + col] as f64,
        }
    }

    fn close(got: &[f32], want: &[f64], depth: usize, what: &str) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let tol = 2e-6 * (1.0 + w.abs()) * (depth as f64).sqrt();
            assert!((g as f64 - w).abs() < tol, "{what} [{i}]: {g} vs {w}");
        }
    }

    const P: f32 = 0.25;
    /// (M, K or W, r): ranks below, at and above one vector and one 64-lane chunk, odd sizes, partial blocks.
    const SHAPES: [(usize, usize, usize); 8] =
        [(1, 1, 1), (13, 7, 3), (50, 33, 16), (97, 600, 20), (61, 40, 33), (30, 19, 64), (7, 5, 80), (49, 17, 12)];

    /// Each form against its definition summed in float64 (no library), with and without the mask and
    /// accumulation. Reference: the formulas in this file's header.
    #[test]
    fn every_form_matches_the_float64_product() {
        let mut rng = common::Rng::new(5);
        let msk = Mask::new(9, 2, P);
        for (simd, &(m, k, r)) in [false, simd()].into_iter().flat_map(|s| SHAPES.iter().map(move |sh| (s, sh))) {
            for mask in [None, Some(&msk)] {
                let p = P as f64;
                for accumulate in [false, true] {
                    let what = format!("simd={simd} m{m} k{k} r{r} mask={} acc={accumulate}", mask.is_some());
                    // rank_rows: x (M, K) at stride k + 2, pt (r, K)
                    let (ld, x, pt, c0) =
                        (k + 2, rand(&mut rng, m * (k + 2)), rand(&mut rng, r * k), rand(&mut rng, m * r));
                    let mut c = c0.clone();
                    rank_rows_on(simd, &mut c, accumulate, 0.75, (&x, ld), mask, (m, k), &pt, r);
                    let want: Vec<f64> = (0..m * r)
                        .map(|e| {
                            let (i, j) = (e / r, e % r);
                            let s: f64 = (0..k).map(|kk| dropped(&x, ld, mask, p, i, kk) * pt[j * k + kk] as f64).sum();
                            0.75 * s + if accumulate { c0[e] as f64 } else { 0.0 }
                        })
                        .collect();
                    close(&c, &want, k, &format!("rows {what}"));
                    // rank_cols: x (K, M) at stride m + 3, p (K, r)
                    let (ld, x, pm) = (m + 3, rand(&mut rng, k * (m + 3)), rand(&mut rng, k * r));
                    let mut c = c0.clone();
                    rank_cols_on(simd, &mut c, accumulate, 0.75, (&x, ld), mask, (m, k), &pm, r);
                    let want: Vec<f64> = (0..m * r)
                        .map(|e| {
                            let (i, j) = (e / r, e % r);
                            let s: f64 = (0..k).map(|kk| dropped(&x, ld, mask, p, kk, i) * pm[kk * r + j] as f64).sum();
                            0.75 * s + if accumulate { c0[e] as f64 } else { 0.0 }
                        })
                        .collect();
                    close(&c, &want, k, &format!("cols {what}"));
                }
                // rank_update: out (M, W = k) at stride k + 1, u (M, r), v (r, W)
                let w = k;
                let (ld, u, v) = (w + 1, rand(&mut rng, m * r), rand(&mut rng, r * w));
                let out0 = rand(&mut rng, m * ld);
                let mut out = out0.clone();
                rank_update_on(simd, (&mut out, ld), 0.5, &u, &v, mask, (m, w), r);
                for i in 0..m {
                    for col in 0..ld {
                        let at = i * ld + col;
                        let want = if col < w {
                            let y: f64 = (0..r).map(|j| u[i * r + j] as f64 * v[j * w + col] as f64).sum::<f64>() * 0.5;
                            let y = match mask {
                                Some(mk) if !mk.keeps(i, col) => 0.0,
                                Some(_) => y / (1.0 - p),
                                None => y,
                            };
                            out0[at] as f64 + y
                        } else {
                            out0[at] as f64
                        };
                        close(
                            &out[at..at + 1],
                            &[want],
                            r,
                            &format!("update simd={simd} m{m} w{w} r{r} mask={} [{i},{col}]", mask.is_some()),
                        );
                    }
                }
            }
        }
    }

    /// A row's result has the same bits whether it is computed alone or among others, and with one thread.
    #[test]
    fn rows_are_independent_of_the_batch() {
        let mut rng = common::Rng::new(8);
        let (m, k, r) = (200, 300, 16);
        let x = rand(&mut rng, m * k);
        let pt = rand(&mut rng, r * k);
        let mut all = vec![0f32; m * r];
        rank_rows(&mut all, false, 1.0, (&x, k), None, (m, k), &pt, r);
        let v = rand(&mut rng, r * k);
        let mut upd = vec![0f32; m * k];
        rank_update((&mut upd, k), 1.0, &all, &v, None, (m, k), r);
        for i in [0, 1, 15, 16, 199] {
            let mut one = vec![0f32; r];
            rank_rows(&mut one, false, 1.0, (&x[i * k..], k), None, (1, k), &pt, r);
            assert_eq!(one, all[i * r..(i + 1) * r], "rows: row {i}");
            let mut one_upd = vec![0f32; k];
            rank_update((&mut one_upd, k), 1.0, &one, &v, None, (1, k), r);
            assert_eq!(one_upd, upd[i * k..(i + 1) * k], "update: row {i}");
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let mut serial = vec![0f32; m * r];
        pool.install(|| rank_rows(&mut serial, false, 1.0, (&x, k), None, (m, k), &pt, r));
        assert_eq!(serial, all);
    }
}
