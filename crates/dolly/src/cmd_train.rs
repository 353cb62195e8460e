//! `dolly train`: the seed trainer's flags (same names and defaults; see `train::TrainConfig`), an optional
//! `--config FILE.toml` whose keys are these flag names, the command line overriding the file.

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" | "True" | "1" | "yes" => Ok(true),
        "false" | "False" | "0" | "no" => Ok(false),
        _ => Err(format!("expected true or false, got `{s}`")),
    }
}

/// Flags; each is optional so that only what is given overrides the config file and the defaults.
#[derive(Args, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct TrainArgs {
    /// TOML file with any of these flags as keys (`lr = 5e-6`); flags given here override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// HF model directory or hub id [default: EleutherAI/pythia-6.9b].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_model: Option<String>,
    /// Output directory: checkpoints, metrics.jsonl, final model (required).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_output_dir: Option<PathBuf>,
    /// Also copy the final model here.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dbfs_output_dir: Option<PathBuf>,
    /// [default: 3]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u32>,
    /// [default: 8]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_device_train_batch_size: Option<usize>,
    /// [default: 8]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_device_eval_batch_size: Option<usize>,
    /// Held-out records: a count (1000) or a ratio (0.05); 0 = no eval [default: 1000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_size: Option<String>,
    /// [default: 0]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// [default: 10]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logging_steps: Option<u64>,
    /// [default: 50]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_steps: Option<u64>,
    /// [default: 400]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_steps: Option<u64>,
    /// [default: 10]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_total_limit: Option<usize>,
    /// Peak learning rate [default: 1e-5].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// [default: 42]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// DeepSpeed JSON config (Dolly's ZeRO configs): what applies here is applied, the rest reported.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deepspeed: Option<PathBuf>,
    /// Hub dataset id, .jsonl/.json/.parquet file, or a directory [default: databricks/databricks-dolly-15k].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training_dataset: Option<String>,
    /// Recompute activations per layer in the backward [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
    /// Same as --gradient-checkpointing false.
    #[arg(long)]
    #[serde(skip)]
    pub no_gradient_checkpointing: bool,
    /// true|false [default: float32 on CPU].
    #[arg(long, value_parser = parse_bool)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bf16: Option<bool>,
    /// Stop after this many optimizer steps (overrides epochs).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// [default: 1]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gradient_accumulation_steps: Option<usize>,
    /// AdamW decoupled weight decay (biases and LayerNorm excluded) [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// linear | constant | warmup-log [default: linear].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_scheduler: Option<String>,
    /// Pack examples into fixed-length rows (per-document attention) instead of padding.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packing: Option<bool>,
    /// Row length for --packing [default: the model's max length].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pack_length: Option<usize>,
    /// A checkpoint directory, or `latest` (the newest complete one in the output directory).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_from_checkpoint: Option<String>,
    /// tokenizer.json to use instead of the model directory's.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// Max tokens per example (default: from config.json, Dolly's lookup).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// fail | skip for malformed records [default: fail].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_bad_record: Option<String>,
    /// Drop exact duplicate records before the split.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup: Option<bool>,
    /// Global gradient-norm clip [default: 1.0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// Abort after this many non-finite steps in a row [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_nonfinite_steps: Option<u32>,
}

pub fn run(mut a: TrainArgs, threads: Option<usize>) -> anyhow::Result<()> {
    if a.no_gradient_checkpointing {
        a.gradient_checkpointing = Some(false);
    }
    let mut overrides = serde_json::to_value(&a)?;
    if let (Some(t), Some(m)) = (threads, overrides.as_object_mut()) {
        m.insert("threads".into(), t.into());
    }
    let cfg = train::TrainConfig::resolve(a.config.as_deref(), overrides).map_err(anyhow::Error::msg)?;
    let summary = train::train(cfg, &|s| eprintln!("{s}")).map_err(anyhow::Error::msg).context("training failed")?;
    eprintln!(
        "done: {} steps, last loss {:.4}{}, {:.0} tokens/s; model in {}",
        summary.steps,
        summary.last_loss,
        summary.last_eval_loss.map(|e| format!(", eval loss {e:.4}")).unwrap_or_default(),
        summary.tokens_per_s,
        summary.output_dir.display()
    );
    Ok(())
}
