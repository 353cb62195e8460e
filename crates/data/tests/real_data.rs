//! Checks on the real files in ../shared/data (dolly-15k and the GPT-NeoX-20B tokenizer): the spec's counts
//! (15,011 records, 34 dropped and 14,977 kept at max length 2048; 207 dropped at 1024) and token-id parity with
//! the Python `tokenizers` library over the whole dataset, against the committed fixture written by
//! tools/tokenizer_fixture.py (tokenizers==0.22.2, Python 3.11; exact equality, no tolerance).

use data::example::{build_examples, dedup_indices};
use data::record::read_path;
use data::{prepare_examples, BadRecordPolicy, DollyTokenizer, PrepareOptions, TestSize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

fn shared(name: &str) -> PathBuf {
    test_support::shared_file(name)
}

fn fixture() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_parity.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("fixture json")
}

fn le_bytes(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|i| i.to_le_bytes()).collect()
}

#[test]
fn shared_files_have_the_documented_checksums() {
    // sha256 values from the spec (section 1 and 3).
    let d = common::sha256_file(&shared("databricks-dolly-15k.jsonl")).unwrap();
    assert_eq!(d, "9754c133e57759b3dcc2effef5eec3b82ffee0b5b0eb4f461d3f93a75bd2181f");
    let t = common::sha256_file(&shared("20B_tokenizer.json")).unwrap();
    assert_eq!(t, "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade");
}

#[test]
fn tokenizer_setup_matches_python() {
    let fx = fixture();
    let tok = DollyTokenizer::from_file(&shared("20B_tokenizer.json")).unwrap();
    let s = tok.special();
    assert_eq!([s.end, s.instruction, s.response, s.pad], [50277, 50278, 50279, 0]);
    assert_eq!(fx["special_ids"], serde_json::json!([50277, 50278, 50279]));
    assert_eq!(tok.vocab_size(), 50280);
    assert_eq!(fx["vocab_size"], 50280);
    assert_eq!(tok.encode("Hello Dolly!").unwrap(), vec![12092, 399, 10378, 2]);
    for t in fx["tricky"].as_array().unwrap() {
        let want: Vec<u32> = serde_json::from_value(t["ids"].clone()).unwrap();
        assert_eq!(tok.encode(t["text"].as_str().unwrap()).unwrap(), want, "text {:?}", t["text"]);
    }
    // Decoding keeps special tokens and applies HF's clean-up.
    let ids = tok.encode("### Response:\nIt is n't here , is it ?\n\n### End").unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), "### Response:\nIt isn't here, is it?\n\n### End");
    assert_eq!(tok.check_model_vocab(50304).unwrap(), data::VocabFit::Shrink { rows: 50304, to: 50280 });
    assert_eq!(tok.check_model_vocab(50280).unwrap(), data::VocabFit::Exact);
    assert_eq!(tok.check_model_vocab(50277).unwrap(), data::VocabFit::Grow { rows: 50277, to: 50280 });
    let err = tok.check_model_vocab(1024).unwrap_err();
    assert!(err.message.contains("does not belong to this model"), "{err}");

    // The saved tokenizer files reload with the same ids and carry transformers' special-token settings.
    let dir = tempfile::tempdir().unwrap();
    tok.save_pretrained(dir.path(), Some(2048)).unwrap();
    let again = DollyTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    assert_eq!((again.special(), again.vocab_size()), (tok.special(), 50280));
    let text = data::template::training_text("Say hi", "ctx", "Hi!");
    assert_eq!(again.encode(&text).unwrap(), tok.encode(&text).unwrap());
    let read = |n: &str| -> Value { serde_json::from_slice(&std::fs::read(dir.path().join(n)).unwrap()).unwrap() };
    let map = read("special_tokens_map.json");
    assert_eq!(map["pad_token"], "<|endoftext|>");
    assert_eq!(map["additional_special_tokens"], serde_json::json!(["### End", "### Instruction:", "### Response:\n"]));
    let cfg = read("tokenizer_config.json");
    assert_eq!((cfg["model_max_length"].as_u64(), cfg["pad_token"].as_str()), (Some(2048), Some("<|endoftext|>")));
}

