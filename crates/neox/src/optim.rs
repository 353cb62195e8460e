//! AdamW with PyTorch semantics (`torch.optim.AdamW`, non-amsgrad): decoupled weight decay applied as
//! `p *= 1 - lr·wd` before the Adam update, bias-corrected moments, `eps` added after the square root. Works on
//! flat buffers with a per-tensor decay mask (HF Trainer excludes biases and LayerNorm). Also global-norm
//! clipping as `torch.nn.utils.clip_grad_norm_`. Schedules live with the training loop, not here.

use crate::kernels::transpose::transpose_block;
use crate::kernels::SendPtr;
use crate::layout::{Layout, ParamInfo};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// The tensors of a flat buffer (names, ranges, weight-decay flags) the optimizer walks: the model's layout, or
/// an adapter's.
pub trait Tensors {
    fn tensors(&self) -> &[ParamInfo];
}

impl Tensors for Layout {
    fn tensors(&self) -> &[ParamInfo] {
        &self.params
    }
}

impl Tensors for crate::lora::AdapterLayout {
    fn tensors(&self) -> &[ParamInfo] {
        &self.params
    }
}

/// Optimizer state: first and second moments (flat, layout order) and the step count.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub step: u64,
}

const CHUNK: usize = 1 << 15;

impl AdamW {
    pub fn new(cfg: AdamWConfig, n: usize) -> Self {
        AdamW { cfg, m: vec![0.0; n], v: vec![0.0; n], step: 0 }
    }

