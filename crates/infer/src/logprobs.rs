//! Log-probabilities of one row of logits under the model's own distribution: log_softmax over every row of the
//! LM head (as Hugging Face's logits, the training loss and `dolly eval` normalise, padded embedding rows
//! included), before temperature, penalties or `logit_bias` — what vLLM reports by default (`raw_logprobs`). So a
//! greedy token's logprob is the largest of its row, exp(logprobs) sum to 1, and a prompt's echoed logprobs are
//! minus its per-token training losses. Alternatives are only ever tokens (ids below the tokenizer's size). NaN
//! logits count as -inf. Sums are in f64.

/// The chosen token's log-probability and the `top` most likely tokens (highest first, lower id first on ties).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Most alternatives a request may ask for per token (OpenAI's `top_logprobs` limit).
pub const MAX_TOP: usize = 20;

/// log Σ exp(l) over `logits` (NaN as -inf); -inf when every logit is -inf.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let mx = neox::host::max(logits);
    if !mx.is_finite() {
        return mx as f64;
    }
    // exp in f32 over 16 independent lanes (so the loop vectorises; |error| ~1e-7 relative each), each block of
    // 256 summed in f32 then added in f64: the rounding of 16 terms per lane per block stays far below 1e-6
    let term = |x: f32| if x.is_nan() { 0.0 } else { neox::host::exp(x - mx) };
    let mut total = 0f64;
    let mut blocks = logits.chunks_exact(256);
    for b in &mut blocks {
        let mut lanes = [0f32; 16];
        for c in b.chunks_exact(16) {
            for k in 0..16 {
                lanes[k] += term(c[k]);
            }
        }
        total += lanes.iter().map(|&x| x as f64).sum::<f64>();
    }
    total += blocks.remainder().iter().map(|&x| term(x) as f64).sum::<f64>();
    mx as f64 + total.ln()
}

/// The `n` largest logits as (id, logit), highest first, lower id first on ties; NaN never included.
pub fn top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return top;
    }
    // 16 at a time: a chunk whose largest value cannot enter the list is skipped after one vector max
    for (ci, c) in logits.chunks(16).enumerate() {
        let cm = c.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        if top.len() == n && cm <= top[n - 1].1 {
            continue;
        }
        for (k, &x) in c.iter().enumerate() {
            if x.is_nan() || (top.len() == n && x <= top[n - 1].1) {
                continue;
            }
            // insert after every entry >= x (earlier ids win ties)
            let at = top.partition_point(|&(_, y)| y >= x);
            top.insert(at, ((ci * 16 + k) as u32, x));
            top.truncate(n);
        }
    }
    top
}

/// Log-probability of `chosen` and the `top` best alternatives among the ids below `limit`, from one whole row.
pub fn token_logprob(logits: &[f32], limit: usize, chosen: u32, top: usize) -> TokenLogprob {
    let lse = log_sum_exp(logits);
    let lp = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { (x as f64 - lse) as f32 };
    let logprob = logits.get(chosen as usize).map_or(f32::NEG_INFINITY, |&x| lp(x));
    let l = &logits[..limit.min(logits.len())];
    let top = top_n(l, top.min(MAX_TOP)).into_iter().map(|(id, x)| (id, lp(x))).collect();
    TokenLogprob { id: chosen, logprob, top }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Float64 reference: log_softmax computed directly.
    fn reference(l: &[f32]) -> Vec<f64> {
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, |a, x| a.max(x as f64));
        let s: f64 = l.iter().map(|&x| (x as f64 - m).exp()).sum();
        l.iter().map(|&x| x as f64 - m - s.ln()).collect()
    }

    #[test]
    fn logprobs_match_a_float64_log_softmax_and_renormalise() {
        let l: Vec<f32> = (0..50_280).map(|i| ((i as f32) * 0.731).sin() * 9.0).collect();
        let want = reference(&l);
        for id in [0u32, 17, 50_279] {
            let t = token_logprob(&l, l.len(), id, 5);
            assert!((t.logprob as f64 - want[id as usize]).abs() < 1e-5, "{id}");
        }
        let total: f64 = l.iter().map(|&x| (x as f64 - log_sum_exp(&l)).exp()).sum();
        // f32 block sums: ~2e-8 measured; a logprob is off by that much at most
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        // top-1 is the argmax, and its logprob is the greedy token's
        let t = token_logprob(&l, l.len(), crate::sampling::argmax(&l), 3);
        assert_eq!(t.top[0].0, t.id);
        assert_eq!(t.top[0].1, t.logprob);
        assert!(t.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }

    #[test]
    fn top_n_orders_ties_by_id_skips_nan_and_respects_limit() {
        let l = [1.0, f32::NAN, 3.0, 3.0, -1.0, 9.0];
        assert_eq!(top_n(&l, 3), vec![(5, 9.0), (2, 3.0), (3, 3.0)]);
        assert_eq!(top_n(&l, 0), vec![]);
        assert_eq!(top_n(&l, 10).len(), 5);
        // ids at or beyond the limit are never reported
        let t = token_logprob(&l, 4, 2, 10);
        assert!(t.top.iter().all(|&(id, _)| id < 4));
        assert_eq!(t.top.len(), 3);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f64::NEG_INFINITY);
    }
}
