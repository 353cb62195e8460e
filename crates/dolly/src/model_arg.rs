//! The MODEL positional of `dolly generate` and `dolly serve`: a local model directory, or a hub model id
//! (`EleutherAI/pythia-70m`) downloaded into the Hugging Face cache (reused offline with `HF_HUB_OFFLINE=1`), like
//! `dolly train --input-model`. Checked before anything else is loaded, so a wrong model is reported as such.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// The model directory `spec` names, with its `config.json` present.
pub fn resolve(spec: &str) -> anyhow::Result<PathBuf> {
    let p = Path::new(spec);
    let dir = if p.is_dir() {
        p.to_path_buf()
    } else if p.exists() {
        bail!(
            "model `{spec}`: not a directory (give the model directory, or a hub model id like EleutherAI/pythia-70m)"
        )
    } else if data::hub::looks_like_repo_id(spec) {
        train::resolve_model(spec)
            .with_context(|| format!("model `{spec}`: not a directory, and fetching hub model id `{spec}` failed"))?
    } else {
        bail!("model `{spec}`: not a directory and not a hub model id (like EleutherAI/pythia-70m)")
    };
    if !dir.join("config.json").is_file() {
        bail!("model `{spec}`: {} has no config.json (not a Hugging Face model directory)", dir.display());
    }
    Ok(dir)
}

/// Load the model in `dir`: a Hugging Face model directory, or a `dolly train` checkpoint (its shards).
pub fn load(dir: &Path) -> anyhow::Result<neox::Model> {
    let m = if dir.join(train::checkpoint_shards::SHARDS_FILE).is_file() {
        train::checkpoint_shards::load_model(dir).map_err(anyhow::Error::msg)
    } else {
        neox::Model::load(dir).map_err(anyhow::Error::from)
    };
    m.with_context(|| format!("loading model {}", dir.display()))
}

/// Whether MODEL names a GGUF file (a `.gguf` file that exists).
pub fn is_gguf(spec: &str) -> bool {
    let p = Path::new(spec);
    p.is_file() && p.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// A GGUF model file and its tokenizer: `--tokenizer FILE` when given, else the tokenizer.json the file embeds
/// (`dolly export-gguf` writes it; llama.cpp's converter does not, so its files need --tokenizer). q8_0 and q4_K
/// matrices load as they are; float files load in f32 and are quantized when `quant` is given.
pub fn load_gguf(
    spec: &str,
    tokenizer: Option<&Path>,
    quant: Option<neox::QuantType>,
) -> anyhow::Result<(neox::Model, data::DollyTokenizer)> {
    let path = Path::new(spec);
    let (mut model, embedded) =
        neox::Model::load_gguf(path).with_context(|| format!("loading model {}", path.display()))?;
    let tok = match (tokenizer, embedded) {
        (Some(f), _) => data::DollyTokenizer::from_file(f)?,
        (None, Some(json)) => data::DollyTokenizer::from_json(json.as_bytes(), path)?,
        (None, None) => bail!(
            "{} embeds no tokenizer.json (llama.cpp's converter does not write one): give --tokenizer FILE",
            path.display()
        ),
    };
    if let Some(q) = quant.filter(|_| model.quantized().is_none()) {
        model = model.into_quantized(q)?;
    }
    Ok((model, tok))
}
