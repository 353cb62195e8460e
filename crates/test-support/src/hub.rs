//! A fake Hugging Face hub: a plain HTTP server on 127.0.0.1 (one thread, one request per connection, answered
//! with `Connection: close`) serving one repo the way huggingface.co does:
//! - `GET /api/{models|datasets}/REPO/revision/{main|COMMIT}`: the listing (`id`, `sha` = the commit, `siblings`);
//! - `HEAD {|/datasets}/REPO/resolve/{main|COMMIT}/FILE`: a git file answers 200 + `ETag` + `Content-Length`;
//!   an LFS file a 302 to `/cdn/SHA256` + `X-Linked-Etag` (the sha256) + `X-Linked-Size`; both carry
//!   `X-Repo-Commit`;
//! - `GET` on the same URL: a git file's bytes; an LFS file the same 302 as its HEAD;
//! - `GET /cdn/SHA256`: an LFS file's bytes;
//! - a 404 with the hub's `X-Error-Code` otherwise: `EntryNotFound` (no such file), `RevisionNotFound` (another
//!   revision), `RepoNotFound` (anything else); a 404 without a code for an unknown CDN path.
//!
//! Every request is logged (method, path, `Authorization`) before it is answered. [`Faults`] inject failures.
//! The server answers at most [`MAX_CONNECTIONS`] connections, then closes its socket; it stops when the
//! [`FakeHub`] is dropped.

use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Connections one hub answers before it stops listening (a bound, so a stray client loop cannot spin forever).
pub const MAX_CONNECTIONS: usize = 200;

/// Which URL space the repo lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoType {
    /// `/api/models/REPO/...`, `/REPO/resolve/...`
    Model,
    /// `/api/datasets/REPO/...`, `/datasets/REPO/resolve/...`
    Dataset,
}

/// One file of the served repo.
#[derive(Clone, Debug)]
pub struct RepoFile {
    /// The path inside the repo (`config.json`, `data/train.jsonl`).
    pub name: String,
    pub body: Vec<u8>,
    /// Stored in git LFS: HEAD redirects to the CDN and advertises the sha256.
    pub lfs: bool,
    /// Hex sha256 of `body`.
    pub sha256: String,
}

impl RepoFile {
    pub fn new(name: impl Into<String>, body: Vec<u8>, lfs: bool) -> RepoFile {
        let sha256 = Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect();
        RepoFile { name: name.into(), body, lfs, sha256 }
    }

    /// The file at `path` on disk, served as `name`.
    pub fn read(name: impl Into<String>, path: &Path, lfs: bool) -> RepoFile {
        let body = std::fs::read(path).unwrap_or_else(|e| panic!("fake hub: read {}: {e}", path.display()));
        RepoFile::new(name, body, lfs)
    }

    /// The `ETag` a HEAD sends (for a git file the one the client keys its blob by): an opaque 40-hex string, the
    /// first 40 digits of the sha256 (the real hub sends the git blob hash).
    pub fn git_etag(&self) -> &str {
        &self.sha256[..40]
    }
}

/// The repo a hub serves.
#[derive(Clone, Debug)]
pub struct Repo {
    pub kind: RepoType,
    /// `org/name`
    pub id: String,
    /// 40-hex commit: the listing's `sha` and every `X-Repo-Commit`.
    pub commit: String,
    pub files: Vec<RepoFile>,
    /// Listed (before `files`, as the hub lists every file of the repo) but not served: a client must never ask
    /// for them.
    pub unfetched: Vec<String>,
}

/// Failures to inject.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Answer the first N HEADs of a repo file with HTTP 500.
    pub fail_heads: usize,
    /// Send only half of every file body (`Content-Length` still says the full size).
    pub truncate: bool,
    /// Advertise this `X-Linked-Etag` instead of the real sha256.
    pub wrong_etag: Option<String>,
}

/// One request as the hub saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
}

struct State {
    repo: Repo,
    faults: Faults,
    listing: String,
    /// `http://127.0.0.1:PORT`, for redirects.
    addr: String,
    heads: AtomicUsize,
    log: Mutex<Vec<Request>>,
}

/// A running fake hub; stops when dropped.
pub struct FakeHub {
    /// `http://127.0.0.1:PORT`, the `HF_ENDPOINT` to give the client.
    pub addr: String,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
}

