//! The real server on a loopback port (127.0.0.1:0), driven over HTTP/1.1 with a std-only client: completions,
//! chat, SSE streaming equal to non-streaming under greedy, /v1/models and /health, an invalid-request matrix (each
//! a 4xx with an OpenAI-style JSON error, server healthy after), an overload burst over the queue bound (exact
//! number of 429s, every accepted request answered), client-disconnect cancellation (streaming and not), and
//! graceful shutdown draining an in-flight request. Model: random pythia-14m shape, 2 layers; the real 20B
//! tokenizer. No timing assertions: waits are polls with a generous deadline.

use data::DollyTokenizer;
use infer::server::{spawn, ServerHandle, ServerOptions};
use neox::{Model, NeoxConfig};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use test_support::http::{get, post, wait_health, Conn};

fn model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    M.get_or_init(|| {
        let mut cfg = NeoxConfig::preset("pythia-14m").unwrap();
        cfg.num_hidden_layers = 2;
        // a long window, so that a request holding a row cannot finish during a test
        cfg.max_position_embeddings = 8192;
        Arc::new(Model::new_random(cfg, 7))
    })
    .clone()
}

fn tokenizer() -> DollyTokenizer {
    DollyTokenizer::from_file(&test_support::shared_file("20B_tokenizer.json")).expect("shared/data/20B_tokenizer.json")
}

fn start(max_batch: usize, queue_size: usize) -> ServerHandle {
    let opts = ServerOptions {
        model_id: "dolly-test".into(),
        max_batch,
        queue_size,
        body_limit: 64 * 1024,
        batch_window: Duration::from_millis(1),
        ..Default::default()
    };
    spawn("127.0.0.1:0".parse().unwrap(), model(), tokenizer(), opts).unwrap()
}

fn sse_all(addr: SocketAddr, path: &str, body: &Value) -> (Vec<Value>, bool) {
    let mut c = Conn::open(addr, "POST", path, Some(body.to_string().as_bytes()));
    assert_eq!(c.status, 200, "{}", c.head);
    assert!(c.head.to_ascii_lowercase().contains("text/event-stream"));
    let mut events = Vec::new();
    let mut done = false;
    while let Some(d) = c.next_event() {
        if d == "[DONE]" {
            done = true;
            break;
        }
        events.push(serde_json::from_str(&d).unwrap());
    }
    (events, done)
}

