//! Quantized models for inference: loading an HF directory straight into q8_0 (one tensor in f32 at a time),
//! and quantizing a model already in memory (a random preset for benchmarks, a base resized for an adapter).

use crate::backend::cpu::{Cpu, QuantBase, QuantType};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::model::Model;
use crate::weights;
use std::path::Path;

impl Model<Cpu> {
    /// Load an HF model directory with every weight matrix quantized as it is read (`kind`), for inference:
    /// the model is never held whole in f32 or bf16. Decoding keeps a bf16 KV cache; training is refused.
    pub fn load_quantized(dir: &Path, kind: QuantType) -> Result<Self> {
        let config = Self::read_config(dir)?;
        let q = weights::load_params_quant(dir, &config, kind)?;
        let layout = Layout::new(&config);
        let be = Cpu::new_quant(q, &layout);
        Ok(Model::on(config, layout, be))
    }

    /// This model with its weight matrices quantized to `kind` (from f32 parameters or a bf16 base; an attached
    /// adapter is not carried over: attach it after). The original is held until the quantized copy is done (a
    /// model too big for that loads with `load_quantized` instead).
    pub fn into_quantized(self, kind: QuantType) -> Result<Self> {
        if self.quantized().is_some() {
            return Err(Error::invalid("the model is already quantized"));
        }
        let Model { config, layout, be, .. } = self;
        let mut q = QuantBase::new(kind);
        for p in &layout.params {
            let row = be.tensor_f32(p.offset, p.numel());
            if p.shape.len() == 2 {
                let m = weights::quantize_matrix(kind.for_matrix(&p.name, p.shape[1]), &row, p.shape[0], p.shape[1])
                    .map_err(|m| Error::invalid(format!("{}: {m}", p.name)))?;
                q.push_matrix(p.offset, m);
            } else {
                q.push_vector(p.offset, &row);
            }
        }
        drop(be);
        let q = q.finish(&layout).map_err(Error::invalid)?;
        let be = Cpu::new_quant(q, &layout);
        Ok(Model::on(config, layout, be))
    }

    /// The format of a quantized base (`load_quantized`, `into_quantized`), if the model has one.
    pub fn quantized(&self) -> Option<QuantType> {
        self.be.quant_type()
    }
}

impl Model<Cpu> {
    /// The f32 values a quantized model multiplies with (matrices dequantized, vectors as held), in layout
    /// order: the unquantized model a reference compares against.
    pub fn dequantized_params(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.layout.total);
        for p in &self.layout.params {
            out.extend_from_slice(&self.be.tensor_f32(p.offset, p.numel()));
        }
        out
    }
}
