//! The hub client against a real HTTP server on 127.0.0.1 that plays the Hugging Face hub (API listing, HEAD on
//! `resolve/` with a redirect to a CDN path, LFS etag/size headers): download into the hub cache layout, cache
//! reuse, offline mode, fallback when the hub is unreachable, and each failure (truncated body, 404, 500 then
//! success, sha256 mismatch) with its message. Options come from an HF_* variable map, as from the environment.
//! The server answers at most a bounded number of connections and stops when the test drops it.

use data::hub::{Hub, HubOptions, Repo};
use data::{load_dataset, BadRecordPolicy};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const REPO: &str = "databricks/databricks-dolly-15k";
const FILE: &str = "databricks-dolly-15k.jsonl";
const COMMIT: &str = "bdd27f4d94b9c1f951818a7da7fd7aeea5dbff1a";

/// (method, path, Authorization header) of each request.
type Log = Mutex<Vec<(String, String, Option<String>)>>;

#[derive(Default)]
struct Behaviour {
    /// Answer the first N HEADs with HTTP 500.
    fail_heads: usize,
    /// Send only half of every CDN body (Content-Length still says the full size).
    truncate: bool,
    /// Advertise this etag instead of the real sha256.
    wrong_etag: Option<String>,
}

struct FakeHub {
    addr: String,
    body: Arc<Vec<u8>>,
    sha: String,
    log: Arc<Log>,
    stop: Arc<AtomicBool>,
}

impl FakeHub {
    fn start(body: Vec<u8>, behaviour: Behaviour) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let sha: String = Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect();
        let hub = FakeHub {
            addr: addr.clone(),
            body: Arc::new(body),
            sha: sha.clone(),
            log: Arc::default(),
            stop: Arc::default(),
        };
        let (body, log, stop) = (hub.body.clone(), hub.log.clone(), hub.stop.clone());
        let heads = AtomicUsize::new(0);
        std::thread::spawn(move || {
            for conn in listener.incoming().take(200) {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let _ = serve(conn, &addr, &body, &sha, &behaviour, &heads, &log);
            }
        });
        hub
    }

    fn count(&self, method: &str, path_prefix: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|(m, p, _)| m == method && p.starts_with(path_prefix)).count()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr.trim_start_matches("http://"));
    }
}

fn serve(
    conn: TcpStream,
    addr: &str,
    body: &[u8],
    sha: &str,
    b: &Behaviour,
    heads: &AtomicUsize,
    log: &Log,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut auth = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = Some(v.trim().to_string());
            }
        }
    }
    log.lock().unwrap().push((method.clone(), path.clone(), auth));
    let etag = b.wrong_etag.clone().unwrap_or_else(|| sha.to_string());
    let resolve = format!("/datasets/{REPO}/resolve/");
    let (status, headers, payload, send): (u16, Vec<(&str, String)>, Vec<u8>, usize) = if method == "GET"
        && path == format!("/api/datasets/{REPO}/revision/main")
    {
        let j = format!(
            r#"{{"id":"{REPO}","sha":"{COMMIT}","siblings":[{{"rfilename":".gitattributes"}},{{"rfilename":"README.md"}},{{"rfilename":"{FILE}"}}]}}"#
        );
        let n = j.len();
        (200, vec![("Content-Type", "application/json".into())], j.into_bytes(), n)
    } else if method == "HEAD" && path.starts_with(&resolve) && path.ends_with(&format!("/{FILE}")) {
        if heads.fetch_add(1, Ordering::SeqCst) < b.fail_heads {
            (500, vec![], vec![], 0)
        } else {
            let h = vec![
                ("X-Repo-Commit", COMMIT.to_string()),
                ("X-Linked-Etag", format!("\"{etag}\"")),
                ("X-Linked-Size", body.len().to_string()),
                ("ETag", "\"0123456789abcdef0123456789abcdef01234567\"".to_string()),
                ("Location", format!("{addr}/cdn/{sha}")),
            ];
            (302, h, vec![], 0)
        }
    } else if method == "HEAD" && path.starts_with(&resolve) {
        (404, vec![("X-Error-Code", "EntryNotFound".into())], vec![], 0)
    } else if path.starts_with("/api/") || path.starts_with("/datasets/") {
        (404, vec![("X-Error-Code", "RepoNotFound".into())], vec![], 0)
    } else if method == "GET" && path == format!("/cdn/{sha}") {
        let send = if b.truncate { body.len() / 2 } else { body.len() };
        (200, vec![], body.to_vec(), send)
    } else {
        (404, vec![], vec![], 0)
    };
    let mut out = conn;
    let mut head = format!("HTTP/1.1 {status} X\r\nConnection: close\r\nContent-Length: {}\r\n", payload.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if method != "HEAD" {
        out.write_all(&payload[..send])?;
    }
    out.flush()
}

