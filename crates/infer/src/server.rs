//! OpenAI-compatible HTTP server for a Dolly model: `POST /v1/completions`, `POST /v1/chat/completions` (both with
//! SSE streaming), `GET /v1/models`, `GET /health`. Requests are validated (model id, max_tokens, temperature,
//! top_p, top_k, n, prompt length against the context window, body size) and refused with an OpenAI-style JSON
//! error; accepted ones go to the `scheduler` (bounded queue: 429 when full). A dropped connection drops the job's
//! receiver, which cancels it. Completions wrap the prompt in Dolly's generation template unless `"raw_prompt":
//! true`; chat uses the last user message as the instruction and earlier messages as the context.
//! Streamed and non-streamed texts come from the same `TextStream`, so they are equal under greedy decoding.
//! Does not support `stop`, `logprobs`, `echo`, `n > 1`, tools or HTTP/2.

use crate::batch::{FinishReason, SeqParams};
use crate::sampling::SamplingParams;
use crate::scheduler::{JobEvent, Scheduler, SchedulerConfig, SubmitError};
use crate::stream::TextStream;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::Rng;
use data::DollyTokenizer;
use neox::Model;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;

/// Server settings (the `dolly serve` flags).
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The id clients must use as `model` (also listed by `/v1/models`).
    pub model_id: String,
    pub max_batch: usize,
    pub queue_size: usize,
    /// KV cache slots per row (longest prompt + answer); None = the model's context window.
    pub kv_slots: Option<usize>,
    /// Largest accepted request body in bytes.
    pub body_limit: usize,
    /// `max_tokens` when a request gives none (Dolly: 256).
    pub default_max_tokens: usize,
    pub batch_window: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model_id: "dolly".into(),
            max_batch: 8,
            queue_size: 64,
            kv_slots: None,
            body_limit: 1 << 20,
            default_max_tokens: 256,
            batch_window: Duration::from_millis(2),
        }
    }
}

struct AppState {
    scheduler: Scheduler,
    /// Shared by every response's stream decoder (a clone of the tokenizer copies its vocabulary and merges: ~MBs
    /// and milliseconds per request).
    tokenizer: Arc<DollyTokenizer>,
    model_id: String,
    /// Prompt + max_tokens must fit in this.
    max_context: usize,
    default_max_tokens: usize,
    created: u64,
    counter: AtomicU64,
}

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }
    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    fn status(mut self, s: StatusCode) -> Self {
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

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Build the router with its state (the scheduler thread starts here).
fn build(model: Arc<Model>, tokenizer: DollyTokenizer, opts: &ServerOptions) -> crate::Result<(Router, Scheduler)> {
    let cfg = &model.config;
    let rows = cfg.vocab_size;
    if tokenizer.vocab_size() > rows {
        return Err(crate::Error(format!(
            "tokenizer {} has {} ids but the model has only {rows} embedding rows",
            tokenizer.source().display(),
            tokenizer.vocab_size()
        )));
    }
    let max_pos = cfg.max_position_embeddings;
    let kv_slots = opts.kv_slots.unwrap_or(max_pos).max(2);
    let sched_cfg = SchedulerConfig {
        max_batch: opts.max_batch.max(1),
        queue_size: opts.queue_size,
        kv_slots,
        vocab_limit: tokenizer.vocab_size(),
        stop_id: Some(tokenizer.special().end),
        batch_window: opts.batch_window,
    };
    model.prepare_decode();
    let scheduler = Scheduler::start(model.clone(), sched_cfg);
    let state = Arc::new(AppState {
        scheduler: scheduler.clone(),
        tokenizer: Arc::new(tokenizer),
        model_id: opts.model_id.clone(),
        max_context: max_pos.min(kv_slots),
        default_max_tokens: opts.default_max_tokens.max(1),
        created: now_s(),
        counter: AtomicU64::new(0),
    });
    let router = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(opts.body_limit))
        .with_state(state);
    Ok((router, scheduler))
}

/// Serve on `listener` until `shutdown` resolves, then stop accepting, let in-flight requests finish (graceful
/// drain) and stop the decode thread.
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: Arc<Model>,
    tokenizer: DollyTokenizer,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> crate::Result<()> {
    let (router, scheduler) = build(model, tokenizer, &opts)?;
    let res = axum::serve(listener, router).with_graceful_shutdown(shutdown).await;
    let s = scheduler.clone();
    let _ = tokio::task::spawn_blocking(move || s.shutdown()).await;
    res.map_err(|e| crate::Error(format!("server: {e}")))
}

