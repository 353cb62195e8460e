//! Times the matrix products of a decode step at pythia-70m shape, f32 weights (`linear_rows`) against bf16
//! panels (`linear_panels`): each shape alone with the bytes it streams (weights cycled through 400 MB of copies,
//! so they come from memory), then the whole step's 25 matrices (one copy, as a real step reads them), the two
//! dtypes interleaved in one loop so both see the same machine state. Medians.
//! `ROWS=8 cargo run --release -p neox --example decode_times` (ROWS = input rows, the batch; default 1).

use neox::kernels::matmul::linear_rows;
use neox::kernels::panels::{linear_panels, pack_bf16, packed_lines, Line};
use std::time::Instant;

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

fn weights(ic: usize, oc: usize, copies: usize) -> (Vec<f32>, Vec<Line>) {
    let wf: Vec<f32> = (0..ic * oc * copies).map(|i| (i % 7) as f32 * 0.01).collect();
    let pl = packed_lines(oc, ic);
    let mut wp = vec![Line::default(); pl * copies];
    for c in 0..copies {
        pack_bf16(&mut wp[c * pl..(c + 1) * pl], &wf[c * ic * oc..(c + 1) * ic * oc], oc, ic);
    }
    (wf, wp)
}

fn main() {
    let n: usize = std::env::var("ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    println!("{n} input rows (set ROWS=N to change)");
    let layer = [("qkv", 512, 1536), ("dense", 512, 512), ("fc", 512, 2048), ("proj", 2048, 512)];
    let head = ("head", 512, 50304);
    let inp = vec![0.5f32; n * 2048];
    let mut out = vec![0f32; n * 50304];
    for (name, ic, oc) in layer.into_iter().chain([head]) {
        let copies = (400 << 20) / (ic * oc * 4) + 1;
        let (wf, wp) = weights(ic, oc, copies);
        let pl = packed_lines(oc, ic);
        let mut k = 0;
        let tf = med(|| {
            k = (k + 1) % copies;
            linear_rows(&mut out, &inp, &wf[k * ic * oc..(k + 1) * ic * oc], None, n, ic, oc, false)
        });
        let tb = med(|| {
            k = (k + 1) % copies;
            linear_panels(&mut out, &inp, &wp[k * pl..(k + 1) * pl], None, n, ic, oc, false)
        });
        let bytes = (ic * oc) as f64;
        println!(
            "{name:6} {ic:5}x{oc:<6} f32 {:7.1} us {:5.1} GB/s   bf16 panels {:7.1} us {:5.1} GB/s",
            tf * 1e6,
            bytes * 4.0 / tf / 1e9,
            tb * 1e6,
            bytes * 2.0 / tb / 1e9
        );
    }
    // the whole step: 6 layers and the head, each matrix once
    let mats: Vec<(usize, usize, Vec<f32>, Vec<Line>)> = (0..6)
        .flat_map(|_| layer)
        .chain([head])
        .map(|(_, ic, oc)| {
            let (wf, wp) = weights(ic, oc, 1);
            (ic, oc, wf, wp)
        })
        .collect();
    let (mut tf, mut tb) = (vec![], vec![]);
    for _ in 0..41 {
        let t = Instant::now();
        for (ic, oc, wf, _) in &mats {
            linear_rows(&mut out, &inp, wf, None, n, *ic, *oc, false);
        }
        tf.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for (ic, oc, _, wp) in &mats {
            linear_panels(&mut out, &inp, wp, None, n, *ic, *oc, false);
        }
        tb.push(t.elapsed().as_secs_f64());
    }
    println!("whole step (25 matrices): f32 {:.3} ms, bf16 panels {:.3} ms", median(tf) * 1e3, median(tb) * 1e3);
}
