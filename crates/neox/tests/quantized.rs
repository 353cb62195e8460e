//! A quantized model (q8_0; q4_K, whose rows of 256 are its layers' widths here) against the f32 model with the
//! same (dequantized) weights: the only difference left is the int8 rounding of the activations inside each
//! product, so logits agree to a small relative error (the bounds are about 3x the largest difference measured on
//! these shapes: q8_0 2026-12-03, q4_K 2026-12-04). Plus: loading an HF directory quantized gives the bits of
//! quantizing in memory, a row decodes the same alone or batched, training is refused, and shapes q8_0 cannot
//! hold are refused by tensor name.

use neox::{Activations, Model, NeoxConfig, OwnedBatch, QuantType};

fn config(hidden: usize) -> NeoxConfig {
    let mut c = NeoxConfig::new_pythia(160, hidden, 2, 4, 64);
    c.intermediate_size = 4 * hidden;
    c
}

fn logits(m: &Model, ids: &[u32]) -> Vec<f32> {
    let b = OwnedBatch::dense(1, ids.len(), ids.to_vec(), vec![-100; ids.len()]);
    let mut acts = Activations::new(&m.config, 1, ids.len(), false);
    m.forward_logits(&b.view(), &mut acts).unwrap()
}

fn ids(n: usize, seed: u64) -> Vec<u32> {
    let mut r = common::Rng::new(seed);
    (0..n).map(|_| r.below(160) as u32).collect()
}

/// The types with the hidden size each is tested at (q4_K needs rows of 256 for its layers' matrices) and the
/// bound on the largest logit difference, relative to the largest logit.
const KINDS: [(QuantType, usize, f32); 2] = [(QuantType::Q8_0, 64, 0.03), (QuantType::Q4K, 256, 0.05)];

#[test]
fn quantized_logits_follow_the_dequantized_f32_model() {
    for (kind, hidden, bound) in KINDS {
        let q = Model::new_random(config(hidden), 3).into_quantized(kind).unwrap();
        assert_eq!(q.quantized(), Some(kind));
        let f = Model::from_parts(q.config.clone(), q.dequantized_params()).unwrap();
        let x = ids(20, 1);
        let (a, b) = (logits(&q, &x), logits(&f, &x));
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        eprintln!("{}: largest difference {worst} against logits up to {scale}", kind.name());
        assert!(worst <= bound * scale, "{}: largest difference {worst} against logits up to {scale}", kind.name());
        // and they are not the same computation (the activations really are quantized)
        assert!(worst > 0.0);
    }
}

#[test]
fn loading_quantized_gives_the_bits_of_quantizing_in_memory() {
    for (kind, hidden, _) in KINDS {
        let m = Model::new_random(config(hidden), 5);
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path(), neox::SaveDtype::F32).unwrap();
        let a = Model::load_quantized(dir.path(), kind).unwrap();
        let b = m.into_quantized(kind).unwrap();
        let x = ids(9, 2);
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert_eq!(bits(logits(&a, &x)), bits(logits(&b, &x)), "{}", kind.name());
        assert_eq!(a.dequantized_params(), b.dequantized_params(), "{}", kind.name());
    }
}

#[test]
fn a_row_decodes_the_same_alone_or_in_a_batch() {
    for (kind, hidden, _) in KINDS {
        let q = Model::new_random(config(hidden), 8).into_quantized(kind).unwrap();
        let prompts = vec![ids(5, 10), ids(9, 11), ids(3, 12)];
        let all = neox::generate::greedy(&q, &prompts, 12).unwrap();
        for (p, want) in prompts.iter().zip(&all) {
            assert_eq!(&neox::generate::greedy(&q, std::slice::from_ref(p), 12).unwrap()[0], want, "{}", kind.name());
        }
    }
}

/// q4_K keeps the embedding and head in q8_0, and any matrix whose rows are not whole super-blocks: at hidden 64
/// only dense_4h_to_h (rows of 256) is q4_K, and the model still answers as its dequantized weights do.
#[test]
fn q4_k_keeps_what_it_cannot_hold_in_q8_0() {
    let m = Model::new_random(config(64), 6);
    let q8 = Model::new_random(config(64), 6).into_quantized(QuantType::Q8_0).unwrap();
    let q4 = m.into_quantized(QuantType::Q4K).unwrap();
    assert_eq!(q4.quantized(), Some(QuantType::Q4K));
    let (p4, p8) = (q4.dequantized_params(), q8.dequantized_params());
    for p in &q4.layout.params {
        let same = p4[p.range()] == p8[p.range()];
        assert_eq!(same, !p.name.contains("dense_4h_to_h.weight"), "{}", p.name);
    }
}

#[test]
fn a_quantized_model_is_not_trained() {
    let q = Model::new_random(config(64), 4).into_quantized(QuantType::Q8_0).unwrap();
    let x = ids(6, 3);
    let b = OwnedBatch::dense(1, 6, x.clone(), x.iter().map(|&v| v as i32).collect());
    let mut acts = Activations::new(&q.config, 1, 6, false);
    let mut g = vec![0f32; q.grad_len()];
    let err = q.forward_backward(&b.view(), &mut acts, &mut g, 1.0).unwrap_err().to_string();
    assert!(err.contains("quantized"), "{err}");
}

#[test]
fn shapes_q8_0_cannot_hold_are_refused_by_name() {
    let err = Model::new_random(config(48), 1).into_quantized(QuantType::Q8_0).err().unwrap().to_string();
    assert!(err.contains("gpt_neox.embed_in.weight") && err.contains("blocks of 32"), "{err}");
    let mut m = Model::new_random(config(64), 1);
    m.params_mut()[100] = f32::NAN;
    let err = m.into_quantized(QuantType::Q8_0).err().unwrap().to_string();
    assert!(err.contains("gpt_neox.embed_in.weight") && err.contains("not finite"), "{err}");
}
