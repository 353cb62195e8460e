//! Shared helpers for the engine's integration tests: tiny configs, perturbed random models, batches.
#![allow(dead_code)]

use common::Rng;
use neox::{BatchInput, Model, NeoxConfig, OwnedBatch};
use safetensors::{Dtype, SafeTensors};

pub fn tiny_config(parallel: bool, vocab: usize) -> NeoxConfig {
    let mut c = NeoxConfig::new_pythia(vocab, 16, 2, 2, 64);
    c.intermediate_size = 24;
    c.rotary_pct = 0.5; // D = 8 -> 4 rotary dims
    c.use_parallel_residual = parallel;
    c
}

/// Random model where every parameter matters (LayerNorm and biases perturbed), like the golden script does.
pub fn perturbed_model(cfg: NeoxConfig, seed: u64) -> Model {
    let mut m = Model::new_random(cfg, seed);
    let mut r = Rng::new(seed ^ 0xabc);
    for info in m.layout.params.clone() {
        let is_ln_w = info.name.ends_with("layernorm.weight") || info.name.ends_with("layer_norm.weight");
        for x in &mut m.params_mut()[info.range()] {
            *x = if is_ln_w {
                1.0 + 0.1 * r.normal() as f32
            } else if info.name.ends_with(".bias") {
                0.1 * r.normal() as f32
            } else {
                0.3 * r.normal() as f32
            };
        }
    }
    m
}

/// A (B,T) batch: random ids in [2, vocab), row 1 right-padded by 3 with id 0, labels -100 on the first 3
/// positions of each row and on padding.
pub fn padded_batch(b: usize, t: usize, vocab: usize, seed: u64) -> OwnedBatch {
    let mut r = Rng::new(seed);
    let ids: Vec<u32> = (0..b * t).map(|_| 2 + r.below(vocab as u64 - 2) as u32).collect();
    let mut batch = OwnedBatch::dense(b, t, ids.clone(), ids.iter().map(|&x| x as i32).collect());
    for row in 0..b {
        for i in 0..t {
            let n = row * t + i;
            let pad = row == 1 && i >= t - 3;
            if pad {
                batch.input_ids[n] = 0;
                batch.attention_mask[n] = 0;
            }
            if pad || i < 3 {
                batch.labels[n] = -100;
            }
        }
    }
    batch
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= atol + rtol * b.abs(), "{what}[{i}]: got {a}, want {b} (atol {atol}, rtol {rtol})");
    }
}

/// A golden file written by a tools/ script (safetensors of f32 and i64 tensors).
pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    pub fn read(path: &std::path::Path) -> Golden {
        Golden { bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    pub fn f32(&self, name: &str) -> Vec<f32> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
    pub fn i64(&self, name: &str) -> (Vec<i64>, Vec<usize>) {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        let v = t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        (v, t.shape().to_vec())
    }
}

/// A golden's batch: `input_ids`, `labels`, `attention_mask` (B,T), positions 0..T-1 as a plain HF forward uses
/// them whatever the mask.
pub struct Inputs {
    pub b: usize,
    pub t: usize,
    pub ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub mask: Vec<u8>,
    pub pos: Vec<u32>,
}

impl Inputs {
    pub fn from(g: &Golden) -> Self {
        let (ids, shape) = g.i64("input_ids");
        let (labels, _) = g.i64("labels");
        let (mask, _) = g.i64("attention_mask");
        let (b, t) = (shape[0], shape[1]);
        Inputs {
            b,
            t,
            ids: ids.iter().map(|&x| x as u32).collect(),
            labels: labels.iter().map(|&x| x as i32).collect(),
            mask: mask.iter().map(|&x| x as u8).collect(),
            pos: (0..b * t).map(|i| (i % t) as u32).collect(),
        }
    }
    pub fn view(&self) -> BatchInput<'_> {
        BatchInput {
            batch_size: self.b,
            seq_len: self.t,
            input_ids: &self.ids,
            labels: Some(&self.labels),
            attention_mask: &self.mask,
            position_ids: &self.pos,
            doc_ids: None,
        }
    }
}
