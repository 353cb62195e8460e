//! `dolly train --input-model ORG/NAME` against a Hugging Face hub: the binary downloads the model repo into the
//! hub cache (huggingface_hub's layout) and trains on it; a second run with HF_HUB_OFFLINE=1 trains from the cache
//! without a single request and gives the same final model; a repo the hub does not have, or an offline run with
//! an empty cache, fails with a message naming the repo.
//!
//! The hub is `test_support::hub::FakeHub`, a plain HTTP server on 127.0.0.1 in this process (one thread, one request per connection, every
//! request logged). It serves one model repo the way huggingface.co does: `GET /api/models/REPO/revision/main`
//! lists the files and the commit; `HEAD /REPO/resolve/COMMIT/FILE` answers a git file (`config.json`,
//! `tokenizer.json`) with 200 + ETag + Content-Length and an LFS file (`model.safetensors`) with a 302 to a CDN
//! path + X-Linked-Etag (sha256) + X-Linked-Size; both carry X-Repo-Commit; anything else is a 404 with the hub's
//! X-Error-Code. The model is a 2-layer pythia-14m from `dolly init-model`, the tokenizer the shared 20B one,
//! the training data the first records of the shared dolly-15k.

mod cli;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use test_support::hub::{FakeHub, Faults, Repo, RepoFile, RepoType};
use test_support::shared_file;

const REPO: &str = "fake-org/tiny-neox";
const COMMIT: &str = "4f0c5b2a9d1e8c7b6a5f4e3d2c1b0a9f8e7d6c5b";

/// Serve `files` as the model repo [`REPO`] at [`COMMIT`]; `unfetched` are listed in the API answer too (the hub
/// lists every file of the repo) but must never be asked for.
fn start_hub(files: Vec<RepoFile>, unfetched: &[&str]) -> FakeHub {
    let unfetched = unfetched.iter().map(|n| n.to_string()).collect();
    let repo = Repo { kind: RepoType::Model, id: REPO.into(), commit: COMMIT.into(), files, unfetched };
    FakeHub::start(repo, Faults::default())
}

/// The binary on 2 threads, talking to `endpoint` with its hub cache under `cache`; nothing inherited from the
/// caller's HF_* environment.
fn dolly(endpoint: &str, cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dolly"));
    c.arg("--threads").arg("2");
    for v in ["HF_HUB_OFFLINE", "HF_TOKEN", "HF_TOKEN_PATH", "HUGGINGFACE_HUB_CACHE", "DOLLY_FAULT_WRITE"] {
        c.env_remove(v);
    }
    c.env_remove("DOLLY_FAULT_ABORT_IN_CHECKPOINT").env_remove("DOLLY_FAULT_PAUSE_AFTER_STEP");
    c.env("HF_ENDPOINT", endpoint).env("HF_HUB_CACHE", cache).env("HF_HOME", cache.join("home"));
    c
}

