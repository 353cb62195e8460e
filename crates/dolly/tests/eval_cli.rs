//! `dolly eval` end to end through the binary: on a `dolly train` output directory it reads the run's split
//! settings and its held-out loss equals the trainer's own final `eval_loss` (the reference: metrics.jsonl of the
//! same run; the two batch the examples differently, so f32 rounding only); the per-category rows add up to the
//! total; sample answers are one per category with the reference response beside them, and greedy answers equal
//! `dolly generate --greedy`'s for the same instruction; bad flags are clear errors before any work.
//! Uses the `dolly train` CLI tests' fixture (2-layer pythia-14m widths, the first 120 dolly-15k records).

mod cli;
use cli::{dolly, err, ok, Fixture};
use serde_json::Value;

#[test]
fn eval_matches_the_trainers_eval_and_writes_samples() {
    let f = Fixture::new();
    ok(&f.run("r", &["--max-steps", "7"]));
    let out = f.dir.path().join("r");
    let eval_rows: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["eval_loss"].as_f64())
        .collect();
    let want = *eval_rows.last().expect("the run evaluated at step 7");
    let metrics = f.dir.path().join("m.json");
    let answers = f.dir.path().join("a.jsonl");
    let o = dolly()
        .arg("eval")
        .arg(&out)
        .arg("--tokenizer")
        .arg(test_support::shared_file("20B_tokenizer.json"))
        .arg("--metrics-json")
        .arg(&metrics)
        .args(["--samples", "1", "--greedy", "--max-new-tokens", "8", "--batch-size", "3"])
        .arg("--output")
        .arg(&answers)
        .output()
        .unwrap();
    ok(&o);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("split settings of the training run"), "{log}");
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert_eq!(m["examples"], 8, "--test-size 8 of the run");
    let got = m["loss"].as_f64().unwrap();
    assert!((got - want).abs() <= 1e-5 * want.abs(), "dolly eval {got} vs the trainer's eval_loss {want}");
    let cats = m["categories"].as_object().unwrap();
    let tokens: u64 = cats.values().map(|c| c["tokens"].as_u64().unwrap()).sum();
    assert_eq!(tokens, m["tokens"].as_u64().unwrap());
    let weighted: f64 = cats.values().map(|c| c["loss"].as_f64().unwrap() * c["tokens"].as_f64().unwrap()).sum();
    assert!((weighted / tokens as f64 - got).abs() < 1e-9);
    // q8_0 weights: the held-out loss moves by well under 1% (ggml's 8-bit blocks)
    let mq = f.dir.path().join("mq.json");
    let o = dolly()
        .arg("eval")
        .arg(&out)
        .arg("--tokenizer")
        .arg(test_support::shared_file("20B_tokenizer.json"))
        .args(["--quantize", "q8_0", "--metrics-json"])
        .arg(&mq)
        .output()
        .unwrap();
    ok(&o);
    let q: Value = serde_json::from_str(&std::fs::read_to_string(&mq).unwrap()).unwrap();
    let ql = q["loss"].as_f64().unwrap();
    assert!((ql - got).abs() < 0.01 * got, "q8_0 loss {ql} vs f32 {got}");
    assert_eq!(q["tokens"], m["tokens"]);
    // the printed table ends with the total
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.lines().last().unwrap().starts_with("all "), "{table}");

    let rows: Vec<Value> =
        std::fs::read_to_string(&answers).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), cats.len(), "one sample answer per category");
    let data = std::fs::read_to_string(f.dir.path().join("d.jsonl")).unwrap();
    let row = &rows[0];
    assert!(data.contains(&serde_json::to_string(&row["reference"]).unwrap()), "reference is a record's response");
    let mut g = dolly();
    g.arg("generate").arg(&out).arg(row["instruction"].as_str().unwrap());
    if let Some(c) = row["context"].as_str().filter(|c| !c.is_empty()) {
        g.arg("--context").arg(c);
    }
    let go = g
        .arg("--tokenizer")
        .arg(test_support::shared_file("20B_tokenizer.json"))
        .args(["--greedy", "--max-new-tokens", "8", "--no-stream"])
        .output()
        .unwrap();
    ok(&go);
    let printed = String::from_utf8_lossy(&go.stdout);
    assert_eq!(printed.trim(), row["answer"].as_str().unwrap().trim(), "greedy answer differs from dolly generate");
}

#[test]
fn bad_eval_flags_are_refused_before_work() {
    let f = Fixture::new();
    let m = f.dir.path().join("model");
    let run = |extra: &[&str]| {
        dolly()
            .arg("eval")
            .arg(&m)
            .arg("--tokenizer")
            .arg(test_support::shared_file("20B_tokenizer.json"))
            .arg("--dataset")
            .arg(f.dir.path().join("d.jsonl"))
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(err(&run(&["--samples", "2"])).contains("needs --output"));
    assert!(err(&run(&["--split", "dev"])).contains("dev"));
    assert!(err(&run(&["--batch-size", "0"])).contains("--batch-size"));
    let dir = f.dir.path().to_str().unwrap().to_string();
    assert!(err(&run(&["--metrics-json", &dir])).contains("is a directory"));
    assert!(err(&run(&["--max-length", "99999"])).contains("context window"));
    // no run under a plain model directory: the defaults are used and said so
    let o = run(&["--test-size", "4", "--max-length", "256"]);
    let log = cli::stderr_ok(&o);
    assert!(log.contains("dolly train's defaults"), "{log}");
}
