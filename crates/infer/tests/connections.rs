//! The server's connection handling on a loopback port: a socket that sends nothing, or half a header, is closed
//! after the header timeout; a kept-alive socket is closed after the idle timeout, but a streamed response that
//! runs longer than both is not cut; a connection over the cap gets a 503 JSON error at once without sending a
//! byte, and /health is answered again once the idle sockets time out although the client still holds them all;
//! a `Content-Length` over the body limit gets 413 before any body byte is sent. Model: random pythia-14m shape,
//! 2 layers; the real 20B tokenizer. Timeouts are short (hundreds of ms); the asserts only wait with generous
//! deadlines (a read timeout fails the test when the server never closes or never answers).

use data::DollyTokenizer;
use infer::server::{spawn, ServerHandle, ServerOptions};
use neox::{Model, NeoxConfig};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use test_support::http::{get, Conn};

fn model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    M.get_or_init(|| {
        let mut cfg = NeoxConfig::preset("pythia-14m").unwrap();
        cfg.num_hidden_layers = 2;
        Arc::new(Model::new_random(cfg, 7))
    })
    .clone()
}

fn start(opts: ServerOptions) -> ServerHandle {
    let tok = DollyTokenizer::from_file(&test_support::shared_file("20B_tokenizer.json"))
        .expect("shared/data/20B_tokenizer.json");
    let opts = ServerOptions { model_id: "dolly-test".into(), batch_window: Duration::from_millis(1), ..opts };
    spawn("127.0.0.1:0".parse().unwrap(), model(), tok, opts).unwrap()
}

fn connect(a: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(a).unwrap();
    // a server that never closes fails the test here instead of hanging it
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Read until the server closes; panics on the read timeout. Returns what was received.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
}

#[test]
fn silent_partial_and_idle_connections_are_closed_but_running_streams_are_not() {
    let srv = start(ServerOptions {
        header_timeout: Duration::from_millis(400),
        idle_timeout: Duration::from_millis(600),
        ..Default::default()
    });
    let a = srv.addr;
    // nothing sent
    let t0 = Instant::now();
    let mut silent = connect(a);
    assert!(read_to_close(&mut silent).is_empty());
    assert!(t0.elapsed() >= Duration::from_millis(400), "closed before the header timeout");
    // half a header
    let mut partial = connect(a);
    partial.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le").unwrap();
    assert!(read_to_close(&mut partial).is_empty());
    // a kept-alive connection: answered, then closed when idle
    let mut ka = connect(a);
    ka.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let got = String::from_utf8(read_to_close(&mut ka)).unwrap();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("\"status\":\"ok\""), "{got}");
    // a stream with pauses longer than both timeouts between the client's reads still runs to [DONE]
    let body = r#"{"prompt": "Count.", "max_tokens": 40, "temperature": 0, "stream": true}"#;
    let mut c = Conn::open(a, "POST", "/v1/completions", Some(body.as_bytes()));
    assert_eq!(c.status, 200);
    assert!(c.next_event().is_some());
    std::thread::sleep(Duration::from_millis(1500));
    let mut done = false;
    while let Some(d) = c.next_event() {
        if d == "[DONE]" {
            done = true;
            break;
        }
    }
    assert!(done, "the stream was cut");
    srv.shutdown().unwrap();
}

#[test]
fn connections_over_the_cap_get_503_and_health_comes_back_after_idle_sockets() {
    let cap = 8;
    let srv = start(ServerOptions {
        max_connections: cap,
        header_timeout: Duration::from_millis(1500),
        ..Default::default()
    });
    let a = srv.addr;
    let mut idle: Vec<TcpStream> = (0..cap).map(|_| connect(a)).collect();
    // wait until the server has accepted them all: one more connection is refused
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let mut s = connect(a);
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut buf = Vec::new();
        let r = s.read_to_end(&mut buf);
        if r.is_ok() && !buf.is_empty() {
            break String::from_utf8(buf).unwrap();
        }
        assert!(Instant::now() < deadline, "no 503 while {cap} idle connections are open");
        idle.push(s);
    };
    // answered without sending a byte: the request was not read
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    let body = &refused[refused.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["code"], "too_many_connections");
    assert!(v["error"]["message"].as_str().unwrap().contains("too many open connections"));
    // many more idle sockets: each is refused or closed, none is left hanging
    for _ in 0..150 {
        let mut s = connect(a);
        let got = read_to_close(&mut s);
        assert!(got.is_empty() || got.starts_with(b"HTTP/1.1 503"));
        idle.push(s);
    }
    // the first idle ones time out (the client still holds them): /health is answered again
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut s = connect(a);
        // refused (503), or closed unanswered while the server is busy refusing others
        let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let got = String::from_utf8(read_to_close(&mut s)).unwrap();
        if got.starts_with("HTTP/1.1 200") {
            assert!(got.contains("\"status\":\"ok\""), "{got}");
            break;
        }
        assert!(got.is_empty() || got.starts_with("HTTP/1.1 503"), "{got}");
        assert!(Instant::now() < deadline, "/health never came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(idle);
    srv.shutdown().unwrap();
}

#[test]
fn oversize_content_length_gets_413_before_the_body() {
    let srv = start(ServerOptions { body_limit: 64 * 1024, ..Default::default() });
    let a = srv.addr;
    let mut s = connect(a);
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    )
    .unwrap();
    let got = String::from_utf8(read_to_close(&mut s)).unwrap();
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    let body = &got[got.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
    assert!(v["error"]["message"].as_str().unwrap().contains("65536"), "{v}");
    // a body within the limit still works on a new connection
    assert_eq!(get(a, "/health").status, 200);
    srv.shutdown().unwrap();
}

#[test]
fn shutdown_closes_connections_without_a_request_at_once() {
    // a header timeout far beyond the read timeout: only the shutdown can close these in time
    let srv = start(ServerOptions { header_timeout: Duration::from_secs(600), ..Default::default() });
    let a = srv.addr;
    let mut silent = connect(a);
    let mut partial = connect(a);
    partial.write_all(b"GET /health HTTP/1.1\r\nHo").unwrap();
    // both accepted before the shutdown starts
    assert_eq!(get(a, "/health").status, 200);
    let stopper = std::thread::spawn(move || srv.shutdown());
    assert!(read_to_close(&mut silent).is_empty());
    assert!(read_to_close(&mut partial).is_empty());
    stopper.join().unwrap().unwrap();
    assert!(TcpStream::connect(a).is_err());
}
