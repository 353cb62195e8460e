//! Logit rules of one sequence, applied to its row of logits before sampling, in this order: `logit_bias`
//! (OpenAI: added to the logit, -100..100), the repetition penalty (Hugging Face / vLLM: every id in the prompt or
//! generated so far has a positive logit divided by it and a negative one multiplied by it), the frequency and
//! presence penalties (OpenAI: `l[j] -= c[j] * frequency + (c[j] > 0) * presence`, c[j] = times id j was generated
//! in this sequence), then `min_tokens` (the stop id cannot be chosen before that many tokens). Reported
//! log-probabilities are taken before these rules (`logprobs`).

use std::collections::HashMap;

/// What a request asks for; `Default` changes nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct LogitRules {
    /// OpenAI's range: -2..=2.
    pub presence_penalty: f32,
    /// OpenAI's range: -2..=2.
    pub frequency_penalty: f32,
    /// 1 = off; > 0.
    pub repetition_penalty: f32,
    /// (id, bias), ids below the tokenizer's size, bias in -100..=100.
    pub logit_bias: Vec<(u32, f32)>,
    /// The stop id is masked until this many tokens are generated.
    pub min_tokens: usize,
}

impl Default for LogitRules {
    fn default() -> Self {
        LogitRules {
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
        }
    }
}

impl LogitRules {
    /// True when applying the rules would change nothing at this point (the common case: no copy of the row).
    pub fn is_off_at(&self, generated: usize) -> bool {
        self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.repetition_penalty == 1.0
            && self.logit_bias.is_empty()
            && generated >= self.min_tokens
    }
}

/// Per-sequence memory of what the rules need: how often each id was generated, and the prompt's ids (for the
/// repetition penalty).
#[derive(Clone, Debug, Default)]
pub struct PenaltyState {
    counts: HashMap<u32, u32>,
    /// Ids seen in the prompt, sorted and unique; kept only with a repetition penalty.
    prompt: Vec<u32>,
}

impl PenaltyState {
    pub fn new(rules: &LogitRules, prompt: &[u32]) -> Self {
        let mut p = Vec::new();
        if rules.repetition_penalty != 1.0 {
            p.extend_from_slice(prompt);
            p.sort_unstable();
            p.dedup();
        }
        PenaltyState { counts: HashMap::new(), prompt: p }
    }

    /// Record a generated id.
    pub fn push(&mut self, id: u32) {
        *self.counts.entry(id).or_insert(0) += 1;
    }

    /// Apply `rules` to `logits` (the row, ids below `logits.len()`), `generated` tokens into the sequence.
    pub fn apply(&self, rules: &LogitRules, generated: usize, stop_id: Option<u32>, logits: &mut [f32]) {
        let n = logits.len();
        for &(id, b) in &rules.logit_bias {
            if let Some(x) = logits.get_mut(id as usize) {
                *x += b;
            }
        }
        let rp = rules.repetition_penalty;
        if rp != 1.0 {
            let seen = self.prompt.iter().copied().chain(self.counts.keys().copied().filter(|id| {
                // generated ids that are also prompt ids are penalised once
                self.prompt.binary_search(id).is_err()
            }));
            for id in seen {
                if let Some(x) = logits.get_mut(id as usize) {
                    *x = if *x > 0.0 { *x / rp } else { *x * rp };
                }
            }
        }
        let (fp, pp) = (rules.frequency_penalty, rules.presence_penalty);
        if fp != 0.0 || pp != 0.0 {
            for (&id, &c) in &self.counts {
                if (id as usize) < n {
                    logits[id as usize] -= c as f32 * fp + pp;
                }
            }
        }
        if generated < rules.min_tokens {
            if let Some(x) = stop_id.and_then(|s| logits.get_mut(s as usize)) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_follows_its_definition() {
        // OpenAI's formula, worked by hand: id 1 generated twice, id 2 once
        let rules = LogitRules { presence_penalty: 0.5, frequency_penalty: 0.25, ..Default::default() };
        let mut st = PenaltyState::new(&rules, &[3]);
        for id in [1, 2, 1] {
            st.push(id);
        }
        let mut l = vec![1.0f32; 5];
        st.apply(&rules, 3, Some(4), &mut l);
        assert_eq!(l, vec![1.0, 1.0 - 2.0 * 0.25 - 0.5, 1.0 - 0.25 - 0.5, 1.0, 1.0]);
        // repetition: prompt id 3 and generated ids 1, 2; positive divided, negative multiplied, once each
        let rules = LogitRules { repetition_penalty: 2.0, ..Default::default() };
        let mut st = PenaltyState::new(&rules, &[3, 3, 1]);
        st.push(1);
        st.push(2);
        let mut l = vec![4.0, 4.0, -4.0, 4.0, 4.0];
        st.apply(&rules, 2, None, &mut l);
        assert_eq!(l, vec![4.0, 2.0, -8.0, 2.0, 4.0]);
        // bias and min_tokens; out-of-range ids are ignored
        let rules = LogitRules { logit_bias: vec![(0, -100.0), (9, 5.0)], min_tokens: 2, ..Default::default() };
        let st = PenaltyState::new(&rules, &[]);
        let mut l = vec![0.0f32; 3];
        st.apply(&rules, 1, Some(2), &mut l);
        assert_eq!(l, vec![-100.0, 0.0, f32::NEG_INFINITY]);
        let mut l = vec![0.0f32; 3];
        st.apply(&rules, 2, Some(2), &mut l);
        assert_eq!(l, vec![-100.0, 0.0, 0.0]);
        assert!(LogitRules::default().is_off_at(0));
        assert!(!rules.is_off_at(5));
    }
}
