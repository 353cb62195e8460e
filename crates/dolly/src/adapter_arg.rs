//! LoRA adapters on the command line: `dolly generate/serve MODEL --adapter DIR`, MODEL given as an adapter
//! directory (its base loaded from `base_model_name_or_path`, as PEFT's `AutoPeftModelForCausalLM` does), and
//! the base of `dolly merge ADAPTER`. Resolves which base and adapter directories a command line names, checks
//! the adapter's configuration against the base before any weights load, and loads the base with the adapter
//! attached (unmerged) after resizing the base to the tokenizer's vocabulary as `dolly train` does.

use anyhow::{bail, Context};
use neox::adapter_io::{self, AdapterMeta};
use neox::{Model, NeoxConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The base model directory and, when one is given, the adapter directory of a command line.
pub struct Source {
    pub base: PathBuf,
    pub adapter: Option<PathBuf>,
}

impl Source {
    /// Where `tokenizer.json` is looked up: the adapter directory when it has one (`dolly train --lora-r` writes
    /// it there), else the base.
    pub fn tokenizer_dir(&self) -> &Path {
        match &self.adapter {
            Some(a) if a.join("tokenizer.json").is_file() => a,
            _ => &self.base,
        }
    }
}

/// `what` (a flag or positional, for messages) names an adapter directory: it exists and has
/// `adapter_config.json`.
pub fn adapter_dir(path: &Path, what: &str) -> anyhow::Result<PathBuf> {
    if !path.is_dir() {
        bail!("{what} {}: not a directory (give a PEFT adapter directory with adapter_config.json)", path.display());
    }
    if !adapter_io::is_adapter_dir(path) {
        bail!("{what} {}: no {} in it (not a PEFT adapter directory)", path.display(), adapter_io::CONFIG_FILE);
    }
    Ok(path.to_path_buf())
}

/// The base model the adapter in `adapter` names (`base_model_name_or_path`), resolved as PEFT resolves it
/// (relative to the current directory, then to the adapter directory's parent), or as a hub id.
pub fn base_of(adapter: &Path) -> anyhow::Result<PathBuf> {
    let cpath = adapter.join(adapter_io::CONFIG_FILE);
    let text = std::fs::read_to_string(&cpath).with_context(|| format!("reading {}", cpath.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", cpath.display()))?;
    let name = match v.get("base_model_name_or_path").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => bail!(
            "{}: no base_model_name_or_path: give the base model explicitly (`dolly generate BASE --adapter {}`, \
             `dolly merge BASE {} ...`)",
            cpath.display(),
            adapter.display(),
            adapter.display()
        ),
    };
    let local = adapter_io::resolve_base(adapter, &name);
    let spec = if local.is_dir() { local.to_string_lossy().into_owned() } else { name.clone() };
    crate::model_arg::resolve(&spec)
        .with_context(|| format!("the base model `{name}` that {} names (base_model_name_or_path)", cpath.display()))
}

/// What MODEL and `--adapter` name. MODEL may itself be an adapter directory (then without `--adapter`).
pub fn resolve(model: &str, adapter: Option<&Path>) -> anyhow::Result<Source> {
    // (a LoRA run's checkpoint also has adapter_config.json, beside its shards: it loads as a checkpoint)
    let p = Path::new(model);
    let checkpoint = p.join(train::checkpoint_shards::SHARDS_FILE).is_file();
    let model_is_adapter = p.is_dir() && adapter_io::is_adapter_dir(p) && !checkpoint;
    match adapter {
        Some(a) => {
            let adapter = adapter_dir(a, "--adapter")?;
            if model_is_adapter {
                bail!(
                    "MODEL {model} is itself an adapter directory: give its base as MODEL with --adapter, or drop \
                     --adapter"
                );
            }
            Ok(Source { base: crate::model_arg::resolve(model)?, adapter: Some(adapter) })
        }
        None if model_is_adapter => {
            let adapter = PathBuf::from(model);
            Ok(Source { base: base_of(&adapter)?, adapter: Some(adapter) })
        }
        None => Ok(Source { base: crate::model_arg::resolve(model)?, adapter: None }),
    }
}

/// The base's config.json as the adapter will see it: resized to `vocab` rows when an adapter is attached.
pub fn config_for(src: &Source, vocab: usize) -> anyhow::Result<NeoxConfig> {
    let mut cfg = NeoxConfig::from_file(&src.base.join("config.json"))?;
    if src.adapter.is_some() {
        cfg.vocab_size = vocab;
    }
    Ok(cfg)
}

/// Check the adapter's configuration against the (resized) base before any weights load.
pub fn check(src: &Source, cfg: &NeoxConfig) -> anyhow::Result<Option<AdapterMeta>> {
    let Some(a) = &src.adapter else { return Ok(None) };
    let meta = adapter_io::read_adapter_config(a, cfg)
        .with_context(|| format!("adapter {} does not fit the base {}", a.display(), src.base.display()))?;
    Ok(Some(meta))
}

/// Resize `model` to the tokenizer's `vocab` rows when they differ, as `dolly train` does before training (an
/// adapter trained after Dolly's resize expects it), saying so on stderr.
pub fn resize_for_adapter(model: &mut Model, vocab: usize) -> anyhow::Result<()> {
    if model.config.vocab_size != vocab {
        eprintln!(
            "resizing the base's vocabulary {} -> {vocab} (the tokenizer's, as dolly train does)",
            model.config.vocab_size
        );
        model.resize_vocab(vocab)?;
    }
    Ok(())
}

/// Attach the adapter in `adapter` to `model` (already resized), every error naming the file and tensor.
pub fn attach(model: &mut Model, adapter: &Path, base: &Path) -> anyhow::Result<()> {
    model
        .load_adapter(adapter)
        .with_context(|| format!("adapter {} does not fit the base {}", adapter.display(), base.display()))?;
    Ok(())
}

/// Load the base of `src` (f32, or a checkpoint's shards; quantized to `quant` when given) and, with an adapter,
/// resize it to `vocab` rows and attach the adapter, unmerged.
pub fn load(src: &Source, vocab: usize, quant: Option<neox::QuantType>) -> anyhow::Result<Model> {
    let checkpoint = src.base.join(train::checkpoint_shards::SHARDS_FILE).is_file();
    let mut model = match quant {
        // straight from the files, one tensor at a time
        Some(q) if src.adapter.is_none() && !checkpoint => Model::load_quantized(&src.base, q)
            .with_context(|| format!("loading model {} as {}", src.base.display(), q.name()))?,
        _ => crate::model_arg::load(&src.base)?,
    };
    if src.adapter.is_some() {
        resize_for_adapter(&mut model, vocab)?;
    }
    if let Some(q) = quant.filter(|_| model.quantized().is_none()) {
        model =
            model.into_quantized(q).with_context(|| format!("quantizing {} to {}", src.base.display(), q.name()))?;
    }
    if let Some(a) = &src.adapter {
        attach(&mut model, a, &src.base)?;
    }
    Ok(model)
}

/// A directory's own name (the default model id a server reports for an adapter, a GGUF file's general.name).
pub fn name_of(dir: &Path) -> String {
    let canon = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    canon.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into())
}
