//! The engine interface: `Model<B>` is a GPT-NeoX (Pythia) model on a backend `B` (the CPU by default). The
//! trainer, `dolly eval` and the server use only this: a training step (`forward_backward`: loss sum and target
//! count, gradients accumulated), evaluation (`forward_loss`, `forward_logits`), the optimizer step
//! (`adamw_step`), reductions over the gradients, the per-unit parameter ranges (`units`, for sharding) and
//! decoding over a KV cache (`decode.rs`). The math is embedding -> layers (`block.rs`) -> final LayerNorm ->
//! LM head with the loss fused; loading, saving and resizing are in `model_io.rs`.
//!
//! Letters: B batch, T time, N = B·T rows, H heads, D head dim, C = H·D hidden, F intermediate, V vocab, L layers.

use crate::backend::cpu::Cpu;
use crate::backend::{AttnShape, Backend, Embedding, HeadGrad, Heads, LayerNorm, Linear, Visibility};
use crate::batch_input::BatchInput;
use crate::block::{Attend, Backward, Block, LayerActs, LayerGrads, LayerParams, Step};
use crate::config::NeoxConfig;
use crate::error::{Error, Result};
use crate::layout::{Layout, Unit};
use crate::optim::AdamW;

/// What the engine tells a sharding layer between units (`Layout::units` indices: 0 the input embedding,
/// 1..=L the layers, L+1 the final LayerNorm with the head). ZeRO-3 gathers a unit's parameters on `Acquire`
/// and frees them on `Release`; ZeRO-2/3 reduce a unit's gradients on `GradsReady`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnitEvent {
    /// The unit's parameters are read from now until its `Release`.
    Acquire(usize),
    Release(usize),
    /// The unit's gradients for this micro-batch are complete in the gradient buffer.
    GradsReady(usize),
}

/// Receives the `UnitEvent`s of `forward_backward_with` / `forward_loss_with`, with the backend (to write a
/// gathered unit into) and, for `GradsReady`, the gradient buffer.
pub trait UnitHooks<B: Backend> {
    fn on(&mut self, ev: UnitEvent, be: &mut B, grads: Option<&mut B::Buf>) -> Result<()>;
}

/// The order of `UnitEvent`s of one training micro-batch (`forward_backward_with`) over `layers` layers: a rank
/// with no micro-batch in a step replays it so that every rank makes the same collective calls.
pub fn training_events(layers: usize) -> Vec<UnitEvent> {
    use UnitEvent::*;
    let head = layers + 1;
    let mut ev = vec![Acquire(0), Release(0)];
    for l in 1..=layers {
        ev.extend([Acquire(l), Release(l)]);
    }
    ev.extend([Acquire(head), GradsReady(head), Release(head)]);
    for l in (1..=layers).rev() {
        ev.extend([Acquire(l), GradsReady(l), Release(l)]);
    }
    ev.push(GradsReady(0));
    ev
}

/// The order of `UnitEvent`s of one evaluation batch (`forward_loss_with`).
pub fn eval_events(layers: usize) -> Vec<UnitEvent> {
    (0..=layers + 1).flat_map(|u| [UnitEvent::Acquire(u), UnitEvent::Release(u)]).collect()
}

/// The backend as the forward/backward loops see it: shared (no events) or owned by hooks between units.
trait Access<B: Backend> {
    fn be(&self) -> &B;
    fn event(&mut self, ev: UnitEvent, grads: Option<&mut B::Buf>) -> Result<()>;
}

struct Plain<'a, B: Backend>(&'a B);

impl<B: Backend> Access<B> for Plain<'_, B> {
    fn be(&self) -> &B {
        self.0
    }
    fn event(&mut self, _: UnitEvent, _: Option<&mut B::Buf>) -> Result<()> {
        Ok(())
    }
}

struct Hooked<'a, B: Backend> {
    be: &'a mut B,
    hooks: &'a mut dyn UnitHooks<B>,
}