impl FakeHub {
    /// Serve `repo` on an ephemeral port.
    pub fn start(repo: Repo, faults: Faults) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("fake hub: bind 127.0.0.1:0");
        let addr = format!("http://{}", listener.local_addr().expect("fake hub: local address"));
        let siblings: Vec<String> = (repo.unfetched.iter().map(String::as_str))
            .chain(repo.files.iter().map(|f| f.name.as_str()))
            .map(|n| serde_json::json!({ "rfilename": n }).to_string())
            .collect();
        let listing = format!(
            r#"{{"id":{},"sha":{},"siblings":[{}]}}"#,
            serde_json::Value::from(repo.id.as_str()),
            serde_json::Value::from(repo.commit.as_str()),
            siblings.join(",")
        );
        let state = Arc::new(State {
            repo,
            faults,
            listing,
            addr: addr.clone(),
            heads: AtomicUsize::new(0),
            log: Mutex::default(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (st, stop2) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().take(MAX_CONNECTIONS) {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let _ = serve(conn, &st);
                }
            }
        });
        FakeHub { addr, state, stop }
    }

    /// Every request so far, in arrival order.
    pub fn log(&self) -> Vec<Request> {
        self.state.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// (method, path) of every request so far, in arrival order.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.log().into_iter().map(|r| (r.method, r.path)).collect()
    }

    /// How many requests had this method and a path starting with `path_prefix`.
    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        self.log().iter().filter(|r| r.method == method && r.path.starts_with(path_prefix)).count()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // wake the accept loop so that it sees the flag
        let _ = TcpStream::connect(self.addr.trim_start_matches("http://"));
    }
}

/// The answer to one request: status, headers, body, and how many body bytes to send.
type Answer<'a> = (u16, Vec<(&'static str, String)>, &'a [u8], usize);

fn answer<'a>(st: &'a State, method: &str, path: &str) -> Answer<'a> {
    let repo = &st.repo;
    let not_found = |code: &str| (404, vec![("X-Error-Code", code.to_string())], &[][..], 0);
    let full = |f: &'a RepoFile| {
        let send = if st.faults.truncate { f.body.len() / 2 } else { f.body.len() };
        (200, vec![], &f.body[..], send)
    };
    let (api, resolve) = match repo.kind {
        RepoType::Model => ("models", format!("/{}/resolve/", repo.id)),
        RepoType::Dataset => ("datasets", format!("/datasets/{}/resolve/", repo.id)),
    };
    let known_rev = |rev: &str| rev == "main" || rev == repo.commit;
    if let Some(rev) = path.strip_prefix(&format!("/api/{api}/{}/revision/", repo.id)) {
        return match (method, known_rev(rev)) {
            ("GET", true) => {
                let h = vec![("Content-Type", "application/json".to_string())];
                (200, h, st.listing.as_bytes(), st.listing.len())
            }
            ("GET", false) => not_found("RevisionNotFound"),
            _ => not_found("RepoNotFound"),
        };
    }
    if let Some(rest) = path.strip_prefix(&resolve) {
        let Some((rev, name)) = rest.split_once('/') else { return not_found("EntryNotFound") };
        if !known_rev(rev) {
            return not_found("RevisionNotFound");
        }
        let Some(f) = repo.files.iter().find(|f| f.name == name) else { return not_found("EntryNotFound") };
        if method == "HEAD" && st.heads.fetch_add(1, Ordering::SeqCst) < st.faults.fail_heads {
            return (500, vec![], &[], 0);
        }
        return match method {
            "HEAD" | "GET" if f.lfs => {
                let etag = st.faults.wrong_etag.as_deref().unwrap_or(&f.sha256);
                let h = vec![
                    ("X-Repo-Commit", repo.commit.clone()),
                    ("X-Linked-Etag", format!("\"{etag}\"")),
                    ("X-Linked-Size", f.body.len().to_string()),
                    ("ETag", format!("\"{}\"", f.git_etag())),
                    ("Location", format!("{}/cdn/{}", st.addr, f.sha256)),
                ];
                (302, h, &[], 0)
            }
            "HEAD" => {
                let h = vec![("X-Repo-Commit", repo.commit.clone()), ("ETag", format!("\"{}\"", f.git_etag()))];
                (200, h, &f.body, 0)
            }
            "GET" => full(f),
            _ => not_found("RepoNotFound"),
        };
    }
    if let Some(sha) = path.strip_prefix("/cdn/") {
        return match repo.files.iter().find(|f| f.lfs && f.sha256 == sha) {
            Some(f) if method == "GET" => full(f),
            _ => (404, vec![], &[], 0),
        };
    }
    not_found("RepoNotFound")
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        302 => "Found",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "X",
    }
}

/// Read one request and answer it.
fn serve(conn: TcpStream, st: &State) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    let req = Request { method: method.clone(), path: path.clone(), authorization };
    st.log.lock().unwrap_or_else(|e| e.into_inner()).push(req);

    let (status, headers, body, send) = answer(st, &method, &path);
    let mut out = conn;
    let mut head =
        format!("HTTP/1.1 {status} {}\r\nConnection: close\r\nContent-Length: {}\r\n", reason(status), body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if method != "HEAD" {
        out.write_all(&body[..send])?;
    }
    out.flush()
}
