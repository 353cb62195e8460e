//! Times the matrix products of a decode step at pythia-70m shape through the backend's decode path (f32 rows,
//! and bf16 panels with `set_decode_bf16`): each Linear shape over the 6 layers' matrices (ROWS input rows), then
//! per dtype the whole step's 25 matrices at 1 and 8 input rows, interleaved. Medians.
//! `ROWS=8 cargo run --release -p neox --example decode_times` (ROWS = input rows of the per-shape part; default 1).

use neox::backend::{Backend, Linear, Pass};
use neox::{Model, NeoxConfig};
use std::time::Instant;

/// A layer's Linear: name, where its weight is, input and output sizes.
type Shape = (&'static str, fn(&neox::layout::LayerOffsets) -> usize, usize, usize);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn med<F: FnMut()>(mut f: F) -> f64 {
    f();
    median(
        (0..21)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let n: usize = std::env::var("ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    println!("{n} input rows (set ROWS=N to change)");
    let cfg = NeoxConfig::preset("pythia-70m").unwrap();
    let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let mut model = Model::new_random(cfg, 0);
    let lay = model.layout.clone();
    let shapes: [Shape; 4] = [
        ("qkv", |o| o.qkv_w, c, 3 * c),
        ("dense", |o| o.dense_w, c, c),
        ("fc", |o| o.fc_w, c, f),
        ("proj", |o| o.proj_w, f, c),
    ];
    let inp = vec![0.5f32; 8 * f];
    let mut out = vec![0f32; 8 * v];
    for bf16 in [false, true] {
        model.set_decode_bf16(bf16);
        model.prepare_decode();
        let be = model.backend();
        let dtype = if bf16 { "bf16 panels" } else { "f32" };
        for &(name, w, ic, oc) in &shapes {
            let t = med(|| {
                for o in &lay.layers {
                    be.linear(&mut out, &inp, Linear { w: w(o), b: None, ic, oc }, n, false, Pass::Decode);
                }
            }) / lay.layers.len() as f64;
            let bytes = (ic * oc * if bf16 { 2 } else { 4 }) as f64;
            println!("{dtype:11} {name:6} {ic:5}x{oc:<6} {:7.1} us {:5.1} GB/s", t * 1e6, bytes / t / 1e9);
        }
        let head = Linear { w: lay.embed_out, b: None, ic: c, oc: v };
        let t = med(|| be.linear(&mut out, &inp, head, n, false, Pass::Decode));
        let bytes = (c * v * if bf16 { 2 } else { 4 }) as f64;
        println!("{dtype:11} head   {c:5}x{v:<6} {:7.1} us {:5.1} GB/s", t * 1e6, bytes / t / 1e9);
        // the whole step: 6 layers and the head, each matrix once, 1 input row and 8 interleaved
        let (mut t1, mut t8) = (vec![], vec![]);
        for _ in 0..41 {
            for (rows, t) in [(1, &mut t1), (8, &mut t8)] {
                let start = Instant::now();
                for o in &lay.layers {
                    for &(_, w, ic, oc) in &shapes {
                        be.linear(&mut out, &inp, Linear { w: w(o), b: None, ic, oc }, rows, false, Pass::Decode);
                    }
                }
                be.linear(&mut out, &inp, head, rows, false, Pass::Decode);
                t.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        let (a, b) = (median(t1), median(t8));
        println!(
            "{dtype:11} whole step (25 matrices): 1 row {a:.3} ms, 8 rows {b:.3} ms: {:.2}x time, {:.2}x tokens/s",
            b / a,
            8.0 * a / b
        );
    }
}
