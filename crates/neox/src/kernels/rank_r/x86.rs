//! The AVX-512 kernels of `rank_r` (see its header for the three forms).

use crate::kernels::dropout::{x86::RowMask, Mask};
use crate::kernels::lanes16 as lanes;
use std::arch::x86_64::*;

pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
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
    let h =
        |a: __m512, b: __m512| _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xdd>(a, b));
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
    c.iter_mut().zip(&sums).for_each(|(d, &s)| super::store(d, s, alpha, accumulate));
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
