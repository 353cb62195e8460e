//! What the server tells its operator: `GET /metrics` in Prometheus' text format (requests by endpoint and
//! status, prompt and generated tokens, queue depth, running rows, and histograms of time to first token, time
//! per output token and request latency — vLLM's set, under `dolly_` names) and one log line per request on
//! stderr (time, method, path, status, tokens, latency; the prompt only with `--log-prompts`). Generation
//! endpoints log when their answer ends (a stream's last event), everything else when its response is ready.

use crate::server::AppState;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A histogram of seconds with fixed bucket bounds (Prometheus: cumulative counts per upper bound).
pub(crate) struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|&b| s <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            acc += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const TTFT_S: &[f64] = &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];
const TPOT_S: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0];
const E2E_S: &[f64] = &[0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0];

/// The server's counters (besides the scheduler's gauges).
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_S),
            tpot: Histogram::new(TPOT_S),
            e2e: Histogram::new(E2E_S),
        }
    }
}

/// Endpoints counted by name; anything else is `other` (a scanner must not grow the table).
fn endpoint(path: &str) -> &'static str {
    match path {
        "/v1/completions" => "/v1/completions",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/tokenize" => "/tokenize",
        "/detokenize" => "/detokenize",
        "/" => "/",
        _ => "other",
    }
}

/// Marks a response whose request is logged by the generation path when it ends.
#[derive(Clone, Copy)]
pub(crate) struct LoggedLater;

/// The request-log settings.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogOptions {
    pub requests: bool,
    pub prompts: bool,
}

/// `2026-12-04T01:02:03.456Z` from the system clock (no time-zone database needed).
fn utc_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    utc(d.as_secs(), d.subsec_millis())
}

fn utc(secs: u64, ms: u32) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// One request's log line.
pub(crate) struct LogLine<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub tokens: Option<(usize, usize)>,
    pub latency: Duration,
    pub prompt: Option<&'a str>,
}

pub(crate) fn log(opts: LogOptions, l: LogLine<'_>) {
    if !opts.requests {
        return;
    }
    let mut s = format!("{} {} {} {}", utc_now(), l.method, l.path, l.status);
    if let Some((p, c)) = l.tokens {
        let _ = write!(s, " prompt_tokens={p} completion_tokens={c}");
    }
    let _ = write!(s, " {:.3}s", l.latency.as_secs_f64());
    if let (true, Some(p)) = (opts.prompts, l.prompt) {
        let _ = write!(s, " prompt={}", serde_json::Value::String(p.to_string()));
    }
    eprintln!("{s}");
}

/// The middleware: counts every response by endpoint and status, logs those the generation path does not.
pub(crate) async fn track(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    {
        let mut m = s.metrics.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((endpoint(&path).to_string(), status)).or_insert(0) += 1;
    }
    if resp.extensions().get::<LoggedLater>().is_none() {
        log(s.log, LogLine { method: &method, path: &path, status, tokens: None, latency: t0.elapsed(), prompt: None });
    }
    resp
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let m = &s.metrics;
    let st = &s.scheduler.stats;
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let _ = writeln!(out, "# HELP dolly_requests_total HTTP requests answered, by endpoint and status.");
    let _ = writeln!(out, "# TYPE dolly_requests_total counter");
    for ((e, status), n) in m.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = writeln!(out, "dolly_requests_total{{endpoint=\"{e}\",status=\"{status}\"}} {n}");
    }
    let counters = [
        ("dolly_prompt_tokens_total", "Prompt tokens of accepted generation requests.", l(&m.prompt_tokens)),
        ("dolly_generation_tokens_total", "Tokens generated.", l(&m.generation_tokens)),
        ("dolly_sequences_finished_total", "Sequences decoded to their end.", l(&st.completed)),
        ("dolly_sequences_cancelled_total", "Sequences cancelled (client gone).", l(&st.cancelled)),
        ("dolly_requests_rejected_total", "Requests refused with 429 (queue full).", l(&st.rejected)),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
    let gauges = [
        ("dolly_queue_depth", "Requests waiting for a batch row.", l(&st.queued)),
        ("dolly_running_rows", "Sequences decoding now.", l(&st.running)),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    m.ttft.write(&mut out, "dolly_time_to_first_token_seconds", "Time from request to its first token.");
    m.tpot.write(&mut out, "dolly_time_per_output_token_seconds", "Time between a sequence's tokens.");
    m.e2e.write(&mut out, "dolly_e2e_request_latency_seconds", "Time from request to its last token.");
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_dates_are_civil() {
        let h = Histogram::new(&[0.1, 1.0]);
        for ms in [50, 500, 5000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut s = String::new();
        h.write(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.1\"} 1\n"));
        assert!(s.contains("x_bucket{le=\"1\"} 2\n"));
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"));
        assert!(s.contains("x_sum 5.55\n"));
        // known instants (Unix time 1.7e9 is 2023-11-14 22:13:20 UTC)
        assert_eq!(utc(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_700_000_000, 7), "2023-11-14T22:13:20.007Z");
        assert_eq!(utc(951_782_400, 0), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc_now().len(), 24);
    }
}
