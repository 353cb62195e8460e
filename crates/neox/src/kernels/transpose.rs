//! Matrix transposes for the transposed-weight cache: a parallel whole-matrix transpose and the block form the
//! fused AdamW uses while a block of updated rows is still in cache. 8 x 8 tiles go through AVX registers
//! (unpack/shuffle/permute) where the build has AVX; edges and other CPUs take a scalar loop. Element-wise copies,
//! optionally rounded to bfloat16 (`math::round_bf16`), so the result is bitwise that of the scalar loop.

use super::math::round_bf16;
use super::SendPtr;
use rayon::prelude::*;

/// dst (cols, rows) = srcᵀ for a row-major src (rows, cols); cache-blocked and parallel.
pub fn transpose(dst: &mut [f32], src: &[f32], rows: usize, cols: usize) {
    assert!(dst.len() >= rows * cols && src.len() >= rows * cols);
    const B: usize = 64;
    let d = SendPtr(dst.as_mut_ptr());
    (0..rows.div_ceil(B)).into_par_iter().for_each(|rb| {
        let (r0, nr) = (rb * B, (rows - rb * B).min(B));
        // SAFETY: rows r0..r0+nr of src are in bounds; they land in columns r0..r0+nr of dst (leading dimension
        // rows, cols rows of it: inside rows * cols), which no other task writes.
        unsafe { transpose_block(d.get().add(r0), rows, &src[r0 * cols..(r0 + nr) * cols], nr, cols, false) }
    });
}

/// Writes the transpose of the row-major block `src` (nr, cols) into `dst`: element (r, c) goes to
/// `dst[c * ld + r]`, rounded to bfloat16 when `round`.
///
/// # Safety
/// `src.len() >= nr * cols`; for every c < cols, `dst[c * ld .. c * ld + nr]` is valid for writes and not
/// accessed by anyone else during the call.
pub unsafe fn transpose_block(dst: *mut f32, ld: usize, src: &[f32], nr: usize, cols: usize, round: bool) {
    assert!(src.len() >= nr * cols);
    let tiled = tiles(dst, ld, src, nr, cols, round);
    scalar(dst, ld, src, cols, tiled..nr, 0..cols, round);
}

/// The 8 x 8 tiles of `transpose_block` (and the columns right of them in the same rows); returns the rows done.
/// Tiles go in panels of 64 columns, so each destination line is completed while it is still in cache and a
/// panel touches at most 64 destination pages.
///
/// # Safety
/// As `transpose_block`.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
unsafe fn tiles(dst: *mut f32, ld: usize, src: &[f32], nr: usize, cols: usize, round: bool) -> usize {
    const PANEL: usize = 64;
    let (rows8, cols8) = (nr / 8 * 8, cols / 8 * 8);
    for c0 in (0..cols8).step_by(PANEL) {
        for r in (0..rows8).step_by(8) {
            for c in (c0..(c0 + PANEL).min(cols8)).step_by(8) {
                // SAFETY: rows r..r+8, columns c..c+8 are inside src and (by the contract) dst.
                avx::tile8(src.as_ptr().add(r * cols + c), cols, dst.add(c * ld + r), ld, round);
            }
        }
    }
    scalar(dst, ld, src, cols, 0..rows8, cols8..cols, round);
    rows8
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
unsafe fn tiles(_: *mut f32, _: usize, _: &[f32], _: usize, _: usize, _: bool) -> usize {
    0
}

/// The element loop for the rows and columns the tiles leave.
///
/// # Safety
/// As `transpose_block`, for the given ranges.
unsafe fn scalar(
    dst: *mut f32,
    ld: usize,
    src: &[f32],
    cols: usize,
    rows: std::ops::Range<usize>,
    cs: std::ops::Range<usize>,
    round: bool,
) {
    for r in rows {
        for c in cs.clone() {
            let x = src[r * cols + c];
            *dst.add(c * ld + r) = if round { round_bf16(x) } else { x };
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
mod avx {
    use std::arch::x86_64::*;

    /// 8 x 8 transpose: src rows at stride `ls`, dst rows at stride `ld`.
    ///
    /// # Safety
    /// 8 rows of 8 floats readable at src (stride ls) and writable at dst (stride ld).
    #[inline]
    pub unsafe fn tile8(src: *const f32, ls: usize, dst: *mut f32, ld: usize, round: bool) {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ls)));
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let s = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        let o = [
            _mm256_permute2f128_ps::<0x20>(s[0], s[4]),
            _mm256_permute2f128_ps::<0x20>(s[1], s[5]),
            _mm256_permute2f128_ps::<0x20>(s[2], s[6]),
            _mm256_permute2f128_ps::<0x20>(s[3], s[7]),
            _mm256_permute2f128_ps::<0x31>(s[0], s[4]),
            _mm256_permute2f128_ps::<0x31>(s[1], s[5]),
            _mm256_permute2f128_ps::<0x31>(s[2], s[6]),
            _mm256_permute2f128_ps::<0x31>(s[3], s[7]),
        ];
        for (i, &v) in o.iter().enumerate() {
            _mm256_storeu_ps(dst.add(i * ld), if round { round_bf16(v) } else { v });
        }
    }

    /// `math::round_bf16` on 8 lanes: round to nearest even on the upper 16 bits, NaN passed through.
    #[inline]
    unsafe fn round_bf16(x: __m256) -> __m256 {
        let b = _mm256_castps_si256(x);
        let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
        let sum = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
        let r = _mm256_castsi256_ps(_mm256_and_si256(sum, _mm256_set1_epi32(0xffff_0000u32 as i32)));
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        _mm256_blendv_ps(r, x, nan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiles, ragged edges and the bf16 rounding (NaN, ±inf, ties) against the element definition.
    #[test]
    fn equals_the_element_loop() {
        let mut rng = common::Rng::new(3);
        for &(rows, cols) in &[(1, 1), (8, 8), (9, 17), (64, 70), (130, 24), (3, 40)] {
            let mut src: Vec<f32> = (0..rows * cols).map(|_| (rng.next_f64() as f32 - 0.5) * 100.0).collect();
            let special = [f32::NAN, f32::INFINITY, -f32::INFINITY, -0.0, f32::from_bits(0x3f80_8000)];
            let len = src.len();
            for (i, &x) in special.iter().enumerate().take(len) {
                src[i * 7 % len] = x;
            }
            for round in [false, true] {
                let mut want = vec![0f32; rows * cols];
                for r in 0..rows {
                    for c in 0..cols {
                        let x = src[r * cols + c];
                        want[c * rows + r] = if round { round_bf16(x) } else { x };
                    }
                }
                let mut got = vec![1f32; rows * cols];
                if round {
                    // SAFETY: got holds cols x rows with leading dimension rows
                    unsafe { transpose_block(got.as_mut_ptr(), rows, &src, rows, cols, true) };
                } else {
                    transpose(&mut got, &src, rows, cols);
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{rows}x{cols} round={round}");
            }
        }
    }
}
