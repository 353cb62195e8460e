//! The bad-record matrix: every malformed-record case fails with its file:line (parquet: row) and reason, or is
//! skipped and counted under `skip`; plus the .json array, JSON Lines, parquet and directory readers.

use data::record::{read_path, BadRecordPolicy, ReadReport, Record};
use data::ErrorKind;
use std::path::Path;

const GOOD: &str = r#"{"instruction": "I", "context": "", "response": "R", "category": "open_qa"}"#;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn read(p: &Path, policy: BadRecordPolicy) -> Result<(Vec<Record>, ReadReport), data::DataError> {
    read_path(p, policy)
}

#[test]
fn each_bad_case_fails_with_its_line_or_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    // (bad line, reason, words the message must contain)
    let cases: Vec<(&[u8], &str, &str)> = vec![
        (b"{\"instruction\": \"I\", \"context\": \"\", ", "invalid_json", "invalid JSON"),
        (b"{\"instruction\": \"I\xff\", \"context\": \"\", \"response\": \"R\"}", "not_utf8", "invalid UTF-8"),
        (b"[1, 2]", "not_an_object", "expected a JSON object, got an array"),
        (b"42", "not_an_object", "got a number"),
        (b"{\"context\": \"\", \"response\": \"R\"}", "missing_field", "missing field `instruction`"),
        (b"{\"instruction\": \"I\", \"response\": \"R\"}", "missing_field", "missing field `context`"),
        (b"{\"instruction\": \"I\", \"context\": \"\"}", "missing_field", "missing field `response`"),
        (
            b"{\"instruction\": 3, \"context\": \"\", \"response\": \"R\"}",
            "not_a_string",
            "`instruction` must be a string, got a number",
        ),
        (
            b"{\"instruction\": \"I\", \"context\": null, \"response\": \"R\"}",
            "not_a_string",
            "`context` must be a string, got null",
        ),
        (
            b"{\"instruction\": \"I\", \"context\": \"\", \"response\": \"R\", \"category\": 1}",
            "not_a_string",
            "`category`",
        ),
        (
            b"{\"instruction\": \"\", \"context\": \"\", \"response\": \"R\"}",
            "empty_instruction",
            "empty `instruction`",
        ),
        (b"{\"instruction\": \"I\", \"context\": \"c\", \"response\": \"\"}", "empty_response", "empty `response`"),
    ];
    for (i, (bad, reason, words)) in cases.iter().enumerate() {
        let mut body = Vec::new();
        body.extend_from_slice(GOOD.as_bytes());
        body.extend_from_slice(b"\n\n"); // line 2 is blank: not a record
        body.extend_from_slice(bad);
        body.extend_from_slice(b"\n");
        body.extend_from_slice(GOOD.as_bytes());
        body.extend_from_slice(b"\n");
        let p = write(dir.path(), &format!("case{i}.jsonl"), &body);
        let err = read(&p, BadRecordPolicy::Fail).unwrap_err();
        assert_eq!(err.kind, ErrorKind::BadRecord, "case {i}");
        let want_loc = format!("{}:3:", p.display());
        assert!(err.message.starts_with(&want_loc), "case {i}: {err}");
        assert!(err.message.contains(words), "case {i}: {err}");
        assert!(err.message.contains("--on-bad-record skip"), "case {i}: {err}");

        let (records, report) = read(&p, BadRecordPolicy::Skip).unwrap();
        assert_eq!(records.len(), 2, "case {i}");
        assert_eq!(records[1].source.line, 4);
        assert_eq!(report.skipped_count(), 1, "case {i}");
        assert_eq!(report.skipped[0].reason.as_str(), *reason, "case {i}");
        assert_eq!(report.skipped[0].location, format!("{}:3", p.display()));
        assert_eq!(report.skipped_by_reason.get(reason), Some(&1));
        assert_eq!(report.blank_lines, 1);
        assert!(report.summary().contains(reason), "{}", report.summary());
    }
}

#[test]
fn category_is_optional_text_is_untouched_crlf_and_bom_are_fine() {
    let dir = tempfile::tempdir().unwrap();
    let body =
        "\u{feff}{\"instruction\": \"  I \", \"context\": \"C\\n\", \"response\": \" R\"}\r\n".to_string() + GOOD;
    let p = write(dir.path(), "a.jsonl", body.as_bytes());
    let (r, report) = read(&p, BadRecordPolicy::Fail).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].instruction.as_str(), r[0].context.as_str(), r[0].response.as_str()), ("  I ", "C\n", " R"));
    assert_eq!(r[0].category, "");
    assert_eq!(r[1].source.to_string(), format!("{}:2", p.display()));
    assert_eq!(report.blank_lines, 0);
}

