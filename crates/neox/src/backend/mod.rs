//! The seam between the model's math and a device. A `Backend` owns the parameters (in whatever formats its
//! kernels want), allocates activation buffers and implements every op the GPT-NeoX block needs, forward and
//! backward. `model.rs`, `block.rs` and `decode.rs` call only these ops, so a second device (CUDA) is a second
//! implementation of this trait, and the op test (`tests/backend_ops.rs`) checks every implementation against a
//! plain reference.
//!
//! Conventions: buffers are flat f32 arrays whose first `rows x cols` elements an op uses (activation buffers are
//! sized for the largest batch and reused); parameters and gradients are addressed by their offsets in the
//! model's `Layout` (`Linear`, `LayerNorm`, `Embedding` below), so a backend may keep a weight transposed,
//! packed, quantized or with a LoRA branch without the model math knowing. Gradients ACCUMULATE into the
//! gradient buffer (one flat buffer in layout order); activation-gradient outputs are overwritten unless an op
//! says it adds.

pub mod cpu;

pub use crate::kernels::attention_train::{AttnShape, Visibility};
use crate::optim::AdamW;

/// A Linear layer: weight (OC, IC) at offset `w`, optional bias (OC) at `b`, in the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linear {
    pub w: usize,
    pub b: Option<usize>,
    pub ic: usize,
    pub oc: usize,
}

/// A LayerNorm: weight and bias (C) at offsets `w` and `b`, epsilon inside the square root.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerNorm {
    pub w: usize,
    pub b: usize,
    pub c: usize,
    pub eps: f32,
}

/// An embedding table (V, C) at offset `w`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Embedding {
    pub w: usize,
    pub v: usize,
    pub c: usize,
}

/// Heads of the fused qkv rows `(H, 3D)` and the rotary dims `r` of each head's q and k.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Heads {
    pub h: usize,
    pub d: usize,
    pub r: usize,
    pub base: f64,
}

/// What a forward product is for. `Train`: the backward reads the same weights, so the product uses the training
/// formats and dtype. `Decode`: inference on few rows, where the backend may pick memory-bound kernels and
/// inference-only weight copies (bf16 panels, later quantized blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Train,
    Decode,
}

/// Gradient outputs of the LM head loss: dx (N,C) += ∂/∂x and the head weight's gradient in `grads`, both of
/// `scale · Σ loss`.
pub struct HeadGrad<'a, B: Backend> {
    pub dx: &'a mut B::Buf,
    pub grads: &'a mut B::Buf,
    pub scale: f32,
}

/// Sizes of a KV cache: `layers` x `batch` rows x `slots` (a multiple of the backend's block) x heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub batch: usize,
    pub slots: usize,
    pub h: usize,
    pub d: usize,
}

/// A device: parameter storage and the ops of the GPT-NeoX block.
pub trait Backend: Send + Sync + Sized {
    /// An f32 buffer on the device.
    type Buf: Send + Sync;
    /// Reusable scratch of the LM head loss.
    type LossScratch: Default + Send;
    /// The keys and values of a KV cache.
    type Kv: Send;

