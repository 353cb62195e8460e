//! Shared by the `dolly train` CLI tests: the binary with test-safe environment, and a
//! fixture with a small random Pythia-shaped model (2 layers, pythia-14m widths) and the first 120 records of the
//! shared dolly-15k.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub fn dolly() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dolly"));
    c.arg("--threads").arg("2");
    c.env_remove("DOLLY_FAULT_WRITE").env_remove("DOLLY_FAULT_ABORT_IN_CHECKPOINT");
    c.env_remove("DOLLY_FAULT_PAUSE_AFTER_STEP").env("HF_HUB_OFFLINE", "1");
    c
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let data = std::fs::read_to_string(test_support::shared_file("databricks-dolly-15k.jsonl")).unwrap();
        let first: String = data.lines().take(120).map(|l| format!("{l}\n")).collect();
        std::fs::write(dir.path().join("d.jsonl"), first).unwrap();
        init_model(&dir.path().join("model"));
        Fixture { dir }
    }

    pub fn train_cmd(&self, out: &str, extra: &[&str]) -> Command {
        let mut c = dolly();
        c.arg("train")
            .arg("--input-model")
            .arg(self.dir.path().join("model"))
            .arg("--tokenizer")
            .arg(test_support::shared_file("20B_tokenizer.json"))
            .arg("--training-dataset")
            .arg(self.dir.path().join("d.jsonl"))
            .arg("--local-output-dir")
            .arg(self.dir.path().join(out))
            .args(["--per-device-train-batch-size", "2", "--test-size", "8", "--max-length", "256", "--lr", "1e-3"])
            .args(["--logging-steps", "1", "--eval-steps", "7", "--save-steps", "5", "--save-total-limit", "3"])
            .args(extra);
        c
    }

    pub fn run(&self, out: &str, extra: &[&str]) -> std::process::Output {
        self.train_cmd(out, extra).output().unwrap()
    }

    pub fn losses(&self, out: &str) -> Vec<(u64, u64)> {
        let text = std::fs::read_to_string(self.dir.path().join(out).join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| {
                let step = v["step"].as_u64()?;
                let loss = v.get("loss").or(v.get("eval_loss"))?.as_f64()?;
                Some((step, loss.to_bits()))
            })
            .collect()
    }
}

pub fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "dolly failed: {}", String::from_utf8_lossy(&o.stderr));
}

/// `dolly init-model` of the tests' model (2-layer pythia-14m, seed 3, no tokenizer: tests pass the shared one).
pub fn init_model(out: &Path) {
    let o = dolly()
        .args([
            "init-model",
            "--preset",
            "pythia-14m",
            "--num-hidden-layers",
            "2",
            "--seed",
            "3",
            "--tokenizer",
            "none",
        ])
        .arg("--output")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "dolly init-model failed: {}", String::from_utf8_lossy(&o.stderr));
}

/// stderr of a failed run (asserts it failed).
pub fn err(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "dolly succeeded: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stderr of a successful run (asserts it succeeded).
pub fn stderr_ok(o: &std::process::Output) -> String {
    ok(o);
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Names under `dir` that start with `checkpoint-`, sorted by step.
pub fn checkpoints(dir: &Path) -> Vec<String> {
    let mut v: Vec<(u64, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| Some((n.strip_prefix("checkpoint-")?.parse().ok()?, n.clone())))
        .collect();
    v.sort();
    v.into_iter().map(|(_, n)| n).collect()
}
