//! `dolly serve` as a process on 127.0.0.1 (ephemeral port): SIGTERM while a streamed completion is in flight lets
//! it finish (graceful drain), then the process exits 0; plus `dolly generate` batch mode end to end (JSONL in
//! input order, greedy output identical alone and in a batch). Random pythia-14m-shaped model (2 layers), the
//! shared 20B tokenizer. No timing assertions.

use neox::{Model, NeoxConfig, SaveDtype};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use test_support::http::Conn;

fn tokenizer() -> PathBuf {
    test_support::shared_file("20B_tokenizer.json")
}

fn model_dir(dir: &Path) -> PathBuf {
    let mut cfg = NeoxConfig::preset("pythia-14m").unwrap();
    cfg.num_hidden_layers = 2;
    let out = dir.join("m");
    Model::new_random(cfg, 3).save(&out, SaveDtype::F32).unwrap();
    out
}

#[test]
fn sigterm_drains_in_flight_stream_then_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_dir(tmp.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_dolly"))
        .args(["--threads", "1", "serve"])
        .arg(&m)
        .arg("--tokenizer")
        .arg(tokenizer())
        .args(["--host", "127.0.0.1", "--port", "0", "--log-prompts"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, mut err) = test_support::http::listening_addr(&mut child);
    let body = r#"{"prompt": "Count to ten.", "max_tokens": 48, "temperature": 0, "stream": true}"#;
    let mut c = Conn::open(addr, "POST", "/v1/completions", Some(body.as_bytes()));
    assert_eq!(c.status, 200, "{}", c.head);
    // wait for the first event, then SIGTERM
    let mut seen = String::new();
    while !seen.contains("data:") {
        let l = c.next_line().expect("the stream ended before its first event");
        seen.push_str(&l);
        seen.push('\n');
    }
    let st = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    seen.push_str(&String::from_utf8_lossy(&c.rest()));
    assert!(seen.contains("data: [DONE]"), "stream cut short: {seen}");
    assert!(seen.contains("\"finish_reason\":\"length\"") || seen.contains("\"finish_reason\":\"stop\""));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut log = String::new();
    err.read_to_string(&mut log).unwrap();
    assert!(log.contains("shutting down"), "{log}");
    // the request log: the drained stream's line, with its tokens and (--log-prompts) its prompt
    let line = log.lines().find(|l| l.contains("POST /v1/completions 200")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("prompt_tokens=4 completion_tokens="), "{line}");
    assert!(line.ends_with(r#"prompt="Count to ten.""#), "{line}");
}

#[test]
fn generate_batch_mode_jsonl_in_input_order() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_dir(tmp.path());
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"instruction\": \"Name a fruit.\"}\n\n{\"instruction\": \"Summarize.\", \"context\": \"A long text about \
         cats.\"}\n{\"instruction\": \"Why is the sky blue? Explain in detail.\", \"context\": null}\n",
    )
    .unwrap();
    let run = |extra: &[&str], out: &Path| {
        let st = Command::new(env!("CARGO_BIN_EXE_dolly"))
            .args(["--threads", "1", "generate"])
            .arg(&m)
            .arg("--tokenizer")
            .arg(tokenizer())
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(out)
            .args(["--greedy", "--max-new-tokens", "12"])
            .args(extra)
            .status()
            .unwrap();
        assert!(st.success());
        let text = std::fs::read_to_string(out).unwrap();
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).collect::<Vec<_>>()
    };
    let batched = run(&["--batch-size", "8"], &tmp.path().join("a.jsonl"));
    let alone = run(&["--batch-size", "1"], &tmp.path().join("b.jsonl"));
    assert_eq!(batched.len(), 3);
    assert_eq!(batched[0]["instruction"], "Name a fruit.");
    assert_eq!(batched[1]["context"], "A long text about cats.");
    for (b, a) in batched.iter().zip(&alone) {
        assert_eq!(b["generated_token_ids"], a["generated_token_ids"]);
        assert_eq!(b["response"], a["response"]);
        let fr = b["finish_reason"].as_str().unwrap();
        assert!(fr == "stop" || fr == "length");
        assert!(b["response"].is_string());
    }
    // a bad line is reported with file:line
    std::fs::write(&input, "{\"instruction\": \"ok\"}\n{\"context\": \"no instruction\"}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dolly"))
        .arg("generate")
        .arg(&m)
        .arg("--tokenizer")
        .arg(tokenizer())
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("in.jsonl:2"), "{e}");
}

/// A non-loopback `--host` without an API key is refused before anything loads (naming --api-key and
/// --insecure); with --insecure, or a loopback host, the flags pass and the (missing) model is what fails.
#[test]
fn non_loopback_host_needs_an_api_key() {
    let serve = |extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_dolly"))
            .args(["serve", "/nonexistent/model", "--port", "0"])
            .args(extra)
            .env_remove("DOLLY_API_KEY")
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = serve(&["--host", "0.0.0.0"]);
    assert!(e.contains("--api-key") && e.contains("--insecure"), "{e}");
    for ok in [&["--host", "0.0.0.0", "--insecure"][..], &["--host", "0.0.0.0", "--api-key", "k1"], &["--host", "::1"]]
    {
        let e = serve(ok);
        assert!(!e.contains("reachable from other machines"), "{ok:?}: {e}");
    }
    let e = serve(&["--host", "127.0.0.1", "--api-key", "bad key"]);
    assert!(e.contains("--api-key must be printable ASCII"), "{e}");
}