#[test]
fn json_array_records_carry_their_lines_and_json_lines_in_dot_json_work() {
    let dir = tempfile::tempdir().unwrap();
    let arr =
        format!("[\n  {GOOD},\n  {{\"instruction\": \"\", \"context\": \"\", \"response\": \"R\"}},\n\n  {GOOD}\n]\n");
    let p = write(dir.path(), "a.json", arr.as_bytes());
    let err = read(&p, BadRecordPolicy::Fail).unwrap_err();
    assert!(err.message.starts_with(&format!("{}:3:", p.display())), "{err}");
    let (r, rep) = read(&p, BadRecordPolicy::Skip).unwrap();
    assert_eq!(r.iter().map(|x| x.source.line).collect::<Vec<_>>(), vec![2, 5]);
    assert_eq!(rep.skipped_count(), 1);
    // A broken array is an error for the whole file, whatever the policy.
    let p2 = write(dir.path(), "b.json", b"[\n{\"a\": 1},\n{\"a\": ]");
    let err = read(&p2, BadRecordPolicy::Skip).unwrap_err();
    assert!(err.message.contains(":3:") && err.message.contains("whole file"), "{err}");
    // .json holding JSON Lines (as the hub's datasets library accepts).
    let p3 = write(dir.path(), "c.json", format!("{GOOD}\n{GOOD}\n").as_bytes());
    assert_eq!(read(&p3, BadRecordPolicy::Fail).unwrap().0.len(), 2);
}

#[test]
fn directories_are_read_recursively_in_sorted_order_and_odd_paths_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    write(dir.path(), "b.jsonl", format!("{GOOD}\n").as_bytes());
    write(&dir.path().join("sub"), "a.json", format!("[{GOOD}]").as_bytes());
    write(dir.path(), "README.md", b"not data");
    write(dir.path(), ".hidden.jsonl", b"garbage");
    let (r, rep) = read(dir.path(), BadRecordPolicy::Fail).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(rep.files.len(), 2);
    assert!(rep.files[0].ends_with("b.jsonl") && rep.files[1].ends_with("sub/a.json"));
    let empty = tempfile::tempdir().unwrap();
    assert!(read(empty.path(), BadRecordPolicy::Fail).unwrap_err().message.contains("no .jsonl"));
    let txt = write(dir.path(), "x.txt", b"");
    assert!(read(&txt, BadRecordPolicy::Fail).unwrap_err().message.contains("unsupported"));
    assert_eq!(read(&dir.path().join("nope.jsonl"), BadRecordPolicy::Fail).unwrap_err().kind, ErrorKind::Io);
}

/// Write a parquet file with optional UTF-8 columns; `None` = null.
fn write_parquet(path: &Path, columns: &[(&str, Vec<Option<&str>>)]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;
    let fields: Vec<String> = columns.iter().map(|(n, _)| format!("OPTIONAL BYTE_ARRAY {n} (UTF8);")).collect();
    let schema = Arc::new(parse_message_type(&format!("message schema {{ {} }}", fields.join(" "))).unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build());
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut i = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        let vals = &columns[i].1;
        let data: Vec<ByteArray> = vals.iter().flatten().map(|s| ByteArray::from(*s)).collect();
        let defs: Vec<i16> = vals.iter().map(|v| v.is_some() as i16).collect();
        col.typed::<ByteArrayType>().write_batch(&data, Some(&defs), None).unwrap();
        col.close().unwrap();
        i += 1;
    }
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_rows_are_read_with_row_numbers_and_bad_rows_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("train-00000-of-00001.parquet");
    write_parquet(
        &p,
        &[
            ("instruction", vec![Some("I1"), Some(""), Some("I3"), Some("I4")]),
            ("context", vec![Some(""), Some(""), Some("C3"), Some("")]),
            ("response", vec![Some("R1"), Some("R2"), None, Some("R4 \u{e9}")]),
            ("category", vec![Some("open_qa"), None, Some("closed_qa"), None]),
        ],
    );
    let err = read(&p, BadRecordPolicy::Fail).unwrap_err();
    assert!(err.message.starts_with(&format!("{}: row 2:", p.display())), "{err}");
    assert!(err.message.contains("empty `instruction`"), "{err}");
    let (r, rep) = read(&p, BadRecordPolicy::Skip).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].instruction.as_str(), r[0].category.as_str()), ("I1", "open_qa"));
    assert_eq!((r[1].response.as_str(), r[1].category.as_str(), r[1].source.line), ("R4 \u{e9}", "", 4));
    assert_eq!(rep.skipped_count(), 2);
    assert_eq!(rep.skipped[1].location, format!("{}: row 3", p.display()));
    assert!(rep.skipped[1].message.contains("`response` must be a string, got null"), "{:?}", rep.skipped[1]);

    let q = dir.path().join("no_response.parquet");
    write_parquet(&q, &[("instruction", vec![Some("I")]), ("context", vec![Some("")])]);
    let err = read(&q, BadRecordPolicy::Skip).unwrap_err();
    assert!(err.message.contains("missing column `response`"), "{err}");
    let junk = write(dir.path(), "junk.parquet", b"PAR1 not really");
    assert!(read(&junk, BadRecordPolicy::Skip).unwrap_err().message.contains("not a readable parquet file"));
}
