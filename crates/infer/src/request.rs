//! Request parsing and validation of the HTTP server's generation endpoints: the JSON body, the sampling and
//! stopping fields (model id, max_tokens, temperature, top_p, top_k, n, seed, stream and stream_options, stop,
//! logprobs, echo, penalties, logit_bias, min_tokens, response_format), the prompts of `/v1/completions` (text or
//! token ids, one or several) and the messages of `/v1/chat/completions`, each prompt's length against the context
//! window. Unknown fields and known but unsupported ones (tools, suffix, JSON mode, best_of > n) are refused. Each refusal is an
//! OpenAI-style error naming the offending field (`messages[2].content`, `max_tokens`, ...) in `param` and in the
//! message.

use crate::decoding::SeqParams;
use crate::logprobs::MAX_TOP;
use crate::penalties::LogitRules;
use crate::sampling::SamplingParams;
use crate::scheduler::Group;
use crate::server::AppState;
use crate::stop::MAX_STOPS;
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

type Body = Map<String, Value>;

/// Most choices (prompts x n) one request may ask for.
pub(crate) const MAX_CHOICES: usize = 256;
/// Most `logit_bias` entries (OpenAI's limit).
const MAX_BIAS: usize = 300;

/// Fields accepted by both endpoints; anything else is refused by name rather than ignored.
const COMMON_FIELDS: &[&str] = &[
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

fn boolean(m: &Body, key: &str) -> Result<Option<bool>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid(Some(key), format!("`{key}` must be a boolean"))),
    }
}

/// A number field in `lo..=hi` (default `dflt`).
fn ranged(m: &Body, key: &str, lo: f64, hi: f64, dflt: f64) -> Result<f64, ApiError> {
    let v = num(m, key)?.unwrap_or(dflt);
    if !(lo..=hi).contains(&v) {
        return Err(ApiError::invalid(Some(key), format!("`{key}` must be in [{lo}, {hi}], got {v}")));
    }
    Ok(v)
}

fn check_fields(m: &Body, own: &[&str]) -> Result<(), ApiError> {
    match m.keys().find(|k| !COMMON_FIELDS.contains(&k.as_str()) && !own.contains(&k.as_str())) {
        Some(k) => Err(ApiError::invalid(Some(k), format!("unknown field `{k}`: this server does not support it"))),
        None => Ok(()),
    }
}

/// `stop`: a string or up to four strings.
fn stops(m: &Body) -> Result<Vec<String>, ApiError> {
    let bad =
        || ApiError::invalid(Some("stop"), format!("`stop` must be a string or an array of up to {MAX_STOPS} strings"));
    let list: Vec<String> = match m.get("stop") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= MAX_STOPS => {
            a.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(bad)).collect::<Result<_, _>>()?
        }
        Some(_) => return Err(bad()),
    };
    if list.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid(Some("stop"), "`stop` strings must not be empty"));
    }
    Ok(list)
}

/// `logit_bias`: {"token id": bias in -100..=100}.
fn logit_bias(m: &Body, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let p = Some("logit_bias");
    let obj = match m.get("logit_bias") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(ApiError::invalid(p, "`logit_bias` must be an object of token id -> bias")),
    };
    if obj.len() > MAX_BIAS {
        return Err(ApiError::invalid(p, format!("`logit_bias` has {} entries; at most {MAX_BIAS}", obj.len())));
    }
    let mut out = Vec::with_capacity(obj.len());
    for (k, v) in obj {
        let id =
            k.trim().parse::<u32>().ok().filter(|&id| (id as usize) < vocab).ok_or_else(|| {
                ApiError::invalid(p, format!("`logit_bias`: key `{k}` is not a token id below {vocab}"))
            })?;
        let b = v.as_f64().filter(|b| (-100.0..=100.0).contains(b)).ok_or_else(|| {
            ApiError::invalid(p, format!("`logit_bias[{k}]` must be a number in [-100, 100], got {v}"))
        })?;
        out.push((id, b as f32));
    }
    Ok(out)
}

