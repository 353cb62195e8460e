//! bf16 compute's training products on the AVX512_BF16 kernel (`kernels::gemm_bf16`), used when
//! `Cpu::bf16_products()`: the operands are the bf16 values the f32 path would multiply (the block rounds the
//! activations and gradients; the kernel rounds the f32 master weights while packing, exactly as the rounded
//! `wt` of the f32 path holds them), so both paths compute the same products, summed in f32. The kernel reads
//! the weights as stored, so this mode keeps no transposed copy.

use super::Cpu;
use crate::backend::Linear;
use crate::kernels::gemm_bf16::{self, Data, Weight};
use crate::kernels::matmul::{col_sum_acc, linear_bwd_weight, Dims};

impl Cpu {
    /// The weight at `off` as the bf16 kernel reads it: the f32 master weights, or the bf16 base with its
    /// operands packed once where they are (`Base16::panels`).
    pub(super) fn kernel_weight(&self, off: usize, len: usize) -> Weight<'_> {
        match &self.base16 {
            Some(b) => match b.panels(off, &self.mats).filter(|_| self.packed_weights) {
                Some(p) => Weight::Packed(Data::Bf16(b.bits(off, len)), p),
                None => Weight::Rows(Data::Bf16(b.bits(off, len))),
            },
            None => Weight::Rows(Data::F32(&self.params[off..off + len])),
        }
    }

    /// out (N, OC) = inp · Wᵀ + b (or `+=`), W from the f32 master weights or the bf16 base.
    pub(super) fn linear_fwd_bf16(&self, out: &mut [f32], inp: &[f32], lin: Linear, d: Dims, accumulate: bool) {
        let len = lin.ic * lin.oc;
        let bias = lin.b.map(|b| self.p(b, lin.oc));
        gemm_bf16::linear_fwd(out, inp, self.kernel_weight(lin.w, len), bias, d, accumulate)
    }

    /// dinp (N, IC) = dout · W, W from the f32 master weights or the bf16 base.
    pub(super) fn linear_bwd_input_bf16(&self, dinp: &mut [f32], dout: &[f32], lin: Linear, d: Dims) {
        let len = lin.ic * lin.oc;
        gemm_bf16::linear_bwd_input(dinp, dout, self.kernel_weight(lin.w, len), d, false)
    }

    /// dW (OC, IC) += doutᵀ · inp and db += column sums of dout: on the bf16 kernel when `bf16_products()`,
    /// else the f32 gemm.
    pub(super) fn linear_bwd_weight_any(
        &self,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        d: Dims,
    ) {
        if !self.bf16_products() {
            return linear_bwd_weight(dw, db, dout, inp, d);
        }
        gemm_bf16::linear_bwd_weight(dw, dout, inp, d);
        if let Some(db) = db {
            col_sum_acc(db, dout, d.n, d.oc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamW, AdamWConfig};
    use crate::{Backend, Layout, NeoxConfig};

    /// On the kernel, a training step leaves no transposed copy behind (the memory it saves); on the f32
    /// products the fused step keeps it fresh.
    #[test]
    fn the_kernel_keeps_no_transposed_copy() {
        let cfg = NeoxConfig::new_pythia(40, 16, 2, 2, 64);
        let layout = Layout::new(&cfg);
        for kernel in [true, false] {
            let mut cpu = Cpu::new(vec![0.01; layout.total], &layout);
            cpu.set_compute_bf16(true);
            cpu.set_bf16_kernel(kernel);
            let _ = cpu.wt();
            let mut opt = AdamW::new(AdamWConfig::default(), layout.total);
            cpu.adamw_step(&mut opt, &mut vec![0.1; layout.total], 1e-3, 1.0);
            assert_eq!(cpu.wt.get().is_some(), !cpu.bf16_products(), "kernel={kernel}");
        }
    }
}