fn options(endpoint: &str, cache: &Path, extra: &[(&str, &str)]) -> HubOptions {
    let mut m: HashMap<String, String> = HashMap::new();
    m.insert("HF_ENDPOINT".into(), endpoint.into());
    m.insert("HF_HUB_CACHE".into(), cache.display().to_string());
    m.insert("HF_HOME".into(), cache.join("home").display().to_string());
    for (k, v) in extra {
        m.insert(k.to_string(), v.to_string());
    }
    let mut o = HubOptions::from_env_fn(|k| m.get(k).cloned());
    o.progress = false;
    o.retry_delay = Duration::from_millis(10);
    o
}

fn small_body() -> Vec<u8> {
    let mut s = String::new();
    for i in 0..50 {
        s.push_str(&format!(
            "{{\"instruction\": \"Q{i}\", \"context\": \"\", \"response\": \"A{i}\", \"category\": \"open_qa\"}}\n"
        ));
    }
    s.into_bytes()
}

fn files_under(p: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            v.push(e.path());
        }
    }
    v
}

#[test]
fn downloads_into_the_hub_cache_layout_then_reuses_it_online_and_offline() {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data").join(FILE);
    let hub = FakeHub::start(std::fs::read(&shared).expect("shared dolly-15k"), Behaviour::default());
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub.addr, cache.path(), &[("HF_TOKEN", "hf_secret_token")]);

    let data = load_dataset(REPO, BadRecordPolicy::Fail, &opts).unwrap();
    assert_eq!(data.records.len(), 15011);
    assert_eq!(data.commit.as_deref(), Some(COMMIT));
    // huggingface_hub's layout: blob named by the LFS sha256, relative symlink from the snapshot, ref -> commit.
    let repo_dir = cache.path().join("datasets--databricks--databricks-dolly-15k");
    let blob = repo_dir.join("blobs").join(&hub.sha);
    assert_eq!(common::sha256_file(&blob).unwrap(), hub.sha);
    let pointer = repo_dir.join("snapshots").join(COMMIT).join(FILE);
    assert_eq!(std::fs::read_link(&pointer).unwrap(), PathBuf::from("../../blobs").join(&hub.sha));
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), COMMIT);
    assert_eq!(files_under(&repo_dir.join("blobs")).len(), 1, "no temporary files left");
    assert_eq!(hub.count("GET", "/cdn/"), 1);
    // The token goes to the hub with every request.
    assert!(hub
        .log
        .lock()
        .unwrap()
        .iter()
        .all(|(_, p, a)| p.starts_with("/cdn/") || a.as_deref() == Some("Bearer hf_secret_token")));

    // Online again: metadata is checked, the blob is reused.
    let again = Hub::new(opts.clone()).download_file(&Repo::dataset(REPO, "main"), FILE).unwrap();
    assert_eq!(again, pointer);
    assert_eq!(hub.count("GET", "/cdn/"), 1);

    // Offline: no request at all.
    let before = hub.log.lock().unwrap().len();
    let offline = options(&hub.addr, cache.path(), &[("HF_HUB_OFFLINE", "1")]);
    assert!(offline.offline);
    assert_eq!(load_dataset(REPO, BadRecordPolicy::Fail, &offline).unwrap().records.len(), 15011);
    assert_eq!(hub.log.lock().unwrap().len(), before);

    // Offline with an empty cache: a clear error.
    let empty = tempfile::tempdir().unwrap();
    let err = load_dataset(REPO, BadRecordPolicy::Fail, &options(&hub.addr, empty.path(), &[("HF_HUB_OFFLINE", "1")]))
        .unwrap_err();
    assert!(err.message.contains("HF_HUB_OFFLINE") && err.message.contains("dolly cache-dataset"), "{err}");

    // Hub unreachable (closed port): falls back to the cache.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut gone = options(&format!("http://{closed}"), cache.path(), &[]);
    gone.retries = 0;
    assert_eq!(load_dataset(REPO, BadRecordPolicy::Fail, &gone).unwrap().records.len(), 15011);
}

