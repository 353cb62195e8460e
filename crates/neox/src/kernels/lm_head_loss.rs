//! Fused LM head + softmax cross-entropy: logits are computed only for rows that have a target, a chunk of rows
//! at a time, turned into (softmax − onehot)·scale in place, and immediately pushed back through the head, so at
//! most `chunk × V` logits exist at once. Returns the loss SUM and leaves normalisation (÷ target count, which
//! may span micro-batches and ranks) to the caller via `scale`.

use super::gemm_bf16::{self, Data, Weight};
use super::math;
use super::matmul::{gemm, par_all, Dims, Mat};
use super::w16::{linear_bwd_input_w16, linear_fwd_w16};
use crate::kernels::gemm_bf16::PackedLinear;
use rayon::prelude::*;

/// Reusable buffers for `lm_head_xent`.
#[derive(Default)]
pub struct XentScratch {
    x: Vec<f32>,
    logits: Vec<f32>,
    dx: Vec<f32>,
    loss: Vec<f64>,
    /// dlogits of the trained token rows' columns (k x R)
    rows: Vec<f32>,
}

/// Gradient outputs, all of `scale · Σ loss`: dx (N,C) += ∂/∂x; dw (V,C) += ∂/∂w unless the head is frozen
/// (`None`); drows (k,C) += ∂/∂ of the trained token rows (`Head::rows`), when there are any.
pub struct XentGrad<'a> {
    pub dx: &'a mut [f32],
    pub dw: Option<&'a mut [f32]>,
    pub drows: Option<&'a mut [f32]>,
    pub scale: f32,
}

/// Rows per chunk: bounded so a chunk's logits stay near 256 MiB (fewer passes over the (V,C) head gradient,
/// which each chunk reads and writes once).
pub fn chunk_rows(v: usize) -> usize {
    ((64 << 20) / v.max(1)).clamp(16, 4096)
}

/// The LM head's weight (V,C) as the products read it.
#[derive(Clone, Copy)]
pub enum HeadWeight<'a> {
    /// f32: `w` (V,C) as stored and `wt` its transpose (C,V). In bf16 compute `wt` holds the rounded weight and
    /// `w` is not read (dX is taken from `wt`); on the bf16 kernel (`Head::kernel`) only `w` is read (`wt` may
    /// be empty).
    F32 { w: &'a [f32], wt: &'a [f32] },
    /// Raw bf16 bits (V,C): a frozen head stored at 2 bytes per weight (products in `kernels::w16`, or on the
    /// bf16 kernel, from the packed operands when there are).
    Bf16(&'a [u16], Option<&'a PackedLinear>),
}

impl<'a> HeadWeight<'a> {
    /// The weight as the bf16 kernel reads it: the (V,C) rows, f32 (rounded while packing) or bf16.
    fn kernel(self) -> Weight<'a> {
        match self {
            HeadWeight::F32 { w, .. } => Weight::Rows(Data::F32(w)),
            HeadWeight::Bf16(w16, Some(p)) => Weight::Packed(Data::Bf16(w16), p),
            HeadWeight::Bf16(w16, None) => Weight::Rows(Data::Bf16(w16)),
        }
    }
}

/// Rows of the head replaced by trained f32 values: the logits of token `ids[k]` are x · `w` row k (`w` is
/// (k,C)), whatever the head holds for that id (LoRA's trainable token rows).
#[derive(Clone, Copy)]
pub struct TokenRows<'a> {
    pub ids: &'a [u32],
    pub w: &'a [f32],
}

/// The LM head. `bf16`: the operands of the head's products are bf16 values (x arrives rounded, the logit
/// gradients are rounded here before the products; trained token rows stay f32). `kernel` (with `bf16`): the
/// three products run on the AVX512_BF16 kernel (`gemm_bf16`, which rounds the operands itself).
#[derive(Clone, Copy)]
pub struct Head<'a> {
    pub w: HeadWeight<'a>,
    pub c: usize,
    pub v: usize,
    pub bf16: bool,
    pub kernel: bool,
    pub rows: Option<TokenRows<'a>>,
}