impl<B: Backend> Access<B> for Hooked<'_, B> {
    fn be(&self) -> &B {
        self.be
    }
    fn event(&mut self, ev: UnitEvent, grads: Option<&mut B::Buf>) -> Result<()> {
        self.hooks.on(ev, self.be, grads)
    }
}

/// A GPT-NeoX model whose parameters live on backend `B`.
pub struct Model<B: Backend = Cpu> {
    pub config: NeoxConfig,
    pub layout: Layout,
    pub(crate) be: B,
    pub(crate) layers: Vec<LayerParams>,
}

/// Preallocated buffers for forward/backward of batches up to (B,T); reused across steps.
pub struct Activations<B: Backend = Cpu> {
    b: usize,
    t: usize,
    recompute: bool,
    x: Vec<B::Buf>, // L+1 of (N,C): the residual stream at each layer boundary
    layers: Vec<LayerActs<B>>,
    lnf_out: B::Buf,   // (N,C)
    lnf_stats: B::Buf, // (2N)
    cos: B::Buf,       // (N, r/2)
    sin: B::Buf,
    dres: B::Buf,
    dround: B::Buf,
    dln: B::Buf,
    dattn_y: B::Buf,
    dqkv: B::Buf,
    dfc: B::Buf,
    act: B::Buf, // (N,F) GELU output of the layer being computed
    loss: B::LossScratch,
    targets: Vec<(u32, u32)>,
}

impl Activations<Cpu> {
    /// CPU buffers for batches up to `b` x `t`. With `recompute`, only layer inputs are kept and each layer's
    /// activations are recomputed during the backward (gradient checkpointing; identical gradients).
    pub fn new(c: &NeoxConfig, b: usize, t: usize, recompute: bool) -> Self {
        Activations::on(&Cpu::new(Vec::new(), &Layout::new(c)), c, b, t, recompute)
    }

    /// Make sure batches up to `b` x `t` fit, reallocating (larger) only when they do not.
    pub fn ensure(&mut self, c: &NeoxConfig, b: usize, t: usize) {
        if b > self.b || t > self.t {
            *self = Activations::new(c, b.max(self.b), t.max(self.t), self.recompute);
        }
    }
}

impl<B: Backend> Activations<B> {
    /// Buffers on backend `be` (see `Activations::new`).
    pub fn on(be: &B, c: &NeoxConfig, b: usize, t: usize, recompute: bool) -> Self {
        let (n, cc, f, l) = (b * t, c.hidden_size, c.intermediate_size, c.num_hidden_layers);
        let half = c.rotary_ndims() / 2;
        let att = be.attention_saved_len(AttnShape { b, t, h: c.num_attention_heads, d: c.head_dim() });
        let kept = if recompute { 1 } else { l };
        Activations {
            b,
            t,
            recompute,
            x: (0..=l).map(|_| be.zeros(n * cc)).collect(),
            layers: (0..kept).map(|_| LayerActs::new(be, c, n, att)).collect(),
            lnf_out: be.zeros(n * cc),
            lnf_stats: be.zeros(2 * n),
            cos: be.zeros(n * half),
            sin: be.zeros(n * half),
            dres: be.zeros(n * cc),
            dround: be.zeros(n * cc),
            dln: be.zeros(n * cc),
            dattn_y: be.zeros(n * cc),
            dqkv: be.zeros(n * 3 * cc),
            dfc: be.zeros(n * f),
            act: be.zeros(n * f),
            loss: Default::default(),
            targets: Vec::new(),
        }
    }

    pub fn recompute(&self) -> bool {
        self.recompute
    }

    /// Bytes held by the activation buffers (for memory reports).
    pub fn bytes(&self) -> usize {
        let layers: usize = self.layers.iter().map(|a| a.elements()).sum();
        let x: usize = self.x.iter().map(|b| B::len(b)).sum();
        let grads = [&self.dres, &self.dround, &self.dln, &self.dattn_y, &self.dqkv, &self.dfc, &self.act];
        4 * (layers + x + grads.iter().map(|b| B::len(b)).sum::<usize>() + B::len(&self.lnf_out))
    }
}