/// A server running on its own thread and runtime (tests, benchmarks).
pub struct ServerHandle {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<crate::Result<()>>>,
}

impl ServerHandle {
    /// Trigger the graceful shutdown and wait for it.
    pub fn shutdown(mut self) -> crate::Result<()> {
        self.stop_and_join()
    }
    fn stop_and_join(&mut self) -> crate::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(crate::Error("server thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Start a server on `addr` (e.g. 127.0.0.1:0) in a background thread; returns once it is listening.
pub fn spawn(
    addr: SocketAddr,
    model: Arc<Model>,
    tokenizer: DollyTokenizer,
    opts: ServerOptions,
) -> crate::Result<ServerHandle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| crate::Error(format!("tokio runtime: {e}")))?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| crate::Error(format!("cannot listen on {addr}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| crate::Error(format!("local address: {e}")))?;
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("dolly-http".into())
        .spawn(move || {
            rt.block_on(serve(listener, model, tokenizer, opts, async move {
                let _ = rx.await;
            }))
        })
        .map_err(|e| crate::Error(format!("spawn server thread: {e}")))?;
    Ok(ServerHandle { addr, stop: Some(stop), thread: Some(thread) })
}

async fn not_found() -> ApiError {
    ApiError::invalid(None, "unknown endpoint").status(StatusCode::NOT_FOUND)
}

async fn health(State(s): State<Arc<AppState>>) -> Json<Value> {
    let st = &s.scheduler.stats;
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Json(json!({
        "status": "ok", "model": s.model_id, "queued": l(&st.queued), "running": l(&st.running),
        "completed": l(&st.completed), "cancelled": l(&st.cancelled), "rejected": l(&st.rejected),
        "failed": l(&st.failed), "tokens": l(&st.tokens),
    }))
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": s.model_id, "object": "model", "created": s.created, "owned_by": "dolly"}]}),
    )
}

/// The parsed, validated common part of both endpoints.
struct Gen {
    prompt: Vec<u32>,
    params: SeqParams,
    stream: bool,
    strip: bool,
}

fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<serde_json::Map<String, Value>, ApiError> {
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

fn num(m: &serde_json::Map<String, Value>, key: &'static str) -> Result<Option<f64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(ApiError::invalid(Some(key), format!("`{key}` must be a number"))),
    }
}

fn int(m: &serde_json::Map<String, Value>, key: &'static str) -> Result<Option<i64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_i64().map(Some).ok_or_else(|| ApiError::invalid(Some(key), format!("`{key}` must be an integer")))
        }
        Some(_) => Err(ApiError::invalid(Some(key), format!("`{key}` must be an integer"))),
    }
}

