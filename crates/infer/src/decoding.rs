//! Batched generation on the engine's KV cache (letters: B batch rows, Tn tokens fed per call, V vocab).
//! Each row is one sequence with its own sampling parameters, RNG and token budget. Prompts are left-padded
//! (mask 0; the engine counts positions over real tokens only, so greedy output is the same alone or in a batch).
//! A row can join a batch that is already decoding, as long as it has never been used since the cache was made:
//! on that call every running row feeds `[pad, .., pad, next token]` next to the newcomer's padded prompt.
//! A finished or cancelled row is recycled at once (`KvCache::reset_row`): a newcomer takes the row (from its
//! slot 0: every row has its own cache slots) while the others keep decoding.
//! A group of rows can continue one prompt (`admit_group`: `n` sequences): the prompt is fed once, in the first
//! row, and its keys, values and last logits are copied to the others before each samples its own token. With
//! `prompt_logprobs`, that step also scores every prompt token (`take_prompt_logprobs`). Each row applies its
//! logit rules (`penalties`) before sampling and reports log-probabilities of the raw logits when asked.
//! Stops a row on the stop id (`### End`, kept as its last generated token) or on its token budget.
//! Does not tokenize or decode text; never mutates the model.

use crate::logprobs::{token_logprob, TokenLogprob};
use crate::penalties::{LogitRules, PenaltyState};
use crate::sampling::{sample, SamplingParams, Scratch};
use crate::{Error, Result};
use common::Rng;
use neox::host as pool;
use neox::{KvCache, Model};
use std::sync::Mutex;

/// Why a sequence ended (OpenAI's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The stop token was generated.
    Stop,
    /// The token budget was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Per-sequence generation settings.
#[derive(Clone, Debug)]
pub struct SeqParams {
    pub sampling: SamplingParams,
    /// At least 1.
    pub max_new_tokens: usize,
    pub rng: Rng,
    /// Penalties, `logit_bias`, `min_tokens` (`penalties`).
    pub rules: LogitRules,
    /// Some(k): each generated token comes with its log-probability and the k most likely alternatives.
    pub logprobs: Option<usize>,
}

impl SeqParams {
    /// Plain sampling: no logit rules, no log-probabilities.
    pub fn new(sampling: SamplingParams, max_new_tokens: usize, rng: Rng) -> Self {
        SeqParams { sampling, max_new_tokens, rng, rules: LogitRules::default(), logprobs: None }
    }
}

/// One generated token of one row.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub row: usize,
    pub token: u32,
    /// Set on the row's last token.
    pub finish: Option<FinishReason>,
    /// With `SeqParams::logprobs`: the token's log-probability and alternatives.
    pub logprob: Option<TokenLogprob>,
}

/// A sequence's state while it decodes.
#[derive(Clone, Debug)]
struct Seq {
    params: SeqParams,
    generated: usize,
    penalties: PenaltyState,
}

enum Row {
    /// Empty (never used, or recycled after its sequence ended): can take a new sequence.
    Free,
    /// Admitted; its prompt is fed on the next step (with its tokens' log-probabilities kept when
    /// `prompt_logprobs` is set).
    Pending { prompt: Vec<u32>, seq: Seq, prompt_logprobs: Option<usize> },
    /// Continues row `parent`'s prompt, fed on the next step: after it the parent's keys and values are copied
    /// here and this row samples its own continuation (`n` sequences with one prefill).
    Forked { parent: usize, seq: Seq },
    /// Decoding; `next` is sampled but not yet fed.
    Active { next: u32, seq: Seq },
}

impl Row {
    fn seq_mut(&mut self) -> Option<&mut Seq> {
        match self {
            Row::Pending { seq, .. } | Row::Forked { seq, .. } | Row::Active { seq, .. } => Some(seq),
            Row::Free => None,
        }
    }
}

/// One row's sampling job: the row, its logits, its scratch, the token chosen.
type Choice<'a> = Mutex<(&'a mut Row, &'a mut [f32], &'a mut Scratch, Option<(u32, Option<TokenLogprob>)>)>;

/// Prompt tokens whose log-probabilities are computed per head call (bounds the logits held at once).
const PROMPT_CHUNK: usize = 64;

/// A batch of sequences decoding together on one KV cache.
pub struct BatchDecoder<'m> {
    model: &'m Model,
    cache: KvCache,
    rows: Vec<Row>,
    logits: Vec<f32>,
    vocab_limit: usize,
    stop_id: Option<u32>,
    pad_id: u32,
    /// Sampling scratch per row.
    scratch: Vec<Scratch>,
    ids: Vec<u32>,
    mask: Vec<u8>,
    /// Prompt log-probabilities of the last step, per row (`take_prompt_logprobs`).
    prompt_lps: Vec<(usize, Vec<Option<TokenLogprob>>)>,
    chunk: Vec<f32>,
}

