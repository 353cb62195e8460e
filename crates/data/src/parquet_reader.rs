//! Parquet input for records: reads the `instruction`, `context`, `response` (required) and `category` (optional)
//! string columns row by row with the `parquet` crate's record API (snappy or uncompressed pages).
//! Does not read nested or non-string columns (a record with one is bad, with its row number), does not need Arrow.

use crate::error::{DataError, Result};
use crate::record::BadReason;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use std::path::Path;

/// The four fields of one row, or why the row is bad.
pub type RowFields = std::result::Result<[String; 4], (BadReason, String)>;

const COLUMNS: [(&str, bool); 4] = [("instruction", true), ("context", true), ("response", true), ("category", false)];

/// Call `each(fields, row)` for every row (1-based). A file without a required column is an error for the whole
/// file (it is a schema problem, not a bad record).
pub fn read_parquet(path: &Path, each: &mut dyn FnMut(RowFields, u64) -> Result<()>) -> Result<()> {
    let err = |what: &str, e: &dyn std::fmt::Display| DataError::record(format!("{}: {what}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| DataError::io(format!("{}: {e}", path.display())))?;
    let reader = SerializedFileReader::new(file).map_err(|e| err("not a readable parquet file", &e))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let names: Vec<String> = schema.root_schema().get_fields().iter().map(|f| f.name().to_string()).collect();
    for (name, required) in COLUMNS {
        if required && !names.iter().any(|n| n == name) {
            return Err(DataError::record(format!(
                "{}: missing column `{name}` (columns: {})",
                path.display(),
                names.join(", ")
            )));
        }
    }
    let rows = reader.get_row_iter(None).map_err(|e| err("cannot read rows", &e))?;
    for (i, row) in rows.enumerate() {
        let n = i as u64 + 1;
        let row = row.map_err(|e| err(&format!("row {n}: cannot decode"), &e))?;
        let mut fields: [String; 4] = Default::default();
        let mut bad = None;
        for (name, field) in row.get_column_iter() {
            let Some(slot) = COLUMNS.iter().position(|(c, _)| c == name) else { continue };
            match field {
                Field::Str(s) => fields[slot] = s.clone(),
                Field::Bytes(b) => match std::str::from_utf8(b.data()) {
                    Ok(s) => fields[slot] = s.to_string(),
                    Err(e) => {
                        let at = e.valid_up_to() + 1;
                        bad = Some((BadReason::NotUtf8, format!("column `{name}`: invalid UTF-8 at byte {at}")));
                        break;
                    }
                },
                Field::Null if !COLUMNS[slot].1 => {}
                other => {
                    let what = if matches!(other, Field::Null) {
                        "null".to_string()
                    } else {
                        format!("{other:?}").chars().take(40).collect()
                    };
                    bad = Some((BadReason::NotAString, format!("column `{name}` must be a string, got {what}")));
                    break;
                }
            }
        }
        each(bad.map_or(Ok(fields), Err), n)?;
    }
    Ok(())
}
