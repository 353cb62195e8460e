//! GPT-NeoX `config.json`: typed view of the fields the model needs, read from both the 2023 Pythia form
//! (`rotary_pct`, `rotary_emb_base`) and the transformers-5 form (`rope_parameters.partial_rotary_factor`,
//! `rope_theta`). The original JSON object is kept so that saving preserves every other key (HF configs carry
//! many keys we do not use; those are not errors). Follows HF `GPTNeoXConfig` defaults where a key is optional.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct NeoxConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub rotary_pct: f64,
    pub rotary_emb_base: f64,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub use_parallel_residual: bool,
    /// The JSON object this config was read from (or built as); `to_json` updates the typed keys in it.
    pub raw: Map<String, Value>,
}

fn get_usize(m: &Map<String, Value>, key: &str, path: &Path, default: Option<usize>) -> Result<usize> {
    match m.get(key) {
        None | Some(Value::Null) => default.ok_or_else(|| Error::file(path, format!("missing required key `{key}`"))),
        Some(v) => v
            .as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| Error::file(path, format!("key `{key}` must be a non-negative integer, got {v}"))),
    }
}

fn get_f64(m: &Map<String, Value>, key: &str, path: &Path) -> Result<Option<f64>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            v.as_f64().map(Some).ok_or_else(|| Error::file(path, format!("key `{key}` must be a number, got {v}")))
        }
    }
}

