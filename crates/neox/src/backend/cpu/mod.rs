//! The CPU backend: parameters in one f32 buffer (layout order) plus the formats its kernels read, built from
//! them and kept fresh:
//! - `wt`: the Linear/head weights transposed (IC, OC) at the same offsets. `gemm` runs faster on x·Wᵀ
//!   with Wᵀ row-major than when it transposes while packing (docs/benchmarks.md#training-step-tuning). The fused AdamW writes it while each updated
//!   block is in cache, so a training step never rebuilds it; `params_mut` invalidates it. In bf16 compute it
//!   holds the rounded (bf16-valued) weights; on the AVX512_BF16 kernel (`bf16.rs`) training does not use it
//!   (the kernel packs the master weights directly), so it is not kept (4 bytes per parameter less).
//! - `packed`: bf16 copies of the same matrices in panels (`kernels::matvec_bf16`), for few-row decoding in
//!   bf16, built on first use.
//!
//! Ops dispatch to the kernels in `crate::kernels` (`ops.rs`); the KV cache is `kv.rs`.

mod bf16;
mod frozen;
mod kv;
mod lora;
mod ops;
mod quant;
mod vectors;

pub use kv::CpuKv;
pub use quant::QuantType;
pub(crate) use quant::{QMatrix, QuantBase};

use frozen::Base16;
use lora::CpuLora;

use crate::kernels::math::round_bf16_slice;
use crate::kernels::matvec_bf16::{pack_bf16, packed_lines, Line};
use crate::kernels::transpose::transpose;
use crate::layout::Layout;
use crate::optim::{AdamW, Transposed};
use std::sync::{Mutex, OnceLock};

/// The CPU device: parameters and their derived formats.
pub struct Cpu {
    params: Vec<f32>,
    /// Where each tensor is (the optimizer's weight-decay set).
    layout: Layout,
    /// (offset, rows, cols) of each (OC, IC) weight matrix kept transposed in `wt` and packed in `packed`.
    mats: Vec<(usize, usize, usize)>,
    wt: OnceLock<Vec<f32>>,
    /// The previous `wt` allocation, reused after `params_mut` (a fresh 4·P-byte buffer per optimizer step would
    /// cost page faults on every step).
    spare: Mutex<Vec<f32>>,
    /// Few-row decoding reads bf16 panels of the weights (f32 activations and accumulation).
    decode_bf16: bool,
    packed: OnceLock<PackedBf16>,
    /// bf16 mixed precision for training: product operands are bf16 values, everything else f32.
    compute_bf16: bool,
    /// In bf16 compute, the training products go to the AVX512_BF16 kernel (`kernels::gemm_bf16`) where the CPU
    /// has it; off: the f32 gemm on the bf16 values (the same definition; tests compare the two).
    bf16_kernel: bool,
    /// A frozen base held in bf16 instead of `params` (which is then empty): LoRA on big models.
    base16: Option<Base16>,
    /// An attached LoRA adapter: the base is frozen, gradients and the optimizer cover the adapter only.
    lora: Option<CpuLora>,
    /// A bf16 base's products read its weights packed once (`Base16::panels`) instead of packing per call.
    packed_weights: bool,
    /// A base held quantized instead of `params` (which is then empty): inference only.
    quant: Option<QuantBase>,
}

/// The Linear weights and the LM head of `layout`: (offset, rows, cols).
fn matrices(layout: &Layout) -> Vec<(usize, usize, usize)> {
    let mut mats = vec![];
    if let Some(head) = layout.find("embed_out.weight") {
        mats.push((head.offset, head.shape[0], head.shape[1]));
    }
    for p in &layout.params {
        let linear = p.shape.len() == 2 && p.name.starts_with("gpt_neox.layers.");
        if linear {
            mats.push((p.offset, p.shape[0], p.shape[1]));
        }
    }
    mats
}

/// Bytes a bf16 base of `layout` takes in packed form (`Cpu::set_packed_weights`): 0 where the CPU does not take
/// the AMX path.
pub fn packed_weight_bytes(layout: &Layout) -> usize {
    frozen::panel_bytes(&matrices(layout))
}

