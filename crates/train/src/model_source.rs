//! Where a model comes from: a local Hugging Face model directory, or a hub model id fetched into the hub cache
//! (offline reuse through `HF_HUB_OFFLINE`). Shared by `dolly train`, `generate` and `serve`.

use crate::bail;
use crate::error::Result;
use data::HubOptions;
use std::path::{Path, PathBuf};

fn is_safetensors_weights(f: &str) -> bool {
    f == "model.safetensors"
        || f == "model.safetensors.index.json"
        || (f.starts_with("model-") && f.ends_with(".safetensors") && !f.contains('/'))
}

fn is_torch_weights(f: &str) -> bool {
    f == "pytorch_model.bin"
        || f == "pytorch_model.bin.index.json"
        || (f.starts_with("pytorch_model-") && f.ends_with(".bin") && !f.contains('/'))
}

/// Of a hub model repository's files, those a model directory needs: `config.json`, `tokenizer.json` and the
/// weights, as safetensors when the repository has them (what `neox::Model::load` prefers), else
/// `pytorch_model*.bin` with its index.
pub fn wanted_model_files(names: &[String]) -> Vec<String> {
    let has_safetensors = names.iter().any(|f| is_safetensors_weights(f));
    names
        .iter()
        .filter(|f| {
            let f = f.as_str();
            f == "config.json"
                || f == "tokenizer.json"
                || if has_safetensors { is_safetensors_weights(f) } else { is_torch_weights(f) }
        })
        .cloned()
        .collect()
}

/// A local model directory, or a hub model id fetched into the hub cache.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if data::hub::looks_like_repo_id(spec) {
        let hub = data::Hub::new(HubOptions::from_env());
        let repo = data::Repo::model(spec, "main");
        let snap = hub.snapshot_of(&repo, &wanted_model_files)?;
        return Ok(snap.dir);
    }
    bail!("--input-model {spec}: not a directory, and not a hub model id like EleutherAI/pythia-70m")
}

#[cfg(test)]
mod tests {
    use super::wanted_model_files;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn safetensors_when_present_else_pytorch_model_bin() {
        // EleutherAI/pythia-70m at main carries both formats: only safetensors is fetched.
        let both = names(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "model.safetensors",
            "pytorch_model.bin",
            "tokenizer.json",
            "special_tokens_map.json",
        ]);
        assert_eq!(wanted_model_files(&both), names(&["config.json", "model.safetensors", "tokenizer.json"]));
        let sharded_bin = names(&[
            "config.json",
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json",
            "tokenizer.json",
            "training_args.bin",
            "onnx/pytorch_model-1.bin",
        ]);
        assert_eq!(
            wanted_model_files(&sharded_bin),
            names(&[
                "config.json",
                "pytorch_model-00001-of-00002.bin",
                "pytorch_model-00002-of-00002.bin",
                "pytorch_model.bin.index.json",
                "tokenizer.json",
            ])
        );
        let sharded_st =
            names(&["model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]);
        assert_eq!(
            wanted_model_files(&sharded_st),
            names(&["model-00001-of-00002.safetensors", "model.safetensors.index.json"])
        );
    }
}
