//! One GPT-NeoX layer, written once: the forward used by training (attention over the batch, activations kept
//! for the backward) and by decoding (attention against the KV cache, one scratch set), and the training
//! backward beside it. Follows HF `GPTNeoXLayer`: parallel residual `x + attn(ln1 x) + mlp(ln2 x)` or sequential
//! `h = x + attn(ln1 x); h + mlp(ln2 h)`, partial rotary, exact-erf GELU. Every op goes through the `Backend`.
//!
//! Letters: N rows (B·T in training, the new real tokens in decoding), C hidden, F intermediate, H heads, D head
//! dim.

use crate::backend::{AttnShape, Backend, Heads, LayerNorm, Linear, Pass, Visibility};
use crate::config::NeoxConfig;
use crate::layout::LayerOffsets;

/// A layer's tensors as the backend addresses them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerParams {
    pub ln1: LayerNorm,
    pub ln2: LayerNorm,
    pub qkv: Linear,
    pub dense: Linear,
    pub fc: Linear,
    pub proj: Linear,
}

impl LayerParams {
    pub fn new(cfg: &NeoxConfig, o: &LayerOffsets) -> Self {
        let (c, f, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps as f32);
        let lin = |w, b, ic, oc| Linear { w, b: Some(b), ic, oc };
        LayerParams {
            ln1: LayerNorm { w: o.ln1_w, b: o.ln1_b, c, eps },
            ln2: LayerNorm { w: o.ln2_w, b: o.ln2_b, c, eps },
            qkv: lin(o.qkv_w, o.qkv_b, c, 3 * c),
            dense: lin(o.dense_w, o.dense_b, c, c),
            fc: lin(o.fc_w, o.fc_b, c, f),
            proj: lin(o.proj_w, o.proj_b, f, c),
        }
    }
}

/// Activations of one layer, kept for the backward (or one reused set: gradient checkpointing, decoding).
pub(crate) struct LayerActs<B: Backend> {
    pub ln1_out: B::Buf,   // (N,C)
    pub ln1_stats: B::Buf, // (2N) mean, rstd
    pub qkv: B::Buf,       // (N,3C) after rotary
    pub att: B::Buf,       // what the training attention keeps for its backward
    pub attn_y: B::Buf,    // (N,C) merged heads, before `dense`
    pub attn_op: B::Buf,   // (N,C) attn_y rounded: the `dense` operand when the backend rounds operands
    pub mid: B::Buf,       // (N,C) sequential residual only: x + attn(x)
    pub ln2_out: B::Buf,   // (N,C)
    pub ln2_stats: B::Buf, // (2N)
    pub fc_pre: B::Buf,    // (N,F) before GELU
}

impl<B: Backend> LayerActs<B> {
    /// Buffers for `n` rows; `att` elements of attention state (0 for decoding).
    pub fn new(be: &B, cfg: &NeoxConfig, n: usize, att: usize) -> Self {
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        LayerActs {
            ln1_out: be.zeros(n * c),
            ln1_stats: be.zeros(2 * n),
            qkv: be.zeros(n * 3 * c),
            att: be.zeros(att),
            attn_y: be.zeros(n * c),
            attn_op: be.zeros(if be.rounds_operands() { n * c } else { 0 }),
            mid: be.zeros(if cfg.use_parallel_residual { 0 } else { n * c }),
            ln2_out: be.zeros(n * c),
            ln2_stats: be.zeros(2 * n),
            fc_pre: be.zeros(n * f),
        }
    }

    /// Grow every buffer to hold `n` rows (decoding sizes its scratch per call).
    pub fn grow(&mut self, be: &B, cfg: &NeoxConfig, n: usize) {
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        for (buf, len) in [
            (&mut self.ln1_out, n * c),
            (&mut self.ln1_stats, 2 * n),
            (&mut self.qkv, n * 3 * c),
            (&mut self.attn_y, n * c),
            (&mut self.mid, if cfg.use_parallel_residual { 0 } else { n * c }),
            (&mut self.ln2_out, n * c),
            (&mut self.ln2_stats, 2 * n),
            (&mut self.fc_pre, n * f),
        ] {
            be.grow(buf, len);
        }
    }

