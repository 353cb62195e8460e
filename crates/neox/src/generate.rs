//! Greedy batched generation on the KV cache (left padding), the engine-level primitive that tests compare with
//! HF `generate(do_sample=False)`. Sampling, stop strings and response extraction belong to the inference crate.

use crate::error::{Error, Result};
use crate::kernels::{math, pool};
use crate::model::Model;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// Index of the largest value; the first one on ties (as `torch.argmax`). NaN never wins; all-NaN, all -inf or
/// empty gives 0.
pub fn argmax(x: &[f32]) -> usize {
    // the maximum (vectorised; NaN never wins), then its first position
    let mx = math::max(x);
    if mx == f32::NEG_INFINITY {
        return 0;
    }
    // first position: the first 16-wide chunk holding the maximum (a vector compare each), then within it
    let chunk = x.chunks(16).position(|c| c.iter().fold(false, |a, &v| a | (v == mx))).unwrap_or(0);
    chunk * 16 + x[chunk * 16..].iter().position(|&v| v == mx).unwrap_or(0)
}

/// `argmax` of each row of `logits` (rows of `v`), the rows spread over the decode threads.
pub fn argmax_rows(logits: &[f32], v: usize) -> Vec<u32> {
    let rows = logits.len() / v;
    let next: Vec<AtomicU32> = (0..rows).map(|_| AtomicU32::new(0)).collect();
    pool::for_each(rows, |r| next[r].store(argmax(&logits[r * v..(r + 1) * v]) as u32, Relaxed));
    next.into_iter().map(AtomicU32::into_inner).collect()
}

/// Greedy continuation of each prompt by `max_new` tokens (no early stop). Prompts of different lengths are
/// left-padded. Returns the new tokens per prompt.
pub fn greedy(model: &Model, prompts: &[Vec<u32>], max_new: usize) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    if b == 0 || prompts.iter().any(|p| p.is_empty()) {
        return Err(Error::invalid("greedy: every prompt needs at least one token"));
    }
    let v = model.config.vocab_size;
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    for p in prompts {
        let pad = t - p.len();
        ids.extend(std::iter::repeat_n(0, pad).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0u8, pad).chain(std::iter::repeat_n(1u8, p.len())));
    }
    let mut cache = model.new_kv_cache(b, t + max_new);
    let mut logits = vec![0f32; b * v];
    let mut out = vec![Vec::with_capacity(max_new); b];
    if max_new == 0 {
        return Ok(out);
    }
    model.forward_cached(&ids, &mask, &mut cache, &mut logits)?;
    let ones = vec![1u8; b];
    loop {
        let next = argmax_rows(&logits, v);
        for (o, &n) in out.iter_mut().zip(&next) {
            o.push(n);
        }
        if out[0].len() == max_new {
            return Ok(out);
        }
        model.forward_cached(&next, &ones, &mut cache, &mut logits)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised argmax equals a plain first-strictly-greater scan on vectors with ties, NaN, ±inf, ±0.
    #[test]
    fn argmax_equals_the_scalar_scan() {
        let scalar = |l: &[f32]| {
            let (mut best, mut bv) = (0, f32::NEG_INFINITY);
            for (i, &v) in l.iter().enumerate() {
                if v > bv {
                    (best, bv) = (i, v);
                }
            }
            best
        };
        let mut rng = common::Rng::new(3);
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.0];
        for n in [0, 1, 5, 16, 17, 100, 1000] {
            for _ in 0..200 {
                let l: Vec<f32> = (0..n)
                    .map(|_| {
                        let r = rng.next_f64();
                        if r < 0.1 {
                            specials[(r * 60.0) as usize % specials.len()]
                        } else {
                            (r * 8.0).floor() as f32 // few distinct values: many ties
                        }
                    })
                    .collect();
                assert_eq!(argmax(&l), scalar(&l), "{l:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN; 20]), 0);
    }

    #[test]
    fn argmax_rows_takes_each_row() {
        let l = [1.0, 5.0, 2.0, 7.0, 0.0, 7.0, 3.0, 3.0, -1.0];
        assert_eq!(argmax_rows(&l, 3), vec![1, 0, 0]);
    }
}
