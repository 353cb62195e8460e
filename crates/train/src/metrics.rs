//! `OUT/metrics.jsonl`: one JSON object per logging step (and per evaluation), appended and flushed as written.
//! On resume from checkpoint step S the file is first rewritten (atomically) to the rows with `step <= S`, so it
//! always tells the whole run exactly once. A fresh run starts an empty file.
//!
//! With TensorBoard on, each row is also written as one event (same step, tags from
//! [`crate::tensorboard::row_scalars`]) to a new event file in `OUT/runs/train`; the old event files there get the
//! same treatment as the jsonl (kept to `step <= S` on resume, removed on a fresh run).

use crate::error::{io_ctx, Result};
use crate::tensorboard::{self, EventWriter};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Metrics {
    path: PathBuf,
    file: File,
    tb: Option<EventWriter>,
}

impl Metrics {
    /// Open `OUT/metrics.jsonl` (and, with `tensorboard`, a new event file) for a run starting fresh
    /// (`resume_step = None`) or resuming after checkpoint step S.
    pub fn open(out: &Path, resume_step: Option<u64>, tensorboard: bool) -> Result<Metrics> {
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
        let tb = if tensorboard {
            let dir = out.join(tensorboard::RUN_DIR);
            tensorboard::keep_steps_upto(&dir, resume_step)?;
            Some(EventWriter::create(&dir)?)
        } else {
            None
        };
        Ok(Metrics { path, file, tb })
    }

    /// Append `row` to the jsonl (and its scalars to the event file), flushed.
    pub fn write(&mut self, row: &serde_json::Value) -> Result<()> {
        let line = format!("{row}\n");
        io_ctx(self.file.write_all(line.as_bytes()).and_then(|_| self.file.flush()), || {
            format!("writing {}", self.path.display())
        })?;
        if let Some(tb) = &mut self.tb {
            let step = row.get("step").and_then(|s| s.as_i64()).unwrap_or(0);
            let scalars = tensorboard::row_scalars(row);
            let refs: Vec<(&str, f32)> = scalars.iter().map(|(t, x)| (t.as_str(), *x)).collect();
            tb.scalars(step, &refs)?;
        }
        Ok(())
    }

    /// The event file being written, when TensorBoard is on.
    pub fn event_file(&self) -> Option<&Path> {
        self.tb.as_ref().map(|t| t.path())
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
