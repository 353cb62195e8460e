//! Few-row Linear on bfloat16 weights packed in panels of 32 output columns: out (N, OC) = inp (N, IC) · wᵀ + bias
//! for N <= `FEW_ROWS`, the bf16 decode path.
//!
//! Layout: panel p holds columns 32p..32p+31 as IC cache lines, one per input channel k. Line (p, k) has 16 32-bit
//! words; word j holds column 32p+j in its low half and column 32p+16+j in its high half. A shift and a mask turn a
//! line into two f32 vectors of 16 consecutive columns (bf16 widens exactly), and each input row's x[k] is
//! broadcast against them. Compared with dotting weight rows (`matvec_f32.rs`), this needs one widening instruction per
//! 16 weights instead of two, no horizontal sums at the end, and reads one sequential stream per panel.
//!
//! Every output is Σ_k x[k]·w[k] summed in k order with one fused multiply-add per step, whatever the tile shape,
//! so a row gets the same bits alone or in a batch.

use super::matmul::Dims;
use super::matvec_f32::Dest;
use super::pool;
use super::SendPtr;

/// Output columns per panel.
pub const PANEL: usize = 32;

/// One input channel of one panel: 32 bf16 weights, cache-line aligned.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
pub struct Line(pub [u16; PANEL]);

/// Lines of a packed (OC, IC) matrix: `OC/32` panels (rounded up, the padding is zero) of IC lines.
pub fn packed_lines(oc: usize, ic: usize) -> usize {
    oc.div_ceil(PANEL) * ic
}

/// Packs W (OC, IC) f32 into `dst` (`packed_lines(oc, ic)` lines), rounding each weight to nearest-even bf16.
pub fn pack_bf16(dst: &mut [Line], w: &[f32], oc: usize, ic: usize) {
    assert!(dst.len() == packed_lines(oc, ic) && w.len() >= oc * ic);
    let bits = |x: f32| half::bf16::from_f32(x).to_bits();
    let dp = SendPtr(dst.as_mut_ptr());
    pool::for_each(oc.div_ceil(PANEL), |p| {
        // SAFETY: panel p's lines p*ic..(p+1)*ic are written by this task alone, inside `dst` (asserted above).
        let lines = unsafe { std::slice::from_raw_parts_mut(dp.get().add(p * ic), ic) };
        for (k, line) in lines.iter_mut().enumerate() {
            for (i, slot) in line.0.iter_mut().enumerate() {
                let col = p * PANEL + (i % 2) * 16 + i / 2;
                *slot = if col < oc { bits(w[col * ic + k]) } else { 0 };
            }
        }
    });
}

/// Most panels per parallel task (256 columns, 256 KiB of weights at IC 512); fewer when that would leave a
/// thread without a task. Each task is one prefetched stream through consecutive panels. 8 panels a task was
/// faster than 2 (docs/benchmarks.md#decode-path-tuning); one task per thread was as fast as 8 but leaves nothing
/// to rebalance when a core is slow.
const TASK_PANELS: usize = 8;
/// Input rows per tile.
const TILE_ROWS: usize = 8;

/// out (N, OC) = inp (N, IC) · wᵀ + bias (or `+=` when `accumulate`) with W packed by `pack_bf16`.
pub fn linear_panels(out: &mut [f32], inp: &[f32], w: &[Line], bias: Option<&[f32]>, d: Dims, accumulate: bool) {
    let Dims { n, ic, oc } = d;
    assert!(out.len() >= n * oc && inp.len() >= n * ic && w.len() >= packed_lines(oc, ic));
    assert!(bias.is_none_or(|b| b.len() == oc));
    let dst = Dest { out: SendPtr(out.as_mut_ptr()), bias, n, oc, accumulate };
    let job = Job { dst, inp, w, ic };
    let panels = oc.div_ceil(PANEL);
    let tp = TASK_PANELS.min(panels.div_ceil(rayon::current_num_threads()));
    pool::for_each(panels.div_ceil(tp), |t| {
        let (p0, p1) = (t * tp, (t * tp + tp).min(panels));
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // SAFETY: AVX-512 F checked at run time; bounds asserted above.
            unsafe { x86::panels(&job, p0, p1) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: AVX2 + FMA checked at run time; bounds asserted above.
            unsafe { avx2::panels(&job, p0, p1) };
            return;
        }
        job.portable(p0, p1)
    });
}

/// One call's operands.
struct Job<'a> {
    dst: Dest<'a>,
    inp: &'a [f32],
    w: &'a [Line],
    ic: usize,
}

impl Job<'_> {
    /// Panels p0..p1 for every row, without SIMD intrinsics: the same fused multiply-adds in the same order as the
    /// AVX-512 tile, so the same bits.
    fn portable(&self, p0: usize, p1: usize) {
        let ic = self.ic;
        for p in p0..p1 {
            let lines = &self.w[p * ic..(p + 1) * ic];
            for r in 0..self.dst.n {
                let x = &self.inp[r * ic..(r + 1) * ic];
                let mut acc = [0f32; PANEL];
                for (&xk, line) in x.iter().zip(lines) {
                    for (i, &b) in line.0.iter().enumerate() {
                        let col = (i % 2) * 16 + i / 2;
                        acc[col] = xk.mul_add(f32::from_bits((b as u32) << 16), acc[col]);
                    }
                }
                for (j, &y) in acc.iter().enumerate().take(self.dst.oc - p * PANEL) {
                    self.dst.put(r, p * PANEL + j, y);
                }
            }
        }
    }
}

