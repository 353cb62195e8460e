//! Times the CPU backend's ops at pythia-70m shape (batch 4 x 256) to see where a training step goes: each op
//! through the `Backend` interface, as the model calls it. `cargo run --release -p neox --example kernel_times`
//! (`ONLY=adamw` times only the pieces whose name holds that text). Prints medians of 5; no assertions.

use neox::backend::{AttnShape, Backend, LayerNorm, Linear, Pass, Visibility};
use neox::{Activations, AdamW, AdamWConfig, Model, NeoxConfig, OwnedBatch};
use std::time::Instant;

fn time<F: FnMut()>(name: &str, flops: f64, mut f: F) {
    if std::env::var("ONLY").is_ok_and(|only| !name.contains(&only)) {
        return;
    }
    f();
    let mut v: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v[2];
    if flops > 0.0 {
        println!("{name:44} {:8.2} ms  {:6.1} GFLOP/s", m * 1e3, flops / m / 1e9);
    } else {
        println!("{name:44} {:8.2} ms", m * 1e3);
    }
}

fn main() {
    let cfg = NeoxConfig::preset("pythia-70m").unwrap();
    let (b, t) = (4, 256);
    let n = b * t;
    let (c, f, v, h) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_attention_heads);
    let mut model = Model::new_random(cfg.clone(), 0);
    let o = model.layout.layers[0];
    let be = model.backend();
    let x = vec![0.01f32; n * f];
    let mut out = vec![0f32; n * f.max(3 * c)];
    let mut grads = vec![0f32; model.num_params()];
    for (name, w, bias, ic, oc) in [
        ("query_key_value", o.qkv_w, o.qkv_b, c, 3 * c),
        ("dense", o.dense_w, o.dense_b, c, c),
        ("dense_h_to_4h", o.fc_w, o.fc_b, c, f),
        ("dense_4h_to_h", o.proj_w, o.proj_b, f, c),
    ] {
        let lin = Linear { w, b: Some(bias), ic, oc };
        let fl = 2.0 * (n * ic * oc) as f64;
        time(&format!("linear {name}"), fl, || be.linear(&mut out, &x, lin, n, false, Pass::Train));
        let dout = vec![0.01f32; n * oc];
        let mut dinp = vec![0f32; n * ic];
        time(&format!("linear_bwd {name}"), 2.0 * fl, || be.linear_bwd(&mut dinp, &mut grads, &dout, &x, lin, n));
    }
    let ln = LayerNorm { w: o.ln1_w, b: o.ln1_b, c, eps: 1e-5 };
    let xs = vec![0.3f32; n * c];
    let mut stats = vec![0f32; 2 * n];
    time("layernorm", 0.0, || be.layernorm(&mut out, &mut stats, &xs, ln, n));
    let mut dx = vec![0f32; n * c];
    time("layernorm_bwd", 0.0, || be.layernorm_bwd(&mut dx, &mut grads, &xs, (&xs, &stats), ln, n));
    let shape = AttnShape { b, t, h, d: c / h };
    let mask = vec![1u8; n];
    let vis = Visibility { attention_mask: &mask, doc_ids: None };
    let qkv: Vec<f32> = (0..n * 3 * c).map(|i| ((i * 7) % 13) as f32 * 0.01).collect();
    let mut saved = vec![0f32; be.attention_saved_len(shape)];
    let mut y = vec![0f32; n * c];
    time("attention", 0.0, || be.attention(&mut y, &mut saved, &qkv, vis, shape));
    let mut dqkv = vec![0f32; n * 3 * c];
    time("attention_bwd", 0.0, || be.attention_bwd(&mut dqkv, &xs, (&y, &saved), &qkv, vis, shape));
    let pre = vec![0.2f32; n * f];
    let mut act = vec![0f32; n * f];
    time("gelu", 0.0, || be.gelu(&mut act, &pre, n, f));
    time("gelu_bwd", 0.0, || be.gelu_bwd(&mut act, &pre, n * f));
    let head = Linear { w: model.layout.embed_out, b: None, ic: c, oc: v };
    let targets: Vec<(u32, u32)> = (0..n as u32).map(|i| (i, (i * 31) % v as u32)).collect();
    let mut scratch = Default::default();
    time("lm_head_loss fwd+bwd (1024 targets)", 6.0 * (n * c * v) as f64, || {
        let grad = neox::backend::HeadGrad { dx: &mut dx, grads: &mut grads, scale: 1e-3 };
        be.lm_head_loss(&xs, head, &targets, Some(grad), &mut scratch);
    });
    time("grad norm", 0.0, || {
        std::hint::black_box(be.norm(&grads));
    });
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % v as u32).collect();
    let batch = OwnedBatch::dense(b, t, ids.clone(), ids.iter().map(|&x| x as i32).collect());
    let mut acts = Activations::new(&cfg, b, t, false);
    time("forward_loss", 0.0, || {
        model.forward_loss(&batch.view(), &mut acts).unwrap();
    });
    time("forward_backward", 0.0, || {
        model.forward_backward(&batch.view(), &mut acts, &mut grads, 1e-3).unwrap();
    });
    let mut opt = AdamW::new(AdamWConfig::default(), model.num_params());
    let layout = model.layout.clone();
    time("adamw (plain)", 0.0, || opt.step(model.params_mut(), &grads, 1e-5, &layout));
    time("adamw + zero grads + transposed cache (adamw_step)", 0.0, || {
        model.adamw_step(&mut opt, &mut grads, 1e-5, 1.0)
    });
}