impl Cpu {
    /// A CPU device holding `params` (layout order) for `layout`.
    pub fn new(params: Vec<f32>, layout: &Layout) -> Self {
        let mats = matrices(layout);
        Cpu {
            params,
            layout: layout.clone(),
            mats,
            wt: OnceLock::new(),
            spare: Mutex::new(Vec::new()),
            decode_bf16: false,
            packed: OnceLock::new(),
            compute_bf16: false,
            bf16_kernel: true,
            base16: None,
            lora: None,
            packed_weights: false,
            quant: None,
        }
    }

    /// A CPU device holding a quantized base (inference only): decoding keeps a bf16 KV cache.
    pub(crate) fn new_quant(q: QuantBase, layout: &Layout) -> Self {
        let mut cpu = Cpu::new(Vec::new(), layout);
        cpu.quant = Some(q);
        cpu.decode_bf16 = true;
        cpu
    }

    /// The format of a quantized base, if the base is one.
    pub fn quant_type(&self) -> Option<QuantType> {
        self.quant.as_ref().map(|q| q.kind)
    }

    /// The quantized matrix at layout offset `off`, if the base is quantized.
    pub(crate) fn quant_matrix(&self, off: usize) -> Option<&quant::QMatrix> {
        self.quant.as_ref().and_then(|q| q.matrix(off))
    }

    /// A CPU device holding a frozen base as bf16 bits (`w16`, layout order): no f32 copy of any matrix.
    pub fn new_bf16(w16: Vec<u16>, layout: &Layout) -> Self {
        let mut cpu = Cpu::new(Vec::new(), layout);
        cpu.base16 = Some(Base16::new(w16, layout));
        cpu
    }

    /// Replace a bf16-held base (a resized vocabulary), keeping the modes.
    pub(crate) fn replace_bf16(&mut self, w16: Vec<u16>, layout: &Layout) {
        let (decode, compute, packed) = (self.decode_bf16, self.compute_bf16, self.packed_weights);
        *self = Cpu::new_bf16(w16, layout);
        self.decode_bf16 = decode;
        self.compute_bf16 = compute;
        self.packed_weights = packed;
    }

    /// Take the bf16 bits out of a bf16-held base (to be resized in place and put back with `replace_bf16`).
    pub(crate) fn take_bf16(&mut self) -> Option<Vec<u16>> {
        self.base16.take().map(|b| b.w)
    }

    /// A bf16 base keeps its weights packed for the AMX products (`on`), 4 bytes per weight more, built at the
    /// first training product; `packed_weight_bytes` says how much (0: the CPU does not take that path).
    /// No effect without a bf16 base.
    pub fn set_packed_weights(&mut self, on: bool) {
        self.packed_weights = on;
    }

    /// Whether the base is held in bf16 (`new_bf16`).
    pub fn base_bf16(&self) -> bool {
        self.base16.is_some()
    }

