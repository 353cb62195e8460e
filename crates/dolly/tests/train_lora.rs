//! `dolly train --lora-r` end to end through the binary: the output is a PEFT adapter directory that loads onto
//! the base (and nothing else of the base is written); a resume after `kill -9` gives bit-identical losses and
//! adapter (dropout masks included); a resume with other LoRA settings is refused naming them; a LoRA run with
//! ZeRO stages 1-3 is refused; the memory a LoRA run reports and uses is accounted at pythia-160m widths.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

mod cli;
use cli::{err, ok, Fixture};

const LORA: [&str; 8] = ["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--bf16", "true"];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = LORA.to_vec();
    v.extend(extra);
    v
}

#[test]
fn lora_output_is_a_peft_adapter_and_resume_is_bit_identical() {
    let f = Fixture::new();
    ok(&f.run("straight", &args(&["--max-steps", "8"])));
    let out = f.dir.path().join("straight");
    for file in ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    assert!(!out.join("model.safetensors").exists(), "a LoRA run writes its adapter, not the base");
    // the adapter loads onto the base (resized to the tokenizer's 50280 rows as the run did)
    let mut base = neox::Model::load_bf16(&f.dir.path().join("model")).unwrap();
    base.resize_vocab(50280).unwrap();
    let meta = base.load_adapter(&out).unwrap();
    assert_eq!(meta.lora.r, 4);
    assert_eq!(meta.lora.token_rows, vec![50277, 50278, 50279]);
    let want = f.losses("straight");
    assert_eq!(want.len(), 8 + 1, "8 train rows + 1 eval row");
    // the output directory and the last checkpoint answer the same (the adapter of step 8 either way)
    let answer = |model: &std::path::Path| {
        let o = cli::dolly()
            .arg("generate")
            .arg(model)
            .args(["Say hi.", "--greedy", "--max-new-tokens", "6"])
            .output()
            .unwrap();
        cli::stderr_ok(&o);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(answer(&out), answer(&out.join("checkpoint-8")));

    // kill -9 at step 6 (after checkpoint-5), resume from latest
    let mut child = f
        .train_cmd("killed", &args(&["--max-steps", "8"]))
        .env("DOLLY_FAULT_PAUSE_AFTER_STEP", "6")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut e = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while e.read_line(&mut line).unwrap() > 0 && !line.contains("paused after step 6") {
        line.clear();
    }
    assert!(line.contains("paused after step 6"), "never reached step 6");
    child.kill().unwrap();
    child.wait().unwrap();
    let ckpt = f.dir.path().join("killed/checkpoint-5");
    assert!(ckpt.join("adapter_config.json").is_file() && ckpt.join("COMPLETE").is_file());
    ok(&f.run("killed", &args(&["--max-steps", "8", "--resume-from-checkpoint", "latest"])));
    assert_eq!(f.losses("killed"), want, "losses after kill -9 + resume differ");
    let a = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(f.dir.path().join("killed/adapter_model.safetensors")).unwrap();
    assert!(a == b, "the resumed adapter differs from the straight run's");

    // other LoRA settings on resume are refused, naming each
    let o = f.run(
        "killed",
        &[
            "--lora-r",
            "8",
            "--lora-alpha",
            "8",
            "--lora-dropout",
            "0.1",
            "--bf16",
            "true",
            "--max-steps",
            "10",
            "--resume-from-checkpoint",
            "latest",
        ],
    );
    let msg = err(&o);
    assert!(msg.contains("--lora-r was 4 in the checkpoint, now 8"), "{msg}");
}

#[test]
fn lora_settings_are_validated() {
    let f = Fixture::new();
    for (bad, want) in [
        (vec!["--lora-r", "0"], "lora-r must be between 1"),
        (vec!["--lora-r", "4", "--lora-dropout", "1"], "lora-dropout must be in [0, 1)"),
        (vec!["--lora-r", "4", "--lora-alpha=-1"], "lora-alpha must be"),
        (vec!["--lora-r", "4", "--lora-target-modules", "q_proj"], "unknown LoRA target module `q_proj`"),
        (vec!["--lora-r", "4", "--zero-stage", "2"], "zero-stage 2 with LoRA"),
        (vec!["--lora-r", "4", "--train-token-rows", "some"], "train-token-rows must be"),
        (vec!["--lora-r", "100000"], "lora-r must be between 1"),
        (vec!["--lora-r", "200"], "lora_r 200 must be between 1 and 128"),
    ] {
        let mut a = bad.clone();
        a.extend(["--max-steps", "1"]);
        let msg = err(&f.run("bad", &a));
        assert!(msg.contains(want), "{bad:?}: `{msg}` should say `{want}`");
    }
}

/// A LoRA run at pythia-160m widths (12 layers, hidden 768) with a bf16 base: the estimate it prints counts the
/// base at 2 bytes per parameter and the adapter's state only, and the peak resident memory it records stays
/// within that estimate plus the process's fixed costs (tokenizer, dataset, code), far below what a full
/// fine-tune needs (~16 bytes per parameter).
#[test]
fn lora_memory_at_160m_is_the_frozen_bf16_base_plus_the_adapter() {
    let f = Fixture::new();
    let base = f.dir.path().join("m160");
    let o = cli::dolly()
        .args(["init-model", "--preset", "pythia-160m", "--dtype", "bf16", "--tokenizer", "none", "--output"])
        .arg(&base)
        .output()
        .unwrap();
    ok(&o);
    let mut c = cli::dolly();
    c.arg("train")
        .arg("--input-model")
        .arg(&base)
        .arg("--tokenizer")
        .arg(test_support::shared_file("20B_tokenizer.json"))
        .arg("--training-dataset")
        .arg(f.dir.path().join("d.jsonl"))
        .arg("--local-output-dir")
        .arg(f.dir.path().join("out160"))
        .args(["--per-device-train-batch-size", "1", "--test-size", "0", "--max-length", "256", "--max-steps", "2"])
        .args(["--lora-r", "16", "--bf16", "true", "--gradient-checkpointing", "true", "--save-steps", "100"]);
    let msg = cli::stderr_ok(&c.output().unwrap());
    let mem = msg.lines().find(|l| l.starts_with("memory: ")).expect("a memory line");
    // "memory: ~N MiB (frozen base 310 MiB, adapter ..."
    let mib = |key: &str| -> f64 {
        let at = mem.find(key).unwrap_or_else(|| panic!("`{key}` in `{mem}`")) + key.len();
        let num: String = mem[at..].trim_start().chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        let v: f64 = num.parse().unwrap();
        if mem[at..].trim_start()[num.len()..].trim_start().starts_with("GiB") {
            v * 1024.0
        } else {
            v
        }
    };
    let params = 162_322_944.0; // pythia-160m with the 50280-row vocabulary (memory::param_count)
    assert!((mib("frozen base") - 2.0 * params / 1048576.0).abs() < 2.0, "{mem}");
    assert!(!mem.contains("transposed"), "a bf16 base has no transposed copy: {mem}");
    let total = mib("memory: ~");
    let text = std::fs::read_to_string(f.dir.path().join("out160/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let peak = last["peak_rss_bytes"][0].as_f64().unwrap() / 1048576.0;
    // fixed costs measured beside the estimate: the tokenizer, 120 records, code and allocator slack
    assert!(peak < total + 400.0, "peak RSS {peak:.0} MiB vs estimate {total:.0} MiB ({mem})");
    // on an AMX CPU the run may keep the frozen weights packed (4 bytes per weight, shown in the estimate)
    let packed = if mem.contains("packed weights") { mib("packed weights") } else { 0.0 };
    assert!(packed <= 4.1 * params / 1048576.0, "{mem}");
    let below = 16.0 * params / 1048576.0 / 3.0 + packed;
    assert!(peak < below, "peak RSS {peak:.0} MiB is not far below a full fine-tune's ({mem})");
}
