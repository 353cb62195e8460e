//! `dolly merge [BASE] ADAPTER --output DIR`: fold a LoRA adapter into its base and write a normal Hugging Face
//! model directory (config.json, model.safetensors, tokenizer files). Each tensor is merged in f32
//! (`Model::merged_tensor`: W + s·B·A, trained token rows in place of the base rows) and rounded once to the
//! saved dtype, one tensor at a time, so the model is never held in f32 twice. The base is held in bf16 (2 bytes
//! per parameter) when its config says bfloat16 (exact) or the output is bf16, else in f32 (exact for f32 and
//! f16 files). The directory is written as DIR.tmp-* and renamed into place (docs/adapter-format.md, "merge").

use crate::adapter_arg::{self, Source};
use crate::flags::parse_bool;
use anyhow::{bail, Context};
use clap::Args;
use data::DollyTokenizer;
use neox::{Model, SaveDtype};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
#[command(override_usage = "dolly merge [BASE] ADAPTER --output DIR [--dtype f32|bf16|f16] [--force] [OPTIONS]")]
pub struct MergeArgs {
    /// The base model (a directory or a hub id, as dolly generate takes it; when omitted, the adapter's
    /// base_model_name_or_path), then the adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(value_name = "[BASE] ADAPTER", num_args = 1..=2, required = true)]
    pub paths: Vec<String>,
    /// Directory to write: config.json, model.safetensors and the tokenizer files (the adapter directory's when
    /// it has tokenizer.json, else the base's). Written as DIR.tmp-* first, then renamed.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Weights dtype of the merged model: f32, bf16 or f16 [default: the base's torch_dtype, else f32].
    #[arg(long)]
    pub dtype: Option<String>,
    /// tokenizer.json for the merged model (its vocabulary sets the merged model's rows, as in dolly train)
    /// [default: the adapter directory's, else the base's; neither: the base's rows, no tokenizer written].
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Replace an existing non-empty --output directory. `--force` = true.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = parse_bool)]
    pub force: bool,
}

/// A file copied into the merged directory: (source path, name there).
type CopiedFile = (PathBuf, String);

/// Tokenizer files a model directory may carry, copied into the merged directory as they are.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

pub fn run(a: MergeArgs) -> anyhow::Result<()> {
    let (base_spec, adapter) = match a.paths.as_slice() {
        [adapter] => (None, adapter),
        [base, adapter] => (Some(base), adapter),
        _ => bail!("give [BASE] ADAPTER: one or two paths"),
    };
    let adapter = adapter_arg::adapter_dir(Path::new(adapter), "ADAPTER")?;
    let base = match base_spec {
        Some(b) => crate::model_arg::resolve(b)?,
        None => adapter_arg::base_of(&adapter)?,
    };
    let src = Source { base, adapter: Some(adapter) };
    check_output(&a.output, &src, a.force)?;
    let base_dtype = config_dtype(&src.base)?;
    let dtype = match &a.dtype {
        Some(d) => crate::cmd_model::parse_dtype(d).context("--dtype")?,
        None => base_dtype.unwrap_or(SaveDtype::F32),
    };
    let (tok, tok_files) = tokenizer(&src, a.tokenizer.as_deref())?;
    let vocab = match &tok {
        Some(t) => t.vocab_size(),
        None => neox::NeoxConfig::from_file(&src.base.join("config.json"))?.vocab_size,
    };
    let cfg = adapter_arg::config_for(&src, vocab)?;
    adapter_arg::check(&src, &cfg)?;
    // the only copy of the weights in memory: bf16 where that loses nothing or the output is bf16 anyway
    let hold_bf16 = dtype == SaveDtype::Bf16 || base_dtype == Some(SaveDtype::Bf16);
    check_memory(&cfg, hold_bf16)?;
    let t0 = Instant::now();
    let mut model = if hold_bf16 {
        Model::load_bf16(&src.base).with_context(|| format!("loading model {}", src.base.display()))?
    } else {
        crate::model_arg::load(&src.base)?
    };
    adapter_arg::resize_for_adapter(&mut model, vocab)?;
    let adapter = src.adapter.as_deref().unwrap_or(&src.base);
    adapter_arg::attach(&mut model, adapter, &src.base)?;
    let out = OutputDir::create(&a.output)?;
    write_merged(&model, out.tmp(), dtype)?;
    for (from, name) in &tok_files {
        copy(from, &out.tmp().join(name))?;
    }
    if src.base.join("generation_config.json").is_file() {
        copy(&src.base.join("generation_config.json"), &out.tmp().join("generation_config.json"))?;
    }
    out.commit()?;
    let rss =
        common::sysmem::peak_rss_bytes().map(|b| format!(", peak RSS {}", common::human_bytes(b))).unwrap_or_default();
    eprintln!(
        "merged {} into {} -> {} ({}, {} tensors, base held in {}; {:.1} s{rss})",
        adapter.display(),
        src.base.display(),
        a.output.display(),
        dtype.torch_name(),
        model.layout.params.len(),
        if hold_bf16 { "bf16" } else { "f32" },
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Peak memory of the merge: the held base (2 or 4 bytes per parameter), one merged f32 tensor, the adapter
/// (small next to the base; not counted).
fn check_memory(cfg: &neox::NeoxConfig, hold_bf16: bool) -> anyhow::Result<()> {
    let n = neox::weights::checked_param_count(cfg).context("the base's sizes overflow")?;
    let largest = neox::Layout::new(cfg).params.iter().map(|p| p.numel() as u64).max().unwrap_or(0);
    let need = n * if hold_bf16 { 2 } else { 4 } + 4 * largest;
    let what =
        format!("merging (the base held in {}, plus one merged f32 tensor)", if hold_bf16 { "bf16" } else { "f32" });
    common::check_fits(&what, need).map_err(|e| {
        let hint = if hold_bf16 { "" } else { "; --dtype bf16 holds the base in 2 bytes per parameter" };
        anyhow::anyhow!("{e}{hint}")
    })
}

/// The dtype the base's config.json names (`torch_dtype`, or transformers 5's `dtype`), when it is one we write.
fn config_dtype(base: &Path) -> anyhow::Result<Option<SaveDtype>> {
    let cfg = neox::NeoxConfig::from_file(&base.join("config.json"))?;
    let name = ["torch_dtype", "dtype"].iter().find_map(|k| cfg.raw.get(*k).and_then(|v| v.as_str()));
    Ok(name.and_then(|n| crate::cmd_model::parse_dtype(n).ok()))
}

/// The tokenizer that sets the merged vocabulary and the files to copy with it: `--tokenizer FILE` (copied as
/// tokenizer.json), else the tokenizer files of the adapter directory when it has tokenizer.json, else the base's.
fn tokenizer(src: &Source, flag: Option<&Path>) -> anyhow::Result<(Option<DollyTokenizer>, Vec<CopiedFile>)> {
    if let Some(f) = flag {
        let tok = DollyTokenizer::from_file(f).with_context(|| format!("--tokenizer {}", f.display()))?;
        return Ok((Some(tok), vec![(f.to_path_buf(), "tokenizer.json".into())]));
    }
    let dir = src.tokenizer_dir();
    if !dir.join("tokenizer.json").is_file() {
        return Ok((None, Vec::new()));
    }
    let tok = DollyTokenizer::from_file(&dir.join("tokenizer.json"))?;
    let files = TOKENIZER_FILES.iter().filter(|n| dir.join(n).is_file()).map(|n| (dir.join(n), n.to_string()));
    Ok((Some(tok), files.collect()))
}

/// `--output` must not be a file, the base or the adapter, and must be empty unless `--force`.
fn check_output(out: &Path, src: &Source, force: bool) -> anyhow::Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("--output {}: exists and is not a directory", out.display());
    }
    let canon = |p: &Path| p.canonicalize().ok();
    if let Some(o) = canon(out) {
        for (what, p) in [("base model", Some(&src.base)), ("adapter", src.adapter.as_ref())] {
            if p.and_then(|p| canon(p)) == Some(o.clone()) {
                bail!("--output {} is the {what} directory: give a new directory", out.display());
            }
        }
        let non_empty = std::fs::read_dir(out).with_context(|| format!("--output {}", out.display()))?.next().is_some();
        if non_empty && !force {
            bail!("--output {}: directory exists and is not empty (--force replaces it)", out.display());
        }
    }
    Ok(())
}

