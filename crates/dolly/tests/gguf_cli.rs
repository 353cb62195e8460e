//! `dolly export-gguf`, `dolly quantize` and `.gguf` models in `dolly generate`, as processes: a q8_0 file
//! answers exactly as the directory does with `--quantize q8_0` (the same ggml blocks), an f32 file exactly
//! as the directory; bad outputs, types and combinations are refused by flag. Model: a 2-layer pythia-14m
//! from `dolly init-model` with the shared 20B tokenizer.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn dolly() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dolly"));
    c.stdin(Stdio::null()).env("HF_HUB_OFFLINE", "1");
    c
}

fn run(args: &[&str]) -> (bool, String, String) {
    let o = dolly().args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn tiny_model(dir: &Path) -> PathBuf {
    let out = dir.join("tiny");
    let tok = test_support::shared_file("20B_tokenizer.json");
    let (ok, _, e) = run(&[
        "init-model",
        "--preset",
        "pythia-14m",
        "--num-hidden-layers",
        "2",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{e}");
    out
}

fn answer(model: &str, extra: &[&str]) -> String {
    let mut args = vec!["generate", model, "Name a fruit.", "--greedy", "--max-new-tokens", "8", "--no-stream"];
    args.extend_from_slice(extra);
    let (ok, out, e) = run(&args);
    assert!(ok, "{model} {extra:?}: {e}");
    out
}

#[test]
fn gguf_files_answer_as_their_model_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny_model(tmp.path());
    let dir = m.to_str().unwrap();
    let q8 = tmp.path().join("tiny-q8_0.gguf");
    let f32 = tmp.path().join("tiny-f32.gguf");
    let (ok, _, e) = run(&["quantize", dir, "--type", "q8_0", "--output", q8.to_str().unwrap()]);
    assert!(ok, "{e}");
    let (ok, _, e) = run(&["export-gguf", dir, "--type", "f32", "--output", f32.to_str().unwrap()]);
    assert!(ok, "{e}");
    assert_eq!(answer(q8.to_str().unwrap(), &[]), answer(dir, &["--quantize", "q8_0"]));
    assert_eq!(answer(f32.to_str().unwrap(), &[]), answer(dir, &[]));
    // a float file quantized while loading is the q8_0 file
    assert_eq!(answer(f32.to_str().unwrap(), &["--quantize", "q8_0"]), answer(q8.to_str().unwrap(), &[]));
}

/// A q4_K file (pythia-70m widths, one layer: rows of 512 and 2048 values) is written and answers as the model
/// quantized to q4_K while loading does (the format test is crates/neox/tests/gguf_model.rs).
#[test]
fn q4_k_files_are_written_and_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m70");
    let tok = test_support::shared_file("20B_tokenizer.json");
    let (ok, _, e) = run(&[
        "init-model",
        "--preset",
        "pythia-70m",
        "--num-hidden-layers",
        "1",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--output",
        m.to_str().unwrap(),
    ]);
    assert!(ok, "{e}");
    let q4 = tmp.path().join("m70-q4_k.gguf");
    let (ok, _, e) = run(&["quantize", m.to_str().unwrap(), "--type", "q4_k", "--output", q4.to_str().unwrap()]);
    assert!(ok, "{e}");
    assert!(e.contains("4 matrices in q4_K, 2 in q8_0"), "{e}");
    // 4.5 bits a weight for the layer's matrices, 8.5 for the embedding and head (the vectors are a few KiB)
    let (layer, ends) = (512 * 1536 + 512 * 512 + 2 * 512 * 2048, 2 * 50304 * 512);
    let want = layer as f64 * 0.5625 + ends as f64 * 1.0625;
    let size = std::fs::metadata(&q4).unwrap().len() as f64;
    assert!(size > want && size < want + 8e6, "{size} vs {want}");
    let a = answer(q4.to_str().unwrap(), &[]);
    assert_eq!(a, answer(m.to_str().unwrap(), &["--quantize", "q4_k"]));
}

#[test]
fn bad_outputs_types_and_combinations_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny_model(tmp.path());
    let dir = m.to_str().unwrap();
    let out = tmp.path().join("x.gguf");
    let o = out.to_str().unwrap();
    let (ok, _, e) = run(&["export-gguf", dir, "--type", "q4_x", "--output", o]);
    assert!(!ok && e.contains("unknown GGUF type `q4_x`"), "{e}");
    // pythia-14m's 128-wide rows are not whole q4_K super-blocks: those matrices are q8_0 (only dense_4h_to_h,
    // rows of 512, is q4_K), and it says so
    let (ok, _, e) = run(&["quantize", dir, "--type", "q4_k", "--output", o]);
    assert!(ok && e.contains("2 matrices in q4_K, 8 in q8_0") && e.contains("not a multiple of 256"), "{e}");
    std::fs::remove_file(&out).unwrap();
    let (ok, _, e) =
        run(&["export-gguf", dir, "--type", "f16", "--output", tmp.path().join("x.bin").to_str().unwrap()]);
    assert!(!ok && e.contains(".gguf"), "{e}");
    let (ok, _, e) = run(&["quantize", dir, "--type", "f16", "--output", o]);
    assert!(!ok && e.contains("export-gguf"), "{e}");
    let (ok, _, e) = run(&["export-gguf", dir, "--type", "f16", "--output", o]);
    assert!(ok, "{e}");
    let (ok, _, e) = run(&["export-gguf", dir, "--type", "f16", "--output", o]);
    assert!(!ok && e.contains("--force"), "{e}");
    let (ok, _, e) = run(&["generate", o, "hi", "--adapter", dir]);
    assert!(!ok && e.contains("merge the adapter first"), "{e}");
    let (ok, _, e) = run(&["generate", dir, "hi", "--quantize", "q5"]);
    assert!(!ok && e.contains("unknown quantization `q5`"), "{e}");
    // a file that is not GGUF
    std::fs::write(&out, b"not a gguf file at all").unwrap();
    let (ok, _, e) = run(&["generate", o, "hi"]);
    assert!(!ok && e.contains("x.gguf"), "{e}");
}