    /// The bf16 bits of the base tensor at `off` (a bf16 base only).
    pub(crate) fn base_bits(&self, off: usize, len: usize) -> Option<&[u16]> {
        self.base16.as_ref().map(|b| b.bits(off, len))
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Mutable parameters; invalidates the derived formats.
    pub fn params_mut(&mut self) -> &mut [f32] {
        self.invalidate();
        &mut self.params
    }

    /// Replace every parameter (a resized vocabulary); drops the derived formats and their spare buffer.
    pub fn replace(&mut self, params: Vec<f32>, layout: &Layout) {
        let (decode, compute, kernel) = (self.decode_bf16, self.compute_bf16, self.bf16_kernel);
        *self = Cpu::new(params, layout);
        self.decode_bf16 = decode;
        self.compute_bf16 = compute;
        self.bf16_kernel = kernel;
    }

    /// Decode with bf16 weight panels and KV cache (a quantized base always keeps its KV cache in bf16).
    pub fn set_decode_bf16(&mut self, on: bool) {
        self.decode_bf16 = on || self.quant.is_some();
    }

    pub fn decode_bf16(&self) -> bool {
        self.decode_bf16
    }

    pub fn set_compute_bf16(&mut self, on: bool) {
        if self.compute_bf16 != on {
            self.compute_bf16 = on;
            self.invalidate();
        }
    }

    pub fn compute_bf16(&self) -> bool {
        self.compute_bf16
    }

    /// Whether bf16 compute may use the bf16 product kernels (AMX or AVX512_BF16; default on; off forces the f32 gemm on the
    /// bf16 values, for comparisons).
    pub fn set_bf16_kernel(&mut self, on: bool) {
        self.bf16_kernel = on;
    }

    /// Whether the training products run on the AVX512_BF16 kernel: bf16 compute, the kernel allowed, and
    /// the CPU has it.
    pub(crate) fn bf16_products(&self) -> bool {
        self.compute_bf16 && self.bf16_kernel && crate::kernels::gemm_bf16::available()
    }

    /// The path the training products take: "amx-bf16" or "avx512bf16" (the bf16 kernels) or "f32" (the f32
    /// gemm, on bf16 values in bf16 compute).
    pub fn product_path(&self) -> &'static str {
        if self.bf16_products() {
            crate::kernels::gemm_bf16::path_name()
        } else {
            "f32"
        }
    }

    /// Build now what decoding builds lazily: the bf16 panels (when decoding in bf16) and the transposed weights
    /// that prompts longer than the few-row path use (otherwise a server's first long prompt pays for building them).
    pub fn prepare_decode(&self) {
        if self.base16.is_none() && self.quant.is_none() {
            let _ = self.packed();
            let _ = self.wt();
        }
    }

    fn invalidate(&mut self) {
        self.packed = OnceLock::new();
        if let Some(old) = self.wt.take() {
            *self.spare.get_mut().unwrap_or_else(|e| e.into_inner()) = old;
        }
    }

    /// The f32 values of the tensor at `off`; with a bf16 base only its 1-D tensors are f32.
    fn p(&self, off: usize, len: usize) -> &[f32] {
        match (&self.base16, &self.quant) {
            (Some(b), _) => b.vector(off, len),
            (None, Some(q)) => q.vector(off, len),
            (None, None) => &self.params[off..off + len],
        }
    }