impl Model<Cpu> {
    /// A CPU model from a config and a flat parameter buffer in `Layout` order.
    pub fn from_parts(config: NeoxConfig, params: Vec<f32>) -> Result<Self> {
        let layout = Layout::new(&config);
        if params.len() != layout.total {
            return Err(Error::invalid(format!(
                "{} parameters given, the config needs {}",
                params.len(),
                layout.total
            )));
        }
        let be = Cpu::new(params, &layout);
        Ok(Model::on(config, layout, be))
    }

    pub fn params(&self) -> &[f32] {
        self.be.params()
    }

    /// Mutable parameters (optimizer steps, tests); invalidates the backend's derived weight formats.
    pub fn params_mut(&mut self) -> &mut [f32] {
        self.be.params_mut()
    }

    /// Decode with bfloat16 copies of the Linear and head weights (f32 activations and accumulation): half the
    /// memory traffic per generated token, at bf16 weight precision (Dolly's own inference dtype). Prefill of
    /// many rows and training keep using the f32 weights.
    pub fn set_decode_bf16(&mut self, on: bool) {
        self.be.set_decode_bf16(on)
    }

    /// Whether decoding reads bf16 weight copies (and keeps a bf16 KV cache).
    pub fn decode_bf16(&self) -> bool {
        self.be.decode_bf16()
    }

    /// bf16 mixed precision for the training forward/backward: the operands of every matrix product are bf16
    /// values, accumulation and everything else stay f32, and the parameters are the f32 master weights. On CPUs
    /// without bf16 arithmetic this reproduces bf16 numerics at f32 speed.
    pub fn set_compute_bf16(&mut self, on: bool) {
        self.be.set_compute_bf16(on)
    }

    pub fn compute_bf16(&self) -> bool {
        self.be.compute_bf16()
    }

    /// Build now what decoding builds lazily on first use (a server calls this at start).
    pub fn prepare_decode(&self) {
        self.be.prepare_decode()
    }
}

impl<B: Backend> Model<B> {
    /// A model from its config, layout and a backend holding its parameters.
    pub fn on(config: NeoxConfig, layout: Layout, be: B) -> Self {
        let layers = layout.layers.iter().map(|o| LayerParams::new(&config, o)).collect();
        Model { config, layout, be, layers }
    }

    pub fn backend(&self) -> &B {
        &self.be
    }

