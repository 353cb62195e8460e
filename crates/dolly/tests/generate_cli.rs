//! `dolly generate` / `dolly serve` command lines, as processes: a missing model is blamed before the tokenizer;
//! `--input`/`--output` and every out-of-range serve flag are refused (naming the flag and its range) before the
//! weights load (the model directory here has a config.json but no weights); a too-high `--max-connections` for
//! the open-file limit is refused, the default lowered; a hub id resolves from a pre-populated Hugging Face cache
//! with `HF_HUB_OFFLINE=1` and gives the same greedy answer as the directory; boolean flags take `true|false` or
//! stand bare; every flag has a help line. Model: a 2-layer pythia-14m from `dolly init-model`, the shared 20B
//! tokenizer. No network: the hub cache is local and offline.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn tokenizer() -> PathBuf {
    test_support::shared_file("20B_tokenizer.json")
}

/// `dolly` with a hub cache under `home` and no network (offline, endpoint on a closed port).
fn dolly(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dolly"));
    for v in ["HF_TOKEN", "HF_TOKEN_PATH", "HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE"] {
        c.env_remove(v);
    }
    c.env("HF_HOME", home.join("hf")).env("HF_HUB_OFFLINE", "1").env("HF_ENDPOINT", "http://127.0.0.1:9");
    c.stdin(Stdio::null());
    c
}

fn run(c: &mut Command) -> (bool, String, String) {
    let o: Output = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn tiny_model(dir: &Path) -> PathBuf {
    let out = dir.join("tiny");
    let (ok, _, e) = run(dolly(dir)
        .args(["init-model", "--preset", "pythia-14m", "--num-hidden-layers", "2", "--tokenizer", "none", "--output"])
        .arg(&out));
    assert!(ok, "{e}");
    out
}

/// A directory with the model's config.json only: anything that loads weights fails on it.
fn config_only(model: &Path, dir: &Path, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let out = dir.join("config-only");
    std::fs::create_dir_all(&out).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    out
}

#[test]
fn a_missing_model_is_blamed_first_and_paths_are_checked_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    for cmd in ["generate", "serve"] {
        // a hub-like name that is not in the (offline) cache
        let instruction: &[&str] = if cmd == "generate" { &["hi"] } else { &[] };
        let (ok, _, e) = run(dolly(t).args([cmd, "nope"]).args(instruction));
        assert!(!ok);
        assert!(e.contains("model `nope`: not a directory"), "{cmd}: {e}");
        assert!(!e.contains("tokenizer"), "{cmd}: {e}");
        // neither a directory nor a hub id
        let (ok, _, e) = run(dolly(t).args([cmd, "./no/such/dir"]).args(instruction));
        assert!(!ok);
        assert!(e.contains("model `./no/such/dir`: not a directory and not a hub model id"), "{cmd}: {e}");
    }
    let (ok, _, e) = run(dolly(t).arg("generate").arg(t).arg("hi"));
    assert!(!ok);
    assert!(e.contains("has no config.json"), "{e}");

    let m = tiny_model(t);
    let bare = config_only(&m, t, |_| {});
    let g = |args: &[&str]| run(dolly(t).arg("generate").arg(&bare).arg("--tokenizer").arg(tokenizer()).args(args));
    let (ok, _, e) = g(&["--input", t.join("missing.jsonl").to_str().unwrap()]);
    assert!(!ok);
    assert!(e.contains("--input") && e.contains("missing.jsonl"), "{e}");
    let input = t.join("in.jsonl");
    std::fs::write(&input, "{\"instruction\": \"Name a fruit.\"}\n{\"context\": \"no instruction\"}\n").unwrap();
    let (ok, _, e) = g(&["--input", input.to_str().unwrap()]);
    assert!(!ok);
    assert!(e.contains("in.jsonl:2"), "{e}");
    std::fs::write(&input, "{\"instruction\": \"Name a fruit.\"}\n").unwrap();
    let nodir = t.join("nodir").join("out.jsonl");
    let (ok, _, e) = g(&["--input", input.to_str().unwrap(), "--output", nodir.to_str().unwrap()]);
    assert!(!ok);
    assert!(e.contains("--output") && e.contains("does not exist"), "{e}");
    let (ok, _, e) = g(&["--input", input.to_str().unwrap(), "--output", t.to_str().unwrap()]);
    assert!(!ok);
    assert!(e.contains("is a directory"), "{e}");
    let (ok, _, e) = g(&["hi", "--max-new-tokens", "4096"]);
    assert!(!ok);
    assert!(e.contains("--max-new-tokens must be between 1 and 2047"), "{e}");
    // all checks pass: only then the weights are needed
    let (ok, _, e) = g(&["--input", input.to_str().unwrap(), "--output", t.join("out.jsonl").to_str().unwrap()]);
    assert!(!ok);
    assert!(e.contains("loading model"), "{e}");
}

