//! Inference forward with a KV cache, batched: feed (B, Tn) new tokens per call (a left-padded prompt, then one
//! token at a time) and get the last position's logits per row. Only real (mask 1) tokens are computed and
//! stored: each row has its own slots, filled in order, so a row's slot index is its token's position (0 for the
//! first real token whatever its left padding, as HF's `generate` counts with an attention mask) and attention
//! reads exactly the row's own tokens, with no padding or other rows' prompts in between. The model is not
//! mutated; all per-request state is in `KvCache`.

use crate::error::{Error, Result};
use crate::kernels::cached::{block_scores, prefetch_start, weighted_values, KB};
use crate::kernels::layernorm::layernorm_fwd;
use crate::kernels::math::{self, gelu_fwd, Weight};
use crate::kernels::matmul::linear_fwd_t;
use crate::kernels::panels::linear_panels;
use crate::kernels::pool;
use crate::kernels::rotary::{rope_apply, rope_table};
use crate::kernels::rows::{linear_rows, FEW_ROWS};
use crate::kernels::SendPtr;
use crate::model::Model;
use std::cell::RefCell;

/// Keys (L, B, H, S/KB, D, KB): transposed in blocks of `KB` slots, so a query's scores over a block are a
/// vector loop over registers and a row's keys are read front to back (one D x `cap` transpose read 64 short
/// runs `cap` apart per head, which hardware prefetch could not follow). Values (L, B, H, S, D). S = `stride`.
/// bf16 (bits in `u16`) halves the cache's memory traffic when decoding in bf16.
enum Kv {
    F32 { k: Vec<f32>, v: Vec<f32> },
    Bf16 { k: Vec<u16>, v: Vec<u16> },
}

/// Per-sequence keys and values of every layer: row b holds its `real[b]` tokens in slots 0..real[b].
pub struct KvCache {
    pub batch: usize,
    /// Slots per row: the most tokens (prompt + generated) one sequence can hold.
    pub capacity: usize,
    /// Slots allocated per row: `capacity` rounded up to whole key blocks.
    stride: usize,
    /// Keys and values, f32 or bf16 (a cache made while the model decodes in bf16).
    kv: Kv,
    real: Vec<u32>, // (B) tokens stored per row = next slot = next position
    // scratch for one call, sized on demand
    x: Vec<f32>,
    ln: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    y: Vec<f32>,
    mid: Vec<f32>,
    fc: Vec<f32>,
    fc2: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    pos: Vec<u32>,
    /// Compute rows of the current call: (batch row, time index) of every real (mask 1) new token.
    rows: Vec<(u32, u32)>,
    last: Vec<f32>,
    head: Vec<f32>,
}

impl KvCache {
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

    /// Forget everything (reuse the allocation for a new batch).
    pub fn reset(&mut self) {
        self.real.fill(0);
    }

    /// Touch every page of the keys and values now. The cache is allocated zeroed and the OS maps its pages on
    /// first write, so otherwise the first batch to reach each row pays the page faults (at pythia-70m, 8 rows in
    /// bf16: the first 8-request burst after start ran at 840 tok/s instead of 1250). A server calls this at start:
    /// the memory is committed before any request, and a machine without room for it fails there, not mid-request.
    pub fn commit_memory(&mut self) {
        fn touch<T: Copy + Default>(x: &mut [T]) {
            let step = (4096 / size_of::<T>()).max(1);
            for i in (0..x.len()).step_by(step) {
                // SAFETY: i < x.len(); a volatile write so the store (which faults the page in) is kept.
                unsafe { std::ptr::write_volatile(x.as_mut_ptr().add(i), T::default()) }
            }
        }
        match &mut self.kv {
            Kv::F32 { k, v } => {
                touch(k);
                touch(v);
            }
            Kv::Bf16 { k, v } => {
                touch(k);
                touch(v);
            }
        }
    }
}

