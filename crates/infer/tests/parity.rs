//! Greedy generation through `infer` equals HF transformers `generate(do_sample=False)` on the engine's golden
//! models (crates/neox/tests/fixtures, made by tools/make_goldens.py with torch 2.15.0 / transformers 5.24.0,
//! float32; token ids exact), with and without left padding; a row joining a running batch, and rows of a batch
//! with mixed greedy/sampled neighbours, produce the same ids as alone; stop-token and budget handling.

use common::Rng;
use infer::{generate, BatchDecoder, FinishReason, SamplingParams, SeqParams};
use neox::Model;
use safetensors::SafeTensors;
use std::path::PathBuf;

fn fixture(name: &str) -> (Model, Vec<u8>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../neox/tests/fixtures").join(name);
    (Model::load(&dir).unwrap(), std::fs::read(dir.join("golden.safetensors")).unwrap())
}

fn i64s(bytes: &[u8], name: &str) -> (Vec<i64>, Vec<usize>) {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let t = st.tensor(name).unwrap();
    (t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(), t.shape().to_vec())
}

fn greedy(max_new: usize) -> SeqParams {
    SeqParams::new(SamplingParams::greedy(), max_new, Rng::new(0))
}

fn gen(m: &Model, prompts: &[Vec<u32>], max_new: usize) -> Vec<Vec<u32>> {
    let v = m.config.vocab_size;
    let seqs = prompts.iter().map(|p| (p.clone(), greedy(max_new))).collect();
    generate(m, seqs, v, None, |_, _| {}).unwrap().into_iter().map(|o| o.tokens).collect()
}

const MODELS: [&str; 2] = ["tiny-parallel", "tiny-sequential"];

/// (single prompt, its 8 HF tokens, batch prompts without pads, their HF tokens)
type Goldens = (Vec<u32>, Vec<u32>, Vec<Vec<u32>>, Vec<Vec<u32>>);

fn goldens(g: &[u8]) -> Goldens {
    let (p, _) = i64s(g, "gen_prompt_single");
    let (w, _) = i64s(g, "gen_single");
    let prompt: Vec<u32> = p.iter().map(|&x| x as u32).collect();
    let want: Vec<u32> = w[prompt.len()..].iter().map(|&x| x as u32).collect();
    let (pb, shape) = i64s(g, "gen_prompt_batch");
    let (mask, _) = i64s(g, "gen_mask_batch");
    let (wb, wshape) = i64s(g, "gen_batch");
    let (b, t) = (shape[0], shape[1]);
    let prompts =
        (0..b).map(|r| (0..t).filter(|&i| mask[r * t + i] == 1).map(|i| pb[r * t + i] as u32).collect()).collect();
    let wants =
        (0..b).map(|r| wb[r * wshape[1] + t..(r + 1) * wshape[1]].iter().map(|&x| x as u32).collect()).collect();
    (prompt, want, prompts, wants)
}

#[test]
fn greedy_matches_hf_alone_and_left_padded() {
    for name in MODELS {
        let (m, g) = fixture(name);
        let (prompt, want, prompts, wants) = goldens(&g);
        assert_eq!(gen(&m, &[prompt], 8)[0], want, "{name} single");
        let out = gen(&m, &prompts, 8);
        for r in 0..prompts.len() {
            assert_eq!(out[r], wants[r], "{name} batch row {r}");
            assert_eq!(gen(&m, &prompts[r..r + 1], 8)[0], wants[r], "{name} row {r} alone");
        }
    }
}