#[test]
fn whole_dataset_matches_python_ids_and_spec_counts() {
    let fx = fixture();
    let tok = DollyTokenizer::from_file(&shared("20B_tokenizer.json")).unwrap();
    let (records, report) = read_path(&shared("databricks-dolly-15k.jsonl"), BadRecordPolicy::Fail).unwrap();
    assert_eq!(records.len(), 15011);
    assert_eq!(report.skipped_count(), 0);
    assert_eq!(fx["records"], 15011);
    let all: Vec<usize> = (0..records.len()).collect();
    let examples = build_examples(&records, &all, &tok).unwrap();

    // Per-record parity: ids built prompt + target by construction equal Python's ids of the whole text.
    let per: Vec<&str> = fx["per_record"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let mut all_hash = Sha256::new();
    let mut mismatches = Vec::new();
    for (ex, want) in examples.iter().zip(&per) {
        let b = le_bytes(&ex.input_ids);
        all_hash.update(&b);
        let h: String = Sha256::digest(&b).iter().take(8).map(|x| format!("{x:02x}")).collect();
        let got = format!("{}:{}:{h}", records[ex.record as usize].source.line, ex.len());
        if &got != want {
            mismatches.push((got, want.to_string()));
        }
    }
    assert!(mismatches.is_empty(), "{} records differ from Python, first: {:?}", mismatches.len(), &mismatches[..1]);
    let hex: String = all_hash.finalize().iter().map(|x| format!("{x:02x}")).collect();
    assert_eq!(hex, fx["all_ids_sha256"].as_str().unwrap());
    let total: u64 = examples.iter().map(|e| e.len() as u64).sum();
    assert_eq!(total, fx["total_tokens"].as_u64().unwrap());

    // Full ids and Dolly's labels (mask through the first 50279) for a few records.
    for f in fx["full"].as_array().unwrap() {
        let line = f["line"].as_u64().unwrap();
        let ex = examples.iter().find(|e| records[e.record as usize].source.line == line).unwrap();
        let ids: Vec<u32> = serde_json::from_value(f["input_ids"].clone()).unwrap();
        let labels: Vec<i32> = serde_json::from_value(f["labels"].clone()).unwrap();
        assert_eq!(ex.input_ids, ids, "line {line}");
        assert_eq!(ex.labels, labels, "line {line}");
    }

    // Spec section 5 counts (also in the fixture, computed by Python).
    let dropped = |m: usize| examples.iter().filter(|e| e.len() >= m).count();
    assert_eq!(dropped(2048), 34);
    assert_eq!(dropped(1024), 207);
    assert_eq!(fx["dropped_at_2048"], 34);
    assert_eq!(fx["dropped_at_1024"], 207);

    // Spec section 1: categories, contexts, duplicates.
    let count = |c: &str| records.iter().filter(|r| r.category == c).count();
    let cats = [
        ("open_qa", 3742),
        ("general_qa", 2191),
        ("classification", 2136),
        ("closed_qa", 1773),
        ("brainstorming", 1766),
        ("information_extraction", 1506),
        ("summarization", 1188),
        ("creative_writing", 709),
    ];
    for (c, n) in cats {
        assert_eq!(count(c), n, "category {c}");
    }
    assert_eq!(records.iter().filter(|r| !r.context.is_empty()).count(), 4467);
    assert_eq!(records.len() - dedup_indices(&records).len(), 8);
}

#[test]
fn prepare_splits_like_the_spec() {
    let tok = DollyTokenizer::from_file(&shared("20B_tokenizer.json")).unwrap();
    let (records, _) = read_path(&shared("databricks-dolly-15k.jsonl"), BadRecordPolicy::Fail).unwrap();
    let opts = PrepareOptions { max_length: 2048, seed: 42, test_size: TestSize::Count(1000), dedup: false };
    let p = prepare_examples(&records, &tok, &opts).unwrap();
    assert_eq!((p.report.records, p.report.dropped, p.report.kept), (15011, 34, 14977));
    assert_eq!((p.train.len(), p.test.len()), (13977, 1000));
    assert_eq!(p.report.dropped_records.len(), 34);
    assert!(p.train.iter().chain(&p.test).all(|e| e.len() < 2048));
    // Same seed, same split; another seed, another order (on a subset: tokenizing is the slow part).
    let few = &records[..500];
    let small = PrepareOptions { test_size: TestSize::Count(50), ..opts.clone() };
    let a = prepare_examples(few, &tok, &small).unwrap();
    assert_eq!(a.test, prepare_examples(few, &tok, &small).unwrap().test);
    assert_ne!(a.test, prepare_examples(few, &tok, &PrepareOptions { seed: 7, ..small }).unwrap().test);
    let mut dup = few.to_vec();
    dup.extend_from_slice(&few[..3]);
    let d = prepare_examples(&dup, &tok, &PrepareOptions { dedup: true, test_size: TestSize::Ratio(0.05), ..small })
        .unwrap();
    assert_eq!(d.report.duplicates_removed, 3);
    assert_eq!(d.report.test, (d.report.kept as f64 * 0.05).ceil() as usize);
}
