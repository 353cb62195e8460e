//! Connection handling of the HTTP server: its own accept loop serving the axum `Router` over hyper's HTTP/1
//! connections, so that the server stays reachable under idle or hostile clients:
//! - a cap on open connections (`max_connections`); a connection beyond it is answered at once with a `503`
//!   OpenAI-style JSON error and closed, without reading its request;
//! - a header timeout: a connection that sends no request, or only part of its header, within `header_timeout`
//!   of connecting (or of the first byte of its next request) is closed;
//! - an idle timeout: a keep-alive connection with no request in flight is closed after `idle_timeout`;
//! - a `Content-Length` over the body limit is answered `413` before the body is read (chunked bodies are cut by
//!   axum's `DefaultBodyLimit` as they arrive);
//! - graceful shutdown: stop accepting, close connections without a request in flight, let in-flight requests
//!   finish.
//!
//! Also the open-file (fd) budget those connections need, checked at start (`fd_capacity`).
//! Not handled: a client that uploads its body or reads its response very slowly holds its connection until the
//! request ends.

use axum::body::Body;
use axum::body::Bytes;
use axum::http::{header, Request, Response, StatusCode};
use axum::Router;
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// Connection limits (part of `ServerOptions`).
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_limit: usize,
}

/// Open files the process needs beside its connections (listener, runtime, threads, stdio, model files).
const FD_RESERVE: usize = 32;

/// Refused connections answered concurrently (each holds its socket for at most [`REFUSE_LINGER`]); beyond
/// that, an excess connection is closed without an answer.
fn refusers(max_connections: usize) -> usize {
    (max_connections / 4).clamp(8, 64)
}

const REFUSE_LINGER: Duration = Duration::from_secs(1);

/// File descriptors `max_connections` connections need: the connections, the 503 answers, the reserve.
pub fn fds_needed(max_connections: usize) -> usize {
    max_connections + refusers(max_connections) + FD_RESERVE
}

/// (the most connections this process's open-file limit allows, that limit), after raising the soft limit
/// towards the hard one as far as `want` connections need. None when the limit is unknown or unlimited.
pub fn fd_capacity(want: usize) -> Option<(usize, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given; RLIMIT_NOFILE is a valid resource.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    let need = fds_needed(want) as libc::rlim_t;
    if need > lim.rlim_cur && lim.rlim_max > lim.rlim_cur {
        let raised = libc::rlimit { rlim_cur: need.min(lim.rlim_max), rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct; a soft limit at most the hard one is always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = raised.rlim_cur;
        }
    }
    let fds = usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
    // the largest n with fds_needed(n) <= fds
    let mut n = fds.saturating_sub(FD_RESERVE);
    while n > 0 && fds_needed(n) > fds {
        n -= 1;
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every platform
    let limit = lim.rlim_cur as u64;
    Some((n, limit))
}

/// Accept and serve connections on `listener` until `shutdown` resolves; then stop accepting, let open
/// connections finish their requests, and return once all are closed.
pub(crate) async fn run(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let limits = Arc::new(limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(refusers(limits.max_connections)));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let sock = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((sock, _)) => sock,
                // out of file descriptors or similar: back off instead of spinning on the error
                Err(e) if !is_connection_error(&e) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(_) => continue,
            },
        };
        let _ = sock.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(serve_conn(sock, router.clone(), limits.clone(), stop_rx.clone(), permit));
            }
            Err(_) => {
                if let Ok(p) = refusing.clone().try_acquire_owned() {
                    tokio::spawn(refuse(sock, p));
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // every connection holds a slot until it closes
    let _ = slots.acquire_many(limits.max_connections as u32).await;
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// The 503 body of a connection over the cap (OpenAI error shape).
pub(crate) const TOO_MANY_CONNECTIONS: &str = r#"{"error":{"message":"the server has too many open connections; retry later","type":"server_busy","param":null,"code":"too_many_connections"}}"#;

/// Answer 503 and close, without reading the request. Reads (and drops) what the client sends until it closes,
/// for at most REFUSE_LINGER: closing a socket with unread data resets it, which can destroy the answer.
async fn refuse(mut sock: TcpStream, _permit: OwnedSemaphorePermit) {
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n{TOO_MANY_CONNECTIONS}",
        TOO_MANY_CONNECTIONS.len()
    );
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        sock.write_all(msg.as_bytes()).await?;
        sock.shutdown().await?;
        let mut buf = [0u8; 4096];
        while sock.read(&mut buf).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

/// What a connection is doing, for its timeouts.
struct ActState {
    /// Requests whose response has not been fully written.
    in_flight: usize,
    /// When the connection last became idle (connected, or its last response ended).
    idle_since: Instant,
    /// No request yet: the header timeout applies from connecting.
    fresh: bool,
    /// First byte of the next request received (while idle) at this time.
    head_started: Option<Instant>,
}

#[derive(Clone)]
struct Activity(Arc<Mutex<ActState>>);

impl Activity {
    fn new() -> Self {
        Activity(Arc::new(Mutex::new(ActState {
            in_flight: 0,
            idle_since: Instant::now(),
            fresh: true,
            head_started: None,
        })))
    }
    fn with<R>(&self, f: impl FnOnce(&mut ActState) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
    fn on_read(&self) {
        self.with(|s| {
            if s.in_flight == 0 && s.head_started.is_none() {
                s.head_started = Some(Instant::now());
            }
        })
    }
    fn request_started(&self) {
        self.with(|s| {
            s.in_flight += 1;
            s.fresh = false;
            s.head_started = None;
        })
    }
    fn request_ended(&self) {
        self.with(|s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                s.idle_since = Instant::now();
                s.head_started = None;
            }
        })
    }
    /// When the connection times out if nothing changes; None while a request is in flight.
    fn deadline(&self, l: &Limits) -> Option<Instant> {
        self.with(|s| {
            if s.in_flight > 0 {
                None
            } else if let Some(t) = s.head_started {
                Some(t + l.header_timeout)
            } else if s.fresh {
                Some(s.idle_since + l.header_timeout)
            } else {
                Some(s.idle_since + l.idle_timeout)
            }
        })
    }
}

/// Decrements the in-flight count when a response body is done (written or dropped).
struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A response body that holds its request's [`InFlight`] until it is done.
struct TrackedBody {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, noting reads for the header timeout.
struct TrackedIo {
    sock: TcpStream,
    act: Activity,
}

impl AsyncRead for TrackedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.sock).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.act.on_read();
        }
        r
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.sock).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.sock).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.sock).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.sock).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.sock.is_write_vectored()
    }
}

