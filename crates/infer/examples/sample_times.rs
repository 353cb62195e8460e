//! Time of one `sample` call over a 50k vocabulary with Dolly's defaults (top_p 0.92) and greedy, for a peaked
//! distribution (ten leading tokens, like a trained model's) and a flat one (random logits: the nucleus is most
//! of the vocabulary, the worst case). `cargo run --release -p infer --example sample_times`.

use infer::sampling::Scratch;
use infer::{sample, SamplingParams};
use std::time::Instant;

fn main() {
    let mut rng = common::Rng::new(1);
    let mut peaked: Vec<f32> = (0..50304).map(|_| rng.normal() as f32 * 3.0).collect();
    for i in 0..10 {
        peaked[i * 997] += 18.0 - i as f32;
    }
    let flat: Vec<f32> = (0..50304).map(|_| (rng.next_f64() as f32 - 0.5) * 8.0).collect();
    let mut scratch = Scratch::default();
    let mut r = common::Rng::new(2);
    for (name, logits) in [("peaked", &peaked), ("flat", &flat)] {
        for params in [SamplingParams::default(), SamplingParams::greedy()] {
            let mut times: Vec<f64> = (0..101)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(sample(logits, 50277, &params, &mut r, &mut scratch));
                    t.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            times.sort_by(|a, b| a.total_cmp(b));
            let what = if params.do_sample { "top_p 0.92" } else { "greedy" };
            println!("{name:6} {what:10}: median {:7.1} us per row", times[50]);
        }
    }
}
