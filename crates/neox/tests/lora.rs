//! LoRA checks that need no reference implementation: the explicit backward of every adapter tensor (A, B,
//! trained token rows) against central finite differences, with and without dropout, on an f32 base and a
//! bf16-held base; dA exactly zero while B is zero (PEFT's init); a fresh adapter leaves the logits bitwise
//! unchanged; gradient checkpointing (which recomputes the dropout masks) gives bit-identical gradients; a
//! merged tensor set gives the unmerged logits. PEFT parity itself is `lora_parity.rs`.

mod common;
use common::*;
use neox::lora::{LoraConfig, Target};
use neox::{Activations, AdamW, AdamWConfig, BatchInput, LoraInit, Model, SaveDtype};

const VOCAB: usize = 48;

fn lora_cfg(dropout: f32, rslora: bool) -> LoraConfig {
    LoraConfig { r: 3, alpha: 6.0, dropout, targets: Target::ALL.to_vec(), rslora, token_rows: vec![5, 7, 40] }
}

/// The perturbed model with its parameters rounded to bf16 values, as an f32 model and as a bf16-held base.
fn models(parallel: bool, seed: u64) -> (Model, Model, tempfile::TempDir) {
    let m = perturbed_model(tiny_config(parallel, VOCAB), seed);
    let dir = tempfile::tempdir().unwrap();
    m.save(dir.path(), SaveDtype::Bf16).unwrap();
    let f32_base = Model::load(dir.path()).unwrap();
    let bf16_base = Model::load_bf16(dir.path()).unwrap();
    assert!(bf16_base.base_bf16() && !f32_base.base_bf16());
    (f32_base, bf16_base, dir)
}

/// Random adapter values (B non-zero, token rows away from the base rows) for `cfg` on `m`.
fn random_adapter(m: &mut Model, cfg: &LoraConfig, seed: u64) {
    m.attach_lora(cfg.clone(), LoraInit::Seed(seed)).unwrap();
    let mut r = ::common::Rng::new(seed ^ 77);
    for x in m.trainable_mut() {
        *x += 0.2 * r.normal() as f32;
    }
}

fn mean_loss(m: &Model, b: &BatchInput<'_>) -> f64 {
    let mut acts = Activations::new(&m.config, b.batch_size, b.seq_len, false);
    let (s, n) = m.forward_loss(b, &mut acts).unwrap();
    s / n as f64
}

/// Mean-loss gradient of the trainable tensors, with the dropout mask of `seed`.
fn grads(m: &mut Model, b: &BatchInput<'_>, recompute: bool, seed: Option<u64>) -> (f64, Vec<f32>) {
    m.set_dropout_seed(seed);
    let mut acts = Activations::new(&m.config, b.batch_size, b.seq_len, recompute);
    let mut g = m.new_grads();
    assert_eq!(g.len(), m.trainable().len());
    let count = b.target_count();
    let (s, n) = m.forward_backward(b, &mut acts, &mut g, 1.0 / count as f32).unwrap();
    (s / n as f64, g)
}

/// The mean training loss with the dropout mask of `seed` (no gradient: `forward_backward` into scratch).
fn train_loss(m: &mut Model, b: &BatchInput<'_>, seed: Option<u64>) -> f64 {
    grads(m, b, false, seed).0
}

#[test]
fn adapter_gradients_match_finite_differences() {
    for (parallel, dropout, rslora) in [(true, 0.0, false), (false, 0.0, true), (true, 0.3, false)] {
        let (f32_base, bf16_base, _dir) = models(parallel, 21);
        for (which, mut m) in [("f32 base", f32_base), ("bf16 base", bf16_base)] {
            let cfg = lora_cfg(dropout, rslora);
            random_adapter(&mut m, &cfg, 4);
            let batch = padded_batch(2, 9, VOCAB, 13);
            // the batch uses every trained token row as input and as target
            let mut batch = batch;
            batch.input_ids[1] = 5;
            batch.input_ids[4] = 40;
            batch.labels[5] = 7;
            batch.labels[6] = 40;
            let seed = (dropout > 0.0).then_some(99);
            let (_, g) = grads(&mut m, &batch.view(), false, seed);
            let infos = m.trainable_tensors().to_vec();
            let mut r = ::common::Rng::new(5);
            for info in &infos {
                for _ in 0..3 {
                    let i = info.offset + r.below(info.numel() as u64) as usize;
                    let eps = 1e-3f32;
                    let orig = m.trainable()[i];
                    m.trainable_mut()[i] = orig + eps;
                    let up = train_loss(&mut m, &batch.view(), seed);
                    m.trainable_mut()[i] = orig - eps;
                    let down = train_loss(&mut m, &batch.view(), seed);
                    m.trainable_mut()[i] = orig;
                    let fd = ((up - down) / (2.0 * eps as f64)) as f32;
                    let what = format!("{which} parallel={parallel} p={dropout} {}[{}]", info.name, i - info.offset);
                    assert!((fd - g[i]).abs() <= 2e-4 + 2e-2 * g[i].abs(), "{what}: fd {fd} vs backward {}", g[i]);
                }
            }
            assert!(g.iter().all(|x| x.is_finite()) && g.iter().filter(|&&x| x != 0.0).count() > g.len() / 2);
        }
    }
}

