//! Times the engine's pieces at pythia-70m shape (batch 4 x 256) to see where a training step goes.
//! `cargo run --release -p neox --example kernel_times`. Prints medians; no assertions.

use neox::kernels::matmul::{linear_bwd_input, linear_bwd_weight, linear_fwd};
use neox::{Activations, AdamW, AdamWConfig, Model, NeoxConfig, OwnedBatch};
use std::time::Instant;

fn time<F: FnMut()>(name: &str, flops: f64, mut f: F) {
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
        println!("{name:40} {:8.2} ms  {:6.1} GFLOP/s", m * 1e3, flops / m / 1e9);
    } else {
        println!("{name:40} {:8.2} ms", m * 1e3);
    }
}

fn main() {
    let cfg = NeoxConfig::preset("pythia-70m").unwrap();
    let (b, t) = (4, 256);
    let n = b * t;
    let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let x = vec![0.01f32; n * f];
    let w = vec![0.01f32; v * c];
    let mut out = vec![0f32; n * v.max(f)];
    for (name, ic, oc) in [("qkv", c, 3 * c), ("dense", c, c), ("fc", c, f), ("proj", f, c)] {
        let fl = 2.0 * (n * ic * oc) as f64;
        time(&format!("linear_fwd {name}"), fl, || linear_fwd(&mut out, &x, &w, Some(&w[..oc]), n, ic, oc, false));
        time(&format!("linear_bwd_input {name}"), fl, || linear_bwd_input(&mut out, &x, &w, n, ic, oc, false));
        let mut dw = vec![0f32; ic * oc];
        let mut db = vec![0f32; oc];
        time(&format!("linear_bwd_weight {name}"), fl, || linear_bwd_weight(&mut dw, Some(&mut db), &x, &w, n, ic, oc));
    }
    time("logits (N,C)x(C,V)", 2.0 * (n * c * v) as f64, || linear_fwd(&mut out, &x, &w, None, n, c, v, false));
    drop(out);
    let mut model = Model::new_random(cfg.clone(), 0);
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % v as u32).collect();
    let batch = OwnedBatch::dense(b, t, ids.clone(), ids.iter().map(|&x| x as i32).collect());
    let mut acts = Activations::new(&cfg, b, t, false);
    let mut g = vec![0f32; model.num_params()];
    time("forward_loss", 0.0, || {
        model.forward_loss(&batch.view(), &mut acts).unwrap();
    });
    time("forward_backward", 0.0, || {
        model.forward_backward(&batch.view(), &mut acts, &mut g, 1e-3).unwrap();
    });
    time("zero grads", 0.0, || g.iter_mut().for_each(|x| *x = 0.0));
    time("clip", 0.0, || {
        neox::clip_grad_norm(&mut g, 1.0);
    });
    let mut opt = AdamW::new(AdamWConfig::default(), model.num_params());
    let layout = model.layout.clone();
    time("adamw", 0.0, || opt.step(&mut model.params, &g, 1e-5, &layout));
}
