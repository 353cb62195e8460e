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
            // (asked only when on: the first call builds every matrix's packed copy)
            Some(b) => match self.packed_weights.then(|| b.panels(off, &self.mats)).flatten() {
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

    /// A bf16 base's packed copy (4 bytes per weight) is built only when the caller turned it on, and then where
    /// the products run on AMX; products give the same bits either way.
    #[test]
    fn packed_weights_only_when_asked() {
        let cfg = NeoxConfig::new_pythia(64, 32, 2, 2, 64);
        let layout = Layout::new(&cfg);
        let w16: Vec<u16> =
            (0..layout.total).map(|i| half::bf16::from_f32(((i % 13) as f32 - 6.0) * 0.01).to_bits()).collect();
        let lin = Linear {
            w: layout.find("gpt_neox.layers.0.mlp.dense_h_to_4h.weight").unwrap().offset,
            b: None,
            ic: 32,
            oc: 128,
        };
        let d = Dims { n: 40, ic: 32, oc: 128 };
        let x: Vec<f32> = (0..d.n * d.ic).map(|i| half::bf16::from_f32((i % 7) as f32 * 0.1).to_f32()).collect();
        let mut outs = vec![];
        for on in [false, true] {
            let mut cpu = Cpu::new_bf16(w16.clone(), &layout);
            cpu.set_compute_bf16(true);
            cpu.set_packed_weights(on);
            let mut out = vec![0f32; d.n * d.oc];
            cpu.linear_fwd_bf16(&mut out, &x, lin, d, false);
            let built = cpu.base16.as_ref().unwrap().panels_built();
            assert_eq!(built, on && cpu.bf16_products(), "on={on}");
            outs.push(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
        assert_eq!(outs[0], outs[1]);
    }
}
