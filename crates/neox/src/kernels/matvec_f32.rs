//! Few-row Linear for decoding and prompts on f32 weights: out (N, OC) = inp (N, IC) · wᵀ + bias for N <= `FEW_ROWS`.
//! Decode is bound by streaming the weights from memory, so each weight row is read once for all N inputs, the
//! columns are split across threads in contiguous blocks, and on AVX-512 a hand-written tile (4 weight rows × up
//! to 4 inputs, or 3 × 8; FMA, software prefetch) keeps enough loads in flight to reach the memory bandwidth.
//! bf16 weights use their own packed layout and kernel (`matvec_bf16.rs`).

use super::math;
use super::matmul::Dims;
use super::pool;
use super::SendPtr;

/// Rows at or below which `linear_rows` beats `gemm` (decode steps, prompts): 128 gave a shorter time to first
/// token than 16 on prompts up to 100 tokens and the same at 200 (docs/benchmarks.md#decode-path-tuning).
pub const FEW_ROWS: usize = 128;

/// Most output columns per parallel task (512 KiB of f32 weights at IC 512), fewer when that would leave a thread
/// without a task. 256 was faster than 64 for a whole decode step; 1024 and one task per thread were no faster
/// (docs/benchmarks.md#decode-path-tuning).
const COLS: usize = 256;

/// out (N, OC) = inp (N, IC) · wᵀ + bias (or `+=` when `accumulate`), for a few rows N.
pub fn linear_rows(out: &mut [f32], inp: &[f32], w: &[f32], bias: Option<&[f32]>, d: Dims, accumulate: bool) {
    let Dims { n, ic, oc } = d;
    assert!(out.len() >= n * oc && inp.len() >= n * ic && w.len() >= oc * ic);
    assert!(bias.is_none_or(|b| b.len() == oc));
    let dst = Dest { out: SendPtr(out.as_mut_ptr()), bias, n, oc, accumulate };
    let job = Block { dst, inp, ic };
    let cols = COLS.min(oc.div_ceil(rayon::current_num_threads()));
    pool::for_each(oc.div_ceil(cols), |blk| {
        let (o0, o1) = (blk * cols, (blk * cols + cols).min(oc));
        job.run(w, o0, o1)
    });
}

/// Where a few-row product goes: out (N, OC), each column written by one task only, as y + bias or added to it.
/// Shared with the bf16 panel kernel.
pub(crate) struct Dest<'a> {
    pub out: SendPtr,
    pub bias: Option<&'a [f32]>,
    pub n: usize,
    pub oc: usize,
    pub accumulate: bool,
}

impl Dest<'_> {
    /// Writes y + bias into (r, o), or adds it. Column o belongs to one task only.
    #[inline(always)]
    pub fn put(&self, r: usize, o: usize, y: f32) {
        let b = self.bias.map_or(0.0, |b| b[o]);
        debug_assert!(r < self.n && o < self.oc);
        // SAFETY: r < n and o < oc (the caller asserted out.len() >= n * oc); column o is this task's alone.
        unsafe {
            let dst = self.out.get().add(r * self.oc + o);
            *dst = if self.accumulate { *dst + y + b } else { y + b };
        }
    }
}

/// One call's operands; `run` computes output columns o0..o1 of every row.
struct Block<'a> {
    dst: Dest<'a>,
    inp: &'a [f32],
    ic: usize,
}

