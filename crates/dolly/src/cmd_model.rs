//! `dolly init-model`: write a randomly initialised GPT-NeoX in Hugging Face layout (a Pythia preset shape or
//! a custom one) with its tokenizer, so the directory is self-contained. Useful where the hub is unreachable:
//! tests, demos, benchmarks. Weights are written one tensor at a time (6.9b/12b shapes fit a 24 GB machine).

use anyhow::{bail, Context};
use clap::Args;
use neox::{NeoxConfig, SaveDtype};
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
    /// tokenizer.json to copy into the model directory: a file, a hub model id whose tokenizer.json is fetched
    /// (HF cache, offline reuse), or `none` for a directory without a tokenizer.
    #[arg(long, default_value = "EleutherAI/pythia-70m")]
    pub tokenizer: String,
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
    let tokenizer = tokenizer_bytes(&a.tokenizer)?;
    if !(1..=1 << 24).contains(&cfg.vocab_size) || !(1..=1024).contains(&cfg.num_hidden_layers) {
        bail!("--vocab-size must be in 1..=16777216 and --num-hidden-layers in 1..=1024");
    }
    let largest = neox::Layout::new(&cfg).params.iter().map(|p| p.range().len() as u64).max().unwrap_or(0);
    common::check_fits("the largest tensor of this shape", largest * 4).map_err(anyhow::Error::msg)?;
    let n = neox::init::write_random(&a.output, &cfg, a.seed, dtype)
        .with_context(|| format!("writing model to {}", a.output.display()))?;
    if let Some(t) = &tokenizer {
        let p = a.output.join("tokenizer.json");
        common::atomic_write(&p, t).with_context(|| format!("writing {}", p.display()))?;
    }
    eprintln!(
        "wrote {} ({n} parameters, {}{}) to {}",
        a.preset,
        dtype.torch_name(),
        if tokenizer.is_some() { ", with tokenizer.json" } else { ", no tokenizer" },
        a.output.display()
    );
    Ok(())
}

/// The bytes of the tokenizer.json to ship with the model (checked to be a GPT-NeoX tokenizer Dolly can use).
fn tokenizer_bytes(spec: &str) -> anyhow::Result<Option<Vec<u8>>> {
    if spec == "none" {
        return Ok(None);
    }
    let path = if std::path::Path::new(spec).is_file() {
        PathBuf::from(spec)
    } else if data::hub::looks_like_repo_id(spec) {
        let hub = data::Hub::new(data::HubOptions::from_env());
        hub.download_file(&data::Repo::model(spec, "main"), "tokenizer.json").with_context(|| {
            format!("--tokenizer {spec}: cannot fetch tokenizer.json (offline? pass --tokenizer FILE or none)")
        })?
    } else {
        bail!("--tokenizer {spec}: not a file and not a hub model id (or `none`)");
    };
    data::DollyTokenizer::from_file(&path)?;
    Ok(Some(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?))
}
