//! Request parsing and validation of the HTTP server's generation endpoints: the JSON body, the sampling
//! fields (model id, max_tokens, temperature, top_p, top_k, n, seed, stream), the prompt of `/v1/completions` and
//! the messages of `/v1/chat/completions`, the prompt length against the context window. Each refusal is an
//! OpenAI-style error naming the offending field (`messages[2].content`, `max_tokens`, ...) in `param` and in the
//! message.

use crate::decoding::SeqParams;
use crate::sampling::SamplingParams;
use crate::server::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use common::Rng;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) kind: &'static str,
    pub(crate) param: Option<String>,
    pub(crate) code: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }
    pub(crate) fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub(crate) fn status(mut self, s: StatusCode) -> Self {
        self.status = s;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

/// The parsed, validated common part of both endpoints.
pub(crate) struct Gen {
    pub prompt: Vec<u32>,
    pub params: SeqParams,
    pub stream: bool,
    /// Strip Dolly's response template from the text (off for raw prompts).
    pub strip: bool,
}

type Body = Map<String, Value>;

pub(crate) fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Body, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body is larger than the server's limit".to_string()
        } else {
            format!("cannot read request body: {e}")
        };
        ApiError::invalid(None, msg).status(status)
    })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::invalid(None, "request body must be a JSON object")),
        Err(e) => Err(ApiError::invalid(None, format!("request body is not valid JSON: {e}"))),
    }
}

fn num(m: &Body, key: &str) -> Result<Option<f64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(ApiError::invalid(Some(key), format!("`{key}` must be a number"))),
    }
}

fn int(m: &Body, key: &str) -> Result<Option<i64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_i64().map(Some).ok_or_else(|| ApiError::invalid(Some(key), format!("`{key}` must be an integer")))
        }
        Some(_) => Err(ApiError::invalid(Some(key), format!("`{key}` must be an integer"))),
    }
}

/// Validate everything but the prompt; tokenize `prompt_text`; check the context window. `prompt_param` names the
/// field the prompt came from (`prompt` or `messages`).
fn common_params(
    s: &AppState,
    m: &Body,
    prompt_text: &str,
    prompt_param: &str,
    max_tokens_keys: &[&str],
) -> Result<Gen, ApiError> {
    match m.get("model") {
        None | Some(Value::Null) => {}
        Some(Value::String(id)) if *id == s.model_id => {}
        Some(Value::String(id)) => {
            return Err(ApiError::invalid(Some("model"), format!("The model `{id}` does not exist"))
                .status(StatusCode::NOT_FOUND)
                .code("model_not_found"))
        }
        Some(_) => return Err(ApiError::invalid(Some("model"), "`model` must be a string")),
    }
    for key in ["stop", "logprobs", "echo", "suffix", "tools", "functions", "best_of"] {
        match m.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(_) => return Err(ApiError::invalid(Some(key), format!("`{key}` is not supported by this server"))),
        }
    }
    if let Some(n) = int(m, "n")? {
        if n != 1 {
            return Err(ApiError::invalid(Some("n"), format!("`n`: only n = 1 is supported, got {n}")));
        }
    }
    let mut max_tokens = None;
    for &k in max_tokens_keys {
        if let Some(v) = int(m, k)? {
            if v < 1 || v as u64 > s.max_context as u64 {
                return Err(ApiError::invalid(
                    Some(k),
                    format!("`{k}` must be between 1 and {} (the context window), got {v}", s.max_context),
                ));
            }
            max_tokens = Some(v as usize);
        }
    }
    let max_tokens = max_tokens.unwrap_or(s.default_max_tokens);
    let temperature = num(m, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("`temperature` must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = num(m, "top_p")?.unwrap_or(0.92);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(Some("top_p"), format!("`top_p` must be in (0, 1], got {top_p}")));
    }
    let top_k = int(m, "top_k")?.unwrap_or(0);
    if top_k < 0 {
        return Err(ApiError::invalid(Some("top_k"), format!("`top_k` must be >= 0, got {top_k}")));
    }
    let stream = match m.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid(Some("stream"), "`stream` must be a boolean")),
    };
    let seed = match m.get("seed") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(
            n.as_i64()
                .map(|x| x as u64)
                .or_else(|| n.as_u64())
                .ok_or_else(|| ApiError::invalid(Some("seed"), "`seed` must be an integer"))?,
        ),
        Some(_) => return Err(ApiError::invalid(Some("seed"), "`seed` must be an integer")),
    };
    let seed = seed.unwrap_or_else(|| {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        t ^ s.counter.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    });
    let prompt = s
        .tokenizer
        .encode(prompt_text)
        .map_err(|e| ApiError::invalid(Some(prompt_param), format!("cannot tokenize `{prompt_param}`: {e}")))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some(prompt_param), format!("`{prompt_param}` gives an empty prompt")));
    }
    if prompt.len() + max_tokens > s.max_context {
        return Err(ApiError::invalid(
            Some(prompt_param),
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the \
                 prompt, {max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                s.max_context,
                prompt.len() + max_tokens,
                prompt.len()
            ),
        )
        .code("context_length_exceeded"));
    }
    let sampling = SamplingParams {
        do_sample: temperature > 0.0,
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k: top_k as usize,
    };
    Ok(Gen {
        prompt,
        params: SeqParams { sampling, max_new_tokens: max_tokens, rng: Rng::new(seed) },
        stream,
        strip: true,
    })
}

