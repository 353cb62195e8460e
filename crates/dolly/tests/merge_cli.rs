//! `dolly merge` and `--adapter` as processes. Models: the PEFT fixture `crates/neox/tests/fixtures/lora-tiny`
//! (a bf16 base with Dolly's 50280 rows and the adapter PEFT 0.21.2 wrote for it, `tools/make_lora_goldens.py`),
//! and a 2-layer pythia-14m with Pythia's 50304 rows plus an adapter written by `Model::save_adapter` with
//! random values (so the resize to the tokenizer's 50280 rows is exercised). Tokenizer: the shared 20B one.
//!
//! References: the merged tensors must equal `Model::merged_tensor` of the same base + adapter (the engine's f32
//! merge, itself checked against PEFT's merge_and_unload in `crates/neox/tests/lora_parity.rs`), bitwise in f32
//! and rounded once (half's round-to-nearest-even) in bf16/f16; the merged model must give the same greedy tokens
//! as the unmerged adapter (the two differ by f32 rounding only, ~1e-6 in the fixture's logits). No timings.

use neox::lora::{LoraConfig, Target};
use neox::{LoraInit, Model, NeoxConfig, SaveDtype};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../neox/tests/fixtures/lora-tiny")
}

fn tokenizer() -> PathBuf {
    test_support::shared_file("20B_tokenizer.json")
}

/// `dolly` offline, with a hub cache under `home` that is never reached.
fn dolly(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dolly"));
    c.args(["--threads", "2"]);
    c.env("HF_HOME", home.join("hf")).env("HF_HUB_OFFLINE", "1").env("HF_ENDPOINT", "http://127.0.0.1:9");
    c.stdin(Stdio::null());
    c
}

fn run(c: &mut Command) -> (bool, String, String) {
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(c: &mut Command) -> String {
    let (ok, out, err) = run(c);
    assert!(ok, "dolly failed: {err}");
    out
}

/// Instructions short enough for the fixture's 64 positions with 8 new tokens.
const INSTRUCTIONS: &str = "{\"instruction\": \"Name a fruit.\"}\n{\"instruction\": \"Why is the sky blue?\"}\n\
                            {\"instruction\": \"Summarize.\", \"context\": \"Cats sleep.\"}\n";

/// Greedy token ids of `dolly generate MODEL ARGS` for `INSTRUCTIONS` (batch mode).
fn greedy(home: &Path, model: &Path, args: &[&str]) -> Vec<Vec<u64>> {
    let input = home.join("instructions.jsonl");
    std::fs::write(&input, INSTRUCTIONS).unwrap();
    let out = ok(dolly(home)
        .arg("generate")
        .arg(model)
        .args(args)
        .args(["--greedy", "--max-new-tokens", "8", "--input"])
        .arg(&input));
    out.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["generated_token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
        })
        .collect()
}

/// (dtype, shape) of every tensor in a safetensors file's header.
fn header(path: &Path) -> BTreeMap<String, (String, Vec<u64>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    h.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
            (k.clone(), (v["dtype"].as_str().unwrap().to_string(), shape))
        })
        .collect()
}

/// `dir`'s model.safetensors against `reference` (base + adapter attached): the base's names and shapes (from
/// `reference`'s layout, the resized vocabulary included), dtype `st_dtype`, each value `round(merged_tensor)`.
fn check_merged(dir: &Path, reference: &Model, st_dtype: &str, round: impl Fn(f32) -> f32) {
    let path = dir.join("model.safetensors");
    let h = header(&path);
    let want: BTreeMap<String, (String, Vec<u64>)> = reference
        .layout
        .params
        .iter()
        .map(|p| (p.name.clone(), (st_dtype.to_string(), p.shape.iter().map(|&d| d as u64).collect())))
        .collect();
    assert_eq!(h, want, "names, dtypes and shapes of {}", path.display());
    let specs: Vec<(&str, &[usize])> =
        reference.layout.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
    let got = neox::weights::load_tensors(&path, &specs).unwrap();
    for (p, g) in reference.layout.params.iter().zip(&got) {
        let w: Vec<f32> = reference.merged_tensor(p).into_iter().map(&round).collect();
        let bad = g.iter().zip(&w).position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(bad.is_none(), "{}: element {bad:?}: {:?} != {:?}", p.name, bad.map(|i| g[i]), bad.map(|i| w[i]));
    }
    let cfg: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"].as_u64(), Some(reference.config.vocab_size as u64));
    let torch = match st_dtype {
        "F32" => "float32",
        "BF16" => "bfloat16",
        _ => "float16",
    };
    assert_eq!(cfg["torch_dtype"].as_str(), Some(torch));
}

