//! A base held quantized for inference: every weight matrix (each Linear, the LM head and the embedding) in
//! q8_0 (`kernels::q8`) or q4_K (`kernels::q4k`), the vectors (LayerNorm weights, biases) in f32. Built one
//! tensor at a time, so a model is never held in f32 or bf16 as a whole (a 12b model loads in the memory its
//! quantized form takes). Nothing here is written after loading: a quantized model answers, it does not train.

use super::vectors::Vectors;
use crate::kernels::matmul::Dims;
use crate::kernels::q4k::{linear_q4k, Q4KMatrix, QK_K};
use crate::kernels::q8::{linear_q8, Q8Matrix, QK};
use crate::layout::Layout;
use std::sync::OnceLock;

/// The weight formats a quantized base can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantType {
    /// ggml's q8_0: blocks of 32 int8 with an f16 scale, 8.5 bits per weight.
    Q8_0,
    /// ggml's q4_K: super-blocks of 256 with 6-bit sub-block scales and mins, 4.5 bits per weight. A q4_K
    /// model keeps its embedding and LM head in q8_0 (as llama.cpp keeps them at 6 or 8 bits) and so does a
    /// matrix whose rows are not whole super-blocks.
    Q4K,
}

impl QuantType {
    /// The name users type and GGUF tools print.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4K => "q4_k",
        }
    }

    /// `q8_0` or `q4_k` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Some(QuantType::Q8_0),
            "q4_k" => Some(QuantType::Q4K),
            _ => None,
        }
    }

    /// Bytes per weight of a matrix in this format, as held in memory.
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            QuantType::Q8_0 => (2 + QK) as f64 / QK as f64,
            QuantType::Q4K => (QK_K / 2 + 16 + 4) as f64 / QK_K as f64,
        }
    }

    /// The format a model quantized to `self` holds its matrix `name` (rows of `cols` values) in: q4_K keeps
    /// the embedding and the LM head, and rows that are not whole super-blocks, in q8_0.
    pub fn for_matrix(self, name: &str, cols: usize) -> QuantType {
        match self {
            QuantType::Q4K if name.contains("embed_in") || name.contains("embed_out") => QuantType::Q8_0,
            QuantType::Q4K if !cols.is_multiple_of(QK_K) => QuantType::Q8_0,
            kind => kind,
        }
    }
}

/// One quantized weight matrix (rows, cols).
pub(crate) enum QMatrix {
    Q8(Q8Matrix),
    Q4K(Q4KMatrix),
}

impl QMatrix {
    /// Quantizes a row-major f32 matrix (already checked by `weights::check_quantizable`).
    pub fn quantize(kind: QuantType, w: &[f32], rows: usize, cols: usize) -> Self {
        match kind {
            QuantType::Q8_0 => QMatrix::Q8(Q8Matrix::quantize(w, rows, cols)),
            QuantType::Q4K => QMatrix::Q4K(Q4KMatrix::quantize(w, rows, cols)),
        }
    }

    pub fn kind(&self) -> QuantType {
        match self {
            QMatrix::Q8(_) => QuantType::Q8_0,
            QMatrix::Q4K(_) => QuantType::Q4K,
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            QMatrix::Q8(m) => m.rows,
            QMatrix::Q4K(m) => m.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            QMatrix::Q8(m) => m.cols,
            QMatrix::Q4K(m) => m.cols,
        }
    }

    /// Row `r` as f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        match self {
            QMatrix::Q8(m) => m.dequantize_row(r, out),
            QMatrix::Q4K(m) => m.dequantize_row(r, out),
        }
    }

    /// The GGUF blocks of rows `r0..r1` in this matrix's own type, appended to `out`.
    pub fn write_blocks(&self, r0: usize, r1: usize, out: &mut Vec<u8>) {
        match self {
            QMatrix::Q8(m) => m.write_blocks(r0, r1, out),
            QMatrix::Q4K(m) => m.write_blocks(r0, r1, out),
        }
    }

    /// out (N, OC) = inp (N, IC) · Wᵀ + bias (or `+=`).
    pub fn linear(&self, out: &mut [f32], inp: &[f32], bias: Option<&[f32]>, d: Dims, accumulate: bool) {
        match self {
            QMatrix::Q8(m) => linear_q8(out, inp, m, bias, d, accumulate),
            QMatrix::Q4K(m) => linear_q4k(out, inp, m, bias, d, accumulate),
        }
    }
}

pub(crate) struct QuantBase {
    pub kind: QuantType,
    /// (layout offset, matrix), sorted by offset.
    mats: Vec<(usize, QMatrix)>,
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
    pub fn push_matrix(&mut self, off: usize, m: QMatrix) {
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
                2 => self.matrix(p.offset).is_some_and(|m| m.rows() == p.shape[0] && m.cols() == p.shape[1]),
                _ => self.small.len_at(p.offset) == Some(p.numel()),
            };
            if !ok {
                return Err(format!("{}: missing or of the wrong shape in the quantized model", p.name));
            }
        }
        // a file may mix q4_K and q8_0 matrices: the model is q4_K if any is
        self.kind =
            if self.mats.iter().any(|m| m.1.kind() == QuantType::Q4K) { QuantType::Q4K } else { QuantType::Q8_0 };
        let tensors = self.mats.len() + self.small.count();
        if tensors != layout.params.len() {
            return Err(format!("{tensors} tensors for a model of {}", layout.params.len()));
        }
        Ok(self)
    }

    /// The matrix at layout offset `off`, if it is one.
    pub fn matrix(&self, off: usize) -> Option<&QMatrix> {
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
            let (v, c) = (m.rows(), m.cols());
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
