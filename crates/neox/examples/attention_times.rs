//! Times the backend's training attention, forward + backward, at pythia-70m's head shape (H = 8, D = 64), for
//! B x T = 4 x 256 and 8 x 2048 dense causal, and 8 x 2048 packed with ~250-token documents, with the memory it
//! keeps for the backward. (The materialising version it replaced is timed by the previous commit's binary:
//! `dolly bench train --batch-size 8 --seq-len 2048 [--doc-len 250]`, see docs/benchmarks.md.)
//! `cargo run --release -p neox --example attention_times`. One warm-up and one timed run each; no assertions.

use common::Rng;
use neox::backend::{AttnShape, Backend, Visibility};
use neox::{Cpu, Layout, NeoxConfig};
use std::time::Instant;

/// Seconds of one call after a warm-up (first-touch page faults stay out of the timing).
fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn main() {
    let (h, d) = (8, 64);
    let be = Cpu::new(Vec::new(), &Layout::new(&NeoxConfig::preset("pythia-70m").unwrap()));
    let mut r = Rng::new(1);
    for (name, b, t, packed) in
        [("4 x 256", 4, 256, false), ("8 x 2048", 8, 2048, false), ("8 x 2048 packed", 8, 2048, true)]
    {
        let (n, c) = (b * t, h * d);
        let qkv: Vec<f32> = (0..n * 3 * c).map(|_| (r.next_f64() * 2.0 - 1.0) as f32).collect();
        let dout: Vec<f32> = (0..n * c).map(|_| (r.next_f64() * 2.0 - 1.0) as f32).collect();
        let mask = vec![1u8; n];
        // documents of 200..300 tokens, restarting in every row
        let docs: Vec<u32> = (0..b)
            .flat_map(|_| {
                let mut row = Vec::with_capacity(t);
                while row.len() < t {
                    let (id, len) = (row.last().map_or(0, |&x: &u32| x + 1), 200 + r.below(101) as usize);
                    row.extend(std::iter::repeat_n(id, len.min(t - row.len())));
                }
                row
            })
            .collect();
        let vis = Visibility { attention_mask: &mask, doc_ids: packed.then_some(&docs[..]) };
        let (mut out, mut dqkv) = (vec![0f32; n * c], vec![0f32; n * 3 * c]);
        let s = AttnShape { b, t, h, d };
        let mut saved = vec![0f32; be.attention_saved_len(s)];
        let new = time(|| {
            be.attention(&mut out, &mut saved, &qkv, vis, s);
            be.attention_bwd(&mut dqkv, &dout, (&out, &saved), &qkv, vis, s);
        });
        println!(
            "{name:16} {:8.1} ms {:8.0} tok/s, keeps {:.1} MiB for the backward",
            new * 1e3,
            n as f64 / new,
            saved.len() as f64 * 4.0 / (1 << 20) as f64
        );
    }
}
