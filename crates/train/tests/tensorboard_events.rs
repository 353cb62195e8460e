//! TensorBoard event files written through `Metrics`, read back with a reader written here from the formats'
//! definitions (TFRecord framing with a bitwise CRC-32C, protobuf wire format, the field numbers of tensorboard's
//! `event.proto`/`summary.proto`), independent of the writer's code. `tools/check_tensorboard.py` does the same
//! check with TensorBoard's own reader on a real run.

use serde_json::json;
use std::path::{Path, PathBuf};
use train::metrics::Metrics;

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one bit at a time.
fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
        }
    }
    !c
}

fn masked(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Records of a TFRecord file; panics on any framing or checksum error.
fn read_records(path: &Path) -> Vec<Vec<u8>> {
    let b = std::fs::read(path).unwrap();
    let (mut at, mut out) = (0, Vec::new());
    while at < b.len() {
        let len = u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
        assert_eq!(u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()), masked(&b[at..at + 8]), "length crc");
        let data = &b[at + 12..at + 12 + len];
        let crc = u32::from_le_bytes(b[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(crc, masked(data), "data crc in {}", path.display());
        out.push(data.to_vec());
        at += 16 + len;
    }
    out
}

enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

/// The (field number, value) pairs of one protobuf message.
fn fields(mut m: &[u8]) -> Vec<(u64, Field<'_>)> {
    fn varint(m: &mut &[u8]) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let b = m[0];
            *m = &m[1..];
            v |= ((b & 0x7f) as u64) << shift;
            shift += 7;
            if b < 0x80 {
                return v;
            }
        }
    }
    let mut out = Vec::new();
    while !m.is_empty() {
        let k = varint(&mut m);
        let f = match k & 7 {
            0 => Field::Varint(varint(&mut m)),
            1 => {
                let (a, r) = m.split_at(8);
                m = r;
                Field::Fixed64(a.try_into().unwrap())
            }
            2 => {
                let n = varint(&mut m) as usize;
                let (a, r) = m.split_at(n);
                m = r;
                Field::Bytes(a)
            }
            5 => {
                let (a, r) = m.split_at(4);
                m = r;
                Field::Fixed32(a.try_into().unwrap())
            }
            w => panic!("wire type {w}"),
        };
        out.push((k >> 3, f));
    }
    out
}

#[derive(Debug, Default)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    values: Vec<(String, f32)>,
}

fn decode(rec: &[u8]) -> Event {
    let mut e = Event::default();
    for (n, f) in fields(rec) {
        match (n, f) {
            (1, Field::Fixed64(b)) => e.wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => e.step = v as i64,
            (3, Field::Bytes(b)) => e.file_version = Some(String::from_utf8(b.to_vec()).unwrap()),
            (5, Field::Bytes(summary)) => {
                for (n, f) in fields(summary) {
                    let (1, Field::Bytes(value)) = (n, f) else { panic!("Summary field {n}") };
                    let (mut tag, mut x) = (String::new(), f32::NAN);
                    for (n, f) in fields(value) {
                        match (n, f) {
                            (1, Field::Bytes(b)) => tag = String::from_utf8(b.to_vec()).unwrap(),
                            (2, Field::Fixed32(b)) => x = f32::from_le_bytes(b),
                            (n, _) => panic!("Value field {n}"),
                        }
                    }
                    e.values.push((tag, x));
                }
            }
            (n, _) => panic!("Event field {n}"),
        }
    }
    e.values.sort_by(|a, b| a.0.cmp(&b.0));
    e
}

