//! Dolly records and their readers: `.jsonl`, `.json` (a top-level array, or JSON Lines), `.parquet`, a directory
//! of those, each record carrying its file:line (parquet: file:row). Bad records (invalid JSON, non-UTF-8, not an
//! object, missing or non-string fields, empty instruction or response) fail with their location, or are skipped
//! and counted under `--on-bad-record skip`; nothing is dropped silently. Blank lines are not records (counted).
//! Does not template, tokenize or deduplicate; does not download (see `hub` and `dataset`).

use crate::error::{DataError, Result};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a record came from: a 1-based line of a JSON/JSONL file, or a 1-based row of a parquet file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: Arc<Path>,
    pub line: u64,
    /// True when `line` counts parquet rows rather than text lines.
    pub is_row: bool,
}

impl Serialize for Location {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_row {
            write!(f, "{}: row {}", self.file.display(), self.line)
        } else {
            write!(f, "{}:{}", self.file.display(), self.line)
        }
    }
}

/// One instruction-following record (databricks-dolly-15k schema).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Record {
    pub instruction: String,
    pub context: String,
    pub response: String,
    /// Empty when the input has no `category` field (it is optional; the other three are required).
    pub category: String,
    pub source: Location,
}

/// What to do with a malformed record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BadRecordPolicy {
    /// Stop at the first bad record with its file:line (default).
    #[default]
    Fail,
    /// Skip it, count it by reason and keep its location in the report.
    Skip,
}

impl std::str::FromStr for BadRecordPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fail" => Ok(Self::Fail),
            "skip" => Ok(Self::Skip),
            _ => Err(format!("expected `fail` or `skip`, got {s:?}")),
        }
    }
}

/// Why a record is bad.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BadReason {
    InvalidJson,
    NotUtf8,
    NotAnObject,
    MissingField,
    NotAString,
    EmptyInstruction,
    EmptyResponse,
}

impl BadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::NotUtf8 => "not_utf8",
            Self::NotAnObject => "not_an_object",
            Self::MissingField => "missing_field",
            Self::NotAString => "not_a_string",
            Self::EmptyInstruction => "empty_instruction",
            Self::EmptyResponse => "empty_response",
        }
    }
}

/// One skipped record.
#[derive(Clone, Debug, Serialize)]
pub struct BadRecord {
    pub location: String,
    pub reason: BadReason,
    pub message: String,
}

/// What the readers saw besides good records.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReadReport {
    /// Files read, in order.
    pub files: Vec<PathBuf>,
    /// Skipped bad records (only under `skip`), in input order.
    pub skipped: Vec<BadRecord>,
    /// Skipped count per reason.
    pub skipped_by_reason: BTreeMap<&'static str, usize>,
    /// Whitespace-only lines in JSONL input (not records).
    pub blank_lines: usize,
}

impl ReadReport {
    pub fn skipped_count(&self) -> usize {
        self.skipped.len()
    }

    /// One line per reason, e.g. `skipped 3 bad records: 2 invalid_json, 1 empty_response`.
    pub fn summary(&self) -> String {
        if self.skipped.is_empty() {
            return "no bad records".to_string();
        }
        let parts: Vec<String> = self.skipped_by_reason.iter().map(|(k, v)| format!("{v} {k}")).collect();
        format!("skipped {} bad records: {}", self.skipped.len(), parts.join(", "))
    }
}

/// Collects records and applies the bad-record policy.
struct Sink<'a> {
    policy: BadRecordPolicy,
    out: &'a mut Vec<Record>,
    report: &'a mut ReadReport,
}

impl Sink<'_> {
    fn bad(&mut self, loc: &Location, reason: BadReason, msg: String) -> Result<()> {
        match self.policy {
            BadRecordPolicy::Fail => Err(DataError::record(format!(
                "{loc}: {msg} (use --on-bad-record skip to skip and count such records)"
            ))),
            BadRecordPolicy::Skip => {
                *self.report.skipped_by_reason.entry(reason.as_str()).or_default() += 1;
                self.report.skipped.push(BadRecord { location: loc.to_string(), reason, message: msg });
                Ok(())
            }
        }
    }

    /// Validate one JSON value as a record.
    fn value(&mut self, v: Value, loc: Location) -> Result<()> {
        let Value::Object(mut map) = v else {
            let what = json_type(&v);
            return self.bad(&loc, BadReason::NotAnObject, format!("expected a JSON object, got {what}"));
        };
        let mut fields: [String; 4] = Default::default();
        for (slot, (name, required)) in
            fields.iter_mut().zip([("instruction", true), ("context", true), ("response", true), ("category", false)])
        {
            match map.remove(name) {
                Some(Value::String(s)) => *slot = s,
                None if !required => {}
                None => return self.bad(&loc, BadReason::MissingField, format!("missing field `{name}`")),
                Some(other) => {
                    let what = json_type(&other);
                    return self.bad(
                        &loc,
                        BadReason::NotAString,
                        format!("field `{name}` must be a string, got {what}"),
                    );
                }
            }
        }
        self.fields(fields, loc)
    }

    fn fields(&mut self, [instruction, context, response, category]: [String; 4], loc: Location) -> Result<()> {
        if instruction.is_empty() {
            return self.bad(&loc, BadReason::EmptyInstruction, "empty `instruction`".into());
        }
        if response.is_empty() {
            return self.bad(&loc, BadReason::EmptyResponse, "empty `response`".into());
        }
        self.out.push(Record { instruction, context, response, category, source: loc });
        Ok(())
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Which reader a file gets, by extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    JsonLines,
    Json,
    Parquet,
}

