//! Random initialisation of a GPT-NeoX model as HF `GPTNeoXPreTrainedModel._init_weights` does: Linear and
//! Embedding weights ~ N(0, initializer_range), biases 0, LayerNorm weight 1 and bias 0. Seeded and
//! reproducible with our own RNG (not bit-identical to PyTorch's generator, which no test relies on).

use crate::config::NeoxConfig;
use crate::error::{Error, Result};
use crate::layout::{Layout, ParamInfo};
use crate::model::Model;
use crate::weights::{save_tensors_with, SaveDtype};
use common::Rng;
use rayon::prelude::*;
use std::path::Path;

fn init_std(config: &NeoxConfig) -> f64 {
    config.raw.get("initializer_range").and_then(|x| x.as_f64()).unwrap_or(0.02)
}

/// Tensor `k` of the layout, initialised into `dst`.
fn fill(k: usize, info: &ParamInfo, seed: u64, std: f64, dst: &mut [f32]) {
    if info.name.ends_with("layernorm.weight") || info.name.ends_with("layer_norm.weight") {
        dst.fill(1.0);
    } else if info.name.ends_with(".bias") {
        dst.fill(0.0);
    } else {
        // One RNG stream per 64Ki-element block: parallel and independent of the thread count.
        dst.par_chunks_mut(1 << 16).enumerate().for_each(|(blk, d)| {
            let mut r = Rng::derive(seed, ((k as u64) << 32) | blk as u64);
            d.iter_mut().for_each(|x| *x = (r.normal() * std) as f32);
        });
    }
}

impl Model {
    pub fn new_random(config: NeoxConfig, seed: u64) -> Model {
        let layout = Layout::new(&config);
        let std = init_std(&config);
        let mut params = vec![0f32; layout.total];
        for (k, info) in layout.params.iter().enumerate() {
            fill(k, info, seed, std, &mut params[info.range()]);
        }
        Model::from_parts(config, params).expect("layout-sized buffer")
    }

    /// `new_random`'s values rounded to bf16 and held as a frozen bf16 base (`Model::load_bf16`'s form), one
    /// tensor at a time: 2 bytes per parameter and the largest tensor's f32 size besides.
    pub fn new_random_bf16(config: NeoxConfig, seed: u64) -> Model {
        let layout = Layout::new(&config);
        let std = init_std(&config);
        let mut w16 = vec![0u16; layout.total];
        let mut scratch = Vec::new();
        for (k, info) in layout.params.iter().enumerate() {
            scratch.resize(info.numel(), 0.0);
            fill(k, info, seed, std, &mut scratch);
            crate::kernels::w16::narrow(&mut w16[info.range()], &scratch);
        }
        let be = crate::backend::cpu::Cpu::new_bf16(w16, &layout);
        Model::on(config, layout, be)
    }
}

/// Write a random model into `dir` (config.json + model.safetensors) one tensor at a time, never holding the
/// whole model: the same values as `Model::new_random(config, seed)` saved as `dtype`, in at most the largest
/// tensor's f32 size of memory (what a 6.9b/12b shape needs on a 24 GB machine). Returns the parameter count.
pub fn write_random(dir: &Path, config: &NeoxConfig, seed: u64, dtype: SaveDtype) -> Result<usize> {
    let layout = Layout::new(config);
    let std = init_std(config);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut cfg = config.to_json();
    if let Some(m) = cfg.as_object_mut() {
        m.insert("torch_dtype".into(), dtype.torch_name().into());
    }
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::invalid(e.to_string()))? + "\n";
    let cpath = dir.join("config.json");
    common::atomic_write(&cpath, text.as_bytes()).map_err(|e| Error::io(&cpath, e))?;
    let specs: Vec<(&str, &[usize])> = layout.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
    save_tensors_with(&dir.join("model.safetensors"), &specs, dtype, |k, buf| {
        let info = &layout.params[k];
        buf.resize(info.range().len(), 0.0);
        fill(k, info, seed, std, buf);
        Ok(())
    })?;
    Ok(layout.total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_write_equals_the_in_memory_model_saved() {
        let mut cfg = NeoxConfig::preset("pythia-14m").unwrap();
        cfg.num_hidden_layers = 2;
        cfg.vocab_size = 1000;
        for dtype in [SaveDtype::F32, SaveDtype::Bf16] {
            let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let n = write_random(a.path(), &cfg, 7, dtype).unwrap();
            let m = Model::new_random(cfg.clone(), 7);
            m.save(b.path(), dtype).unwrap();
            assert_eq!(n, m.num_params());
            for f in ["config.json", "model.safetensors"] {
                let (x, y) = (std::fs::read(a.path().join(f)).unwrap(), std::fs::read(b.path().join(f)).unwrap());
                assert!(x == y, "{f} differs ({dtype:?})");
            }
        }
    }
}