/// Validate everything but the prompt; tokenize `prompt_text`; check the context window.
fn common_params(
    s: &AppState,
    m: &serde_json::Map<String, Value>,
    prompt_text: &str,
    max_tokens_keys: &[&'static str],
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
            return Err(ApiError::invalid(Some("n"), "only n = 1 is supported"));
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
        .map_err(|e| ApiError::invalid(Some("prompt"), format!("cannot tokenize the prompt: {e}")))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
    }
    if prompt.len() + max_tokens > s.max_context {
        return Err(ApiError::invalid(
            Some("messages"),
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

fn text_of(v: &Value, key: &'static str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        // content parts: [{"type": "text", "text": "..."}]
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => return Err(ApiError::invalid(Some(key), "only text content parts are supported")),
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::invalid(Some(key), format!("`{key}` must be a string"))),
    }
}

async fn completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match completions_inner(&s, body) {
        Ok((gen, rx)) => respond(s, gen, rx, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

async fn chat(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match chat_inner(&s, body) {
        Ok((gen, rx)) => respond(s, gen, rx, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

type Accepted = (Gen, UnboundedReceiver<JobEvent>);

fn submit(s: &AppState, gen: Gen) -> Result<Accepted, ApiError> {
    match s.scheduler.submit(gen.prompt.clone(), gen.params.clone()) {
        Ok(rx) => Ok((gen, rx)),
        Err(SubmitError::QueueFull) => Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "the server is busy: too many requests are waiting; retry later".into(),
            kind: "server_busy",
            param: None,
            code: Some("queue_full"),
        }),
        Err(SubmitError::ShuttingDown) => Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the server is shutting down".into(),
            kind: "server_error",
            param: None,
            code: None,
        }),
    }
}

fn completions_inner(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Accepted, ApiError> {
    let m = parse_body(body)?;
    let prompt = match m.get("prompt") {
        Some(Value::String(p)) => p.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "only a single prompt string is supported (no batches, no ids)",
            ))
        }
        None | Some(Value::Null) => return Err(ApiError::invalid(Some("prompt"), "`prompt` is required")),
        Some(_) => return Err(ApiError::invalid(Some("prompt"), "`prompt` must be a string")),
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
    }
    let raw = matches!(m.get("raw_prompt"), Some(Value::Bool(true)));
    let text = if raw { prompt } else { data::generation_prompt(&prompt, None) };
    let mut gen = common_params(s, &m, &text, &["max_tokens"])?;
    gen.strip = !raw;
    submit(s, gen)
}

/// Dolly has one instruction and an optional context: the last user message is the instruction; system messages
/// and earlier turns (as `User: ...` / `Assistant: ...`) become the context.
pub fn chat_to_instruction(messages: &[(String, String)]) -> Result<(String, Option<String>), String> {
    let Some((role, last)) = messages.last() else { return Err("`messages` must not be empty".into()) };
    if role != "user" {
        return Err(format!("the last message must have role `user`, got `{role}`"));
    }
    let mut ctx = Vec::new();
    for (role, content) in &messages[..messages.len() - 1] {
        match role.as_str() {
            "system" | "developer" => ctx.push(content.clone()),
            "user" => ctx.push(format!("User: {content}")),
            "assistant" => ctx.push(format!("Assistant: {content}")),
            other => return Err(format!("unsupported message role `{other}`")),
        }
    }
    let ctx = ctx.join("\n\n");
    Ok((last.clone(), if ctx.is_empty() { None } else { Some(ctx) }))
}

fn chat_inner(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Accepted, ApiError> {
    let m = parse_body(body)?;
    let Some(Value::Array(msgs)) = m.get("messages") else {
        return Err(ApiError::invalid(Some("messages"), "`messages` must be an array"));
    };
    let mut turns = Vec::with_capacity(msgs.len());
    for msg in msgs {
        let role = msg
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(Some("messages"), "each message needs a string `role`"))?;
        let content = text_of(msg.get("content").unwrap_or(&Value::Null), "messages")?;
        turns.push((role.to_string(), content));
    }
    let (instruction, context) = chat_to_instruction(&turns).map_err(|e| ApiError::invalid(Some("messages"), e))?;
    if instruction.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "the last user message is empty"));
    }
    let text = data::generation_prompt(&instruction, context.as_deref());
    let gen = common_params(s, &m, &text, &["max_tokens", "max_completion_tokens"])?;
    submit(s, gen)
}

#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

/// Turns job events into text with a `TextStream`; shared by the streaming and non-streaming paths.
struct Collector {
    ts: TextStream,
    tok: Arc<DollyTokenizer>,
    stop_id: u32,
    generated: usize,
}

enum Step {
    Delta(String),
    Done(String, FinishReason),
    Failed(String),
}

impl Collector {
    fn on(&mut self, ev: Option<JobEvent>) -> Step {
        let dec = |ids: &[u32]| self.tok.decode(ids);
        match ev {
            None => Step::Failed("generation ended unexpectedly".into()),
            Some(JobEvent::Error(e)) => Step::Failed(e),
            Some(JobEvent::Token { id, finish }) => {
                self.generated += 1;
                let mut delta = String::new();
                if id != self.stop_id {
                    match self.ts.push(id, dec) {
                        Ok(d) => delta = d,
                        Err(e) => return Step::Failed(e.to_string()),
                    }
                }
                match finish {
                    None => Step::Delta(delta),
                    Some(f) => match self.ts.finish(|ids: &[u32]| self.tok.decode(ids)) {
                        Ok(rest) => Step::Done(delta + &rest, f),
                        Err(e) => Step::Failed(e.to_string()),
                    },
                }
            }
        }
    }
}

