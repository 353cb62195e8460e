//! Where decode time goes: times one batched decode step (`forward_cached`, one token per row) for batch sizes
//! 1..8 on a random pythia-70m-shaped model, and the output-head matmul alone (`linear_fwd`, the engine's gemm
//! path) for m = 1..8 rows. Developer tool for sizing engine work; prints one line per measurement.
//!
//!     cargo run --release -p infer --example decode_profile [-- PRESET]

use neox::kernels::matmul::linear_fwd;
use neox::{Model, NeoxConfig};
use std::time::Instant;

fn main() {
    let preset = std::env::args().nth(1).unwrap_or_else(|| "pythia-70m".into());
    let Some(cfg) = NeoxConfig::preset(&preset) else {
        eprintln!("unknown preset {preset}");
        std::process::exit(2);
    };
    let model = Model::new_random(cfg, 0);
    let (c, v) = (model.config.hidden_size, model.config.vocab_size);
    let steps = 20;
    for b in [1usize, 2, 4, 8] {
        let mut cache = model.new_kv_cache(b, 64 + steps + 1);
        let mut logits = vec![0f32; b * v];
        let ids: Vec<u32> = (0..b * 64).map(|i| (i * 7919 % 50000) as u32).collect();
        model.forward_cached(&ids, &vec![1u8; b * 64], &mut cache, &mut logits).expect("prompt");
        let one = vec![1u8; b];
        let tok: Vec<u32> = (0..b as u32).collect();
        let t0 = Instant::now();
        for _ in 0..steps {
            model.forward_cached(&tok, &one, &mut cache, &mut logits).expect("step");
        }
        let dt = t0.elapsed().as_secs_f64() / steps as f64;
        println!("decode step  b={b}: {:7.2} ms  ({:6.1} tokens/s aggregate)", dt * 1e3, b as f64 / dt);
    }
    let w: Vec<f32> = (0..v * c).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
    for m in [1usize, 2, 4, 8] {
        let x = vec![0.01f32; m * c];
        let mut out = vec![0f32; m * v];
        linear_fwd(&mut out, &x, &w, None, m, c, v, false);
        let t0 = Instant::now();
        for _ in 0..steps {
            linear_fwd(&mut out, &x, &w, None, m, c, v, false);
        }
        let dt = t0.elapsed().as_secs_f64() / steps as f64;
        println!(
            "output head  m={m}: {:7.2} ms  ({c}x{v} weights, {:.1} GB/s of weight reads)",
            dt * 1e3,
            (v * c * 4) as f64 / dt / 1e9
        );
    }
}
