//! Fused LM head + softmax cross-entropy: logits are computed only for rows that have a target, a chunk of rows
//! at a time, turned into (softmax − onehot)·scale in place, and immediately pushed back through the head, so at
//! most `chunk × V` logits exist at once. Returns the loss SUM and leaves normalisation (÷ target count, which
//! may span micro-batches and ranks) to the caller via `scale`.

use super::math;
use super::matmul::{gemm, par_all, Mat};
use rayon::prelude::*;

/// Reusable buffers for `lm_head_xent`.
#[derive(Default)]
pub struct XentScratch {
    x: Vec<f32>,
    logits: Vec<f32>,
    dx: Vec<f32>,
    loss: Vec<f64>,
}

/// Gradient outputs: dx (N,C) += ∂/∂x, dw (V,C) += ∂/∂w, both of `scale · Σ loss`.
pub struct XentGrad<'a> {
    pub dx: &'a mut [f32],
    pub dw: &'a mut [f32],
    pub scale: f32,
}

/// Rows per chunk: bounded so a chunk's logits stay near 256 MiB (fewer passes over the (V,C) head gradient,
/// which each chunk reads and writes once).
pub fn chunk_rows(v: usize) -> usize {
    ((64 << 20) / v.max(1)).clamp(16, 4096)
}

/// The LM head's weight in the two layouts the products read: `w` (V,C) as stored and `wt` its transpose (C,V).
/// `bf16`: the operands of the head's products are bf16 values (`wt` holds the rounded weight and `x` rounded
/// activations; the logit gradients are rounded here), so dX is taken from `wt` and `w` is not read.
#[derive(Clone, Copy)]
pub struct Head<'a> {
    pub w: &'a [f32],
    pub wt: &'a [f32],
    pub c: usize,
    pub v: usize,
    pub bf16: bool,
}

/// Σ over `targets` (row, target id) of −log softmax(x[row] · wᵀ)[target] for x (N,C).
pub fn lm_head_xent(
    x: &[f32],
    head: Head<'_>,
    targets: &[(u32, u32)],
    mut grad: Option<XentGrad<'_>>,
    s: &mut XentScratch,
) -> f64 {
    let Head { w, wt, c, v, bf16 } = head;
    assert!((bf16 || w.len() >= v * c) && wt.len() >= v * c);
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
        // SAFETY: buffers sized above; w asserted (V,C).
        unsafe {
            let dst = Mat::rm(s.logits.as_mut_ptr(), r, v, v);
            gemm(dst, false, Mat::rm(s.x.as_ptr(), r, c, c), Mat::rm(wt.as_ptr(), c, v, v), 1.0, par_all());
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
            // SAFETY: as above; dw asserted by caller's layout (V,C).
            unsafe {
                // dX (R,C) = dlogits (R,V) · w (V,C); in bf16, w is read from wt (C,V): w[j][k] = wt[k * V + j]
                if bf16 {
                    math::round_bf16_slice(&mut s.logits[..r * v]);
                }
                let w_view = if bf16 { Mat::cm(wt.as_ptr(), v, c, v) } else { Mat::rm(w.as_ptr(), v, c, c) };
                let lg = Mat::rm(s.logits.as_ptr(), r, v, v);
                gemm(Mat::rm(s.dx.as_mut_ptr(), r, c, c), false, lg, w_view, 1.0, par_all());
                assert!(g.dw.len() >= v * c);
                // dW (V,C) += dlogitsᵀ (V,R) · X (R,C), computed as dWᵀ (C,V) += Xᵀ (C,R) · dlogits (R,V) with dW
                // addressed column-major (no transposed packing of the big operand)
                let dwt = Mat::cm(g.dw.as_mut_ptr(), c, v, c);
                gemm(dwt, true, Mat::cm(s.x.as_ptr(), c, r, c), Mat::rm(s.logits.as_ptr(), r, v, v), 1.0, par_all());
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
