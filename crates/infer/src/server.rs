//! OpenAI-compatible HTTP server for a Dolly model: `POST /v1/completions`, `POST /v1/chat/completions` (both with
//! SSE streaming), `GET /v1/models`, `GET /health`, `POST /tokenize` and `POST /detokenize` (`tokenize`);
//! with an API key, bearer authentication on all but `/health` (`auth`). Requests are validated (`request`) and refused with an
//! OpenAI-style JSON error; accepted ones go to the `scheduler` (bounded queue: 429 when full). A dropped
//! connection drops the job's receiver, which cancels it. Completions wrap the prompt in Dolly's generation
//! template unless `"raw_prompt": true`; chat uses the last user message as the instruction and earlier messages as
//! the context. Streamed and non-streamed texts come from the same `TextStream`, so they are equal under greedy
//! decoding. Connections (cap, header and idle timeouts, early 413, graceful drain) are handled by `conn`.
//! Does not support `stop`, `logprobs`, `echo`, `n > 1`, tools or HTTP/2.

use crate::conn::{self, Limits};
use crate::decoding::FinishReason;
use crate::request::{self, ApiError, Gen};
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
use data::DollyTokenizer;
use neox::Model;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;

pub use crate::conn::{fd_capacity, fds_needed};
pub use crate::options::{ServerOptions, MAX_CONNECTIONS};
pub use crate::request::chat_to_instruction;

/// What every handler shares.
pub(crate) struct AppState {
    pub scheduler: Scheduler,
    /// Shared by every response's stream decoder (a clone of the tokenizer copies its vocabulary and merges: ~MBs
    /// and milliseconds per request).
    pub tokenizer: Arc<DollyTokenizer>,
    pub model_id: String,
    /// Prompt + max_tokens must fit in this.
    pub max_context: usize,
    pub default_max_tokens: usize,
    pub created: u64,
    pub counter: AtomicU64,
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
    opts.validate_for_model(cfg, if model.decode_bf16() { 2 } else { 4 }).map_err(crate::Error)?;
    let kv_slots = opts.kv_slots_for(cfg);
    let sched_cfg = SchedulerConfig {
        max_batch: opts.max_batch,
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
        max_context: kv_slots,
        default_max_tokens: opts.default_max_tokens,
        created: now_s(),
        counter: AtomicU64::new(0),
    });
    let router = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(opts.body_limit))
        .with_state(state);
    let router = match &opts.api_key {
        Some(k) => router.layer(axum::middleware::from_fn_with_state(Arc::new(k.clone()), crate::auth::require_key)),
        None => router,
    };
    Ok((router, scheduler))
}

/// Serve on `listener` until `shutdown` resolves, then stop accepting, let in-flight requests finish (graceful
/// drain) and stop the decode thread. Options out of range are refused (`ServerOptions::validate_for_model`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: Arc<Model>,
    tokenizer: DollyTokenizer,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> crate::Result<()> {
    let (router, scheduler) = build(model, tokenizer, &opts)?;
    let limits = Limits {
        max_connections: opts.max_connections,
        header_timeout: opts.header_timeout,
        idle_timeout: opts.idle_timeout,
        body_limit: opts.body_limit,
    };
    conn::run(listener, router, limits, shutdown).await;
    let s = scheduler.clone();
    let _ = tokio::task::spawn_blocking(move || s.shutdown()).await;
    Ok(())
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

async fn tokenize(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match request::parse_body(body).and_then(|m| crate::tokenize::tokenize(&s, &m)) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn detokenize(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match request::parse_body(body).and_then(|m| crate::tokenize::detokenize(&s, &m)) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match request::completion(&s, body).and_then(|g| submit(&s, g)) {
        Ok((gen, rx)) => respond(s, gen, rx, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

async fn chat(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match request::chat(&s, body).and_then(|g| submit(&s, g)) {
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
