//! `dolly train` end to end through the binary: exact resume after `kill -9` (at a step, and halfway through
//! writing a checkpoint) gives bit-identical losses at every step; batch 8 equals batch 4 x accumulation 2;
//! bad input gives a clear error and leaves the last complete checkpoint intact. Uses a small random
//! Pythia-shaped model, the shared 20B tokenizer and the first records of the shared dolly-15k.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;

mod cli;
use cli::{ok, Fixture};

#[test]
fn resume_after_kill_is_bit_identical() {
    let f = Fixture::new();
    ok(&f.run("straight", &["--max-steps", "20"]));
    let want = f.losses("straight");
    assert_eq!(want.len(), 20 + 2, "20 train rows + 2 eval rows");

    // 1) kill -9 at step 12 (after checkpoint-10), resume from latest.
    let mut child = f
        .train_cmd("killed", &["--max-steps", "20"])
        .env("DOLLY_FAULT_PAUSE_AFTER_STEP", "12")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 && !line.contains("paused after step 12") {
        line.clear();
    }
    assert!(line.contains("paused after step 12"), "never reached step 12");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    ok(&f.run("killed", &["--max-steps", "20", "--resume-from-checkpoint", "latest"]));
    assert_eq!(f.losses("killed"), want, "losses after kill -9 + resume differ");

    // 2) die halfway through writing checkpoint-15; `latest` must skip it and use checkpoint-10.
    let o = f.train_cmd("torn", &["--max-steps", "20"]).env("DOLLY_FAULT_ABORT_IN_CHECKPOINT", "15").output().unwrap();
    assert!(!o.status.success());
    let torn = f.dir.path().join("torn/checkpoint-15");
    assert!(torn.join("shard-00000-of-00001.safetensors").exists() && !torn.join("COMPLETE").exists());
    let o = f.run("torn", &["--max-steps", "20", "--resume-from-checkpoint", "latest"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("checkpoint-10 (step 10)"));
    assert_eq!(f.losses("torn"), want, "losses after a torn checkpoint + resume differ");
    // retention: at most 3 complete checkpoints remain, the newest ones
    let mut left: Vec<String> = std::fs::read_dir(f.dir.path().join("torn"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    left.sort();
    assert_eq!(left, ["checkpoint-10", "checkpoint-15", "checkpoint-20"]);
}

fn final_params(dir: &Path) -> Vec<f32> {
    neox::Model::load(dir).unwrap().params().to_vec()
}

#[test]
fn accumulation_equals_bigger_batch() {
    let f = Fixture::new();
    let common = ["--max-steps", "3", "--test-size", "0", "--save-steps", "100"];
    let mut a: Vec<&str> = common.to_vec();
    a.extend(["--per-device-train-batch-size", "8"]);
    ok(&f.run("b8", &a));
    let mut b: Vec<&str> = common.to_vec();
    b.extend(["--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2"]);
    ok(&f.run("b4x2", &b));
    let (la, lb) = (f.losses("b8"), f.losses("b4x2"));
    assert_eq!(la.len(), 3);
    for ((sa, a), (sb, b)) in la.iter().zip(&lb) {
        let (a, b) = (f64::from_bits(*a), f64::from_bits(*b));
        assert_eq!(sa, sb);
        assert!((a - b).abs() <= 1e-5 + 1e-5 * b.abs(), "step {sa}: loss {a} vs {b}");
    }
    let (pa, pb) = (final_params(&f.dir.path().join("b8")), final_params(&f.dir.path().join("b4x2")));
    for (i, (x, y)) in pa.iter().zip(&pb).enumerate() {
        assert!((x - y).abs() <= 1e-5 + 1e-4 * y.abs(), "param {i}: {x} vs {y}");
    }
}

#[test]
fn bad_input_is_a_clear_error_and_keeps_the_last_checkpoint() {
    let f = Fixture::new();
    let err = |o: std::process::Output| {
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let cfg = f.dir.path().join("c.toml");
    std::fs::write(&cfg, "lr = 1e-4\nlearning_rate = 3\n").unwrap();
    let e = err(f.run("x", &["--config", cfg.to_str().unwrap()]));
    assert!(e.contains("c.toml") && e.contains("learning_rate"), "{e}");
    let e = err(f.run("x", &["--test-size", "2.5"]));
    assert!(e.contains("test size"), "{e}");
    let e = err(f.run("x", &["--lr-scheduler", "cosine"]));
    assert!(e.contains("cosine"), "{e}");
    let e = err(f.run("x", &["--bf16", "maybe"]));
    assert!(e.contains("maybe"), "{e}");
    let bad = f.dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"instruction\": \"a\", \"context\": \"\", \"response\": \"b\", \"category\": \"x\"}\n{oops\n",
    )
    .unwrap();
    let mut c = f.train_cmd("x", &[]);
    c.arg("--training-dataset").arg(&bad);
    let e = err(c.output().unwrap());
    assert!(e.contains("bad.jsonl:2"), "{e}");
    let ro = f.dir.path().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("file"), "x").unwrap();
    let e = err(f.run("ro/file/sub", &["--max-steps", "1"]));
    assert!(e.contains("output directory"), "{e}");

    // Full disk while writing checkpoint-10: error, and checkpoint-5 stays complete and verifiable.
    let o =
        f.train_cmd("full", &["--max-steps", "12"]).env("DOLLY_FAULT_WRITE", "checkpoint-10/shard-").output().unwrap();
    let e = err(o);
    assert!(e.contains("No space left on device"), "{e}");
    let out = f.dir.path().join("full");
    assert!(train::checkpoint::verify(&out.join("checkpoint-5")).is_ok());
    assert_eq!(train::checkpoint::latest(&out), Some(out.join("checkpoint-5")));
    ok(&f.run("full", &["--max-steps", "12", "--resume-from-checkpoint", "latest"]));
}

/// `--bf16 true`: bf16 mixed precision trains (finite losses near but not equal to float32's), resumes
/// bit-identically (the checkpoint holds the f32 master weights; the bf16 view is rebuilt from them), and the
/// final model is saved in bfloat16.
#[test]
fn bf16_mixed_precision_trains_and_resumes_exactly() {
    let f = Fixture::new();
    ok(&f.run("f32", &["--max-steps", "10"]));
    ok(&f.run("bf16", &["--max-steps", "10", "--bf16", "true"]));
    let (lf, lb) = (f.losses("f32"), f.losses("bf16"));
    assert_eq!(lb.len(), lf.len());
    for ((sf, a), (sb, b)) in lf.iter().zip(&lb) {
        let (a, b) = (f64::from_bits(*a), f64::from_bits(*b));
        assert_eq!(sf, sb);
        assert!(b.is_finite() && ((a - b) / a).abs() < 0.05, "step {sf}: bf16 loss {b} vs f32 {a}");
    }
    assert_ne!(lf, lb, "bf16 run identical to f32: no bf16 compute");
    // die while writing checkpoint-10, resume from checkpoint-5
    let mut cmd = f.train_cmd("half", &["--max-steps", "10", "--bf16", "true"]);
    assert!(!cmd.env("DOLLY_FAULT_ABORT_IN_CHECKPOINT", "10").output().unwrap().status.success());
    ok(&f.run("half", &["--max-steps", "10", "--bf16", "true", "--resume-from-checkpoint", "latest"]));
    assert_eq!(f.losses("half"), lb, "bf16 resume differs");
    let st = std::fs::read(f.dir.path().join("bf16/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&st[8..8 + n]);
    assert!(header.contains("\"BF16\"") && !header.contains("\"F32\""), "final model not saved in bf16");
}