impl Model {
    /// A cache for `batch` sequences of up to `capacity` tokens each; bf16 when the model decodes in bf16
    /// (`set_decode_bf16` before this call).
    pub fn new_kv_cache(&self, batch: usize, capacity: usize) -> KvCache {
        let c = &self.config;
        let stride = capacity.next_multiple_of(KB);
        let per = c.num_hidden_layers * batch * c.hidden_size * stride;
        let kv = if self.decode_bf16() {
            Kv::Bf16 { k: vec![0; per], v: vec![0; per] }
        } else {
            Kv::F32 { k: vec![0.0; per], v: vec![0.0; per] }
        };
        KvCache {
            batch,
            capacity,
            stride,
            kv,
            real: vec![0; batch],
            x: Vec::new(),
            ln: Vec::new(),
            mean: Vec::new(),
            rstd: Vec::new(),
            qkv: Vec::new(),
            y: Vec::new(),
            mid: Vec::new(),
            fc: Vec::new(),
            fc2: Vec::new(),
            cos: Vec::new(),
            sin: Vec::new(),
            pos: Vec::new(),
            rows: Vec::new(),
            last: Vec::new(),
            head: Vec::new(),
        }
    }

    /// Feed `ids` (B, Tn) with `mask` (B, Tn; 0 = padding) into the cache and write the logits of the last fed
    /// position of each row into `logits` (B, V).
    pub fn forward_cached(&self, ids: &[u32], mask: &[u8], cache: &mut KvCache, logits: &mut [f32]) -> Result<()> {
        let cfg = &self.config;
        let (bsz, c, f, v) = (cache.batch, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (h, d, r) = (cfg.num_attention_heads, cfg.head_dim(), cfg.rotary_ndims());
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
        }
        if let Some(&bad) = ids.iter().find(|&&x| x as usize >= v) {
            return Err(Error::invalid(format!("token id {bad} is outside the vocabulary (0..{v})")));
        }
        if logits.len() < bsz * v {
            return Err(Error::invalid("logits buffer too small"));
        }
        let s = cache;
        // Only real tokens are computed and stored: padding (left padding of a prompt, rows idle this step) costs
        // nothing. A real token's slot in its row is its position.
        s.rows.clear();
        s.pos.clear();
        for b in 0..bsz {
            for i in 0..tn {
                if mask[b * tn + i] != 0 {
                    s.rows.push((b as u32, i as u32));
                    s.pos.push(s.real[b]);
                    s.real[b] += 1;
                }
            }
        }
        let n = s.rows.len();
        for buf in [&mut s.x, &mut s.ln, &mut s.y, &mut s.mid] {
            buf.resize(n * c, 0.0);
        }
        s.mean.resize(n.max(bsz), 0.0);
        s.rstd.resize(n.max(bsz), 0.0);
        s.qkv.resize(n * 3 * c, 0.0);
        s.fc.resize(n * f, 0.0);
        s.fc2.resize(n * f, 0.0);
        s.cos.resize(n * r / 2, 0.0);
        s.sin.resize(n * r / 2, 0.0);
        if let Some(&p) = s.pos.iter().max() {
            if p as usize >= cfg.max_position_embeddings {
                return Err(Error::invalid(format!(
                    "sequence reaches position {p}, beyond max_position_embeddings {}",
                    cfg.max_position_embeddings
                )));
            }
        }
        rope_table(&mut s.cos, &mut s.sin, &s.pos, r, cfg.rotary_emb_base);
        let emb = &self.params()[self.layout.embed_in..self.layout.embed_in + v * c];
        for (row, &(b, i)) in s.x.chunks_mut(c).zip(&s.rows) {
            let id = ids[b as usize * tn + i as usize] as usize;
            row.copy_from_slice(&emb[id * c..(id + 1) * c]);
        }
        let eps = cfg.layer_norm_eps as f32;
        let p = |off: usize, len: usize| &self.params()[off..off + len];
        // Linear (IC -> OC) with the weight at `w`: few rows read W once (memory-bound decode); many rows go
        // to gemm on the transposed copy.
        let lin = |out: &mut [f32], inp: &[f32], w: usize, b: Option<usize>, rows: usize, ic: usize, oc: usize, acc| {
            let bias = b.map(|b| p(b, oc));
            if rows <= FEW_ROWS {
                match self.bf16_weights() {
                    Some(b) => linear_panels(out, inp, b.matrix(w), bias, rows, ic, oc, acc),
                    None => linear_rows(out, inp, p(w, oc * ic), bias, rows, ic, oc, acc),
                }
            } else {
                linear_fwd_t(out, inp, self.t(w, oc * ic), bias, rows, ic, oc, acc)
            }
        };
        for l in 0..cfg.num_hidden_layers {
            let o = self.layout.layers[l];
            layernorm_fwd(&mut s.ln, &mut s.mean, &mut s.rstd, &s.x, p(o.ln1_w, c), p(o.ln1_b, c), n, c, eps);
            lin(&mut s.qkv, &s.ln, o.qkv_w, Some(o.qkv_b), n, c, 3 * c, false);
            rope_apply(&mut s.qkv, &s.cos, &s.sin, n, h, d, r, false);
            // append k, v of the new tokens: keys (L, B, H, S/KB, D, KB), values (L, B, H, S, D)
            let (lbase, stride) = (l * bsz * h * s.stride * d, s.stride);
            for (k, &(b, _)) in s.rows.iter().enumerate() {
                let src = &s.qkv[k * 3 * c..(k + 1) * 3 * c];
                let slot = s.pos[k] as usize;
                for hh in 0..h {
                    let head = lbase + (b as usize * h + hh) * stride * d;
                    let (ks, vs) =
                        (&src[hh * 3 * d + d..hh * 3 * d + 2 * d], &src[hh * 3 * d + 2 * d..hh * 3 * d + 3 * d]);
                    let dst = head + slot * d;
                    let kslot = head + slot / KB * d * KB + slot % KB;
                    match &mut s.kv {
                        Kv::F32 { k, v } => {
                            for (dd, &x) in ks.iter().enumerate() {
                                k[kslot + dd * KB] = x;
                            }
                            v[dst..dst + d].copy_from_slice(vs);
                        }
                        Kv::Bf16 { k, v } => {
                            let bits = |x: f32| half::bf16::from_f32(x).to_bits();
                            for (dd, &x) in ks.iter().enumerate() {
                                k[kslot + dd * KB] = bits(x);
                            }
                            v[dst..dst + d].iter_mut().zip(vs).for_each(|(o, &x)| *o = bits(x));
                        }
                    }
                }
            }
            cached_attention(s, l, h, d);
            lin(&mut s.mid, &s.y, o.dense_w, Some(o.dense_b), n, c, c, false);
            if cfg.use_parallel_residual {
                // x += attn(ln1(x)) + mlp(ln2(x))
                layernorm_fwd(&mut s.ln, &mut s.mean, &mut s.rstd, &s.x, p(o.ln2_w, c), p(o.ln2_b, c), n, c, eps);
                s.x.iter_mut().zip(&s.mid).for_each(|(x, a)| *x += a);
            } else {
                // x = x + attn(ln1(x)); x += mlp(ln2(x))
                s.x.iter_mut().zip(&s.mid).for_each(|(x, a)| *x += a);
                layernorm_fwd(&mut s.ln, &mut s.mean, &mut s.rstd, &s.x, p(o.ln2_w, c), p(o.ln2_b, c), n, c, eps);
            }
            lin(&mut s.fc, &s.ln, o.fc_w, Some(o.fc_b), n, c, f, false);
            // one row per task: below the elementwise kernels' threshold a batch's GELU would run on one core
            let out = SendPtr(s.fc2.as_mut_ptr());
            let fc = &s.fc;
            pool::for_each(n, |r| {
                // SAFETY: row r of fc2 (n x f, resized above) is written by this task only.
                let row = unsafe { std::slice::from_raw_parts_mut(out.get().add(r * f), f) };
                gelu_fwd(row, &fc[r * f..(r + 1) * f]);
            });
            lin(&mut s.x, &s.fc2, o.proj_w, Some(o.proj_b), n, f, c, true);
        }
        // final LayerNorm and head on the last new position of each row that has one: (B',C) -> (B',V)
        let lasts: Vec<(usize, usize)> = s
            .rows
            .iter()
            .enumerate()
            .filter(|(_, &(_, i))| i as usize == tn - 1)
            .map(|(k, &(b, _))| (k, b as usize))
            .collect();
        let nl = lasts.len();
        s.last.resize(nl * c, 0.0);
        for (j, &(k, _)) in lasts.iter().enumerate() {
            s.last[j * c..(j + 1) * c].copy_from_slice(&s.x[k * c..(k + 1) * c]);
        }
        s.ln.resize(nl.max(n) * c, 0.0);
        let (lw, lb) = (p(self.layout.lnf_w, c), p(self.layout.lnf_b, c));
        layernorm_fwd(&mut s.ln, &mut s.mean, &mut s.rstd, &s.last, lw, lb, nl, c, eps);
        if nl == bsz {
            lin(logits, &s.ln, self.layout.embed_out, None, nl, c, v, false);
        } else {
            // rows without a real last token this call keep their previous logits
            s.head.resize(nl * v, 0.0);
            lin(&mut s.head, &s.ln, self.layout.embed_out, None, nl, c, v, false);
            for (j, &(_, b)) in lasts.iter().enumerate() {
                logits[b * v..(b + 1) * v].copy_from_slice(&s.head[j * v..(j + 1) * v]);
            }
        }
        Ok(())
    }
}

