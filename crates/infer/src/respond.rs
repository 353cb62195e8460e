//! Responses of `/v1/completions` and `/v1/chat/completions`: a job's events turned into choices (`choice`), then
//! one JSON body, or an SSE stream of chunks (a role chunk per chat choice first; `usage: null` on each chunk and a
//! last usage chunk with `stream_options.include_usage`; then `[DONE]`). A stop string found in a choice's text
//! stops that sequence's row in the scheduler. A dropped client drops the job's receiver, which cancels it.

use crate::choice::{Choice, LpEntry, Piece};
use crate::decoding::FinishReason;
use crate::observe::{log, LogLine};
use crate::request::{ApiError, Gen};
use crate::scheduler::{Cancels, JobEvent};
use crate::server::{now_s, AppState};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Completion,
    Chat,
}

/// A running job and the choices it feeds.
pub(crate) struct Run {
    s: Arc<AppState>,
    id: String,
    kind: Kind,
    rx: UnboundedReceiver<JobEvent>,
    cancels: Cancels,
    choices: Vec<Choice>,
    /// Each group's prompt ids (for the echoed tokens' entries).
    prompts: Vec<Vec<u32>>,
    n: usize,
    prompt_tokens: usize,
    logprobs: bool,
    include_usage: bool,
    done: usize,
    /// Metrics and the request log: when the request was accepted, each choice's last token, the prompt text
    /// (for `--log-prompts`), whether the log line was written.
    t0: Instant,
    first: bool,
    last: Vec<Option<Instant>>,
    prompt_text: String,
    logged: bool,
}

enum Next {
    Piece(usize, Piece),
    Failed(String),
    Done,
}

impl Run {
    pub fn new(s: Arc<AppState>, gen: Gen, rx: UnboundedReceiver<JobEvent>, cancels: Cancels, kind: Kind) -> Self {
        let n = s.counter.fetch_add(1, Ordering::Relaxed);
        let id = match kind {
            Kind::Completion => format!("cmpl-{:x}{n:x}", s.created),
            Kind::Chat => format!("chatcmpl-{:x}{n:x}", s.created),
        };
        let stop_id = s.tokenizer.special().end;
        let mut choices = Vec::new();
        for text in &gen.prompt_texts {
            for _ in 0..gen.n {
                let mut c = Choice::new(gen.strip, gen.stops.clone(), stop_id, gen.min_tokens);
                if gen.echo {
                    c.echo(text.clone(), gen.echo_only);
                }
                choices.push(c);
            }
        }
        let prompt_tokens = gen.prompt_tokens();
        s.metrics.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        Run {
            t0: Instant::now(),
            first: true,
            last: vec![None; choices.len()],
            prompt_text: gen.prompt_texts.join("\n"),
            logged: false,
            prompt_tokens,
            prompts: gen.groups.into_iter().map(|g| g.prompt).collect(),
            s,
            id,
            kind,
            rx,
            cancels,
            choices,
            n: gen.n,
            logprobs: gen.logprobs.is_some(),
            include_usage: gen.include_usage,
            done: 0,
        }
    }

    fn all_done(&self) -> bool {
        self.done == self.choices.len()
    }

    async fn next(&mut self) -> Next {
        loop {
            if self.all_done() {
                return Next::Done;
            }
            match self.rx.recv().await {
                None => return Next::Failed("generation ended unexpectedly".into()),
                Some(JobEvent::Error(e)) => return Next::Failed(e),
                Some(JobEvent::Prompt { group, logprobs }) => {
                    let Some(ids) = self.prompts.get(group) else { continue };
                    let end = ((group + 1) * self.n).min(self.choices.len());
                    for c in &mut self.choices[(group * self.n).min(end)..end] {
                        c.prompt_logprobs(ids, &logprobs);
                    }
                }
                Some(JobEvent::Token { index, id, finish, logprob }) => {
                    let Some(c) = self.choices.get_mut(index) else { continue };
                    let was_done = c.finish.is_some();
                    let before = c.generated;
                    let piece = match c.on_token(&self.s.tokenizer, id, finish, logprob) {
                        Ok(p) => p,
                        Err(e) => return Next::Failed(e),
                    };
                    if c.stopped_by_string() {
                        if let Some(f) = self.cancels.get(index) {
                            f.store(true, Ordering::Relaxed);
                        }
                    }
                    if !was_done && c.finish.is_some() {
                        self.done += 1;
                    }
                    if c.generated > before {
                        let (now, m) = (Instant::now(), &self.s.metrics);
                        m.generation_tokens.fetch_add(1, Ordering::Relaxed);
                        if std::mem::take(&mut self.first) {
                            m.ttft.observe(now - self.t0);
                        }
                        if let Some(prev) = self.last[index].replace(now) {
                            m.tpot.observe(now - prev);
                        }
                    }
                    if piece.text.is_empty() && piece.lps.is_empty() && piece.finish.is_none() {
                        continue;
                    }
                    return Next::Piece(index, piece);
                }
            }
        }
    }

    /// The request's log line and latency (once; `status` 499: the client went away first).
    fn finish_log(&mut self, status: u16) {
        if std::mem::replace(&mut self.logged, true) {
            return;
        }
        let completion: usize = self.choices.iter().map(|c| c.generated).sum();
        let latency = self.t0.elapsed();
        if status == 200 {
            self.s.metrics.e2e.observe(latency);
        }
        let path = if self.kind == Kind::Completion { "/v1/completions" } else { "/v1/chat/completions" };
        let line = LogLine {
            method: "POST",
            path,
            status,
            tokens: Some((self.prompt_tokens, completion)),
            latency,
            prompt: Some(&self.prompt_text),
        };
        log(self.s.log, line);
    }