#[test]
fn fresh_adapter_changes_nothing_and_has_zero_da() {
    let (mut m, _, _dir) = models(true, 22);
    let batch = padded_batch(2, 9, VOCAB, 14);
    let mut acts = Activations::new(&m.config, 2, 9, false);
    let before = m.forward_logits(&batch.view(), &mut acts).unwrap();
    m.attach_lora(lora_cfg(0.0, false), LoraInit::Seed(1)).unwrap();
    let after = m.forward_logits(&batch.view(), &mut acts).unwrap();
    // B = 0 adds exactly nothing; the trained token rows equal the base rows, their logits are summed in
    // another order (f32 rounding)
    let trained = [5usize, 7, 40];
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if trained.contains(&(i % VOCAB)) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "logit {i}: {a} vs {b}");
        } else {
            assert_eq!(a.to_bits(), b.to_bits(), "logit {i}: B = 0 must not change it");
        }
    }
    let (_, g) = grads(&mut m, &batch.view(), false, None);
    let layout = m.adapter_layout().unwrap().clone();
    for info in &layout.params {
        let gi = &g[info.range()];
        if info.name.contains("lora_A") {
            assert!(gi.iter().all(|&x| x == 0.0), "{}: dA must be exactly 0 while B = 0", info.name);
        } else {
            assert!(gi.iter().any(|&x| x != 0.0), "{}: gradient is all zero", info.name);
        }
    }
    // A is U(±1/√IC) as PEFT's kaiming_uniform_(a=√5) draws it; B is zero
    for s in &layout.slots {
        let a = &m.trainable()[s.a..s.a + 3 * s.ic];
        let bound = 1.0 / (s.ic as f32).sqrt();
        assert!(a.iter().all(|x| x.abs() <= bound) && a.iter().any(|x| x.abs() > 0.5 * bound));
        assert!(m.trainable()[s.b..s.b + s.oc * 3].iter().all(|&x| x == 0.0));
    }
}

#[test]
fn checkpointing_recomputes_the_same_masks() {
    let (_, mut m, _dir) = models(false, 23);
    random_adapter(&mut m, &lora_cfg(0.25, false), 6);
    let batch = padded_batch(2, 12, VOCAB, 15);
    let (l1, g1) = grads(&mut m, &batch.view(), false, Some(3));
    let (l2, g2) = grads(&mut m, &batch.view(), true, Some(3));
    assert_eq!(l1.to_bits(), l2.to_bits());
    assert!(g1.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits()));
    let (l3, _) = grads(&mut m, &batch.view(), false, Some(4));
    assert_ne!(l1, l3, "another seed drops other inputs");
    let (l4, _) = grads(&mut m, &batch.view(), false, None);
    assert!((mean_loss(&m, &batch.view()) - l4).abs() < 1e-9, "no seed: no dropout, as in evaluation");
}

#[test]
fn merged_tensors_give_the_unmerged_logits() {
    let (f32_base, bf16_base, _dir) = models(true, 24);
    for mut m in [f32_base, bf16_base] {
        random_adapter(&mut m, &lora_cfg(0.0, false), 8);
        let batch = padded_batch(2, 9, VOCAB, 16);
        let mut acts = Activations::new(&m.config, 2, 9, false);
        let want = m.forward_logits(&batch.view(), &mut acts).unwrap();
        let merged: Vec<f32> = m.layout.params.iter().flat_map(|p| m.merged_tensor(p)).collect();
        let plain = Model::from_parts(m.config.clone(), merged).unwrap();
        let got = plain.forward_logits(&batch.view(), &mut acts).unwrap();
        assert_close("merged logits", &got, &want, 1e-4, 1e-4);
    }
}

#[test]
fn adamw_steps_only_the_adapter() {
    let (mut m, _, _dir) = models(true, 25);
    let base = m.params().to_vec();
    random_adapter(&mut m, &lora_cfg(0.0, false), 9);
    let before = m.trainable().to_vec();
    let batch = padded_batch(2, 9, VOCAB, 17);
    let (_, mut g) = grads(&mut m, &batch.view(), false, None);
    let mut opt = AdamW::new(AdamWConfig::default(), m.trainable().len());
    m.adamw_step(&mut opt, &mut g, 1e-2, 1.0);
    assert!(g.iter().all(|&x| x == 0.0), "gradients zeroed");
    assert_eq!(m.params(), &base[..], "the base is frozen");
    let moved = m.trainable().iter().zip(&before).filter(|(a, b)| a != b).count();
    assert!(moved > before.len() / 2, "only {moved} of {} adapter values moved", before.len());
}