fn event_files(out: &Path) -> Vec<PathBuf> {
    let dir = out.join("runs/train");
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(&dir).map(|rd| rd.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    v.sort();
    v
}

fn events(path: &Path) -> Vec<Event> {
    read_records(path).iter().map(|r| decode(r)).collect()
}

fn train_row(step: u64) -> serde_json::Value {
    json!({"step": step, "epoch": step as f64 / 100.0, "loss": 10.0 / step as f64, "lr": 1e-3, "grad_norm": 0.5,
           "tokens": step * 1000, "tokens_per_s": 123.5, "elapsed_s": step as f64, "skipped_nonfinite": 0})
}

#[test]
fn rows_become_events_with_hf_tags() {
    let d = tempfile::tempdir().unwrap();
    let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let mut m = Metrics::open(d.path(), None, true).unwrap();
    m.write(&train_row(5)).unwrap();
    m.write(&json!({"step": 10, "epoch": 0.1, "loss": f64::NAN, "lr": 2e-3, "grad_norm": 1.25})).unwrap();
    m.write(&json!({"step": 10, "epoch": 0.1, "eval_loss": 2.5, "eval_ppl": 2.5f64.exp()})).unwrap();
    // Read while the writer is still open: every row is on disk as soon as it is written.
    let files = event_files(d.path());
    assert_eq!(files.len(), 1);
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let ev = events(&files[0]);
    assert_eq!(ev.len(), 4);
    assert_eq!(ev[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(ev.iter().all(|e| e.wall_time >= t0 - 1.0 && e.wall_time < t0 + 600.0), "{ev:?}");
    fn tags(e: &Event) -> Vec<&str> {
        e.values.iter().map(|v| v.0.as_str()).collect()
    }
    assert_eq!(ev[1].step, 5);
    assert_eq!(
        tags(&ev[1]),
        [
            "train/elapsed_s",
            "train/epoch",
            "train/grad_norm",
            "train/learning_rate",
            "train/loss",
            "train/skipped_nonfinite",
            "train/tokens",
            "train/tokens_per_s"
        ]
    );
    let get = |e: &Event, t: &str| e.values.iter().find(|v| v.0 == t).map(|v| v.1);
    assert_eq!(get(&ev[1], "train/loss"), Some(2.0));
    assert_eq!(get(&ev[1], "train/learning_rate"), Some(1e-3f32));
    assert_eq!(get(&ev[1], "train/tokens"), Some(5000.0));
    // A NaN loss is `null` in the jsonl and absent from the events; the rest of the row is there.
    assert_eq!((ev[2].step, tags(&ev[2])), (10, vec!["train/epoch", "train/grad_norm", "train/learning_rate"]));
    assert_eq!((ev[3].step, tags(&ev[3])), (10, vec!["eval/loss", "eval/ppl"]));
    assert_eq!(get(&ev[3], "eval/ppl"), Some(2.5f64.exp() as f32));
    assert_eq!(train::metrics::read(&d.path().join("metrics.jsonl")).unwrap().len(), 3);
}

#[test]
fn resume_keeps_old_events_up_to_the_checkpoint_and_starts_a_new_file() {
    let d = tempfile::tempdir().unwrap();
    {
        let mut m = Metrics::open(d.path(), None, true).unwrap();
        for s in (5..=30).step_by(5) {
            m.write(&train_row(s)).unwrap();
        }
        // The process dies mid-record: a torn frame at the end of the file.
        let f = m.event_file().unwrap().to_path_buf();
        let mut b = std::fs::read(&f).unwrap();
        b.extend_from_slice(&[7, 0, 0, 0, 0, 0]);
        std::fs::write(&f, b).unwrap();
    }
    let mut m = Metrics::open(d.path(), Some(20), true).unwrap();
    m.write(&train_row(25)).unwrap();
    m.write(&train_row(30)).unwrap();
    let files = event_files(d.path());
    assert_eq!(files.len(), 2, "{files:?}");
    let new = m.event_file().unwrap();
    let old = files.iter().find(|f| f.as_path() != new).unwrap();
    let old_steps: Vec<i64> = events(old).iter().map(|e| e.step).collect();
    assert_eq!(old_steps, [0, 5, 10, 15, 20]);
    let new_ev = events(new);
    assert_eq!(new_ev[0].file_version.as_deref(), Some("brain.Event:2"));
    assert_eq!(new_ev[1..].iter().map(|e| e.step).collect::<Vec<_>>(), [25, 30]);
    // Same rows as the jsonl, each step once.
    let rows = train::metrics::read(&d.path().join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = rows.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [5, 10, 15, 20, 25, 30]);
    drop(m);

    // A fresh run in the same output dir starts over: old event files go, like the old jsonl rows.
    let m = Metrics::open(d.path(), None, true).unwrap();
    assert_eq!(event_files(d.path()), vec![m.event_file().unwrap().to_path_buf()]);
    assert_eq!(events(m.event_file().unwrap()).len(), 1);
}

#[test]
fn tensorboard_off_writes_no_events() {
    let d = tempfile::tempdir().unwrap();
    let mut m = Metrics::open(d.path(), None, false).unwrap();
    m.write(&train_row(5)).unwrap();
    assert!(m.event_file().is_none() && !d.path().join("runs").exists());
}

#[test]
fn the_independent_crc_is_crc32c() {
    // The catalogue check value of CRC-32C (CRC-32/ISCSI) over "123456789".
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
}
