//! Next-token choice from one row of logits: greedy argmax, or Dolly/HF-style sampling (temperature, then top-k,
//! then top-p, then a draw from the renormalised distribution) with an explicit seeded `common::Rng`.
//! Only ids below `vocab_limit` are candidates, so padded embedding rows beyond the tokenizer are never chosen.
//! Does not apply repetition penalties or stop rules (the caller stops on `### End`).

use common::Rng;
use neox::host::{exp, max};

/// Sampling settings of one sequence. `Default` is Dolly's pipeline: sampling on, top_p 0.92, top_k 0 (off),
/// temperature 1.0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// false = greedy (argmax). A temperature of 0 also means greedy.
    pub do_sample: bool,
    pub temperature: f32,
    /// Keep the smallest prefix of the sorted distribution whose mass reaches `top_p` (1.0 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens first (0 = off).
    pub top_k: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { do_sample: true, temperature: 1.0, top_p: 0.92, top_k: 0 }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { do_sample: false, ..Default::default() }
    }

    /// True when the choice is the argmax.
    pub fn is_greedy(&self) -> bool {
        !self.do_sample || self.temperature == 0.0
    }

    /// Range checks with a message naming the parameter (the server and CLI report it).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!("temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// Index of the largest value; the first on ties (as `torch.argmax`). NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    neox::generate::argmax(logits) as u32
}

/// Order used everywhere: higher weight first, lower id first on ties (a total, deterministic order).
fn desc(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Reusable buffers for `sample` (one per concurrently sampled row).
#[derive(Default)]
pub struct Scratch {
    /// Weight of every token: exp(scaled logit - max).
    w: Vec<f32>,
    /// Candidates (weight, id) in the order of the draw.
    kept: Vec<(f32, u32)>,
}

/// Thresholds on the weight (the largest is 1) tried in turn for the top-p nucleus: the tokens at or above the
/// first one whose total weight reaches the target hold the whole nucleus, so only they are sorted.
const NUCLEUS_THRESHOLDS: [f32; 7] = [1.0 / 16.0, 1.0 / 256.0, 1.0 / 4096.0, 1.0 / 65536.0, 1.0 / 1048576.0, 1e-9, 0.0];

/// Σ of the weights >= `tau`, in f64 (8 independent lanes, so it vectorises).
fn mass(w: &[f32], tau: f32) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = w.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            lanes[k] += if c[k] >= tau { c[k] as f64 } else { 0.0 };
        }
    }
    let rest: f64 = chunks.remainder().iter().filter(|&&x| x >= tau).map(|&x| x as f64).sum();
    lanes.iter().sum::<f64>() + rest
}