    /// The backend, for a sharding layer that writes gathered units and shard updates into it.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.be
    }

    /// Hand `events` to `hooks` without computing anything: a rank with no micro-batch in a step (or no
    /// evaluation batch) makes the same collective calls as the ranks that compute.
    pub fn replay(&mut self, events: &[UnitEvent], grads: &mut B::Buf, hooks: &mut dyn UnitHooks<B>) -> Result<()> {
        for &ev in events {
            let g = matches!(ev, UnitEvent::GradsReady(_)).then_some(&mut *grads);
            hooks.on(ev, &mut self.be, g)?;
        }
        Ok(())
    }

    pub fn num_params(&self) -> usize {
        self.layout.total
    }

    /// The model's units in layout order (embedding, each layer, final norm + head): contiguous ranges of the
    /// flat parameter, gradient and moment buffers, the granularity of sharding and reduction.
    pub fn units(&self) -> Vec<Unit> {
        self.layout.units()
    }

    /// A zeroed gradient buffer (layout order).
    pub fn new_grads(&self) -> B::Buf {
        self.be.zeros(self.grad_len())
    }

    /// Elements of a gradient buffer: every parameter, or an attached adapter's only (LoRA).
    pub fn grad_len(&self) -> usize {
        self.be.grad_len(self.layout.total)
    }

    /// Zero a gradient buffer.
    pub fn zero_grads(&self, grads: &mut B::Buf) {
        self.be.zero(grads, self.grad_len())
    }

    /// Global L2 norm of a gradient buffer.
    pub fn grad_norm(&self, grads: &B::Buf) -> f64 {
        self.be.norm(grads)
    }

    /// The training step's optimizer update: gradients scaled by the clip coefficient `coef`, AdamW at `lr`,
    /// gradients zeroed, the backend's derived weight formats refreshed in the same pass.
    pub fn adamw_step(&mut self, opt: &mut AdamW, grads: &mut B::Buf, lr: f32, coef: f32) {
        self.be.adamw_step(opt, grads, lr, coef)
    }

    pub(crate) fn heads(&self) -> Heads {
        let c = &self.config;
        Heads { h: c.num_attention_heads, d: c.head_dim(), r: c.rotary_ndims(), base: c.rotary_emb_base }
    }

    pub(crate) fn block(&self) -> Block<'_, B> {
        Block { be: &self.be, cfg: &self.config, heads: self.heads() }
    }

    pub(crate) fn embedding(&self) -> Embedding {
        Embedding { w: self.layout.embed_in, v: self.config.vocab_size, c: self.config.hidden_size }
    }

    pub(crate) fn final_norm(&self) -> LayerNorm {
        let eps = self.config.layer_norm_eps as f32;
        LayerNorm { w: self.layout.lnf_w, b: self.layout.lnf_b, c: self.config.hidden_size, eps }
    }

    pub(crate) fn head(&self) -> Linear {
        Linear { w: self.layout.embed_out, b: None, ic: self.config.hidden_size, oc: self.config.vocab_size }
    }

    fn check_capacity(&self, batch: &BatchInput<'_>, acts: &Activations<B>) -> Result<()> {
        batch.validate(self.config.vocab_size, self.config.max_position_embeddings)?;
        if batch.batch_size > acts.b || batch.seq_len > acts.t {
            return Err(Error::invalid(format!(
                "batch {}x{} exceeds the activation buffers {}x{}",
                batch.batch_size, batch.seq_len, acts.b, acts.t
            )));
        }
        Ok(())
    }

    /// The descriptors the loops read besides the backend (copied out so that hooks may own the backend).
    fn parts(&self) -> Parts<'_> {
        Parts { cfg: &self.config, layers: &self.layers, d: self.descriptors() }
    }

    fn descriptors(&self) -> Descriptors {
        Descriptors { heads: self.heads(), embed: self.embedding(), lnf: self.final_norm(), head: self.head() }
    }

    /// Loss sum and target count of a batch, with no gradient (evaluation).
    pub fn forward_loss(&self, batch: &BatchInput<'_>, acts: &mut Activations<B>) -> Result<(f64, usize)> {
        self.check_capacity(batch, acts)?;
        self.parts().loss(&mut Plain(&self.be), batch, acts)
    }

    /// `forward_loss` with `hooks` told of every unit before and after it is read (`eval_events` order).
    pub fn forward_loss_with(
        &mut self,
        batch: &BatchInput<'_>,
        acts: &mut Activations<B>,
        hooks: &mut dyn UnitHooks<B>,
    ) -> Result<(f64, usize)> {
        self.check_capacity(batch, acts)?;
        let parts = Parts { cfg: &self.config, layers: &self.layers, d: self.descriptors() };
        parts.loss(&mut Hooked { be: &mut self.be, hooks }, batch, acts)
    }

    /// Full logits (N,V) of a batch (tests, scoring). Training never materialises these.
    pub fn forward_logits(&self, batch: &BatchInput<'_>, acts: &mut Activations<B>) -> Result<B::Buf> {
        self.check_capacity(batch, acts)?;
        let acc = &mut Plain(&self.be);
        self.parts().body(acc, batch, acts)?;
        let n = batch.rows();
        let mut logits = self.be.zeros(n * self.config.vocab_size);
        self.be.linear(&mut logits, &acts.lnf_out, self.head(), n, false, crate::backend::Pass::Train);
        Ok(logits)
    }

    /// Forward + backward of one micro-batch. Adds `grad_scale · ∂(Σ loss)/∂θ` into `grads` (len = num_params)
    /// and returns (loss sum, target count). Use `grad_scale = 1 / total target count` over all micro-batches
    /// (and ranks) of the step for a token-weighted mean.
    pub fn forward_backward(
        &self,
        batch: &BatchInput<'_>,
        acts: &mut Activations<B>,
        grads: &mut B::Buf,
        grad_scale: f32,
    ) -> Result<(f64, usize)> {
        self.check_grads(batch, acts, grads)?;
        self.parts().train(&mut Plain(&self.be), batch, acts, grads, grad_scale)
    }

    /// `forward_backward` with `hooks` told of every unit before and after it is read and when its gradients
    /// are complete (`training_events` order): the seam of ZeRO-2/3.
    pub fn forward_backward_with(
        &mut self,
        batch: &BatchInput<'_>,
        acts: &mut Activations<B>,
        grads: &mut B::Buf,
        grad_scale: f32,
        hooks: &mut dyn UnitHooks<B>,
    ) -> Result<(f64, usize)> {
        self.check_grads(batch, acts, grads)?;
        let parts = Parts { cfg: &self.config, layers: &self.layers, d: self.descriptors() };
        parts.train(&mut Hooked { be: &mut self.be, hooks }, batch, acts, grads, grad_scale)
    }

    fn check_grads(&self, batch: &BatchInput<'_>, acts: &Activations<B>, grads: &B::Buf) -> Result<()> {
        if !self.be.trainable() {
            return Err(Error::invalid("this model is quantized: it can answer and be evaluated, not trained"));
        }
        self.check_capacity(batch, acts)?;
        if B::len(grads) != self.grad_len() {
            return Err(Error::invalid(format!(
                "gradient buffer has {} entries, expected {}",
                B::len(grads),
                self.grad_len()
            )));
        }
        Ok(())
    }
}

