//! Gradient checks that need no reference implementation: central finite differences of the loss against the
//! explicit backward, gradient checkpointing giving bit-identical gradients, and packed rows (per-document
//! masks, restarted positions) giving the same loss as the documents run separately.

mod common;
use common::*;
use neox::{Activations, BatchInput, Model};

fn mean_loss(m: &Model, b: &BatchInput<'_>) -> f64 {
    let mut acts = Activations::new(&m.config, b.batch_size, b.seq_len, false);
    let (s, n) = m.forward_loss(b, &mut acts).unwrap();
    s / n as f64
}

fn grads(m: &Model, b: &BatchInput<'_>, recompute: bool) -> (f64, Vec<f32>) {
    let mut acts = Activations::new(&m.config, b.batch_size, b.seq_len, recompute);
    let mut g = vec![0f32; m.num_params()];
    let count = b.target_count();
    let (s, n) = m.forward_backward(b, &mut acts, &mut g, 1.0 / count as f32).unwrap();
    assert_eq!(n, count);
    (s / n as f64, g)
}

/// Central finite difference of the mean loss at parameter `i` vs the backward's `g`; tolerance: f32 forward
/// (loss resolution ~1e-6 over 2e-2) plus O(eps^2) curvature.
fn check_fd(m: &mut Model, b: &BatchInput<'_>, i: usize, g: f32, what: &str) {
    let eps = 1e-2f32;
    let orig = m.params()[i];
    m.params_mut()[i] = orig + eps;
    let up = mean_loss(m, b);
    m.params_mut()[i] = orig - eps;
    let down = mean_loss(m, b);
    m.params_mut()[i] = orig;
    let fd = ((up - down) / (2.0 * eps as f64)) as f32;
    assert!((fd - g).abs() <= 2e-4 + 2e-2 * g.abs(), "{what}: finite difference {fd} vs backward {g}");
}

#[test]
fn finite_differences_match_backward() {
    for parallel in [true, false] {
        let mut m = perturbed_model(tiny_config(parallel, 48), 5);
        let batch = padded_batch(2, 9, 48, 11);
        let (loss, g) = grads(&m, &batch.view(), false);
        assert!((loss - mean_loss(&m, &batch.view())).abs() < 1e-6);
        let mut rng = ::common::Rng::new(99);
        let infos = m.layout.params.clone();
        let mut checked = 0;
        for info in &infos {
            for _ in 0..3 {
                let i = info.offset + rng.below(info.numel() as u64) as usize;
                let what = format!("parallel={parallel} {}[{}]", info.name, i - info.offset);
                check_fd(&mut m, &batch.view(), i, g[i], &what);
                checked += 1;
            }
        }
        assert_eq!(checked, 3 * infos.len());
    }
}

#[test]
fn checkpointing_gives_identical_gradients() {
    for parallel in [true, false] {
        let m = perturbed_model(tiny_config(parallel, 48), 6);
        let batch = padded_batch(2, 12, 48, 12);
        let (l1, g1) = grads(&m, &batch.view(), false);
        let (l2, g2) = grads(&m, &batch.view(), true);
        assert_eq!(l1.to_bits(), l2.to_bits());
        assert!(g1.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits()), "gradients differ with recompute");
        assert!(g1.iter().any(|&x| x != 0.0));
    }
}

#[test]
fn packed_rows_equal_separate_documents() {
    let m = perturbed_model(tiny_config(true, 48), 7);
    let mut r = ::common::Rng::new(3);
    let doc = |len: usize, r: &mut ::common::Rng| -> Vec<u32> { (0..len).map(|_| 2 + r.below(46) as u32).collect() };
    let (a, b) = (doc(5, &mut r), doc(6, &mut r));
    let labels = |ids: &[u32]| -> Vec<i32> {
        ids.iter().enumerate().map(|(i, &x)| if i < 2 { -100 } else { x as i32 }).collect()
    };
    // Packed: [a | b] in one row of 11 with positions restarting and doc ids 0/1.
    let ids: Vec<u32> = a.iter().chain(&b).copied().collect();
    let lab: Vec<i32> = labels(&a).into_iter().chain(labels(&b)).collect();
    let pos: Vec<u32> = (0..5).chain(0..6).collect();
    let docs: Vec<u32> = [0; 5].into_iter().chain([1; 6]).collect();
    let mask = vec![1u8; 11];
    let packed = BatchInput {
        batch_size: 1,
        seq_len: 11,
        input_ids: &ids,
        labels: Some(&lab),
        attention_mask: &mask,
        position_ids: &pos,
        doc_ids: Some(&docs),
    };
    let mut acts = Activations::new(&m.config, 1, 11, false);
    let (packed_sum, packed_n) = m.forward_loss(&packed, &mut acts).unwrap();
    let mut sep_sum = 0.0;
    let mut sep_n = 0;
    for d in [&a, &b] {
        let ob = neox::OwnedBatch::dense(1, d.len(), d.clone(), labels(d));
        let (s, n) = m.forward_loss(&ob.view(), &mut acts).unwrap();
        sep_sum += s;
        sep_n += n;
    }
    assert_eq!(packed_n, sep_n);
    assert!((packed_sum - sep_sum).abs() < 1e-4, "packed {packed_sum} vs separate {sep_sum}");
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let m = perturbed_model(tiny_config(true, 48), 8);
    let mut acts = Activations::new(&m.config, 2, 8, false);
    let mut b = padded_batch(2, 8, 48, 1);
    b.input_ids[3] = 48;
    let e = m.forward_loss(&b.view(), &mut acts).unwrap_err().to_string();
    assert!(e.contains("token id 48 at index 3"), "{e}");
    let mut b = padded_batch(2, 8, 48, 1);
    b.labels[4] = 1000;
    let e = m.forward_loss(&b.view(), &mut acts).unwrap_err().to_string();
    assert!(e.contains("label 1000"), "{e}");
    let b = padded_batch(3, 8, 48, 1);
    let e = m.forward_loss(&b.view(), &mut acts).unwrap_err().to_string();
    assert!(e.contains("exceeds the activation buffers"), "{e}");
    let mut b = padded_batch(2, 8, 48, 1);
    b.position_ids[0] = 64;
    let e = m.forward_loss(&b.view(), &mut acts).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
}

