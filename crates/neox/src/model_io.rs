//! Loading, saving and resizing a CPU model: HF model directories in, `config.json` + `model.safetensors` out,
//! Dolly's vocabulary resize.

use crate::backend::cpu::Cpu;
use crate::block::LayerParams;
use crate::config::NeoxConfig;
use crate::error::{Error, Result};
use crate::kernels::w16::{bf16_to_f32, f32_to_bf16};
use crate::layout::Layout;
use crate::model::Model;
use crate::weights::{self, SaveDtype};
use std::path::Path;

impl Model<Cpu> {
    /// Load `config.json` + weights (safetensors, or `pytorch_model.bin` read without executing its pickle) from
    /// an HF model directory. The weights' headers are checked against config.json before anything is allocated.
    pub fn load(dir: &Path) -> Result<Self> {
        let cpath = dir.join("config.json");
        let config = NeoxConfig::from_file(&cpath)?;
        if weights::checked_param_count(&config).is_none() {
            return Err(Error::file(&cpath, "the parameter count these sizes give does not fit in memory addresses"));
        }
        let params = weights::load_params(dir, &config)?;
        Self::from_parts(config, params)
    }

    /// Write `config.json` and `model.safetensors` into `dir` (created if missing), each atomically.
    pub fn save(&self, dir: &Path, dtype: SaveDtype) -> Result<()> {
        self.save_config(dir, dtype)?;
        weights::save_safetensors(&dir.join("model.safetensors"), &self.layout, self.params(), dtype)
    }

    /// `config.json` alone (with `torch_dtype` naming `dtype`), as `save` writes it.
    pub fn save_config(&self, dir: &Path, dtype: SaveDtype) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut cfg = self.config.to_json();
        if let Some(m) = cfg.as_object_mut() {
            m.insert("torch_dtype".into(), dtype.torch_name().into());
        }
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::invalid(e.to_string()))? + "\n";
        let cpath = dir.join("config.json");
        common::atomic_write(&cpath, text.as_bytes()).map_err(|e| Error::io(&cpath, e))
    }

    /// Resize `embed_in` and `embed_out` to `new_vocab` rows as Dolly does: shrinking keeps the first rows;
    /// growing initialises each new row to the mean of the existing rows of that matrix.
    pub fn resize_vocab(&mut self, new_vocab: usize) -> Result<()> {
        if new_vocab == 0 {
            return Err(Error::invalid("vocabulary size must be > 0"));
        }
        let old_v = self.config.vocab_size;
        if new_vocab == old_v {
            return Ok(());
        }
        if self.be.base_bf16() {
            return self.resize_vocab_bf16(new_vocab);
        }
        let c = self.config.hidden_size;
        let mut cfg = self.config.clone();
        cfg.vocab_size = new_vocab;
        let layout = Layout::new(&cfg);
        let mut params = vec![0f32; layout.total];
        for (new, old) in layout.params.iter().zip(&self.layout.params) {
            let src = &self.params()[old.range()];
            let dst = &mut params[new.range()];
            if new.shape == old.shape {
                dst.copy_from_slice(src);
                continue;
            }
            let keep = old_v.min(new_vocab) * c;
            dst[..keep].copy_from_slice(&src[..keep]);
            if new_vocab > old_v {
                let mut mean = vec![0f64; c];
                for row in src.chunks(c) {
                    mean.iter_mut().zip(row).for_each(|(m, x)| *m += *x as f64);
                }
                for row in dst[keep..].chunks_mut(c) {
                    row.iter_mut().zip(&mean).for_each(|(x, m)| *x = (*m / old_v as f64) as f32);
                }
            }
        }
        self.be.replace(params, &layout);
        self.layers = layout.layers.iter().map(|o| LayerParams::new(&cfg, o)).collect();
        self.config = cfg;
        self.layout = layout;
        Ok(())
    }

    /// `resize_vocab` of a base held in bf16 (`load_bf16`): the same rows kept, each new row the mean of the
    /// table's old rows (summed in f64 over the bf16 values, rounded to bf16 once). The tensors move inside
    /// the one bf16 buffer, so shrinking (Pythia's 50304 -> Dolly's 50280) needs no second copy of the model.
    fn resize_vocab_bf16(&mut self, new_vocab: usize) -> Result<()> {
        if self.be.lora().is_some() {
            return Err(Error::invalid("resize the vocabulary before attaching a LoRA adapter"));
        }
        let (old_v, c) = (self.config.vocab_size, self.config.hidden_size);
        let mut cfg = self.config.clone();
        cfg.vocab_size = new_vocab;
        let layout = Layout::new(&cfg);
        let old = &self.layout;
        let Some(mut w) = self.be.take_base_bits() else { return Err(Error::invalid("no bf16 base")) };
        let mean_of = |table: usize| -> Vec<u16> {
            let mut mean = vec![0f64; c];
            for row in w[table..table + old_v * c].chunks(c) {
                mean.iter_mut().zip(row).for_each(|(m, &x)| *m += bf16_to_f32(x) as f64);
            }
            mean.iter().map(|m| f32_to_bf16((*m / old_v as f64) as f32)).collect()
        };
        let means = if new_vocab > old_v { vec![mean_of(old.embed_in), mean_of(old.embed_out)] } else { vec![] };
        // Only embed_in (first) and embed_out (last) change size, so every offset moves the same way: down
        // when shrinking (move front to back), up when growing (back to front); each keeps its first rows.
        let moves = layout.params.iter().zip(&old.params).map(|(n, o)| (o.offset, n.offset, n.numel().min(o.numel())));
        if new_vocab < old_v {
            moves.for_each(|(from, to, len)| w.copy_within(from..from + len, to));
            w.truncate(layout.total);
        } else {
            w.resize(layout.total, 0);
            moves.rev().for_each(|(from, to, len)| w.copy_within(from..from + len, to));
            for (table, mean) in [layout.embed_in, layout.embed_out].into_iter().zip(&means) {
                w[table + old_v * c..table + new_vocab * c].chunks_mut(c).for_each(|r| r.copy_from_slice(mean));
            }
        }
        self.be.replace_bf16(w, &layout);
        self.layers = layout.layers.iter().map(|o| LayerParams::new(&cfg, o)).collect();
        self.config = cfg;
        self.layout = layout;
        Ok(())
    }
}
