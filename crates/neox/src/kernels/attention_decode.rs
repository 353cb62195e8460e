//! Inner loops of attention against the KV cache (`decode.rs`): a query's scores over key blocks, and the
//! probability-weighted sum of values. Written so the compiler keeps every accumulator in registers with several
//! independent fused multiply-add chains (one chain of dependent adds left the loops bound by add latency and
//! by storing the output after every slot).

use super::math::Weight;

/// Key slots per transposed block.
pub const KB: usize = 16;

/// Bytes ahead of the current position at which keys and values are prefetched. The loops were bound by the
/// latency of loading each new cache line: a (row, head) reads two short streams, too short for the hardware
/// prefetcher to ramp up. Prefetching cut attention's share of a batched decode; 2, 4 and 8 KiB were alike
/// (docs/benchmarks.md#decode-path-tuning).
const AHEAD: usize = 4096;

/// Prefetches the cache line holding `x[i]` into L1 (nothing when `i` is out of range).
#[inline(always)]
fn prefetch<W>(x: &[W], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if i < x.len() {
        // SAFETY: a prefetch is a hint and never faults; the address is inside `x`.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(x.as_ptr().add(i) as *const i8)
        }
    }
}

/// Prefetches the first `AHEAD` bytes of `x` (at most all of it): the start of a stream, before its loop begins.
pub fn prefetch_start<W>(x: &[W]) {
    let step = 64 / size_of::<W>();
    for i in (0..(AHEAD / size_of::<W>()).min(x.len())).step_by(step) {
        prefetch(x, i);
    }
}

/// scores[j] = scale · Σ_d q[d]·K[j][d] for the slots of `nb` key blocks, each block (D, KB) transposed: the KB
/// slots of one channel are contiguous. Every score is summed over d in order, whatever the grouping.
pub fn block_scores<W: Weight>(kb: &[W], q: &[f32], scores: &mut [f32], nb: usize, scale: f32) {
    let d = q.len();
    let mut b = 0;
    while b + 4 <= nb {
        blocks::<W, 4>(kb, q, scores, b, d, scale);
        b += 4;
    }
    for b in b..nb {
        blocks::<W, 1>(kb, q, scores, b, d, scale);
    }
}

/// Blocks b..b+G at once: G x KB independent accumulators.
#[inline(always)]
fn blocks<W: Weight, const G: usize>(kb: &[W], q: &[f32], scores: &mut [f32], b: usize, d: usize, scale: f32) {
    let keys: [&[W]; G] = std::array::from_fn(|g| &kb[(b + g) * d * KB..(b + g + 1) * d * KB]);
    let mut acc = [[0f32; KB]; G];
    let pf = AHEAD / size_of::<W>();
    for (dd, &qd) in q.iter().enumerate() {
        for g in 0..G {
            prefetch(kb, (b + g) * d * KB + dd * KB + pf);
        }
        for (a, k) in acc.iter_mut().zip(&keys) {
            for (a, &kv) in a.iter_mut().zip(&k[dd * KB..dd * KB + KB]) {
                *a = qd.mul_add(kv.f32(), *a);
            }
        }
    }
    for (g, a) in acc.iter().enumerate() {
        for (s, &a) in scores[(b + g) * KB..(b + g + 1) * KB].iter_mut().zip(a) {
            *s = a * scale;
        }
    }
}

/// out (D) = Σ_j p[j] · V[j] over the slots j of `p`, values (S, D) row-major.
pub fn weighted_values<W: Weight>(out: &mut [f32], v: &[W], p: &[f32]) {
    let d = out.len();
    let mut off = 0;
    while off + 64 <= d {
        columns::<W, 64>(out, v, p, off);
        off += 64;
    }
    while off + 16 <= d {
        columns::<W, 16>(out, v, p, off);
        off += 16;
    }
    for c in off..d {
        out[c] = p.iter().enumerate().fold(0.0, |a, (j, &pj)| pj.mul_add(v[j * d + c].f32(), a));
    }
}

/// Output columns off..off+N: N accumulators, one fused multiply-add per value per slot.
#[inline(always)]
fn columns<W: Weight, const N: usize>(out: &mut [f32], v: &[W], p: &[f32], off: usize) {
    let d = out.len();
    let mut acc = [0f32; N];
    let pf = AHEAD / size_of::<W>();
    let step = 64 / size_of::<W>();
    for (j, (row, &pj)) in v.chunks_exact(d).zip(p).enumerate() {
        for c in (off..off + N).step_by(step) {
            prefetch(v, j * d + c + pf);
        }
        for (a, &x) in acc.iter_mut().zip(&row[off..off + N]) {
            *a = pj.mul_add(x.f32(), *a);
        }
    }
    out[off..off + N].copy_from_slice(&acc);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against float64 sums, for head sizes that use each column path (64, 16, the scalar rest) and block counts
    /// that use the groups of four and the single blocks; bf16 keys and values too.
    #[test]
    fn match_f64_sums() {
        let mut rng = common::Rng::new(3);
        for &(d, nb) in &[(64, 5), (80, 4), (8, 1), (130, 7), (16, 3)] {
            let s = nb * KB;
            let q: Vec<f32> = (0..d).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let kf: Vec<f32> = (0..s * d).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let kh: Vec<u16> = kf.iter().map(|x| half::bf16::from_f32(*x).to_bits()).collect();
            let p: Vec<f32> = (0..s).map(|_| rng.next_f64() as f32).collect();
            for bf16 in [false, true] {
                let kv = |i: usize| if bf16 { kh[i].f32() } else { kf[i] } as f64;
                let mut sc = vec![0f32; s];
                let mut out = vec![0f32; d];
                if bf16 {
                    block_scores(&kh, &q, &mut sc, nb, 0.5);
                    weighted_values(&mut out, &kh, &p);
                } else {
                    block_scores(&kf, &q, &mut sc, nb, 0.5);
                    weighted_values(&mut out, &kf, &p);
                }
                for (j, &got) in sc.iter().enumerate() {
                    let (blk, slot) = (j / KB, j % KB);
                    let want: f64 =
                        0.5 * (0..d).map(|dd| q[dd] as f64 * kv(blk * d * KB + dd * KB + slot)).sum::<f64>();
                    assert!((got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "d {d} score {j}: {got} vs {want}");
                }
                for (c, &got) in out.iter().enumerate() {
                    let want: f64 = (0..s).map(|j| p[j] as f64 * kv(j * d + c)).sum();
                    assert!((got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "d {d} out {c}: {got} vs {want}");
                }
            }
        }
    }
}