async fn serve_conn(
    sock: TcpStream,
    router: Router,
    limits: Arc<Limits>,
    mut stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let act = Activity::new();
    let io = TokioIo::new(TrackedIo { sock, act: act.clone() });
    let (a, body_limit) = (act.clone(), limits.body_limit);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (router, act) = (router.clone(), a.clone());
        async move { Ok::<_, Infallible>(handle(req, router, act, body_limit).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // the timeouts are ours (hyper's header timer would also close idle keep-alive connections)
    builder.keep_alive(true).header_read_timeout(None);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        // re-check at least every half header timeout: a request's first byte can move the deadline earlier
        let now = Instant::now();
        let mut wake = now + limits.header_timeout / 2;
        if let Some(d) = act.deadline(&limits) {
            if d <= now {
                return; // timed out with no request in flight: drop the connection
            }
            wake = wake.min(d);
        }
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = stop.changed(), if !stopping => {
                // no request in flight: close now rather than wait out a half-sent header
                if act.deadline(&limits).is_some() {
                    return;
                }
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// One request: refuse an oversize `Content-Length` before reading the body, else route it.
async fn handle(req: Request<Incoming>, mut router: Router, act: Activity, body_limit: usize) -> Response<Body> {
    act.request_started();
    let guard = InFlight(act);
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    let resp = match declared {
        Some(n) if n > body_limit as u64 => too_large(n, body_limit),
        _ => match tower_service::Service::call(&mut router, req).await {
            Ok(r) => r,
            Err(e) => match e {},
        },
    };
    resp.map(|inner| Body::new(TrackedBody { inner, _guard: guard }))
}

fn too_large(n: u64, limit: usize) -> Response<Body> {
    let body = serde_json::json!({"error": {
        "message": format!("request body of {n} bytes is larger than the server's limit of {limit} bytes"),
        "type": "invalid_request_error", "param": null, "code": "request_too_large"}});
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    // the unread body cannot be skipped cheaply: this connection ends with the answer
    h.insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    r
}
