//! What a LoRA run adds to the trainer: the adapter's configuration from the run's settings and tokenizer, the
//! frozen base (held in bf16 when the run computes in bf16: 2 bytes per parameter, no f32 copy), the dropout
//! seed of each micro-batch, and the final export as a PEFT adapter directory.

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use data::DollyTokenizer;
use neox::lora::{parse_targets, AdapterLayout, LoraConfig};
use neox::{Layout, Model, NeoxConfig, Unit};
use std::path::Path;

/// The run's LoRA configuration for a model of `mcfg`'s shape (its vocabulary already the tokenizer's), or None
/// for a full fine-tune.
pub fn lora_config(cfg: &TrainConfig, mcfg: &NeoxConfig, tok: &DollyTokenizer) -> Result<Option<LoraConfig>> {
    let Some(r) = cfg.lora_r else { return Ok(None) };
    let targets =
        parse_targets(&cfg.lora_target_modules).map_err(|e| TrainError(format!("--lora-target-modules: {e}")))?;
    let token_rows = match cfg.train_token_rows.as_str() {
        "none" => Vec::new(),
        "all" => (0..mcfg.vocab_size as u32).collect(),
        _ => {
            let s = tok.special();
            let mut ids = vec![s.end, s.instruction, s.response];
            ids.sort_unstable();
            ids.dedup();
            ids
        }
    };
    let lora = LoraConfig {
        r,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout as f32,
        targets,
        rslora: cfg.use_rslora,
        token_rows,
    };
    lora.validate(mcfg).map_err(|e| TrainError(format!("LoRA settings: {e}")))?;
    Ok(Some(lora))
}

/// The units a LoRA run reduces and checkpoints: the adapter's flat buffer, whole.
pub fn adapter_units(mcfg: &NeoxConfig, lora: &LoraConfig) -> Vec<Unit> {
    let total = AdapterLayout::new(mcfg, &Layout::new(mcfg), lora).total;
    vec![Unit { name: "adapter".into(), range: 0..total }]
}

/// The frozen base from `dir`, held in bf16 when `bf16` (f32 otherwise), resized to `vocab` rows as Dolly does.
pub fn load_base(dir: &Path, bf16: bool, vocab: usize, say: &dyn Fn(&str)) -> Result<Model> {
    let mut model = if bf16 { Model::load_bf16(dir)? } else { Model::load(dir)? };
    if model.config.vocab_size != vocab {
        say(&format!("resizing vocabulary {} -> {vocab} (Dolly's resize)", model.config.vocab_size));
        model.resize_vocab(vocab)?;
    }
    Ok(model)
}

/// How an adapter names its base (`base_model_name_or_path`): a local directory as an absolute path (so the
/// adapter loads from any working directory), a hub id as given.
pub fn base_name(input_model: &str) -> String {
    let p = Path::new(input_model);
    if p.is_dir() {
        if let Ok(abs) = p.canonicalize() {
            return abs.display().to_string();
        }
    }
    input_model.to_string()
}

/// Write the final adapter into `out` (PEFT's `adapter_config.json` + `adapter_model.safetensors`), refusing
/// non-finite values.
pub fn export(out: &Path, model: &Model, input_model: &str) -> Result<()> {
    let whole = std::iter::once(0..model.trainable().len()).collect::<Vec<_>>();
    crate::checkpoint::check_finite_ranges(model, &whole, "final adapter")?;
    model.save_adapter(out, &base_name(input_model))?;
    Ok(())
}

/// The dropout seed of micro-batch slot `slot` of optimizer step `step` (counted from 1): a function of the run's
/// seed and the position alone, so a resumed run, and any process count, draws the same masks.
pub fn dropout_seed(seed: u64, step: u64, slot: usize) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (slot as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    z ^ (z >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_seeds_differ_per_step_and_slot() {
        let mut seen = std::collections::HashSet::new();
        for step in 1..50 {
            for slot in 0..8 {
                assert!(seen.insert(dropout_seed(42, step, slot)));
            }
        }
        assert_ne!(dropout_seed(1, 1, 0), dropout_seed(2, 1, 0));
    }
}
