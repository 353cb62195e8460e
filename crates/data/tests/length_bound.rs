//! The byte-length bound that lets `prepare_examples` drop a record too long for `max_length` without tokenizing
//! it (a 50 MB record used to cost 5.8 GB and 46 s only to be dropped): the bound never exceeds the real token
//! count — on every record of the shared dolly-15k and on adversarial texts (the tokenizer's longest entries
//! repeated, NFC-composing Hangul jamo and combining marks) — and preparing data with a huge record gives exactly
//! the examples that tokenizing everything gives. Reference: the tokenizer itself (real ids), no golden numbers.

use data::record::read_path;
use data::{build_example, prepare_examples, BadRecordPolicy, DollyTokenizer, PrepareOptions, TestSize};
use std::path::PathBuf;

fn shared(name: &str) -> PathBuf {
    test_support::shared_file(name)
}

fn tokenizer() -> DollyTokenizer {
    DollyTokenizer::from_file(&shared("20B_tokenizer.json")).expect("the shared 20B tokenizer")
}

#[test]
fn bound_is_below_the_real_count() {
    let tok = tokenizer();
    let (records, _) = read_path(&shared("databricks-dolly-15k.jsonl"), BadRecordPolicy::Fail).unwrap();
    for r in &records {
        let (ids, _) = build_example(&tok, &r.instruction, &r.context, &r.response).unwrap();
        let bytes = r.instruction.len() + r.context.len() + r.response.len();
        assert!(tok.min_tokens_for_bytes(bytes) <= ids.len(), "{}: bound above {} tokens", r.source, ids.len());
    }
    // The longest vocabulary entries, repeated, cover the most bytes per token there is.
    let vocab = tok.inner().get_vocab(false);
    let longest = vocab.keys().max_by_key(|k| k.chars().count()).unwrap();
    let decoded = tok.decode_raw(&[vocab[longest]], false).unwrap();
    let texts = [
        decoded.repeat(200),
        " ".repeat(100_000),
        "=".repeat(100_000),
        "\u{1100}\u{1161}\u{11a8}".repeat(20_000), // Hangul L+V+T: NFC composes 9 bytes into 3
        "e\u{301}\u{304}".repeat(20_000),
    ];
    for t in &texts {
        let n = tok.encode(t).unwrap().len();
        assert!(tok.min_tokens_for_bytes(t.len()) <= n, "{} bytes: bound above {n} tokens", t.len());
    }
}

#[test]
fn huge_records_are_dropped_as_tokenizing_would() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let data = std::fs::read_to_string(shared("databricks-dolly-15k.jsonl")).unwrap();
    let mut lines: Vec<String> = data.lines().take(40).map(str::to_string).collect();
    let huge = serde_json::json!({"instruction": "Summarise.", "context": "word ".repeat(2_000_000),
                                  "response": "ok", "category": "summarization"});
    lines.insert(7, huge.to_string());
    let path = dir.path().join("d.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let (records, _) = read_path(&path, BadRecordPolicy::Fail).unwrap();
    let opts = PrepareOptions { max_length: 256, seed: 42, test_size: TestSize::Count(4), dedup: false };
    let prep = prepare_examples(&records, &tok, &opts).unwrap();
    assert!(prep.report.dropped_records.iter().any(|l| l.ends_with(":8")), "{:?}", prep.report.dropped_records);
    // Without the huge record, tokenizing everything: the same examples survive.
    let mut rest = records.clone();
    rest.remove(7);
    let plain = prepare_examples(&rest, &tok, &opts).unwrap();
    assert_eq!(prep.report.dropped, plain.report.dropped + 1);
    let ids = |p: &data::Prepared| p.train.iter().map(|e| e.input_ids.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&prep), ids(&plain));
}

#[test]
fn empty_and_all_too_long_datasets_say_so() {
    let tok = tokenizer();
    let opts = PrepareOptions { max_length: 8, seed: 42, test_size: TestSize::Count(0), dedup: false };
    let e = prepare_examples(&[], &tok, &opts).unwrap_err().to_string();
    assert!(e.contains("no records"), "{e}");
    let (records, _) = read_path(&shared("databricks-dolly-15k.jsonl"), BadRecordPolicy::Fail).unwrap();
    let e = prepare_examples(&records[..20], &tok, &opts).unwrap_err().to_string();
    assert!(e.contains("at least 8 tokens") && !e.contains("test size"), "{e}");
}