impl<'m> BatchDecoder<'m> {
    /// `batch` rows of `capacity` cache slots each (a sequence's prompt and generated tokens);
    /// only ids `< vocab_limit` are ever sampled; `stop_id` ends a row.
    pub fn new(model: &'m Model, batch: usize, capacity: usize, vocab_limit: usize, stop_id: Option<u32>) -> Self {
        let batch = batch.max(1);
        let v = model.config.vocab_size;
        BatchDecoder {
            model,
            cache: model.new_kv_cache(batch, capacity),
            rows: (0..batch).map(|_| Row::Free).collect(),
            logits: vec![0.0; batch * v],
            vocab_limit: vocab_limit.clamp(1, v),
            stop_id,
            pad_id: 0,
            scratch: (0..batch).map(|_| Scratch::default()).collect(),
            ids: Vec::new(),
            mask: Vec::new(),
            prompt_lps: Vec::new(),
            chunk: Vec::new(),
        }
    }

    pub fn batch(&self) -> usize {
        self.rows.len()
    }

    /// Fault in the KV cache's memory now (`KvCache::commit_memory`), before the first batch.
    pub fn commit_memory(&mut self) {
        self.cache.commit_memory();
    }

    /// Make every row free and the cache empty again, keeping the allocations (a new batch without
    /// re-zeroing hundreds of MB of KV cache).
    pub fn reset(&mut self) {
        self.cache.reset();
        self.rows.iter_mut().for_each(|r| *r = Row::Free);
    }

    /// Rows admitted and not finished.
    pub fn running(&self) -> usize {
        self.rows.iter().filter(|r| !matches!(r, Row::Free)).count()
    }

    /// A row that can take a new sequence.
    pub fn free_row(&self) -> Option<usize> {
        self.rows.iter().position(|r| matches!(r, Row::Free))
    }

    fn free_rows(&self) -> usize {
        self.rows.iter().filter(|r| matches!(r, Row::Free)).count()
    }

    /// Whether a sequence with this prompt length and budget fits now: a free row whose slots hold the prompt
    /// and every generated token but the last (which is never fed back).
    pub fn can_admit(&self, prompt_len: usize, max_new: usize) -> bool {
        self.can_admit_group(prompt_len, max_new, 1)
    }

    /// `can_admit` for `n` sequences continuing one prompt (`admit_group`).
    pub fn can_admit_group(&self, prompt_len: usize, max_new: usize, n: usize) -> bool {
        n >= 1 && self.free_rows() >= n && prompt_len + max_new.max(1) - 1 <= self.cache.capacity
    }

    /// Admit a sequence into a free row; its prompt is fed on the next `step`. Returns the row.
    pub fn admit(&mut self, prompt: Vec<u32>, params: SeqParams) -> Result<usize> {
        Ok(self.admit_group(prompt, vec![params], None)?[0])
    }

    /// Admit `seqs.len()` sequences continuing one prompt: the prompt is fed once (next `step`), then each row
    /// samples its own continuation. With `prompt_logprobs = Some(k)`, that step also computes every prompt
    /// token's log-probability given the tokens before it, with k alternatives (`take_prompt_logprobs`).
    /// Returns the rows, in the order of `seqs`.
    pub fn admit_group(
        &mut self,
        prompt: Vec<u32>,
        seqs: Vec<SeqParams>,
        prompt_logprobs: Option<usize>,
    ) -> Result<Vec<usize>> {
        let v = self.model.config.vocab_size;
        if prompt.is_empty() {
            return Err(Error("prompt has no tokens".into()));
        }
        if seqs.is_empty() {
            return Err(Error("no sequences to generate".into()));
        }
        if seqs.iter().any(|p| p.max_new_tokens == 0) {
            return Err(Error("max_new_tokens must be at least 1".into()));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= v) {
            return Err(Error(format!("prompt token id {bad} is outside the model's vocabulary (0..{v})")));
        }
        let max_new = seqs.iter().map(|p| p.max_new_tokens).max().unwrap_or(1);
        let max_pos = self.model.config.max_position_embeddings;
        if prompt.len() + max_new > max_pos + 1 {
            return Err(Error(format!(
                "prompt of {} tokens + {max_new} new tokens exceeds the model's context window of {max_pos}",
                prompt.len(),
            )));
        }
        if !self.can_admit_group(prompt.len(), max_new, seqs.len()) {
            return Err(Error(format!(
                "no room in the batch for {} sequence(s) of a prompt of {} tokens + {max_new} new tokens ({} free \
                 rows, {} cache slots per row)",
                seqs.len(),
                prompt.len(),
                self.free_rows(),
                self.cache.capacity
            )));
        }
        let mut rows = Vec::with_capacity(seqs.len());
        for params in seqs {
            let row = self.free_row().ok_or_else(|| Error("no free row".into()))?;
            let seq = Seq { penalties: PenaltyState::new(&params.rules, &prompt), params, generated: 0 };
            self.rows[row] = match rows.first() {
                None => Row::Pending { prompt: prompt.clone(), seq, prompt_logprobs },
                Some(&parent) => Row::Forked { parent, seq },
            };
            rows.push(row);
        }
        Ok(rows)
    }