    pub fn elements(&self) -> usize {
        [
            &self.ln1_out,
            &self.ln1_stats,
            &self.qkv,
            &self.att,
            &self.attn_y,
            &self.attn_op,
            &self.mid,
            &self.ln2_out,
            &self.ln2_stats,
            &self.fc_pre,
        ]
        .iter()
        .map(|b| B::len(b))
        .sum()
    }
}

/// How a layer's attention sees its keys.
pub(crate) enum Attend<'a, B: Backend> {
    /// Training: causal attention over the batch's own rows.
    Batch { vis: Visibility<'a>, shape: AttnShape },
    /// Decoding: append this call's keys and values to the cache, then attend over each row's slots.
    Cache { kv: &'a mut B::Kv, at: &'a [(u32, u32)] },
}

/// One forward call through a layer: rows, the rotary table and where attention reads.
pub(crate) struct Step<'a, B: Backend> {
    pub n: usize,
    /// (N,F) scratch for the GELU output.
    pub act: &'a mut B::Buf,
    pub rope: (&'a B::Buf, &'a B::Buf),
    pub attend: Attend<'a, B>,
}

/// The block's inputs that do not change per layer.
pub(crate) struct Block<'a, B: Backend> {
    pub be: &'a B,
    pub cfg: &'a NeoxConfig,
    pub heads: Heads,
}

