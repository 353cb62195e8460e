//! The LoRA branch's dropout mask, never stored: element (row, col) of an input matrix is dropped when a hash of
//! (seed, slot, row, col) falls below p·2³². The backward (and a gradient-checkpointing recompute) rebuilds exactly
//! the forward's mask, whichever order it visits the elements in.
//!
//! The hash: splitmix64's finaliser gives each row two 32-bit keys; an element's hash is two rounds of Chris
//! Wellons' `lowbias32` keyed by them, `h = lowbias32(lowbias32(col ^ k1) ^ k2)`. All lanes are 32-bit, so
//! sixteen elements hash in a few AVX-512 instructions (the earlier per-element splitmix64 took 0.45 s of a 3.2 s
//! LoRA step; docs/benchmarks.md).

/// splitmix64's finaliser: a well-mixed 64-bit hash.
#[inline(always)]
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A well-mixed 32-bit bijection (`lowbias32`, bias ~0.17 of the ideal avalanche).
#[inline(always)]
fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// Keep-or-drop of each input element of one LoRA branch for one micro-batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mask {
    seed: u64,
    /// Dropped when the element's hash is below this.
    below: u32,
    keep_scale: f32,
}

impl Mask {
    /// The mask of branch `slot` for the micro-batch `seed`, dropping with probability `p` in [0, 1).
    pub fn new(seed: u64, slot: usize, p: f32) -> Self {
        let below = (p as f64 * 4_294_967_296.0).min(u32::MAX as f64) as u32;
        let seed = mix(mix(seed) ^ mix(slot as u64 ^ 0x9e37_79b9_7f4a_7c15));
        Mask { seed, below, keep_scale: 1.0 / (1.0 - p) }
    }

    /// The two keys of input row `row`.
    #[inline]
    fn keys(&self, row: usize) -> (u32, u32) {
        let k = mix(self.seed ^ (row as u64).wrapping_mul(0xd6e8_feb8_6659_fd93));
        (k as u32, (k >> 32) as u32)
    }

    /// Whether element (row, col) is kept (the definition the vector path reproduces).
    #[cfg(test)]
    #[inline]
    pub fn keeps(&self, row: usize, col: usize) -> bool {
        let (k1, k2) = self.keys(row);
        lowbias32(lowbias32(col as u32 ^ k1) ^ k2) >= self.below
    }

    /// dst[j] = drop(x)[row, col0 + j] for the given slice of row `row`: kept elements scaled by 1/(1-p),
    /// dropped ones zero.
    pub fn apply(&self, dst: &mut [f32], x: &[f32], row: usize, col0: usize) {
        self.run(dst, x, row, col0, false)
    }

    /// dst[j] += drop(x)[row, col0 + j]: the backward through the mask.
    pub fn add(&self, dst: &mut [f32], x: &[f32], row: usize, col0: usize) {
        self.run(dst, x, row, col0, true)
    }