    /// Stop a row now (client gone); it generates nothing more. Rows waiting to continue its prompt stop too.
    pub fn cancel(&mut self, row: usize) {
        let Some(r) = self.rows.get_mut(row) else { return };
        let was_pending = matches!(r, Row::Pending { .. });
        if !matches!(r, Row::Free) {
            *r = Row::Free;
            self.cache.reset_row(row);
        }
        if was_pending {
            for r in &mut self.rows {
                if matches!(r, Row::Forked { parent, .. } if *parent == row) {
                    *r = Row::Free;
                }
            }
        }
    }

    /// Prompt log-probabilities computed by the last `step`: (row, one entry per prompt token; the first is None,
    /// having no context).
    pub fn take_prompt_logprobs(&mut self) -> Vec<(usize, Vec<Option<TokenLogprob>>)> {
        std::mem::take(&mut self.prompt_lps)
    }

    /// One forward call: feed pending prompts and each running row's last token, sample the next token of every
    /// running row. Returns one event per running row (in row order); empty when nothing is running.
    pub fn step(&mut self) -> Result<Vec<TokenEvent>> {
        if self.running() == 0 {
            return Ok(Vec::new());
        }
        let (b, v) = (self.rows.len(), self.model.config.vocab_size);
        let tn = self.rows.iter().map(|r| if let Row::Pending { prompt, .. } = r { prompt.len() } else { 1 }).max();
        let tn = tn.unwrap_or(1);
        // (B, Tn) ids and mask, left padding
        self.ids.clear();
        self.mask.clear();
        let mut keep = Vec::new();
        for (row, r) in self.rows.iter().enumerate() {
            let real: &[u32] = match r {
                Row::Pending { prompt, prompt_logprobs, .. } => {
                    if prompt_logprobs.is_some() {
                        keep.push(row as u32);
                    }
                    prompt
                }
                Row::Active { next, .. } => std::slice::from_ref(next),
                _ => &[],
            };
            let pad = tn - real.len();
            self.ids.extend(std::iter::repeat_n(self.pad_id, pad).chain(real.iter().copied()));
            self.mask.extend(std::iter::repeat_n(0u8, pad).chain(std::iter::repeat_n(1u8, real.len())));
        }
        // (B, Tn) -> logits (B, V) of each row's last fed position
        self.model.forward_cached_keep(&self.ids, &self.mask, &mut self.cache, &mut self.logits, &keep)?;
        if !keep.is_empty() {
            self.prompt_logprobs()?;
        }
        // forked rows continue their parent's prompt: its keys, values and last logits
        for row in 0..b {
            if let Row::Forked { parent, .. } = self.rows[row] {
                self.cache.copy_row(self.model.backend(), parent, row);
                self.logits.copy_within(parent * v..(parent + 1) * v, row * v);
            }
        }
        let choices = self.choose();
        let mut events = Vec::with_capacity(b);
        for ((row, r), choice) in self.rows.iter_mut().enumerate().zip(choices) {
            let (Some(seq), Some((token, logprob))) = (r.seq_mut(), choice) else { continue };
            seq.generated += 1;
            seq.penalties.push(token);
            let finish = if Some(token) == self.stop_id {
                Some(FinishReason::Stop)
            } else if seq.generated >= seq.params.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            events.push(TokenEvent { row, token, finish, logprob });
            let old = std::mem::replace(r, Row::Free);
            match (finish, old) {
                (Some(_), _) => self.cache.reset_row(row),
                (None, Row::Pending { seq, .. } | Row::Forked { seq, .. } | Row::Active { seq, .. }) => {
                    *r = Row::Active { next: token, seq }
                }
                (None, Row::Free) => {}
            }
        }
        Ok(events)
    }

