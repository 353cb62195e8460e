//! TensorBoard event files (`OUT/runs/train/events.out.tfevents.<secs>.<host>.<pid>.<n>`), written without
//! TensorFlow: a TFRecord stream of `tensorflow.Event` protobufs. Only the few fields needed for scalars are
//! encoded (numbers from tensorboard's `compat/proto/event.proto` and `summary.proto`):
//! `Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }`,
//! `Summary { repeated Value value = 1; }`, `Value { string tag = 1; float simple_value = 2; }`.
//! A TFRecord is `u64 length (LE) | u32 masked crc32c(length) | data | u32 masked crc32c(data)`.
//!
//! Each record is written with one `write_all` as it comes (no buffering), so a crashed run keeps its events.
//! One file per process: TensorBoard merges all files of a run directory, so a resumed run adds a new file, and
//! [`keep_steps_upto`] first drops the old files' events past the checkpoint (like `metrics.jsonl`).

use crate::error::{io_ctx, Result, TrainError};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The run directory under the output dir (a fixed name, so a resumed run lands in the same TensorBoard run).
pub const RUN_DIR: &str = "runs/train";
const FILE_PREFIX: &str = "events.out.tfevents.";
const FILE_VERSION: &str = "brain.Event:2";

/// TFRecord's checksum: CRC32C rotated right by 15 bits plus a constant.
pub fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord frame around `data`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, ((field as u64) << 3) | wire as u64);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Encode an `Event` with either a file version or a summary of scalar values.
pub fn encode_event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(&str, f32)]) -> Vec<u8> {
    let mut ev = Vec::new();
    key(&mut ev, 1, 1);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut ev, 2, 0);
    varint(&mut ev, step as u64);
    if let Some(v) = file_version {
        bytes_field(&mut ev, 3, v.as_bytes());
    } else {
        let mut summary = Vec::new();
        for (tag, x) in scalars {
            let mut value = Vec::new();
            bytes_field(&mut value, 1, tag.as_bytes());
            key(&mut value, 2, 5);
            value.extend_from_slice(&x.to_le_bytes());
            bytes_field(&mut summary, 1, &value);
        }
        bytes_field(&mut ev, 5, &summary);
    }
    ev
}

/// This host's name for the file name (HF and PyTorch put it there too), reduced to `[A-Za-z0-9._-]`.
fn host() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let h: String = raw.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')).collect();
    if h.is_empty() {
        "localhost".into()
    } else {
        h
    }
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The event files in `dir` (none when it does not exist), sorted by name.
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError(format!("reading {}: {e}", dir.display()))),
    };
    let mut files = Vec::new();
    for ent in rd {
        let ent = io_ctx(ent, || format!("reading {}", dir.display()))?;
        if ent.file_name().to_string_lossy().starts_with(FILE_PREFIX) {
            files.push(ent.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Split a TFRecord stream into its records' data; stops at the first incomplete or corrupt frame (the torn tail
/// of a killed writer).
pub fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= 12 {
        let len_b: [u8; 8] = bytes[at..at + 8].try_into().expect("8 bytes");
        let len = u64::from_le_bytes(len_b);
        if u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes")) != masked_crc(&len_b) {
            break;
        }
        let Some(end) = usize::try_from(len).ok().and_then(|l| (at + 12).checked_add(l)) else { break };
        if end.checked_add(4).is_none_or(|e| e > bytes.len()) {
            break;
        }
        let data = &bytes[at + 12..end];
        if u32::from_le_bytes(bytes[end..end + 4].try_into().expect("4 bytes")) != masked_crc(data) {
            break;
        }
        out.push(data);
        at = end + 4;
    }
    out
}

/// The `step` field of an encoded `Event` (0 when absent, as in protobuf); `None` if it does not parse.
pub fn event_step(ev: &[u8]) -> Option<i64> {
    let mut at = 0usize;
    let mut step = 0i64;
    let read_varint = |at: &mut usize| -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *ev.get(*at)?;
            *at += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    };
    while at < ev.len() {
        let k = read_varint(&mut at)?;
        match k & 7 {
            0 => {
                let v = read_varint(&mut at)?;
                if k >> 3 == 2 {
                    step = v as i64;
                }
            }
            1 => at = at.checked_add(8)?,
            2 => {
                let n = usize::try_from(read_varint(&mut at)?).ok()?;
                at = at.checked_add(n)?;
            }
            5 => at = at.checked_add(4)?,
            _ => return None,
        }
        if at > ev.len() {
            return None;
        }
    }
    Some(step)
}