/// The AVX2 + FMA path (CPUs without AVX-512): per panel, two rows at a time, the 32 columns in four 8-wide
/// accumulators per row; one widening shift or mask per 8 weights. The same fused multiply-adds in the same order
/// as the portable loop, so the same bits.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Job, PANEL};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// Rows r0..r0+R of panel p.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(job: &Job<'_>, r0: usize, p: usize) {
        let ic = job.ic;
        let x = job.inp.as_ptr().add(r0 * ic);
        let w = job.w.as_ptr().add(p * ic);
        let hi_mask = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for k in 0..ic {
            let line = w.add(k) as *const __m256i;
            // words 0..7 hold columns 0..7 (low halves) and 16..23 (high), words 8..15 columns 8..15 and 24..31
            let (a, b) = (_mm256_load_si256(line), _mm256_load_si256(line.add(1)));
            let ws = [
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(a)),
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(b)),
                _mm256_castsi256_ps(_mm256_and_si256(a, hi_mask)),
                _mm256_castsi256_ps(_mm256_and_si256(b, hi_mask)),
            ];
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm256_set1_ps(*x.add(r * ic + k));
                for (a, &wv) in acc.iter_mut().zip(&ws) {
                    *a = _mm256_fmadd_ps(xv, wv, *a);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let mut ys = [0f32; PANEL];
            for (q, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(ys.as_mut_ptr().add(q * 8), *a);
            }
            for (j, &y) in ys.iter().enumerate().take(job.dst.oc - p * PANEL) {
                job.dst.put(r0 + r, p * PANEL + j, y);
            }
        }
    }

    /// Panels p0..p1 of every row.
    ///
    /// # Safety
    /// AVX2 and FMA available; the job's buffers are as `linear_panels` asserted.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panels(job: &Job<'_>, p0: usize, p1: usize) {
        for p in p0..p1 {
            let mut r = 0;
            while r + 2 <= job.dst.n {
                tile::<2>(job, r, p);
                r += 2;
            }
            if r < job.dst.n {
                tile::<1>(job, r, p);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Job, PANEL, TILE_ROWS};
    use crate::kernels::const_rows;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// Lines ahead at which each panel is prefetched into L1 (4 KiB), and by a second stream into L2 (16 KiB):
    /// both streams beat L1 alone, which beats none; half or double the distances were no different
    /// (docs/benchmarks.md#decode-path-tuning).
    const PREFETCH_L1: usize = 64;
    const PREFETCH_L2: usize = 256;

    /// Rows r0..r0+R of panels p..p+P.
    #[inline]
    #[allow(clippy::needless_range_loop)] // indices over const-sized register arrays read clearest
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize, const P: usize>(job: &Job<'_>, r0: usize, p: usize) {
        let ic = job.ic;
        let x = job.inp.as_ptr().add(r0 * ic);
        let w = job.w.as_ptr().add(p * ic);
        let hi_mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let mut acc = [[[_mm512_setzero_ps(); 2]; P]; R];
        for k in 0..ic {
            let mut lo = [_mm512_setzero_ps(); P];
            let mut hi = [_mm512_setzero_ps(); P];
            for q in 0..P {
                let line = w.add(q * ic + k);
                _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(PREFETCH_L1) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(line.wrapping_add(PREFETCH_L2) as *const i8);
                let v = _mm512_load_si512(line as *const __m512i);
                lo[q] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                hi[q] = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
            }
            for r in 0..R {
                let xv = _mm512_set1_ps(*x.add(r * ic + k));
                for q in 0..P {
                    acc[r][q][0] = _mm512_fmadd_ps(xv, lo[q], acc[r][q][0]);
                    acc[r][q][1] = _mm512_fmadd_ps(xv, hi[q], acc[r][q][1]);
                }
            }
        }
        for r in 0..R {
            let row = job.dst.out.get().add((r0 + r) * job.dst.oc);
            for q in 0..P {
                for h in 0..2 {
                    let col = (p + q) * PANEL + h * 16;
                    if col >= job.dst.oc {
                        continue;
                    }
                    let m = crate::kernels::lanes16(job.dst.oc - col);
                    let mut y = acc[r][q][h];
                    if job.dst.accumulate {
                        y = _mm512_add_ps(_mm512_maskz_loadu_ps(m, row.add(col)), y);
                    }
                    if let Some(b) = job.dst.bias {
                        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, b.as_ptr().add(col)));
                    }
                    _mm512_mask_storeu_ps(row.add(col), m, y);
                }
            }
        }
    }

    /// Panels p0..p1 of every row.
    ///
    /// # Safety
    /// AVX-512 F available; the job's buffers are as `linear_panels` asserted.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn panels(job: &Job<'_>, p0: usize, p1: usize) {
        // two panels at a time for up to 4 rows (more independent accumulators and streams), one above
        let pair = job.dst.n <= 4;
        let mut p = p0;
        while p < p1 {
            let two = pair && p + 1 < p1;
            let mut r = 0;
            while r < job.dst.n {
                let m = (job.dst.n - r).min(TILE_ROWS);
                macro_rules! run {
                    ($R:literal) => {
                        if two {
                            tile::<$R, 2>(job, r, p)
                        } else {
                            tile::<$R, 1>(job, r, p)
                        }
                    };
                }
                const_rows!(m, run);
                r += m;
            }
            p += if two { 2 } else { 1 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::assert_rows_independent;

    fn packed(w: &[f32], oc: usize, ic: usize) -> Vec<Line> {
        let mut p = vec![Line::default(); packed_lines(oc, ic)];
        pack_bf16(&mut p, w, oc, ic);
        p
    }

    /// Against a float64 sum over the bf16-rounded weights, for shapes that hit each remainder (partial panels,
    /// row counts that split into tiles of 8 and smaller), with and without bias and accumulation; and the
    /// portable loop gives the same bits as the AVX-512 tile.
    #[test]
    fn matches_f64_reference_on_ragged_shapes() {
        let mut rng = common::Rng::new(5);
        for &(n, ic, oc) in &[(1, 1, 1), (1, 17, 5), (2, 40, 33), (3, 15, 70), (4, 64, 96), (5, 100, 66), (9, 33, 130)]
        {
            let inp: Vec<f32> = (0..n * ic).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let wf: Vec<f32> = (0..oc * ic).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let bias: Vec<f32> = (0..oc).map(|_| rng.next_f64() as f32).collect();
            let wp = packed(&wf, oc, ic);
            let wr = |o: usize, k: usize| half::bf16::from_f32(wf[o * ic + k]).to_f32() as f64;
            for accumulate in [false, true] {
                for b in [None, Some(&bias[..])] {
                    let before: Vec<f32> = (0..n * oc).map(|i| i as f32 * 0.25).collect();
                    let mut out = before.clone();
                    linear_panels(&mut out, &inp, &wp, b, Dims { n, ic, oc }, accumulate);
                    for r in 0..n {
                        for o in 0..oc {
                            let dot: f64 = (0..ic).map(|k| inp[r * ic + k] as f64 * wr(o, k)).sum();
                            let extra = b.map_or(0.0, |b| b[o] as f64);
                            let want = dot + extra + if accumulate { before[r * oc + o] as f64 } else { 0.0 };
                            let got = out[r * oc + o] as f64;
                            assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{n}x{ic}x{oc}: {got} vs {want}");
                        }
                    }
                    let mut port = before.clone();
                    let dst = Dest { out: SendPtr(port.as_mut_ptr()), bias: b, n, oc, accumulate };
                    let job = Job { dst, inp: &inp, w: &wp, ic };
                    job.portable(0, oc.div_ceil(PANEL));
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&port), bits(&out), "portable {n}x{ic}x{oc}");
                    // the AVX2 path (what CPUs without AVX-512 run) gives the same bits too
                    #[cfg(target_arch = "x86_64")]
                    if avx2::available() {
                        let mut v = before.clone();
                        let dst = Dest { out: SendPtr(v.as_mut_ptr()), bias: b, n, oc, accumulate };
                        let job = Job { dst, inp: &inp, w: &wp, ic };
                        // SAFETY: AVX2 + FMA checked; buffers sized as linear_panels asserts.
                        unsafe { avx2::panels(&job, 0, oc.div_ceil(PANEL)) };
                        assert_eq!(bits(&v), bits(&out), "avx2 {n}x{ic}x{oc}");
                    }
                }
            }
        }
    }

    /// A row's result does not depend on how many rows share the call: bitwise, for every tile shape (two panels
    /// up to 4 rows, one above, tiles of 8 and the remainders).
    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_a_batch() {
        assert_rows_independent(13, 11, &[1, 2, 3, 5, 8], |out, inp, w, d| {
            linear_panels(out, inp, &packed(w, d.oc, d.ic), None, d, false)
        });
    }

    /// The packing puts column 32p+j in the low half and 32p+16+j in the high half of word j of line (p, k).
    #[test]
    fn packing_layout() {
        let (oc, ic) = (40, 3);
        let wf: Vec<f32> = (0..oc * ic).map(|i| i as f32).collect();
        let wp = packed(&wf, oc, ic);
        assert_eq!(wp.len(), 2 * ic);
        let at = |p: usize, k: usize, i: usize| half::bf16::from_bits(wp[p * ic + k].0[i]).to_f32();
        assert_eq!(at(0, 1, 0), wf[1]); // column 0, k 1
        assert_eq!(at(0, 2, 1), wf[16 * ic + 2]); // column 16
        assert_eq!(at(0, 0, 4), wf[2 * ic]); // column 2
        assert_eq!(at(0, 0, 5), wf[18 * ic]); // column 18
        assert_eq!(at(1, 1, 14), wf[39 * ic + 1]); // column 32 + 7
        assert_eq!(at(1, 1, 15), 0.0); // column 32 + 23: padding
    }
}
