//! The few-row q8_0 tiles: R weight rows x M input rows, the weight chunk loaded once for the M rows.
//! Signed int8 products use the sign trick (ggml's): |w| as the unsigned operand and x with w's sign as the
//! signed one, so w = −128 (possible in files from other quantizers) is exact and x is never −128 (ours).

use super::{Q8Matrix, QRows};
use std::arch::x86_64::*;

pub fn vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("f16c")
}

pub fn avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// Bytes ahead at which each weight row is prefetched into L1 (as the f32 decode kernel), and how many times
/// further a second prefetch into L2 runs.
const PREFETCH_BYTES: usize = 4096;
const L2_AHEAD: usize = 4;

/// Two f16 scales at `p` as f32 `[d0, d1, 0, 0]`.
#[inline(always)]
unsafe fn scales2(p: *const u16) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()))
}

/// Σ over chunks of the R x M dot products, into `res[i][m]` (weight row o + i, input row r0 + m).
#[inline]
#[allow(clippy::needless_range_loop)] // indices over const-sized register arrays read clearest
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c")]
unsafe fn tile_vnni<const R: usize, const M: usize>(
    w: &Q8Matrix,
    o: usize,
    x: &QRows,
    r0: usize,
    res: &mut [[f32; M]; R],
) {
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    let zero = _mm512_setzero_si512();
    for c in 0..w.chunks {
        let mut aw = [zero; R];
        let mut neg = [0u64; R];
        let mut dw = [_mm512_setzero_ps(); R];
        for i in 0..R {
            let p = w.val_ptr(o + i, c);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(L2_AHEAD * PREFETCH_BYTES) as *const i8);
            let v = _mm512_load_si512(p as *const _);
            aw[i] = _mm512_abs_epi8(v);
            neg[i] = _mm512_movepi8_mask(v);
            dw[i] = _mm512_broadcast_f32x2(scales2(w.scale_ptr(o + i, c)));
        }
        for m in 0..M {
            let (xq, xd) = x.chunk(r0 + m, c);
            let xv = _mm512_loadu_si512(xq.as_ptr() as *const _);
            let dx = _mm512_broadcast_f32x2(_mm_castpd_ps(_mm_load_sd(xd.as_ptr() as *const f64)));
            for i in 0..R {
                let xs = _mm512_mask_sub_epi8(xv, neg[i], zero, xv);
                let s = _mm512_dpbusd_epi32(zero, aw[i], xs);
                acc[i][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw[i], dx), acc[i][m]);
            }
        }
    }
    for i in 0..R {
        for m in 0..M {
            res[i][m] = _mm512_reduce_add_ps(acc[i][m]);
        }
    }
}

/// The same sums on AVX2: each chunk as two 32-byte halves (each holding half of both blocks, so the scale
/// vector is `[d0, d1]` repeated).
#[inline]
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const R: usize, const M: usize>(
    w: &Q8Matrix,
    o: usize,
    x: &QRows,
    r0: usize,
    res: &mut [[f32; M]; R],
) {
    let mut acc = [[_mm256_setzero_ps(); M]; R];
    let ones = _mm256_set1_epi16(1);
    let pair = |v: __m128| _mm256_castpd_ps(_mm256_broadcastsd_pd(_mm_castps_pd(v)));
    for c in 0..w.chunks {
        let mut dw = [_mm256_setzero_ps(); R];
        for i in 0..R {
            dw[i] = pair(scales2(w.scale_ptr(o + i, c)));
        }
        for h in 0..2 {
            let mut wv = [_mm256_setzero_si256(); R];
            let mut aw = [_mm256_setzero_si256(); R];
            for i in 0..R {
                let p = w.val_ptr(o + i, c).add(h * 32);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES) as *const i8);
                wv[i] = _mm256_load_si256(p as *const _);
                aw[i] = _mm256_sign_epi8(wv[i], wv[i]);
            }
            for m in 0..M {
                let (xq, xd) = x.chunk(r0 + m, c);
                let xv = _mm256_loadu_si256(xq.as_ptr().add(h * 32) as *const _);
                let dx = pair(_mm_castpd_ps(_mm_load_sd(xd.as_ptr() as *const f64)));
                for i in 0..R {
                    let xs = _mm256_sign_epi8(xv, wv[i]);
                    let s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[i], xs), ones);
                    acc[i][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw[i], dx), acc[i][m]);
                }
            }
        }
    }
    for i in 0..R {
        for m in 0..M {
            res[i][m] = hsum256(acc[i][m]);
        }
    }
}

/// The sum of 8 lanes in a fixed pairwise order: (0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then 0+1.
#[inline]
#[target_feature(enable = "avx")]
pub(crate) unsafe fn hsum256(v: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    _mm_cvtss_f32(s1)
}

crate::kernels::few_row_tiles!(
    block_vnni,
    tile_vnni,
    "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c",
    4,
    Q8Matrix,
    QRows
);
crate::kernels::few_row_tiles!(block_avx2, tile_avx2, "avx2,fma,f16c", 2, Q8Matrix, QRows);
