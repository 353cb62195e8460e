//! Inference forward with a KV cache, batched: feed (B, Tn) new tokens per call (a left-padded prompt, then one
//! token at a time) and get the last position's logits per row. Only real (mask 1) tokens are computed and
//! stored: each row has its own slots, filled in order, so a row's slot index is its token's position (0 for the
//! first real token whatever its left padding, as HF's `generate` counts with an attention mask) and attention
//! reads exactly the row's own tokens, with no padding or other rows' prompts in between. The layers are the
//! training block (`block.rs`) with attention against the cache. The model is not mutated; all per-request state
//! is in `KvCache`.

use crate::backend::cpu::Cpu;
use crate::backend::{Backend, KvShape, Pass};
use crate::block::{Attend, LayerActs, Step};
use crate::error::{Error, Result};
use crate::model::Model;

/// Per-sequence keys and values of every layer: row b holds its `real[b]` tokens in slots 0..real[b].
pub struct KvCache<B: Backend = Cpu> {
    pub batch: usize,
    /// Slots per row: the most tokens (prompt + generated) one sequence can hold.
    pub capacity: usize,
    kv: B::Kv,
    real: Vec<u32>, // (B) tokens stored per row = next slot = next position
    // scratch for one call, grown on demand
    x: B::Buf,
    x_next: B::Buf,
    acts: LayerActs<B>,
    act: B::Buf,
    cos: B::Buf,
    sin: B::Buf,
    pos: Vec<u32>,
    /// The new real tokens of this call: ids, and (batch row, slot) of each.
    ids: Vec<u32>,
    at: Vec<(u32, u32)>,
    last: Vec<u32>,
    last_x: B::Buf,
    ln: B::Buf,
    stats: B::Buf,
    head: B::Buf,
    /// Final hidden states (before the last LayerNorm) of the tokens fed in the rows `forward_cached_keep` was
    /// asked to keep, in feeding order, and their (row, slot).
    kept: B::Buf,
    kept_at: Vec<(u32, u32)>,
}

impl<B: Backend> KvCache<B> {
    /// Number of real (non-padding) tokens stored for row `b`.
    pub fn real_len(&self, b: usize) -> usize {
        self.real[b] as usize
    }

    /// Slots row `b` has left.
    pub fn free_slots(&self, b: usize) -> usize {
        self.capacity - self.real[b] as usize
    }

    /// Free row `b` for a new sequence: it starts again at slot (and position) 0.
    pub fn reset_row(&mut self, b: usize) {
        if b < self.batch {
            self.real[b] = 0;
        }
    }

    /// Row `dst` continues row `src`'s sequence: its keys, values and length become row `src`'s (`n` sampled
    /// sequences share one prompt's prefill).
    pub fn copy_row(&mut self, be: &B, src: usize, dst: usize) {
        if src < self.batch && dst < self.batch && src != dst {
            be.kv_copy_row(&mut self.kv, src, dst, self.real[src] as usize);
            self.real[dst] = self.real[src];
        }
    }

    /// (row, slot) of each token kept by the last `forward_cached_keep`.
    pub fn kept(&self) -> &[(u32, u32)] {
        &self.kept_at
    }

    /// Forget everything (reuse the allocation for a new batch).
    pub fn reset(&mut self) {
        self.real.fill(0);
    }

    /// Bytes per cached key or value element (2 in bf16, 4 in f32).
    pub fn element_bytes(&self) -> usize {
        B::kv_bytes(&self.kv)
    }
}

impl KvCache<Cpu> {
    /// Touch every page of the keys and values now. The cache is allocated zeroed and the OS maps its pages on
    /// first write, so otherwise the first batch to reach each row pays the page faults (a server's first burst
    /// ran markedly slower, docs/benchmarks.md#decode-path-tuning). A server calls this at start:
    /// the memory is committed before any request, and a machine without room for it fails there, not mid-request.
    pub fn commit_memory(&mut self) {
        self.kv.commit()
    }
}