#[test]
fn completions_chat_and_streaming_agree() {
    let srv = start(4, 8);
    let a = srv.addr;
    let h = get(a, "/health");
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    let m = get(a, "/v1/models").json();
    assert_eq!(m["data"][0]["id"], "dolly-test");

    let req = json!({"model": "dolly-test", "prompt": "Name three colors.", "max_tokens": 24, "temperature": 0});
    let r = post(a, "/v1/completions", &req);
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let fr = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(fr == "stop" || fr == "length");
    let usage = &v["usage"];
    // completions take the prompt as raw text (no template)
    assert_eq!(usage["prompt_tokens"], tokenizer().encode("Name three colors.").unwrap().len());
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    // greedy is deterministic
    assert_eq!(post(a, "/v1/completions", &req).json()["choices"][0]["text"], text.as_str());
    // streaming: deltas concatenate to the same text, last chunk has the finish reason, then [DONE]
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (events, done) = sse_all(a, "/v1/completions", &sreq);
    assert!(done);
    let streamed: String = events.iter().map(|e| e["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(streamed, text);
    assert_eq!(events.last().unwrap()["choices"][0]["finish_reason"], fr);

    // chat: system + earlier turns become context; the last user message is the instruction
    let creq = json!({"model": "dolly-test", "max_tokens": 16, "temperature": 0, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"}]});
    let c = post(a, "/v1/chat/completions", &creq);
    assert_eq!(c.status, 200);
    let cv = c.json();
    assert_eq!(cv["object"], "chat.completion");
    assert_eq!(cv["choices"][0]["message"]["role"], "assistant");
    let ctext = cv["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let mut screq = creq.clone();
    screq["stream"] = json!(true);
    let (events, done) = sse_all(a, "/v1/chat/completions", &screq);
    assert!(done);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(events.iter().all(|e| e["object"] == "chat.completion.chunk"));
    let streamed: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, ctext);
    assert!(events.last().unwrap()["choices"][0]["finish_reason"].is_string());

    // the chat prompt is exactly Dolly's template with the context folded in (same greedy ids as completions
    // with that raw prompt)
    let prompt = data::generation_prompt("What is 2+2?", Some("You are terse.\n\nUser: Hi\n\nAssistant: Hello."));
    let raw = json!({"prompt": prompt, "raw_prompt": true, "max_tokens": 16, "temperature": 0});
    let rv = post(a, "/v1/completions", &raw).json();
    assert_eq!(rv["choices"][0]["text"].as_str().unwrap().trim(), ctext);
    assert_eq!(rv["usage"], cv["usage"]);

    // sampled requests with a seed reproduce (one at a time: in a batch of another size the logits differ by
    // rounding, which can change a draw on a near-uniform random model)
    let seeded = json!({"prompt": "Tell me a story.", "max_tokens": 12, "seed": 5, "temperature": 1.0});
    let t1 = post(a, "/v1/completions", &seeded).json()["choices"][0]["text"].clone();
    assert_eq!(post(a, "/v1/completions", &seeded).json()["choices"][0]["text"], t1);
    // concurrent sampled requests are all answered
    let hs: Vec<_> = (0..6)
        .map(|i| {
            let s = json!({"prompt": format!("Story {i}"), "max_tokens": 12 + i});
            std::thread::spawn(move || post(a, "/v1/completions", &s))
        })
        .collect();
    for h in hs {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200);
        assert!(r.json()["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    }
    srv.shutdown().unwrap();
}

#[test]
fn invalid_requests_get_openai_errors_and_server_stays_healthy() {
    let srv = start(2, 4);
    let a = srv.addr;
    let long = "word ".repeat(8200);
    let cases: Vec<(&str, Value, u16)> = vec![
        ("/v1/completions", json!({"model": "nope", "prompt": "x"}), 404),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 0}), 400),
        ("/v1/completions", json!({"prompt": "x", "echo": true, "max_tokens": -1}), 400),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 100000}), 400),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": "ten"}), 400),
        ("/v1/completions", json!({"prompt": "x", "temperature": 2.5}), 400),
        ("/v1/completions", json!({"prompt": "x", "temperature": -0.1}), 400),
        ("/v1/completions", json!({"prompt": "x", "top_p": 0}), 400),
        ("/v1/completions", json!({"prompt": "x", "top_p": 1.5}), 400),
        ("/v1/completions", json!({"prompt": "x", "top_k": -1}), 400),
        ("/v1/completions", json!({"prompt": "x", "n": 0}), 400),
        ("/v1/completions", json!({"prompt": "x", "n": 3}), 400),
        ("/v1/completions", json!({"prompt": "x", "stop": [""]}), 400),
        ("/v1/completions", json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), 400),
        ("/v1/completions", json!({"prompt": "x", "stop": 5}), 400),
        ("/v1/completions", json!({"prompt": "x", "logprobs": 21}), 400),
        ("/v1/completions", json!({"prompt": "x", "logprobs": true}), 400),
        ("/v1/completions", json!({"prompt": "x", "echo": "yes"}), 400),
        ("/v1/completions", json!({"prompt": "x", "best_of": 3}), 400),
        ("/v1/completions", json!({"prompt": "x", "suffix": "y"}), 400),
        ("/v1/completions", json!({"prompt": "x", "response_format": {"type": "json_object"}}), 400),
        ("/v1/completions", json!({"prompt": "x", "stream_options": {"include_usage": true}}), 400),
        ("/v1/completions", json!({"prompt": "x", "stream": true, "stream_options": {"x": 1}}), 400),
        ("/v1/completions", json!({"prompt": "x", "presence_penalty": 2.5}), 400),
        ("/v1/completions", json!({"prompt": "x", "frequency_penalty": -3}), 400),
        ("/v1/completions", json!({"prompt": "x", "repetition_penalty": 0}), 400),
        ("/v1/completions", json!({"prompt": "x", "logit_bias": {"abc": 1}}), 400),
        ("/v1/completions", json!({"prompt": "x", "logit_bias": {"99999999": 1}}), 400),
        ("/v1/completions", json!({"prompt": "x", "logit_bias": {"5": 101}}), 400),
        ("/v1/completions", json!({"prompt": "x", "min_tokens": 300}), 400),
        ("/v1/completions", json!({"prompt": "x", "frobnicate": 1}), 400),
        ("/v1/completions", json!({"prompt": "x", "stream": "yes"}), 400),
        ("/v1/completions", json!({"max_tokens": 5}), 400),
        ("/v1/completions", json!({"prompt": ""}), 400),
        ("/v1/completions", json!({"prompt": [1, 2, 99999999]}), 400),
        ("/v1/completions", json!({"prompt": [[1], "x"]}), 400),
        ("/v1/completions", json!({"prompt": [[]]}), 400),
        ("/v1/completions", json!({"prompt": []}), 400),
        ("/v1/completions", json!({"prompt": long, "max_tokens": 10}), 400),
        ("/v1/completions", json!({"prompt": "x y", "max_tokens": 8191}), 400),
        ("/v1/completions", json!([1, 2]), 400),
        ("/v1/chat/completions", json!({"messages": []}), 400),
        ("/v1/chat/completions", json!({"messages": "hi"}), 400),
        ("/v1/chat/completions", json!({"messages": [{"role": "assistant", "content": "x"}]}), 400),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": ""}]}), 400),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "wizard", "content": "a"}, {"role": "user", "content": "b"}]}),
            400,
        ),
        ("/v1/chat/completions", json!({"messages": [{"content": "x"}]}), 400),
        ("/v1/chat/completions", json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}), 404),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), 400),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
            400,
        ),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "echo": true}), 400),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
            400,
        ),
    ];
    for (path, body, status) in &cases {
        let r = post(a, path, body);
        assert_eq!(r.status, *status, "{path} {body}: {}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(v["error"]["type"].is_string());
    }
    // context-length errors say so
    let r = post(a, "/v1/completions", &json!({"prompt": long, "max_tokens": 10})).json();
    assert_eq!(r["error"]["code"], "context_length_exceeded");
    // not JSON, body too large, unknown endpoint
    let r = Conn::open(a, "POST", "/v1/completions", Some(b"{not json")).body();
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("JSON"));
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(100 * 1024));
    let r = Conn::open(a, "POST", "/v1/completions", Some(big.as_bytes())).body();
    assert_eq!(r.status, 413);
    assert!(r.json()["error"]["message"].is_string());
    let r = get(a, "/v1/nothing");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_object());
    // still healthy and serving
    let h = get(a, "/health").json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["failed"], 0);
    let ok = post(a, "/v1/completions", &json!({"prompt": "x", "max_tokens": 3, "temperature": 0}));
    assert_eq!(ok.status, 200);
    srv.shutdown().unwrap();
}

