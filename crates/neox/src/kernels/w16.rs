//! Linear products with the weight stored as raw bfloat16 bits (`u16`, (OC, IC) row-major as in `nn.Linear`):
//! a frozen base kept at 2 bytes per parameter, with no f32 copy. The portable path widens one block of weight
//! rows at a time into an f32 scratch (exact: every bf16 value is an f32) and multiplies with the f32 gemm, so
//! the result is that of the f32 product with the bf16-valued weight. Blocks are fixed by the shape alone, so
//! results do not depend on the thread count.

use super::matmul::{gemm, par_all, Dims, Mat};
use super::SendPtr;
use rayon::prelude::*;
use std::cell::RefCell;

/// f32 elements of weight widened per block (4 MiB of scratch).
const BLOCK_ELEMS: usize = 1 << 20;

thread_local! {
    /// The widened block, reused across calls (a fresh multi-MiB buffer per product would fault its pages in
    /// every time).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// bf16 bits to the f32 they denote.
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 to bf16 bits, rounded to nearest (ties to even); NaN stays a quiet NaN.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return ((x.to_bits() >> 16) as u16) | 0x40;
    }
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// dst[i] = bf16 src[i] as f32 (parallel for large slices).
pub fn widen(dst: &mut [f32], src: &[u16]) {
    assert_eq!(dst.len(), src.len());
    let run = |(d, s): (&mut [f32], &[u16])| d.iter_mut().zip(s).for_each(|(d, &s)| *d = bf16_to_f32(s));
    if dst.len() <= super::SMALL {
        run((dst, src));
    } else {
        dst.par_chunks_mut(1 << 14).zip(src.par_chunks(1 << 14)).for_each(run);
    }
}

/// dst[i] = bf16 bits of src[i] (round to nearest even).
pub fn narrow(dst: &mut [u16], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    let run = |(d, s): (&mut [u16], &[f32])| d.iter_mut().zip(s).for_each(|(d, &s)| *d = f32_to_bf16(s));
    if dst.len() <= super::SMALL {
        run((dst, src));
    } else {
        dst.par_chunks_mut(1 << 14).zip(src.par_chunks(1 << 14)).for_each(run);
    }
}

/// Rows of the weight per block for `ic` inputs: a multiple of 16, at least 16.
fn block_rows(ic: usize) -> usize {
    (BLOCK_ELEMS / ic.max(1)).max(16) / 16 * 16
}

/// Run `f(o0, rows, widened)` over blocks of the weight's rows with the block widened to f32 (rows, IC).
fn for_blocks(w16: &[u16], d: Dims, mut f: impl FnMut(usize, usize, &[f32])) {
    let (ic, oc) = (d.ic, d.oc);
    let step = block_rows(ic);
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < step.min(oc) * ic {
            s.resize(step.min(oc) * ic, 0.0);
        }
        for o0 in (0..oc).step_by(step) {
            let rows = step.min(oc - o0);
            widen(&mut s[..rows * ic], &w16[o0 * ic..(o0 + rows) * ic]);
            f(o0, rows, &s[..rows * ic]);
        }
    })
}

/// out (N, OC) = inp (N, IC) · Wᵀ + bias, or `out +=` that when `accumulate`; W bf16 (OC, IC).
pub fn linear_fwd_w16(out: &mut [f32], inp: &[f32], w16: &[u16], bias: Option<&[f32]>, d: Dims, accumulate: bool) {
    let Dims { n, ic, oc } = d;
    assert!(out.len() >= n * oc && inp.len() >= n * ic && w16.len() >= oc * ic);
    if n == 0 {
        return;
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), oc);
        out[..n * oc].par_chunks_mut(oc).for_each(|r| {
            if accumulate {
                r.iter_mut().zip(b).for_each(|(o, b)| *o += b)
            } else {
                r.copy_from_slice(b)
            }
        });
    }
    let acc = accumulate || bias.is_some();
    let dst = SendPtr(out.as_mut_ptr());
    for_blocks(w16, d, |o0, rows, w| {
        // SAFETY: columns o0..o0+rows of the (N, OC) output (asserted above) with row stride OC; the widened
        // block (rows, IC) read column-major is its transpose (IC, rows).
        unsafe {
            let dst = Mat::rm(dst.get().add(o0), n, rows, oc);
            gemm(dst, acc, Mat::rm(inp.as_ptr(), n, ic, ic), Mat::cm(w.as_ptr(), ic, rows, ic), 1.0, par_all());
        }
    });
}

