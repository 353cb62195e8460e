//! The sampling and stopping fields shared by `/v1/completions` and `/v1/chat/completions` (`fields`), each
//! checked against its range with an error naming it, and the job they make with the tokenized prompts (`build`):
//! n sequences per prompt with their RNG streams, logit rules, log-probability settings, each prompt against the
//! context window.

use crate::decoding::SeqParams;
use crate::penalties::LogitRules;
use crate::request::{ApiError, Body, Gen, COMMON_FIELDS, MAX_CHOICES};
use crate::sampling::SamplingParams;
use crate::scheduler::Group;
use crate::server::AppState;
use crate::stop::MAX_STOPS;
use axum::http::StatusCode;
use common::Rng;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

/// Most `logit_bias` entries (OpenAI's limit).
const MAX_BIAS: usize = 300;

pub(crate) fn num(m: &Body, key: &str) -> Result<Option<f64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(ApiError::invalid(Some(key), format!("`{key}` must be a number"))),
    }
}

pub(crate) fn int(m: &Body, key: &str) -> Result<Option<i64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_i64().map(Some).ok_or_else(|| ApiError::invalid(Some(key), format!("`{key}` must be an integer")))
        }
        Some(_) => Err(ApiError::invalid(Some(key), format!("`{key}` must be an integer"))),
    }
}

pub(crate) fn boolean(m: &Body, key: &str) -> Result<Option<bool>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid(Some(key), format!("`{key}` must be a boolean"))),
    }
}

/// A number field in `lo..=hi` (default `dflt`).
pub(crate) fn ranged(m: &Body, key: &str, lo: f64, hi: f64, dflt: f64) -> Result<f64, ApiError> {
    let v = num(m, key)?.unwrap_or(dflt);
    if !(lo..=hi).contains(&v) {
        return Err(ApiError::invalid(Some(key), format!("`{key}` must be in [{lo}, {hi}], got {v}")));
    }
    Ok(v)
}

pub(crate) fn check_fields(m: &Body, own: &[&str]) -> Result<(), ApiError> {
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
pub(crate) struct Fields {
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

pub(crate) fn fields(s: &AppState, m: &Body, max_tokens_keys: &[&str], echo: bool) -> Result<Fields, ApiError> {
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
pub(crate) fn build(
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
