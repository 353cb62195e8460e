//! Property tests, driven by the project's seeded `common::Rng` (fixed seeds, so a failure names a reproducible
//! case): labels by construction on random records that contain Dolly's keys as literal text; padded and packed
//! batches; the sampler's sharding and exact resume.

use common::Rng;
use data::collate::{pack_batch, pad_batch, PAD_DOC};
use data::sampler::{epoch_order, Sampler, SamplerState};
use data::template::{training_prompt, training_target, training_text};
use data::{build_example, DollyTokenizer, Example, IGNORE_INDEX};

fn tokenizer() -> DollyTokenizer {
    let p = test_support::shared_file("20B_tokenizer.json");
    DollyTokenizer::from_file(&p).expect("the shared 20B tokenizer (CI lays ../shared beside the checkout)")
}

const PIECES: &[&str] = &[
    "hello",
    " world",
    "### Response:",
    "### Response:\n",
    "### End",
    "### Instruction:",
    "Input:",
    "\n",
    "\n\n",
    "   ",
    "                          ",
    "<|endoftext|>",
    "caf\u{e9}",
    "e\u{301}",
    "\u{1F600}",
    "\u{4e2d}",
    "'s",
    " n't",
    "#",
    "###",
    " ?",
    "\t",
    "\r\n",
    "Response",
    "End",
    "1234",
    ".",
];

fn random_text(rng: &mut Rng, min_pieces: usize) -> String {
    let n = min_pieces + rng.below(8) as usize;
    (0..n).map(|_| PIECES[rng.below(PIECES.len() as u64) as usize]).collect()
}

#[test]
fn labels_are_built_by_construction_even_when_texts_contain_the_keys() {
    let tok = tokenizer();
    let s = tok.special();
    let mut rng = Rng::new(20240601);
    for case in 0..400 {
        let instruction = random_text(&mut rng, 1);
        let context = if rng.below(2) == 0 { String::new() } else { random_text(&mut rng, 0) };
        let response = random_text(&mut rng, 1);
        let (ids, labels) = build_example(&tok, &instruction, &context, &response).unwrap();
        let why = format!("case {case}: {:?}", training_text(&instruction, &context, &response));
        assert_eq!(ids.len(), labels.len(), "{why}");
        // Each label is -100 or its input id.
        assert!(ids.iter().zip(&labels).all(|(&i, &l)| l == IGNORE_INDEX || l == i as i32), "{why}");
        // Prompt tokens are never supervised; everything after the prompt is.
        let prompt = tok.encode(&training_prompt(&instruction, &context)).unwrap();
        assert_eq!(&ids[..prompt.len()], &prompt[..], "{why}");
        assert!(labels[..prompt.len()].iter().all(|&l| l == IGNORE_INDEX), "{why}");
        assert!(labels[prompt.len()..].iter().all(|&l| l != IGNORE_INDEX), "{why}");
        assert_eq!(ids[prompt.len() - 1], s.response, "{why}");
        // The supervised part is the response, "\n\n" and `### End`; the last supervised token is 50277.
        assert_eq!(&ids[prompt.len()..], &tok.encode(&training_target(&response)).unwrap()[..], "{why}");
        assert_eq!(*labels.last().unwrap(), s.end as i32, "{why}");
        if response.ends_with(|c: char| c.is_ascii_alphanumeric()) {
            assert_eq!(ids[ids.len() - 2], 535, "{why}: the \"\\n\\n\" token precedes ### End");
        }
        // Building by parts gives exactly the ids of the whole text (the parity fixture relies on this).
        assert_eq!(ids, tok.encode(&training_text(&instruction, &context, &response)).unwrap(), "{why}");
    }
}

fn random_examples(rng: &mut Rng, n: usize, max_len: usize) -> Vec<Example> {
    (0..n)
        .map(|k| {
            let len = 2 + rng.below(max_len as u64 - 1) as usize;
            let prompt = 1 + rng.below(len as u64 - 1) as usize;
            let input_ids: Vec<u32> = (0..len).map(|_| 2 + rng.below(50000) as u32).collect();
            let labels =
                input_ids.iter().enumerate().map(|(i, &t)| if i < prompt { IGNORE_INDEX } else { t as i32 }).collect();
            Example { input_ids, labels, record: k as u32 }
        })
        .collect()
}

