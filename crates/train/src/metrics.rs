//! `OUT/metrics.jsonl`: one JSON object per logging step (and per evaluation), appended and flushed as written.
//! On resume from checkpoint step S the file is first rewritten (atomically) to the rows with `step <= S`, so it
//! always tells the whole run exactly once. A fresh run starts an empty file.

use crate::error::{io_ctx, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Metrics {
    path: PathBuf,
    file: File,
}

impl Metrics {
    pub fn open(out: &Path, resume_step: Option<u64>) -> Result<Metrics> {
        let path = out.join("metrics.jsonl");
        let kept = match resume_step {
            Some(s) => std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|x| x.as_u64()))
                        .is_some_and(|st| st <= s)
                })
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
            None => String::new(),
        };
        io_ctx(common::atomic_write(&path, kept.as_bytes()), || path.display().to_string())?;
        let file = io_ctx(OpenOptions::new().append(true).open(&path), || path.display().to_string())?;
        Ok(Metrics { path, file })
    }

    pub fn write(&mut self, row: &serde_json::Value) -> Result<()> {
        let line = format!("{row}\n");
        io_ctx(self.file.write_all(line.as_bytes()).and_then(|_| self.file.flush()), || {
            format!("writing {}", self.path.display())
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Read all rows of a metrics file (for tests and the loss plot).
pub fn read(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = io_ctx(std::fs::read_to_string(path), || path.display().to_string())?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| crate::error::TrainError(format!("{}:{}: {e}", path.display(), i + 1)))
        })
        .collect()
}