/// y (n, C) = attention of each computed token's query over its row's slots up to and including its own.
fn cached_attention(s: &mut KvCache, l: usize, h: usize, d: usize) {
    let y = SendPtr(s.y.as_mut_ptr());
    match &s.kv {
        Kv::F32 { k, v } => attend(k, v, s, y, l, h, d),
        Kv::Bf16 { k, v } => attend(k, v, s, y, l, h, d),
    }
}

#[allow(clippy::too_many_arguments)]
fn attend<W: Weight + Sync>(k: &[W], v: &[W], s: &KvCache, y: SendPtr, l: usize, h: usize, d: usize) {
    let (bsz, stride, c) = (s.batch, s.stride, h * d);
    let scale = 1.0 / (d as f32).sqrt();
    let lbase = l * bsz * h * stride * d;
    let (qkv, rows, pos) = (&s.qkv, &s.rows, &s.pos);
    thread_local! {
        static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    pool::for_each(rows.len() * h, |task| {
        SCORES.with_borrow_mut(|scores| {
            scores.resize(scores.len().max(stride), 0.0);
            let (row, hh) = (task / h, task % h);
            let b = rows[row].0 as usize;
            let bh = b * h + hh;
            let kb = &k[lbase + bh * stride * d..lbase + (bh + 1) * stride * d];
            let vb = &v[lbase + bh * stride * d..lbase + (bh + 1) * stride * d];
            let q = &qkv[row * 3 * c + hh * 3 * d..row * 3 * c + hh * 3 * d + d];
            let upto = pos[row] as usize + 1;
            // SAFETY: the (row, head hh) output block is written by this task only; row < rows.len().
            let out = unsafe { std::slice::from_raw_parts_mut(y.get().add(row * c + hh * d), d) };
            // scores over slots 0..upto, a block of KB at a time (the last block's slots past upto are computed
            // and ignored), then softmax and the weighted values
            prefetch_start(&kb[..upto.div_ceil(KB) * KB * d]);
            prefetch_start(&vb[..upto * d]);
            block_scores(kb, q, scores, upto.div_ceil(KB), scale);
            let sc = &mut scores[..upto];
            let mx = math::max(sc);
            let inv = 1.0 / math::exp_shift_sum(sc, mx);
            sc.iter_mut().for_each(|e| *e *= inv);
            weighted_values(out, vb, sc);
        })
    });
}