#[test]
fn serve_refuses_each_bad_flag_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let m = tiny_model(t);
    let bare = config_only(&m, t, |_| {});
    let cases: &[(&[&str], &str)] = &[
        (&["--kv-slots", "0"], "--kv-slots must be at least 2"),
        (&["--kv-slots", "1"], "--kv-slots must be at least 2"),
        (&["--kv-slots", "5000"], "--kv-slots must be between 2 and 2048"),
        (&["--default-max-tokens", "5000"], "--default-max-tokens must be between 1 and 2047"),
        (&["--kv-slots", "64", "--default-max-tokens", "64"], "--default-max-tokens must be between 1 and 63"),
        (&["--batch-window-ms", "100000000"], "--batch-window-ms must be between 0 and 1000"),
        (&["--max-batch", "0"], "--max-batch must be between 1 and 1024"),
        (&["--max-batch", "100000"], "--max-batch must be between 1 and 1024"),
        (&["--queue-size", "0"], "--queue-size must be between 1 and"),
        (&["--body-limit", "0"], "--body-limit must be between 1024 and"),
        (&["--max-connections", "0"], "--max-connections must be between 1 and 65536"),
        (&["--header-timeout-s", "0"], "--header-timeout-s must be between 1 and 3600"),
        (&["--idle-timeout-s", "99999"], "--idle-timeout-s must be between 1 and 3600"),
    ];
    for (args, want) in cases {
        let (ok, _, e) = run(dolly(t).arg("serve").arg(&bare).args(["--port", "0"]).args(*args));
        assert!(!ok, "{args:?}");
        assert!(e.contains(want), "{args:?}: {e}");
        assert!(!e.contains("loading model"), "{args:?}: {e}");
    }
    // a KV cache larger than any machine: 2 * 64 layers * 1024 rows * 2048 slots * 8192 hidden * 4 bytes = 8 TiB
    let huge = config_only(&m, &t.join("huge"), |c| {
        c["hidden_size"] = 8192.into();
        c["intermediate_size"] = 32768.into();
        c["num_hidden_layers"] = 64.into();
    });
    let (ok, _, e) = run(dolly(t).arg("serve").arg(&huge).args(["--port", "0", "--max-batch", "1024"]));
    assert!(!ok);
    assert!(e.contains("the KV cache for --max-batch 1024 x --kv-slots 2048 needs ~"), "{e}");
    // the open-file limit: an explicit --max-connections beyond it is refused, the default is lowered
    let shell = |limit: u32, extra: &str| {
        let script = format!("ulimit -n {limit} && exec \"$0\" serve \"$1\" --port 0 {extra}");
        run(Command::new("sh").args(["-c", &script]).arg(env!("CARGO_BIN_EXE_dolly")).arg(&bare).stdin(Stdio::null()))
    };
    let (ok, _, e) = shell(100, "--max-connections 1000");
    assert!(!ok);
    assert!(e.contains("--max-connections 1000 needs ~") && e.contains("ulimit -n"), "{e}");
    let (ok, _, e) = shell(100, &format!("--tokenizer {}", tokenizer().display()));
    assert!(!ok, "a config-only directory cannot be served");
    assert!(e.contains("--max-connections lowered from 256 to"), "{e}");
    assert!(e.contains("loading model"), "{e}");
}