    // ---- buffers
    /// A zeroed buffer of `len` elements.
    fn zeros(&self, len: usize) -> Self::Buf;
    /// Elements in `buf`.
    fn len(buf: &Self::Buf) -> usize;
    /// A buffer holding `host`'s values.
    fn upload(&self, host: &[f32]) -> Self::Buf;
    /// The values of `buf`, on the host.
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    /// Grow `buf` to at least `len` elements (decode scratch, sized on demand).
    fn grow(&self, buf: &mut Self::Buf, len: usize);
    /// buf[..len] = 0.
    fn zero(&self, buf: &mut Self::Buf, len: usize);
    /// dst[..len] = src[..len].
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf, len: usize);
    /// dst[..len] += src[..len].
    fn add(&self, dst: &mut Self::Buf, src: &Self::Buf, len: usize);
    /// dst rows k = src rows `rows[k]` (rows of `c`).
    fn gather_rows(&self, dst: &mut Self::Buf, src: &Self::Buf, rows: &[u32], c: usize);
    /// dst rows `rows[k]` = src rows k (rows of `c`).
    fn scatter_rows(&self, dst: &mut Self::Buf, src: &Self::Buf, rows: &[u32], c: usize);

    // ---- ops (shapes: N rows, C channels)
    /// x (N,C) = table rows `ids` (N).
    fn embed(&self, x: &mut Self::Buf, ids: &[u32], e: Embedding);
    /// The table's gradient rows `ids` += dx rows (duplicate ids add up, in order).
    fn embed_bwd(&self, grads: &mut Self::Buf, dx: &Self::Buf, ids: &[u32], e: Embedding);
    /// out (N,C) = LayerNorm(inp); `stats` (2N) keeps mean and 1/std for the backward.
    fn layernorm(&self, out: &mut Self::Buf, stats: &mut Self::Buf, inp: &Self::Buf, ln: LayerNorm, n: usize);
    /// dinp (N,C) += ∂/∂inp and the LayerNorm's parameter gradients += theirs, from dout and the forward's
    /// (inp, stats).
    fn layernorm_bwd(
        &self,
        dinp: &mut Self::Buf,
        grads: &mut Self::Buf,
        dout: &Self::Buf,
        saved: (&Self::Buf, &Self::Buf),
        ln: LayerNorm,
        n: usize,
    );
    /// out (N,OC) = inp (N,IC) · Wᵀ + b, or `out +=` that when `accumulate`.
    fn linear(&self, out: &mut Self::Buf, inp: &Self::Buf, lin: Linear, n: usize, accumulate: bool, pass: Pass);
    /// dinp (N,IC) = dout · W (overwritten); the Linear's weight and bias gradients += theirs.
    fn linear_bwd(
        &self,
        dinp: &mut Self::Buf,
        grads: &mut Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        lin: Linear,
        n: usize,
    );
    /// Whether `operand` rounds (bf16 compute): the block then keeps a rounded copy beside values whose f32
    /// form a backward still needs (the attention output).
    fn rounds_operands(&self) -> bool;
    /// Make x[..len] a product operand of the training compute dtype (bf16 compute rounds it in place).
    fn operand(&self, x: &mut Self::Buf, len: usize);
    /// The gradient `g` as a product operand: itself, or a rounded copy in `scratch` in bf16 compute.
    fn grad_operand<'a>(&self, scratch: &'a mut Self::Buf, g: &'a Self::Buf, len: usize) -> &'a Self::Buf;
    /// cos, sin (N, r/2) for `positions` (N).
    fn rope_table(&self, cos: &mut Self::Buf, sin: &mut Self::Buf, positions: &[u32], heads: Heads);
    /// Rotate q and k of qkv (N, H·3D) in place; `inverse` for the backward.
    fn rope(&self, qkv: &mut Self::Buf, table: (&Self::Buf, &Self::Buf), n: usize, heads: Heads, inverse: bool);
    /// Elements the training attention keeps for its backward.
    fn attention_saved_len(&self, s: AttnShape) -> usize;
    /// out (N,C) = causal attention over qkv (N,3C) with `vis`; `saved` for the backward.
    fn attention(&self, out: &mut Self::Buf, saved: &mut Self::Buf, qkv: &Self::Buf, vis: Visibility<'_>, s: AttnShape);
    /// dqkv (N,3C) (overwritten) from dout (N,C), the forward's (out, saved) and qkv.
    fn attention_bwd(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        fwd: (&Self::Buf, &Self::Buf),
        qkv: &Self::Buf,
        vis: Visibility<'_>,
        s: AttnShape,
    );
    /// out (N,F) = exact-erf GELU(inp).
    fn gelu(&self, out: &mut Self::Buf, inp: &Self::Buf, n: usize, f: usize);
    /// d[..len] *= GELU'(inp).
    fn gelu_bwd(&self, d: &mut Self::Buf, inp: &Self::Buf, len: usize);
    /// Σ over `targets` (row, id) of −log softmax(x[row] · headᵀ)[id] for x (N,C); with `grad`, the gradients.
    fn lm_head_loss(
        &self,
        x: &Self::Buf,
        head: Linear,
        targets: &[(u32, u32)],
        grad: Option<HeadGrad<'_, Self>>,
        scratch: &mut Self::LossScratch,
    ) -> f64;

    // ---- decoding
    /// Slots per key block: cache capacities are rounded up to it.
    fn kv_block(&self) -> usize;
    /// A zeroed cache (f32, or bf16 when decoding in bf16).
    fn kv_new(&self, shape: KvShape) -> Self::Kv;
    /// Bytes per cached element (for memory checks).
    fn kv_bytes(kv: &Self::Kv) -> usize;
    /// Touch every page now (commit the memory before the first request).
    fn kv_commit(&self, kv: &mut Self::Kv);
    /// Store k, v of layer `layer` from qkv rows k into (row, slot) `at[k]`.
    fn kv_append(&self, kv: &mut Self::Kv, layer: usize, qkv: &Self::Buf, at: &[(u32, u32)]);
    /// Row `dst` of every layer = row `src`'s first `len` slots (several sequences continuing one prefill).
    fn kv_copy_row(&self, kv: &mut Self::Kv, src: usize, dst: usize, len: usize);
    /// y (n,C) = attention of qkv row k's queries over its cache row `at[k].0`, slots 0..=at[k].1.
    fn attention_decode(&self, y: &mut Self::Buf, qkv: &Self::Buf, kv: &Self::Kv, layer: usize, at: &[(u32, u32)]);

    // ---- optimizer and reductions over the flat gradient buffer
    /// Clip (gradients scaled by `coef`), AdamW at `lr`, gradients zeroed, in one pass; the backend refreshes
    /// whatever weight formats it derives from the parameters.
    fn adamw_step(&mut self, opt: &mut AdamW, grads: &mut Self::Buf, lr: f32, coef: f32);
    /// Whether the parameters can be trained (a quantized base cannot).
    fn trainable(&self) -> bool {
        true
    }

    /// Elements of the gradient buffer of a model with `params` parameters: all of them, or only an attached
    /// adapter's when the base is frozen (LoRA).
    fn grad_len(&self, params: usize) -> usize;
    /// Global L2 norm (f64 accumulation in a fixed order).
    fn norm(&self, x: &Self::Buf) -> f64;
    /// Whether every element is finite.
    fn all_finite(&self, x: &Self::Buf) -> bool;
}