/// The sampling and stopping fields of both endpoints, validated.
struct Fields {
    seq: SeqParams,
    seed: u64,
    n: usize,
    stream: bool,
    include_usage: bool,
    stops: Vec<String>,
    min_tokens: usize,
    /// None: not given (the server's default applies).
    max_tokens: Option<usize>,
}

fn fields(s: &AppState, m: &Body, max_tokens_keys: &[&str], echo: bool) -> Result<Fields, ApiError> {
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
    for key in ["suffix", "functions"] {
        if !matches!(m.get(key), None | Some(Value::Null)) {
            return Err(ApiError::invalid(Some(key), format!("`{key}` is not supported by this server")));
        }
    }
    match m.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => return Err(ApiError::invalid(Some("tools"), "`tools`: this model does not call tools")),
    }
    match m.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(Value::String(c)) if c == "none" || c == "auto" => {}
        Some(_) => return Err(ApiError::invalid(Some("tool_choice"), "`tool_choice`: this model does not call tools")),
    }
    match m.get("response_format") {
        None | Some(Value::Null) => {}
        Some(f) if f.get("type").and_then(Value::as_str) == Some("text") => {}
        Some(_) => {
            return Err(ApiError::invalid(
                Some("response_format"),
                "`response_format`: only {\"type\": \"text\"} is supported (no JSON mode or schemas)",
            ))
        }
    }
    let n = int(m, "n")?.unwrap_or(1);
    let max_n = s.max_batch.min(MAX_CHOICES) as i64;
    if !(1..=max_n).contains(&n) {
        return Err(ApiError::invalid(
            Some("n"),
            format!(
                "`n` must be between 1 and {max_n} (the server's --max-batch: n sequences decode together), got {n}"
            ),
        ));
    }
    if let Some(b) = int(m, "best_of")? {
        if b != n {
            return Err(ApiError::invalid(
                Some("best_of"),
                format!("`best_of` is not supported (only best_of = n), got {b}"),
            ));
        }
    }
    let mut max_tokens = None;
    for &k in max_tokens_keys {
        if let Some(v) = int(m, k)? {
            let lo = if echo { 0 } else { 1 };
            if v < lo || v as u64 > s.max_context as u64 {
                let why = if v == 0 { " (0 only with `echo`)" } else { "" };
                return Err(ApiError::invalid(
                    Some(k),
                    format!("`{k}` must be between {lo} and {} (the context window), got {v}{why}", s.max_context),
                ));
            }
            max_tokens = Some(v as usize);
        }
    }
    let temperature = ranged(m, "temperature", 0.0, 2.0, 1.0)?;
    let top_p = num(m, "top_p")?.unwrap_or(0.92);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(Some("top_p"), format!("`top_p` must be in (0, 1], got {top_p}")));
    }
    let top_k = int(m, "top_k")?.unwrap_or(0);
    if top_k < 0 {
        return Err(ApiError::invalid(Some("top_k"), format!("`top_k` must be >= 0, got {top_k}")));
    }
    let stream = boolean(m, "stream")?.unwrap_or(false);
    let include_usage = match m.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(_) if !stream => {
            return Err(ApiError::invalid(
                Some("stream_options"),
                "`stream_options` is only allowed with `stream: true`",
            ))
        }
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| *k != "include_usage") {
                return Err(ApiError::invalid(
                    Some("stream_options"),
                    format!("`stream_options.{k}` is not supported"),
                ));
            }
            match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::invalid(
                        Some("stream_options"),
                        "`stream_options.include_usage` must be a boolean",
                    ))
                }
            }
        }
        Some(_) => return Err(ApiError::invalid(Some("stream_options"), "`stream_options` must be an object")),
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
    let repetition = num(m, "repetition_penalty")?.unwrap_or(1.0);
    if !(repetition > 0.0 && repetition <= 10.0) {
        return Err(ApiError::invalid(
            Some("repetition_penalty"),
            format!("`repetition_penalty` must be in (0, 10], got {repetition}"),
        ));
    }
    let min_tokens = int(m, "min_tokens")?.unwrap_or(0);
    let max_for_min = max_tokens.unwrap_or(s.default_max_tokens) as i64;
    if !(0..=max_for_min).contains(&min_tokens) {
        return Err(ApiError::invalid(
            Some("min_tokens"),
            format!("`min_tokens` must be between 0 and max_tokens ({max_for_min}), got {min_tokens}"),
        ));
    }
    let rules = LogitRules {
        presence_penalty: ranged(m, "presence_penalty", -2.0, 2.0, 0.0)? as f32,
        frequency_penalty: ranged(m, "frequency_penalty", -2.0, 2.0, 0.0)? as f32,
        repetition_penalty: repetition as f32,
        logit_bias: logit_bias(m, s.tokenizer.vocab_size())?,
        min_tokens: min_tokens as usize,
    };
    let sampling = SamplingParams {
        do_sample: temperature > 0.0,
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k: top_k as usize,
    };
    let mut seq = SeqParams::new(sampling, 1, Rng::new(seed));
    seq.rules = rules;
    Ok(Fields {
        seq,
        seed,
        n: n as usize,
        stream,
        include_usage,
        stops: stops(m)?,
        min_tokens: min_tokens as usize,
        max_tokens,
    })
}

