//! Where a model comes from: a local Hugging Face model directory, or a hub model id fetched into the hub cache
//! (offline reuse through `HF_HUB_OFFLINE`). Shared by `dolly train`, `generate` and `serve`.

use crate::bail;
use crate::error::Result;
use data::HubOptions;
use std::path::{Path, PathBuf};

/// A local model directory, or a hub model id fetched into the hub cache.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if data::hub::looks_like_repo_id(spec) {
        let hub = data::Hub::new(HubOptions::from_env());
        let repo = data::Repo::model(spec, "main");
        let keep = |f: &str| {
            f == "config.json"
                || f == "tokenizer.json"
                || f == "model.safetensors"
                || f == "model.safetensors.index.json"
                || (f.starts_with("model-") && f.ends_with(".safetensors"))
        };
        let snap = hub.snapshot(&repo, &keep)?;
        return Ok(snap.dir);
    }
    bail!("--input-model {spec}: not a directory, and not a hub model id like EleutherAI/pythia-70m")
}
