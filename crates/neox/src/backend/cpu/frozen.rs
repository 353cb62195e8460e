//! A frozen base stored in bfloat16: every tensor's bits in layout order (2 bytes per parameter, no f32 copy
//! of any matrix), plus f32 copies of the vectors (LayerNorm weights, biases) that the kernels read as f32.
//! A LoRA run trains only its adapter, so nothing here is ever written after loading.

use super::vectors::Vectors;
use crate::kernels::gemm_bf16::{Data, PackedLinear};
use crate::kernels::matmul::Dims;
use crate::kernels::w16::bf16_to_f32;
use crate::layout::Layout;
use std::collections::HashMap;
use std::sync::OnceLock;

pub(crate) struct Base16 {
    pub w: Vec<u16>,
    /// Each matrix's product operands packed once for the AMX path (by offset), built at the first `panels` call
    /// (made only when `Cpu::set_packed_weights` is on); an empty map where the CPU does not take that path.
    panels: OnceLock<HashMap<usize, PackedLinear>>,
    /// The 1-D tensors widened to f32.
    small: Vectors,
}

impl Base16 {
    /// `w`: bf16 bits of every parameter of `layout`, in its order.
    pub fn new(w: Vec<u16>, layout: &Layout) -> Self {
        assert_eq!(w.len(), layout.total, "bf16 base size");
        let mut small = Vectors::default();
        for p in layout.params.iter().filter(|p| p.shape.len() == 1) {
            small.push(p.offset, w[p.range()].iter().map(|&b| bf16_to_f32(b)));
        }
        small.sort();
        Base16 { w, small, panels: OnceLock::new() }
    }

    /// The f32 values of the 1-D tensor at layout offset `off` (`len` elements).
    pub fn vector(&self, off: usize, len: usize) -> &[f32] {
        self.small.get(off, len)
    }

    /// The bf16 bits of the tensor at `off` (`len` elements).
    pub fn bits(&self, off: usize, len: usize) -> &[u16] {
        &self.w[off..off + len]
    }

    /// The packed operands of the matrix at `off`, packing every matrix of `mats` ((offset, rows, cols)) at the
    /// first call (where the CPU takes the AMX path; an empty map elsewhere). 4 bytes per weight: the caller
    /// decides (`Cpu::set_packed_weights`) and accounts for them.
    pub fn panels(&self, off: usize, mats: &[(usize, usize, usize)]) -> Option<&PackedLinear> {
        let map = self.panels.get_or_init(|| {
            let mut map = HashMap::new();
            for &(o, rows, cols) in mats {
                let Some(p) = PackedLinear::new(Data::Bf16(self.bits(o, rows * cols)), dims(rows, cols)) else { break };
                map.insert(o, p);
            }
            map
        });
        map.get(&off)
    }
}

#[cfg(test)]
impl Base16 {
    /// Whether `panels` has built the packed copies.
    pub fn panels_built(&self) -> bool {
        self.panels.get().is_some()
    }
}

/// A (rows, cols) matrix as a Linear's dimensions (the row count of a product does not matter for packing).
fn dims(rows: usize, cols: usize) -> Dims {
    Dims { n: 0, ic: cols, oc: rows }
}

/// Bytes `Base16::panels` allocates for the matrices `mats` ((offset, rows, cols)): 0 where the CPU does not take
/// the AMX path.
pub(crate) fn panel_bytes(mats: &[(usize, usize, usize)]) -> usize {
    if crate::kernels::gemm_bf16::path_name() != "amx-bf16" {
        return 0;
    }
    mats.iter().map(|&(_, rows, cols)| PackedLinear::bytes_for(dims(rows, cols))).sum()
}