/// The fixture's base with its PEFT adapter attached (the reference of the merge).
fn fixture_reference() -> Model {
    let mut m = Model::load(&fixture()).unwrap();
    m.load_adapter(&fixture().join("adapter")).unwrap();
    m
}

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

fn f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

#[test]
fn merged_fixture_tensors_are_the_engines_merge_rounded_once_and_answer_as_the_unmerged_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (base, adapter) = (fixture(), fixture().join("adapter"));
    let reference = fixture_reference();
    for (flag, st, round) in [("f32", "F32", (|x| x) as fn(f32) -> f32), ("bf16", "BF16", bf16), ("f16", "F16", f16)] {
        let out = t.join(format!("merged-{flag}"));
        let tok = tokenizer();
        ok(dolly(t)
            .arg("merge")
            .arg(&base)
            .arg(&adapter)
            .arg("--output")
            .arg(&out)
            .args(["--dtype", flag])
            .arg("--tokenizer")
            .arg(&tok));
        check_merged(&out, &reference, st, round);
        assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), std::fs::read(&tok).unwrap());
    }
    // the default dtype is the base's (bfloat16 in the fixture's config.json)
    ok(dolly(t).arg("merge").arg(&base).arg(&adapter).arg("--output").arg(t.join("merged-default")));
    check_merged(&t.join("merged-default"), &reference, "BF16", bf16);
    assert!(!t.join("merged-default").join("tokenizer.json").exists(), "neither directory has a tokenizer");
    // nothing but the merged directories is left beside them
    let mut names: Vec<String> =
        std::fs::read_dir(t).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["merged-bf16", "merged-default", "merged-f16", "merged-f32"]);

    let tok = tokenizer();
    let tok = tok.to_str().unwrap();
    let unmerged = greedy(t, &base, &["--adapter", adapter.to_str().unwrap(), "--tokenizer", tok]);
    assert_eq!(greedy(t, &t.join("merged-f32"), &[]), unmerged, "merged f32 vs --adapter");
    assert_ne!(greedy(t, &base, &["--tokenizer", tok]), unmerged, "the adapter changes the answers");
    // bf16 decode: the base's panels hold the same (bf16) values, the branch is added in f32, the KV cache is bf16
    let bf16_decode = greedy(t, &base, &["--adapter", adapter.to_str().unwrap(), "--tokenizer", tok, "--bf16"]);
    assert_eq!(bf16_decode, unmerged, "--bf16 with --adapter");
}

/// A 2-layer pythia-14m with Pythia's 50304 rows (f32) and an adapter for it after Dolly's resize to 50280
/// (random A, B and token rows, saved by `Model::save_adapter` naming the base by its absolute path).
fn pythia_like(dir: &Path) -> (PathBuf, PathBuf) {
    let mut cfg = NeoxConfig::preset("pythia-14m").unwrap();
    cfg.num_hidden_layers = 2;
    cfg.vocab_size = 50304;
    let base = dir.join("base");
    let mut m = Model::new_random(cfg, 7);
    m.save(&base, SaveDtype::F32).unwrap();
    m.resize_vocab(50280).unwrap();
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        rslora: false,
        token_rows: vec![50277, 50278, 50279],
    };
    let layout = neox::lora::AdapterLayout::new(&m.config, &m.layout, &lora);
    let mut rng = common::Rng::new(11);
    let values = (0..layout.total).map(|_| ((rng.next_f64() * 2.0 - 1.0) * 0.3) as f32).collect();
    m.attach_lora(lora, LoraInit::Values(values)).unwrap();
    let adapter = dir.join("adapter");
    m.save_adapter(&adapter, base.to_str().unwrap()).unwrap();
    std::fs::copy(tokenizer(), adapter.join("tokenizer.json")).unwrap();
    (base, adapter)
}

