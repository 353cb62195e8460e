//! Few-row Linear for decoding and prompts: out (N, OC) = inp (N, IC) · wᵀ + bias for N <= `FEW_ROWS`. Decode is bound by
//! streaming the weights from memory, so each weight row is read once for all N inputs, the columns are split
//! across threads in contiguous blocks, and on AVX-512 a hand-written tile (4 weight rows × up to 4 inputs, or
//! 3 × 8; FMA, software prefetch) keeps enough loads in flight to reach the memory bandwidth. Weights are f32 or
//! bf16 bits (`u16`, widened exactly to f32); accumulation is f32 either way.

use super::math::{self, Weight};
use super::pool;
use super::SendPtr;

/// Rows at or below which `linear_rows` beats `gemm` (decode steps, prompts): measured at pythia-70m shape,
/// time to first token of a 32/100/200-token prompt 20/48/60 ms with 16, 13/33/60 ms with 128 (2 threads).
pub const FEW_ROWS: usize = 128;

/// Weights for `linear_rows`: the f32 parameters, or a bfloat16 copy (half the bytes per decoded token).
#[derive(Clone, Copy)]
pub enum RowWeights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

/// Output columns per parallel task: 64 KiB of f32 weights at IC 256, enough to amortise a task hand-out.
const COLS: usize = 64;

/// out (N, OC) = inp (N, IC) · wᵀ + bias (or `+=` when `accumulate`), for a few rows N.
#[allow(clippy::too_many_arguments)]
pub fn linear_rows(
    out: &mut [f32],
    inp: &[f32],
    w: RowWeights<'_>,
    bias: Option<&[f32]>,
    n: usize,
    ic: usize,
    oc: usize,
    accumulate: bool,
) {
    let wlen = match w {
        RowWeights::F32(x) => x.len(),
        RowWeights::Bf16(x) => x.len(),
    };
    assert!(out.len() >= n * oc && inp.len() >= n * ic && wlen >= oc * ic);
    assert!(bias.is_none_or(|b| b.len() == oc));
    let op = SendPtr(out.as_mut_ptr());
    let job = Block { out: op, inp, bias, n, ic, oc, accumulate };
    pool::for_each(oc.div_ceil(COLS), |blk| {
        let (o0, o1) = (blk * COLS, (blk * COLS + COLS).min(oc));
        match w {
            RowWeights::F32(w) => job.run(w, o0, o1),
            RowWeights::Bf16(w) => job.run(w, o0, o1),
        }
    });
}

/// One call's operands; `run` computes output columns o0..o1 of every row.
struct Block<'a> {
    out: SendPtr,
    inp: &'a [f32],
    bias: Option<&'a [f32]>,
    n: usize,
    ic: usize,
    oc: usize,
    accumulate: bool,
}