/// Streaming request holding the only batch row until the client goes away: a long budget, greedy.
fn hold_row(a: SocketAddr) -> Conn {
    let body = json!({"prompt": "Write a very long essay.", "max_tokens": 8000, "temperature": 0, "stream": true});
    let mut c = Conn::open(a, "POST", "/v1/completions", Some(body.to_string().as_bytes()));
    assert_eq!(c.status, 200);
    // first token streamed: the request owns the row
    let first = c.next_event().expect("a first event");
    assert!(!first.contains("finish_reason\":\"stop"), "holder stopped at once: {first}");
    c
}

#[test]
fn overload_burst_gets_exact_429s_and_disconnect_cancels() {
    // 1 row, queue of 2: holder runs, 2 wait, the next 3 are refused
    let srv = start(1, 2);
    let a = srv.addr;
    let holder = hold_row(a);
    wait_health(a, "holder running", |h| h["running"] == 1);
    let queued: Vec<_> = (0..2)
        .map(|i| {
            let body = json!({"prompt": format!("question {i}"), "max_tokens": 4, "temperature": 0});
            std::thread::spawn(move || post(a, "/v1/completions", &body))
        })
        .collect();
    wait_health(a, "two queued", |h| h["queued"] == 2);
    let mut statuses = Vec::new();
    let burst: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || post(a, "/v1/completions", &json!({"prompt": "x", "max_tokens": 2}))))
        .collect();
    for b in burst {
        let r = b.join().unwrap();
        if r.status == 429 {
            assert_eq!(r.json()["error"]["code"], "queue_full");
        }
        statuses.push(r.status);
    }
    assert_eq!(statuses, vec![429, 429, 429]);
    // the holder disconnects: its job is cancelled and the queued ones run
    holder.close();
    for q in queued {
        let r = q.join().unwrap();
        assert_eq!(r.status, 200);
        assert!(r.json()["choices"][0]["text"].is_string());
    }
    // the scheduler counts a job completed just after sending its last token: poll for both counts
    let h = wait_health(a, "holder cancelled, queued completed", |h| h["cancelled"] == 1 && h["completed"] == 2);
    assert_eq!(h["rejected"], 3);

    // a non-streaming client that goes away is cancelled too
    let body = json!({"prompt": "Another long essay.", "max_tokens": 8000, "temperature": 0});
    let s = test_support::http::send(a, "POST", "/v1/completions", Some(body.to_string().as_bytes()));
    wait_health(a, "non-streaming running", |h| h["running"] == 1);
    let _ = s.shutdown(std::net::Shutdown::Both);
    drop(s);
    wait_health(a, "non-streaming cancelled", |h| h["cancelled"] == 2 && h["running"] == 0);
    assert_eq!(post(a, "/v1/completions", &json!({"prompt": "x", "max_tokens": 2})).status, 200);
    srv.shutdown().unwrap();
}