    /// The f32 values of any base tensor at `off` (`len` elements): parameters, a bf16 base widened, a
    /// quantized base dequantized.
    pub(crate) fn tensor_f32(&self, off: usize, len: usize) -> std::borrow::Cow<'_, [f32]> {
        use std::borrow::Cow;
        if let Some(m) = self.quant_matrix(off) {
            let mut v = vec![0f32; len];
            for (r, row) in v.chunks_exact_mut(m.cols()).enumerate() {
                m.dequantize_row(r, row);
            }
            return Cow::Owned(v);
        }
        if self.quant.is_some() {
            return Cow::Borrowed(self.p(off, len));
        }
        match &self.base16 {
            Some(b) => Cow::Owned(b.bits(off, len).iter().map(|&x| crate::kernels::w16::bf16_to_f32(x)).collect()),
            None => Cow::Borrowed(&self.params[off..off + len]),
        }
    }

    /// The transposed (IC, OC) copy of the weight at `off`.
    fn t(&self, off: usize, len: usize) -> &[f32] {
        &self.wt()[off..off + len]
    }

    /// Transposed Linear/head weights, built on first use after a change.
    fn wt(&self) -> &[f32] {
        self.wt.get_or_init(|| {
            let mut wt = std::mem::take(&mut *self.spare.lock().unwrap_or_else(|e| e.into_inner()));
            if wt.len() != self.params.len() {
                wt = vec![0f32; self.params.len()];
            }
            for &(off, rows, cols) in &self.mats {
                transpose(&mut wt[off..off + rows * cols], &self.params[off..off + rows * cols], rows, cols);
                if self.compute_bf16 {
                    round_bf16_slice(&mut wt[off..off + rows * cols]);
                }
            }
            wt
        })
    }

    /// The bf16 panels, when decoding in bf16 (built on first use after a change).
    fn packed(&self) -> Option<&PackedBf16> {
        if !self.decode_bf16 || self.base16.is_some() || self.quant.is_some() {
            return None;
        }
        Some(self.packed.get_or_init(|| {
            let mut at = Vec::with_capacity(self.mats.len());
            let mut len = 0;
            for &(o, rows, cols) in &self.mats {
                at.push((o, len));
                len += packed_lines(rows, cols);
            }
            let mut lines = vec![Line::default(); len];
            for (&(o, rows, cols), &(_, start)) in self.mats.iter().zip(&at) {
                let n = packed_lines(rows, cols);
                pack_bf16(&mut lines[start..start + n], &self.params[o..o + rows * cols], rows, cols);
            }
            PackedBf16 { lines, at }
        }))
    }

    /// The training step's optimizer update on every parameter, refreshing `wt` in the same pass.
    fn fused_adamw(&mut self, opt: &mut AdamW, grads: &mut [f32], lr: f32, coef: f32) {
        if self.bf16_products() {
            // the bf16 kernel reads the master weights themselves: no transposed copy to keep (one built for
            // decoding goes stale)
            self.invalidate();
            return opt.step_scaled_and_zero(&mut self.params, grads, lr, &self.layout, coef);
        }
        self.packed = OnceLock::new();
        let spare = std::mem::take(self.spare.get_mut().unwrap_or_else(|e| e.into_inner()));
        let mut wt = self.wt.take().unwrap_or(spare);
        wt.resize(self.params.len(), 0.0);
        let into = Transposed { wt: &mut wt, mats: &self.mats, round_bf16: self.compute_bf16 };
        opt.step_scaled_zero_transposed(&mut self.params, grads, lr, &self.layout, coef, into);
        self.wt = OnceLock::from(wt);
    }
}

/// LoRA: an adapter attached to a frozen base.
impl Cpu {
    /// Attach an adapter with these values (`layout` order); the base is frozen from now on.
    pub(crate) fn attach_lora(
        &mut self,
        cfg: crate::lora::LoraConfig,
        layout: crate::lora::AdapterLayout,
        params: Vec<f32>,
    ) {
        assert_eq!(params.len(), layout.total, "adapter size");
        let scale = cfg.scale();
        self.lora = Some(CpuLora { layout, cfg, params, scale, seed: None });
    }

    /// Remove the adapter (the base is trainable again).
    pub(crate) fn detach_lora(&mut self) {
        self.lora = None;
    }

    pub(crate) fn lora(&self) -> Option<(&crate::lora::LoraConfig, &crate::lora::AdapterLayout, &[f32])> {
        self.lora.as_ref().map(|l| (&l.cfg, &l.layout, &l.params[..]))
    }

    pub(crate) fn lora_params_mut(&mut self) -> Option<&mut [f32]> {
        self.lora.as_mut().map(|l| &mut l.params[..])
    }

    /// `Some(seed)`: the LoRA branches of training products drop inputs with this micro-batch's mask.
    pub(crate) fn set_dropout_seed(&mut self, seed: Option<u64>) {
        if let Some(l) = self.lora.as_mut() {
            l.seed = seed;
        }
    }

    /// Row `row` (of `c` values) of the base matrix at `off`, as f32.
    pub(crate) fn base_row(&self, off: usize, row: usize, c: usize) -> Vec<f32> {
        if let Some(m) = self.quant_matrix(off) {
            let mut v = vec![0f32; c];
            m.dequantize_row(row, &mut v);
            return v;
        }
        match &self.base16 {
            Some(b) => b.bits(off + row * c, c).iter().map(|&x| crate::kernels::w16::bf16_to_f32(x)).collect(),
            None => self.params[off + row * c..off + (row + 1) * c].to_vec(),
        }
    }
}

