//! Greedy batched generation on the KV cache (left padding), the engine-level primitive that tests compare with
//! HF `generate(do_sample=False)`. Sampling, stop strings and response extraction belong to the inference crate.

use crate::error::{Error, Result};
use crate::model::Model;

/// Index of the largest value; the first one on ties (as `torch.argmax`).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
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
        let next: Vec<u32> = logits.chunks(v).map(|l| argmax(l) as u32).collect();
        for (o, &n) in out.iter_mut().zip(&next) {
            o.push(n);
        }
        if out[0].len() == max_new {
            return Ok(out);
        }
        model.forward_cached(&next, &ones, &mut cache, &mut logits)?;
    }
}
