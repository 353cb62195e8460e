//! The GPT-NeoX model for training: forward with activations kept (or recomputed per layer), explicit backward
//! for every parameter, fused LM-head cross-entropy. Follows HF `modeling_gpt_neox.py` (parallel and sequential
//! residual, partial rotary, exact-erf GELU, fp32 softmax). Inference with a KV cache lives in `decode.rs`;
//! optimisation in `optim.rs`. Gradients ACCUMULATE into the caller's buffer (zero it per optimizer step).
//!
//! Letters: B batch, T time, N = B·T rows, H heads, D head dim, C = H·D hidden, F intermediate, V vocab, L layers.

use crate::batch::BatchInput;
use crate::config::NeoxConfig;
use crate::error::{Error, Result};
use crate::kernels::attention::{attention_bwd, attention_fwd, Visibility};
use crate::kernels::layernorm::{layernorm_bwd, layernorm_fwd};
use crate::kernels::math::{gelu_bwd_inplace, gelu_fwd, round_bf16_slice};
use crate::kernels::matmul::{linear_bwd_input, linear_bwd_input_t, linear_bwd_weight, linear_fwd_t};
use crate::kernels::panels::{pack_bf16, packed_lines, Line};
use crate::kernels::rotary::{rope_apply, rope_table};
use crate::kernels::transpose::transpose;
use crate::kernels::xent::{lm_head_xent, XentGrad, XentScratch};
use crate::layout::{LayerOffsets, Layout};
use crate::optim::AdamW;
use crate::weights::{self, SaveDtype};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

pub struct Model {
    pub config: NeoxConfig,
    pub layout: Layout,
    /// All parameters, flat, in `layout` order. Mutable only through `params_mut`, which invalidates `wt`.
    params: Vec<f32>,
    /// Transposed copies (IC,OC) of the Linear weights and of embed_out, at the same offsets, built lazily:
    /// `gemm` runs ~1.5x faster on x·Wᵀ when Wᵀ is stored row-major than when it transposes while packing.
    wt: OnceLock<Vec<f32>>,
    /// The previous `wt` allocation, reused after `params_mut` (a fresh 4·P-byte buffer per optimizer step would
    /// cost page faults on every step).
    spare: Mutex<Vec<f32>>,
    /// Few-row decoding reads bfloat16 copies of the Linear/head weights (`set_decode_bf16`), built lazily.
    decode_bf16: bool,
    bf16: OnceLock<PackedBf16>,
    /// bf16 mixed precision for training (`set_compute_bf16`): the operands of every matrix product are bf16
    /// values (weights from a rounded `wt`, activations and incoming gradients rounded), accumulation and
    /// everything else stay f32, and `params` are the f32 master weights.
    compute_bf16: bool,
}

/// Activations of one layer for one batch, kept for the backward.
struct LayerActs {
    ln1_out: Vec<f32>,  // (N,C)
    ln1_mean: Vec<f32>, // (N)
    ln1_rstd: Vec<f32>, // (N)
    qkv: Vec<f32>,      // (N,3C) after rotary
    att: Vec<f32>,      // (B,H,T,T) probabilities
    attn_y: Vec<f32>,   // (N,C) merged heads, before `dense`
    mid: Vec<f32>,      // (N,C) sequential residual only: x + attn(x)
    ln2_out: Vec<f32>,  // (N,C)
    ln2_mean: Vec<f32>, // (N)
    ln2_rstd: Vec<f32>, // (N)
    fc_pre: Vec<f32>,   // (N,F) before GELU
    fc_act: Vec<f32>,   // (N,F) after GELU
}

impl LayerActs {
    fn new(c: &NeoxConfig, b: usize, t: usize) -> Self {
        let (n, h, cc, f) = (b * t, c.num_attention_heads, c.hidden_size, c.intermediate_size);
        LayerActs {
            ln1_out: vec![0.0; n * cc],
            ln1_mean: vec![0.0; n],
            ln1_rstd: vec![0.0; n],
            qkv: vec![0.0; n * 3 * cc],
            att: vec![0.0; b * h * t * t],
            attn_y: vec![0.0; n * cc],
            mid: if c.use_parallel_residual { Vec::new() } else { vec![0.0; n * cc] },
            ln2_out: vec![0.0; n * cc],
            ln2_mean: vec![0.0; n],
            ln2_rstd: vec![0.0; n],
            fc_pre: vec![0.0; n * f],
            fc_act: vec![0.0; n * f],
        }
    }
}

