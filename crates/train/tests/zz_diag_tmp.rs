// TEMPORARY diagnostic, not committed.
#[path = "trajectory.rs"]
#[allow(dead_code)]
mod traj;
use std::io::Write;

#[test]
#[ignore]
fn diag() {
    let mut model = traj::formula_model_pub();
    let tok = data::DollyTokenizer::from_file(std::path::Path::new("/work/shared/data/20B_tokenizer.json")).unwrap();
    let all = std::fs::read_to_string("/work/shared/data/databricks-dolly-15k.jsonl").unwrap();
    let all: Vec<&str> = all.lines().collect();
    let mut exs = Vec::new();
    for l in [1usize, 2, 3, 4, 7, 10, 11, 15] {
        let v: serde_json::Value = serde_json::from_str(all[l - 1]).unwrap();
        let (ids, labels) = data::build_example(
            &tok,
            v["instruction"].as_str().unwrap(),
            v["context"].as_str().unwrap(),
            v["response"].as_str().unwrap(),
        )
        .unwrap();
        exs.push(data::Example { input_ids: ids, labels, record: 0 });
    }
    let refs: Vec<&data::Example> = exs.iter().collect();
    let b = data::pad_batch(&refs, 8, 0).unwrap();
    let view = neox::BatchInput {
        batch_size: b.batch_size,
        seq_len: b.seq_len,
        input_ids: &b.input_ids,
        labels: Some(&b.labels),
        attention_mask: &b.attention_mask,
        position_ids: &b.position_ids,
        doc_ids: None,
    };
    let mut acts = neox::Activations::new(&model.config, 8, b.seq_len, false);
    let mut opt = neox::AdamW::new(Default::default(), model.num_params());
    let layout = model.layout.clone();
    let targets = view.target_count();
    for step in 0..5u64 {
        let mut grads = vec![0f32; model.num_params()];
        let (s, _) = model.forward_backward(&view, &mut acts, &mut grads, 1.0 / targets as f32).unwrap();
        let mut f = std::fs::File::create(format!("/tmp/diag/rust_g{step}.bin")).unwrap();
        f.write_all(bytemuck_cast(&grads)).unwrap();
        let norm = neox::clip_grad_norm(&mut grads, 1.0);
        eprintln!("step {} loss {} norm {}", step + 1, s / targets as f64, norm);
        let lr = 1e-3 * (5 - step) as f64 / 5.0;
        opt.step(&mut model.params, &grads, lr as f32, &layout);
        let mut f = std::fs::File::create(format!("/tmp/diag/rust_p{step}.bin")).unwrap();
        f.write_all(bytemuck_cast(&model.params)).unwrap();
    }
}
fn bytemuck_cast(x: &[f32]) -> &[u8] {
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, x.len() * 4) }
}