/// Choose the next token from `logits` (one row, length >= `vocab_limit`); only ids `< vocab_limit` can be chosen.
/// `scratch` is reused between calls to avoid allocation.
pub fn sample(logits: &[f32], vocab_limit: usize, p: &SamplingParams, rng: &mut Rng, scratch: &mut Scratch) -> u32 {
    let logits = &logits[..vocab_limit.min(logits.len())];
    if p.is_greedy() {
        return argmax(logits);
    }
    // temperature, then weights exp(l - max) (NaN counts as -inf)
    let inv_t = 1.0 / p.temperature;
    let Scratch { w, kept } = scratch;
    w.clear();
    w.extend(logits.iter().map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l * inv_t }));
    let mx = max(w);
    if !mx.is_finite() {
        // all -inf, or a temperature so small that a logit overflowed: the limit is the argmax
        return argmax(logits);
    }
    w.iter_mut().for_each(|x| *x = exp(*x - mx));
    kept.clear();
    if p.top_k > 0 && p.top_k < w.len() {
        // top-k: the k largest, in the draw order
        kept.extend(w.iter().enumerate().map(|(i, &x)| (x, i as u32)));
        kept.select_nth_unstable_by(p.top_k - 1, desc);
        kept.truncate(p.top_k);
        kept.sort_unstable_by(desc);
    }
    let total = if kept.is_empty() { mass(w, 0.0) } else { kept.iter().map(|c| c.0 as f64).sum() };
    // top-p: the smallest prefix of the descending order whose mass reaches top_p (at least one token)
    if p.top_p < 1.0 {
        let target = p.top_p as f64 * total;
        if kept.is_empty() {
            let tau = NUCLEUS_THRESHOLDS.into_iter().find(|&t| mass(w, t) >= target).unwrap_or(0.0);
            // 16 at a time: a vector compare skips the chunks with no candidate (nearly all of them)
            for (ci, c) in w.chunks(16).enumerate() {
                if c.iter().fold(false, |a, &x| a | (x >= tau)) {
                    let at = c.iter().enumerate().filter(|(_, &x)| x >= tau);
                    kept.extend(at.map(|(k, &x)| (x, (ci * 16 + k) as u32)));
                }
            }
            kept.sort_unstable_by(desc);
        }
        let mut acc = 0f64;
        let mut n = kept.len();
        for (i, c) in kept.iter().enumerate() {
            acc += c.0 as f64;
            if acc >= target {
                n = i + 1;
                break;
            }
        }
        kept.truncate(n);
    }
    // draw from the renormalised candidates (all tokens in id order when neither top-k nor top-p applies)
    if kept.is_empty() {
        let u = rng.next_f64() * total;
        let mut acc = 0f64;
        for (i, &x) in w.iter().enumerate() {
            acc += x as f64;
            if u < acc {
                return i as u32;
            }
        }
        // rounding: the last token with weight
        return w.iter().rposition(|&x| x > 0.0).unwrap_or(0) as u32;
    }
    let total: f64 = kept.iter().map(|c| c.0 as f64).sum();
    let u = rng.next_f64() * total;
    let mut acc = 0f64;
    for c in kept.iter() {
        acc += c.0 as f64;
        if u < acc {
            return c.1;
        }
    }
    kept.iter().rev().find(|c| c.0 > 0.0).map_or(kept[0].1, |c| c.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(logits: &[f32], limit: usize, p: SamplingParams, n: usize, seed: u64) -> Vec<u32> {
        let mut rng = Rng::new(seed);
        let mut s = Scratch::default();
        (0..n).map(|_| sample(logits, limit, &p, &mut rng, &mut s)).collect()
    }

    #[test]
    fn greedy_is_argmax_first_on_ties_and_respects_limit() {
        let l = [1.0, 3.0, 3.0, 9.0];
        assert_eq!(draw(&l, 4, SamplingParams::greedy(), 1, 0), vec![3]);
        assert_eq!(draw(&l, 3, SamplingParams::greedy(), 1, 0), vec![1]);
        let t0 = SamplingParams { temperature: 0.0, ..Default::default() };
        assert_eq!(draw(&l, 3, t0, 1, 0), vec![1]);
    }

    #[test]
    fn padded_rows_beyond_limit_are_never_sampled() {
        // the padded rows have by far the largest logits
        let mut l = vec![0.0f32; 100];
        l[90..].fill(50.0);
        let p = SamplingParams { top_p: 1.0, ..Default::default() };
        assert!(draw(&l, 90, p, 2000, 1).iter().all(|&t| t < 90));
        assert!(draw(&l, 90, SamplingParams::default(), 2000, 2).iter().all(|&t| t < 90));
    }

    #[test]
    fn top_p_keeps_smallest_prefix_reaching_mass() {
        // probs 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps {0,1}; 0.81 keeps {0,1,2}; tiny keeps {0}
        let l: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let set = |top_p: f32| {
            let mut v = draw(&l, 4, SamplingParams { top_p, ..Default::default() }, 3000, 3);
            v.sort();
            v.dedup();
            v
        };
        assert_eq!(set(0.79), vec![0, 1]);
        assert_eq!(set(0.81), vec![0, 1, 2]);
        assert_eq!(set(0.01), vec![0]);
        assert_eq!(set(1.0), vec![0, 1, 2, 3]);
    }

    #[test]
    fn top_p_with_wide_nucleus_and_top_k() {
        // 5000 equal logits: top_p 0.5 keeps the 2500 lowest ids (ties broken by id), needs several widenings
        let l = vec![0.0f32; 5000];
        let v = draw(&l, 5000, SamplingParams { top_p: 0.5, ..Default::default() }, 3000, 4);
        assert!(v.iter().all(|&t| t < 2500));
        assert!(v.iter().any(|&t| t > 1000));
        let v = draw(&l, 5000, SamplingParams { top_k: 3, top_p: 1.0, ..Default::default() }, 300, 5);
        assert!(v.iter().all(|&t| t < 3));
    }

    #[test]
    fn frequencies_follow_renormalised_probabilities() {
        let l: Vec<f32> = [0.6f32, 0.3, 0.1].iter().map(|p| p.ln()).collect();
        let v = draw(&l, 3, SamplingParams { top_p: 0.85, ..Default::default() }, 20000, 6);
        let f0 = v.iter().filter(|&&t| t == 0).count() as f64 / v.len() as f64;
        // kept {0,1}, renormalised 2/3, 1/3; binomial sd ~0.0033
        assert!((f0 - 2.0 / 3.0).abs() < 0.02, "{f0}");
        assert!(!v.contains(&2));
        // temperature sharpens
        let v = draw(&l, 3, SamplingParams { top_p: 1.0, temperature: 0.25, ..Default::default() }, 20000, 7);
        let f0 = v.iter().filter(|&&t| t == 0).count() as f64 / v.len() as f64;
        let want = 0.6f64.powi(4) / (0.6f64.powi(4) + 0.3f64.powi(4) + 0.1f64.powi(4));
        assert!((f0 - want).abs() < 0.02, "{f0} vs {want}");
    }

    #[test]
    fn same_seed_same_draws() {
        let l: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams::default();
        assert_eq!(draw(&l, 1000, p, 50, 9), draw(&l, 1000, p, 50, 9));
        assert_ne!(draw(&l, 1000, p, 50, 9), draw(&l, 1000, p, 50, 10));
    }

    #[test]
    fn validate_ranges() {
        assert!(SamplingParams::default().validate().is_ok());
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { top_p: 1.5, ..Default::default() }.validate().is_err());
    }
}
