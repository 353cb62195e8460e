//! The three products of a Linear layer in bf16 (bf16 operands, f32 sums), over `super::gemm`. The weight is
//! W (OC, IC) as stored (f32 values or bf16 bits) or its transposed f32 copy Wᵀ (IC, OC).

use super::{gemm, gemm_pre, Data, Operand, Packed};
use crate::kernels::matmul::{add_bias_rows, Dims};

/// A Linear weight as the products read it.
#[derive(Clone, Copy)]
pub(crate) enum Weight<'a> {
    /// W (OC, IC) row-major.
    Rows(Data<'a>),
    /// Wᵀ (IC, OC) row-major, f32 (the CPU backend's transposed copy).
    Transposed(&'a [f32]),
    /// W (OC, IC) row-major with its two product operands packed once (`pack_linear`): a frozen weight.
    Packed(Data<'a>, &'a PackedLinear),
}

/// A frozen Linear weight's operands packed for the AMX path: Wᵀ for the forward, W for dX = dY·W.
pub(crate) struct PackedLinear {
    t: Packed,
    w: Packed,
}

impl PackedLinear {
    /// W (OC, IC) packed both ways, where the products take the AMX path (None elsewhere).
    pub fn new(w: Data<'_>, d: Dims) -> Option<Self> {
        Some(PackedLinear { t: Packed::pack(Weight::Rows(w).t(d))?, w: Packed::pack(Weight::Rows(w).w(d))? })
    }

    /// Bytes `new` allocates for a (OC, IC) weight.
    pub fn bytes_for(d: Dims) -> usize {
        Packed::bytes_for(d.ic, d.oc) + Packed::bytes_for(d.oc, d.ic)
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.t.bytes() + self.w.bytes()
    }
}

impl<'a> Weight<'a> {
    /// Wᵀ as a (IC x OC) operand.
    fn t(self, d: Dims) -> Operand<'a> {
        match self {
            Weight::Rows(w) | Weight::Packed(w, _) => Operand::cm(w, d.ic, d.oc, d.ic),
            Weight::Transposed(wt) => Operand::rm(Data::F32(wt), d.ic, d.oc, d.oc),
        }
    }

    /// W as a (OC x IC) operand.
    fn w(self, d: Dims) -> Operand<'a> {
        match self {
            Weight::Rows(w) | Weight::Packed(w, _) => Operand::rm(w, d.oc, d.ic, d.ic),
            Weight::Transposed(wt) => Operand::cm(Data::F32(wt), d.oc, d.ic, d.oc),
        }
    }
}

/// out (N, OC) = inp (N, IC) · Wᵀ + bias, or `out +=` that when `accumulate` (the bias added in f32).
pub(crate) fn linear_fwd(out: &mut [f32], inp: &[f32], w: Weight<'_>, bias: Option<&[f32]>, d: Dims, accumulate: bool) {
    let Dims { n, ic, oc } = d;
    assert!(out.len() >= n * oc && inp.len() >= n * ic, "linear_fwd: buffers");
    if let Some(b) = bias {
        assert_eq!(b.len(), oc);
        add_bias_rows(&mut out[..n * oc], b, accumulate);
    }
    let x = Operand::rm(Data::F32(inp), n, ic, ic);
    let pre = match w {
        Weight::Packed(_, p) => Some(&p.t),
        _ => None,
    };
    gemm_pre(&mut out[..n * oc], oc, accumulate || bias.is_some(), x, w.t(d), pre);
}

/// dinp (N, IC) = dout (N, OC) · W, or `dinp +=` that when `accumulate`.
pub(crate) fn linear_bwd_input(dinp: &mut [f32], dout: &[f32], w: Weight<'_>, d: Dims, accumulate: bool) {
    let Dims { n, ic, oc } = d;
    assert!(dinp.len() >= n * ic && dout.len() >= n * oc, "linear_bwd_input: buffers");
    let dy = Operand::rm(Data::F32(dout), n, oc, oc);
    let pre = match w {
        Weight::Packed(_, p) => Some(&p.w),
        _ => None,
    };
    gemm_pre(&mut dinp[..n * ic], ic, accumulate, dy, w.w(d), pre);
}

/// dw (OC, IC) += doutᵀ (OC, N) · inp (N, IC): the weight gradient, summed in f32 into the f32 buffer.
pub(crate) fn linear_bwd_weight(dw: &mut [f32], dout: &[f32], inp: &[f32], d: Dims) {
    let Dims { n, ic, oc } = d;
    assert!(dw.len() >= oc * ic && dout.len() >= n * oc && inp.len() >= n * ic, "linear_bwd_weight: buffers");
    let dyt = Operand::cm(Data::F32(dout), oc, n, oc);
    gemm(&mut dw[..oc * ic], ic, true, dyt, Operand::rm(Data::F32(inp), n, ic, ic));
}