#[test]
fn graceful_shutdown_drains_in_flight_requests() {
    let srv = start(2, 4);
    let a = srv.addr;
    let body = json!({"prompt": "Count.", "max_tokens": 64, "temperature": 0, "stream": true});
    let mut c = Conn::open(a, "POST", "/v1/completions", Some(body.to_string().as_bytes()));
    assert_eq!(c.status, 200);
    assert!(c.next_event().is_some());
    // shut down while the stream is running: it still completes
    let stopper = std::thread::spawn(move || srv.shutdown());
    let mut n = 1;
    let mut done = false;
    while let Some(d) = c.next_event() {
        if d == "[DONE]" {
            done = true;
            break;
        }
        n += 1;
    }
    assert!(done, "stream ended without [DONE] after {n} events");
    stopper.join().unwrap().unwrap();
    // nothing listens any more
    assert!(std::net::TcpStream::connect(a).is_err());
}

#[test]
fn per_field_errors_name_the_field() {
    let srv = start(2, 4);
    let a = srv.addr;
    let long = "word ".repeat(8200);
    let user = |c: Value| json!({"messages": [{"role": "user", "content": c}]});
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("/v1/chat/completions", user(Value::Null), "messages[0].content", "`messages[0].content` must be a string"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "a"}, {"role": "user"}]}),
            "messages[1].content",
            "`messages[1].content` is required",
        ),
        ("/v1/chat/completions", user(json!(5)), "messages[0].content", "`messages[0].content` must be a string"),
        (
            "/v1/chat/completions",
            user(json!([{"type": "image_url", "image_url": {"url": "x"}}])),
            "messages[0].content",
            "`messages[0].content[0]`",
        ),
        ("/v1/chat/completions", user(json!("")), "messages[0].content", "`messages[0].content`: the last user"),
        ("/v1/chat/completions", json!({"messages": [{"content": "x"}]}), "messages[0].role", "`messages[0].role`"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "a"}, {"role": 3, "content": "b"}]}),
            "messages[1].role",
            "`messages[1].role` must be a string",
        ),
        ("/v1/chat/completions", json!({"messages": ["hi"]}), "messages[0]", "`messages[0]` must be an object"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "wizard", "content": "a"}, {"role": "user", "content": "b"}]}),
            "messages",
            "`messages[0].role`: unsupported message role `wizard`",
        ),
        ("/v1/chat/completions", json!({"model": "dolly-test"}), "messages", "`messages` is required"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
            "messages",
            "`messages[1].role`: the last message must have role `user`, got `assistant`",
        ),
        ("/v1/completions", json!({"prompt": long, "max_tokens": 10}), "prompt", "maximum context length"),
        (
            "/v1/completions",
            json!({"prompt": "x", "raw_prompt": "yes"}),
            "raw_prompt",
            "`raw_prompt` must be a boolean",
        ),
        ("/v1/completions", json!({"prompt": "x", "n": 3}), "n", "`n` must be between 1 and 2"),
        ("/v1/completions", json!({"prompt": "x", "color": 3}), "color", "unknown field `color`"),
        ("/v1/completions", json!({"prompt": ["a", ""]}), "prompt", "`prompt[1]` is empty"),
        ("/v1/completions", json!({"prompt": [[5], [7, 99999999]]}), "prompt", "`prompt[1]`: 99999999"),
        ("/v1/completions", json!({"prompt": "x", "logit_bias": {"7": "a"}}), "logit_bias", "`logit_bias[7]`"),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 0}), "max_tokens", "0 only with `echo`"),
    ];
    for (path, body, param, msg) in &cases {
        let r = post(a, path, body);
        assert_eq!(r.status, 400, "{path} {body}");
        let e = &r.json()["error"];
        assert_eq!(e["param"], *param, "{body}: {e}");
        assert!(e["message"].as_str().unwrap().contains(msg), "{body}: {e}");
    }
    srv.shutdown().unwrap();
}