#[test]
fn row_joining_a_running_batch_matches_hf() {
    for name in MODELS {
        let (m, g) = fixture(name);
        let (prompt, want, prompts, wants) = goldens(&g);
        let v = m.config.vocab_size;
        let mut dec = BatchDecoder::new(&m, 3, 64, v, None);
        let r0 = dec.admit(prompts[0].clone(), greedy(8)).unwrap();
        let mut outs = vec![Vec::new(); 3];
        // two steps alone, then the single prompt joins, then a step later the second batch prompt
        for step in 0..20 {
            if step == 2 {
                assert!(dec.can_admit(prompt.len(), 8));
                assert_eq!(dec.admit(prompt.clone(), greedy(8)).unwrap(), 1);
            }
            if step == 3 {
                assert_eq!(dec.admit(prompts[1].clone(), greedy(8)).unwrap(), 2);
            }
            for e in dec.step().unwrap() {
                outs[e.row].push(e.token);
            }
        }
        assert_eq!(r0, 0);
        assert_eq!(outs[0], wants[0], "{name} first row");
        assert_eq!(outs[1], want, "{name} joined row");
        assert_eq!(outs[2], wants[1], "{name} late row");
        // finished rows are recycled (KvCache::reset_row): a new request takes one and still matches HF
        assert!(dec.can_admit(prompt.len(), 8));
        let r = dec.admit(prompt.clone(), greedy(8)).unwrap();
        let mut again = Vec::new();
        for _ in 0..8 {
            for e in dec.step().unwrap() {
                if e.row == r {
                    again.push(e.token);
                }
            }
        }
        assert_eq!(again, want, "{name} recycled row {r}");
    }
}

#[test]
fn sampled_neighbours_do_not_change_greedy_rows_and_seeds_reproduce() {
    let (m, g) = fixture("tiny-parallel");
    let (prompt, want, _, _) = goldens(&g);
    let v = m.config.vocab_size;
    let sampled = |seed| SeqParams::new(SamplingParams::default(), 8, Rng::new(seed));
    let seqs = vec![(prompt.clone(), sampled(1)), (prompt.clone(), greedy(8)), (prompt.clone(), sampled(2))];
    let a = generate(&m, seqs.clone(), v, None, |_, _| {}).unwrap();
    assert_eq!(a[1].tokens, want);
    let b = generate(&m, seqs, v, None, |_, _| {}).unwrap();
    assert_eq!(a, b, "same seeds, same samples");
    assert!(a.iter().all(|o| o.tokens.len() == 8 && o.finish == FinishReason::Length));
}

#[test]
fn stop_token_ends_a_row_and_is_kept() {
    let (m, g) = fixture("tiny-parallel");
    let (prompt, want, _, _) = goldens(&g);
    let v = m.config.vocab_size;
    // make the 4th greedy token the stop id: generation ends there, the other row continues
    let stop = want[3];
    let first = want.iter().position(|&t| t == stop).unwrap();
    let seqs = vec![(prompt.clone(), greedy(8)), (prompt.clone(), greedy(2))];
    let mut events = 0;
    let out = generate(&m, seqs, v, Some(stop), |_, _| events += 1).unwrap();
    assert_eq!(out[0].tokens, want[..=first].to_vec());
    assert_eq!(out[0].finish, FinishReason::Stop);
    let len1 = if first < 2 { first + 1 } else { 2 };
    assert_eq!(out[1].tokens.len(), len1);
    assert_eq!(events, out[0].tokens.len() + out[1].tokens.len());
}

#[test]
fn padded_vocabulary_rows_are_never_generated() {
    let (m, g) = fixture("tiny-parallel");
    let (prompt, _, _, _) = goldens(&g);
    // pretend the tokenizer has only 100 ids out of the model's 512 rows
    let seqs = (0..4)
        .map(|s| (prompt.clone(), SeqParams::new(SamplingParams { top_p: 1.0, ..Default::default() }, 30, Rng::new(s))))
        .chain([(prompt.clone(), greedy(30))])
        .collect();
    let out = generate(&m, seqs, 100, None, |_, _| {}).unwrap();
    assert!(out.iter().all(|o| o.tokens.iter().all(|&t| t < 100)));
}

#[test]
fn admission_is_checked() {
    let (m, _) = fixture("tiny-parallel");
    let v = m.config.vocab_size;
    let mut dec = BatchDecoder::new(&m, 1, 16, v, None);
    assert!(dec.admit(vec![], greedy(1)).is_err());
    assert!(dec.admit(vec![1, 2], greedy(0)).is_err());
    assert!(dec.admit(vec![v as u32], greedy(1)).is_err());
    assert!(dec.admit(vec![1; 10], greedy(8)).is_err(), "10 + 8 - 1 slots > 16");
    assert!(dec.admit(vec![1; 60], greedy(8)).is_err(), "beyond max positions 64");
    assert_eq!(dec.admit(vec![1; 9], greedy(8)).unwrap(), 0);
    assert!(dec.step().unwrap().len() == 1);
}
