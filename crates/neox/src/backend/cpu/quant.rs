//! A base held quantized for inference: every weight matrix (each Linear, the LM head and the embedding) in
//! q8_0 (`kernels::q8`), the vectors (LayerNorm weights, biases) in f32. Built one tensor at a time, so a model
//! is never held in f32 or bf16 as a whole (a 12b model loads in the memory its q8_0 form takes). Nothing
//! here is written after loading: a quantized model answers, it does not train.

use super::vectors::Vectors;
use crate::kernels::q8::{Q8Matrix, QK};
use crate::layout::Layout;
use std::sync::OnceLock;

/// The weight formats a quantized base can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantType {
    /// ggml's q8_0: blocks of 32 int8 with an f16 scale, 8.5 bits per weight.
    Q8_0,
}

impl QuantType {
    /// The name users type and GGUF tools print.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "q8_0",
        }
    }

    /// `q8_0` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Some(QuantType::Q8_0),
            _ => None,
        }
    }

    /// Bytes per weight of a matrix in this format.
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            QuantType::Q8_0 => (2 + QK) as f64 / QK as f64,
        }
    }
}

pub(crate) struct QuantBase {
    pub kind: QuantType,
    /// (layout offset, matrix), sorted by offset.
    mats: Vec<(usize, Q8Matrix)>,
    /// The 1-D tensors in f32.
    small: Vectors,
    /// The head dequantized (V, C) and transposed (C, V), built only when a loss is asked for (evaluation).
    head_f32: OnceLock<(Vec<f32>, Vec<f32>)>,
}

impl QuantBase {
    pub fn new(kind: QuantType) -> Self {
        QuantBase { kind, mats: Vec::new(), small: Vectors::default(), head_f32: OnceLock::new() }
    }

    /// Adds a matrix (rows, cols) at layout offset `off`.
    pub fn push_matrix(&mut self, off: usize, m: Q8Matrix) {
        self.mats.push((off, m));
    }

    /// Adds a 1-D tensor at layout offset `off`.
    pub fn push_vector(&mut self, off: usize, v: &[f32]) {
        self.small.push(off, v.iter().copied());
    }

    /// Sorts what was pushed and checks that it covers `layout` exactly: each tensor once, every matrix with
    /// its shape. Err names the first tensor that is missing or wrong.
    pub fn finish(mut self, layout: &Layout) -> Result<Self, String> {
        self.mats.sort_unstable_by_key(|m| m.0);
        self.small.sort();
        for p in &layout.params {
            let ok = match p.shape.len() {
                2 => self.matrix(p.offset).is_some_and(|m| m.rows == p.shape[0] && m.cols == p.shape[1]),
                _ => self.small.len_at(p.offset) == Some(p.numel()),
            };
            if !ok {
                return Err(format!("{}: missing or of the wrong shape in the quantized model", p.name));
            }
        }
        let tensors = self.mats.len() + self.small.count();
        if tensors != layout.params.len() {
            return Err(format!("{tensors} tensors for a model of {}", layout.params.len()));
        }
        Ok(self)
    }

    /// The matrix at layout offset `off`, if it is one.
    pub fn matrix(&self, off: usize) -> Option<&Q8Matrix> {
        self.mats.binary_search_by_key(&off, |m| m.0).ok().map(|i| &self.mats[i].1)
    }

    /// The f32 values of the 1-D tensor at layout offset `off` (`len` elements).
    pub fn vector(&self, off: usize, len: usize) -> &[f32] {
        self.small.get(off, len)
    }

    /// The head at `off` in f32, as stored and transposed (built at the first call: 8 bytes per head weight).
    pub fn head_f32(&self, off: usize) -> (&[f32], &[f32]) {
        let (w, wt) = self.head_f32.get_or_init(|| {
            let m = self.matrix(off).expect("the head is a matrix");
            let (v, c) = (m.rows, m.cols);
            let mut w = vec![0f32; v * c];
            for (r, row) in w.chunks_exact_mut(c).enumerate() {
                m.dequantize_row(r, row);
            }
            let mut wt = vec![0f32; v * c];
            crate::kernels::transpose::transpose(&mut wt, &w, v, c);
            (w, wt)
        });
        (w, wt)
    }
}