/// Σ over `targets` (row, target id) of −log softmax(x[row] · wᵀ)[target] for x (N,C).
pub fn lm_head_xent(
    x: &[f32],
    head: Head<'_>,
    targets: &[(u32, u32)],
    mut grad: Option<XentGrad<'_>>,
    s: &mut XentScratch,
) -> f64 {
    let Head { w, c, v, bf16, kernel, rows } = head;
    let kernel = kernel && bf16;
    match w {
        HeadWeight::F32 { w, .. } if kernel => assert!(w.len() >= v * c),
        HeadWeight::F32 { w, wt } => assert!((bf16 || w.len() >= v * c) && wt.len() >= v * c),
        HeadWeight::Bf16(w16, _) => assert!(w16.len() >= v * c),
    }
    if let Some(t) = rows {
        assert!(t.w.len() >= t.ids.len() * c && t.ids.iter().all(|&id| (id as usize) < v));
    }
    let dims = |r: usize| Dims { n: r, ic: c, oc: v };
    let r_max = chunk_rows(v).min(targets.len().max(1));
    s.x.resize(r_max * c, 0.0);
    s.logits.resize(r_max * v, 0.0);
    s.dx.resize(r_max * c, 0.0);
    s.loss.resize(r_max, 0.0);
    let mut total = 0f64;
    for chunk in targets.chunks(r_max) {
        let r = chunk.len();
        for (k, &(row, _)) in chunk.iter().enumerate() {
            let row = row as usize;
            s.x[k * c..(k + 1) * c].copy_from_slice(&x[row * c..(row + 1) * c]);
        }
        // logits (R,V) = X (R,C) · wᵀ
        match w {
            _ if kernel => {
                gemm_bf16::linear_fwd(&mut s.logits[..r * v], &s.x[..r * c], w.kernel(), None, dims(r), false)
            }
            // SAFETY: buffers sized above; wt asserted (C,V).
            HeadWeight::F32 { wt, .. } => unsafe {
                let dst = Mat::rm(s.logits.as_mut_ptr(), r, v, v);
                gemm(dst, false, Mat::rm(s.x.as_ptr(), r, c, c), Mat::rm(wt.as_ptr(), c, v, v), 1.0, par_all());
            },
            HeadWeight::Bf16(w16, _) => {
                linear_fwd_w16(&mut s.logits[..r * v], &s.x[..r * c], w16, None, dims(r), false)
            }
        }
        // trained token rows replace their logit columns
        if let Some(t) = rows {
            for (k, &id) in t.ids.iter().enumerate() {
                let wk = &t.w[k * c..(k + 1) * c];
                for i in 0..r {
                    s.logits[i * v + id as usize] = math::dot(&s.x[i * c..(i + 1) * c], wk);
                }
            }
        }
        let scale = grad.as_ref().map(|g| g.scale);
        s.logits[..r * v].par_chunks_mut(v).zip(s.loss[..r].par_iter_mut()).zip(chunk.par_iter()).for_each(
            |((l, loss), &(_, tgt))| {
                pulp::Arch::new().dispatch(|| {
                    let mx = math::max(l);
                    let lt = l[tgt as usize];
                    let sum = math::exp_shift_sum(l, mx);
                    *loss = mx as f64 + (sum as f64).ln() - lt as f64;
                    if let Some(sc) = scale {
                        let inv = sc / sum;
                        for x in l.iter_mut() {
                            *x *= inv;
                        }
                        l[tgt as usize] -= sc;
                    }
                })
            },
        );
        total += s.loss[..r].iter().sum::<f64>();
        if let Some(g) = grad.as_mut() {
            // trained token rows: their columns of dlogits give drows and a dx term, then leave the base products
            s.rows.clear();
            if let Some(t) = rows {
                for (k, &id) in t.ids.iter().enumerate() {
                    for i in 0..r {
                        let gi = std::mem::take(&mut s.logits[i * v + id as usize]);
                        s.rows.push(gi);
                        if let Some(dr) = g.drows.as_deref_mut() {
                            let x = &s.x[i * c..(i + 1) * c];
                            dr[k * c..(k + 1) * c].iter_mut().zip(x).for_each(|(d, x)| *d += gi * x);
                        }
                    }
                }
            }
            if bf16 && !kernel {
                math::round_bf16_slice(&mut s.logits[..r * v]);
            }
            let lg = Mat::rm(s.logits.as_ptr(), r, v, v);
            // dX (R,C) = dlogits (R,V) · w (V,C); in bf16, w is read from wt (C,V): w[j][k] = wt[k * V + j]
            match w {
                _ if kernel => {
                    gemm_bf16::linear_bwd_input(&mut s.dx[..r * c], &s.logits[..r * v], w.kernel(), dims(r), false)
                }
                // SAFETY: as above; w or wt asserted (V,C).
                HeadWeight::F32 { w, wt } => unsafe {
                    let w_view = if bf16 { Mat::cm(wt.as_ptr(), v, c, v) } else { Mat::rm(w.as_ptr(), v, c, c) };
                    gemm(Mat::rm(s.dx.as_mut_ptr(), r, c, c), false, lg, w_view, 1.0, par_all());
                },
                HeadWeight::Bf16(w16, _) => linear_bwd_input_w16(&mut s.dx[..r * c], &s.logits[..r * v], w16, dims(r)),
            }
            if let Some(dw) = g.dw.as_deref_mut().filter(|_| kernel) {
                gemm_bf16::linear_bwd_weight(dw, &s.logits[..r * v], &s.x[..r * c], dims(r));
            } else if let Some(dw) = g.dw.as_deref_mut() {
                assert!(dw.len() >= v * c);
                // dW (V,C) += dlogitsᵀ (V,R) · X (R,C), computed as dWᵀ (C,V) += Xᵀ (C,R) · dlogits (R,V) with dW
                // addressed column-major (no transposed packing of the big operand)
                // SAFETY: dw asserted (V,C), the rest sized above.
                unsafe {
                    let dwt = Mat::cm(dw.as_mut_ptr(), c, v, c);
                    gemm(dwt, true, Mat::cm(s.x.as_ptr(), c, r, c), lg, 1.0, par_all());
                }
            }
            if let Some(t) = rows {
                for k in 0..t.ids.len() {
                    let wk = &t.w[k * c..(k + 1) * c];
                    for i in 0..r {
                        let gi = s.rows[k * r + i];
                        s.dx[i * c..(i + 1) * c].iter_mut().zip(wk).for_each(|(d, w)| *d += gi * w);
                    }
                }
            }
            for (k, &(row, _)) in chunk.iter().enumerate() {
                let row = row as usize;
                let d = &mut g.dx[row * c..(row + 1) * c];
                for (a, b) in d.iter_mut().zip(&s.dx[k * c..(k + 1) * c]) {
                    *a += b;
                }
            }
        }
    }
    total
}