    /// Log-probabilities of the prompt tokens of the rows kept by the last forward (row order, then position).
    fn prompt_logprobs(&mut self) -> Result<()> {
        let v = self.model.config.vocab_size;
        let kept = self.cache.kept().to_vec();
        let mut out: Vec<(usize, Vec<Option<TokenLogprob>>)> = Vec::new();
        let mut start = 0;
        while start < kept.len() {
            let n = PROMPT_CHUNK.min(kept.len() - start);
            self.model.kept_logits(&mut self.cache, start, n, &mut self.chunk)?;
            for (k, &(row, slot)) in kept[start..start + n].iter().enumerate() {
                let row = row as usize;
                let Row::Pending { prompt, prompt_logprobs: Some(top), .. } = &self.rows[row] else { continue };
                if out.last().is_none_or(|o| o.0 != row) {
                    out.push((row, vec![None]));
                }
                // the logits at slot s score prompt token s + 1
                if let Some(&next) = prompt.get(slot as usize + 1) {
                    let l = &self.chunk[k * v..(k + 1) * v];
                    let lp = token_logprob(l, self.vocab_limit, next, *top);
                    if let Some(o) = out.last_mut() {
                        o.1.push(Some(lp));
                    }
                }
            }
            start += n;
        }
        self.prompt_lps = out;
        Ok(())
    }

    /// The next token of each running row (None for free rows), from the logits of the last step, with its
    /// log-probability when asked. Rows are spread over the decode threads: sampling one is a few passes over the
    /// vocabulary (timings: docs/benchmarks.md#decode-path-tuning), and a batch of 8 sampled one after another left
    /// the other core idle meanwhile.
    fn choose(&mut self) -> Vec<Option<(u32, Option<TokenLogprob>)>> {
        let v = self.model.config.vocab_size;
        let (limit, stop_id) = (self.vocab_limit, self.stop_id);
        let jobs: Vec<Choice<'_>> = self
            .rows
            .iter_mut()
            .zip(self.logits.chunks_mut(v))
            .zip(&mut self.scratch)
            .map(|((r, l), s)| Mutex::new((r, l, s, None)))
            .collect();
        pool::for_each(jobs.len(), |row| {
            let mut job = jobs[row].lock().unwrap_or_else(|e| e.into_inner());
            let (r, logits, scratch, out) = &mut *job;
            let Some(seq) = r.seq_mut() else { return };
            let rules_off = seq.params.rules.is_off_at(seq.generated);
            // log-probabilities come from the raw logits: keep them before the rules change the row
            let raw = match (seq.params.logprobs, rules_off) {
                (Some(_), false) => Some(logits.to_vec()),
                _ => None,
            };
            if !rules_off {
                seq.penalties.apply(&seq.params.rules, seq.generated, stop_id, &mut logits[..limit]);
            }
            let token = sample(logits, limit, &seq.params.sampling, &mut seq.params.rng, scratch);
            let lp = seq.params.logprobs.map(|k| token_logprob(raw.as_deref().unwrap_or(logits), limit, token, k));
            *out = Some((token, lp));
        });
        jobs.into_iter().map(|j| j.into_inner().unwrap_or_else(|e| e.into_inner()).3).collect()
    }
}

/// A finished sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenOutput {
    /// Generated ids, including the stop token when it ended the sequence.
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// Generate every sequence to completion in one batch (left padding); `on_token(i, event)` sees each token as it
/// is produced (`i` = index into `seqs`). Outputs are in input order.
pub fn generate(
    model: &Model,
    seqs: Vec<(Vec<u32>, SeqParams)>,
    vocab_limit: usize,
    stop_id: Option<u32>,
    mut on_token: impl FnMut(usize, &TokenEvent),
) -> Result<Vec<GenOutput>> {
    let n = seqs.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let tn = seqs.iter().map(|s| s.0.len()).max().unwrap_or(1);
    let rem = seqs.iter().map(|s| s.1.max_new_tokens).max().unwrap_or(1);
    let mut dec = BatchDecoder::new(model, n, tn + rem, vocab_limit, stop_id);
    let mut outs: Vec<Option<GenOutput>> = vec![None; n];
    let mut toks: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut row_of = Vec::with_capacity(n);
    for (prompt, params) in seqs {
        row_of.push(dec.admit(prompt, params)?);
    }
    let seq_of: Vec<usize> = {
        let mut v = vec![0; n];
        for (i, &r) in row_of.iter().enumerate() {
            v[r] = i;
        }
        v
    };
    while dec.running() > 0 {
        for e in dec.step()? {
            let i = seq_of[e.row];
            toks[i].push(e.token);
            on_token(i, &e);
            if let Some(f) = e.finish {
                outs[i] = Some(GenOutput { tokens: std::mem::take(&mut toks[i]), finish: f });
            }
        }
    }
    outs.into_iter().enumerate().map(|(i, o)| o.ok_or_else(|| Error(format!("sequence {i} did not finish")))).collect()
}