/// Preallocated buffers for forward/backward of batches up to (B,T); reused across steps.
pub struct Activations {
    b: usize,
    t: usize,
    recompute: bool,
    x: Vec<f32>, // (L+1, N, C) residual stream at each layer boundary
    layers: Vec<LayerActs>,
    lnf_out: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    cos: Vec<f32>, // (N, r/2)
    sin: Vec<f32>,
    dres: Vec<f32>,    // (N,C) gradient of the residual stream
    dround: Vec<f32>,  // (N,C) dres rounded to bf16, the product operand in bf16 compute
    dln: Vec<f32>,     // (N,C) gradient of a LayerNorm output
    dattn_y: Vec<f32>, // (N,C)
    dqkv: Vec<f32>,    // (N,3C)
    datt: Vec<f32>,    // (B,H,T,T)
    dfc: Vec<f32>,     // (N,F)
    xent: XentScratch,
    targets: Vec<(u32, u32)>,
}

impl Activations {
    /// Buffers for batches up to `b` x `t`. With `recompute`, only layer inputs are kept and each layer's
    /// activations are recomputed during the backward (gradient checkpointing; identical gradients).
    pub fn new(c: &NeoxConfig, b: usize, t: usize, recompute: bool) -> Self {
        let (n, cc, l) = (b * t, c.hidden_size, c.num_hidden_layers);
        let half = c.rotary_ndims() / 2;
        let kept = if recompute { 1 } else { l };
        Activations {
            b,
            t,
            recompute,
            x: vec![0.0; (l + 1) * n * cc],
            layers: (0..kept).map(|_| LayerActs::new(c, b, t)).collect(),
            lnf_out: vec![0.0; n * cc],
            lnf_mean: vec![0.0; n],
            lnf_rstd: vec![0.0; n],
            cos: vec![0.0; n * half],
            sin: vec![0.0; n * half],
            dres: vec![0.0; n * cc],
            dround: vec![0.0; n * cc],
            dln: vec![0.0; n * cc],
            dattn_y: vec![0.0; n * cc],
            dqkv: vec![0.0; n * 3 * cc],
            datt: vec![0.0; b * c.num_attention_heads * t * t],
            dfc: vec![0.0; n * c.intermediate_size],
            xent: XentScratch::default(),
            targets: Vec::new(),
        }
    }

    /// Make sure batches up to `b` x `t` fit, reallocating (larger) only when they do not.
    pub fn ensure(&mut self, c: &NeoxConfig, b: usize, t: usize) {
        if b > self.b || t > self.t {
            *self = Activations::new(c, b.max(self.b), t.max(self.t), self.recompute);
        }
    }

    pub fn recompute(&self) -> bool {
        self.recompute
    }

    /// Bytes held by the activation buffers (for memory reports).
    pub fn bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|a| {
                a.ln1_out.len()
                    + a.qkv.len()
                    + a.att.len()
                    + a.attn_y.len()
                    + a.mid.len()
                    + a.ln2_out.len()
                    + a.fc_pre.len()
                    + a.fc_act.len()
                    + 4 * a.ln1_mean.len()
            })
            .sum();
        4 * (l + self.x.len() + 5 * self.dres.len() + self.dqkv.len() + self.datt.len() + self.dfc.len())
    }
}

/// Mutable access to disjoint tensors of one flat gradient buffer.
struct GradBuf<'a> {
    ptr: *mut f32,
    len: usize,
    _m: std::marker::PhantomData<&'a mut [f32]>,
}

impl GradBuf<'_> {
    /// # Safety
    /// Callers never hold two overlapping ranges at once; `Layout` tensors are disjoint by construction.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self, off: usize, len: usize) -> &mut [f32] {
        assert!(off + len <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(off), len)
    }
}