    fn run(&self, dst: &mut [f32], x: &[f32], row: usize, col0: usize, add: bool) {
        let n = dst.len().min(x.len());
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // SAFETY: AVX-512F checked; dst and x hold n elements.
            return unsafe { x86::run(self, &mut dst[..n], &x[..n], row, col0, add) };
        }
        self.run_portable(&mut dst[..n], &x[..n], row, col0, add)
    }

    fn run_portable(&self, dst: &mut [f32], x: &[f32], row: usize, col0: usize, add: bool) {
        let (k1, k2) = self.keys(row);
        for (j, (d, &v)) in dst.iter_mut().zip(x).enumerate() {
            let h = lowbias32(lowbias32((col0 + j) as u32 ^ k1) ^ k2);
            let y = if h < self.below { 0.0 } else { v * self.keep_scale };
            *d = if add { *d + y } else { y };
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::Mask;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    #[inline(always)]
    unsafe fn lowbias32(x: __m512i) -> __m512i {
        let x = _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x));
        let x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb_352d));
        let x = _mm512_xor_si512(x, _mm512_srli_epi32::<15>(x));
        let x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x846c_a68bu32 as i32));
        _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x))
    }

    /// One row's mask in registers, for kernels that drop sixteen loaded elements at a time.
    #[derive(Clone, Copy)]
    pub struct RowMask {
        k1: __m512i,
        k2: __m512i,
        below: __m512i,
        scale: __m512,
        lanes: __m512i,
    }

    impl RowMask {
        /// The mask of row `row`.
        ///
        /// # Safety
        /// AVX-512F available.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub unsafe fn new(m: &Mask, row: usize) -> Self {
            let (k1, k2) = m.keys(row);
            RowMask {
                k1: _mm512_set1_epi32(k1 as i32),
                k2: _mm512_set1_epi32(k2 as i32),
                below: _mm512_set1_epi32(m.below as i32),
                scale: _mm512_set1_ps(m.keep_scale),
                lanes: _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            }
        }

        /// drop(v) for v = the row's columns col0..col0 + 16.
        ///
        /// # Safety
        /// AVX-512F available.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub unsafe fn apply(&self, v: __m512, col0: usize) -> __m512 {
            let col = _mm512_add_epi32(_mm512_set1_epi32(col0 as i32), self.lanes);
            let h = lowbias32(_mm512_xor_si512(lowbias32(_mm512_xor_si512(col, self.k1)), self.k2));
            _mm512_maskz_mul_ps(_mm512_cmpge_epu32_mask(h, self.below), v, self.scale)
        }
    }

    /// `Mask::run`, sixteen elements at a time.
    ///
    /// # Safety
    /// AVX-512F available; `dst` and `x` have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn run(m: &Mask, dst: &mut [f32], x: &[f32], row: usize, col0: usize, add: bool) {
        let rm = RowMask::new(m, row);
        let n = dst.len();
        let mut j = 0;
        while j < n {
            let valid = crate::kernels::lanes16(n - j);
            let mut out = rm.apply(_mm512_maskz_loadu_ps(valid, x.as_ptr().add(j)), col0 + j);
            if add {
                out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(valid, dst.as_ptr().add(j)));
            }
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(j), valid, out);
            j += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_drops_about_p_and_is_reproducible() {
        let m = Mask::new(42, 3, 0.25);
        let x = vec![1f32; 4096];
        let (mut a, mut b) = (vec![0f32; 4096], vec![0f32; 4096]);
        m.apply(&mut a, &x, 7, 0);
        m.apply(&mut b, &x, 7, 0);
        assert_eq!(a, b);
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / 4096.0;
        assert!((dropped - 0.25).abs() < 0.03, "dropped {dropped}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        m.apply(&mut b, &x, 8, 0);
        assert_ne!(a, b, "rows get different masks");
        let other = Mask::new(43, 3, 0.25);
        other.apply(&mut b, &x, 7, 0);
        assert_ne!(a, b, "seeds give different masks");
        Mask::new(42, 4, 0.25).apply(&mut b, &x, 7, 0);
        assert_ne!(a, b, "slots give different masks");
        assert!(Mask::new(1, 0, 0.0).keeps(5, 9), "p = 0 keeps everything");
    }

    /// The vector path, the portable path and `keeps` agree element for element, for any column offset and
    /// length (a partial last vector included); a slice of a row gives that part of the whole row's mask.
    #[test]
    fn every_path_gives_the_same_mask() {
        let m = Mask::new(7, 1, 0.3);
        let x: Vec<f32> = (0..301).map(|i| i as f32 * 0.5 - 40.0).collect();
        let mut whole = vec![0f32; 301];
        m.apply(&mut whole, &x, 11, 0);
        let mut port = vec![0f32; 301];
        m.run_portable(&mut port, &x, 11, 0, false);
        assert_eq!(whole, port);
        let (mut sum, mut sum_port) = (x.clone(), x.clone());
        m.add(&mut sum, &x, 11, 0);
        m.run_portable(&mut sum_port, &x, 11, 0, true);
        assert_eq!(sum, sum_port);
        for j in 0..301 {
            assert_eq!(sum[j], x[j] + whole[j], "add at {j}");
        }
        for (j, &v) in whole.iter().enumerate() {
            let want = if m.keeps(11, j) { x[j] * (1.0 / (1.0 - 0.3f32)) } else { 0.0 };
            assert_eq!(v.to_bits(), want.to_bits(), "col {j}");
        }
        for (c0, len) in [(0, 5), (3, 16), (17, 33), (290, 11)] {
            let mut part = vec![0f32; len];
            m.apply(&mut part, &x[c0..c0 + len], 11, c0);
            assert_eq!(part, whole[c0..c0 + len], "cols {c0}..+{len}");
        }
    }

    /// Neighbouring rows' masks are independent: the share of elements that two adjacent rows both drop is
    /// about p², not p (a row-shift or XOR-shift relation between rows would show here).
    #[test]
    fn rows_are_independent() {
        let p = 0.5f64;
        let m = Mask::new(3, 2, p as f32);
        let (mut both, mut total) = (0usize, 0usize);
        for row in 0..64 {
            for col in 0..1024 {
                both += usize::from(!m.keeps(row, col) && !m.keeps(row + 1, col ^ 1));
                both += usize::from(!m.keeps(row, col) && !m.keeps(row + 1, col));
                total += 2;
            }
        }
        let share = both as f64 / total as f64;
        assert!((share - p * p).abs() < 0.01, "joint drop share {share}");
    }
}