#[test]
fn a_pythia_vocabulary_is_resized_to_the_tokenizer_and_an_adapter_directory_names_its_base() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (base, adapter) = pythia_like(t);
    let reference = |bf16_base: bool| {
        let mut m = if bf16_base { Model::load_bf16(&base).unwrap() } else { Model::load(&base).unwrap() };
        m.resize_vocab(50280).unwrap();
        m.load_adapter(&adapter).unwrap();
        m
    };
    // BASE omitted: the adapter's base_model_name_or_path; the tokenizer (and its vocabulary) is the adapter's
    ok(dolly(t).arg("merge").arg(&adapter).arg("--output").arg(t.join("m32")));
    check_merged(&t.join("m32"), &reference(false), "F32", |x| x);
    assert!(t.join("m32/tokenizer.json").is_file());
    // bf16 output holds the base in bf16 (its f32 values rounded first): the merge of that base, rounded once
    ok(dolly(t).arg("merge").arg(&base).arg(&adapter).args(["--dtype", "bf16", "--output"]).arg(t.join("m16")));
    check_merged(&t.join("m16"), &reference(true), "BF16", bf16);

    let unmerged = greedy(t, &base, &["--adapter", adapter.to_str().unwrap()]);
    assert_eq!(greedy(t, &t.join("m32"), &[]), unmerged, "merged f32 vs --adapter");
    assert_eq!(greedy(t, &adapter, &[]), unmerged, "MODEL as the adapter directory vs --adapter");
    let (ok_, _, e) = run(dolly(t).arg("generate").arg(&adapter).args(["hi", "--max-new-tokens", "2", "--greedy"]));
    assert!(ok_, "{e}");
    assert!(e.contains("resizing the base's vocabulary 50304 -> 50280"), "{e}");
}

#[test]
fn an_adapter_for_another_base_shape_is_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (base, _) = pythia_like(t);
    let wrong = fixture().join("adapter");
    let tensor = "base_model.model.gpt_neox.embed_in.token_adapter.trainable_tokens_delta";
    let out = t.join("out");
    let (ok_, _, e) = run(dolly(t).arg("merge").arg(&base).arg(&wrong).arg("--output").arg(&out));
    assert!(!ok_);
    assert!(e.contains(tensor) && e.contains("shape [3, 16]") && e.contains("[3, 128]"), "{e}");
    assert!(e.contains("does not fit the base"), "{e}");
    assert!(!out.exists());
    assert!(std::fs::read_dir(t).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("tmp")));
    let (ok_, _, e) = run(dolly(t)
        .arg("generate")
        .arg(&base)
        .arg("--adapter")
        .arg(&wrong)
        .arg("--tokenizer")
        .arg(tokenizer())
        .arg("hi"));
    assert!(!ok_);
    assert!(e.contains(tensor), "{e}");
}

