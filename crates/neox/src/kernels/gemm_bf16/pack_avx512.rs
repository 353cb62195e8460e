//! AVX-512 versions of `pack::panel` for whole panels (every lane inside the matrix, every k-pair complete)
//! whose lanes or whose k are contiguous in memory; anything else goes to the portable loops.
//!
//! f32 is converted by `vcvtne2ps2bf16` (round to nearest even, like `Elem::bf16_bits`, except that it treats a
//! denormal input as zero: `vdpbf16ps` reads a denormal bf16 as zero anyway, so the products are the same).

use super::Data;
use std::arch::x86_64::*;

/// Packs a whole panel if a fast path covers it (see `pack::panel` for the layout); false if not (nothing
/// written).
///
/// # Safety
/// AVX512_BF16 + AVX-512 F/BW/VL available; `dst` holds kp·w words; `src` holds element (k, x) at k·sk + x·sx
/// for every k < 2(p0 + kp) and x < x0 + w (the caller's operand check covers its whole matrix).
#[inline]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn panel(
    dst: &mut [u32],
    src: Data<'_>,
    sk: usize,
    sx: usize,
    p0: usize,
    kp: usize,
    x0: usize,
    w: usize,
) -> bool {
    assert!(dst.len() >= kp * w);
    let d = dst.as_mut_ptr();
    match src {
        Data::F32(s) if sx == 1 && w.is_multiple_of(8) => {
            lanes_contiguous::<false>(d, s.as_ptr().add(x0) as *const u8, sk, p0, kp, w)
        }
        Data::Bf16(s) if sx == 1 && w.is_multiple_of(8) => {
            lanes_contiguous::<true>(d, s.as_ptr().add(x0) as *const u8, sk, p0, kp, w)
        }
        Data::F32(s) if sk == 1 => k_contiguous::<false>(d, s.as_ptr().add(x0 * sx) as *const u8, sx, p0, kp, w),
        Data::Bf16(s) if sk == 1 => k_contiguous::<true>(d, s.as_ptr().add(x0 * sx) as *const u8, sx, p0, kp, w),
        _ => return false,
    }
    true
}

/// A whole A panel with k contiguous (sk = 1) in the lane-major layout the kernel also reads:
/// `dst[l·kp + p]` = the k-pair p of row l (no transposition: each row's run of k converts in place).
///
/// # Safety
/// As `panel`, with `sk = 1`.
#[inline]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn rows(dst: &mut [u32], src: Data<'_>, sx: usize, p0: usize, kp: usize, x0: usize, w: usize) {
    assert!(dst.len() >= kp * w);
    let d = dst.as_mut_ptr();
    match src {
        Data::F32(s) => rows_of::<false>(d, s.as_ptr().add(x0 * sx) as *const u8, sx, p0, kp, w),
        Data::Bf16(s) => rows_of::<true>(d, s.as_ptr().add(x0 * sx) as *const u8, sx, p0, kp, w),
    }
}

/// `rows` for one element kind: 16 pairs (32 k) per step, the last step masked.
#[inline(always)]
unsafe fn rows_of<const BITS: bool>(d: *mut u32, s: *const u8, sx: usize, p0: usize, kp: usize, w: usize) {
    let es = if BITS { 2 } else { 4 };
    for l in 0..w {
        let out = d.add(l * kp);
        for pb in (0..kp).step_by(16) {
            let c = 16.min(kp - pb);
            let m32 = if c == 16 { u32::MAX } else { (1u32 << (2 * c)) - 1 };
            let run = s.add((l * sx + 2 * (p0 + pb)) * es);
            let words = pairs16::<BITS>(run, m32);
            let m16 = crate::kernels::lanes16(c);
            _mm512_mask_storeu_epi32(out.add(pb) as *mut i32, m16, words);
        }
    }
}

/// The 2·16 elements at `p` (those in mask `m32`, the rest zero) as 16 k-pair words.
#[inline(always)]
unsafe fn pairs16<const BITS: bool>(p: *const u8, m32: u32) -> __m512i {
    if BITS {
        _mm512_maskz_loadu_epi16(m32, p as *const i16)
    } else {
        let lo = _mm512_maskz_loadu_ps(m32 as u16, p as *const f32);
        let hi = _mm512_maskz_loadu_ps((m32 >> 16) as u16, p.wrapping_add(64) as *const f32);
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
    }
}

/// 16 f32 (or 16 bf16 bits) at `p` as 16 bf16 in a 256-bit vector.
#[inline(always)]
unsafe fn bf16x16<const BITS: bool>(p: *const u8) -> __m256i {
    if BITS {
        _mm256_loadu_si256(p as *const __m256i)
    } else {
        let v = _mm512_loadu_ps(p as *const f32);
        std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v))
    }
}