/// What the forward and backward loops read besides the backend.
struct Parts<'a> {
    cfg: &'a NeoxConfig,
    layers: &'a [LayerParams],
    d: Descriptors,
}

/// The tensors outside the layers, as the backend addresses them.
#[derive(Clone, Copy)]
struct Descriptors {
    heads: Heads,
    embed: Embedding,
    lnf: LayerNorm,
    head: Linear,
}

impl Parts<'_> {
    fn shape(&self, batch: &BatchInput<'_>) -> AttnShape {
        let c = self.cfg;
        AttnShape { b: batch.batch_size, t: batch.seq_len, h: c.num_attention_heads, d: c.head_dim() }
    }

    /// Embedding, all layers and the final LayerNorm; activations kept per `acts.recompute`. Leaves the last
    /// unit (final norm + head) acquired: the caller releases it.
    fn body<B: Backend>(
        &self,
        acc: &mut impl Access<B>,
        batch: &BatchInput<'_>,
        acts: &mut Activations<B>,
    ) -> Result<()> {
        use UnitEvent::*;
        let (n, c, layers) = (batch.rows(), self.cfg.hidden_size, self.layers.len());
        let (vis, shape) = (visibility(batch), self.shape(batch));
        acc.be().rope_table(&mut acts.cos, &mut acts.sin, batch.position_ids, self.d.heads);
        // embed_in: ids (N) -> x0 (N,C)
        acc.event(Acquire(0), None)?;
        acc.be().embed(&mut acts.x[0], batch.input_ids, self.d.embed);
        acc.event(Release(0), None)?;
        for (l, p) in self.layers.iter().enumerate() {
            acc.event(Acquire(l + 1), None)?;
            let (lo, hi) = acts.x.split_at_mut(l + 1);
            let a = &mut acts.layers[if acts.recompute { 0 } else { l }];
            let rope = (&acts.cos, &acts.sin);
            let step = Step { n, act: &mut acts.act, rope, attend: Attend::Batch { vis, shape } };
            Block { be: acc.be(), cfg: self.cfg, heads: self.d.heads }.forward(l, p, (&lo[l], &mut hi[0]), a, step);
            acc.event(Release(l + 1), None)?;
        }
        acc.event(Acquire(layers + 1), None)?;
        let be = acc.be();
        be.layernorm(&mut acts.lnf_out, &mut acts.lnf_stats, &acts.x[layers], self.d.lnf, n);
        be.operand(&mut acts.lnf_out, n * c);
        Ok(())
    }

    fn loss<B: Backend>(
        &self,
        acc: &mut impl Access<B>,
        batch: &BatchInput<'_>,
        acts: &mut Activations<B>,
    ) -> Result<(f64, usize)> {
        self.body(acc, batch, acts)?;
        batch.targets(&mut acts.targets);
        let loss = acc.be().lm_head_loss(&acts.lnf_out, self.d.head, &acts.targets, None, &mut acts.loss);
        acc.event(UnitEvent::Release(self.layers.len() + 1), None)?;
        Ok((loss, acts.targets.len()))
    }

    fn train<B: Backend>(
        &self,
        acc: &mut impl Access<B>,
        batch: &BatchInput<'_>,
        acts: &mut Activations<B>,
        grads: &mut B::Buf,
        grad_scale: f32,
    ) -> Result<(f64, usize)> {
        use UnitEvent::*;
        let (n, c, layers) = (batch.rows(), self.cfg.hidden_size, self.layers.len());
        self.body(acc, batch, acts)?;
        batch.targets(&mut acts.targets);
        let be = acc.be();
        // lm head + loss: (N,C) -> Σ loss; ∂/∂lnf_out into dln
        be.zero(&mut acts.dln, n * c);
        let grad = HeadGrad { dx: &mut acts.dln, grads: &mut *grads, scale: grad_scale };
        let loss = be.lm_head_loss(&acts.lnf_out, self.d.head, &acts.targets, Some(grad), &mut acts.loss);
        // final LayerNorm: ∂/∂x_L into dres
        be.zero(&mut acts.dres, n * c);
        be.layernorm_bwd(&mut acts.dres, grads, &acts.dln, (&acts.x[layers], &acts.lnf_stats), self.d.lnf, n);
        acc.event(GradsReady(layers + 1), Some(grads))?;
        acc.event(Release(layers + 1), None)?;
        let (vis, shape) = (visibility(batch), self.shape(batch));
        for (l, p) in self.layers.iter().enumerate().rev() {
            acc.event(Acquire(l + 1), None)?;
            let block = Block { be: acc.be(), cfg: self.cfg, heads: self.d.heads };
            let (lo, hi) = acts.x.split_at_mut(l + 1);
            let a = &mut acts.layers[if acts.recompute { 0 } else { l }];
            if acts.recompute {
                // deterministic recompute: rewrites x[l+1] with identical values
                let rope = (&acts.cos, &acts.sin);
                let step = Step { n, act: &mut acts.act, rope, attend: Attend::Batch { vis, shape } };
                block.forward(l, p, (&lo[l], &mut hi[0]), a, step);
            }
            let mut g = LayerGrads {
                grads: &mut *grads,
                dres: &mut acts.dres,
                dround: &mut acts.dround,
                dln: &mut acts.dln,
                dattn_y: &mut acts.dattn_y,
                dqkv: &mut acts.dqkv,
                dfc: &mut acts.dfc,
                act: &mut acts.act,
            };
            let fwd = Backward { n, rope: (&acts.cos, &acts.sin), vis, shape, act_ready: acts.recompute };
            block.backward(p, &lo[l], a, &mut g, fwd);
            acc.event(GradsReady(l + 1), Some(grads))?;
            acc.event(Release(l + 1), None)?;
        }
        // embed_in: scatter-add rows of ∂L/∂x0 (reads no parameter)
        acc.be().embed_bwd(grads, &acts.dres, batch.input_ids, self.d.embed);
        acc.event(GradsReady(0), Some(grads))?;
        Ok((loss, acts.targets.len()))
    }
}

fn visibility<'a>(batch: &BatchInput<'a>) -> Visibility<'a> {
    Visibility { attention_mask: batch.attention_mask, doc_ids: batch.doc_ids }
}
