//! The hub client against `test_support::hub::FakeHub`, a real HTTP server on 127.0.0.1 that plays the Hugging Face
//! hub (API listing, HEAD on `resolve/` with a redirect to a CDN path, LFS etag/size headers, injected faults): download into the hub cache layout, cache
//! reuse, offline mode, fallback when the hub is unreachable, and each failure (truncated body, 404, 500 then
//! success, sha256 mismatch) with its message. Options come from an HF_* variable map, as from the environment.
//! The server answers at most a bounded number of connections and stops when the test drops it.

use data::hub::{Hub, HubOptions, Repo};
use data::{load_dataset, BadRecordPolicy};
use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;
use test_support::hub::{FakeHub, Faults, RepoFile, RepoType};

const REPO: &str = "databricks/databricks-dolly-15k";
const FILE: &str = "databricks-dolly-15k.jsonl";
const COMMIT: &str = "bdd27f4d94b9c1f951818a7da7fd7aeea5dbff1a";

/// The dataset repo with `body` as its one LFS file (the listing also names `.gitattributes` and `README.md`).
fn start(body: Vec<u8>, faults: Faults) -> (FakeHub, String) {
    let file = RepoFile::new(FILE, body, true);
    let sha = file.sha256.clone();
    let repo = test_support::hub::Repo {
        kind: RepoType::Dataset,
        id: REPO.into(),
        commit: COMMIT.into(),
        files: vec![file],
        unfetched: vec![".gitattributes".into(), "README.md".into()],
    };
    (FakeHub::start(repo, faults), sha)
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
    let shared = test_support::shared_file(FILE);
    let (hub, sha) = start(std::fs::read(&shared).expect("shared dolly-15k"), Faults::default());
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub.addr, cache.path(), &[("HF_TOKEN", "hf_secret_token")]);

    let data = load_dataset(REPO, BadRecordPolicy::Fail, &opts).unwrap();
    assert_eq!(data.records.len(), 15011);
    assert_eq!(data.commit.as_deref(), Some(COMMIT));
    // huggingface_hub's layout: blob named by the LFS sha256, relative symlink from the snapshot, ref -> commit.
    let repo_dir = cache.path().join("datasets--databricks--databricks-dolly-15k");
    let blob = repo_dir.join("blobs").join(&sha);
    assert_eq!(common::sha256_file(&blob).unwrap(), sha);
    let pointer = repo_dir.join("snapshots").join(COMMIT).join(FILE);
    assert_eq!(std::fs::read_link(&pointer).unwrap(), PathBuf::from("../../blobs").join(&sha));
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), COMMIT);
    assert_eq!(files_under(&repo_dir.join("blobs")).len(), 1, "no temporary files left");
    assert_eq!(hub.count("GET", "/cdn/"), 1);
    // The token goes to the hub with every request.
    assert!(hub
        .log()
        .iter()
        .all(|r| r.path.starts_with("/cdn/") || r.authorization.as_deref() == Some("Bearer hf_secret_token")));

    // Online again: metadata is checked, the blob is reused.
    let again = Hub::new(opts.clone()).download_file(&Repo::dataset(REPO, "main"), FILE).unwrap();
    assert_eq!(again, pointer);
    assert_eq!(hub.count("GET", "/cdn/"), 1);

    // Offline: no request at all.
    let before = hub.log().len();
    let offline = options(&hub.addr, cache.path(), &[("HF_HUB_OFFLINE", "1")]);
    assert!(offline.offline);
    assert_eq!(load_dataset(REPO, BadRecordPolicy::Fail, &offline).unwrap().records.len(), 15011);
    assert_eq!(hub.log().len(), before);

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
    let (hub, _) = start(small_body(), Faults { truncate: true, ..Default::default() });
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
    let (hub, _) = start(small_body(), Faults::default());
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
    let (hub, _) = start(small_body(), Faults { fail_heads: 2, ..Default::default() });
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub.addr, cache.path(), &[]);
    let data = load_dataset(REPO, BadRecordPolicy::Fail, &opts).unwrap();
    assert_eq!(data.records.len(), 50);
    assert_eq!(hub.count("HEAD", "/datasets/"), 3);

    let (hub, _) = start(small_body(), Faults { fail_heads: 100, ..Default::default() });
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(&hub.addr, cache.path(), &[]);
    opts.retries = 2;
    let err = Hub::new(opts).download_file(&Repo::dataset(REPO, "main"), FILE).unwrap_err();
    assert!(err.message.contains("HTTP 500") && err.message.contains("gave up after 3 tries"), "{err}");
}

#[test]
fn sha256_mismatch_is_rejected() {
    let wrong = "ab".repeat(32);
    let (hub, _) = start(small_body(), Faults { wrong_etag: Some(wrong.clone()), ..Default::default() });
    let cache = tempfile::tempdir().unwrap();
    let err =
        Hub::new(options(&hub.addr, cache.path(), &[])).download_file(&Repo::dataset(REPO, "main"), FILE).unwrap_err();
    assert!(err.message.contains("sha256 mismatch") && err.message.contains(&wrong), "{err}");
    let blobs = cache.path().join("datasets--databricks--databricks-dolly-15k/blobs");
    assert!(files_under(&blobs).is_empty());
}
