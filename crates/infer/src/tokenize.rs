//! `POST /tokenize` and `POST /detokenize`, in both shapes clients send: llama-server's (`content` -> `tokens`,
//! `tokens` -> `content`, `with_pieces`) and vLLM's (`prompt` -> `tokens`, `count`, `max_model_len`; `tokens` ->
//! `prompt`). Text is tokenized raw, as a raw completion prompt is (no template; Dolly's special tokens are
//! matched); GPT-NeoX's tokenizer adds no BOS/EOS, so `add_special`/`add_special_tokens` change nothing. Decoding
//! is Hugging Face's (`decode`: special tokens kept, clean-up applied). Unknown fields and out-of-vocabulary ids
//! are refused with a 400 naming the field.

use crate::request::ApiError;
use crate::server::AppState;
use serde_json::{json, Map, Value};

const TOKENIZE_FIELDS: [&str; 6] = ["content", "prompt", "add_special", "add_special_tokens", "with_pieces", "model"];
const DETOKENIZE_FIELDS: [&str; 2] = ["tokens", "model"];

fn check_fields(m: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::invalid(Some(k), format!("unknown field `{k}` (accepted: {})", allowed.join(", ")))),
        None => Ok(()),
    }
}

fn flag(m: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(Some(key), format!("`{key}` must be a boolean"))),
    }
}

/// `/tokenize`: the ids of `content` (or `prompt`).
pub(crate) fn tokenize(s: &AppState, m: &Map<String, Value>) -> Result<Value, ApiError> {
    check_fields(m, &TOKENIZE_FIELDS)?;
    for k in ["add_special", "add_special_tokens"] {
        flag(m, k)?;
    }
    let pieces = flag(m, "with_pieces")?;
    let (key, text) = match (m.get("content"), m.get("prompt")) {
        (Some(_), Some(_)) => return Err(ApiError::invalid(Some("prompt"), "give `content` or `prompt`, not both")),
        (Some(v), None) => ("content", v),
        (None, Some(v)) => ("prompt", v),
        (None, None) => return Err(ApiError::invalid(Some("content"), "`content` (or `prompt`) is required")),
    };
    let text = text.as_str().ok_or_else(|| ApiError::invalid(Some(key), format!("`{key}` must be a string")))?;
    let ids = s.tokenizer.encode(text).map_err(|e| ApiError::invalid(Some(key), e.to_string()))?;
    let tokens: Vec<Value> = if pieces {
        let piece = |id: u32| s.tokenizer.decode_raw(&[id], false).unwrap_or_default();
        ids.iter().map(|&id| json!({"id": id, "piece": piece(id)})).collect()
    } else {
        ids.iter().map(|&id| json!(id)).collect()
    };
    Ok(json!({"tokens": tokens, "count": ids.len(), "max_model_len": s.max_context}))
}

/// `/detokenize`: the text of `tokens`.
pub(crate) fn detokenize(s: &AppState, m: &Map<String, Value>) -> Result<Value, ApiError> {
    check_fields(m, &DETOKENIZE_FIELDS)?;
    let bad = || ApiError::invalid(Some("tokens"), "`tokens` must be an array of token ids");
    let list = m.get("tokens").ok_or_else(|| ApiError::invalid(Some("tokens"), "`tokens` is required"))?;
    let vocab = s.tokenizer.vocab_size();
    let mut ids = Vec::new();
    for v in list.as_array().ok_or_else(bad)? {
        let id = v.as_u64().ok_or_else(bad)?;
        if id >= vocab as u64 {
            return Err(ApiError::invalid(
                Some("tokens"),
                format!("token id {id} is outside the vocabulary ({vocab} ids)"),
            ));
        }
        ids.push(id as u32);
    }
    let text = s.tokenizer.decode(&ids).map_err(|e| ApiError::invalid(Some("tokens"), e.to_string()))?;
    Ok(json!({"content": text, "prompt": text}))
}
