//! The run-directory rules and run safety of `dolly train` (issue 11 section 1), through the binary: a directory
//! that holds a run is refused unless resumed or `--overwrite-output-dir` (which deletes only dolly's files);
//! `auto` starts or resumes; rotation deletes only the current run's checkpoints; a resume names every changed
//! setting; extending `--max-steps` continues; a finished run is not redone; SIGINT checkpoints and exits 130
//! (a second signal exits at once); stale temp files and torn checkpoints are removed; a checkpoint failing its
//! sha256 falls back to the previous one; non-finite weights are never exported. Expected values are the
//! straight run's own losses (bitwise) or the messages' content.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

mod cli;
use cli::{checkpoints, err, ok, stderr_ok, Fixture};

const STEPS: [&str; 2] = ["--max-steps", "10"];

#[test]
fn a_directory_holding_a_run_is_refused_unless_resumed_or_overwritten() {
    let f = Fixture::new();
    ok(&f.run("a", &STEPS));
    let before = std::fs::read(f.dir.path().join("a/model.safetensors")).unwrap();
    let e = err(&f.run("a", &["--max-steps", "10", "--lr", "2e-3"]));
    assert!(e.contains("already holds a run") && e.contains("--overwrite-output-dir"), "{e}");
    assert_eq!(std::fs::read(f.dir.path().join("a/model.safetensors")).unwrap(), before, "old model touched");
    assert_eq!(checkpoints(&f.dir.path().join("a")), ["checkpoint-5", "checkpoint-10"]);

    // --overwrite-output-dir deletes the old run first; the new run is exactly a fresh one.
    let e = stderr_ok(&f.run("a", &["--max-steps", "10", "--lr", "2e-3", "--overwrite-output-dir"]));
    assert!(e.contains("--overwrite-output-dir: removed"), "{e}");
    ok(&f.run("b", &["--max-steps", "10", "--lr", "2e-3"]));
    assert_eq!(f.losses("a"), f.losses("b"));

    // ... but never files dolly did not write.
    std::fs::write(f.dir.path().join("a/notes.txt"), "mine").unwrap();
    let e = err(&f.run("a", &["--max-steps", "10", "--overwrite-output-dir"]));
    assert!(e.contains("notes.txt") && e.contains("did not write"), "{e}");
    assert!(f.dir.path().join("a/model.safetensors").exists(), "refused overwrite deleted files");
}

#[test]
fn auto_starts_then_resumes_and_a_finished_run_is_not_redone() {
    let f = Fixture::new();
    // auto into an empty directory starts; a finished run resumed with the same length does nothing.
    ok(&f.run("r", &["--max-steps", "10", "--resume-from-checkpoint", "auto"]));
    let e = stderr_ok(&f.run("r", &["--max-steps", "10", "--resume-from-checkpoint", "latest"]));
    assert!(e.contains("already complete at step 10") && !e.contains("NaN"), "{e}");
    // Extending: the schedule is recomputed for the new total (linear decay), so losses after step 10 follow a
    // different lr than the 10-step run; up to step 10 they are the 10-step run's, and the run reaches 14.
    let e = stderr_ok(&f.run("r", &["--max-steps", "14", "--resume-from-checkpoint", "auto"]));
    assert!(e.contains("total steps 10 -> 14"), "{e}");
    let l = f.losses("r");
    assert_eq!(l.last().map(|r| r.0), Some(14));
    assert_eq!(l.iter().filter(|r| r.0 == 14).count(), 2, "one train row (and one eval row at 14) for step 14");
    // A setting that changes the result is named with both values, in flag notation.
    let e = err(&f.run("r", &["--max-steps", "20", "--resume-from-checkpoint", "latest", "--lr", "2e-3"]));
    assert!(e.contains("--lr was 0.001 in the checkpoint, now 0.002"), "{e}");
    let e = err(&f.run("r", &["--max-steps", "20", "--resume-from-checkpoint", "latest", "--warmup-steps", "3"]));
    assert!(e.contains("--warmup-steps was 0 in the checkpoint, now 3"), "{e}");
    let e = err(&f.run("r", &["--max-steps", "8", "--resume-from-checkpoint", "latest"]));
    assert!(e.contains("beyond the new total of 8"), "{e}");
}

#[test]
fn rotation_deletes_only_this_runs_checkpoints() {
    let f = Fixture::new();
    ok(&f.run("other", &["--max-steps", "5"]));
    ok(&f.run("r", &["--max-steps", "5"]));
    // Another run's checkpoint under this directory (as an older dolly could leave): never rotated away.
    let src = f.dir.path().join("other/checkpoint-5");
    let dst = f.dir.path().join("r/checkpoint-1");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    ok(&f.run("r", &["--max-steps", "20", "--save-total-limit", "1", "--resume-from-checkpoint", "latest"]));
    assert_eq!(checkpoints(&f.dir.path().join("r")), ["checkpoint-1", "checkpoint-20"]);
}

fn wait_for(child: &mut Child, pat: &str) -> BufReader<std::process::ChildStderr> {
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 && !line.contains(pat) {
        line.clear();
    }
    assert!(line.contains(pat), "never printed `{pat}`");
    err
}

fn signal(child: &Child, sig: &str) {
    let st = std::process::Command::new("kill").args(["-s", sig, &child.id().to_string()]).status().unwrap();
    assert!(st.success());
}

