//! The helpers themselves: the fake hub answers each URL with the status, headers and bytes the hub client relies
//! on (listing, git file, LFS redirect, CDN, each 404 code), logs every request with its Authorization, injects
//! its faults, and stops listening when dropped; the test client decodes Content-Length, chunked and
//! read-to-close bodies as lines and SSE events; `shared_file` names the path it looked for. The one sha256 is the
//! FIPS 180-2 test vector for "abc", not a value computed by the code under test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use test_support::http::{get, send, send_with, Conn};
use test_support::hub::{FakeHub, Faults, Repo, RepoFile, RepoType};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

fn repo(kind: RepoType) -> Repo {
    Repo {
        kind,
        id: "org/name".into(),
        commit: COMMIT.into(),
        files: vec![RepoFile::new("config.json", b"{}".to_vec(), false), RepoFile::new("w.bin", b"abc".to_vec(), true)],
        unfetched: vec!["README.md".into()],
    }
}

fn sock(hub: &FakeHub) -> SocketAddr {
    hub.addr.trim_start_matches("http://").parse().unwrap()
}

fn head(a: SocketAddr, path: &str) -> test_support::http::Resp {
    Conn::open(a, "HEAD", path, None).body()
}

#[test]
fn hub_answers_each_url_like_the_hub_and_logs_every_request() {
    let hub = FakeHub::start(repo(RepoType::Model), Faults::default());
    let a = sock(&hub);
    assert_eq!(RepoFile::new("w.bin", b"abc".to_vec(), true).sha256, ABC_SHA256);

    let l = get(a, "/api/models/org/name/revision/main");
    assert_eq!(l.status, 200);
    let v = l.json();
    assert_eq!((v["id"].as_str(), v["sha"].as_str()), (Some("org/name"), Some(COMMIT)));
    let names: Vec<&str> = v["siblings"].as_array().unwrap().iter().map(|s| s["rfilename"].as_str().unwrap()).collect();
    assert_eq!(names, ["README.md", "config.json", "w.bin"]);

    // a git file: 200 with its size and an opaque 40-hex etag, then its bytes
    let h = head(a, "/org/name/resolve/main/config.json");
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), Some("2"));
    assert_eq!(h.header("x-repo-commit"), Some(COMMIT));
    let etag = h.header("etag").unwrap().trim_matches('"').to_string();
    assert!(etag.len() == 40 && etag.bytes().all(|b| b.is_ascii_hexdigit()), "{etag}");
    assert!(h.body.is_empty());
    assert_eq!(get(a, &format!("/org/name/resolve/{COMMIT}/config.json")).body, b"{}");

    // an LFS file: a redirect to the CDN with the sha256 and size, on HEAD and GET alike
    for method in ["HEAD", "GET"] {
        let r = Conn::open(a, method, "/org/name/resolve/main/w.bin", None).body();
        assert_eq!(r.status, 302, "{method}");
        assert_eq!(r.header("x-linked-etag"), Some(format!("\"{ABC_SHA256}\"").as_str()));
        assert_eq!(r.header("x-linked-size"), Some("3"));
        assert_eq!(r.header("x-repo-commit"), Some(COMMIT));
        assert_eq!(r.header("location"), Some(format!("{}/cdn/{ABC_SHA256}", hub.addr).as_str()));
    }
    let cdn = get(a, &format!("/cdn/{ABC_SHA256}"));
    assert_eq!((cdn.status, cdn.body.as_slice()), (200, &b"abc"[..]));

    let code = |path: &str| {
        let r = head(a, path);
        (r.status, r.header("x-error-code").map(str::to_string))
    };
    assert_eq!(code("/org/name/resolve/main/nope.json"), (404, Some("EntryNotFound".into())));
    assert_eq!(code("/org/name/resolve/v2/config.json"), (404, Some("RevisionNotFound".into())));
    assert_eq!(code("/org/other/resolve/main/config.json"), (404, Some("RepoNotFound".into())));
    assert_eq!(code("/datasets/org/name/resolve/main/config.json"), (404, Some("RepoNotFound".into())));
    assert_eq!(get(a, "/api/models/org/other/revision/main").header("x-error-code"), Some("RepoNotFound"));
    assert_eq!(get(a, "/cdn/00").status, 404);

    // every request logged in order, with its Authorization header
    let n = hub.requests().len();
    assert_eq!(n, 12);
    assert_eq!(hub.requests()[0], ("GET".to_string(), "/api/models/org/name/revision/main".to_string()));
    Conn::open_with(a, "GET", "/api/models/org/name/revision/main", &[("Authorization", "Bearer t0k")], None).body();
    let last = hub.log().pop().unwrap();
    assert_eq!(last.authorization.as_deref(), Some("Bearer t0k"));
    assert_eq!(hub.log()[0].authorization, None);
    assert_eq!(hub.count("HEAD", "/org/name/resolve/"), 4);

    // dropped: nothing listens any more
    drop(hub);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(a).is_ok() {
        assert!(Instant::now() < deadline, "the hub still listens after being dropped");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn faults_fail_heads_then_lie_about_the_etag_and_truncate_bodies() {
    let faults = Faults { fail_heads: 2, truncate: true, wrong_etag: Some("ab".repeat(32)) };
    let hub = FakeHub::start(repo(RepoType::Dataset), faults);
    let a = sock(&hub);
    assert_eq!(get(a, "/api/datasets/org/name/revision/main").status, 200);
    let statuses: Vec<u16> = (0..3).map(|_| head(a, "/datasets/org/name/resolve/main/w.bin").status).collect();
    assert_eq!(statuses, [500, 500, 302]);
    let r = head(a, "/datasets/org/name/resolve/main/w.bin");
    assert_eq!(r.header("x-linked-etag"), Some(format!("\"{}\"", "ab".repeat(32)).as_str()));
    // the CDN still serves by the real sha256, but sends half the bytes under the full Content-Length
    let mut s = send(a, "GET", &format!("/cdn/{ABC_SHA256}"), None);
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200") && raw.contains("Content-Length: 3\r\n"), "{raw}");
    assert!(raw.ends_with("\r\n\r\na"), "{raw:?}");
}

/// `pieces` as a chunked response body (one chunk each), with the terminating chunk.
fn chunked(head: &str, pieces: &[&str]) -> Vec<u8> {
    let mut out = format!("{head}Transfer-Encoding: chunked\r\n\r\n");
    for p in pieces {
        out.push_str(&format!("{:x}\r\n{p}\r\n", p.len()));
    }
    out.push_str("0\r\n\r\n");
    out.into_bytes()
}

/// A one-shot server that answers any request with `response` and closes.
fn one_shot(response: Vec<u8>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let _ = s.write_all(&response);
    });
    a
}

