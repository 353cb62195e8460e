//! `dolly export-gguf MODEL --type f32|f16|bf16|q8_0|q4_k --output OUT.gguf` and `dolly quantize MODEL --type q8_0|q4_k
//! --output OUT.gguf`: a model directory (or a dolly checkpoint, or a hub id) as a llama.cpp GGUF file, with its
//! tokenizer, ready for llama.cpp, Ollama and LM Studio (docs/gguf.md). A q8_0 or q4_k export quantizes while
//! loading, one tensor at a time, so it needs about the memory of the quantized file; f32/f16/bf16 exports (and
//! exports of a dolly checkpoint) load the model in f32 (4 bytes per parameter). The file appears only when
//! complete.

use anyhow::{bail, Context};
use clap::Args;
use neox::{GgufType, Model, QuantType};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct GgufArgs {
    /// Model directory (config.json + weights + tokenizer.json), a dolly checkpoint, or a hub model id.
    pub model: String,
    /// Weight type of the matrices: f32, f16, bf16, q8_0 or q4_k (ggml's 4-bit k-quant, bit-identical to
    /// llama-quantize's reference; the embedding, the head and rows that are not a multiple of 256 values in
    /// q8_0) (LayerNorm weights and biases stay f32, as llama.cpp writes them). `dolly quantize` takes q8_0 or
    /// q4_k.
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_type)]
    pub kind: GgufType,
    /// The GGUF file to write (written as a temporary file and renamed when complete).
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// tokenizer.json to embed [default: the model directory's].
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Replace an existing --output file. `--force` = true.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = crate::flags::parse_bool)]
    pub force: bool,
}

fn parse_type(s: &str) -> Result<GgufType, String> {
    GgufType::parse(s).ok_or_else(|| format!("unknown GGUF type `{s}` (supported: f32, f16, bf16, q8_0, q4_k)"))
}

/// `dolly quantize`: the same as export-gguf, for quantized types only.
pub fn run_quantize(a: GgufArgs) -> anyhow::Result<()> {
    if !matches!(a.kind, GgufType::Q8_0 | GgufType::Q4K) {
        bail!(
            "dolly quantize writes quantized types (q8_0, q4_k); use dolly export-gguf --type {:?} for float files",
            a.kind
        );
    }
    run_export(a)
}

pub fn run_export(a: GgufArgs) -> anyhow::Result<()> {
    if a.output.extension().and_then(|e| e.to_str()) != Some("gguf") {
        bail!("--output {}: give a file name ending in .gguf", a.output.display());
    }
    if a.output.exists() && !a.force {
        bail!("--output {} exists: pass --force to replace it", a.output.display());
    }
    let dir = crate::model_arg::resolve(&a.model)?;
    let tok_path = a.tokenizer.clone().unwrap_or_else(|| dir.join("tokenizer.json"));
    let tok = std::fs::read_to_string(&tok_path)
        .with_context(|| format!("reading {} (give --tokenizer FILE)", tok_path.display()))?;
    let t0 = Instant::now();
    let checkpoint = dir.join(train::checkpoint_shards::SHARDS_FILE).is_file();
    let model = match a.kind {
        GgufType::Q8_0 if !checkpoint => Model::load_quantized(&dir, QuantType::Q8_0)
            .with_context(|| format!("loading model {} as q8_0", dir.display()))?,
        GgufType::Q4K if !checkpoint => Model::load_quantized(&dir, QuantType::Q4K)
            .with_context(|| format!("loading model {} as q4_k", dir.display()))?,
        _ => crate::model_arg::load(&dir)?,
    };
    eprintln!("loaded {} in {:.1} s; writing {}", dir.display(), t0.elapsed().as_secs_f64(), a.output.display());
    let name = crate::adapter_arg::name_of(&dir);
    model.save_gguf(&a.output, a.kind, &name, &tok).with_context(|| format!("writing {}", a.output.display()))?;
    if a.kind == GgufType::Q4K {
        // say which matrices q4_K kept in q8_0
        let g = neox::gguf::Gguf::open(&a.output).with_context(|| format!("reading back {}", a.output.display()))?;
        let mats = g.tensors().iter().filter(|t| t.dims.len() == 2);
        let q4 = mats.clone().filter(|t| t.kind == neox::gguf::GgmlType::Q4_K).count();
        let q8 = mats.count() - q4;
        eprintln!(
            "{q4} matrices in q4_K, {q8} in q8_0 (the embedding, the head, and any whose rows are not a multiple \
             of 256 values)"
        );
    }
    let bytes = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({:.1} MiB) in {:.1} s",
        a.output.display(),
        bytes as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