impl<B: Backend> Model<B> {
    /// A cache for `batch` sequences of up to `capacity` tokens each; bf16 when the model decodes in bf16
    /// (`set_decode_bf16` before this call).
    pub fn new_kv_cache(&self, batch: usize, capacity: usize) -> KvCache<B> {
        let c = &self.config;
        let be = &self.be;
        let slots = capacity.next_multiple_of(be.kv_block());
        let shape = KvShape { layers: c.num_hidden_layers, batch, slots, h: c.num_attention_heads, d: c.head_dim() };
        KvCache {
            batch,
            capacity,
            kv: be.kv_new(shape),
            real: vec![0; batch],
            x: be.zeros(0),
            x_next: be.zeros(0),
            acts: LayerActs::new(be, c, 0, 0),
            act: be.zeros(0),
            cos: be.zeros(0),
            sin: be.zeros(0),
            pos: Vec::new(),
            ids: Vec::new(),
            at: Vec::new(),
            last: Vec::new(),
            last_x: be.zeros(0),
            ln: be.zeros(0),
            stats: be.zeros(0),
            head: be.zeros(0),
            kept: be.zeros(0),
            kept_at: Vec::new(),
        }
    }

    /// Feed `ids` (B, Tn) with `mask` (B, Tn; 0 = padding) into the cache and write the logits of the last fed
    /// position of each row into `logits` (B, V).
    pub fn forward_cached(&self, ids: &[u32], mask: &[u8], cache: &mut KvCache<B>, logits: &mut B::Buf) -> Result<()> {
        self.forward_cached_keep(ids, mask, cache, logits, &[])
    }

