//! The few-row q4_K tiles: R weight rows x M input rows, each super-block's quants unpacked and its scales
//! spread once for the M rows (see `matrix` for the layouts and the sums).

use super::matrix::{input_pos, KRows, Q4KMatrix, XS};
use super::QK_K;
use crate::kernels::q8::x86::hsum256;
use std::arch::x86_64::*;

/// Bytes ahead of a tile's position in its group's bytes at which it prefetches into L1, and how many times
/// further a second prefetch into L2 runs.
const PREFETCH_BYTES: usize = 4096;
const L2_AHEAD: usize = 4;

/// Prefetches the lines a tile over the group of row `r` reads `PREFETCH_BYTES` after super-block `s`. A group
/// is one stream of `SB_BYTES` a super-block (its quants, scales and (d, dmin) regions are read in proportion),
/// so the lines `PREFETCH_BYTES` ahead of that proportion, wherever they lie (this group or the next ones), are
/// the ones needed that much later.
#[inline(always)]
unsafe fn prefetch(w: &Q4KMatrix, r: usize, s: usize) {
    const SB: usize = Q4KMatrix::SB_BYTES;
    let p = w.group_ptr(r).wrapping_add(s * SB);
    let mut line = 0;
    while line < SB + 64 {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES + line) as *const i8);
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(L2_AHEAD * PREFETCH_BYTES + line) as *const i8);
        line += 64;
    }
}

/// d and dmin (two f16 at `p`) as f32.
#[inline(always)]
unsafe fn d_dmin(p: *const u16) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// Σ over super-blocks of the R x M dot products, into `res[i][m]` (weight row o + i, input row r0 + m). A
/// 64-byte load of quants (half h of the super-block) gives two operands: its low nibbles (sub-blocks 4h, 4h+2)
/// and its high ones (4h+1, 4h+3); their `vpmaddubsw` pair sums fill 32 s16 lanes, 16 from each sub-block, which
/// `vpdpwssd` multiplies by the matching scales (spread by `vpermw`) and sums into 16 int32 lanes.
#[inline]
#[allow(clippy::needless_range_loop)] // indices over const-sized register arrays read clearest
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c")]
unsafe fn tile_vnni<const R: usize, const M: usize>(
    w: &Q4KMatrix,
    o: usize,
    x: &KRows,
    r0: usize,
    res: &mut [[f32; M]; R],
) {
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    let zero = _mm512_setzero_si512();
    let nib = _mm512_set1_epi8(0x0F);
    // the sub-blocks of s16 lanes 0-15 and 16-31, for operands lo(h = 0), hi(0), lo(1), hi(1)
    let spread = |a: i16, b: i16| _mm512_mask_blend_epi16(0xFFFF_0000, _mm512_set1_epi16(a), _mm512_set1_epi16(b));
    let idx = [spread(0, 2), spread(1, 3), spread(4, 6), spread(5, 7)];
    // the tile's rows are one group (or one row): row i's data is at (+128, +16, +4) · i from row o's
    debug_assert!(R == 1 || o.is_multiple_of(4));
    let (mut q0, mut meta0, mut dd0) = w.row_ptrs(o);
    let (qs_step, meta_step, dd_step) = Q4KMatrix::STEP;
    // input row r0 + m, super-block s: int8 at xq + (m · sbs + s) · 256, dx at dx + m · sbs + s, dx · Σq at
    // xs + (m · sbs + s) · 16
    let sbs = w.sbs;
    debug_assert!(x.n >= r0 + M && x.sbs == sbs);
    let xq = x.qs.as_ptr().add(r0 * sbs * QK_K);
    let dx = x.dx.as_ptr().add(r0 * sbs);
    let xs = x.xs.as_ptr().add(r0 * sbs * XS);
    for s in 0..sbs {
        prefetch(w, o, s);
        for i in 0..R {
            let q = q0.add(i * 128);
            let meta = meta0.add(i * 16);
            let sc = _mm512_zextsi128_si512(_mm_cvtepu8_epi16(_mm_loadl_epi64(meta as *const __m128i)));
            let mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(meta.add(8) as *const __m128i)));
            let (d, dmin) = d_dmin(dd0.add(i * 4) as *const u16);
            let wm = _mm512_zextps256_ps512(_mm256_mul_ps(mins, _mm256_set1_ps(dmin)));
            let mut wq = [zero; 4];
            let mut ws = [zero; 4];
            for h in 0..2 {
                let v = _mm512_load_si512(q.add(64 * h) as *const _);
                wq[2 * h] = _mm512_and_si512(v, nib);
                wq[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                ws[2 * h] = _mm512_permutexvar_epi16(idx[2 * h], sc);
                ws[2 * h + 1] = _mm512_permutexvar_epi16(idx[2 * h + 1], sc);
            }
            for m in 0..M {
                let at = m * sbs + s;
                let xm = xq.add(at * QK_K);
                let mut a = zero;
                for k in 0..4 {
                    let p = _mm512_maddubs_epi16(wq[k], _mm512_loadu_si512(xm.add(64 * k) as *const _));
                    a = _mm512_dpwssd_epi32(a, p, ws[k]);
                }
                acc[i][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(d * *dx.add(at)), acc[i][m]);
                acc[i][m] = _mm512_fnmadd_ps(wm, _mm512_loadu_ps(xs.add(at * XS)), acc[i][m]);
            }
        }
        q0 = q0.add(qs_step);
        meta0 = meta0.add(meta_step);
        dd0 = dd0.add(dd_step);
    }
    for i in 0..R {
        for m in 0..M {
            res[i][m] = _mm512_reduce_add_ps(acc[i][m]);
        }
    }
}

