//! A small Hugging Face hub client for datasets and models, speaking the hub's HTTP protocol and filling the hub
//! cache (`hub_cache.rs`: its layout, the options read from the environment, look-ups; re-exported here).
//! Verifies the size (`X-Linked-Size`/`Content-Length`) and, for LFS files whose etag is a sha256, the sha256
//! while streaming; writes every blob through `common::atomic_write_with`; retries 5xx/429/network errors;
//! falls back to the cache (with a warning) when the hub cannot be reached, and uses only the cache offline.
//! Does not upload, resume partial downloads (a failed download restarts) or speak the Xet protocol (the hub
//! serves Xet-backed files over plain HTTP too). Never prints the token.

use crate::error::{DataError, Result};
use crate::hub_cache::{check_filename, is_commit_hash, link_pointer, mkdirs, write_ref};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

type Response = ureq::http::Response<ureq::Body>;

pub use crate::hub_cache::{
    cached_commit, cached_file, cached_snapshot, is_data_file, looks_like_repo_id, HubOptions, Repo, RepoType,
    Snapshot, DEFAULT_ENDPOINT,
};

/// How each kind of repository is addressed in the hub's URLs.
impl Repo {
    fn url_prefix(&self) -> &'static str {
        match self.repo_type {
            RepoType::Model => "",
            RepoType::Dataset => "datasets/",
        }
    }
    fn api_kind(&self) -> &'static str {
        match self.repo_type {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
        }
    }
}

/// Percent-encode a path segment (keeps `/` when `keep_slash`).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An HTTP client bound to the options.
pub struct Hub {
    opts: HubOptions,
    no_redirect: ureq::Agent,
    follow: ureq::Agent,
}

/// What a HEAD on `resolve/` told us.
#[derive(Clone, Debug)]
struct FileMeta {
    commit: String,
    etag: String,
    size: Option<u64>,
    download_url: String,
}

enum Attempt<T> {
    Done(T),
    /// Worth retrying (5xx, 429, network); the message says what happened.
    Retry(String),
}

fn agent(max_redirects: u32) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(max_redirects)
        .max_redirects_will_error(false)
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .user_agent(concat!("dolly/", env!("CARGO_PKG_VERSION"), "; hf-hub-protocol"))
        .build()
        .new_agent()
}

/// Send `req`: the response, or (as `Err`, the message naming `url`) a failure worth retrying: a network error,
/// a 5xx or a 429.
fn send(req: ureq::RequestBuilder<ureq::typestate::WithoutBody>, url: &str) -> std::result::Result<Response, String> {
    let resp = req.call().map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status().as_u16();
    if status >= 500 || status == 429 {
        return Err(format!("{url}: HTTP {status}"));
    }
    Ok(resp)
}

/// After `Hub::retrying` gave up reaching the hub, the cached copy that `cached` finds, with a warning that names
/// it (`what`); any other error, or no cached copy, is returned as it came.
fn fall_back_to_cache<C>(
    e: DataError,
    cached: impl FnOnce() -> Option<C>,
    what: impl FnOnce(&C) -> String,
) -> Result<C> {
    if e.message.contains("gave up after") {
        if let Some(c) = cached() {
            eprintln!("warning: {e}; using the cached {}", what(&c));
            return Ok(c);
        }
    }
    Err(e)
}

fn header(resp: &Response, name: &str) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(|s| s.to_string())
}