#[test]
fn adapter_paths_and_merge_outputs_are_checked_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (base, adapter) = (fixture(), fixture().join("adapter"));
    let tok = tokenizer();
    let gen = |args: &[&Path]| {
        let mut c = dolly(t);
        c.arg("generate").args(args).arg("--tokenizer").arg(&tok).args(["hi", "--max-new-tokens", "4"]);
        run(&mut c)
    };
    let missing = t.join("no-such-adapter");
    let (ok_, _, e) = gen(&[&base, Path::new("--adapter"), &missing]);
    assert!(!ok_);
    assert!(e.contains("--adapter") && e.contains("no-such-adapter: not a directory"), "{e}");
    let (ok_, _, e) = gen(&[&base, Path::new("--adapter"), &base]);
    assert!(!ok_);
    assert!(e.contains("no adapter_config.json in it"), "{e}");
    let (ok_, _, e) = gen(&[&adapter, Path::new("--adapter"), &adapter]);
    assert!(!ok_);
    assert!(e.contains("is itself an adapter directory"), "{e}");
    // an adapter directory as MODEL needs its base_model_name_or_path to resolve
    let lost = t.join("lost");
    std::fs::create_dir(&lost).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter.join(f), lost.join(f)).unwrap();
    }
    let (ok_, _, e) = gen(&[&lost]);
    assert!(!ok_);
    assert!(e.contains("the base model `lora-tiny`") && e.contains("base_model_name_or_path"), "{e}");
    // ... which PEFT resolves relative to the adapter directory's parent too
    let home = t.join("runs");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::symlink(&base, home.join("lora-tiny")).unwrap();
    std::fs::rename(&lost, home.join("adapter")).unwrap();
    let (ok_, _, e) = gen(&[&home.join("adapter")]);
    assert!(ok_, "{e}");

    let merge = |out: &Path, extra: &[&str]| {
        let mut c = dolly(t);
        c.arg("merge").arg(&base).arg(&adapter).arg("--output").arg(out).args(extra);
        run(&mut c)
    };
    let file = t.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (ok_, _, e) = merge(&file, &[]);
    assert!(!ok_);
    assert!(e.contains("exists and is not a directory"), "{e}");
    let (ok_, _, e) = merge(&adapter, &["--force"]);
    assert!(!ok_);
    assert!(e.contains("is the adapter directory"), "{e}");
    let (ok_, _, e) = merge(&base, &["--force"]);
    assert!(!ok_);
    assert!(e.contains("is the base model directory"), "{e}");
    let out = t.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("stale.txt"), "old").unwrap();
    let (ok_, _, e) = merge(&out, &[]);
    assert!(!ok_);
    assert!(e.contains("not empty (--force replaces it)"), "{e}");
    assert!(out.join("stale.txt").exists());
    let (ok_, _, e) = merge(&out, &["--force"]);
    assert!(ok_, "{e}");
    assert!(!out.join("stale.txt").exists() && out.join("model.safetensors").is_file());
    let (ok_, _, e) = merge(&t.join("x"), &["--dtype", "f64"]);
    assert!(!ok_);
    assert!(e.contains("--dtype") && e.contains("f64"), "{e}");
    let (ok_, _, e) = run(dolly(t).args(["merge", "--output"]).arg(t.join("y")).arg(&missing));
    assert!(!ok_);
    assert!(e.contains("ADAPTER") && e.contains("not a directory"), "{e}");
    // no temporary or moved-aside directory is left
    for e in std::fs::read_dir(t).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp-") && !name.contains(".old-"), "left behind: {name}");
    }
    let (_, help, _) = run(dolly(t).args(["generate", "--help"]));
    assert!(help.contains("AutoPeftModelForCausalLM") && help.contains("--adapter <DIR>"), "{help}");
}

#[test]
fn serve_with_an_adapter_reports_it_and_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (fixture(), fixture().join("adapter"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_dolly"))
        .args(["--threads", "1", "serve"])
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--tokenizer")
        .arg(tokenizer())
        .args(["--host", "127.0.0.1", "--port", "0"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tmp.path().join("hf"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, _err) = test_support::http::listening_addr(&mut child);
    let models = test_support::http::get(addr, "/v1/models").json();
    assert_eq!(models["data"][0]["id"], "adapter", "{models}");
    let body = serde_json::json!({"model": "adapter", "prompt": "Name a fruit.", "max_tokens": 4, "temperature": 0});
    let r = test_support::http::post(addr, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    child.kill().unwrap();
    child.wait().unwrap();
}