/// config.json (torch_dtype naming `dtype`, vocab_size the resized one) and model.safetensors with the base's
/// tensor names and shapes, each tensor merged in f32 and rounded once to `dtype`.
fn write_merged(model: &Model, dir: &Path, dtype: SaveDtype) -> anyhow::Result<()> {
    let mut cfg = model.config.to_json();
    if let Some(m) = cfg.as_object_mut() {
        m.insert("torch_dtype".into(), dtype.torch_name().into());
        if m.contains_key("dtype") {
            m.insert("dtype".into(), dtype.torch_name().into());
        }
    }
    let cpath = dir.join("config.json");
    let text = serde_json::to_string_pretty(&cfg)? + "\n";
    common::atomic_write(&cpath, text.as_bytes()).with_context(|| format!("writing {}", cpath.display()))?;
    let params = &model.layout.params;
    let specs: Vec<(&str, &[usize])> = params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
    let wpath = dir.join("model.safetensors");
    neox::weights::save_tensors_with(&wpath, &specs, dtype, |k, buf| {
        // the previous tensor's buffer goes first: one merged tensor in memory at a time
        drop(std::mem::take(buf));
        *buf = model.merged_tensor(&params[k]);
        Ok(())
    })
    .with_context(|| format!("writing {}", wpath.display()))
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    common::atomic_write(to, &bytes).with_context(|| format!("writing {}", to.display()))
}

/// The output directory, written as a sibling `NAME.tmp-*` that is renamed into place at `commit` (an existing
/// directory is moved aside first and removed after), and removed if the merge stops before that.
struct OutputDir {
    out: PathBuf,
    tmp: PathBuf,
    done: bool,
}

impl OutputDir {
    fn create(out: &Path) -> anyhow::Result<OutputDir> {
        let name = out.file_name().with_context(|| format!("--output {}: no directory name", out.display()))?;
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let tag = unique_tag();
        let tmp = parent.join(format!("{}.tmp-{tag}", name.to_string_lossy()));
        std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(OutputDir { out: out.to_path_buf(), tmp, done: false })
    }

    fn tmp(&self) -> &Path {
        &self.tmp
    }

    fn commit(mut self) -> anyhow::Result<()> {
        sync_dir(&self.tmp)?;
        let old = if self.out.exists() {
            let name = self.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let old = self.out.with_file_name(format!("{name}.old-{}", unique_tag()));
            std::fs::rename(&self.out, &old).with_context(|| format!("moving {} aside", self.out.display()))?;
            Some(old)
        } else {
            None
        };
        std::fs::rename(&self.tmp, &self.out)
            .with_context(|| format!("renaming {} to {}", self.tmp.display(), self.out.display()))?;
        self.done = true;
        if let Some(parent) = self.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing the replaced {}", old.display()))?;
        }
        Ok(())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Process id and clock nanoseconds, in hex: distinct for concurrent merges into the same parent.
fn unique_tag() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{:x}{nanos:08x}", std::process::id())
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    common::sync_dir(dir).with_context(|| format!("syncing {}", dir.display()))
}