/// dinp (N, IC) = dout (N, OC) · W (overwritten), W bf16 (OC, IC): a sum over blocks of W's rows in a fixed order.
pub fn linear_bwd_input_w16(dinp: &mut [f32], dout: &[f32], w16: &[u16], d: Dims) {
    let Dims { n, ic, oc } = d;
    assert!(dinp.len() >= n * ic && dout.len() >= n * oc && w16.len() >= oc * ic);
    if n == 0 {
        return;
    }
    if oc == 0 {
        dinp[..n * ic].fill(0.0);
        return;
    }
    for_blocks(w16, d, |o0, rows, w| {
        // SAFETY: dout columns o0..o0+rows (row stride OC) times the block (rows, IC); sizes asserted above.
        unsafe {
            let lhs = Mat::rm(dout.as_ptr().add(o0), n, rows, oc);
            let dst = Mat::rm(dinp.as_mut_ptr(), n, ic, ic);
            gemm(dst, o0 > 0, lhs, Mat::rm(w.as_ptr(), rows, ic, ic), 1.0, par_all());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand16(rng: &mut common::Rng, k: usize) -> Vec<u16> {
        (0..k).map(|_| f32_to_bf16(rng.normal() as f32)).collect()
    }

    #[test]
    fn rounding_matches_the_f32_rounding_and_half_crate() {
        let mut rng = common::Rng::new(3);
        for _ in 0..10_000 {
            let x = (rng.normal() * 100.0) as f32;
            assert_eq!(bf16_to_f32(f32_to_bf16(x)), crate::kernels::math::round_bf16(x));
            assert_eq!(f32_to_bf16(x), half::bf16::from_f32(x).to_bits());
        }
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    /// Against float64 sums over the bf16 weights, with blocks of rows (OC above one block) and without.
    #[test]
    fn products_match_float64_sums() {
        let mut rng = common::Rng::new(5);
        for &(n, ic, oc) in &[(3, 17, 9), (5, 64, 40), (2, 8192, 300)] {
            let d = Dims { n, ic, oc };
            let w = rand16(&mut rng, oc * ic);
            let inp: Vec<f32> = (0..n * ic).map(|_| rng.normal() as f32).collect();
            let bias: Vec<f32> = (0..oc).map(|_| rng.normal() as f32).collect();
            let mut out = vec![f32::NAN; n * oc];
            linear_fwd_w16(&mut out, &inp, &w, Some(&bias), d, false);
            let dout: Vec<f32> = (0..n * oc).map(|_| rng.normal() as f32).collect();
            let mut dinp = vec![f32::NAN; n * ic];
            linear_bwd_input_w16(&mut dinp, &dout, &w, d);
            for i in 0..n {
                for o in 0..oc {
                    let e: f64 = bias[o] as f64
                        + (0..ic).map(|k| inp[i * ic + k] as f64 * bf16_to_f32(w[o * ic + k]) as f64).sum::<f64>();
                    let tol = 1e-5 * (1.0 + (ic as f64).sqrt());
                    assert!((out[i * oc + o] as f64 - e).abs() < tol, "fwd {n}x{ic}x{oc} ({i},{o})");
                }
                for k in 0..ic {
                    let e: f64 =
                        (0..oc).map(|o| dout[i * oc + o] as f64 * bf16_to_f32(w[o * ic + k]) as f64).sum::<f64>();
                    let tol = 1e-5 * (1.0 + (oc as f64).sqrt());
                    assert!((dinp[i * ic + k] as f64 - e).abs() < tol, "bwd {n}x{ic}x{oc} ({i},{k})");
                }
            }
            // accumulate adds the product (no bias this time) to what is there
            let mut twice = out.clone();
            linear_fwd_w16(&mut twice, &inp, &w, None, d, true);
            for (k, (t, o)) in twice.iter().zip(&out).enumerate() {
                let e = o + (o - bias[k % oc]);
                assert!((t - e).abs() <= 1e-4 * (1.0 + e.abs()), "accumulate {t} vs {e}");
            }
        }
    }
}
