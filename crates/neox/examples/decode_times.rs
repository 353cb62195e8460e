//! Times batch-1 decode pieces at pythia-70m shape: each `linear_rows` shape (f32 and bf16 weights) with the
//! bytes it streams, against the machine's memory bandwidth. `cargo run --release -p neox --example decode_times`.

use neox::kernels::matmul::{linear_rows, RowWeights};
use std::time::Instant;

fn med<F: FnMut()>(mut f: F) -> f64 {
    f();
    let mut v: Vec<f64> = (0..21)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[10]
}

fn main() {
    let n: usize = std::env::var("ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    println!("{n} input rows (set ROWS=N to change)");
    for (name, ic, oc) in
        [("qkv", 512, 1536), ("dense", 512, 512), ("fc", 512, 2048), ("proj", 2048, 512), ("head", 512, 50304)]
    {
        // 8 copies so small layers do not sit in cache between calls (as in a real decode step)
        let copies = (400 << 20) / (ic * oc * 4) + 1;
        let wf: Vec<f32> = (0..ic * oc * copies).map(|i| (i % 7) as f32 * 0.01).collect();
        let wb: Vec<u16> = wf.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
        let inp = vec![0.5f32; n * ic];
        let mut out = vec![0f32; n * oc];
        let mut k = 0;
        let tf = med(|| {
            k = (k + 1) % copies;
            linear_rows(&mut out, &inp, RowWeights::F32(&wf[k * ic * oc..(k + 1) * ic * oc]), None, n, ic, oc, false)
        });
        let tb = med(|| {
            k = (k + 1) % copies;
            linear_rows(&mut out, &inp, RowWeights::Bf16(&wb[k * ic * oc..(k + 1) * ic * oc]), None, n, ic, oc, false)
        });
        let bytes = (ic * oc) as f64;
        println!(
            "{name:6} {ic:5}x{oc:<6} f32 {:7.1} us {:5.1} GB/s   bf16 {:7.1} us {:5.1} GB/s",
            tf * 1e6,
            bytes * 4.0 / tf / 1e9,
            tb * 1e6,
            bytes * 2.0 / tb / 1e9
        );
    }
}