    /// One update of `params` with `grads` at learning rate `lr`. Tensors whose `decay` flag is false in
    /// `layout` get no weight decay.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32, layout: &impl Tensors) {
        self.update(params, GradSource::Read(grads), lr, layout, 1.0, None);
    }

    /// The fused end of a training step: the update with gradients scaled by `coef` (the clip coefficient,
    /// applied as `torch.nn.utils.clip_grad_norm_` would have applied it to the gradients) and the gradients
    /// zeroed for the next step — one pass over the buffers instead of three.
    pub fn step_scaled_and_zero(
        &mut self,
        params: &mut [f32],
        grads: &mut [f32],
        lr: f32,
        layout: &impl Tensors,
        coef: f32,
    ) {
        self.update(params, GradSource::ReadAndZero(grads), lr, layout, coef, None);
    }

    /// `step_scaled_and_zero` that also writes each updated weight matrix listed in `mats` (offset, rows, cols)
    /// transposed into `wt` at the same offset, while the block is still in cache: the model's transposed-weight
    /// cache is then fresh without a separate transpose pass over every matrix (a sizeable share of a step, see
    /// docs/benchmarks.md#training-step-tuning).
    /// The parameter values are bitwise those of `step_scaled_and_zero`. `round_bf16`: the transposed copies are
    /// rounded to bfloat16 (the compute weights of bf16 mixed precision; `params` stay the f32 master weights).
    pub fn step_scaled_zero_transposed(
        &mut self,
        params: &mut [f32],
        grads: &mut [f32],
        lr: f32,
        layout: &impl Tensors,
        coef: f32,
        into: Transposed<'_>,
    ) {
        assert!(into.wt.len() >= params.len());
        assert!(into.mats.iter().all(|&(o, r, c)| o + r * c <= params.len()));
        self.update(params, GradSource::ReadAndZero(grads), lr, layout, coef, Some(into));
    }

    /// The update of a shard (ZeRO-1/2/3): `self.m` and `self.v` hold only the elements of `ranges` (global
    /// offsets into the flat buffers, ascending), concatenated; `params` and `grads` are full-length buffers of
    /// which only `ranges` are read. Every element gets bitwise the update `step_scaled_and_zero` gives it on the
    /// whole buffer; the gradients in `ranges` are zeroed.
    pub fn step_ranges(
        &mut self,
        params: &mut [f32],
        grads: &mut [f32],
        ranges: &[std::ops::Range<usize>],
        lr: f32,
        layout: &impl Tensors,
        coef: f32,
    ) {
        let held: usize = ranges.iter().map(|r| r.len()).sum();
        assert!(held == self.m.len() && held == self.v.len() && params.len() == grads.len());
        assert!(ranges.iter().all(|r| r.end <= params.len()));
        self.step += 1;
        let c = self.cfg;
        let (step_size, bc2_sqrt) = bias_corrections(c, self.step, lr);
        let scaled = coef < 1.0;
        let mut local = 0usize;
        for r in ranges {
            for info in layout.tensors() {
                let t = info.range();
                let (a, b) = (t.start.max(r.start), t.end.min(r.end));
                if a >= b {
                    continue;
                }
                let decay = if info.decay { (1.0 - lr as f64 * c.weight_decay as f64) as f32 } else { 1.0 };
                let k = Scalars { cfg: c, coef, scaled, decay, step_size, bc2_sqrt };
                let l = local + (a - r.start)..local + (b - r.start);
                params[a..b]
                    .par_chunks_mut(CHUNK)
                    .zip(self.m[l.clone()].par_chunks_mut(CHUNK).zip(self.v[l.clone()].par_chunks_mut(CHUNK)))
                    .zip(grads[a..b].par_chunks_mut(CHUNK))
                    .for_each(|((p, (m, v)), g)| {
                        pulp::Arch::new().dispatch(|| k.apply(p, m, v, g));
                        g.fill(0.0);
                    });
            }
            local += r.len();
        }
    }

    fn update(
        &mut self,
        params: &mut [f32],
        grads: GradSource<'_>,
        lr: f32,
        layout: &impl Tensors,
        coef: f32,
        transposed: Option<Transposed<'_>>,
    ) {
        let glen = match &grads {
            GradSource::Read(g) => g.len(),
            GradSource::ReadAndZero(g) => g.len(),
        };
        assert!(params.len() == glen && params.len() == self.m.len());
        self.step += 1;
        let c = self.cfg;
        // Scalars in f64 as PyTorch computes them in Python floats.
        let (step_size, bc2_sqrt) = bias_corrections(c, self.step, lr);
        let scaled = coef < 1.0;
        let (gptr, zero) = match grads {
            GradSource::Read(g) => (SendPtr(g.as_ptr() as *mut f32), false),
            GradSource::ReadAndZero(g) => (SendPtr(g.as_mut_ptr()), true),
        };
        let (wtp, mats, round) = match transposed {
            Some(Transposed { wt, mats, round_bf16 }) => (Some(SendPtr(wt.as_mut_ptr())), mats, round_bf16),
            None => (None, &[][..], false),
        };
        for info in layout.tensors() {
            let r = info.range();
            let decay = if info.decay { (1.0 - lr as f64 * c.weight_decay as f64) as f32 } else { 1.0 };
            // a listed matrix goes in blocks of whole rows, each written transposed right after its update
            let mat = mats.iter().find(|&&(o, rows, cols)| o == r.start && rows * cols == r.len());
            let (chunk, rows, cols) = match mat {
                Some(&(_, rows, cols)) if wtp.is_some() => ((CHUNK / cols).max(16).min(rows) * cols, rows, cols),
                _ => (CHUNK, 0, 0),
            };
            params[r.clone()]
                .par_chunks_mut(chunk)
                .zip(self.m[r.clone()].par_chunks_mut(chunk).zip(self.v[r.clone()].par_chunks_mut(chunk)))
                .enumerate()
                .for_each(|(k, (p, (m, v)))| {
                    let off = r.start + k * chunk;
                    // SAFETY: chunk k of this tensor covers [off, off + p.len()) inside grads (same length as
                    // params, asserted); chunks are disjoint, and only this task reads (and maybe zeroes) them.
                    let g = unsafe { std::slice::from_raw_parts(gptr.get().add(off) as *const f32, p.len()) };
                    let k = Scalars { cfg: c, coef, scaled, decay, step_size, bc2_sqrt };
                    pulp::Arch::new().dispatch(|| k.apply(p, m, v, g));
                    if zero {
                        // SAFETY: as above; the pointer came from the `&mut` grads of `ReadAndZero`, and the
                        // shared slice `g` is no longer used.
                        unsafe { std::ptr::write_bytes(gptr.get().add(off), 0, p.len()) };
                    }
                    if let (Some(wt), true) = (wtp, cols > 0) {
                        // rows r0..r0+nr of this (rows, cols) matrix -> columns r0..r0+nr of its (cols, rows)
                        // transpose; blocks are disjoint, so are the written ranges
                        let (r0, nr) = ((off - r.start) / cols, p.len() / cols);
                        // SAFETY: column cc of the block lands at r.start + cc * rows + r0 .. + nr, inside
                        // r.start + rows * cols <= wt.len() (asserted by step_scaled_zero_transposed); no other task
                        // writes rows r0..r0+nr.
                        unsafe { transpose_block(wt.get().add(r.start + r0), rows, p, nr, cols, round) };
                    }
                });
        }
    }
}