fn clean_etag(e: &str) -> String {
    e.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

impl Hub {
    pub fn new(opts: HubOptions) -> Hub {
        Hub { opts, no_redirect: agent(0), follow: agent(10) }
    }

    pub fn options(&self) -> &HubOptions {
        &self.opts
    }

    fn file_url(&self, repo: &Repo, filename: &str) -> String {
        format!(
            "{}/{}{}/resolve/{}/{}",
            self.opts.endpoint,
            repo.url_prefix(),
            repo.id,
            encode(&repo.revision, false),
            encode(filename, true)
        )
    }

    fn with_auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.opts.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    /// Run `f` with retries; when every try asked for another, the error says "gave up after N tries" (what
    /// `fall_back_to_cache` looks for).
    fn retrying<T>(&self, what: &str, mut f: impl FnMut() -> Result<Attempt<T>>) -> Result<T> {
        let mut delay = self.opts.retry_delay;
        let mut last = String::new();
        for attempt in 0..=self.opts.retries {
            if attempt > 0 {
                std::thread::sleep(delay);
                delay *= 2;
            }
            match f()? {
                Attempt::Done(v) => return Ok(v),
                Attempt::Retry(msg) => last = msg,
            }
        }
        Err(DataError::hub(format!("{what}: {last} (gave up after {} tries)", self.opts.retries + 1)))
    }

    fn status_error(&self, status: u16, url: &str, repo: &Repo, code: Option<String>) -> DataError {
        let what = match (status, code.as_deref()) {
            (404, Some("RepoNotFound")) | (401, Some("RepoNotFound")) => {
                format!("repository {:?} not found (or private: set HF_TOKEN)", repo.id)
            }
            (404, Some("RevisionNotFound")) => format!("revision {:?} not found in {:?}", repo.revision, repo.id),
            (404, Some("EntryNotFound")) => format!("file not found in {:?} at revision {:?}", repo.id, repo.revision),
            (404, _) => format!(
                "not found (check the repository id {:?}, the revision {:?} and the file name)",
                repo.id, repo.revision
            ),
            (401, _) => "unauthorized: set HF_TOKEN (or log in) for private or gated repositories".to_string(),
            (403, _) => "forbidden: the repository is gated or your token lacks access".to_string(),
            _ => format!("unexpected HTTP status {status}"),
        };
        DataError::hub(format!("{url}: HTTP {status}: {what}"))
    }

    fn head(&self, repo: &Repo, filename: &str) -> Result<Attempt<FileMeta>> {
        let mut url = self.file_url(repo, filename);
        for _ in 0..5 {
            let req = self.with_auth(self.no_redirect.head(&url)).header("Accept-Encoding", "identity");
            let resp = match send(req, &url) {
                Ok(r) => r,
                Err(retry) => return Ok(Attempt::Retry(retry)),
            };
            let status = resp.status().as_u16();
            let location = header(&resp, "location");
            if (300..400).contains(&status) {
                let Some(loc) = location.clone() else {
                    return Err(DataError::hub(format!("{url}: HTTP {status} redirect without a Location header")));
                };
                if loc.starts_with('/') {
                    // Relative redirect (renamed repo): follow it with the same checks.
                    url = format!("{}{loc}", self.opts.endpoint);
                    if header(&resp, "x-repo-commit").is_none() {
                        continue;
                    }
                }
            } else if status >= 400 {
                return Err(self.status_error(status, &url, repo, header(&resp, "x-error-code")));
            }
            let commit = header(&resp, "x-repo-commit").ok_or_else(|| {
                DataError::hub(format!("{url}: the server sent no X-Repo-Commit header: is HF_ENDPOINT a hub?"))
            })?;
            let etag = header(&resp, "x-linked-etag")
                .or_else(|| header(&resp, "etag"))
                .map(|e| clean_etag(&e))
                .filter(|e| !e.is_empty() && !e.contains('/'))
                .ok_or_else(|| DataError::hub(format!("{url}: the server sent no usable ETag")))?;
            let size = header(&resp, "x-linked-size")
                .or_else(|| if (300..400).contains(&status) { None } else { header(&resp, "content-length") })
                .and_then(|s| s.trim().parse::<u64>().ok());
            let download_url = match location {
                Some(loc) if (300..400).contains(&status) && !loc.starts_with('/') => loc,
                _ => url.clone(),
            };
            if !is_commit_hash(&commit) {
                return Err(DataError::hub(format!("{url}: X-Repo-Commit {commit:?} is not a commit hash")));
            }
            return Ok(Attempt::Done(FileMeta { commit, etag, size, download_url }));
        }
        Err(DataError::hub(format!("{url}: too many redirects")))
    }

    /// Stream the body into `blob` atomically, verifying size and (LFS) sha256.
    fn get_blob(&self, meta: &FileMeta, blob: &Path, filename: &str) -> Result<Attempt<()>> {
        let url = &meta.download_url;
        // The token goes to the hub only, never to a CDN on another host.
        let same_host = url.starts_with(&self.opts.endpoint);
        let mut req = self.follow.get(url).header("Accept-Encoding", "identity");
        if same_host {
            req = self.with_auth(req);
        }
        let resp = match send(req, url) {
            Ok(r) => r,
            Err(retry) => return Ok(Attempt::Retry(retry)),
        };
        let status = resp.status().as_u16();
        if status >= 300 {
            return Err(DataError::hub(format!("{url}: HTTP {status} while downloading {filename}")));
        }
        let expected = meta.size.or_else(|| header(&resp, "content-length").and_then(|s| s.parse().ok()));
        let want_sha = (meta.etag.len() == 64 && meta.etag.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| meta.etag.to_ascii_lowercase());
        let bar = progress_bar(self.opts.progress, expected, filename);
        let mut reader = resp.into_body().into_reader();
        let mut got = 0u64;
        let mut failure: Option<Attempt<()>> = None;
        let res = common::atomic_write_with(blob, |w: &mut dyn Write| {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        let msg = match expected {
                            Some(x) => format!("{url}: download truncated: got {got} of {x} bytes ({e})"),
                            None => format!("{url}: download failed after {got} bytes ({e})"),
                        };
                        failure = Some(Attempt::Retry(msg.clone()));
                        return Err(std::io::Error::other(msg));
                    }
                };
                h.update(&buf[..n]);
                w.write_all(&buf[..n])?;
                got += n as u64;
                bar.set_position(got);
            }
            if let Some(x) = expected {
                if got != x {
                    let msg = format!("{url}: download truncated: got {got} of {x} bytes");
                    failure = Some(Attempt::Retry(msg.clone()));
                    return Err(std::io::Error::other(msg));
                }
            }
            if let Some(want) = &want_sha {
                let have: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
                if &have != want {
                    let msg = format!("{url}: sha256 mismatch: expected {want}, got {have} ({got} bytes)");
                    return Err(std::io::Error::other(msg));
                }
            }
            Ok(())
        });
        bar.finish_and_clear();
        match (res, failure) {
            (Ok(()), _) => Ok(Attempt::Done(())),
            (Err(_), Some(retry)) => Ok(retry),
            (Err(e), None) => Err(DataError::hub(format!("{filename}: {e}"))),
        }
    }

    /// Download one file of `repo` into the cache (reusing a cached blob) and return its snapshot path.
    /// Offline: the cached copy or an error. Hub unreachable: the cached copy with a warning, else the error.
    pub fn download_file(&self, repo: &Repo, filename: &str) -> Result<PathBuf> {
        check_filename(filename)?;
        if self.opts.offline {
            return cached_file(&self.opts, repo, filename).ok_or_else(|| self.offline_miss(repo, Some(filename)));
        }
        let what = format!("{}: cannot reach the hub for {filename}", self.opts.endpoint);
        let meta = match self.retrying(&what, || self.head(repo, filename)) {
            Ok(m) => m,
            Err(e) => {
                let cached = || cached_file(&self.opts, repo, filename);
                return fall_back_to_cache(e, cached, |p| format!("copy {}", p.display()));
            }
        };
        let dir = self.opts.repo_dir(repo);
        let blobs = dir.join("blobs");
        mkdirs(&blobs)?;
        let blob = blobs.join(&meta.etag);
        let cached_ok = std::fs::metadata(&blob).map(|m| meta.size.is_none_or(|s| m.len() == s)).unwrap_or(false);
        if !cached_ok {
            let what = format!("download of {filename}");
            self.retrying(&what, || self.get_blob(&meta, &blob, filename))?;
        }
        let pointer = dir.join("snapshots").join(&meta.commit).join(filename);
        link_pointer(&blob, &pointer)?;
        write_ref(&self.opts, repo, &meta.commit)?;
        Ok(pointer)
    }

    /// The repo's commit and file names at its revision (hub API), or the cached snapshot's when offline or when
    /// the hub cannot be reached.
    pub fn list_files(&self, repo: &Repo) -> Result<(String, Vec<String>)> {
        if self.opts.offline {
            let s = cached_snapshot(&self.opts, repo).ok_or_else(|| self.offline_miss(repo, None))?;
            return Ok((s.commit, s.files));
        }
        let url = format!(
            "{}/api/{}/{}/revision/{}",
            self.opts.endpoint,
            repo.api_kind(),
            repo.id,
            encode(&repo.revision, false)
        );
        let what = format!("{}: cannot list {}", self.opts.endpoint, repo.id);
        let res = self.retrying(&what, || {
            let resp = match send(self.with_auth(self.follow.get(&url)), &url) {
                Ok(r) => r,
                Err(retry) => return Ok(Attempt::Retry(retry)),
            };
            let status = resp.status().as_u16();
            if status >= 300 {
                return Err(self.status_error(status, &url, repo, header(&resp, "x-error-code")));
            }
            let body = resp
                .into_body()
                .with_config()
                .limit(64 << 20)
                .read_to_string()
                .map_err(|e| DataError::hub(format!("{url}: cannot read the response: {e}")))?;
            Ok(Attempt::Done(body))
        });
        let body = match res {
            Ok(b) => b,
            Err(e) => {
                let cached = || cached_snapshot(&self.opts, repo);
                let s = fall_back_to_cache(e, cached, |s| format!("snapshot {}", s.dir.display()))?;
                return Ok((s.commit, s.files));
            }
        };
        #[derive(serde::Deserialize)]
        struct Sibling {
            rfilename: String,
        }
        #[derive(serde::Deserialize)]
        struct Info {
            sha: String,
            #[serde(default)]
            siblings: Vec<Sibling>,
        }
        let info: Info = serde_json::from_str(&body)
            .map_err(|e| DataError::hub(format!("{url}: unexpected response (not repository info): {e}")))?;
        Ok((info.sha, info.siblings.into_iter().map(|s| s.rfilename).collect()))
    }

    /// Download the files of `repo` accepted by `keep` and return the snapshot.
    pub fn snapshot(&self, repo: &Repo, keep: &dyn Fn(&str) -> bool) -> Result<Snapshot> {
        self.snapshot_of(repo, &|names: &[String]| names.iter().filter(|n| keep(n)).cloned().collect())
    }

    /// Download the files that `select` picks from the repo's whole listing (a choice that depends on which
    /// files exist, e.g. safetensors or else pickle weights) and return the snapshot.
    pub fn snapshot_of(&self, repo: &Repo, select: &dyn Fn(&[String]) -> Vec<String>) -> Result<Snapshot> {
        let (commit, names) = self.list_files(repo)?;
        let files = select(&names);
        if files.is_empty() {
            return Err(DataError::hub(format!("{}: no matching files at revision {:?}", repo.id, repo.revision)));
        }
        // Pin the listed commit so that every file comes from the same snapshot.
        let pinned = Repo { revision: commit.clone(), ..repo.clone() };
        let mut dir = None;
        for f in &files {
            let p = self.download_file(if self.opts.offline { repo } else { &pinned }, f)?;
            if dir.is_none() {
                let depth = f.split('/').count();
                dir = p.ancestors().nth(depth).map(Path::to_path_buf);
            }
        }
        if !self.opts.offline {
            write_ref(&self.opts, repo, &commit)?;
        }
        let dir = dir.unwrap_or_else(|| self.opts.repo_dir(repo).join("snapshots").join(&commit));
        Ok(Snapshot { commit, dir, files })
    }

    fn offline_miss(&self, repo: &Repo, file: Option<&str>) -> DataError {
        let what = file.map(|f| format!("{f} of ")).unwrap_or_default();
        // `dolly cache-dataset` fetches datasets only: a missing model is fetched by running the same command
        // (e.g. `dolly train --input-model ORG/NAME`) once with network access.
        let (kind, fix) = match repo.repo_type {
            RepoType::Dataset => {
                ("dataset", format!("run `dolly cache-dataset --dataset {}` with network access first", repo.id))
            }
            RepoType::Model => ("model", "run the command once with network access and HF_HUB_OFFLINE unset".into()),
        };
        DataError::hub(format!(
            "HF_HUB_OFFLINE is set and {what}{kind} {:?} at revision {:?} is not in the cache {}: {fix}",
            repo.id,
            repo.revision,
            self.opts.cache_dir.display(),
        ))
    }
}

fn progress_bar(show: bool, len: Option<u64>, name: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let style =
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .map(|s| s.progress_chars("=> "));
    if let Ok(s) = style {
        bar.set_style(s);
    }
    bar.set_message(name.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_and_file_names_are_percent_encoded() {
        assert_eq!(encode("refs/convert/parquet", false), "refs%2Fconvert%2Fparquet");
        assert_eq!(encode("data/a b+c.jsonl", true), "data/a%20b%2Bc.jsonl");
    }
}