/// The same sums on AVX2: 32-byte loads of quants, each one sub-block in its low nibbles and the next in its
/// high ones, so each scale is one broadcast and `vpmaddwd` applies it.
#[inline]
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const R: usize, const M: usize>(
    w: &Q4KMatrix,
    o: usize,
    x: &KRows,
    r0: usize,
    res: &mut [[f32; M]; R],
) {
    let mut acc = [[_mm256_setzero_ps(); M]; R];
    let nib = _mm256_set1_epi8(0x0F);
    for s in 0..w.sbs {
        prefetch(w, o, s);
        for i in 0..R {
            let q = w.qs_ptr(o + i, s);
            let meta = w.meta_ptr(o + i, s);
            let mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(meta.add(8) as *const __m128i)));
            let (d, dmin) = d_dmin(w.dd_ptr(o + i, s));
            let wm = _mm256_mul_ps(mins, _mm256_set1_ps(dmin));
            let mut a = [_mm256_setzero_si256(); M];
            for c in 0..4 {
                let v = _mm256_load_si256(q.add(32 * c) as *const _);
                let lo = _mm256_and_si256(v, nib);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
                let sl = _mm256_set1_epi16(*meta.add(2 * c) as i16);
                let sh = _mm256_set1_epi16(*meta.add(2 * c + 1) as i16);
                for m in 0..M {
                    let xq = x.qs(r0 + m, s).as_ptr();
                    let xl = _mm256_loadu_si256(xq.add(input_pos(64 * c)) as *const _);
                    let xh = _mm256_loadu_si256(xq.add(input_pos(64 * c + 32)) as *const _);
                    a[m] = _mm256_add_epi32(a[m], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), sl));
                    a[m] = _mm256_add_epi32(a[m], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), sh));
                }
            }
            for m in 0..M {
                let (dx, xs) = x.scales(r0 + m, s);
                acc[i][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[m]), _mm256_set1_ps(d * dx), acc[i][m]);
                acc[i][m] = _mm256_fnmadd_ps(wm, _mm256_loadu_ps(xs.as_ptr()), acc[i][m]);
            }
        }
    }
    for i in 0..R {
        for m in 0..M {
            res[i][m] = hsum256(acc[i][m]);
        }
    }
}

crate::kernels::few_row_tiles!(
    block_vnni,
    tile_vnni,
    "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c",
    4,
    Q4KMatrix,
    KRows
);
crate::kernels::few_row_tiles!(block_avx2, tile_avx2, "avx2,fma,f16c", 1, Q4KMatrix, KRows);