impl NeoxConfig {
    /// Read and validate `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("invalid JSON at line {} column {}: {e}", e.line(), e.column())))?;
        Self::from_json(v, path)
    }

    /// Validate a parsed config; `path` is only used in error messages.
    pub fn from_json(v: Value, path: &Path) -> Result<Self> {
        let Value::Object(m) = v else { return Err(Error::file(path, "config must be a JSON object")) };
        if let Some(mt) = m.get("model_type").and_then(|x| x.as_str()) {
            if mt != "gpt_neox" {
                return Err(Error::file(path, format!("model_type is `{mt}`; only `gpt_neox` (Pythia) is supported")));
            }
        }
        let rope = m.get("rope_parameters").and_then(|x| x.as_object());
        let rotary_pct = match get_f64(&m, "rotary_pct", path)? {
            Some(x) => x,
            None => match rope.and_then(|r| r.get("partial_rotary_factor")).and_then(|x| x.as_f64()) {
                Some(x) => x,
                None => get_f64(&m, "partial_rotary_factor", path)?.unwrap_or(0.25),
            },
        };
        let rotary_emb_base = match get_f64(&m, "rotary_emb_base", path)? {
            Some(x) => x,
            None => match rope.and_then(|r| r.get("rope_theta")).and_then(|x| x.as_f64()) {
                Some(x) => x,
                None => get_f64(&m, "rope_theta", path)?.unwrap_or(10000.0),
            },
        };
        if let Some(r) = rope {
            if let Some(t) = r.get("rope_type").and_then(|x| x.as_str()) {
                if t != "default" {
                    return Err(Error::file(path, format!("rope_parameters.rope_type `{t}` is not supported")));
                }
            }
        }
        if m.get("rope_scaling").is_some_and(|x| !x.is_null()) {
            return Err(Error::file(path, "rope_scaling is not supported"));
        }
        let act = m.get("hidden_act").and_then(|x| x.as_str()).unwrap_or("gelu");
        if act != "gelu" {
            return Err(Error::file(path, format!("hidden_act `{act}` is not supported (GPT-NeoX uses exact `gelu`)")));
        }
        if m.get("attention_bias").and_then(|x| x.as_bool()) == Some(false) {
            return Err(Error::file(path, "attention_bias=false is not supported (GPT-NeoX has qkv/dense biases)"));
        }
        if m.get("tie_word_embeddings").and_then(|x| x.as_bool()) == Some(true) {
            return Err(Error::file(path, "tie_word_embeddings=true is not supported (Pythia's embed_out is untied)"));
        }
        let c = NeoxConfig {
            vocab_size: get_usize(&m, "vocab_size", path, None)?,
            hidden_size: get_usize(&m, "hidden_size", path, None)?,
            num_hidden_layers: get_usize(&m, "num_hidden_layers", path, None)?,
            num_attention_heads: get_usize(&m, "num_attention_heads", path, None)?,
            intermediate_size: get_usize(&m, "intermediate_size", path, None)?,
            rotary_pct,
            rotary_emb_base,
            max_position_embeddings: get_usize(&m, "max_position_embeddings", path, Some(2048))?,
            layer_norm_eps: get_f64(&m, "layer_norm_eps", path)?.unwrap_or(1e-5),
            use_parallel_residual: match m.get("use_parallel_residual") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(v) => return Err(Error::file(path, format!("use_parallel_residual must be a boolean, got {v}"))),
            },
            raw: m,
        };
        c.validate().map_err(|msg| Error::file(path, msg))?;
        Ok(c)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let nz = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (k, v) in nz {
            if v == 0 {
                return Err(format!("`{k}` must be > 0"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(0.0..=1.0).contains(&self.rotary_pct) {
            return Err(format!("rotary_pct must be in [0, 1], got {}", self.rotary_pct));
        }
        if !self.rotary_ndims().is_multiple_of(2) {
            return Err(format!("rotary dims int(head_dim * rotary_pct) = {} must be even", self.rotary_ndims()));
        }
        if self.rotary_emb_base.is_nan() || self.rotary_emb_base <= 0.0 {
            return Err(format!("rotary base must be > 0, got {}", self.rotary_emb_base));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(format!("layer_norm_eps must be > 0, got {}", self.layer_norm_eps));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Rotary dimensions per head, `int(D * rotary_pct)` as HF computes it.
    pub fn rotary_ndims(&self) -> usize {
        (self.head_dim() as f64 * self.rotary_pct) as usize
    }

    /// The config as JSON: the original object with the typed keys written back (vocab resize etc.).
    pub fn to_json(&self) -> Value {
        let mut m = self.raw.clone();
        m.insert("vocab_size".into(), self.vocab_size.into());
        m.insert("hidden_size".into(), self.hidden_size.into());
        m.insert("num_hidden_layers".into(), self.num_hidden_layers.into());
        m.insert("num_attention_heads".into(), self.num_attention_heads.into());
        m.insert("intermediate_size".into(), self.intermediate_size.into());
        m.insert("max_position_embeddings".into(), self.max_position_embeddings.into());
        m.insert("use_parallel_residual".into(), self.use_parallel_residual.into());
        m.insert("layer_norm_eps".into(), self.layer_norm_eps.into());
        Value::Object(m)
    }

    /// A fresh config in the 2023 Pythia form with the given shape.
    pub fn new_pythia(vocab_size: usize, hidden: usize, layers: usize, heads: usize, max_pos: usize) -> Self {
        let raw = serde_json::json!({
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "bos_token_id": 0,
            "eos_token_id": 0,
            "hidden_act": "gelu",
            "initializer_range": 0.02,
            "rotary_pct": 0.25,
            "rotary_emb_base": 10000,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "tie_word_embeddings": false,
            "torch_dtype": "float32",
            "use_cache": true,
        });
        let Value::Object(raw) = raw else { unreachable!("literal object") };
        let mut c = NeoxConfig {
            vocab_size,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: 4 * hidden,
            rotary_pct: 0.25,
            rotary_emb_base: 10000.0,
            max_position_embeddings: max_pos,
            layer_norm_eps: 1e-5,
            use_parallel_residual: true,
            raw,
        };
        if let Value::Object(m) = c.to_json() {
            c.raw = m;
        }
        c
    }

    /// Pythia presets by name (`pythia-14m` ... `pythia-12b`), padded vocabulary as released.
    pub fn preset(name: &str) -> Option<Self> {
        let (v, c, l, h) = match name {
            "pythia-14m" => (50304, 128, 6, 4),
            "pythia-70m" => (50304, 512, 6, 8),
            "pythia-160m" => (50304, 768, 12, 12),
            "pythia-410m" => (50304, 1024, 24, 16),
            "pythia-1b" => (50304, 2048, 16, 8),
            "pythia-1.4b" => (50304, 2048, 24, 16),
            "pythia-2.8b" => (50304, 2560, 32, 32),
            "pythia-6.9b" => (50432, 4096, 32, 32),
            "pythia-12b" => (50688, 5120, 36, 40),
            _ => return None,
        };
        Some(Self::new_pythia(v, c, l, h, 2048))
    }

    pub const PRESETS: &'static [&'static str] = &[
        "pythia-14m",
        "pythia-70m",
        "pythia-160m",
        "pythia-410m",
        "pythia-1b",
        "pythia-1.4b",
        "pythia-2.8b",
        "pythia-6.9b",
        "pythia-12b",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p() -> &'static Path {
        Path::new("config.json")
    }

    #[test]
    fn reads_both_rotary_forms() {
        let old = json!({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "rotary_pct": 0.5, "rotary_emb_base": 500});
        let new = json!({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5,
            "rope_theta": 500.0}});
        let a = NeoxConfig::from_json(old, p()).unwrap();
        let b = NeoxConfig::from_json(new, p()).unwrap();
        assert_eq!((a.rotary_pct, a.rotary_emb_base), (0.5, 500.0));
        assert_eq!((b.rotary_pct, b.rotary_emb_base), (0.5, 500.0));
        assert_eq!(a.rotary_ndims(), 2);
    }

    #[test]
    fn errors_name_the_key() {
        let e = NeoxConfig::from_json(json!({"vocab_size": 10}), p()).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let e = NeoxConfig::from_json(
            json!({"vocab_size": 10, "hidden_size": 9, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 32}),
            p(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not divisible"), "{e}");
        let e = NeoxConfig::from_json(json!({"vocab_size": "x"}), p()).unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");
        let e = NeoxConfig::from_json(json!([1]), p()).unwrap_err().to_string();
        assert!(e.contains("JSON object"), "{e}");
    }

    #[test]
    fn presets_are_valid() {
        for name in NeoxConfig::PRESETS {
            let c = NeoxConfig::preset(name).unwrap();
            let again = NeoxConfig::from_json(c.to_json(), p()).unwrap();
            assert_eq!(c, again, "{name}");
        }
    }
}