/// PyTorch's bias-corrected step size and sqrt(1 - beta2^t) for step `t` (scalars in f64, as Python floats).
fn bias_corrections(c: AdamWConfig, t: u64, lr: f32) -> (f32, f32) {
    let t = t as i32;
    let bc1 = 1.0 - (c.beta1 as f64).powi(t);
    let bc2 = 1.0 - (c.beta2 as f64).powi(t);
    ((lr as f64 / bc1) as f32, bc2.sqrt() as f32)
}

/// The per-element AdamW update of one tensor's block (every path applies exactly this).
#[derive(Clone, Copy)]
struct Scalars {
    cfg: AdamWConfig,
    coef: f32,
    scaled: bool,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
}

impl Scalars {
    /// zipped iterators (no bounds checks) so the loop vectorises, square root and divisions included: a scalar
    /// loop was compute-bound (docs/benchmarks.md#training-step-tuning)
    #[inline(always)]
    fn apply(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        let c = self.cfg;
        for ((p, m), (v, &g)) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut().zip(g)) {
            let gi = if self.scaled { g * self.coef } else { g };
            let mi = c.beta1 * *m + (1.0 - c.beta1) * gi;
            let vi = c.beta2 * *v + (1.0 - c.beta2) * gi * gi;
            *m = mi;
            *v = vi;
            let denom = vi.sqrt() / self.bc2_sqrt + c.eps;
            *p = *p * self.decay - self.step_size * (mi / denom);
        }
    }
}

/// Where the fused update also writes the transposed matrices: the buffer (same offsets as the parameters),
/// each matrix's (offset, rows, cols), and whether the copies are rounded to bfloat16.
pub struct Transposed<'a> {
    pub wt: &'a mut [f32],
    pub mats: &'a [(usize, usize, usize)],
    pub round_bf16: bool,
}

enum GradSource<'a> {
    Read(&'a [f32]),
    ReadAndZero(&'a mut [f32]),
}

/// PyTorch's clip coefficient for a gradient of norm `norm`: min(1, max_norm / (norm + 1e-6)).
pub fn clip_coef(norm: f64, max_norm: f64) -> f32 {
    (max_norm / (norm + 1e-6)).min(1.0) as f32
}

/// Global L2 norm of `grads` (accumulated in f64, in fixed chunk order).
pub fn grad_norm(grads: &[f32]) -> f64 {
    let parts: Vec<f64> = grads.par_chunks(CHUNK).map(sum_squares).collect();
    parts.iter().sum::<f64>().sqrt()
}

/// Σ x² of a block: sixteen f32 lanes, then summed in f64 (the partial sums of every gradient norm).
pub fn sum_squares(g: &[f32]) -> f64 {
    pulp::Arch::new().dispatch(|| {
        let mut acc = [0f32; 16];
        let mut it = g.chunks_exact(16);
        for c in &mut it {
            for k in 0..16 {
                acc[k] += c[k] * c[k];
            }
        }
        let tail: f32 = it.remainder().iter().map(|x| x * x).sum();
        acc.iter().map(|&x| x as f64).sum::<f64>() + tail as f64
    })
}

/// Scale `grads` so their global norm is at most `max_norm` (PyTorch: coef = max_norm / (norm + 1e-6), clamped
/// to 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        let coef = coef as f32;
        grads.par_chunks_mut(CHUNK).for_each(|g| g.iter_mut().for_each(|x| *x *= coef));
    }
    norm
}

/// True when every gradient is finite.
pub fn all_finite(grads: &[f32]) -> bool {
    grads.par_chunks(CHUNK).all(|g| g.iter().all(|x| x.is_finite()))
}