/// A few steps on `data`, everything small; the model comes from `--input-model model` (and its tokenizer with it).
fn train(c: &mut Command, model: &str, data: &Path, out: &Path) -> Output {
    c.args(["train", "--input-model", model, "--training-dataset"])
        .arg(data)
        .arg("--local-output-dir")
        .arg(out)
        .args(["--max-steps", "3", "--per-device-train-batch-size", "2", "--test-size", "0", "--max-length", "256"])
        .args(["--lr", "1e-3", "--logging-steps", "1", "--save-steps", "100", "--no-gradient-checkpointing"])
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// `dolly init-model` output (2-layer pythia-14m) plus the shared tokenizer, as the repo's files.
fn model_files(tmp: &Path) -> Vec<RepoFile> {
    let dir = tmp.join("init");
    cli::init_model(&dir);
    vec![
        RepoFile::read("config.json", &dir.join("config.json"), false),
        RepoFile::read("model.safetensors", &dir.join("model.safetensors"), true),
        RepoFile::read("tokenizer.json", &shared_file("20B_tokenizer.json"), false),
    ]
}

fn dolly_records(tmp: &Path, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(shared_file("databricks-dolly-15k.jsonl")).unwrap();
    let path = tmp.join("d.jsonl");
    std::fs::write(&path, text.lines().take(n).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    path
}

/// The training losses of `out/metrics.jsonl`, by step.
fn losses(out: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

#[test]
fn downloads_the_model_into_the_hub_cache_trains_on_it_then_trains_offline_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let files = model_files(tmp.path());
    let data = dolly_records(tmp.path(), 40);
    let hub = start_hub(files.clone(), &[".gitattributes", "README.md"]);
    let cache = tmp.path().join("hub");

    // 1) Online: the listing, then HEAD + body for exactly the files the trainer keeps, all at the listed commit.
    let out = tmp.path().join("out-online");
    let o = train(&mut dolly(&hub.addr, &cache), REPO, &data, &out);
    assert!(o.status.success(), "dolly train failed: {}", stderr(&o));
    let resolve = |f: &str| format!("/{REPO}/resolve/{COMMIT}/{f}");
    let mut want = vec![("GET".to_string(), format!("/api/models/{REPO}/revision/main"))];
    for f in &files {
        want.push(("HEAD".into(), resolve(&f.name)));
        want.push(("GET".into(), if f.lfs { format!("/cdn/{}", f.sha256) } else { resolve(&f.name) }));
    }
    assert_eq!(hub.requests(), want);

    // huggingface_hub's cache layout: refs/main -> commit, snapshot files are relative symlinks to blobs named
    // by their etag (the sha256 for LFS files), each holding the served bytes.
    let repo_dir = cache.join("models--fake-org--tiny-neox");
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), COMMIT);
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    assert_eq!(names_in(&snapshot), ["config.json", "model.safetensors", "tokenizer.json"]);
    for f in &files {
        let etag = if f.lfs { f.sha256.clone() } else { f.sha256[..40].to_string() };
        let link = std::fs::read_link(snapshot.join(&f.name)).unwrap();
        assert_eq!(link, Path::new("../../blobs").join(&etag), "{}", f.name);
        assert!(std::fs::read(snapshot.join(&f.name)).unwrap() == f.body, "{}: cached bytes differ", f.name);
    }
    assert_eq!(names_in(&repo_dir.join("blobs")).len(), files.len(), "one blob per file, no temporary files");

    // It trained, and exported the final model (with Dolly's tokenizer files) to the output directory.
    let steps: Vec<u64> = losses(&out).iter().map(|&(s, _)| s).collect();
    assert_eq!(steps, [1, 2, 3]);
    assert!(losses(&out).iter().all(|(_, l)| l.is_finite()));
    assert!(stderr(&o).contains("done: 3 steps"), "{}", stderr(&o));
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    {
        assert!(out.join(f).is_file(), "{f} missing from {}", out.display());
    }
    let model = neox::Model::load(&out).unwrap();
    assert_eq!(model.config.num_hidden_layers, 2);

    // 2) Offline: the same run from the cache alone, without any request, gives the same model bit for bit.
    let before = hub.requests().len();
    let out2 = tmp.path().join("out-offline");
    let o = train(dolly(&hub.addr, &cache).env("HF_HUB_OFFLINE", "1"), REPO, &data, &out2);
    assert!(o.status.success(), "offline dolly train failed: {}", stderr(&o));
    assert_eq!(hub.requests().len(), before, "requests while offline: {:?}", &hub.requests()[before..]);
    assert_eq!(losses(&out2), losses(&out));
    assert!(
        std::fs::read(out2.join("model.safetensors")).unwrap() == std::fs::read(out.join("model.safetensors")).unwrap()
    );
}

#[test]
fn a_missing_repo_or_an_empty_offline_cache_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let files = vec![RepoFile::read("tokenizer.json", &shared_file("20B_tokenizer.json"), false)];
    let hub = start_hub(files, &[]);
    let data = dolly_records(tmp.path(), 8);
    let cache = tmp.path().join("hub");

    // The hub answers 404 (RepoNotFound): one request, no retry, the repo named in the error.
    let o = train(&mut dolly(&hub.addr, &cache), "fake-org/missing", &data, &tmp.path().join("out"));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains(r#"HTTP 404: repository "fake-org/missing" not found"#), "{e}");
    assert_eq!(hub.requests(), [("GET".to_string(), "/api/models/fake-org/missing/revision/main".to_string())]);

    // Offline with nothing cached: no request, and the error names the repo and says how to fix it.
    let o = train(dolly(&hub.addr, &cache).env("HF_HUB_OFFLINE", "1"), REPO, &data, &tmp.path().join("out"));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("HF_HUB_OFFLINE") && e.contains(&format!("model {REPO:?}")) && e.contains("not in the cache"),
        "{e}"
    );
    assert_eq!(hub.requests().len(), 1);
}