/// Sharded training (ZeRO): a unit's parameters written in place, the derived formats refreshed for that unit
/// only, pages of a unit given back, and the optimizer update of a shard.
impl Cpu {
    /// The parameters in `range` (a unit being gathered), to be followed by `refresh_unit(range)`.
    pub fn unit_mut(&mut self, range: std::ops::Range<usize>) -> &mut [f32] {
        self.packed = OnceLock::new();
        &mut self.params[range]
    }

    /// Rebuild the transposed copies of the weight matrices inside `range` (after `unit_mut`); the rest of `wt`
    /// is left as it is (a ZeRO-3 rank keeps only the units it is using).
    pub fn refresh_unit(&mut self, range: std::ops::Range<usize>) {
        if self.bf16_products() {
            // no transposed copies in use (see `fused_adamw`): drop one that would go stale
            self.wt = OnceLock::new();
            return;
        }
        if self.wt.get().is_none() {
            let spare = std::mem::take(self.spare.get_mut().unwrap_or_else(|e| e.into_inner()));
            let mut wt = spare;
            if wt.len() != self.params.len() {
                // zero-filled fresh memory: pages become resident only for the units written
                wt = vec![0f32; self.params.len()];
            }
            self.wt = OnceLock::from(wt);
        }
        let Some(wt) = self.wt.get_mut() else { return };
        for &(off, rows, cols) in self.mats.iter().filter(|&&(o, r, c)| o >= range.start && o + r * c <= range.end) {
            transpose(&mut wt[off..off + rows * cols], &self.params[off..off + rows * cols], rows, cols);
            if self.compute_bf16 {
                round_bf16_slice(&mut wt[off..off + rows * cols]);
            }
        }
    }

    /// Give back the memory pages of the unit at `range` (its parameters outside `keep`, and all its transposed
    /// copies): they read as zero until the unit is gathered again. `keep` (this rank's shard) is untouched.
    pub fn release_unit(&mut self, range: std::ops::Range<usize>, keep: std::ops::Range<usize>) {
        self.packed = OnceLock::new();
        let (ka, kb) = (keep.start.clamp(range.start, range.end), keep.end.clamp(range.start, range.end));
        common::sysmem::release_pages(&mut self.params[range.start..ka]);
        common::sysmem::release_pages(&mut self.params[kb.max(ka)..range.end]);
        if let Some(wt) = self.wt.get_mut() {
            common::sysmem::release_pages(&mut wt[range]);
        }
    }

    /// Give back the pages of every transposed copy (a sharded run rebuilds them per unit).
    pub fn release_transposed(&mut self) {
        if let Some(wt) = self.wt.get_mut() {
            common::sysmem::release_pages(wt);
        }
    }

    /// The optimizer update of this rank's shard: `opt`'s moments and `grads` hold the elements of `ranges`
    /// (see `AdamW::step_ranges`). The transposed copies are not refreshed: the caller gathers the updated
    /// parameters and then calls `params_mut` (ZeRO-1/2) or `refresh_unit` per unit (ZeRO-3).
    pub fn adamw_ranges(
        &mut self,
        opt: &mut AdamW,
        grads: &mut [f32],
        ranges: &[std::ops::Range<usize>],
        lr: f32,
        coef: f32,
    ) {
        self.packed = OnceLock::new();
        opt.step_ranges(&mut self.params, grads, ranges, lr, &self.layout, coef);
    }
}

/// The bf16 copies of the weight matrices for few-row decoding, each packed in panels.
struct PackedBf16 {
    lines: Vec<Line>,
    /// (parameter offset, first line) of each matrix.
    at: Vec<(usize, usize)>,
}

impl PackedBf16 {
    /// The packed lines of the matrix at parameter offset `off`.
    fn matrix(&self, off: usize) -> &[Line] {
        let i = self.at.iter().position(|&(o, _)| o == off).expect("a weight matrix offset");
        let end = self.at.get(i + 1).map_or(self.lines.len(), |&(_, s)| s);
        &self.lines[self.at[i].1..end]
    }
}