#[test]
fn truncated_body_is_an_error_and_leaves_nothing_behind() {
    let hub = FakeHub::start(small_body(), Behaviour { truncate: true, ..Default::default() });
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(&hub.addr, cache.path(), &[]);
    opts.retries = 1;
    let err = Hub::new(opts).download_file(&Repo::dataset(REPO, "main"), FILE).unwrap_err();
    assert!(err.message.contains("truncated") && err.message.contains("gave up after 2 tries"), "{err}");
    assert_eq!(hub.count("GET", "/cdn/"), 2);
    let blobs = cache.path().join("datasets--databricks--databricks-dolly-15k/blobs");
    assert!(files_under(&blobs).is_empty(), "{:?}", files_under(&blobs));
}

#[test]
fn not_found_names_what_is_missing_without_leaking_the_token() {
    let hub = FakeHub::start(small_body(), Behaviour::default());
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub.addr, cache.path(), &[("HF_TOKEN", "hf_secret_token")]);
    let err = load_dataset("nobody/missing", BadRecordPolicy::Fail, &opts).unwrap_err();
    assert!(err.message.contains("HTTP 404") && err.message.contains("\"nobody/missing\" not found"), "{err}");
    let err = Hub::new(opts).download_file(&Repo::dataset(REPO, "main"), "nope.jsonl").unwrap_err();
    assert!(err.message.contains("HTTP 404") && err.message.contains("file not found"), "{err}");
    assert!(!err.message.contains("hf_secret_token"));
}

#[test]
fn server_errors_are_retried_then_succeed_or_give_up() {
    let hub = FakeHub::start(small_body(), Behaviour { fail_heads: 2, ..Default::default() });
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub.addr, cache.path(), &[]);
    let data = load_dataset(REPO, BadRecordPolicy::Fail, &opts).unwrap();
    assert_eq!(data.records.len(), 50);
    assert_eq!(hub.count("HEAD", "/datasets/"), 3);

    let hub = FakeHub::start(small_body(), Behaviour { fail_heads: 100, ..Default::default() });
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(&hub.addr, cache.path(), &[]);
    opts.retries = 2;
    let err = Hub::new(opts).download_file(&Repo::dataset(REPO, "main"), FILE).unwrap_err();
    assert!(err.message.contains("HTTP 500") && err.message.contains("gave up after 3 tries"), "{err}");
}

#[test]
fn sha256_mismatch_is_rejected() {
    let wrong = "ab".repeat(32);
    let hub = FakeHub::start(small_body(), Behaviour { wrong_etag: Some(wrong.clone()), ..Default::default() });
    let cache = tempfile::tempdir().unwrap();
    let err =
        Hub::new(options(&hub.addr, cache.path(), &[])).download_file(&Repo::dataset(REPO, "main"), FILE).unwrap_err();
    assert!(err.message.contains("sha256 mismatch") && err.message.contains(&wrong), "{err}");
    let blobs = cache.path().join("datasets--databricks--databricks-dolly-15k/blobs");
    assert!(files_under(&blobs).is_empty());
}