/// `/tokenize` and `/detokenize` in llama-server's and vLLM's shapes: the ids are the tokenizer's (the same
/// encoding `dolly` trains on; Dolly's `### End` is one id, 50277-50279 range), a round trip gives the text back,
/// pieces decode to their ids, and bad fields are 400s naming the field. Reference: `DollyTokenizer` itself (the
/// HF tokenizer file), which the server must not re-implement.
#[test]
fn tokenize_and_detokenize_round_trip() {
    let srv = start(2, 4);
    let a = srv.addr;
    let tok = tokenizer();
    let text = "Name three colors.\n\n### End";
    let want = tok.encode(text).unwrap();
    assert!(want.contains(&tok.special().end), "the special token is matched: {want:?}");
    for key in ["content", "prompt"] {
        let r = post(a, "/tokenize", &json!({key: text, "add_special": false}));
        assert_eq!(r.status, 200, "{key}");
        let v = r.json();
        let ids: Vec<u32> = v["tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want, "{key}");
        assert_eq!(v["count"], want.len());
        assert!(v["max_model_len"].as_u64().unwrap() > 0);
    }
    let p = post(a, "/tokenize", &json!({"content": "hello world", "with_pieces": true})).json();
    let pieces = p["tokens"].as_array().unwrap();
    let ids = tok.encode("hello world").unwrap();
    assert_eq!(pieces.len(), ids.len());
    for (pc, &id) in pieces.iter().zip(&ids) {
        assert_eq!(pc["id"], id);
        assert_eq!(pc["piece"], tok.decode_raw(&[id], false).unwrap());
    }
    let d = post(a, "/detokenize", &json!({"tokens": want}));
    assert_eq!(d.status, 200);
    let v = d.json();
    assert_eq!(v["content"], tok.decode(&want).unwrap());
    assert_eq!(v["content"], text);
    assert_eq!(v["prompt"], text);
    let vocab = tok.vocab_size();
    for (path, body, param) in [
        ("/tokenize", json!({"content": 5}), "content"),
        ("/tokenize", json!({}), "content"),
        ("/tokenize", json!({"content": "a", "prompt": "b"}), "prompt"),
        ("/tokenize", json!({"content": "a", "bogus": 1}), "bogus"),
        ("/tokenize", json!({"content": "a", "with_pieces": "yes"}), "with_pieces"),
        ("/detokenize", json!({"tokens": [1, -2]}), "tokens"),
        ("/detokenize", json!({"tokens": [vocab]}), "tokens"),
        ("/detokenize", json!({"tokens": "12"}), "tokens"),
        ("/detokenize", json!({}), "tokens"),
    ] {
        let r = post(a, path, &body);
        assert_eq!(r.status, 400, "{path} {body}");
        assert_eq!(r.json()["error"]["param"], param, "{path} {body}");
    }
    assert_eq!(get(a, "/health").json()["status"], "ok");
}

/// `--api-key`: every endpoint but /health answers 401 (OpenAI's `invalid_api_key`) without the bearer key or
/// with a wrong one, and works with it; /health needs no key. Reference: OpenAI's documented error shape.
#[test]
fn api_key_guards_every_endpoint_but_health() {
    let opts = ServerOptions {
        model_id: "dolly-test".into(),
        max_batch: 2,
        queue_size: 4,
        body_limit: 64 * 1024,
        batch_window: Duration::from_millis(1),
        api_key: Some("sk-test-key".into()),
        ..Default::default()
    };
    let srv = spawn("127.0.0.1:0".parse().unwrap(), model(), tokenizer(), opts).unwrap();
    let a = srv.addr;
    assert_eq!(get(a, "/health").status, 200);
    let body = json!({"content": "hi"}).to_string();
    for (auth, want) in
        [(None, 401), (Some("Bearer wrong"), 401), (Some("sk-test-key"), 401), (Some("Bearer sk-test-key"), 200)]
    {
        let headers: Vec<(&str, &str)> = auth.map(|v| ("Authorization", v)).into_iter().collect();
        let models = Conn::open_with(a, "GET", "/v1/models", &headers, None).body();
        assert_eq!(models.status, want, "{auth:?}");
        let tok = Conn::open_with(a, "POST", "/tokenize", &headers, Some(body.as_bytes())).body();
        assert_eq!(tok.status, want, "{auth:?}");
        if want == 401 {
            assert_eq!(models.json()["error"]["code"], "invalid_api_key", "{auth:?}");
        }
    }
    let bad = ServerOptions { api_key: Some("has space".into()), ..Default::default() };
    assert!(bad.validate_flags().unwrap_err().contains("--api-key"));
}
