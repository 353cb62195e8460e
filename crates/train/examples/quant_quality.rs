//! A quantized model (q8_0 or q4_k) against the model it was quantized from, on a trained model (issue 15's
//! quality check): held-out loss over the test split `dolly train` made (the same --test-size, --seed,
//! --max-length), and the greedy answers of the first N test prompts, token by token, against the bf16-decoding
//! model (Dolly's inference dtype).
//!
//!     cargo run --release -p train --example quant_quality -- out/dolly-14m ../shared/data/databricks-dolly-15k.jsonl \
//!         [TEST_SIZE=200] [SEED=42] [MAX_LENGTH=512] [PROMPTS=20] [NEW_TOKENS=64] [TYPE=q8_0]
use data::{BadRecordPolicy, DollyTokenizer, HubOptions, PrepareOptions, TestSize};
use neox::{Activations, Model, QuantType};
use std::path::Path;

fn arg(i: usize, default: usize) -> usize {
    std::env::args().nth(i).map_or(default, |s| s.parse().expect("a number"))
}

fn loss(m: &Model, test: &[data::Example]) -> f64 {
    let (mut sum, mut count) = (0f64, 0usize);
    let mut acts = Activations::new(&m.config, 8, 64, false);
    for chunk in test.chunks(8) {
        let refs: Vec<&data::Example> = chunk.iter().collect();
        let b = data::pad_batch(&refs, 8, 0).unwrap();
        acts.ensure(&m.config, b.batch_size, b.seq_len);
        let (s, c) = m.forward_loss(&train::trainer::view(&b), &mut acts).unwrap();
        sum += s;
        count += c;
    }
    sum / count as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(&args[1]);
    let (test_size, seed, max_length, prompts, new) = (arg(3, 200), arg(4, 42), arg(5, 512), arg(6, 20), arg(7, 64));
    let tok = DollyTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let loaded = data::load_dataset(&args[2], BadRecordPolicy::Fail, &HubOptions::from_env()).unwrap();
    let opts = PrepareOptions { max_length, seed: seed as u64, test_size: TestSize::Count(test_size), dedup: false };
    let prep = data::prepare_examples(&loaded.records, &tok, &opts).unwrap();
    let f = Model::load(dir).unwrap();
    let kind = args.get(8).map_or(QuantType::Q8_0, |s| QuantType::parse(s).expect("q8_0 or q4_k"));
    let name = kind.name();
    let q = Model::load_quantized(dir, kind).unwrap();
    let (lf, lq) = (loss(&f, &prep.test), loss(&q, &prep.test));
    println!(
        "held-out loss over {} examples: f32 {lf:.5}, {name} {lq:.5} ({:+.3}%)",
        prep.test.len(),
        100.0 * (lq / lf - 1.0)
    );
    let mut b = Model::load(dir).unwrap();
    b.set_decode_bf16(true);
    let ps: Vec<Vec<u32>> = prep.test.iter().take(prompts).map(|e| e.input_ids[..e.prompt_len()].to_vec()).collect();
    let (want, got) = (neox::generate::greedy(&b, &ps, new).unwrap(), neox::generate::greedy(&q, &ps, new).unwrap());
    let (mut same, mut total, mut identical) = (0usize, 0usize, 0usize);
    for (w, g) in want.iter().zip(&got) {
        // tokens up to the first difference count as agreeing; after it the answers diverge
        let k = w.iter().zip(g).take_while(|(a, b)| a == b).count();
        same += k;
        total += w.len();
        identical += usize::from(w == g);
    }
    println!(
        "greedy answers, {} prompts x {new} tokens: {name} = bf16 on {same}/{total} tokens ({:.1}%) before the first difference; {identical} answers identical",
        ps.len(),
        100.0 * same as f64 / total as f64
    );
}