impl<B: Backend> Block<'_, B> {
    fn pass(step: &Step<'_, B>) -> Pass {
        match step.attend {
            Attend::Batch { .. } => Pass::Train,
            Attend::Cache { .. } => Pass::Decode,
        }
    }

    /// x_out (N,C) = layer `l` of x_in (N,C); `a` keeps what the backward needs.
    pub fn forward(
        &self,
        l: usize,
        p: &LayerParams,
        x: (&B::Buf, &mut B::Buf),
        a: &mut LayerActs<B>,
        step: Step<'_, B>,
    ) {
        let (be, cfg) = (self.be, self.cfg);
        let (x_in, x_out) = x;
        let (n, c, f) = (step.n, cfg.hidden_size, cfg.intermediate_size);
        let pass = Self::pass(&step);
        // operands of products are rounded to the compute dtype in training (bf16 compute)
        let operand = |buf: &mut B::Buf, len: usize| {
            if pass == Pass::Train {
                be.operand(buf, len)
            }
        };
        // ln1: (N,C) -> (N,C)
        be.layernorm(&mut a.ln1_out, &mut a.ln1_stats, x_in, p.ln1, n);
        operand(&mut a.ln1_out, n * c);
        // query_key_value: (N,C) -> (N,3C) = per head [q|k|v]; rotary on q,k
        be.linear(&mut a.qkv, &a.ln1_out, p.qkv, n, false, pass);
        be.rope(&mut a.qkv, step.rope, n, self.heads, false);
        // attention: (N,3C) -> (N,C)
        match step.attend {
            Attend::Batch { vis, shape } => be.attention(&mut a.attn_y, &mut a.att, &a.qkv, vis, shape),
            Attend::Cache { kv, at } => {
                be.kv_append(kv, l, &a.qkv, at);
                be.attention_decode(&mut a.attn_y, &a.qkv, kv, l, at);
            }
        }
        // dense: (N,C) -> (N,C), into x_out, plus the residual x. Its operand is a rounded copy when the backend
        // rounds operands: the attention backward needs the f32 output.
        let y_in = if pass == Pass::Train && be.rounds_operands() {
            be.grow(&mut a.attn_op, n * c);
            be.copy(&mut a.attn_op, &a.attn_y, n * c);
            be.operand(&mut a.attn_op, n * c);
            &a.attn_op
        } else {
            &a.attn_y
        };
        be.linear(x_out, y_in, p.dense, n, false, pass);
        be.add(x_out, x_in, n * c);
        let ln2_in: &B::Buf = if cfg.use_parallel_residual {
            // x_out = x + attn(ln1(x)) [+ mlp(ln2(x)) below]
            x_in
        } else {
            // mid = x + attn(ln1(x)); x_out = mid [+ mlp(ln2(mid)) below]
            be.copy(&mut a.mid, x_out, n * c);
            &a.mid
        };
        be.layernorm(&mut a.ln2_out, &mut a.ln2_stats, ln2_in, p.ln2, n);
        operand(&mut a.ln2_out, n * c);
        // mlp: (N,C) -> (N,F) -> gelu -> (N,C), added to x_out
        be.linear(&mut a.fc_pre, &a.ln2_out, p.fc, n, false, pass);
        // GELU's output is not kept: the backward recomputes it from fc_pre (an (N,F) buffer less per layer)
        be.gelu(step.act, &a.fc_pre, n, f);
        operand(step.act, n * f);
        be.linear(x_out, step.act, p.proj, n, true, pass);
    }

    /// Backward of a layer. On entry `g.dres` = ∂L/∂x_out; on exit ∂L/∂x_in. Parameter gradients accumulate
    /// into `grads`.
    pub fn backward(
        &self,
        p: &LayerParams,
        x_in: &B::Buf,
        a: &LayerActs<B>,
        g: &mut LayerGrads<'_, B>,
        fwd: Backward<'_, B>,
    ) {
        let (be, cfg) = (self.be, self.cfg);
        let (n, c, f) = (fwd.n, cfg.hidden_size, cfg.intermediate_size);
        let grads = &mut *g.grads;
        let y_in = if be.rounds_operands() { &a.attn_op } else { &a.attn_y };
        // mlp backward from g_out = dres: (N,C) <- (N,F) <- (N,C)
        let dout = be.grad_operand(g.dround, g.dres, n * c);
        if !fwd.act_ready {
            be.gelu(g.act, &a.fc_pre, n, f);
            be.operand(g.act, n * f);
        }
        be.linear_bwd(g.dfc, grads, dout, g.act, p.proj, n);
        be.gelu_bwd(g.dfc, &a.fc_pre, n * f);
        be.operand(g.dfc, n * f);
        be.linear_bwd(g.dln, grads, g.dfc, &a.ln2_out, p.fc, n);
        if cfg.use_parallel_residual {
            // the attention branch also reads g_out (dout above), before ln2's backward adds into dres
            be.linear_bwd(g.dattn_y, grads, dout, y_in, p.dense, n);
            be.layernorm_bwd(g.dres, grads, g.dln, (x_in, &a.ln2_stats), p.ln2, n);
        } else {
            // dres becomes ∂L/∂mid, which feeds the attention branch
            be.layernorm_bwd(g.dres, grads, g.dln, (&a.mid, &a.ln2_stats), p.ln2, n);
            let dout = be.grad_operand(g.dround, g.dres, n * c);
            be.linear_bwd(g.dattn_y, grads, dout, y_in, p.dense, n);
        }
        // attention: (N,C) -> (N,3C); undo rotary on dq, dk
        be.attention_bwd(g.dqkv, g.dattn_y, (&a.attn_y, &a.att), &a.qkv, fwd.vis, fwd.shape);
        be.rope(g.dqkv, fwd.rope, n, self.heads, true);
        be.operand(g.dqkv, n * 3 * c);
        be.linear_bwd(g.dln, grads, g.dqkv, &a.ln1_out, p.qkv, n);
        be.layernorm_bwd(g.dres, grads, g.dln, (x_in, &a.ln1_stats), p.ln1, n);
    }
}

/// The backward's view of the forward call.
pub(crate) struct Backward<'a, B: Backend> {
    pub n: usize,
    pub rope: (&'a B::Buf, &'a B::Buf),
    pub vis: Visibility<'a>,
    pub shape: AttnShape,
    /// `act` already holds this layer's GELU output (its forward was just recomputed): not computed again.
    pub act_ready: bool,
}

/// Gradient buffers of the backward: the residual stream's and per-op scratch, and the parameter gradients.
pub(crate) struct LayerGrads<'a, B: Backend> {
    pub grads: &'a mut B::Buf,
    pub dres: &'a mut B::Buf,    // (N,C) gradient of the residual stream
    pub dround: &'a mut B::Buf,  // (N,C) dres rounded to bf16, the product operand in bf16 compute
    pub dln: &'a mut B::Buf,     // (N,C) gradient of a LayerNorm output
    pub dattn_y: &'a mut B::Buf, // (N,C)
    pub dqkv: &'a mut B::Buf,    // (N,3C)
    pub dfc: &'a mut B::Buf,     // (N,F)
    pub act: &'a mut B::Buf,     // (N,F) GELU output, recomputed
}