#[test]
fn sigint_checkpoints_and_the_resume_is_exact() {
    let f = Fixture::new();
    ok(&f.run("straight", &STEPS));
    let mut child =
        f.train_cmd("int", &STEPS).env("DOLLY_FAULT_PAUSE_AFTER_STEP", "3").stderr(Stdio::piped()).spawn().unwrap();
    let mut rest = wait_for(&mut child, "paused after step 3");
    signal(&child, "INT");
    let mut tail = String::new();
    std::io::Read::read_to_string(&mut rest, &mut tail).unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(130), "{tail}");
    assert!(
        tail.contains("interrupted after step 3 of 10") && tail.contains("--resume-from-checkpoint latest"),
        "{tail}"
    );
    let out = f.dir.path().join("int");
    assert!(train::checkpoint::verify(&out.join("checkpoint-3")).is_ok());
    assert!(out.join("checkpoint-3/tokenizer.json").is_file(), "checkpoints carry the tokenizer");
    // a checkpoint directory is a model for `dolly generate` (its weights come from the shards)
    let g = cli::dolly()
        .arg("generate")
        .arg(out.join("checkpoint-3"))
        .args(["Say hi.", "--max-new-tokens", "2", "--greedy"])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    ok(&f.run("int", &["--max-steps", "10", "--resume-from-checkpoint", "latest"]));
    assert_eq!(f.losses("int"), f.losses("straight"), "losses after SIGINT + resume differ");

    // Two signals: the second ends the process at once, without the checkpoint of the first.
    let mut child =
        f.train_cmd("int2", &STEPS).env("DOLLY_FAULT_PAUSE_AFTER_STEP", "3").stderr(Stdio::piped()).spawn().unwrap();
    let mut rest = wait_for(&mut child, "paused after step 3");
    signal(&child, "TERM");
    // two signals sent back to back can arrive as one (a pending signal is not queued twice): let the first
    // be delivered before the second
    std::thread::sleep(std::time::Duration::from_millis(300));
    signal(&child, "TERM");
    let mut tail = String::new();
    std::io::Read::read_to_string(&mut rest, &mut tail).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert!(!tail.contains("interrupted after step"), "{tail}");
}

#[test]
fn stale_files_go_and_a_corrupt_newest_checkpoint_falls_back() {
    let f = Fixture::new();
    ok(&f.run("straight", &["--max-steps", "12"]));
    let o = f.train_cmd("r", &["--max-steps", "12"]).env("DOLLY_FAULT_ABORT_IN_CHECKPOINT", "12").output().unwrap();
    assert!(!o.status.success());
    let out = f.dir.path().join("r");
    std::fs::write(out.join(".model.safetensors.tmp-4242"), vec![0u8; 4096]).unwrap();
    std::fs::write(out.join("checkpoint-10/.shard-00000-of-00001.safetensors.tmp-4242"), vec![0u8; 4096]).unwrap();
    // checkpoint-10 corrupted in place (same size): its sha256 fails, so the resume falls back to checkpoint-5.
    let opt = out.join("checkpoint-10/shard-00000-of-00001.safetensors");
    let mut bytes = std::fs::read(&opt).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(&opt, bytes).unwrap();
    let e = stderr_ok(&f.run("r", &["--max-steps", "12", "--resume-from-checkpoint", "latest"]));
    assert!(e.contains("skipping") && e.contains("checkpoint-10") && e.contains("sha256"), "{e}");
    assert!(e.contains("checkpoint-5 (step 5)"), "{e}");
    assert!(e.contains("removed") && e.contains("stale"), "{e}");
    assert!(!out.join(".model.safetensors.tmp-4242").exists());
    assert_eq!(f.losses("r"), f.losses("straight"));
}

#[test]
fn non_finite_weights_are_never_exported() {
    let f = Fixture::new();
    // lr x weight decay overflows float32 in AdamW's decoupled decay: every decayed weight becomes infinite.
    let e = err(&f.run("nan", &["--max-steps", "3", "--lr", "1000", "--weight-decay", "1e36", "--save-steps", "100"]));
    assert!(e.contains("not finite") && e.contains("gpt_neox.embed_in.weight"), "{e}");
    assert!(!f.dir.path().join("nan/model.safetensors").exists());
}

#[test]
fn init_model_ships_its_tokenizer() {
    let f = Fixture::new();
    let m = f.dir.path().join("self-contained");
    let st = cli::dolly()
        .args(["init-model", "--preset", "pythia-14m", "--num-hidden-layers", "1", "--dtype", "bf16", "--tokenizer"])
        .arg(test_support::shared_file("20B_tokenizer.json"))
        .arg("--output")
        .arg(&m)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(m.join("tokenizer.json").is_file());
    // train without --tokenizer: the model directory's own is used
    let mut c = cli::dolly();
    c.arg("train").arg("--input-model").arg(&m).arg("--training-dataset").arg(f.dir.path().join("d.jsonl"));
    c.arg("--local-output-dir").arg(f.dir.path().join("sc"));
    c.args(["--max-steps", "2", "--per-device-train-batch-size", "2", "--test-size", "0", "--max-length", "128"]);
    ok(&c.output().unwrap());
    let e = err(&cli::dolly()
        .args(["init-model", "--tokenizer", "EleutherAI/pythia-70m", "--output"])
        .arg(f.dir.path().join("offline"))
        .output()
        .unwrap());
    assert!(e.contains("--tokenizer") && e.contains("offline"), "{e}");
}
