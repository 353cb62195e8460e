//! The LoRA branch on the CPU: the adapter's f32 buffer and the branch's forward and backward for one targeted
//! Linear, `out += s · (drop(x) · Aᵀ) · Bᵀ`. The dropout mask is not stored: it is a hash of (seed, slot, row,
//! column), so the backward (and a gradient-checkpointing recompute) rebuilds exactly the forward's mask.
//!
//! Letters: N rows, IC inputs, OC outputs, r the rank. A (r, IC), B (OC, r), u = drop(x) · Aᵀ (N, r).

use crate::backend::Pass;
use crate::kernels::math;
use crate::kernels::matmul::{gemm, par_all, Mat};
use crate::kernels::matvec_f32::FEW_ROWS;
use crate::lora::{AdapterLayout, LoraConfig, Slot};
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

thread_local! {
    /// (dropped inputs (N, IC), u (N, r), du (N, r)), reused across calls.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// splitmix64's finaliser: a well-mixed 64-bit hash.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Keep-or-drop of each input element of a LoRA branch for one micro-batch.
#[derive(Clone, Copy)]
struct Mask {
    seed: u64,
    slot: u64,
    /// Dropped when the hash's top 32 bits are below this.
    below: u64,
    keep_scale: f32,
}

impl Mask {
    fn new(seed: u64, slot: usize, p: f32) -> Self {
        let below = (p as f64 * 4_294_967_296.0) as u64;
        Mask { seed: mix(seed), slot: mix(slot as u64 ^ 0x9e37_79b9_7f4a_7c15), below, keep_scale: 1.0 / (1.0 - p) }
    }

    /// dst = drop(x) for row `row`: kept elements scaled by 1/(1-p), dropped ones zero.
    fn apply(&self, dst: &mut [f32], x: &[f32], row: usize) {
        let base = mix(self.seed ^ self.slot ^ (row as u64).wrapping_mul(0xd6e8_feb8_6659_fd93));
        for (j, (d, &v)) in dst.iter_mut().zip(x).enumerate() {
            let h = mix(base.wrapping_add(j as u64)) >> 32;
            *d = if h < self.below { 0.0 } else { v * self.keep_scale };
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

    /// x (N, IC) through the mask into `buf`, or x itself without dropout.
    fn dropped<'a>(&self, m: Option<Mask>, buf: &'a mut Vec<f32>, x: &'a [f32], n: usize, ic: usize) -> &'a [f32] {
        match m {
            None => &x[..n * ic],
            Some(m) => {
                buf.resize(n * ic, 0.0);
                for (row, (d, xr)) in buf.chunks_mut(ic).zip(x.chunks(ic)).take(n).enumerate() {
                    m.apply(d, xr, row);
                }
                &buf[..n * ic]
            }
        }
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
        SCRATCH.with(|sc| {
            let (xd_buf, u, _) = &mut *sc.borrow_mut();
            let xd = self.dropped(m, xd_buf, x, n, ic);
            u.resize(n * r, 0.0);
            // SAFETY: u (N, r), xd (N, IC), A (r, IC) read column-major as Aᵀ (IC, r), B (OC, r) read
            // column-major as Bᵀ (r, OC), out (N, OC): all sized by the slices above.
            unsafe {
                let lhs = Mat::rm(xd.as_ptr(), n, ic, ic);
                gemm(Mat::rm(u.as_mut_ptr(), n, r, r), false, lhs, Mat::cm(a.as_ptr(), ic, r, ic), 1.0, par_all());
                let dst = Mat::rm(out.as_mut_ptr(), n, oc, oc);
                gemm(dst, true, Mat::rm(u.as_ptr(), n, r, r), Mat::cm(b.as_ptr(), r, oc, r), self.scale, par_all());
            }
        });
    }

    /// The branch's backward: dA, dB += their gradients (in the adapter gradient buffer `grads`) and
    /// dinp (N, IC) += ∂/∂x through the branch, from dout (N, OC) and the forward's x.
    pub fn backward(&self, s: &Slot, grads: &mut [f32], dinp: &mut [f32], dout: &[f32], x: &[f32], n: usize) {
        let (r, ic, oc) = (self.layout.r, s.ic, s.oc);
        let (a, b) = (self.a(s), self.b(s));
        assert!(grads.len() >= self.layout.total && dinp.len() >= n * ic && dout.len() >= n * oc);
        let m = self.mask(s);
        SCRATCH.with(|sc| {
            let (xd_buf, u, du) = &mut *sc.borrow_mut();
            let xd = self.dropped(m, xd_buf, x, n, ic);
            u.resize(n * r, 0.0);
            du.resize(n * r, 0.0);
            // the layout puts A before B
            assert!(s.a + r * ic <= s.b);
            let (lo, hi) = grads.split_at_mut(s.b);
            let (da, db) = (&mut lo[s.a..s.a + r * ic], &mut hi[..oc * r]);
            // SAFETY: every view is inside the slices asserted or sized above; the destinations are distinct
            // buffers from the operands.
            unsafe {
                let xd_m = Mat::rm(xd.as_ptr(), n, ic, ic);
                let dout_m = Mat::rm(dout.as_ptr(), n, oc, oc);
                // u (N, r) = xd · Aᵀ
                gemm(Mat::rm(u.as_mut_ptr(), n, r, r), false, xd_m, Mat::cm(a.as_ptr(), ic, r, ic), 1.0, par_all());
                // dB (OC, r) += s · doutᵀ · u
                let dout_t = Mat::cm(dout.as_ptr(), oc, n, oc);
                let u_m = Mat::rm(u.as_ptr(), n, r, r);
                gemm(Mat::rm(db.as_mut_ptr(), oc, r, r), true, dout_t, u_m, self.scale, par_all());
                // du (N, r) = s · dout · B
                let b_m = Mat::rm(b.as_ptr(), oc, r, r);
                gemm(Mat::rm(du.as_mut_ptr(), n, r, r), false, dout_m, b_m, self.scale, par_all());
                // dA (r, IC) += duᵀ · xd
                let du_t = Mat::cm(du.as_ptr(), r, n, r);
                gemm(Mat::rm(da.as_mut_ptr(), r, ic, ic), true, du_t, xd_m, 1.0, par_all());
            }
            let du_m = Mat::rm(du.as_ptr(), n, r, r);
            let a_m = Mat::rm(a.as_ptr(), r, ic, ic);
            match m {
                // dinp += du · A
                // SAFETY: dinp (N, IC) asserted above.
                None => unsafe { gemm(Mat::rm(dinp.as_mut_ptr(), n, ic, ic), true, du_m, a_m, 1.0, par_all()) },
                Some(m) => {
                    // dxd (N, IC) = du · A, then dinp += dxd through the mask (the mask of x is that of dx)
                    xd_buf.resize(n * ic, 0.0);
                    // SAFETY: xd_buf (N, IC) just sized; du and A as above.
                    unsafe { gemm(Mat::rm(xd_buf.as_mut_ptr(), n, ic, ic), false, du_m, a_m, 1.0, par_all()) };
                    let mut row_buf = vec![0f32; ic];
                    for (row, (d, g)) in dinp.chunks_mut(ic).zip(xd_buf.chunks(ic)).take(n).enumerate() {
                        m.apply(&mut row_buf, g, row);
                        d.iter_mut().zip(&row_buf).for_each(|(d, g)| *d += g);
                    }
                }
            }
        });
    }

    /// Index of `id` among the trained token rows.
    pub fn token_row(&self, id: u32) -> Option<usize> {
        self.cfg.token_rows.binary_search(&id).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_drops_about_p_and_is_reproducible() {
        let m = Mask::new(42, 3, 0.25);
        let x = vec![1f32; 4096];
        let (mut a, mut b) = (vec![0f32; 4096], vec![0f32; 4096]);
        m.apply(&mut a, &x, 7);
        m.apply(&mut b, &x, 7);
        assert_eq!(a, b);
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / 4096.0;
        assert!((dropped - 0.25).abs() < 0.03, "dropped {dropped}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        m.apply(&mut b, &x, 8);
        assert_ne!(a, b, "rows get different masks");
        let other = Mask::new(43, 3, 0.25);
        other.apply(&mut b, &x, 7);
        assert_ne!(a, b, "seeds give different masks");
    }
}
