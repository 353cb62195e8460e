//! The LoRA branch on the CPU: the adapter's f32 buffer and the branch's forward and backward for one targeted
//! Linear, `out += s · (drop(x) · Aᵀ) · Bᵀ`. The dropout mask is not stored (`kernels::dropout`): the backward
//! (and a gradient-checkpointing recompute) rebuilds exactly the forward's mask. All six products of the
//! branch go through `kernels::rank_r`, with the mask applied inside them.
//!
//! Letters: N rows, IC inputs, OC outputs, r the rank. A (r, IC), B (OC, r), u = drop(x) · Aᵀ (N, r).

use crate::backend::Pass;
use crate::kernels::dropout::Mask;
use crate::kernels::math;
use crate::kernels::matvec_f32::FEW_ROWS;
use crate::kernels::rank_r::{rank_cols, rank_rows, rank_update};
use crate::lora::{AdapterLayout, LoraConfig, Slot};
use rayon::prelude::*;
use std::cell::RefCell;

/// The adapter attached to a CPU model.
pub(crate) struct CpuLora {
    pub layout: AdapterLayout,
    pub cfg: LoraConfig,
    /// The trainable values, `layout` order.
    pub params: Vec<f32>,
    pub scale: f32,
    /// `Some(seed)`: training products drop LoRA inputs with this micro-batch's mask; `None`: no dropout.
    pub seed: Option<u64>,
}

/// Reused buffers of the branch.
#[derive(Default)]
struct Scratch {
    /// Bᵀ (r, OC)
    bt: Vec<f32>,
    /// u (N, r)
    u: Vec<f32>,
    /// du (N, r)
    du: Vec<f32>,
    /// dAᵀ (IC, r)
    dat: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

/// `f` with this thread's scratch.
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| f(s.borrow_mut().get_or_insert_with(Scratch::default)))
}

/// bt (r, OC) = Bᵀ of B (OC, r).
fn transpose_b(bt: &mut Vec<f32>, b: &[f32], oc: usize, r: usize) {
    bt.resize(r * oc, 0.0);
    for (j, row) in bt.chunks_mut(oc).enumerate() {
        for (o, v) in row.iter_mut().enumerate() {
            *v = b[o * r + j];
        }
    }
}

impl CpuLora {
    fn a(&self, s: &Slot) -> &[f32] {
        &self.params[s.a..s.a + self.layout.r * s.ic]
    }

    fn b(&self, s: &Slot) -> &[f32] {
        &self.params[s.b..s.b + s.oc * self.layout.r]
    }

    fn mask(&self, s: &Slot) -> Option<Mask> {
        let i = self.layout.slots.iter().position(|t| t.w == s.w)?;
        self.seed.filter(|_| self.cfg.dropout > 0.0).map(|seed| Mask::new(seed, i, self.cfg.dropout))
    }

    /// out (N, OC) += s · drop(x) · Aᵀ · Bᵀ. Few-row decoding (no dropout) goes row by row with a fixed
    /// summation order, so a row's result does not depend on the other rows of the call.
    pub fn forward(&self, s: &Slot, out: &mut [f32], x: &[f32], n: usize, pass: Pass) {
        let (r, ic, oc) = (self.layout.r, s.ic, s.oc);
        let (a, b) = (self.a(s), self.b(s));
        if pass == Pass::Decode && n <= FEW_ROWS {
            let mut u = vec![0f32; r];
            for (o_row, x_row) in out.chunks_mut(oc).zip(x.chunks(ic)).take(n) {
                for (j, uj) in u.iter_mut().enumerate() {
                    *uj = math::dot(x_row, &a[j * ic..(j + 1) * ic]) * self.scale;
                }
                for (o, ob) in o_row.iter_mut().zip(b.chunks(r)) {
                    *o += math::dot(&u, ob);
                }
            }
            return;
        }
        let m = if pass == Pass::Train { self.mask(s) } else { None };
        with_scratch(|sc| {
            sc.u.resize(n * r, 0.0);
            rank_rows(&mut sc.u, false, 1.0, (x, ic), m.as_ref(), (n, ic), a, r);
            transpose_b(&mut sc.bt, b, oc, r);
            rank_update((out, oc), self.scale, &sc.u, &sc.bt, None, (n, oc), r);
        });
    }

    /// The branch's backward: dA, dB += their gradients (in the adapter gradient buffer `grads`) and
    /// dinp (N, IC) += ∂/∂x through the branch, from dout (N, OC) and the forward's x.
    pub fn backward(&self, s: &Slot, grads: &mut [f32], dinp: &mut [f32], dout: &[f32], x: &[f32], n: usize) {
        let (r, ic, oc) = (self.layout.r, s.ic, s.oc);
        let (a, b) = (self.a(s), self.b(s));
        assert!(grads.len() >= self.layout.total && dinp.len() >= n * ic && dout.len() >= n * oc);
        let m = self.mask(s);
        // the layout puts A before B
        assert!(s.a + r * ic <= s.b);
        let (lo, hi) = grads.split_at_mut(s.b);
        let (da, db) = (&mut lo[s.a..s.a + r * ic], &mut hi[..oc * r]);
        with_scratch(|sc| {
            // u (N, r) = drop(x) · Aᵀ, as the forward computed it
            sc.u.resize(n * r, 0.0);
            rank_rows(&mut sc.u, false, 1.0, (x, ic), m.as_ref(), (n, ic), a, r);
            // dB (OC, r) += s · doutᵀ · u
            rank_cols(db, true, self.scale, (dout, oc), None, (oc, n), &sc.u, r);
            // du (N, r) = s · dout · B
            transpose_b(&mut sc.bt, b, oc, r);
            sc.du.resize(n * r, 0.0);
            rank_rows(&mut sc.du, false, self.scale, (dout, oc), None, (n, oc), &sc.bt, r);
            // dAᵀ (IC, r) = drop(x)ᵀ · du, added to dA (r, IC)
            sc.dat.resize(ic * r, 0.0);
            rank_cols(&mut sc.dat, false, 1.0, (x, ic), m.as_ref(), (ic, n), &sc.du, r);
            da.par_chunks_mut(ic).enumerate().for_each(|(j, row)| {
                row.iter_mut().zip(sc.dat.chunks(r)).for_each(|(d, t)| *d += t[j]);
            });
            // dinp += drop(du · A) (the mask of x is that of its gradient)
            rank_update((dinp, ic), 1.0, &sc.du, a, m.as_ref(), (n, ic), r);
        });
    }

    /// Index of `id` among the trained token rows.
    pub fn token_row(&self, id: u32) -> Option<usize> {
        self.cfg.token_rows.binary_search(&id).ok()
    }
}