/// 8 f32 (or 8 bf16 bits) at `p` as 8 bf16 in a 128-bit vector.
#[inline(always)]
unsafe fn bf16x8<const BITS: bool>(p: *const u8) -> __m128i {
    if BITS {
        _mm_loadu_si128(p as *const __m128i)
    } else {
        let v = _mm256_loadu_ps(p as *const f32);
        std::mem::transmute::<__m128bh, __m128i>(_mm256_cvtneps_pbh(v))
    }
}

/// Lanes contiguous (sx = 1), w a multiple of 8: rows k and k + 1 of 16 (or 8) lanes are converted and their
/// bf16 interleaved into 16 (or 8) k-pair words. `s` points at lane x0 of row 0 (element size 4, or 2 if BITS).
#[inline(always)]
unsafe fn lanes_contiguous<const BITS: bool>(d: *mut u32, s: *const u8, sk: usize, p0: usize, kp: usize, w: usize) {
    let es = if BITS { 2 } else { 4 };
    // word j of the output takes bf16 j of row k (low half) and bf16 j of row k + 1 (high half)
    let idx16 = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
        16, 0,
    );
    let idx8 = _mm256_set_epi16(15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
    for p in 0..kp {
        let k = 2 * (p0 + p);
        let (r0, r1) = (s.add(k * sk * es), s.add((k + 1) * sk * es));
        let out = d.add(p * w);
        let mut l = 0;
        while l + 16 <= w {
            let (a, b) = (bf16x16::<BITS>(r0.add(l * es)), bf16x16::<BITS>(r1.add(l * es)));
            let ab = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
            _mm512_storeu_si512(out.add(l) as *mut __m512i, _mm512_permutexvar_epi16(idx16, ab));
            l += 16;
        }
        if l < w {
            let (a, b) = (bf16x8::<BITS>(r0.add(l * es)), bf16x8::<BITS>(r1.add(l * es)));
            let ab = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(a), b);
            _mm256_storeu_si256(out.add(l) as *mut __m256i, _mm256_permutexvar_epi16(idx8, ab));
        }
    }
}

/// k contiguous (sk = 1): per lane, 32 consecutive k convert to 16 k-pair words in order; 16 pairs of every
/// lane are gathered in a small tile, then written pair by pair. `s` points at k = 0 of lane x0.
#[inline(always)]
unsafe fn k_contiguous<const BITS: bool>(d: *mut u32, s: *const u8, sx: usize, p0: usize, kp: usize, w: usize) {
    let es = if BITS { 2 } else { 4 };
    let mut tile = [[0u32; 16]; 64];
    for pb in (0..kp).step_by(16) {
        let c = 16.min(kp - pb);
        // elements 2c of each lane's run: a masked load past the last pair reads nothing
        let m32 = if c == 16 { u32::MAX } else { (1u32 << (2 * c)) - 1 };
        for chunk in (0..w).step_by(64) {
            let lanes = 64.min(w - chunk);
            for (l, row) in tile[..lanes].iter_mut().enumerate() {
                let run = s.add(((chunk + l) * sx + 2 * (p0 + pb)) * es);
                let words = pairs16::<BITS>(run, m32);
                _mm512_storeu_si512(row.as_mut_ptr() as *mut __m512i, words);
            }
            if lanes.is_multiple_of(16) {
                // 16 lanes of one pair at a time: a gather down a column of the tile
                let col = _mm512_mullo_epi32(
                    _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                    _mm512_set1_epi32(16),
                );
                for q in 0..c {
                    for l in (0..lanes).step_by(16) {
                        let at = _mm512_add_epi32(col, _mm512_set1_epi32((l * 16 + q) as i32));
                        let v = _mm512_i32gather_epi32::<4>(at, tile.as_ptr() as *const i32);
                        _mm512_storeu_si512(d.add((pb + q) * w + chunk + l) as *mut __m512i, v);
                    }
                }
            } else if lanes == 8 {
                // two pairs of 8 lanes per gather
                let rows = _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0);
                let pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
                let base = _mm512_add_epi32(_mm512_mullo_epi32(rows, _mm512_set1_epi32(16)), pair);
                let mut q = 0;
                while q + 2 <= c {
                    let at = _mm512_add_epi32(base, _mm512_set1_epi32(q as i32));
                    let v = _mm512_i32gather_epi32::<4>(at, tile.as_ptr() as *const i32);
                    _mm512_storeu_si512(d.add((pb + q) * w + chunk) as *mut __m512i, v);
                    q += 2;
                }
                for q in q..c {
                    for (l, row) in tile[..lanes].iter().enumerate() {
                        *d.add((pb + q) * w + chunk + l) = row[q];
                    }
                }
            } else {
                for q in 0..c {
                    let out = d.add((pb + q) * w + chunk);
                    for (l, row) in tile[..lanes].iter().enumerate() {
                        *out.add(l) = row[q];
                    }
                }
            }
        }
    }
}