impl Model {
    /// A model from a config and a flat parameter buffer in `Layout` order.
    pub fn from_parts(config: NeoxConfig, params: Vec<f32>) -> Result<Self> {
        let layout = Layout::new(&config);
        if params.len() != layout.total {
            return Err(Error::invalid(format!(
                "{} parameters given, the config needs {}",
                params.len(),
                layout.total
            )));
        }
        Ok(Model {
            config,
            layout,
            params,
            wt: OnceLock::new(),
            spare: Mutex::new(Vec::new()),
            decode_bf16: false,
            compute_bf16: false,
            bf16: OnceLock::new(),
        })
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Mutable parameters (optimizer steps, tests); invalidates the transposed-weight cache.
    pub fn params_mut(&mut self) -> &mut [f32] {
        self.invalidate_wt();
        &mut self.params
    }

    /// Decode with bfloat16 copies of the Linear and head weights (f32 activations and accumulation): half the
    /// memory traffic per generated token, at bf16 weight precision (Dolly's own inference dtype). Prefill of
    /// many rows and training keep using the f32 weights.
    pub fn set_decode_bf16(&mut self, on: bool) {
        self.decode_bf16 = on;
    }

    /// bf16 mixed precision for the training forward/backward (see `compute_bf16`). On CPUs without bf16
    /// arithmetic this reproduces bf16 numerics at f32 speed; the optimizer keeps f32 master weights.
    pub fn set_compute_bf16(&mut self, on: bool) {
        if self.compute_bf16 != on {
            self.compute_bf16 = on;
            self.invalidate_wt();
        }
    }

    pub fn compute_bf16(&self) -> bool {
        self.compute_bf16
    }

    /// Rounds a product operand to bf16 values when computing in bf16.
    fn operand(&self, x: &mut [f32]) {
        if self.compute_bf16 {
            round_bf16_slice(x);
        }
    }

    /// The gradient `dres` entering a product: itself, or in bf16 a rounded copy in `dround` (dres stays f32).
    fn grad_operand<'a>(&self, dround: &'a mut [f32], dres: &'a [f32]) -> &'a [f32] {
        if !self.compute_bf16 {
            return dres;
        }
        dround.copy_from_slice(dres);
        round_bf16_slice(dround);
        dround
    }

    /// dinp (N, IC) = dout · W for the weight at `off`: from the f32 weights, or in bf16 from the rounded `wt`.
    fn bwd_input(&self, dinp: &mut [f32], dout: &[f32], off: usize, n: usize, ic: usize, oc: usize) {
        if self.compute_bf16 {
            linear_bwd_input_t(dinp, dout, self.t(off, ic * oc), n, ic, oc)
        } else {
            linear_bwd_input(dinp, dout, self.p(off, ic * oc), n, ic, oc, false)
        }
    }

    /// Whether decoding reads bf16 weight copies (and keeps a bf16 KV cache).
    pub fn decode_bf16(&self) -> bool {
        self.decode_bf16
    }

    /// The bf16 weight copy, when decoding in bf16 (built on first use after a change).
    pub(crate) fn bf16_weights(&self) -> Option<&PackedBf16> {
        if !self.decode_bf16 {
            return None;
        }
        Some(self.bf16.get_or_init(|| {
            let mats = self.matrices();
            let mut at = Vec::with_capacity(mats.len());
            let mut len = 0;
            for &(o, rows, cols) in &mats {
                at.push((o, len));
                len += packed_lines(rows, cols);
            }
            let mut lines = vec![Line::default(); len];
            for (&(o, rows, cols), &(_, start)) in mats.iter().zip(&at) {
                let n = packed_lines(rows, cols);
                pack_bf16(&mut lines[start..start + n], &self.params[o..o + rows * cols], rows, cols);
            }
            PackedBf16 { lines, at }
        }))
    }

    fn invalidate_wt(&mut self) {
        self.bf16 = OnceLock::new();
        if let Some(old) = self.wt.take() {
            *self.spare.get_mut().unwrap_or_else(|e| e.into_inner()) = old;
        }
    }

    /// The weight matrices kept transposed in `wt`: (offset, rows, cols) of each (OC, IC) weight.
    fn matrices(&self) -> Vec<(usize, usize, usize)> {
        let (c, f, v) = (self.config.hidden_size, self.config.intermediate_size, self.config.vocab_size);
        let mut mats = vec![(self.layout.embed_out, v, c)];
        for o in &self.layout.layers {
            mats.extend([(o.qkv_w, 3 * c, c), (o.dense_w, c, c), (o.fc_w, f, c), (o.proj_w, c, f)]);
        }
        mats
    }

    /// The training step's optimizer update: `opt.step_scaled_and_zero` on the parameters, refreshing the
    /// transposed-weight cache in the same pass (no separate transpose before the next forward).
    pub fn adamw_step(&mut self, opt: &mut AdamW, grads: &mut [f32], lr: f32, coef: f32) {
        self.bf16 = OnceLock::new();
        let spare = std::mem::take(self.spare.get_mut().unwrap_or_else(|e| e.into_inner()));
        let mut wt = self.wt.take().unwrap_or(spare);
        wt.resize(self.layout.total, 0.0);
        let mats = self.matrices();
        let round = self.compute_bf16;
        opt.step_scaled_zero_transposed(&mut self.params, grads, lr, &self.layout, coef, &mut wt, &mats, round);
        self.wt = OnceLock::from(wt);
    }

    /// Build now what decoding builds lazily on first use: the bf16 weight copy (when decoding in bf16) and the
    /// transposed weights that prompts longer than the few-row path use. A server calls this at start so its
    /// first long prompt (or first burst of prompts) does not pay ~100 ms of transposing and page faults.
    pub fn prepare_decode(&self) {
        let _ = self.bf16_weights();
        let _ = self.wt();
    }

    /// Transposed Linear/head weights, built on first use after a change.
    pub(crate) fn wt(&self) -> &[f32] {
        self.wt.get_or_init(|| {
            let mut wt = std::mem::take(&mut *self.spare.lock().unwrap_or_else(|e| e.into_inner()));
            if wt.len() != self.layout.total {
                wt = vec![0f32; self.layout.total];
            }
            for (off, rows, cols) in self.matrices() {
                transpose(&mut wt[off..off + rows * cols], &self.params[off..off + rows * cols], rows, cols);
                if self.compute_bf16 {
                    round_bf16_slice(&mut wt[off..off + rows * cols]);
                }
            }
            wt
        })
    }

    /// Load `config.json` + weights (safetensors, or `pytorch_model.bin` read without executing its pickle) from
    /// an HF model directory. The weights' headers are checked against config.json before anything is allocated.
    pub fn load(dir: &Path) -> Result<Self> {
        let cpath = dir.join("config.json");
        let config = NeoxConfig::from_file(&cpath)?;
        if weights::checked_param_count(&config).is_none() {
            return Err(Error::file(&cpath, "the parameter count these sizes give does not fit in memory addresses"));
        }
        let params = weights::load_params(dir, &config)?;
        Self::from_parts(config, params)
    }

    /// Write `config.json` and `model.safetensors` into `dir` (created if missing), each atomically.
    pub fn save(&self, dir: &Path, dtype: SaveDtype) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut cfg = self.config.to_json();
        if let Some(m) = cfg.as_object_mut() {
            m.insert("torch_dtype".into(), dtype.torch_name().into());
        }
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::invalid(e.to_string()))? + "\n";
        let cpath = dir.join("config.json");
        common::atomic_write(&cpath, text.as_bytes()).map_err(|e| Error::io(&cpath, e))?;
        weights::save_safetensors(&dir.join("model.safetensors"), &self.layout, &self.params, dtype)
    }

    /// Resize `embed_in` and `embed_out` to `new_vocab` rows as Dolly does: shrinking keeps the first rows;
    /// growing initialises each new row to the mean of the existing rows of that matrix.
    pub fn resize_vocab(&mut self, new_vocab: usize) -> Result<()> {
        if new_vocab == 0 {
            return Err(Error::invalid("vocabulary size must be > 0"));
        }
        let old_v = self.config.vocab_size;
        if new_vocab == old_v {
            return Ok(());
        }
        let c = self.config.hidden_size;
        let mut cfg = self.config.clone();
        cfg.vocab_size = new_vocab;
        let layout = Layout::new(&cfg);
        let mut params = vec![0f32; layout.total];
        for (new, old) in layout.params.iter().zip(&self.layout.params) {
            let src = &self.params[old.range()];
            let dst = &mut params[new.range()];
            if new.shape == old.shape {
                dst.copy_from_slice(src);
                continue;
            }
            let keep = old_v.min(new_vocab) * c;
            dst[..keep].copy_from_slice(&src[..keep]);
            if new_vocab > old_v {
                let mut mean = vec![0f64; c];
                for row in src.chunks(c) {
                    mean.iter_mut().zip(row).for_each(|(m, x)| *m += *x as f64);
                }
                for row in dst[keep..].chunks_mut(c) {
                    row.iter_mut().zip(&mean).for_each(|(x, m)| *x = (*m / old_v as f64) as f32);
                }
            }
        }
        self.config = cfg;
        self.layout = layout;
        self.params = params;
        self.wt = OnceLock::new();
        self.bf16 = OnceLock::new();
        *self.spare.get_mut().unwrap_or_else(|e| e.into_inner()) = Vec::new();
        Ok(())
    }

    pub fn num_params(&self) -> usize {
        self.layout.total
    }

    fn p(&self, off: usize, len: usize) -> &[f32] {
        &self.params[off..off + len]
    }

    /// The transposed (IC,OC) copy of the weight at `off` (see `wt`).
    pub(crate) fn t(&self, off: usize, len: usize) -> &[f32] {
        &self.wt()[off..off + len]
    }

    fn check_capacity(&self, batch: &BatchInput<'_>, acts: &Activations) -> Result<()> {
        batch.validate(self.config.vocab_size, self.config.max_position_embeddings)?;
        if batch.batch_size > acts.b || batch.seq_len > acts.t {
            return Err(Error::invalid(format!(
                "batch {}x{} exceeds the activation buffers {}x{}",
                batch.batch_size, batch.seq_len, acts.b, acts.t
            )));
        }
        Ok(())
    }

    /// Embedding, all layers and the final LayerNorm; activations kept per `acts.recompute`.
    fn forward_body(&self, batch: &BatchInput<'_>, acts: &mut Activations) {
        let cfg = &self.config;
        let (b, t, c) = (batch.batch_size, batch.seq_len, cfg.hidden_size);
        let n = b * t;
        let half = cfg.rotary_ndims() / 2;
        rope_table(&mut acts.cos, &mut acts.sin, batch.position_ids, cfg.rotary_ndims(), cfg.rotary_emb_base);
        // embed_in: ids (N) -> x0 (N,C)
        let emb = self.p(self.layout.embed_in, cfg.vocab_size * c);
        for (row, &id) in acts.x[..n * c].chunks_mut(c).zip(batch.input_ids) {
            row.copy_from_slice(&emb[id as usize * c..(id as usize + 1) * c]);
        }
        let vis = Visibility { attention_mask: batch.attention_mask, doc_ids: batch.doc_ids };
        let stride = acts.b * acts.t * c;
        for l in 0..cfg.num_hidden_layers {
            let (lo, hi) = acts.x.split_at_mut((l + 1) * stride);
            let x_in = &lo[l * stride..l * stride + n * c];
            let x_out = &mut hi[..n * c];
            let a = &mut acts.layers[if acts.recompute { 0 } else { l }];
            self.layer_fwd(l, x_in, x_out, a, &acts.cos[..n * half], &acts.sin[..n * half], vis, b, t);
        }
        let last = cfg.num_hidden_layers * stride;
        layernorm_fwd(
            &mut acts.lnf_out,
            &mut acts.lnf_mean,
            &mut acts.lnf_rstd,
            &acts.x[last..last + n * c],
            self.p(self.layout.lnf_w, c),
            self.p(self.layout.lnf_b, c),
            n,
            c,
            cfg.layer_norm_eps as f32,
        );
        self.operand(&mut acts.lnf_out[..n * c]);
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_fwd(
        &self,
        l: usize,
        x_in: &[f32],
        x_out: &mut [f32],
        a: &mut LayerActs,
        cos: &[f32],
        sin: &[f32],
        vis: Visibility<'_>,
        b: usize,
        t: usize,
    ) {
        let cfg = &self.config;
        let (c, f, h, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim());
        let n = b * t;
        let eps = cfg.layer_norm_eps as f32;
        let o: LayerOffsets = self.layout.layers[l];
        // ln1: (N,C) -> (N,C)
        layernorm_fwd(
            &mut a.ln1_out,
            &mut a.ln1_mean,
            &mut a.ln1_rstd,
            x_in,
            self.p(o.ln1_w, c),
            self.p(o.ln1_b, c),
            n,
            c,
            eps,
        );
        self.operand(&mut a.ln1_out[..n * c]);
        // query_key_value: (N,C) -> (N,3C) = per head [q|k|v]; rotary on q,k
        linear_fwd_t(
            &mut a.qkv,
            &a.ln1_out,
            self.t(o.qkv_w, 3 * c * c),
            Some(self.p(o.qkv_b, 3 * c)),
            n,
            c,
            3 * c,
            false,
        );
        rope_apply(&mut a.qkv, cos, sin, n, h, d, cfg.rotary_ndims(), false);
        // attention: (N,3C) -> (N,C)
        attention_fwd(&mut a.attn_y, &mut a.att, &a.qkv, vis, b, t, h, d);
        self.operand(&mut a.attn_y[..n * c]);
        // dense: (N,C) -> (N,C), into x_out for now
        linear_fwd_t(x_out, &a.attn_y, self.t(o.dense_w, c * c), Some(self.p(o.dense_b, c)), n, c, c, false);
        let ln2_in: &[f32] = if cfg.use_parallel_residual {
            // x_out = x + attn(ln1(x)) [+ mlp(ln2(x)) below]
            x_out.iter_mut().zip(x_in).for_each(|(o, x)| *o += x);
            x_in
        } else {
            // mid = x + attn(ln1(x)); x_out = mid [+ mlp(ln2(mid)) below]
            a.mid.iter_mut().zip(x_in.iter().zip(x_out.iter())).for_each(|(m, (x, y))| *m = x + y);
            x_out.copy_from_slice(&a.mid);
            &a.mid
        };
        layernorm_fwd(
            &mut a.ln2_out,
            &mut a.ln2_mean,
            &mut a.ln2_rstd,
            ln2_in,
            self.p(o.ln2_w, c),
            self.p(o.ln2_b, c),
            n,
            c,
            eps,
        );
        self.operand(&mut a.ln2_out[..n * c]);
        // mlp: (N,C) -> (N,F) -> gelu -> (N,C), added to x_out
        linear_fwd_t(&mut a.fc_pre, &a.ln2_out, self.t(o.fc_w, f * c), Some(self.p(o.fc_b, f)), n, c, f, false);
        gelu_fwd(&mut a.fc_act[..n * f], &a.fc_pre[..n * f]);
        self.operand(&mut a.fc_act[..n * f]);
        linear_fwd_t(x_out, &a.fc_act, self.t(o.proj_w, c * f), Some(self.p(o.proj_b, c)), n, f, c, true);
    }

    /// Backward of layer `l`. On entry `acts.dres` = ∂L/∂x_out; on exit ∂L/∂x_in. Parameter grads accumulate.
    fn layer_bwd(&self, l: usize, x_in: &[f32], acts: &mut Activations, g: &GradBuf<'_>, b: usize, t: usize) {
        let cfg = &self.config;
        let (c, f, h, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim());
        let n = b * t;
        let half = cfg.rotary_ndims() / 2;
        let o: LayerOffsets = self.layout.layers[l];
        let a = &acts.layers[if acts.recompute { 0 } else { l }];
        let (dres, dln, dfc) = (&mut acts.dres[..n * c], &mut acts.dln[..n * c], &mut acts.dfc[..n * f]);
        let dround = &mut acts.dround[..n * c];
        // SAFETY (all g.get below): each call takes a distinct tensor of the layout, used before the next.
        unsafe {
            // mlp backward from g_out = dres: (N,C) <- (N,F) <- (N,C)
            let dout = self.grad_operand(dround, dres);
            self.bwd_input(dfc, dout, o.proj_w, n, f, c);
            linear_bwd_weight(g.get(o.proj_w, c * f), Some(g.get(o.proj_b, c)), dout, &a.fc_act, n, f, c);
            gelu_bwd_inplace(dfc, &a.fc_pre[..n * f]);
            self.operand(dfc);
            self.bwd_input(dln, dfc, o.fc_w, n, c, f);
            linear_bwd_weight(g.get(o.fc_w, f * c), Some(g.get(o.fc_b, f)), dfc, &a.ln2_out, n, c, f);
            if cfg.use_parallel_residual {
                // attention branch also reads g_out (dout above), before ln2's backward adds into dres
                self.bwd_input(&mut acts.dattn_y, dout, o.dense_w, n, c, c);
                linear_bwd_weight(g.get(o.dense_w, c * c), Some(g.get(o.dense_b, c)), dout, &a.attn_y, n, c, c);
                layernorm_bwd(
                    dres,
                    g.get(o.ln2_w, c),
                    g.get(o.ln2_b, c),
                    dln,
                    x_in,
                    &a.ln2_mean,
                    &a.ln2_rstd,
                    self.p(o.ln2_w, c),
                    n,
                    c,
                );
            } else {
                // dres becomes ∂L/∂mid, which feeds the attention branch
                layernorm_bwd(
                    dres,
                    g.get(o.ln2_w, c),
                    g.get(o.ln2_b, c),
                    dln,
                    &a.mid,
                    &a.ln2_mean,
                    &a.ln2_rstd,
                    self.p(o.ln2_w, c),
                    n,
                    c,
                );
                let dout = self.grad_operand(dround, dres);
                self.bwd_input(&mut acts.dattn_y, dout, o.dense_w, n, c, c);
                linear_bwd_weight(g.get(o.dense_w, c * c), Some(g.get(o.dense_b, c)), dout, &a.attn_y, n, c, c);
            }
            // attention: (N,C) -> (N,3C); undo rotary on dq, dk
            attention_bwd(&mut acts.dqkv, &mut acts.datt, &acts.dattn_y, &a.att, &a.qkv, b, t, h, d);
            rope_apply(&mut acts.dqkv, &acts.cos[..n * half], &acts.sin[..n * half], n, h, d, cfg.rotary_ndims(), true);
            self.operand(&mut acts.dqkv[..n * 3 * c]);
            self.bwd_input(dln, &acts.dqkv, o.qkv_w, n, c, 3 * c);
            linear_bwd_weight(
                g.get(o.qkv_w, 3 * c * c),
                Some(g.get(o.qkv_b, 3 * c)),
                &acts.dqkv,
                &a.ln1_out,
                n,
                c,
                3 * c,
            );
            layernorm_bwd(
                dres,
                g.get(o.ln1_w, c),
                g.get(o.ln1_b, c),
                dln,
                x_in,
                &a.ln1_mean,
                &a.ln1_rstd,
                self.p(o.ln1_w, c),
                n,
                c,
            );
        }
    }

    /// Loss sum and target count of a batch, with no gradient (evaluation).
    pub fn forward_loss(&self, batch: &BatchInput<'_>, acts: &mut Activations) -> Result<(f64, usize)> {
        self.check_capacity(batch, acts)?;
        self.forward_body(batch, acts);
        let (c, v) = (self.config.hidden_size, self.config.vocab_size);
        batch.targets(&mut acts.targets);
        let (w, wt) = (self.p(self.layout.embed_out, v * c), self.t(self.layout.embed_out, v * c));
        let loss = lm_head_xent(&acts.lnf_out, w, wt, &acts.targets, None, &mut acts.xent, c, v, self.compute_bf16);
        Ok((loss, acts.targets.len()))
    }

    /// Full logits (N,V) of a batch (tests, scoring). Training never materialises these.
    pub fn forward_logits(&self, batch: &BatchInput<'_>, acts: &mut Activations) -> Result<Vec<f32>> {
        self.check_capacity(batch, acts)?;
        self.forward_body(batch, acts);
        let (c, v, n) = (self.config.hidden_size, self.config.vocab_size, batch.rows());
        let mut logits = vec![0f32; n * v];
        linear_fwd_t(&mut logits, &acts.lnf_out, self.t(self.layout.embed_out, v * c), None, n, c, v, false);
        Ok(logits)
    }

    /// Forward + backward of one micro-batch. Adds `grad_scale · ∂(Σ loss)/∂θ` into `grads` (len = num_params)
    /// and returns (loss sum, target count). Use `grad_scale = 1 / total target count` over all micro-batches
    /// (and ranks) of the step for a token-weighted mean.
    pub fn forward_backward(
        &self,
        batch: &BatchInput<'_>,
        acts: &mut Activations,
        grads: &mut [f32],
        grad_scale: f32,
    ) -> Result<(f64, usize)> {
        self.check_capacity(batch, acts)?;
        if grads.len() != self.layout.total {
            return Err(Error::invalid(format!(
                "gradient buffer has {} entries, expected {}",
                grads.len(),
                self.layout.total
            )));
        }
        let cfg = &self.config;
        let (b, t, c, v) = (batch.batch_size, batch.seq_len, cfg.hidden_size, cfg.vocab_size);
        let n = b * t;
        self.forward_body(batch, acts);
        batch.targets(&mut acts.targets);
        let g = GradBuf { ptr: grads.as_mut_ptr(), len: grads.len(), _m: std::marker::PhantomData };
        // lm head + loss: (N,C) -> Σ loss; ∂/∂lnf_out into dln
        acts.dln[..n * c].fill(0.0);
        let (w, wt) = (self.p(self.layout.embed_out, v * c), self.t(self.layout.embed_out, v * c));
        // SAFETY: embed_out's gradient range is disjoint from every other use here.
        let dw = unsafe { g.get(self.layout.embed_out, v * c) };
        let grad = XentGrad { dx: &mut acts.dln[..n * c], dw, scale: grad_scale };
        let bf16 = self.compute_bf16;
        let loss = lm_head_xent(&acts.lnf_out, w, wt, &acts.targets, Some(grad), &mut acts.xent, c, v, bf16);
        let stride = acts.b * acts.t * c;
        let last = cfg.num_hidden_layers * stride;
        acts.dres[..n * c].fill(0.0);
        // SAFETY: distinct tensors.
        unsafe {
            layernorm_bwd(
                &mut acts.dres,
                g.get(self.layout.lnf_w, c),
                g.get(self.layout.lnf_b, c),
                &acts.dln,
                &acts.x[last..last + n * c],
                &acts.lnf_mean,
                &acts.lnf_rstd,
                self.p(self.layout.lnf_w, c),
                n,
                c,
            );
        }
        let half = cfg.rotary_ndims() / 2;
        let vis = Visibility { attention_mask: batch.attention_mask, doc_ids: batch.doc_ids };
        for l in (0..cfg.num_hidden_layers).rev() {
            let mut x = std::mem::take(&mut acts.x);
            {
                let (lo, hi) = x.split_at_mut((l + 1) * stride);
                let x_in = &lo[l * stride..l * stride + n * c];
                if acts.recompute {
                    // Deterministic recompute: rewrites x[l+1] with identical values.
                    let (cos, sin) = (&acts.cos[..n * half], &acts.sin[..n * half]);
                    self.layer_fwd(l, x_in, &mut hi[..n * c], &mut acts.layers[0], cos, sin, vis, b, t);
                }
                self.layer_bwd(l, x_in, acts, &g, b, t);
            }
            acts.x = x;
        }
        // embed_in: scatter-add rows of ∂L/∂x0 (sequential: deterministic, duplicate ids add up)
        // SAFETY: distinct tensor.
        let demb = unsafe { g.get(self.layout.embed_in, v * c) };
        for (row, &id) in acts.dres[..n * c].chunks(c).zip(batch.input_ids) {
            let dst = &mut demb[id as usize * c..(id as usize + 1) * c];
            dst.iter_mut().zip(row).for_each(|(d, s)| *d += s);
        }
        Ok((loss, acts.targets.len()))
    }
}

/// The bf16 copies of the weight matrices for few-row decoding, each packed in panels (`kernels::panels`).
pub(crate) struct PackedBf16 {
    lines: Vec<Line>,
    /// (parameter offset, first line) of each matrix.
    at: Vec<(usize, usize)>,
}

impl PackedBf16 {
    /// The packed lines of the matrix at parameter offset `off`.
    pub(crate) fn matrix(&self, off: usize) -> &[Line] {
        let i = self.at.iter().position(|&(o, _)| o == off).expect("a weight matrix offset");
        let end = self.at.get(i + 1).map_or(self.lines.len(), |&(_, s)| s);
        &self.lines[self.at[i].1..end]
    }
}