#[test]
fn padded_batches_round_up_to_8_and_keep_every_example() {
    let mut rng = Rng::new(7);
    for _ in 0..200 {
        let n = 1 + rng.below(9) as usize;
        let ex = random_examples(&mut rng, n, 300);
        let refs: Vec<&Example> = ex.iter().collect();
        let b = pad_batch(&refs, 8, 0).unwrap();
        let longest = ex.iter().map(|e| e.len()).max().unwrap();
        assert_eq!(b.seq_len % 8, 0);
        assert!(b.seq_len >= longest && b.seq_len < longest + 8);
        assert_eq!((b.batch_size, b.examples, b.doc_ids.is_none()), (n, n, true));
        for (r, e) in ex.iter().enumerate() {
            let row = r * b.seq_len..(r + 1) * b.seq_len;
            assert_eq!(&b.input_ids[row.clone()][..e.len()], &e.input_ids[..]);
            assert_eq!(&b.labels[row.clone()][..e.len()], &e.labels[..]);
            assert!(b.input_ids[row.clone()][e.len()..].iter().all(|&t| t == 0));
            assert!(b.labels[row.clone()][e.len()..].iter().all(|&l| l == IGNORE_INDEX));
            let mask = &b.attention_mask[row.clone()];
            assert!(mask[..e.len()].iter().all(|&m| m == 1) && mask[e.len()..].iter().all(|&m| m == 0));
            assert!(b.position_ids[row].iter().enumerate().all(|(i, &p)| p as usize == i));
        }
        let real: usize = ex.iter().map(|e| e.len()).sum();
        assert_eq!(b.real_tokens(), real);
        let targets: usize = ex.iter().map(|e| e.labels[1..].iter().filter(|&&l| l != IGNORE_INDEX).count()).sum();
        assert_eq!(b.target_tokens(), targets);
    }
}

/// Re-assemble each document of a packed batch: (row, start, len) pieces in order.
fn pieces(b: &data::Batch) -> Vec<(usize, usize, usize)> {
    let docs = b.doc_ids.as_ref().unwrap();
    let mut out = Vec::new();
    for r in 0..b.batch_size {
        let row = &docs[r * b.seq_len..(r + 1) * b.seq_len];
        let mut t = 0;
        while t < b.seq_len && row[t] != PAD_DOC {
            let d = row[t];
            let start = t;
            while t < b.seq_len && row[t] == d {
                t += 1;
            }
            out.push((r, start, t - start));
        }
        assert!(row[t..].iter().all(|&d| d == PAD_DOC), "padding only at the end of a row");
    }
    out
}