    fn usage(&self) -> Value {
        let completion: usize = self.choices.iter().map(|c| c.generated).sum();
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion})
    }

    fn logprobs_json(&mut self, index: usize, lps: &[LpEntry]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Completion => self.choices[index].completion_logprobs(&self.s.tokenizer, lps),
            Kind::Chat => Choice::chat_logprobs(&self.s.tokenizer, lps),
        }
    }

    fn head(&self, object: &str) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("object".into(), json!(object));
        m.insert("created".into(), json!(now_s()));
        m.insert("model".into(), json!(self.s.model_id));
        m
    }

    /// One SSE chunk for choice `index`.
    fn chunk(
        &mut self,
        index: usize,
        text: Option<&str>,
        role: bool,
        lps: &[LpEntry],
        f: Option<FinishReason>,
    ) -> Value {
        let logprobs = self.logprobs_json(index, lps);
        let fr = f.map(|f| f.as_str());
        let (object, choice) = match self.kind {
            Kind::Completion => (
                "text_completion",
                json!({"text": text.unwrap_or(""), "index": index, "logprobs": logprobs, "finish_reason": fr}),
            ),
            Kind::Chat => {
                let mut d = serde_json::Map::new();
                if role {
                    d.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    d.insert("content".into(), json!(t));
                }
                (
                    "chat.completion.chunk",
                    json!({"index": index, "delta": d, "logprobs": logprobs, "finish_reason": fr}),
                )
            }
        };
        let mut m = self.head(object);
        m.insert("choices".into(), json!([choice]));
        if self.include_usage {
            m.insert("usage".into(), Value::Null);
        }
        Value::Object(m)
    }
}

fn failed(e: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("generation failed: {e}"),
        kind: "server_error",
        param: None,
        code: None,
    }
}

impl Drop for Run {
    /// A run dropped before its end: the client went away (nginx's 499).
    fn drop(&mut self) {
        self.finish_log(499);
    }
}

/// The whole response at once.
pub(crate) async fn collect(mut run: Run) -> Response {
    let k = run.choices.len();
    let mut texts = vec![String::new(); k];
    let mut lps: Vec<Vec<LpEntry>> = vec![Vec::new(); k];
    let mut finish = vec![FinishReason::Length; k];
    loop {
        match run.next().await {
            Next::Piece(i, p) => {
                texts[i].push_str(&p.text);
                lps[i].extend(p.lps);
                if let Some(f) = p.finish {
                    finish[i] = f;
                }
            }
            Next::Failed(e) => {
                run.finish_log(500);
                return failed(e).into_response();
            }
            Next::Done => break,
        }
    }
    let mut choices = Vec::with_capacity(k);
    for i in 0..k {
        let logprobs = run.logprobs_json(i, &lps[i]);
        let fr = finish[i].as_str();
        choices.push(match run.kind {
            Kind::Completion => json!({"text": texts[i], "index": i, "logprobs": logprobs, "finish_reason": fr}),
            Kind::Chat => json!({"index": i, "message": {"role": "assistant", "content": texts[i]},
                "logprobs": logprobs, "finish_reason": fr}),
        });
    }
    let mut m = run.head(if run.kind == Kind::Completion { "text_completion" } else { "chat.completion" });
    m.insert("choices".into(), Value::Array(choices));
    m.insert("usage".into(), run.usage());
    run.finish_log(200);
    Json(Value::Object(m)).into_response()
}

/// The response as server-sent events. A task turns job events into chunks; when the client goes away the
/// chunk channel closes, the task ends and drops the job's receiver, which cancels the job.
pub(crate) fn stream(mut run: Run) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        if run.kind == Kind::Chat {
            for i in 0..run.choices.len() {
                let v = run.chunk(i, Some(""), true, &[], None);
                if tx.send(v.to_string()).is_err() {
                    return;
                }
            }
        }
        loop {
            let next = tokio::select! {
                n = run.next() => n,
                // the client went away while tokens were held back: stop at once
                _ = tx.closed() => return,
            };
            let v = match next {
                Next::Piece(i, p) => {
                    let text = if run.kind == Kind::Chat && p.text.is_empty() { None } else { Some(p.text.as_str()) };
                    run.chunk(i, text, false, &p.lps, p.finish)
                }
                Next::Failed(e) => {
                    let v = json!({"error": {"message": format!("generation failed: {e}"), "type": "server_error",
                        "param": null, "code": null}});
                    let _ = tx.send(v.to_string());
                    run.finish_log(500);
                    break;
                }
                Next::Done => {
                    run.finish_log(200);
                    if run.include_usage {
                        let mut m = run.head(if run.kind == Kind::Completion {
                            "text_completion"
                        } else {
                            "chat.completion.chunk"
                        });
                        m.insert("choices".into(), json!([]));
                        m.insert("usage".into(), run.usage());
                        if tx.send(Value::Object(m).to_string()).is_err() {
                            return;
                        }
                    }
                    break;
                }
            };
            if tx.send(v.to_string()).is_err() {
                return;
            }
        }
        let _ = tx.send("[DONE]".into());
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|d| (Ok::<Event, Infallible>(Event::default().data(d)), rx))
    });
    Sse::new(events).into_response()
}
