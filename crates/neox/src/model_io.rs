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
        let config = Self::read_config(dir)?;
        let params = weights::load_params(dir, &config)?;
        Self::from_parts(config, params)
    }

    /// `dir/config.json`, with sizes whose parameter count fits in memory addresses.
    pub(crate) fn read_config(dir: &Path) -> Result<NeoxConfig> {
        let cpath = dir.join("config.json");
        let config = NeoxConfig::from_file(&cpath)?;
        if weights::checked_param_count(&config).is_none() {
            return Err(Error::file(&cpath, "the parameter count these sizes give does not fit in memory addresses"));
        }
        Ok(config)
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
        if self.lora().is_some() {
            return Err(Error::invalid("resize the vocabulary before attaching a LoRA adapter"));
        }
        let c = self.config.hidden_size;
        let mut cfg = self.config.clone();
        cfg.vocab_size = new_vocab;
        let layout = Layout::new(&cfg);
        let keep = old_v.min(new_vocab) * c;
        debug_assert_eq!(layout.embed_in, 0);
        // new rows: the mean of the matrix's existing rows (f64 sums of the stored values)
        let mean_of = |rows: &mut dyn Iterator<Item = f64>| -> Vec<f64> {
            let mut mean = vec![0f64; c];
            for (i, x) in rows.enumerate() {
                mean[i % c] += x;
            }
            mean.iter().map(|m| m / old_v as f64).collect()
        };
        if let Some(mut w16) = self.be.take_bf16() {
            // in place, so that a big bf16 base (13 GiB at 6.9b) is never held twice: the tensors between the two
            // embeddings move by the change of embed_in's size, embed_out's kept rows move with them
            let (old_in, new_in) = (old_v * c, new_vocab * c);
            let (old_out, new_out) = (self.layout.embed_out, layout.embed_out);
            if new_vocab < old_v {
                w16.copy_within(old_in..old_out + new_in, new_in);
                w16.truncate(layout.total);
            } else {
                w16.resize(layout.total, 0);
                w16.copy_within(old_out..old_out + old_in, new_out);
                w16.copy_within(old_in..old_out, new_in);
                for at in [0, new_out] {
                    let mean = mean_of(&mut w16[at..at + old_in].iter().map(|&b| bf16_to_f32(b) as f64));
                    for row in w16[at + old_in..at + new_in].chunks_mut(c) {
                        row.iter_mut().zip(&mean).for_each(|(x, m)| *x = f32_to_bf16(*m as f32));
                    }
                }
            }
            self.be.replace_bf16(w16, &layout);
        } else {
            let mut params = vec![0f32; layout.total];
            for (new, old) in layout.params.iter().zip(&self.layout.params) {
                let src = &self.params()[old.range()];
                let dst = &mut params[new.range()];
                if new.shape == old.shape {
                    dst.copy_from_slice(src);
                    continue;
                }
                dst[..keep].copy_from_slice(&src[..keep]);
                if new_vocab > old_v {
                    let mean = mean_of(&mut src.iter().map(|&x| x as f64));
                    for row in dst[keep..].chunks_mut(c) {
                        row.iter_mut().zip(&mean).for_each(|(x, m)| *x = *m as f32);
                    }
                }
            }
            self.be.replace(params, &layout);
        }
        self.layers = layout.layers.iter().map(|o| LayerParams::new(&cfg, o)).collect();
        self.config = cfg;
        self.layout = layout;
        Ok(())
    }
}