/// Rewrite (atomically) every event file in `dir` to its records with `step <= upto` (the file version record has
/// step 0), dropping a torn tail; `upto = None` removes the files (a fresh run in an old output dir).
pub fn keep_steps_upto(dir: &Path, upto: Option<u64>) -> Result<()> {
    for f in event_files(dir)? {
        let Some(upto) = upto else {
            io_ctx(std::fs::remove_file(&f), || format!("removing {}", f.display()))?;
            continue;
        };
        let bytes = io_ctx(std::fs::read(&f), || format!("reading {}", f.display()))?;
        let recs = records(&bytes);
        let kept: Vec<u8> =
            recs.iter().filter(|r| event_step(r).is_some_and(|s| s <= upto as i64)).flat_map(|r| frame(r)).collect();
        if kept.len() != bytes.len() {
            io_ctx(common::atomic_write(&f, &kept), || format!("writing {}", f.display()))?;
        }
    }
    Ok(())
}

/// An open event file.
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Start a new event file in `dir` (created if needed) with its file version record.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        io_ctx(std::fs::create_dir_all(dir), || format!("creating {}", dir.display()))?;
        let t = now();
        let stem = format!("{FILE_PREFIX}{}.{}.{}", t as u64, host(), std::process::id());
        let mut n = 0;
        let (path, file) = loop {
            let path = dir.join(format!("{stem}.{n}"));
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(TrainError(format!("creating {}: {e}", path.display()))),
            }
        };
        let mut w = EventWriter { path, file };
        w.record(&encode_event(t, 0, Some(FILE_VERSION), &[]))?;
        Ok(w)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        io_ctx(self.file.write_all(&frame(data)).and_then(|_| self.file.flush()), || {
            format!("writing {}", self.path.display())
        })
    }

    /// Write one event holding `scalars` at `step`, stamped with the current time.
    pub fn scalars(&mut self, step: i64, scalars: &[(&str, f32)]) -> Result<()> {
        self.record(&encode_event(now(), step, None, scalars))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The TensorBoard scalars of one metrics row, tagged like Hugging Face's Trainer: an eval row
/// (`eval_loss`, `eval_ppl`) gives `eval/loss`, `eval/ppl`; a train row gives `train/<key>` with `lr` named
/// `train/learning_rate`. `step` is the event's step, not a scalar; an eval row's `epoch` is left out (its train row
/// at the same step has it). Non-numeric and null (non-finite) values are skipped.
pub fn row_scalars(row: &serde_json::Value) -> Vec<(String, f32)> {
    let Some(obj) = row.as_object() else { return Vec::new() };
    let eval = obj.keys().any(|k| k.starts_with("eval_"));
    obj.iter()
        .filter(|(k, _)| k.as_str() != "step" && !(eval && k.as_str() == "epoch"))
        .filter_map(|(k, v)| {
            let x = v.as_f64()?;
            let tag = match (k.strip_prefix("eval_"), k.as_str()) {
                (Some(rest), _) => format!("eval/{rest}"),
                (None, "lr") => "train/learning_rate".to_string(),
                (None, k) => format!("train/{k}"),
            };
            Some((tag, x as f32))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // CRC-32C of "123456789" is 0xE3069283 (the catalogue check value of CRC-32/ISCSI).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn torn_tail_is_dropped_and_steps_parse() {
        let mut s = frame(&encode_event(1.0, 0, Some(FILE_VERSION), &[]));
        s.extend(frame(&encode_event(2.0, 300, None, &[("train/loss", 1.5)])));
        let full = s.len();
        s.extend(&frame(&encode_event(3.0, 301, None, &[("train/loss", 1.4)]))[..10]);
        let r = records(&s);
        assert_eq!(r.len(), 2);
        assert_eq!((event_step(r[0]), event_step(r[1])), (Some(0), Some(300)));
        let mut bad = s[..full].to_vec();
        bad[full - 1] ^= 1;
        assert_eq!(records(&bad).len(), 1);
        assert_eq!(event_step(&[0x08]), None);
    }

    #[test]
    fn row_tags() {
        let train = serde_json::json!({"step": 5, "epoch": 0.1, "loss": 2.0, "lr": 1e-3, "grad_norm": null});
        let mut t = row_scalars(&train);
        t.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            t,
            vec![("train/epoch".into(), 0.1), ("train/learning_rate".into(), 1e-3), ("train/loss".into(), 2.0)]
        );
        let eval = serde_json::json!({"step": 10, "epoch": 0.2, "eval_loss": 3.0, "eval_ppl": 20.0});
        let mut e = row_scalars(&eval);
        e.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(e, vec![("eval/loss".into(), 3.0), ("eval/ppl".into(), 20.0)]);
    }
}