impl FileFormat {
    pub fn of(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        if name.ends_with(".jsonl") {
            Some(Self::JsonLines)
        } else if name.ends_with(".json") {
            Some(Self::Json)
        } else if name.ends_with(".parquet") {
            Some(Self::Parquet)
        } else {
            None
        }
    }
}

/// Read one file or every data file under a directory (recursively, sorted, hidden entries skipped).
pub fn read_path(path: &Path, policy: BadRecordPolicy) -> Result<(Vec<Record>, ReadReport)> {
    let mut out = Vec::new();
    let mut report = ReadReport::default();
    let files = data_files(path)?;
    for f in &files {
        read_file_into(f, policy, &mut out, &mut report)?;
    }
    Ok((out, report))
}

/// The data files a path stands for: itself, or the `.jsonl`/`.json`/`.parquet` files under a directory.
pub fn data_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(|e| DataError::io(format!("{}: {e}", path.display())))?;
    if !meta.is_dir() {
        if FileFormat::of(path).is_none() {
            return Err(DataError::config(format!(
                "{}: unsupported dataset file (expected .jsonl, .json or .parquet)",
                path.display()
            )));
        }
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    walk(path, &mut files)?;
    files.sort();
    if files.is_empty() {
        return Err(DataError::config(format!("{}: directory has no .jsonl, .json or .parquet files", path.display())));
    }
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(format!("{}: {e}", dir.display())))?;
    for entry in rd {
        let entry = entry.map_err(|e| DataError::io(format!("{}: {e}", dir.display())))?;
        let p = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        // Follows symlinks: the hub cache's snapshot entries are links to blobs.
        if p.is_dir() {
            walk(&p, files)?;
        } else if FileFormat::of(&p).is_some() {
            files.push(p);
        }
    }
    Ok(())
}

/// Read one file by its extension, appending good records to `out`.
pub fn read_file_into(
    path: &Path,
    policy: BadRecordPolicy,
    out: &mut Vec<Record>,
    report: &mut ReadReport,
) -> Result<()> {
    let format = FileFormat::of(path).ok_or_else(|| {
        DataError::config(format!("{}: unsupported dataset file (expected .jsonl, .json or .parquet)", path.display()))
    })?;
    report.files.push(path.to_path_buf());
    let file: Arc<Path> = Arc::from(path);
    let mut sink = Sink { policy, out, report };
    match format {
        FileFormat::Parquet => crate::parquet_reader::read_parquet(&file, &mut |fields, row| {
            let loc = Location { file: file.clone(), line: row, is_row: true };
            match fields {
                Ok(f) => sink.fields(f, loc),
                Err((reason, msg)) => sink.bad(&loc, reason, msg),
            }
        }),
        FileFormat::JsonLines | FileFormat::Json => {
            let bytes = std::fs::read(path).map_err(|e| DataError::io(format!("{}: {e}", path.display())))?;
            let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
            let first = body.iter().find(|b| !b.is_ascii_whitespace());
            if format == FileFormat::Json && first == Some(&b'[') {
                read_json_array(&file, body, &mut sink)
            } else {
                read_json_lines(&file, body, &mut sink)
            }
        }
    }
}

fn read_json_lines(file: &Arc<Path>, body: &[u8], sink: &mut Sink<'_>) -> Result<()> {
    // A final newline ends the last line; it does not start an empty one.
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    if body.is_empty() {
        return Ok(());
    }
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let loc = Location { file: file.clone(), line: i as u64 + 1, is_row: false };
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t,
            Err(e) => {
                let col = e.valid_up_to() + 1;
                sink.bad(&loc, BadReason::NotUtf8, format!("invalid UTF-8 at byte {col} of the line"))?;
                continue;
            }
        };
        if text.trim().is_empty() {
            sink.report.blank_lines += 1;
            continue;
        }
        match serde_json::from_str::<Value>(text) {
            Ok(v) => sink.value(v, loc)?,
            Err(e) => {
                let col = e.column();
                sink.bad(&loc, BadReason::InvalidJson, format!("invalid JSON at column {col}: {e}"))?;
            }
        }
    }
    Ok(())
}

fn read_json_array(file: &Arc<Path>, body: &[u8], sink: &mut Sink<'_>) -> Result<()> {
    let text = std::str::from_utf8(body).map_err(|e| {
        let off = e.valid_up_to();
        let line = body[..off].iter().filter(|&&b| b == b'\n').count() + 1;
        DataError::record(format!("{}:{line}: invalid UTF-8 (the whole JSON array cannot be read)", file.display()))
    })?;
    let items: Vec<&serde_json::value::RawValue> = serde_json::from_str(text).map_err(|e| {
        DataError::record(format!(
            "{}:{}: invalid JSON array at column {}: {e} (the whole file cannot be read)",
            file.display(),
            e.line(),
            e.column()
        ))
    })?;
    let base = text.as_ptr() as usize;
    let (mut line, mut scanned) = (1u64, 0usize);
    for item in items {
        let off = item.get().as_ptr() as usize - base;
        line += text.as_bytes()[scanned..off].iter().filter(|&&b| b == b'\n').count() as u64;
        scanned = off;
        let loc = Location { file: file.clone(), line, is_row: false };
        match serde_json::from_str::<Value>(item.get()) {
            Ok(v) => sink.value(v, loc)?,
            Err(e) => sink.bad(&loc, BadReason::InvalidJson, format!("invalid JSON: {e}"))?,
        }
    }
    Ok(())
}