#[test]
fn packed_batches_hold_whole_documents_with_restarting_positions() {
    let mut rng = Rng::new(11);
    for case in 0..200 {
        let split = case % 2 == 1;
        let seq_len = 64 + rng.below(200) as usize;
        let bsz = 1 + rng.below(4) as usize;
        let longest = if split { (2 * seq_len).min(bsz * seq_len) } else { seq_len };
        let ex = random_examples(&mut rng, 30, longest);
        let refs: Vec<&Example> = ex.iter().collect();
        let b = pack_batch(&refs, bsz, seq_len, split, 0).unwrap();
        assert!(b.examples >= 1 && b.input_ids.len() == bsz * seq_len);
        // Concatenating the pieces in order gives the consumed examples, each starting at position 0.
        let mut flat_ids = Vec::new();
        let mut flat_labels = Vec::new();
        for (r, start, len) in pieces(&b) {
            let o = r * seq_len + start;
            assert!(b.position_ids[o..o + len].iter().enumerate().all(|(i, &p)| p as usize == i), "case {case}");
            assert!(b.attention_mask[o..o + len].iter().all(|&m| m == 1));
            flat_ids.extend_from_slice(&b.input_ids[o..o + len]);
            flat_labels.extend_from_slice(&b.labels[o..o + len]);
        }
        let want_ids: Vec<u32> = ex[..b.examples].iter().flat_map(|e| e.input_ids.clone()).collect();
        let want_labels: Vec<i32> = ex[..b.examples].iter().flat_map(|e| e.labels.clone()).collect();
        assert_eq!(flat_ids, want_ids, "case {case}");
        assert_eq!(flat_labels, want_labels, "case {case}");
        if !split {
            assert_eq!(pieces(&b).len(), b.examples, "no example is split without asking");
        }
        // Stopping was forced: the next example did not fit in what was left.
        if b.examples < ex.len() {
            let used: usize = b.real_tokens();
            let next = ex[b.examples].len();
            if split {
                assert!(used + next > bsz * seq_len, "case {case}");
            }
        }
        assert_eq!(b.waste().real_tokens as usize, flat_ids.len());
    }
    // Without splitting, an example longer than a row is an error that names it.
    let ex = random_examples(&mut Rng::new(1), 1, 400);
    let long = Example { input_ids: vec![5; 100], labels: vec![IGNORE_INDEX; 100], record: 9 };
    let err = pack_batch(&[&long], 2, 64, false, 0).unwrap_err();
    assert!(err.message.contains("record 9"), "{err}");
    assert!(pack_batch(&[&ex[0]], 2, 4096, false, 0).is_ok());
    let err = pack_batch(&[&long], 1, 64, true, 0).unwrap_err();
    assert!(err.message.contains("more than a whole batch"), "{err}");
    assert_eq!(pack_batch(&[&long], 2, 64, true, 0).unwrap().examples, 1);
}

#[test]
fn sampler_shards_disjointly_and_resumes_exactly() {
    let n = 103;
    // Ranks partition the first world*floor(n/world) positions of each epoch's permutation.
    for world in 1..5u32 {
        let mut all: Vec<u32> = (0..world).flat_map(|r| epoch_order(n, 42, 3, r, world, true)).collect();
        let per = n / world as usize;
        assert!((0..world).all(|r| epoch_order(n, 42, 3, r, world, true).len() == per));
        all.sort();
        all.dedup();
        assert_eq!(all.len(), per * world as usize);
    }
    assert_ne!(epoch_order(n, 42, 0, 0, 1, true), epoch_order(n, 42, 1, 0, 1, true));
    assert_eq!(epoch_order(5, 42, 0, 0, 1, false), vec![0, 1, 2, 3, 4]);

    // Uninterrupted run over 3 epochs vs. a run saved (as JSON) and restored at every step.
    let mut rng = Rng::new(5);
    let mut a = Sampler::new(n, 42, 1, 2, true).unwrap();
    let mut b = Sampler::new(n, 42, 1, 2, true).unwrap();
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    while a.epoch() < 3 {
        let k = 1 + rng.below(9) as usize;
        let got = a.next_indices(k);
        if got.is_empty() {
            a.start_next_epoch();
        }
        seen_a.extend(got);
        let json = serde_json::to_string(&b.state()).unwrap();
        let state: SamplerState = serde_json::from_str(&json).unwrap();
        b = Sampler::from_state(state, n).unwrap();
        let got = b.next_indices(k);
        if got.is_empty() {
            b.start_next_epoch();
        }
        seen_b.extend(got);
    }
    assert_eq!(seen_a, seen_b);
    assert_eq!(seen_a.len(), 3 * (n / 2));
    // Wrong dataset or impossible states are refused with a reason.
    let st = a.state();
    assert!(Sampler::from_state(st.clone(), n + 1).unwrap_err().message.contains("different data"));
    assert!(Sampler::from_state(SamplerState { rank: 2, ..st.clone() }, n).is_err());
    assert!(Sampler::from_state(SamplerState { cursor: 1000, ..st }, n).is_err());
    assert!(serde_json::from_str::<SamplerState>(r#"{"seed":1,"bogus":2}"#).is_err());
}
