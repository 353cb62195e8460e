//! Batched generation on the engine's KV cache (letters: B batch rows, Tn tokens fed per call, V vocab).
//! Each row is one sequence with its own sampling parameters, RNG and token budget. Prompts are left-padded
//! (mask 0; the engine counts positions over real tokens only, so greedy output is the same alone or in a batch).
//! A row can join a batch that is already decoding, as long as it has never been used since the cache was made:
//! on that call every running row feeds `[pad, .., pad, next token]` next to the newcomer's padded prompt.
//! A finished or cancelled row is recycled at once (`KvCache::reset_row`): a newcomer takes the row (from its
//! slot 0: every row has its own cache slots) while the others keep decoding.
//! Stops a row on the stop id (`### End`, kept as its last generated token) or on its token budget.
//! Does not tokenize or decode text; never mutates the model.

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
}

/// One generated token of one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenEvent {
    pub row: usize,
    pub token: u32,
    /// Set on the row's last token.
    pub finish: Option<FinishReason>,
}

enum Row {
    /// Empty (never used, or recycled after its sequence ended): can take a new sequence.
    Free,
    /// Admitted; its prompt is fed on the next step.
    Pending { prompt: Vec<u32>, params: SeqParams, generated: usize },
    /// Decoding; `next` is sampled but not yet fed.
    Active { next: u32, params: SeqParams, generated: usize },
}

/// One row's sampling job: the row, its scratch, the token chosen.
type Choice<'a> = Mutex<(&'a mut Row, &'a mut Scratch, Option<u32>)>;

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
        self.rows.iter().filter(|r| matches!(r, Row::Pending { .. } | Row::Active { .. })).count()
    }

    /// A row that can take a new sequence.
    pub fn free_row(&self) -> Option<usize> {
        self.rows.iter().position(|r| matches!(r, Row::Free))
    }

    /// Whether a sequence with this prompt length and budget fits now: a free row whose slots hold the prompt
    /// and every generated token but the last (which is never fed back).
    pub fn can_admit(&self, prompt_len: usize, max_new: usize) -> bool {
        self.free_row().is_some() && prompt_len + max_new.max(1) - 1 <= self.cache.capacity
    }

    /// Admit a sequence into a free row; its prompt is fed on the next `step`. Returns the row.
    pub fn admit(&mut self, prompt: Vec<u32>, params: SeqParams) -> Result<usize> {
        let v = self.model.config.vocab_size;
        if prompt.is_empty() {
            return Err(Error("prompt has no tokens".into()));
        }
        if params.max_new_tokens == 0 {
            return Err(Error("max_new_tokens must be at least 1".into()));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= v) {
            return Err(Error(format!("prompt token id {bad} is outside the model's vocabulary (0..{v})")));
        }
        let max_pos = self.model.config.max_position_embeddings;
        if prompt.len() + params.max_new_tokens > max_pos + 1 {
            return Err(Error(format!(
                "prompt of {} tokens + {} new tokens exceeds the model's context window of {max_pos}",
                prompt.len(),
                params.max_new_tokens
            )));
        }
        if !self.can_admit(prompt.len(), params.max_new_tokens) {
            return Err(Error(format!(
                "no room in the batch for a prompt of {} tokens + {} new tokens ({} free rows, {} cache slots per row)",
                prompt.len(),
                params.max_new_tokens,
                self.rows.iter().filter(|r| matches!(r, Row::Free)).count(),
                self.cache.capacity
            )));
        }
        let row = self.free_row().ok_or_else(|| Error("no free row".into()))?;
        self.rows[row] = Row::Pending { prompt, params, generated: 0 };
        Ok(row)
    }

    /// Stop a row now (client gone); it generates nothing more.
    pub fn cancel(&mut self, row: usize) {
        if let Some(r) = self.rows.get_mut(row) {
            if matches!(r, Row::Pending { .. } | Row::Active { .. }) {
                *r = Row::Free;
                self.cache.reset_row(row);
            }
        }
    }

    /// One forward call: feed pending prompts and each running row's last token, sample the next token of every
    /// running row. Returns one event per running row (in row order); empty when nothing is running.
    pub fn step(&mut self) -> Result<Vec<TokenEvent>> {
        if self.running() == 0 {
            return Ok(Vec::new());
        }
        let b = self.rows.len();
        let tn = self.rows.iter().map(|r| if let Row::Pending { prompt, .. } = r { prompt.len() } else { 1 }).max();
        let tn = tn.unwrap_or(1);
        // (B, Tn) ids and mask, left padding
        self.ids.clear();
        self.mask.clear();
        for r in &self.rows {
            let real: &[u32] = match r {
                Row::Pending { prompt, .. } => prompt,
                Row::Active { next, .. } => std::slice::from_ref(next),
                _ => &[],
            };
            let pad = tn - real.len();
            self.ids.extend(std::iter::repeat_n(self.pad_id, pad).chain(real.iter().copied()));
            self.mask.extend(std::iter::repeat_n(0u8, pad).chain(std::iter::repeat_n(1u8, real.len())));
        }
        // (B, Tn) -> logits (B, V) of each row's last fed position
        self.model.forward_cached(&self.ids, &self.mask, &mut self.cache, &mut self.logits)?;
        let tokens = self.choose();
        let mut events = Vec::with_capacity(b);
        for ((row, r), token) in self.rows.iter_mut().enumerate().zip(tokens) {
            let (params, generated, token) = match (&mut *r, token) {
                (Row::Pending { params, generated, .. } | Row::Active { params, generated, .. }, Some(t)) => {
                    (params, generated, t)
                }
                _ => continue,
            };
            *generated += 1;
            let finish = if Some(token) == self.stop_id {
                Some(FinishReason::Stop)
            } else if *generated >= params.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            events.push(TokenEvent { row, token, finish });
            let next = match finish {
                Some(_) => {
                    self.cache.reset_row(row);
                    Row::Free
                }
                None => Row::Active { next: token, params: params.clone(), generated: *generated },
            };
            *r = next;
        }
        Ok(events)
    }

    /// The next token of each running row (None for free rows), from the logits of the last step. Rows are spread
    /// over the decode threads: sampling one is a few passes over the vocabulary (timings:
    /// docs/benchmarks.md#decode-path-tuning), and a batch of 8 sampled one after another left the other core
    /// idle meanwhile.
    fn choose(&mut self) -> Vec<Option<u32>> {
        let v = self.model.config.vocab_size;
        let (logits, limit) = (&self.logits, self.vocab_limit);
        let jobs: Vec<Choice<'_>> =
            self.rows.iter_mut().zip(&mut self.scratch).map(|(r, s)| Mutex::new((r, s, None))).collect();
        pool::for_each(jobs.len(), |row| {
            let mut job = jobs[row].lock().unwrap_or_else(|e| e.into_inner());
            let (r, scratch, token) = &mut *job;
            if let Row::Pending { params, .. } | Row::Active { params, .. } = r {
                let l = &logits[row * v..(row + 1) * v];
                *token = Some(sample(l, limit, &params.sampling, &mut params.rng, scratch));
            }
        });
        jobs.into_iter().map(|j| j.into_inner().unwrap_or_else(|e| e.into_inner()).2).collect()
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
