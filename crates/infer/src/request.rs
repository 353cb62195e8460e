//! Request parsing and validation of the HTTP server's generation endpoints: the JSON body, the sampling and
//! stopping fields (model id, max_tokens, temperature, top_p, top_k, n, seed, stream and stream_options, stop,
//! logprobs, echo, penalties, logit_bias, min_tokens, response_format), the prompts of `/v1/completions` (text or
//! token ids, one or several) and the messages of `/v1/chat/completions`, each prompt's length against the context
//! window. Unknown fields and known but unsupported ones (tools, suffix, JSON mode, best_of > n) are refused. Each refusal is an
//! OpenAI-style error naming the offending field (`messages[2].content`, `max_tokens`, ...) in `param` and in the
//! message.

use crate::fields::{boolean, build, check_fields, fields, int};
use crate::logprobs::MAX_TOP;
use crate::scheduler::Group;
use crate::server::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

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

/// The parsed, validated request of either endpoint.
pub(crate) struct Gen {
    /// One group per prompt, each of `n` sequences.
    pub groups: Vec<Group>,
    /// Each prompt's text, for `echo`.
    pub prompt_texts: Vec<String>,
    pub n: usize,
    pub stream: bool,
    /// Strip Dolly's response template from the text (off for raw prompts).
    pub strip: bool,
    pub stops: Vec<String>,
    /// Some(k): log-probabilities with k alternatives per token.
    pub logprobs: Option<usize>,
    pub echo: bool,
    /// `max_tokens: 0` with `echo`: score the prompt, generate nothing.
    pub echo_only: bool,
    pub include_usage: bool,
    pub min_tokens: usize,
}

impl Gen {
    pub fn prompt_tokens(&self) -> usize {
        self.groups.iter().map(|g| g.prompt.len()).sum()
    }
}

pub(crate) type Body = Map<String, Value>;

/// Most choices (prompts x n) one request may ask for.
pub(crate) const MAX_CHOICES: usize = 256;
/// Fields accepted by both endpoints; anything else is refused by name rather than ignored.
pub(crate) const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "seed",
    "stream",
    "stream_options",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "min_tokens",
    "response_format",
    "user",
    "best_of",
    "logprobs",
];
const COMPLETION_FIELDS: &[&str] = &["prompt", "echo", "raw_prompt", "suffix"];
const CHAT_FIELDS: &[&str] =
    &["messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions", "parallel_tool_calls"];

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

fn tokenize(s: &AppState, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
    s.tokenizer.encode(text).map_err(|e| ApiError::invalid(Some(param), format!("cannot tokenize `{param}`: {e}")))
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

/// A `prompt` value: a string, an array of strings, an array of token ids, or an array of arrays of ids.
enum Prompts {
    Texts(Vec<String>),
    Ids(Vec<Vec<u32>>),
}

fn prompts(m: &Body, vocab: usize) -> Result<Prompts, ApiError> {
    let p = Some("prompt");
    let ids = |v: &Value, at: &str| -> Result<Vec<u32>, ApiError> {
        let a = v.as_array().ok_or_else(|| ApiError::invalid(p, format!("`{at}` must be an array of token ids")))?;
        a.iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&id| id < vocab as u64)
                    .map(|id| id as u32)
                    .ok_or_else(|| ApiError::invalid(p, format!("`{at}`: {x} is not a token id below {vocab}")))
            })
            .collect()
    };
    match m.get("prompt") {
        Some(Value::String(t)) => Ok(Prompts::Texts(vec![t.clone()])),
        Some(Value::Array(a)) if a.is_empty() => Err(ApiError::invalid(p, "`prompt` is an empty array")),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            Ok(Prompts::Texts(a.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect()))
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => Ok(Prompts::Ids(vec![ids(&m["prompt"], "prompt")?])),
        Some(Value::Array(a)) if a.iter().all(Value::is_array) => Ok(Prompts::Ids(
            a.iter().enumerate().map(|(i, v)| ids(v, &format!("prompt[{i}]"))).collect::<Result<_, _>>()?,
        )),
        Some(Value::Array(_)) => Err(ApiError::invalid(
            p,
            "`prompt` must be a string, an array of strings, an array of token ids or an array of arrays of ids",
        )),
        None | Some(Value::Null) => Err(ApiError::invalid(p, "`prompt` is required")),
        Some(_) => Err(ApiError::invalid(p, "`prompt` must be a string or an array")),
    }
}

/// `/v1/completions`: the body, validated, as a generation job. The prompt is raw text unless the server wraps
/// completions in Dolly's template (`--completions-template dolly`) or the request says `raw_prompt`.
pub(crate) fn completion(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Gen, ApiError> {
    let m = parse_body(body)?;
    check_fields(&m, COMPLETION_FIELDS)?;
    let echo = boolean(&m, "echo")?.unwrap_or(false);
    let logprobs = match m.get("logprobs") {
        None | Some(Value::Null) => None,
        Some(Value::Number(k)) => match k.as_u64() {
            Some(k) if k as usize <= MAX_TOP => Some(k as usize),
            _ => {
                return Err(ApiError::invalid(
                    Some("logprobs"),
                    format!("`logprobs` must be between 0 and {MAX_TOP}, got {k}"),
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::invalid(
                Some("logprobs"),
                format!("`logprobs` must be an integer between 0 and {MAX_TOP}"),
            ))
        }
    };
    let f = fields(s, &m, &["max_tokens"], echo)?;
    let raw = boolean(&m, "raw_prompt")?.unwrap_or(!s.completions_dolly);
    let ps = match prompts(&m, s.tokenizer.vocab_size())? {
        Prompts::Texts(texts) => {
            let mut out = Vec::with_capacity(texts.len());
            for (i, t) in texts.into_iter().enumerate() {
                let at = if i == 0 { "prompt".to_string() } else { format!("prompt[{i}]") };
                if t.is_empty() {
                    return Err(ApiError::invalid(Some("prompt"), format!("`{at}` is empty")));
                }
                let text = if raw { t } else { data::generation_prompt(&t, None) };
                out.push((tokenize(s, &text, "prompt")?, text));
            }
            out
        }
        Prompts::Ids(list) => {
            let mut out = Vec::with_capacity(list.len());
            for ids in list {
                // the text is only echoed or logged: a token-id generation request (lm-eval's generate_until) needs none
                let text = if echo || s.log.prompts {
                    s.tokenizer.decode(&ids).map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?
                } else {
                    String::new()
                };
                out.push((ids, text));
            }
            out
        }
    };
    build(s, f, ps, "prompt", logprobs, echo, !raw)
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
    check_fields(&m, CHAT_FIELDS)?;
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
    let logprobs = match (boolean(&m, "logprobs")?, int(&m, "top_logprobs")?) {
        (Some(true), k) => match k.unwrap_or(0) {
            k @ 0..=20 => Some(k as usize),
            k => {
                return Err(ApiError::invalid(
                    Some("top_logprobs"),
                    format!("`top_logprobs` must be between 0 and {MAX_TOP}, got {k}"),
                ))
            }
        },
        (_, Some(_)) => return Err(ApiError::invalid(Some("top_logprobs"), "`top_logprobs` needs `logprobs: true`")),
        _ => None,
    };
    let f = fields(s, &m, &["max_tokens", "max_completion_tokens"], false)?;
    let prompt = tokenize(s, &text, "messages")?;
    build(s, f, vec![(prompt, text)], "messages", logprobs, false, true)
}
