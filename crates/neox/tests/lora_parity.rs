//! LoRA parity with PEFT + transformers. Expected numbers come from `tools/make_lora_goldens.py` (peft 0.21.2,
//! transformers 5.24.0, torch 2.15.0, float32 on the bf16-valued base; see tests/fixtures/README.md, section
//! `lora-tiny`): the adapters PEFT wrote (`adapter/`, `adapter-rslora/`) loaded by us, logits, loss, the
//! gradient of every adapter tensor (LoRA A and B, trained token rows) for a batch with padding and -100 labels,
//! the merged model's logits, and a 5-step AdamW trajectory with clipping and weight decay. The base is loaded
//! both as f32 and held in bf16 (the same values). Tolerance `|a-b| <= 1e-4 + 1e-4|b|` as in `hf_parity.rs`.

mod common;
use common::assert_close;
use neox::{clip_coef, Activations, AdamW, AdamWConfig, BatchInput, Model};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

const ATOL: f32 = 1e-4;
const RTOL: f32 = 1e-4;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora-tiny")
}

struct Golden(Vec<u8>);

impl Golden {
    fn load() -> Golden {
        Golden(std::fs::read(fixture().join("golden.safetensors")).unwrap())
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
    fn i64(&self, name: &str) -> (Vec<i64>, Vec<usize>) {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        (t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(), t.shape().to_vec())
    }
}

struct Inputs {
    b: usize,
    t: usize,
    ids: Vec<u32>,
    labels: Vec<i32>,
    mask: Vec<u8>,
    pos: Vec<u32>,
}

impl Inputs {
    fn from(g: &Golden) -> Self {
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
            // a plain HF forward uses positions 0..T-1 whatever the mask
            pos: (0..b * t).map(|i| (i % t) as u32).collect(),
        }
    }
    fn view(&self) -> BatchInput<'_> {
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

/// The fixture's base, as f32 and held in bf16.
fn bases() -> [(&'static str, Model); 2] {
    [("f32 base", Model::load(&fixture()).unwrap()), ("bf16 base", Model::load_bf16(&fixture()).unwrap())]
}

/// Our logits at the golden's stored columns (rows with attention only) and each row's log-sum-exp, against
/// `<prefix>logits` / `<prefix>logits_lse`.
fn check_logits(what: &str, m: &Model, g: &Golden, prefix: &str) {
    let inp = Inputs::from(g);
    let mut acts = Activations::new(&m.config, inp.b, inp.t, false);
    let logits = m.forward_logits(&inp.view(), &mut acts).unwrap();
    let (cols, _) = g.i64("logits_cols");
    let (want, want_lse) = (g.f32(&format!("{prefix}logits")), g.f32(&format!("{prefix}logits_lse")));
    let v = m.config.vocab_size;
    for n in (0..inp.b * inp.t).filter(|&n| inp.mask[n] == 1) {
        let row = &logits[n * v..(n + 1) * v];
        let got: Vec<f32> = cols.iter().map(|&c| row[c as usize]).collect();
        assert_close(&format!("{what} logits row {n}"), &got, &want[n * cols.len()..(n + 1) * cols.len()], ATOL, RTOL);
        let mx = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        assert_close(&format!("{what} logsumexp row {n}"), &[lse as f32], &[want_lse[n]], ATOL, RTOL);
    }
}

#[test]
fn peft_adapters_give_peft_logits_loss_and_gradients() {
    let g = Golden::load();
    let inp = Inputs::from(&g);
    for (adapter, prefix) in [("adapter", ""), ("adapter-rslora", "rslora.")] {
        for (base, mut m) in bases() {
            let what = format!("{adapter} on the {base}");
            let meta = m.load_adapter(&fixture().join(adapter)).unwrap();
            assert_eq!(meta.lora.token_rows, vec![50277, 50278, 50279]);
            check_logits(&what, &m, &g, prefix);
            let mut acts = Activations::new(&m.config, inp.b, inp.t, false);
            let (sum, count) = m.forward_loss(&inp.view(), &mut acts).unwrap();
            assert_eq!(count, 13, "the fixture README says 13 targets");
            assert_close(&format!("{what} loss_sum"), &[sum as f32], &g.f32(&format!("{prefix}loss_sum")), ATOL, RTOL);
            assert_close(&format!("{what} loss"), &[(sum / 13.0) as f32], &g.f32(&format!("{prefix}loss")), ATOL, RTOL);
            for recompute in [false, true] {
                let mut acts = Activations::new(&m.config, inp.b, inp.t, recompute);
                let mut grads = m.new_grads();
                m.forward_backward(&inp.view(), &mut acts, &mut grads, 1.0).unwrap();
                for p in m.trainable_tensors() {
                    let want = g.f32(&format!("{prefix}grad.{}", p.name));
                    assert_close(
                        &format!("{what} grad {} (recompute {recompute})", p.name),
                        &grads[p.range()],
                        &want,
                        ATOL,
                        RTOL,
                    );
                }
            }
        }
    }
}

#[test]
fn the_base_alone_gives_the_base_logits() {
    let g = Golden::load();
    for (base, m) in bases() {
        check_logits(base, &m, &g, "base_");
    }
}

#[test]
fn merged_tensors_give_peft_merged_logits() {
    let g = Golden::load();
    for (base, mut m) in bases() {
        m.load_adapter(&fixture().join("adapter")).unwrap();
        let merged: Vec<f32> = m.layout.params.iter().flat_map(|p| m.merged_tensor(p)).collect();
        let plain = Model::from_parts(m.config.clone(), merged).unwrap();
        check_logits(&format!("merged on the {base}"), &plain, &g, "merged.");
    }
}

#[test]
fn five_adamw_steps_follow_the_torch_trajectory() {
    let g = Golden::load();
    let inp = Inputs::from(&g);
    let (want_loss, want_norm) = (g.f32("traj.loss"), g.f32("traj.grad_norm"));
    for (base, mut m) in bases() {
        m.load_adapter(&fixture().join("adapter")).unwrap();
        let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.1, ..Default::default() }, m.trainable().len());
        let mut acts = Activations::new(&m.config, inp.b, inp.t, false);
        let mut grads = m.new_grads();
        let count = inp.view().target_count();
        for step in 0..5 {
            let (sum, n) = m.forward_backward(&inp.view(), &mut acts, &mut grads, 1.0 / count as f32).unwrap();
            assert_close(
                &format!("{base} step {step} loss"),
                &[(sum / n as f64) as f32],
                &[want_loss[step]],
                ATOL,
                RTOL,
            );
            let norm = m.grad_norm(&grads);
            assert_close(&format!("{base} step {step} grad norm"), &[norm as f32], &[want_norm[step]], ATOL, RTOL);
            m.adamw_step(&mut opt, &mut grads, 1e-3, clip_coef(norm, 1.0));
        }
        for p in m.trainable_tensors() {
            let want = g.f32(&format!("traj.final.{}", p.name));
            assert_close(&format!("{base} after 5 steps {}", p.name), &m.trainable()[p.range()], &want, ATOL, RTOL);
        }
    }
}

#[test]
fn our_adapter_files_round_trip_bitwise() {
    let (_, mut m) = bases().into_iter().nth(1).unwrap();
    m.load_adapter(&fixture().join("adapter")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save_adapter(dir.path(), "lora-tiny").unwrap();
    let mut again = Model::load_bf16(&fixture()).unwrap();
    let meta = again.load_adapter(dir.path()).unwrap();
    assert_eq!(meta.base_model.as_deref(), Some("lora-tiny"));
    assert_eq!(Some(&meta.lora), m.lora());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(again.trainable()), bits(m.trainable()));
    // and the keys are exactly PEFT's
    let ours = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let peft = std::fs::read(fixture().join("adapter/adapter_model.safetensors")).unwrap();
    let names = |b: &[u8]| {
        let mut n: Vec<String> = SafeTensors::deserialize(b).unwrap().names().into_iter().map(String::from).collect();
        n.sort();
        n
    };
    assert_eq!(names(&ours), names(&peft));
}