/// The text of a message's `content` (a string, or text content parts); `field` is `messages[i].content`.
fn text_of(v: Option<&Value>, field: &str) -> Result<String, ApiError> {
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        // content parts: [{"type": "text", "text": "..."}]
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            Some(field),
                            format!("`{field}[{j}]`: only text content parts ({{\"type\": \"text\", \"text\": ...}}) are supported"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        None => Err(ApiError::invalid(Some(field), format!("`{field}` is required"))),
        Some(Value::Null) => Err(ApiError::invalid(Some(field), format!("`{field}` must be a string, got null"))),
        Some(_) => Err(ApiError::invalid(Some(field), format!("`{field}` must be a string or an array of text parts"))),
    }
}

/// `/v1/completions`: the body, validated, as a generation job.
pub(crate) fn completion(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Gen, ApiError> {
    let m = parse_body(body)?;
    let prompt = match m.get("prompt") {
        Some(Value::String(p)) => p.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "`prompt`: only a single prompt string is supported (no batches, no ids)",
            ))
        }
        None | Some(Value::Null) => return Err(ApiError::invalid(Some("prompt"), "`prompt` is required")),
        Some(_) => return Err(ApiError::invalid(Some("prompt"), "`prompt` must be a string")),
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "`prompt` is empty"));
    }
    let raw = match m.get("raw_prompt") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid(Some("raw_prompt"), "`raw_prompt` must be a boolean")),
    };
    let text = if raw { prompt } else { data::generation_prompt(&prompt, None) };
    let mut gen = common_params(s, &m, &text, "prompt", &["max_tokens"])?;
    gen.strip = !raw;
    Ok(gen)
}

/// Dolly has one instruction and an optional context: the last user message is the instruction; system messages
/// and earlier turns (as `User: ...` / `Assistant: ...`) become the context.
pub fn chat_to_instruction(messages: &[(String, String)]) -> Result<(String, Option<String>), String> {
    let Some((role, last)) = messages.last() else { return Err("`messages` must not be empty".into()) };
    if role != "user" {
        let i = messages.len() - 1;
        return Err(format!("`messages[{i}].role`: the last message must have role `user`, got `{role}`"));
    }
    let mut ctx = Vec::new();
    for (i, (role, content)) in messages[..messages.len() - 1].iter().enumerate() {
        match role.as_str() {
            "system" | "developer" => ctx.push(content.clone()),
            "user" => ctx.push(format!("User: {content}")),
            "assistant" => ctx.push(format!("Assistant: {content}")),
            other => return Err(format!("`messages[{i}].role`: unsupported message role `{other}`")),
        }
    }
    let ctx = ctx.join("\n\n");
    Ok((last.clone(), if ctx.is_empty() { None } else { Some(ctx) }))
}

/// `/v1/chat/completions`: the body, validated, as a generation job.
pub(crate) fn chat(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Gen, ApiError> {
    let m = parse_body(body)?;
    let msgs = match m.get("messages") {
        Some(Value::Array(a)) => a,
        None | Some(Value::Null) => return Err(ApiError::invalid(Some("messages"), "`messages` is required")),
        Some(_) => return Err(ApiError::invalid(Some("messages"), "`messages` must be an array")),
    };
    let mut turns = Vec::with_capacity(msgs.len());
    for (i, msg) in msgs.iter().enumerate() {
        if !msg.is_object() {
            let f = format!("messages[{i}]");
            return Err(ApiError::invalid(Some(&f), format!("`{f}` must be an object with `role` and `content`")));
        }
        let role = msg.get("role").and_then(Value::as_str).ok_or_else(|| {
            let f = format!("messages[{i}].role");
            ApiError::invalid(Some(&f), format!("`{f}` must be a string"))
        })?;
        let content = text_of(msg.get("content"), &format!("messages[{i}].content"))?;
        turns.push((role.to_string(), content));
    }
    let (instruction, context) = chat_to_instruction(&turns).map_err(|e| ApiError::invalid(Some("messages"), e))?;
    if instruction.is_empty() {
        let f = format!("messages[{}].content", turns.len() - 1);
        return Err(ApiError::invalid(Some(&f), format!("`{f}`: the last user message is empty")));
    }
    let text = data::generation_prompt(&instruction, context.as_deref());
    common_params(s, &m, &text, "messages", &["max_tokens", "max_completion_tokens"])
}
