//! `dolly init-model`: write a randomly initialised GPT-NeoX in Hugging Face layout (a Pythia preset shape or
//! a custom one). Useful where the hub is unreachable: tests, demos, benchmarks.

use anyhow::{bail, Context};
use clap::Args;
use neox::{Model, NeoxConfig, SaveDtype};
use std::path::PathBuf;

#[derive(Args)]
pub struct InitModelArgs {
    /// Shape preset: pythia-14m, pythia-70m, pythia-160m, pythia-410m, pythia-1b, pythia-1.4b, pythia-2.8b,
    /// pythia-6.9b, pythia-12b.
    #[arg(long, default_value = "pythia-14m")]
    pub preset: String,
    /// Output directory (created; config.json and model.safetensors are written atomically).
    #[arg(long)]
    pub output: PathBuf,
    /// Seed of the N(0, 0.02) initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Override the vocabulary size (rows of embed_in/embed_out).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Override the number of layers.
    #[arg(long)]
    pub num_hidden_layers: Option<usize>,
    /// Weights dtype on disk: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn parse_dtype(s: &str) -> anyhow::Result<SaveDtype> {
    Ok(match s {
        "f32" | "float32" | "fp32" => SaveDtype::F32,
        "bf16" | "bfloat16" => SaveDtype::Bf16,
        "f16" | "float16" | "fp16" => SaveDtype::F16,
        other => bail!("unknown dtype `{other}` (expected f32, bf16 or f16)"),
    })
}

pub fn preset(name: &str) -> anyhow::Result<NeoxConfig> {
    NeoxConfig::preset(name)
        .with_context(|| format!("unknown preset `{name}`; known: {}", NeoxConfig::PRESETS.join(", ")))
}

pub fn run_init(a: InitModelArgs) -> anyhow::Result<()> {
    let mut cfg = preset(&a.preset)?;
    if let Some(v) = a.vocab_size {
        cfg.vocab_size = v;
    }
    if let Some(l) = a.num_hidden_layers {
        cfg.num_hidden_layers = l;
    }
    let dtype = parse_dtype(&a.dtype)?;
    let model = Model::new_random(cfg, a.seed);
    model.save(&a.output, dtype).with_context(|| format!("writing model to {}", a.output.display()))?;
    eprintln!(
        "wrote {} ({} parameters, {}) to {}",
        a.preset,
        model.num_params(),
        dtype.torch_name(),
        a.output.display()
    );
    Ok(())
}