    /// `forward_cached` that also keeps the final hidden state of every token fed in the batch rows `keep`, for
    /// `kept_logits` (log-probabilities of a prompt's own tokens, what `echo` with `logprobs` returns).
    pub fn forward_cached_keep(
        &self,
        ids: &[u32],
        mask: &[u8],
        cache: &mut KvCache<B>,
        logits: &mut B::Buf,
        keep: &[u32],
    ) -> Result<()> {
        let cfg = &self.config;
        let (bsz, c, v) = (cache.batch, cfg.hidden_size, cfg.vocab_size);
        if ids.is_empty() || !ids.len().is_multiple_of(bsz) || mask.len() != ids.len() {
            return Err(Error::invalid(format!(
                "forward_cached: {} ids / {} mask entries for batch {bsz}",
                ids.len(),
                mask.len()
            )));
        }
        let tn = ids.len() / bsz;
        for b in 0..bsz {
            let new = mask[b * tn..(b + 1) * tn].iter().filter(|&&m| m != 0).count();
            if cache.real[b] as usize + new > cache.capacity {
                return Err(Error::invalid(format!(
                    "KV cache full: row {b} holds {} tokens, {new} more exceed its capacity {}",
                    cache.real[b], cache.capacity
                )));
            }
            let reach = cache.real[b] as usize + new;
            if new > 0 && reach > cfg.max_position_embeddings {
                return Err(Error::invalid(format!(
                    "sequence reaches position {}, beyond max_position_embeddings {}",
                    reach - 1,
                    cfg.max_position_embeddings
                )));
            }
        }
        if let Some(&bad) = ids.iter().find(|&&x| x as usize >= v) {
            return Err(Error::invalid(format!("token id {bad} is outside the vocabulary (0..{v})")));
        }
        if B::len(logits) < bsz * v {
            return Err(Error::invalid("logits buffer too small"));
        }
        let (be, s) = (&self.be, cache);
        // Only real tokens are computed and stored: padding (left padding of a prompt, rows idle this step) costs
        // nothing. A real token's slot in its row is its position.
        s.ids.clear();
        s.at.clear();
        s.last.clear();
        for b in 0..bsz {
            for i in 0..tn {
                if mask[b * tn + i] != 0 {
                    if i == tn - 1 {
                        s.last.push(s.at.len() as u32);
                    }
                    s.ids.push(ids[b * tn + i]);
                    s.at.push((b as u32, s.real[b]));
                    s.real[b] += 1;
                }
            }
        }
        let n = s.at.len();
        s.pos.clear();
        s.pos.extend(s.at.iter().map(|&(_, slot)| slot));
        for buf in [&mut s.x, &mut s.x_next] {
            be.grow(buf, n * c);
        }
        s.acts.grow(be, cfg, n);
        be.grow(&mut s.act, n * cfg.intermediate_size);
        let half = cfg.rotary_ndims() / 2;
        be.grow(&mut s.cos, n * half);
        be.grow(&mut s.sin, n * half);
        be.rope_table(&mut s.cos, &mut s.sin, &s.pos, self.heads());
        be.embed(&mut s.x, &s.ids, self.embedding());
        let block = self.block();
        for (l, p) in self.layers.iter().enumerate() {
            let attend = Attend::Cache { kv: &mut s.kv, at: &s.at };
            let step = Step { n, act: &mut s.act, rope: (&s.cos, &s.sin), attend };
            block.forward(l, p, (&s.x, &mut s.x_next), &mut s.acts, step);
            std::mem::swap(&mut s.x, &mut s.x_next);
        }
        s.kept_at.clear();
        if !keep.is_empty() {
            let rows: Vec<u32> = (0..n as u32).filter(|&k| keep.contains(&s.at[k as usize].0)).collect();
            s.kept_at.extend(rows.iter().map(|&k| s.at[k as usize]));
            be.grow(&mut s.kept, rows.len() * c);
            be.gather_rows(&mut s.kept, &s.x, &rows, c);
        }
        // final LayerNorm and head on the last new position of each row that has one: (B',C) -> (B',V)
        let nl = s.last.len();
        be.grow(&mut s.last_x, nl * c);
        be.grow(&mut s.ln, nl * c);
        be.grow(&mut s.stats, 2 * nl);
        be.gather_rows(&mut s.last_x, &s.x, &s.last, c);
        be.layernorm(&mut s.ln, &mut s.stats, &s.last_x, self.final_norm(), nl);
        if nl == bsz {
            be.linear(logits, &s.ln, self.head(), nl, false, Pass::Decode);
        } else {
            // rows without a real last token this call keep their previous logits
            be.grow(&mut s.head, nl * v);
            be.linear(&mut s.head, &s.ln, self.head(), nl, false, Pass::Decode);
            let rows: Vec<u32> = s.last.iter().map(|&k| s.at[k as usize].0).collect();
            be.scatter_rows(logits, &s.head, &rows, v);
        }
        Ok(())
    }

    /// Logits (n, V) into `out` of the kept tokens `start..start + n` of the last `forward_cached_keep` (in chunks,
    /// so a long prompt never holds all its T x V logits at once).
    pub fn kept_logits(&self, cache: &mut KvCache<B>, start: usize, n: usize, out: &mut B::Buf) -> Result<()> {
        let (c, v) = (self.config.hidden_size, self.config.vocab_size);
        if start + n > cache.kept_at.len() || n == 0 {
            return Err(Error::invalid(format!(
                "kept_logits: tokens {start}..{} of {} kept",
                start + n,
                cache.kept_at.len()
            )));
        }
        let (be, s) = (&self.be, cache);
        be.grow(&mut s.last_x, n * c);
        be.grow(&mut s.ln, n * c);
        be.grow(&mut s.stats, 2 * n);
        be.grow(out, n * v);
        let rows: Vec<u32> = (start as u32..(start + n) as u32).collect();
        be.gather_rows(&mut s.last_x, &s.kept, &rows, c);
        be.layernorm(&mut s.ln, &mut s.stats, &s.last_x, self.final_norm(), n);
        be.linear(out, &s.ln, self.head(), n, false, Pass::Decode);
        Ok(())
    }
}
