//! A frozen base stored in bfloat16: every tensor's bits in layout order (2 bytes per parameter, no f32 copy
//! of any matrix), plus f32 copies of the vectors (LayerNorm weights, biases) that the kernels read as f32.
//! A LoRA run trains only its adapter, so nothing here is ever written after loading.

use crate::kernels::w16::bf16_to_f32;
use crate::layout::Layout;

pub(crate) struct Base16 {
    pub w: Vec<u16>,
    /// The 1-D tensors widened to f32, back to back.
    small: Vec<f32>,
    /// (layout offset, start in `small`, length) of each 1-D tensor, by offset.
    index: Vec<(usize, usize, usize)>,
}

impl Base16 {
    /// `w`: bf16 bits of every parameter of `layout`, in its order.
    pub fn new(w: Vec<u16>, layout: &Layout) -> Self {
        assert_eq!(w.len(), layout.total, "bf16 base size");
        let mut small = Vec::new();
        let mut index = Vec::new();
        for p in layout.params.iter().filter(|p| p.shape.len() == 1) {
            index.push((p.offset, small.len(), p.numel()));
            small.extend(w[p.range()].iter().map(|&b| bf16_to_f32(b)));
        }
        index.sort_unstable();
        Base16 { w, small, index }
    }

    /// The f32 values of the 1-D tensor at layout offset `off` (`len` elements).
    pub fn vector(&self, off: usize, len: usize) -> &[f32] {
        let i = self.index.binary_search_by_key(&off, |e| e.0).unwrap_or_else(|_| panic!("no 1-D tensor at {off}"));
        let (_, start, n) = self.index[i];
        assert_eq!(n, len, "1-D tensor length at {off}");
        &self.small[start..start + n]
    }

    /// The bf16 bits of the tensor at `off` (`len` elements).
    pub fn bits(&self, off: usize, len: usize) -> &[u16] {
        &self.w[off..off + len]
    }
}