#[test]
fn client_decodes_chunked_sse_and_read_to_close_bodies() {
    // SSE split mid-event across chunks, an event without data, a two-line data event, then [DONE]
    let pieces = ["data: {", "\"a\":1}\n\n", ": comment\n\n", "data: x\nda", "ta: y\n\n", "data: [DONE]\n", "\n"];
    let a = one_shot(chunked("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n", &pieces));
    let mut c = Conn::open(a, "POST", "/v1/x", Some(b"{}"));
    assert_eq!(c.status, 200);
    assert_eq!(c.header("CONTENT-TYPE"), Some("text/event-stream"));
    let events: Vec<String> = std::iter::from_fn(|| c.next_event()).collect();
    assert_eq!(events, ["{\"a\":1}", "x\ny", "[DONE]"]);

    // the same kind of body as lines; the last line has no newline
    let a = one_shot(chunked("HTTP/1.1 200 OK\r\n", &["one\r\n", "two\nth", "ree"]));
    let mut c = Conn::open_with(a, "GET", "/", &[("X-Test", "1")], None);
    let lines: Vec<String> = std::iter::from_fn(|| c.next_line()).collect();
    assert_eq!(lines, ["one", "two", "three"]);

    // no length, no chunking: the body runs to the close
    let a = one_shot(b"HTTP/1.1 404 Not Found\r\n\r\nno such thing".to_vec());
    let r = get(a, "/");
    assert_eq!((r.status, r.text().as_str()), (404, "no such thing"));

    // the request carries the given headers, then the body's length
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    let _s = send_with(a, "POST", "/p", &[("X-A", "b")], Some(b"hello"));
    let (mut srv, _) = l.accept().unwrap();
    srv.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"hello") {
        let n = srv.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let want =
        format!("POST /p HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\nX-A: b\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(String::from_utf8(got).unwrap(), want);
}

#[test]
fn shared_file_finds_the_real_files_and_names_a_missing_one() {
    let tok = test_support::shared_file("20B_tokenizer.json");
    assert!(tok.ends_with("shared/data/20B_tokenizer.json"), "{}", tok.display());
    assert!(test_support::shared_data().join("databricks-dolly-15k.jsonl").is_file());
    let err = std::panic::catch_unwind(|| test_support::shared_file("no-such-file.bin")).unwrap_err();
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("shared/data/no-such-file.bin") && msg.contains("../shared"), "{msg}");
}
