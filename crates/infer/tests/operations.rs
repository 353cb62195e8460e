//! What operators and browsers see: `/metrics` in Prometheus' text format counting exactly the requests and
//! tokens this test sent (the counts are the test's own; the format is Prometheus' exposition format 0.0.4), and
//! CORS with `--cors-origin` (preflight answered before auth, allowed origin echoed, others get no header).
//! Model: random pythia-14m shape, 2 layers; the real 20B tokenizer.

use data::DollyTokenizer;
use infer::server::{spawn, ServerOptions};
use neox::{Model, NeoxConfig};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use test_support::http::{get, post, Conn};

fn start(opts: ServerOptions) -> infer::server::ServerHandle {
    let mut cfg = NeoxConfig::preset("pythia-14m").unwrap();
    cfg.num_hidden_layers = 2;
    let tok = DollyTokenizer::from_file(&test_support::shared_file("20B_tokenizer.json")).unwrap();
    let opts = ServerOptions { batch_window: Duration::from_millis(1), ..opts };
    spawn("127.0.0.1:0".parse().unwrap(), Arc::new(Model::new_random(cfg, 3)), tok, opts).unwrap()
}

/// The value of an unlabelled or labelled sample line `name` in a metrics page.
fn sample(page: &str, name: &str) -> f64 {
    let line = page.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
    line.unwrap_or_else(|| panic!("no {name} in:\n{page}")).rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn metrics_count_requests_tokens_and_latencies() {
    let srv = start(ServerOptions::default());
    let a = srv.addr;
    let body = json!({"prompt": "one two three", "max_tokens": 5, "temperature": 0, "n": 2});
    for _ in 0..3 {
        assert_eq!(post(a, "/v1/completions", &body).status, 200);
    }
    assert_eq!(post(a, "/v1/completions", &json!({"prompt": ""})).status, 400);
    let r = get(a, "/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
    let page = r.text();
    assert_eq!(sample(&page, "dolly_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"), 3.0);
    assert_eq!(sample(&page, "dolly_requests_total{endpoint=\"/v1/completions\",status=\"400\"}"), 1.0);
    // 3 tokens of prompt per request (counted once for both sequences), 2 x 5 generated
    assert_eq!(sample(&page, "dolly_prompt_tokens_total"), 9.0);
    assert_eq!(sample(&page, "dolly_generation_tokens_total"), 30.0);
    assert_eq!(sample(&page, "dolly_time_to_first_token_seconds_count"), 3.0);
    assert_eq!(sample(&page, "dolly_e2e_request_latency_seconds_count"), 3.0);
    // each sequence's 4 gaps between its 5 tokens
    assert_eq!(sample(&page, "dolly_time_per_output_token_seconds_count"), 24.0);
    assert_eq!(sample(&page, "dolly_time_per_output_token_seconds_bucket{le=\"+Inf\"}"), 24.0);
    assert_eq!(sample(&page, "dolly_queue_depth"), 0.0);
    for l in page.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = l.rsplit_once(' ').unwrap();
        assert!(!name.is_empty() && value.parse::<f64>().is_ok(), "bad sample line {l:?}");
    }
    // unknown paths are counted under one label
    assert_eq!(get(a, "/wp-admin").status, 404);
    assert!(get(a, "/metrics").text().contains("dolly_requests_total{endpoint=\"other\",status=\"404\"} 1"));
    srv.shutdown().unwrap();
}

#[test]
fn cors_answers_preflights_and_tags_allowed_origins_only() {
    let srv = start(ServerOptions {
        cors_origins: vec!["https://app.example".into()],
        api_key: Some("k".into()),
        ..Default::default()
    });
    let a = srv.addr;
    let pre = [("Origin", "https://app.example"), ("Access-Control-Request-Method", "POST")];
    let r = Conn::open_with(a, "OPTIONS", "/v1/completions", &pre, None);
    assert_eq!(r.status, 204, "{}", r.head);
    assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example"));
    assert!(r.header("access-control-allow-headers").unwrap().contains("authorization"));
    let ok = [("Origin", "https://app.example"), ("Authorization", "Bearer k")];
    let r = Conn::open_with(a, "GET", "/v1/models", &ok, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example"));
    // another origin: no CORS headers (the browser blocks it); the key is still required
    let other = [("Origin", "https://evil.example"), ("Access-Control-Request-Method", "POST")];
    let r = Conn::open_with(a, "OPTIONS", "/v1/completions", &other, None);
    assert_eq!(r.status, 401);
    assert!(r.header("access-control-allow-origin").is_none());
    // a bad origin value is refused at start
    let bad = ServerOptions { cors_origins: vec!["app.example".into()], ..Default::default() };
    assert!(bad.validate_flags().unwrap_err().contains("--cors-origin"));
    srv.shutdown().unwrap();
}

/// The chat page at `/`: served from the binary without a key (it asks for one), self-contained (no external
/// script, style or font), and wired to the API it calls. The browser check is tools/chat_page_check.py.
#[test]
fn chat_page_is_served_self_contained() {
    let srv = start(ServerOptions { api_key: Some("k".into()), ..Default::default() });
    let r = get(srv.addr, "/");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.header("content-security-policy").unwrap().contains("connect-src 'self'"));
    let page = r.text();
    for needle in [
        "<textarea id=\"instruction\"",
        "id=\"context\"",
        "/v1/chat/completions",
        "/v1/models",
        "id=\"stop\"",
        "AbortController",
        "Authorization",
    ] {
        assert!(page.contains(needle), "page lacks {needle}");
    }
    assert!(!page.contains("src=\"http") && !page.contains("href=\"http") && !page.contains("@import"));
    // the API behind it still needs the key
    assert_eq!(get(srv.addr, "/v1/models").status, 401);
    srv.shutdown().unwrap();
}
