//! LoRA on the engine interface: attach an adapter to a CPU model (its base frozen from then on), the
//! trainable view the trainer works with (the adapter when one is attached, every parameter otherwise), a
//! frozen base loaded straight into bf16, and merged tensors for export.

use crate::backend::cpu::Cpu;
use crate::error::{Error, Result};
use crate::layout::{Layout, ParamInfo};
use crate::lora::{AdapterLayout, LoraConfig};
use crate::model::Model;
use crate::weights;
use crate::NeoxConfig;
use std::path::Path;

/// How an attached adapter starts.
pub enum LoraInit {
    /// PEFT's initialisation from this seed: A Kaiming-uniform (a = √5, i.e. U(±1/√IC)), B zero, trained token
    /// rows equal to the base rows (so the adapted model starts as the base model).
    Seed(u64),
    /// These values, in `AdapterLayout` order (a loaded adapter or a checkpoint).
    Values(Vec<f32>),
}

impl Model<Cpu> {
    /// Load a model whose weights are held as bf16 bits (2 bytes per parameter, no f32 copy of any matrix): the
    /// frozen base of a LoRA run. f32 and f16 files are rounded to bf16 as they are read.
    pub fn load_bf16(dir: &Path) -> Result<Self> {
        let config = Self::read_config(dir)?;
        let w16 = weights::load_params_bf16(dir, &config)?;
        let layout = Layout::new(&config);
        let be = Cpu::new_bf16(w16, &layout);
        Ok(Model::on(config, layout, be))
    }

    /// Whether the base is held in bf16 (`load_bf16`).
    pub fn base_bf16(&self) -> bool {
        self.be.base_bf16()
    }

    /// Attach a LoRA adapter: from now on the base is frozen, gradients (`new_grads`) and `adamw_step` cover the
    /// adapter only, and every forward adds its branches.
    pub fn attach_lora(&mut self, cfg: LoraConfig, init: LoraInit) -> Result<()> {
        cfg.validate(&self.config)?;
        if self.be.lora().is_some() {
            return Err(Error::invalid("this model already has a LoRA adapter attached"));
        }
        let layout = AdapterLayout::new(&self.config, &self.layout, &cfg);
        let params = match init {
            LoraInit::Values(v) => {
                if v.len() != layout.total {
                    return Err(Error::invalid(format!(
                        "{} adapter values given, this LoRA configuration has {}",
                        v.len(),
                        layout.total
                    )));
                }
                v
            }
            LoraInit::Seed(seed) => self.initial_adapter(&cfg, &layout, seed),
        };
        self.be.attach_lora(cfg, layout, params);
        Ok(())
    }

    fn initial_adapter(&self, cfg: &LoraConfig, layout: &AdapterLayout, seed: u64) -> Vec<f32> {
        let mut params = vec![0f32; layout.total];
        let mut rng = common::Rng::new(seed);
        for s in &layout.slots {
            let bound = 1.0 / (s.ic as f64).sqrt();
            for a in &mut params[s.a..s.a + cfg.r * s.ic] {
                *a = ((rng.next_f64() * 2.0 - 1.0) * bound) as f32;
            }
        }
        let c = self.config.hidden_size;
        let tables = [(layout.embed_rows, self.layout.embed_in), (layout.head_rows, self.layout.embed_out)];
        for (at, table) in tables {
            let Some(at) = at else { continue };
            for (k, &id) in cfg.token_rows.iter().enumerate() {
                let row = self.be.base_row(table, id as usize, c);
                params[at + k * c..at + (k + 1) * c].copy_from_slice(&row);
            }
        }
        params
    }

    /// Remove the adapter; the base is trainable again (unless it is held in bf16).
    pub fn detach_lora(&mut self) {
        self.be.detach_lora()
    }

