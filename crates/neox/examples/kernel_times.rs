//! Times the engine's pieces at pythia-70m shape (batch 4 x 256) to see where a training step goes.
//! `cargo run --release -p neox --example kernel_times` (`ONLY=adamw` times only the pieces whose name holds
//! that text). Prints medians; no assertions.

use neox::kernels::matmul::{linear_bwd_input, linear_bwd_weight, linear_fwd};
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
    {
        let wt = vec![0.01f32; c * v];
        let mut o = vec![0f32; n * v];
        time("logits with pre-transposed W (C,V)", 2.0 * (n * c * v) as f64, || {
            linear_bwd_input(&mut o, &x, &wt, n, v, c, false)
        });
        let mut o2 = vec![0f32; n * 3 * c];
        let wt2 = vec![0.01f32; c * 3 * c];
        time("qkv with pre-transposed W", 2.0 * (n * c * 3 * c) as f64, || {
            linear_bwd_input(&mut o2, &x, &wt2, n, 3 * c, c, false)
        });
        let mut big = vec![0f32; v * c];
        time("transpose W_out (V,C)->(C,V)", 0.0, || neox::kernels::transpose::transpose(&mut big, &wt, c, v));
    }
    time("logits (N,C)x(C,V)", 2.0 * (n * c * v) as f64, || linear_fwd(&mut out, &x, &w, None, n, c, v, false));
    {
        let big = vec![0.01f32; n * v];
        let mut dx = vec![0f32; n * c];
        let mut dw = vec![0f32; v * c];
        time("head dX = dlogits (N,V) x W (V,C)", 2.0 * (n * c * v) as f64, || {
            linear_bwd_input(&mut dx, &big, &w, n, c, v, false)
        });
        time("head dW += dlogits^T x X", 2.0 * (n * c * v) as f64, || {
            linear_bwd_weight(&mut dw, None, &big, &x, n, c, v)
        });
    }
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
    let c = cfg.hidden_size;
    let xs = vec![0.01f32; n * c];
    let targets: Vec<(u32, u32)> = (0..n as u32).map(|i| (i, (i * 31) % v as u32)).collect();
    let mut scratch = neox::kernels::xent::XentScratch::default();
    let mut dx = vec![0f32; n * c];
    let mut dw = vec![0f32; v * c];
    let w_out = model.params()[model.layout.embed_out..model.layout.embed_out + v * c].to_vec();
    let mut w_out_t = vec![0f32; v * c];
    neox::kernels::transpose::transpose(&mut w_out_t, &w_out, v, c);
    time("lm_head_xent fwd+bwd (1024 targets)", 6.0 * (n * c * v) as f64, || {
        let grad = neox::kernels::xent::XentGrad { dx: &mut dx, dw: &mut dw, scale: 1e-3 };
        neox::kernels::xent::lm_head_xent(&xs, &w_out, &w_out_t, &targets, Some(grad), &mut scratch, c, v, false);
    });
    let mut row = vec![0.5f32; v];
    time("exp_shift_sum over V x 1024 rows (1 thread)", 0.0, || {
        for _ in 0..1024 {
            pulp::Arch::new().dispatch(|| neox::kernels::math::exp_shift_sum(&mut row, 0.1));
        }
    });
    time("max over V x 1024 rows (1 thread)", 0.0, || {
        for _ in 0..1024 {
            std::hint::black_box(pulp::Arch::new().dispatch(|| neox::kernels::math::max(&row)));
        }
    });
    time("zero grads", 0.0, || g.iter_mut().for_each(|x| *x = 0.0));
    time("clip", 0.0, || {
        neox::clip_grad_norm(&mut g, 1.0);
    });
    let mut opt = AdamW::new(AdamWConfig::default(), model.num_params());
    let layout = model.layout.clone();
    time("adamw", 0.0, || opt.step(model.params_mut(), &g, 1e-5, &layout));
    time("adamw + zero grads", 0.0, || opt.step_scaled_and_zero(model.params_mut(), &mut g, 1e-5, &layout, 1.0));
    time("adamw + zero grads + transposed cache (Model::adamw_step)", 0.0, || {
        model.adamw_step(&mut opt, &mut g, 1e-5, 1.0)
    });
}