/// The generation job of validated fields and tokenized prompts (`prompt_param` names the prompts' field in
/// errors): n sequences per prompt, sequence j of prompt i drawing from RNG stream i * n + j of the seed (as
/// `dolly generate --seed S --num-return-sequences n` does).
fn build(
    s: &AppState,
    f: Fields,
    prompts: Vec<(Vec<u32>, String)>,
    prompt_param: &str,
    logprobs: Option<usize>,
    echo: bool,
    strip: bool,
) -> Result<Gen, ApiError> {
    if prompts.len() * f.n > MAX_CHOICES {
        return Err(ApiError::invalid(
            Some(prompt_param),
            format!(
                "{} prompts x n = {} choices; at most {MAX_CHOICES} per request",
                prompts.len(),
                prompts.len() * f.n
            ),
        ));
    }
    let echo_only = echo && f.max_tokens == Some(0);
    let max_tokens = f.max_tokens.unwrap_or(s.default_max_tokens);
    let mut groups = Vec::with_capacity(prompts.len());
    let mut texts = Vec::with_capacity(prompts.len());
    for (i, (prompt, text)) in prompts.into_iter().enumerate() {
        let at = if i == 0 { prompt_param.to_string() } else { format!("{prompt_param}[{i}]") };
        if prompt.is_empty() {
            return Err(ApiError::invalid(Some(&at), format!("`{at}` gives an empty prompt")));
        }
        if prompt.len() + max_tokens > s.max_context {
            return Err(ApiError::invalid(
                Some(&at),
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
        let seqs = (0..f.n)
            .map(|j| {
                let mut p = f.seq.clone();
                // one token is decoded even for `max_tokens: 0` (the prompt's scores come with the prefill)
                p.max_new_tokens = max_tokens.max(1);
                p.rng = Rng::derive(f.seed, (i * f.n + j) as u64);
                p.logprobs = if echo_only { None } else { logprobs };
                p
            })
            .collect();
        let prompt_logprobs = if echo { logprobs } else { None };
        groups.push(Group { prompt, seqs, prompt_logprobs });
        texts.push(text);
    }
    Ok(Gen {
        groups,
        prompt_texts: texts,
        n: f.n,
        stream: f.stream,
        strip,
        stops: f.stops,
        logprobs,
        echo,
        echo_only,
        include_usage: f.include_usage,
        min_tokens: f.min_tokens,
    })
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
                let text = s.tokenizer.decode(&ids).map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?;
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