impl Block<'_> {
    fn run<W: Weight + x86::Load>(&self, w: &[W], o0: usize, o1: usize) {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // SAFETY: AVX-512 F/BW/VL checked at run time; bounds asserted by `linear_rows`.
            unsafe { x86::block(self, w, o0, o1) };
            return;
        }
        self.portable(w, o0, o1)
    }

    /// Writes y + bias into (r, o), or adds it. Column o belongs to one task only.
    #[inline(always)]
    fn put(&self, r: usize, o: usize, y: f32) {
        let b = self.bias.map_or(0.0, |b| b[o]);
        debug_assert!(r < self.n && o < self.oc);
        // SAFETY: r < n and o < oc (the caller asserted out.len() >= n * oc); column o is this task's alone.
        unsafe {
            let dst = self.out.get().add(r * self.oc + o);
            *dst = if self.accumulate { *dst + y + b } else { y + b };
        }
    }

    fn portable<W: Weight>(&self, w: &[W], o0: usize, o1: usize) {
        let ic = self.ic;
        let row = |r: usize| &self.inp[r * ic..(r + 1) * ic];
        for o in o0..o1 {
            let wr = &w[o * ic..(o + 1) * ic];
            let mut r = 0;
            while r + 4 <= self.n {
                let y = math::dot4([row(r), row(r + 1), row(r + 2), row(r + 3)], wr);
                for (k, &yk) in y.iter().enumerate() {
                    self.put(r + k, o, yk);
                }
                r += 4;
            }
            for r in r..self.n {
                self.put(r, o, math::dot(row(r), wr));
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub trait Load {}
    impl Load for f32 {}
    impl Load for u16 {}
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Block;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
    }

    /// Loading 16 weights as f32 lanes.
    pub trait Load: Copy {
        /// Elements per 64-byte cache line.
        const PER_LINE: usize;
        /// # Safety
        /// AVX-512 available; 16 elements readable at `p`.
        unsafe fn load(p: *const Self) -> __m512;
        /// # Safety
        /// AVX-512 available; the lanes set in `m` readable at `p`.
        unsafe fn load_masked(p: *const Self, m: __mmask16) -> __m512;
    }

    impl Load for f32 {
        const PER_LINE: usize = 16;
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load_masked(p: *const f32, m: __mmask16) -> __m512 {
            _mm512_maskz_loadu_ps(m, p)
        }
    }

    impl Load for u16 {
        const PER_LINE: usize = 32;
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load(p: *const u16) -> __m512 {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load_masked(p: *const u16, m: __mmask16) -> __m512 {
            let h = _mm256_maskz_loadu_epi16(m, p as *const i16);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }

    /// Bytes ahead of the current position at which each weight row is prefetched. Measured A/B in alternating
    /// runs of `dolly bench generate` (pythia-70m): 4096 over 1024 gave bf16 batch 1 213-303 vs 190-206 tok/s,
    /// bf16 batch 8 932-1003 vs 834-944, float32 batch 1 152-168 vs 139-146, float32 batch 8 about equal;
    /// 8192 was not distinguishable from 4096.
    const PREFETCH_BYTES: usize = 4096;

    /// A second stream of prefetches, into L2, this many times further ahead (16 KiB), so memory keeps streaming
    /// while a batched tile is busy with its FMAs. `dolly serve` A/B (two servers, alternating requests, same
    /// minutes): float32 8-request bursts 448-804 vs 397-700 tok/s (higher in 5 of 5 pairs), bf16 bursts 1093-1311
    /// vs 929-1175 (6 of 6 pairs, mean +11%), bf16 single stream 289-360 vs 241-321; float32 single stream equal.
    const L2_AHEAD: usize = 4;

    /// Σ_k x_r[k] · w_c[k] for R input rows and C weight rows, into `res[r][c]`.
    #[inline]
    #[allow(clippy::needless_range_loop)] // indices over const-sized register arrays read clearest
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn tile<W: Load, const R: usize, const C: usize>(
        x: *const f32,
        w: *const W,
        ic: usize,
        res: &mut [[f32; C]; R],
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let pf = PREFETCH_BYTES / size_of::<W>();
        let lines = ic / W::PER_LINE * W::PER_LINE;
        let mut k = 0;
        while k < lines {
            for c in 0..C {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(c * ic + k + pf) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(c * ic + k + L2_AHEAD * pf) as *const i8);
            }
            let mut s = 0;
            while s < W::PER_LINE {
                let mut wv = [_mm512_setzero_ps(); C];
                for c in 0..C {
                    wv[c] = W::load(w.add(c * ic + k + s));
                }
                for r in 0..R {
                    let xv = _mm512_loadu_ps(x.add(r * ic + k + s));
                    for c in 0..C {
                        acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
                    }
                }
                s += 16;
            }
            k += W::PER_LINE;
        }
        while k < ic {
            let m: __mmask16 = if ic - k >= 16 { 0xffff } else { (1u16 << (ic - k)) - 1 };
            for r in 0..R {
                let xv = _mm512_maskz_loadu_ps(m, x.add(r * ic + k));
                for c in 0..C {
                    let wv = W::load_masked(w.add(c * ic + k), m);
                    acc[r][c] = _mm512_fmadd_ps(xv, wv, acc[r][c]);
                }
            }
            k += 16;
        }
        for r in 0..R {
            for c in 0..C {
                res[r][c] = _mm512_reduce_add_ps(acc[r][c]);
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn rows<W: Load, const C: usize>(b: &Block<'_>, w: &[W], o: usize) {
        let ic = b.ic;
        let x = b.inp.as_ptr();
        let wp = w.as_ptr().add(o * ic);
        let mut r = 0;
        macro_rules! run {
            ($R:literal) => {{
                let mut res = [[0f32; C]; $R];
                tile::<W, $R, C>(x.add(r * ic), wp, ic, &mut res);
                for (i, row) in res.iter().enumerate() {
                    for (c, &y) in row.iter().enumerate() {
                        b.put(r + i, o + c, y);
                    }
                }
            }};
        }
        // at most 24 accumulators: C = 4 columns x 4 rows, or 3 x 8, or 1 x 8
        let cap = if C >= 4 { 4 } else { 8 };
        while r < b.n {
            let k = (b.n - r).min(cap);
            match k {
                1 => run!(1),
                2 => run!(2),
                3 => run!(3),
                4 => run!(4),
                5 => run!(5),
                6 => run!(6),
                7 => run!(7),
                _ => run!(8),
            }
            r += k;
        }
    }

    /// Columns o0..o1 of every row.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL available; `w` holds OC × IC weights and the block's buffers are as `linear_rows` asserted.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn block<W: Load>(b: &Block<'_>, w: &[W], o0: usize, o1: usize) {
        // 4 weight rows x up to 4 inputs per tile; with more than 4 inputs, 3 weight rows x 8 inputs (24
        // accumulators), so each weight line is loaded (and for bf16 widened) once for 8 inputs instead of being
        // streamed once per group of 4. `dolly bench generate --batch-size 8`, alternating builds, 3 rounds each:
        // float32 625-697 vs 571-631 tok/s for 4 x 4 in two passes; per call (`decode_times`, ROWS=8) the
        // pythia-70m head took 5.0-5.3 ms vs 7.1 ms. For bf16, 3 x 8 and 2 x 8 were within noise of each other.
        if b.n <= 4 {
            cols::<W, 4>(b, w, o0, o1)
        } else {
            cols::<W, 3>(b, w, o0, o1)
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn cols<W: Load, const C: usize>(b: &Block<'_>, w: &[W], o0: usize, o1: usize) {
        let mut o = o0;
        while o + C <= o1 {
            rows::<W, C>(b, w, o);
            o += C;
        }
        while o < o1 {
            rows::<W, 1>(b, w, o);
            o += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path (AVX-512 tile with its column/row remainders and masked tail, and the portable loop) against a
    /// float64 sum, for shapes that hit each remainder.
    #[test]
    fn matches_f64_reference_on_ragged_shapes() {
        let mut rng = common::Rng::new(7);
        for &(n, ic, oc) in &[(1, 1, 1), (1, 17, 5), (2, 40, 7), (3, 15, 70), (4, 64, 9), (5, 100, 66), (9, 33, 130)] {
            let inp: Vec<f32> = (0..n * ic).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let wf: Vec<f32> = (0..oc * ic).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let wb: Vec<u16> = wf.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
            let bias: Vec<f32> = (0..oc).map(|_| rng.next_f64() as f32).collect();
            for bf16 in [false, true] {
                for accumulate in [false, true] {
                    let mut out: Vec<f32> = (0..n * oc).map(|i| i as f32 * 0.25).collect();
                    let before = out.clone();
                    let w = if bf16 { RowWeights::Bf16(&wb) } else { RowWeights::F32(&wf) };
                    linear_rows(&mut out, &inp, w, Some(&bias), n, ic, oc, accumulate);
                    for r in 0..n {
                        for o in 0..oc {
                            let wv = |k: usize| {
                                if bf16 {
                                    f32::from_bits((wb[o * ic + k] as u32) << 16)
                                } else {
                                    wf[o * ic + k]
                                }
                            };
                            let dot: f64 = (0..ic).map(|k| inp[r * ic + k] as f64 * wv(k) as f64).sum();
                            let want = dot + bias[o] as f64 + if accumulate { before[r * oc + o] as f64 } else { 0.0 };
                            let got = out[r * oc + o] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{n}x{ic}x{oc} bf16={bf16}: {got} vs {want}"
                            );
                        }
                    }
                    // the portable loop (CPUs without AVX-512) gives the same within rounding
                    let mut port = before.clone();
                    let b =
                        Block { out: SendPtr(port.as_mut_ptr()), inp: &inp, bias: Some(&bias), n, ic, oc, accumulate };
                    if bf16 {
                        b.portable(&wb, 0, oc)
                    } else {
                        b.portable(&wf, 0, oc)
                    }
                    for (a, b) in port.iter().zip(&out) {
                        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "portable {n}x{ic}x{oc} bf16={bf16}");
                    }
                }
            }
        }
    }

    /// A row's result does not depend on how many rows share the call (batched decoding gives the same greedy ids
    /// as decoding alone): bitwise, for f32 and bf16 weights and for every tile shape (4 x 4 up to 4 rows, 3 x 8
    /// above, the remainders).
    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_a_batch() {
        let mut rng = common::Rng::new(11);
        for &(ic, oc) in &[(64, 70), (33, 9), (96, 131)] {
            let n = 9;
            let inp: Vec<f32> = (0..n * ic).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let wf: Vec<f32> = (0..oc * ic).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let wb: Vec<u16> = wf.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
            for w in [RowWeights::F32(&wf), RowWeights::Bf16(&wb)] {
                let mut all = vec![0f32; n * oc];
                linear_rows(&mut all, &inp, w, None, n, ic, oc, false);
                for k in [1, 3, 5] {
                    for r0 in (0..n).step_by(k) {
                        let m = k.min(n - r0);
                        let mut part = vec![0f32; m * oc];
                        linear_rows(&mut part, &inp[r0 * ic..(r0 + m) * ic], w, None, m, ic, oc, false);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&part), bits(&all[r0 * oc..(r0 + m) * oc]), "ic {ic} rows {r0}..+{m}");
                    }
                }
            }
        }
    }
}
