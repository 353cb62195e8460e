//! Times the matrix products of a decode step at pythia-70m shape, f32 weights (`linear_rows`) and bf16 panels
//! (`linear_panels`): each shape alone with the bytes it streams (weights cycled through 400 MB of copies, so they
//! come from memory; ROWS input rows), then per dtype the whole step's 25 matrices (one copy, as a real step reads
//! them) at 1 and 8 input rows, interleaved. Medians.
//! `ROWS=8 cargo run --release -p neox --example decode_times` (ROWS = input rows of the per-shape part; default 1).

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
    // the whole step, each dtype on its own (a real step touches one weight set): 6 layers and the head, each
    // matrix once, 1 input row and 8 interleaved so the ratio compares the same minutes
    let shapes: Vec<(usize, usize)> = (0..6).flat_map(|_| layer).chain([head]).map(|(_, ic, oc)| (ic, oc)).collect();
    let time = |f: &mut dyn FnMut(usize)| {
        let (mut t1, mut t8) = (vec![], vec![]);
        for _ in 0..41 {
            for (rows, t) in [(1, &mut t1), (8, &mut t8)] {
                let start = Instant::now();
                f(rows);
                t.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        let (a, b) = (median(t1), median(t8));
        format!("1 row {a:.3} ms, 8 rows {b:.3} ms: 8 rows / 1 row {:.2}x time, {:.2}x tokens/s", b / a, 8.0 * a / b)
    };
    let inp = vec![0.5f32; 8 * 2048];
    let mut out = vec![0f32; 8 * 50304];
    let wf: Vec<Vec<f32>> = shapes.iter().map(|&(ic, oc)| weights(ic, oc, 1).0).collect();
    let r = time(&mut |rows| {
        for ((ic, oc), w) in shapes.iter().zip(&wf) {
            linear_rows(&mut out, &inp, w, None, rows, *ic, *oc, false);
        }
    });
    println!("whole step (25 matrices), f32:         {r}");
    drop(wf);
    let wp: Vec<Vec<Line>> = shapes.iter().map(|&(ic, oc)| weights(ic, oc, 1).1).collect();
    let r = time(&mut |rows| {
        for ((ic, oc), w) in shapes.iter().zip(&wp) {
            linear_panels(&mut out, &inp, w, None, rows, *ic, *oc, false);
        }
    });
    println!("whole step (25 matrices), bf16 panels: {r}");
}
