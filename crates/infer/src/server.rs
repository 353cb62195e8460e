//! OpenAI-compatible HTTP server for a Dolly model: `POST /v1/completions` (raw text or token-id prompts, one or
//! several; Dolly's template with `--completions-template dolly`), `POST /v1/chat/completions` (the last user
//! message is the instruction, earlier messages the context), both with SSE streaming; `GET /v1/models`,
//! `GET /health`, `GET /metrics` (`observe`), `POST /tokenize` and `POST /detokenize` (`tokenize`), the chat page
//! at `GET /`; with an API key, bearer authentication on all but `/health` and `/` (`auth`); CORS (`cors`).
//! Requests are validated (`request`) and refused with an OpenAI-style JSON error naming the field; accepted ones
//! go to the `scheduler` (bounded queue: 429 when full) as groups of rows, one per prompt and `n` rows each, and
//! come back as choices (`respond`, `choice`). A dropped connection drops the job's receiver, which cancels it.
//! Connections (cap, header and idle timeouts, early 413, graceful drain) are handled by `conn`.
//! Does not support tools, JSON mode, `suffix` or HTTP/2 (refused or not offered).

use crate::conn::{self, Limits};
use crate::observe::{LoggedLater, Metrics};
use crate::request::{self, ApiError, Gen};
use crate::respond::{self, Kind, Run};
use crate::scheduler::{Cancels, JobEvent, Scheduler, SchedulerConfig, SubmitError};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use data::DollyTokenizer;
use neox::Model;
use serde_json::{json, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;

pub use crate::conn::{fd_capacity, fds_needed};
pub use crate::options::{CompletionsTemplate, LogOptions, ServerOptions, MAX_CONNECTIONS};
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
    /// Rows decoded together (`n` is at most this).
    pub max_batch: usize,
    /// Wrap `/v1/completions` prompts in Dolly's template (`--completions-template dolly`).
    pub completions_dolly: bool,
    pub created: u64,
    pub counter: AtomicU64,
    pub metrics: Metrics,
    pub log: LogOptions,
}

pub(crate) fn now_s() -> u64 {
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
    // the token-bytes table of log-probability responses, built now rather than in the first such request
    let _ = tokenizer.token_bytes(0);
    let scheduler = Scheduler::start(model.clone(), sched_cfg);
    let state = Arc::new(AppState {
        scheduler: scheduler.clone(),
        tokenizer: Arc::new(tokenizer),
        model_id: opts.model_id.clone(),
        max_context: kv_slots,
        default_max_tokens: opts.default_max_tokens,
        max_batch: opts.max_batch,
        completions_dolly: opts.completions_template == CompletionsTemplate::Dolly,
        created: now_s(),
        counter: AtomicU64::new(0),
        metrics: Metrics::default(),
        log: opts.log,
    });
    let router = Router::new()
        .route("/", get(chat_page))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(crate::observe::metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(opts.body_limit))
        .with_state(state.clone());
    // layers run outside in: request tracking, CORS (preflights answered before auth), auth, the routes
    let router = match &opts.api_key {
        Some(k) => router.layer(from_fn_with_state(Arc::new(k.clone()), crate::auth::require_key)),
        None => router,
    };
    let router = match opts.cors_origins.is_empty() {
        false => router.layer(from_fn_with_state(Arc::new(opts.cors_origins.clone()), crate::cors::cors)),
        true => router,
    };
    let router = router.layer(from_fn_with_state(state, crate::observe::track));
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

/// The chat page: one static file in the binary (no CDN, no build step); it calls `/v1/models` and streams
/// `/v1/chat/completions` itself, asking for the API key when the server answers 401.
const CHAT_PAGE: &str = include_str!("chat.html");

async fn chat_page() -> Response {
    let headers = [
        (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
        // the page's own inline script and style only; fetches go to this server
        (
            axum::http::header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
        ),
        (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (headers, CHAT_PAGE).into_response()
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
        Ok((gen, rx, c)) => respond(s, gen, rx, c, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

async fn chat(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match request::chat(&s, body).and_then(|g| submit(&s, g)) {
        Ok((gen, rx, c)) => respond(s, gen, rx, c, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

fn submit(s: &AppState, gen: Gen) -> Result<(Gen, UnboundedReceiver<JobEvent>, Cancels), ApiError> {
    match s.scheduler.submit_groups(gen.groups.clone()) {
        Ok((rx, cancels)) => Ok((gen, rx, cancels)),
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

async fn respond(
    s: Arc<AppState>,
    gen: Gen,
    rx: UnboundedReceiver<JobEvent>,
    cancels: Cancels,
    kind: Kind,
) -> Response {
    let stream = gen.stream;
    let run = Run::new(s, gen, rx, cancels, kind);
    let mut resp = if stream {
        respond::stream(run)
    } else {
        // awaited by axum; if the client goes away the handler is dropped, which drops the receiver and cancels
        respond::collect(run).await
    };
    resp.extensions_mut().insert(LoggedLater);
    resp
}