impl Block<'_> {
    fn run(&self, w: &[f32], o0: usize, o1: usize) {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // SAFETY: AVX-512 F/BW/VL checked at run time; bounds asserted by `linear_rows`.
            unsafe { x86::block(self, w, o0, o1) };
            return;
        }
        self.portable(w, o0, o1)
    }

    fn portable(&self, w: &[f32], o0: usize, o1: usize) {
        let ic = self.ic;
        let row = |r: usize| &self.inp[r * ic..(r + 1) * ic];
        for o in o0..o1 {
            let wr = &w[o * ic..(o + 1) * ic];
            let mut r = 0;
            while r + 4 <= self.dst.n {
                let y = math::dot4([row(r), row(r + 1), row(r + 2), row(r + 3)], wr);
                for (k, &yk) in y.iter().enumerate() {
                    self.dst.put(r + k, o, yk);
                }
                r += 4;
            }
            for r in r..self.dst.n {
                self.dst.put(r, o, math::dot(row(r), wr));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Block;
    use crate::kernels::const_rows;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
    }

    /// Bytes ahead of the current position at which each weight row is prefetched: 4 KiB decodes faster than
    /// 1 KiB, 8 KiB no faster than 4 (docs/benchmarks.md#decode-path-tuning).
    const PREFETCH_BYTES: usize = 4096;

    /// A second stream of prefetches, into L2, this many times further ahead (16 KiB), so memory keeps streaming
    /// while a batched tile is busy with its FMAs: faster batched and bf16 serving, float32 single stream equal
    /// (docs/benchmarks.md#decode-path-tuning).
    const L2_AHEAD: usize = 4;

    /// Σ_k x_r[k] · w_c[k] for R input rows and C weight rows, into `res[r][c]`.
    #[inline]
    #[allow(clippy::needless_range_loop)] // indices over const-sized register arrays read clearest
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn tile<const R: usize, const C: usize>(x: *const f32, w: *const f32, ic: usize, res: &mut [[f32; C]; R]) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let pf = PREFETCH_BYTES / size_of::<f32>();
        let lines = ic / 16 * 16;
        let mut k = 0;
        while k < lines {
            for c in 0..C {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(c * ic + k + pf) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(c * ic + k + L2_AHEAD * pf) as *const i8);
            }
            let mut s = 0;
            while s < 16 {
                let mut wv = [_mm512_setzero_ps(); C];
                for c in 0..C {
                    wv[c] = _mm512_loadu_ps(w.add(c * ic + k + s));
                }
                for r in 0..R {
                    let xv = _mm512_loadu_ps(x.add(r * ic + k + s));
                    for c in 0..C {
                        acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
                    }
                }
                s += 16;
            }
            k += 16;
        }
        while k < ic {
            let m = crate::kernels::lanes16(ic - k);
            for r in 0..R {
                let xv = _mm512_maskz_loadu_ps(m, x.add(r * ic + k));
                for c in 0..C {
                    let wv = _mm512_maskz_loadu_ps(m, w.add(c * ic + k));
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
    unsafe fn rows<const C: usize>(b: &Block<'_>, w: &[f32], o: usize) {
        let ic = b.ic;
        let x = b.inp.as_ptr();
        let wp = w.as_ptr().add(o * ic);
        let mut r = 0;
        macro_rules! run {
            ($R:literal) => {{
                let mut res = [[0f32; C]; $R];
                tile::<$R, C>(x.add(r * ic), wp, ic, &mut res);
                for (i, row) in res.iter().enumerate() {
                    for (c, &y) in row.iter().enumerate() {
                        b.dst.put(r + i, o + c, y);
                    }
                }
            }};
        }
        // at most 24 accumulators: C = 4 columns x 4 rows, or 3 x 8, or 1 x 8
        let cap = if C >= 4 { 4 } else { 8 };
        while r < b.dst.n {
            let k = (b.dst.n - r).min(cap);
            const_rows!(k, run);
            r += k;
        }
    }

    /// Columns o0..o1 of every row.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL available; `w` holds OC × IC weights and the block's buffers are as `linear_rows` asserted.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn block(b: &Block<'_>, w: &[f32], o0: usize, o1: usize) {
        // 4 weight rows x up to 4 inputs per tile; with more than 4 inputs, 3 weight rows x 8 inputs (24
        // accumulators), so each weight line is loaded once for 8 inputs instead of being
        // streamed once per group of 4: faster than 4 x 4 in two passes (docs/benchmarks.md#decode-path-tuning).
        if b.dst.n <= 4 {
            cols::<4>(b, w, o0, o1)
        } else {
            cols::<3>(b, w, o0, o1)
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn cols<const C: usize>(b: &Block<'_>, w: &[f32], o0: usize, o1: usize) {
        let mut o = o0;
        while o + C <= o1 {
            rows::<C>(b, w, o);
            o += C;
        }
        while o < o1 {
            rows::<1>(b, w, o);
            o += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::assert_rows_independent;

    /// Every path (AVX-512 tile with its column/row remainders and masked tail, and the portable loop) against a
    /// float64 sum, for shapes that hit each remainder.
    #[test]
    fn matches_f64_reference_on_ragged_shapes() {
        let mut rng = common::Rng::new(7);
        for &(n, ic, oc) in &[(1, 1, 1), (1, 17, 5), (2, 40, 7), (3, 15, 70), (4, 64, 9), (5, 100, 66), (9, 33, 130)] {
            let inp: Vec<f32> = (0..n * ic).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let w: Vec<f32> = (0..oc * ic).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let bias: Vec<f32> = (0..oc).map(|_| rng.next_f64() as f32).collect();
            for accumulate in [false, true] {
                let mut out: Vec<f32> = (0..n * oc).map(|i| i as f32 * 0.25).collect();
                let before = out.clone();
                linear_rows(&mut out, &inp, &w, Some(&bias), Dims { n, ic, oc }, accumulate);
                for r in 0..n {
                    for o in 0..oc {
                        let dot: f64 = (0..ic).map(|k| inp[r * ic + k] as f64 * w[o * ic + k] as f64).sum();
                        let want = dot + bias[o] as f64 + if accumulate { before[r * oc + o] as f64 } else { 0.0 };
                        let got = out[r * oc + o] as f64;
                        assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{n}x{ic}x{oc}: {got} vs {want}");
                    }
                }
                // the portable loop (CPUs without AVX-512) gives the same within rounding
                let mut port = before.clone();
                let dst = Dest { out: SendPtr(port.as_mut_ptr()), bias: Some(&bias), n, oc, accumulate };
                let b = Block { dst, inp: &inp, ic };
                b.portable(&w, 0, oc);
                for (a, b) in port.iter().zip(&out) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "portable {n}x{ic}x{oc}");
                }
            }
        }
    }

    /// A row's result does not depend on how many rows share the call: bitwise, for every tile shape (4 x 4 up to 4
    /// rows, 3 x 8 above, the remainders).
    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_a_batch() {
        assert_rows_independent(11, 9, &[1, 3, 5], |out, inp, w, d| linear_rows(out, inp, w, None, d, false));
    }
}