    /// The attached adapter's configuration.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.be.lora().map(|l| l.0)
    }

    /// The attached adapter's layout.
    pub fn adapter_layout(&self) -> Option<&AdapterLayout> {
        self.be.lora().map(|l| l.1)
    }

    /// What training updates: the adapter's values when one is attached, every parameter otherwise. The
    /// gradient buffer, the optimizer moments and checkpoints follow this view.
    pub fn trainable(&self) -> &[f32] {
        match self.be.lora() {
            Some((_, _, p)) => p,
            None => self.params(),
        }
    }

    /// Mutable `trainable` values (loading a checkpoint; the base's derived formats are refreshed when these are
    /// the parameters).
    pub fn trainable_mut(&mut self) -> &mut [f32] {
        if self.be.lora().is_some() {
            return self.be.lora_params_mut().unwrap_or_default();
        }
        self.params_mut()
    }

    /// Names, shapes and weight-decay flags of the `trainable` tensors.
    pub fn trainable_tensors(&self) -> &[ParamInfo] {
        match self.be.lora() {
            Some((_, l, _)) => &l.params,
            None => &self.layout.params,
        }
    }

    /// Bytes the frozen bf16 base of a `cfg` model takes packed for the AMX products (`set_packed_weights`): 4
    /// per weight of the Linear layers and the head; 0 where the CPU does not take the AMX path.
    pub fn packed_weight_bytes(cfg: &NeoxConfig) -> usize {
        crate::backend::cpu::packed_weight_bytes(&Layout::new(cfg))
    }

    /// The frozen bf16 base's products read its weights packed once (`on`: `packed_weight_bytes` more memory,
    /// allocated at the first training product) instead of packing them in every product. The caller accounts
    /// for the memory; off by default. No effect on an f32 base or off the AMX path.
    pub fn set_packed_weights(&mut self, on: bool) {
        self.be.set_packed_weights(on)
    }

    /// `Some(seed)`: training products drop LoRA inputs with this micro-batch's mask (set before each
    /// `forward_backward`, from the trainer's checkpointed RNG); `None` (evaluation, decoding): no dropout.
    pub fn set_dropout_seed(&mut self, seed: Option<u64>) {
        self.be.set_dropout_seed(seed)
    }

    /// The tensor `info` (of the base layout) with the adapter merged in, in f32: W + s·B·A for a targeted
    /// Linear (summed in f32), trained token rows in place of the base rows, the base values otherwise.
    pub fn merged_tensor(&self, info: &ParamInfo) -> Vec<f32> {
        let c = self.config.hidden_size;
        let cols = info.shape.last().copied().unwrap_or(1);
        // sized up front: collecting the rows would grow the buffer by doubling (up to ~2x a big embedding)
        let mut w: Vec<f32> = Vec::with_capacity(info.numel());
        for r in 0..info.numel() / cols.max(1) {
            w.extend(self.be.base_row(info.offset, r, cols));
        }
        let Some((cfg, layout, p)) = self.be.lora() else { return w };
        if let Some(s) = layout.slot(info.offset) {
            let (r, scale) = (cfg.r, cfg.scale());
            let (a, b) = (&p[s.a..s.a + r * s.ic], &p[s.b..s.b + s.oc * r]);
            // as PEFT merges: delta = B·A, then W += delta·s
            let mut delta = vec![0f32; s.ic];
            for (o, row) in w.chunks_mut(s.ic).enumerate() {
                delta.fill(0.0);
                for j in 0..r {
                    let bj = b[o * r + j];
                    delta.iter_mut().zip(&a[j * s.ic..(j + 1) * s.ic]).for_each(|(d, a)| *d += bj * a);
                }
                row.iter_mut().zip(&delta).for_each(|(w, d)| *w += d * scale);
            }
        }
        let rows = if info.offset == self.layout.embed_in {
            layout.embed_rows
        } else if info.offset == self.layout.embed_out {
            layout.head_rows
        } else {
            None
        };
        if let Some(at) = rows {
            for (k, &id) in cfg.token_rows.iter().enumerate() {
                let id = id as usize;
                w[id * c..(id + 1) * c].copy_from_slice(&p[at + k * c..at + (k + 1) * c]);
            }
        }
        w
    }
}