/// Sequences longer than the attention kernel's causal block (64 queries): forward equals the KV-cache decode
/// (an independent attention implementation) at every position, and gradients pass finite differences.
#[test]
fn long_sequences_span_several_attention_blocks() {
    let mut cfg = tiny_config(true, 48);
    cfg.max_position_embeddings = 256;
    let mut m = perturbed_model(cfg, 9);
    let t = 150;
    let batch = padded_batch(2, t, 48, 21);
    let mut acts = Activations::new(&m.config, 1, t, false);
    let row0 = neox::OwnedBatch::dense(1, t, batch.input_ids[..t].to_vec(), batch.labels[..t].to_vec());
    let logits = m.forward_logits(&row0.view(), &mut acts).unwrap();
    let v = 48;
    let mut cache = m.new_kv_cache(1, t);
    let mut out = vec![0f32; v];
    for i in 0..t {
        m.forward_cached(&batch.input_ids[i..i + 1], &[1], &mut cache, &mut out).unwrap();
        assert_close(&format!("position {i}"), &out, &logits[i * v..(i + 1) * v], 1e-4, 1e-3);
    }
    let (_, g) = grads(&m, &batch.view(), false);
    let (_, g2) = grads(&m, &batch.view(), true);
    assert!(g.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits()));
    let mut rng = ::common::Rng::new(5);
    for info in m.layout.params.clone().iter().filter(|p| p.name.contains("attention")) {
        for _ in 0..3 {
            let i = info.offset + rng.below(info.numel() as u64) as usize;
            check_fd(&mut m, &batch.view(), i, g[i], &info.name);
        }
    }
}

/// `Model::adamw_step` (AdamW that writes the transposed-weight cache in the same pass) leaves the parameters,
/// moments and zeroed gradients bitwise equal to the plain `step_scaled_and_zero`, and the next forward (which
/// uses the cache it wrote) equals a forward on a model whose cache is rebuilt from the parameters.
#[test]
fn fused_optimizer_step_keeps_the_transposed_cache_exact() {
    use neox::{AdamW, AdamWConfig};
    // vocab 3000 x hidden 16: the head is updated in several row blocks (2048 rows per block at 16 columns)
    let cfg = tiny_config(true, 3000);
    let batch = padded_batch(2, 9, 3000, 5);
    let b = batch.view();
    let mut fused = perturbed_model(cfg.clone(), 3);
    let mut plain = perturbed_model(cfg, 3);
    let ac = AdamWConfig { weight_decay: 0.1, ..Default::default() };
    let (mut of, mut op) = (AdamW::new(ac, fused.num_params()), AdamW::new(ac, plain.num_params()));
    let layout = plain.layout.clone();
    for step in 0..3 {
        let (_, mut gf) = grads(&fused, &b, false);
        let (_, mut gp) = grads(&plain, &b, false);
        assert_eq!(gf, gp, "step {step}: gradients");
        fused.adamw_step(&mut of, &mut gf, 1e-2, 0.7);
        op.step_scaled_and_zero(plain.params_mut(), &mut gp, 1e-2, &layout, 0.7);
        assert_eq!(fused.params(), plain.params(), "step {step}: parameters");
        assert_eq!((&of.m, &of.v), (&op.m, &op.v), "step {step}: moments");
        assert!(gf.iter().all(|&x| x == 0.0), "step {step}: gradients zeroed");
        assert_eq!(mean_loss(&fused, &b).to_bits(), mean_loss(&plain, &b).to_bits(), "step {step}: next loss");
    }
}
