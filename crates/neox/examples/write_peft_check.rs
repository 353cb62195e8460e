//! The dolly side of `tools/check_adapter_peft.py`: trains a LoRA adapter (r 4, all-linear, Dolly's token rows,
//! rsLoRA off) for 3 AdamW steps on the `lora-tiny` fixture's bf16 base and writes, under DIR, what the PEFT check
//! reads: `base/` (the fixture base), `adapter/` (our adapter files), `batch.safetensors` (input_ids,
//! attention_mask) and `logits.safetensors` (our logits of that batch with the adapter).
//!
//!     cargo run --release -p neox --example write_peft_check -- /tmp/peft-check
//!     ../venv/bin/python tools/check_adapter_peft.py /tmp/peft-check --merged

use neox::lora::{LoraConfig, Target};
use neox::{clip_coef, Activations, AdamW, AdamWConfig, BatchInput, LoraInit, Model};
use safetensors::tensor::{Dtype, TensorView};
use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or("usage: write_peft_check DIR")?);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora-tiny");
    std::fs::create_dir_all(dir.join("base"))?;
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), dir.join("base").join(f))?;
    }
    let mut m = Model::load_bf16(&dir.join("base"))?;
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        rslora: false,
        token_rows: vec![50277, 50278, 50279],
    };
    m.attach_lora(lora, LoraInit::Seed(7))?;
    // a batch of 2 x 10 with the special ids and right padding on row 1
    let (b, t) = (2usize, 10usize);
    let mut ids: Vec<u32> = (0..b * t).map(|i| (i as u32 * 7919 + 13) % 50277).collect();
    ids[3] = 50278;
    ids[6] = 50279;
    ids[14] = 50277;
    let mut mask = vec![1u8; b * t];
    mask[b * t - 2..].fill(0);
    let labels: Vec<i32> = ids.iter().zip(&mask).map(|(&x, &k)| if k == 1 { x as i32 } else { -100 }).collect();
    let pos: Vec<u32> = (0..b * t).map(|i| (i % t) as u32).collect();
    let batch = BatchInput {
        batch_size: b,
        seq_len: t,
        input_ids: &ids,
        labels: Some(&labels),
        attention_mask: &mask,
        position_ids: &pos,
        doc_ids: None,
    };
    let mut acts = Activations::new(&m.config, b, t, false);
    let mut grads = m.new_grads();
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.1, ..Default::default() }, m.grad_len());
    for _ in 0..3 {
        let n = batch.target_count();
        m.forward_backward(&batch, &mut acts, &mut grads, 1.0 / n as f32)?;
        let coef = clip_coef(m.grad_norm(&grads), 1.0);
        m.adamw_step(&mut opt, &mut grads, 1e-2, coef);
    }
    m.save_adapter(&dir.join("adapter"), "base")?;
    let logits = m.forward_logits(&batch, &mut acts)?;
    let v = m.config.vocab_size;
    let i64s = |x: &[u32]| x.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect::<Vec<u8>>();
    let (id_bytes, mask_bytes) = (i64s(&ids), i64s(&mask.iter().map(|&k| k as u32).collect::<Vec<_>>()));
    let batch_t = [
        ("input_ids", TensorView::new(Dtype::I64, vec![b, t], &id_bytes)?),
        ("attention_mask", TensorView::new(Dtype::I64, vec![b, t], &mask_bytes)?),
    ];
    safetensors::serialize_to_file(batch_t, None, &dir.join("batch.safetensors"))?;
    let lb: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    let logits_t = [("logits", TensorView::new(Dtype::F32, vec![b, t, v], &lb)?)];
    safetensors::serialize_to_file(logits_t, None, &dir.join("logits.safetensors"))?;
    println!("wrote {}", dir.display());
    Ok(())
}