/// Put `model` into the hub cache under `home` as the repo `org/name` at a fixed commit (huggingface_hub layout:
/// refs/main holds the commit, snapshots/COMMIT/ the files).
fn cache_repo(home: &Path, id: &str, model: &Path) {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.join("hf").join("hub").join(format!("models--{}", id.replace('/', "--")));
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(f), snap.join(f)).unwrap();
    }
    std::fs::copy(tokenizer(), snap.join("tokenizer.json")).unwrap();
}

#[test]
fn hub_ids_resolve_from_the_cache_and_boolean_flags_take_values() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let m = tiny_model(t);
    cache_repo(t, "fake-org/tiny-neox", &m);
    let gen = |model: &str, args: &[&str]| {
        run(dolly(t).args(["--threads", "1", "generate", model, "--tokenizer"]).arg(tokenizer()).args(args))
    };
    let (ok, from_dir, e) = gen(m.to_str().unwrap(), &["Name a fruit.", "--greedy", "--max-new-tokens", "6"]);
    assert!(ok, "{e}");
    let (ok, from_hub, e) = gen("fake-org/tiny-neox", &["Name a fruit.", "--greedy", "--max-new-tokens", "6"]);
    assert!(ok, "{e}");
    assert_eq!(from_hub, from_dir);
    // `--flag true|false` and bare `--flag`: the value is not taken as the instruction
    let (ok, out, e) = gen(
        m.to_str().unwrap(),
        &["Name a fruit.", "--greedy", "true", "--no-stream", "false", "--bf16", "false", "--max-new-tokens", "6"],
    );
    assert!(ok, "{e}");
    assert_eq!(out, from_dir);
    let (ok, _, e) =
        gen(m.to_str().unwrap(), &["Name a fruit.", "--bf16", "true", "--greedy", "--max-new-tokens", "6"]);
    assert!(ok, "{e}");
    let (ok, _, e) = gen(m.to_str().unwrap(), &["--bf16", "true"]);
    assert!(!ok, "`true` was taken as the instruction");
    assert!(e.contains("no instruction"), "{e}");
    let (ok, _, e) = gen(m.to_str().unwrap(), &["hi", "--greedy", "maybe"]);
    assert!(!ok);
    assert!(e.contains("expected true or false, got `maybe`"), "{e}");

    // serve: a hub id is served under its own name
    let mut child = dolly(t)
        .args(["--threads", "1", "serve", "fake-org/tiny-neox", "--port", "0", "--bf16", "true"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let listening = loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "server exited before listening");
        if line.contains("listening on") {
            break line.clone();
        }
    };
    child.kill().unwrap();
    let _ = child.wait();
    assert!(listening.contains("model `fake-org/tiny-neox`"), "{listening}");
}

#[test]
fn every_flag_has_a_help_line() {
    let tmp = tempfile::tempdir().unwrap();
    for cmd in ["generate", "serve"] {
        let (ok, out, e) = run(dolly(tmp.path()).args([cmd, "--help"]));
        assert!(ok, "{e}");
        let lines: Vec<&str> = out.lines().collect();
        let mut flags = 0;
        for (i, l) in lines.iter().enumerate() {
            if l.trim_start().starts_with("--") {
                flags += 1;
                let next = lines.get(i + 1).copied().unwrap_or("");
                let described = next.starts_with("          ") && !next.trim().is_empty();
                assert!(described, "{cmd}: `{}` has no help line", l.trim());
            }
        }
        assert!(flags >= 10, "{cmd}: {out}");
        for f in ["--host", "--port", "--max-connections", "--header-timeout-s", "--idle-timeout-s"] {
            assert_eq!(cmd == "serve", out.contains(f), "{cmd} {f}");
        }
    }
}