async fn respond(s: Arc<AppState>, gen: Gen, rx: UnboundedReceiver<JobEvent>, kind: Kind) -> Response {
    let n = s.counter.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Completion => format!("cmpl-{:x}{n:x}", s.created),
        Kind::Chat => format!("chatcmpl-{:x}{n:x}", s.created),
    };
    let col = Collector {
        ts: TextStream::new(gen.strip),
        tok: s.tokenizer.clone(),
        stop_id: s.tokenizer.special().end,
        generated: 0,
    };
    let prompt_tokens = gen.prompt.len();
    if gen.stream {
        stream_response(s, id, col, rx, kind)
    } else {
        // awaited by axum; if the client goes away the handler is dropped, which drops `rx` and cancels the job
        collect_response(s, id, col, rx, kind, prompt_tokens).await
    }
}

async fn collect_response(
    s: Arc<AppState>,
    id: String,
    mut col: Collector,
    mut rx: UnboundedReceiver<JobEvent>,
    kind: Kind,
    prompt_tokens: usize,
) -> Response {
    let mut text = String::new();
    let finish = loop {
        match col.on(rx.recv().await) {
            Step::Delta(d) => text.push_str(&d),
            Step::Done(d, f) => {
                text.push_str(&d);
                break f;
            }
            Step::Failed(e) => {
                return ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: format!("generation failed: {e}"),
                    kind: "server_error",
                    param: None,
                    code: None,
                }
                .into_response()
            }
        }
    };
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": col.generated,
        "total_tokens": prompt_tokens + col.generated});
    let body = match kind {
        Kind::Completion => json!({
            "id": id, "object": "text_completion", "created": now_s(), "model": s.model_id,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish.as_str()}],
            "usage": usage,
        }),
        Kind::Chat => json!({
            "id": id, "object": "chat.completion", "created": now_s(), "model": s.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": finish.as_str()}],
            "usage": usage,
        }),
    };
    Json(body).into_response()
}

fn chunk(s: &AppState, id: &str, kind: Kind, delta: Option<&str>, first: bool, finish: Option<FinishReason>) -> Value {
    let fr = finish.map(|f| f.as_str());
    match kind {
        Kind::Completion => json!({
            "id": id, "object": "text_completion", "created": now_s(), "model": s.model_id,
            "choices": [{"text": delta.unwrap_or(""), "index": 0, "logprobs": null, "finish_reason": fr}],
        }),
        Kind::Chat => {
            let mut d = serde_json::Map::new();
            if first {
                d.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = delta {
                d.insert("content".into(), json!(t));
            }
            json!({
                "id": id, "object": "chat.completion.chunk", "created": now_s(), "model": s.model_id,
                "choices": [{"index": 0, "delta": d, "finish_reason": fr}],
            })
        }
    }
}

fn stream_response(
    s: Arc<AppState>,
    id: String,
    col: Collector,
    rx: UnboundedReceiver<JobEvent>,
    kind: Kind,
) -> Response {
    enum St {
        Start,
        Running,
        Finished,
        Closed,
    }
    let init = (s, id, col, rx, kind, St::Start);
    let stream = futures_util::stream::unfold(init, |(s, id, mut col, mut rx, kind, st)| async move {
        match st {
            St::Closed => None,
            St::Finished => {
                Some((Ok::<Event, Infallible>(Event::default().data("[DONE]")), (s, id, col, rx, kind, St::Closed)))
            }
            St::Start if matches!(kind, Kind::Chat) => {
                let v = chunk(&s, &id, kind, Some(""), true, None);
                Some((Ok(Event::default().data(v.to_string())), (s, id, col, rx, kind, St::Running)))
            }
            St::Start | St::Running => loop {
                match col.on(rx.recv().await) {
                    Step::Delta(d) if d.is_empty() => continue,
                    Step::Delta(d) => {
                        let v = chunk(&s, &id, kind, Some(&d), false, None);
                        break Some((Ok(Event::default().data(v.to_string())), (s, id, col, rx, kind, St::Running)));
                    }
                    Step::Done(d, f) => {
                        let delta = if d.is_empty() { None } else { Some(d.as_str()) };
                        let v = chunk(&s, &id, kind, delta, false, Some(f));
                        break Some((Ok(Event::default().data(v.to_string())), (s, id, col, rx, kind, St::Finished)));
                    }
                    Step::Failed(e) => {
                        let v = json!({"error": {"message": format!("generation failed: {e}"), "type": "server_error",
                            "param": null, "code": null}});
                        break Some((Ok(Event::default().data(v.to_string())), (s, id, col, rx, kind, St::Finished)));
                    }
                }
            },
        }
    });
    Sse::new(stream).into_response()
}
