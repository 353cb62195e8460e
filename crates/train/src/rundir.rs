//! The run-directory rules: one `--local-output-dir` holds exactly one run. A run is named by the id in
//! `OUT/dolly-run.json`, which every checkpoint's `trainer_state.json` repeats. A fresh run refuses a directory
//! that holds anything unless `--overwrite-output-dir` (then only files dolly writes are deleted; anything else
//! stops it). On start, temp files of interrupted atomic writes and torn checkpoint directories are removed.
//! Checkpoint rotation (`checkpoint::enforce_limit`) deletes only checkpoints of the current run.

use crate::checkpoint;
use crate::error::{io_ctx, Result, TrainError};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const RUN_FILE: &str = "dolly-run.json";

/// `OUT/dolly-run.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunInfo {
    pub run_id: String,
    /// Seconds since the epoch when the run started.
    pub created_unix: u64,
    /// Set when the final model was exported: the step it was exported at.
    #[serde(default)]
    pub finished_step: Option<u64>,
}

impl RunInfo {
    pub fn new() -> RunInfo {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        RunInfo {
            run_id: format!("{:x}-{:x}", now.as_nanos(), std::process::id()),
            created_unix: now.as_secs(),
            finished_step: None,
        }
    }
}

impl Default for RunInfo {
    fn default() -> Self {
        RunInfo::new()
    }
}

pub fn read(out: &Path) -> Result<Option<RunInfo>> {
    let p = out.join(RUN_FILE);
    match std::fs::read_to_string(&p) {
        Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| TrainError(format!("{}: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TrainError(format!("{}: {e}", p.display()))),
    }
}

pub fn write(out: &Path, info: &RunInfo) -> Result<()> {
    let p = out.join(RUN_FILE);
    let text = serde_json::to_string_pretty(info).map_err(|e| TrainError(e.to_string()))?;
    io_ctx(common::atomic_write(&p, text.as_bytes()), || p.display().to_string())
}

/// A temp file left by an interrupted `common::atomic_write` (`.NAME.tmp-PID`).
fn is_temp(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// Names that `dolly train` writes into an output directory.
fn is_ours(name: &str) -> bool {
    const FILES: [&str; 12] = [
        RUN_FILE,
        "metrics.jsonl",
        "loss.png",
        "runs",
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        ".dolly-write-probe",
        "generation_config.json",
    ];
    FILES.contains(&name)
        || is_temp(name)
        || name.strip_prefix("checkpoint-").is_some_and(|s| s.parse::<u64>().is_ok())
        || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

/// Entry names of `out` (empty when it does not exist), sorted.
pub fn entries(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".dolly-write-probe")
        .collect();
    v.sort();
    v
}

/// A short list of names for messages: `a, b, c and 4 more`.
pub fn show(names: &[String]) -> String {
    let head: Vec<&str> = names.iter().take(4).map(String::as_str).collect();
    match names.len().saturating_sub(4) {
        0 => head.join(", "),
        n => format!("{} and {n} more", head.join(", ")),
    }
}

/// `--overwrite-output-dir`: delete what dolly wrote in `out`. Anything else there stops it (it may be the
/// user's: dolly does not delete files it does not know).
pub fn clear(out: &Path) -> Result<Vec<String>> {
    let all = entries(out);
    let foreign: Vec<String> = all.iter().filter(|n| !is_ours(n)).cloned().collect();
    if !foreign.is_empty() {
        crate::bail!(
            "--overwrite-output-dir: {} also holds files dolly did not write ({}); remove them yourself or choose \
             another --local-output-dir",
            out.display(),
            show(&foreign)
        );
    }
    for n in &all {
        let p = out.join(n);
        let r = if p.is_dir() && !p.is_symlink() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        io_ctx(r, || format!("--overwrite-output-dir: removing {}", p.display()))?;
    }
    Ok(all)
}

/// Remove temp files of interrupted writes (in `out` and its checkpoint directories) and checkpoint
/// directories without the COMPLETE marker. Returns what was removed and the bytes freed.
pub fn remove_stale(out: &Path) -> (Vec<String>, u64) {
    let mut removed = Vec::new();
    let mut bytes = 0u64;
    let mut rm_file = |p: &Path, removed: &mut Vec<String>| {
        let n = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        if std::fs::remove_file(p).is_ok() {
            bytes += n;
            removed.push(p.display().to_string());
        }
    };
    let mut dirs = vec![out.to_path_buf()];
    dirs.extend(checkpoint::list(out).into_iter().map(|(_, p)| p));
    for d in &dirs {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            if is_temp(&e.file_name().to_string_lossy()) && e.path().is_file() {
                rm_file(&e.path(), &mut removed);
            }
        }
    }
    for (_, p) in checkpoint::list(out) {
        if !checkpoint::is_complete(&p) {
            let n = dir_bytes(&p);
            if std::fs::remove_dir_all(&p).is_ok() {
                bytes += n;
                removed.push(p.display().to_string());
            }
        }
    }
    (removed, bytes)
}

fn dir_bytes(d: &Path) -> u64 {
    std::fs::read_dir(d).into_iter().flatten().flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_deletes_only_what_dolly_writes() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path();
        std::fs::create_dir_all(out.join("checkpoint-5")).unwrap();
        std::fs::write(out.join("metrics.jsonl"), "").unwrap();
        std::fs::write(out.join(".model.safetensors.tmp-77"), "x").unwrap();
        assert_eq!(clear(out).unwrap().len(), 3);
        assert!(entries(out).is_empty());
        std::fs::write(out.join("metrics.jsonl"), "").unwrap();
        std::fs::write(out.join("thesis.tex"), "mine").unwrap();
        let e = clear(out).unwrap_err().0;
        assert!(e.contains("thesis.tex"), "{e}");
        assert!(out.join("thesis.tex").exists() && out.join("metrics.jsonl").exists(), "nothing deleted on refusal");
    }

    #[test]
    fn stale_temp_files_and_torn_checkpoints_go() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path();
        std::fs::create_dir_all(out.join("checkpoint-10")).unwrap();
        std::fs::write(out.join("checkpoint-10/model.safetensors"), vec![0u8; 1000]).unwrap();
        std::fs::write(out.join(".metrics.jsonl.tmp-12"), "x").unwrap();
        std::fs::write(out.join("keep.txt"), "x").unwrap();
        let (removed, bytes) = remove_stale(out);
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert_eq!(bytes, 1001);
        assert_eq!(entries(out), ["keep.txt"]);
    }
}
