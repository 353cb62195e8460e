//! `rank_r` against float64 sums of its definition, and its batch and thread invariance.

use super::*;

fn rand(rng: &mut common::Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.next_f64() as f32 - 0.5).collect()
}

/// x's element (row, col) through the mask, in float64 (Mask::keeps is the mask's definition).
fn dropped(x: &[f32], ld: usize, mask: Option<&Mask>, p: f64, row: usize, col: usize) -> f64 {
    match mask {
        Some(m) if !m.keeps(row, col) => 0.0,
        Some(_) => x[row * ld + col] as f64 / (1.0 - p),
        None => x[row * ld + col] as f64,
    }
}

fn close(got: &[f32], want: &[f64], depth: usize, what: &str) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = 2e-6 * (1.0 + w.abs()) * (depth as f64).sqrt();
        assert!((g as f64 - w).abs() < tol, "{what} [{i}]: {g} vs {w}");
    }
}

const P: f32 = 0.25;
/// (M, K or W, r): ranks below, at and above one vector and one 64-lane chunk, odd sizes, partial blocks.
const SHAPES: [(usize, usize, usize); 8] =
    [(1, 1, 1), (13, 7, 3), (50, 33, 16), (97, 600, 20), (61, 40, 33), (30, 19, 64), (7, 5, 80), (49, 17, 12)];

/// Each form against its definition summed in float64 (no library), with and without the mask and
/// accumulation. Reference: the formulas in this file's header.
#[test]
fn every_form_matches_the_float64_product() {
    let mut rng = common::Rng::new(5);
    let msk = Mask::new(9, 2, P);
    for (simd, &(m, k, r)) in [false, simd()].into_iter().flat_map(|s| SHAPES.iter().map(move |sh| (s, sh))) {
        for mask in [None, Some(&msk)] {
            let p = P as f64;
            for accumulate in [false, true] {
                let what = format!("simd={simd} m{m} k{k} r{r} mask={} acc={accumulate}", mask.is_some());
                // rank_rows: x (M, K) at stride k + 2, pt (r, K)
                let (ld, x, pt, c0) =
                    (k + 2, rand(&mut rng, m * (k + 2)), rand(&mut rng, r * k), rand(&mut rng, m * r));
                let mut c = c0.clone();
                rank_rows_on(simd, &mut c, accumulate, 0.75, (&x, ld), mask, (m, k), &pt, r);
                let want: Vec<f64> = (0..m * r)
                    .map(|e| {
                        let (i, j) = (e / r, e % r);
                        let s: f64 = (0..k).map(|kk| dropped(&x, ld, mask, p, i, kk) * pt[j * k + kk] as f64).sum();
                        0.75 * s + if accumulate { c0[e] as f64 } else { 0.0 }
                    })
                    .collect();
                close(&c, &want, k, &format!("rows {what}"));
                // rank_cols: x (K, M) at stride m + 3, p (K, r)
                let (ld, x, pm) = (m + 3, rand(&mut rng, k * (m + 3)), rand(&mut rng, k * r));
                let mut c = c0.clone();
                rank_cols_on(simd, &mut c, accumulate, 0.75, (&x, ld), mask, (m, k), &pm, r);
                let want: Vec<f64> = (0..m * r)
                    .map(|e| {
                        let (i, j) = (e / r, e % r);
                        let s: f64 = (0..k).map(|kk| dropped(&x, ld, mask, p, kk, i) * pm[kk * r + j] as f64).sum();
                        0.75 * s + if accumulate { c0[e] as f64 } else { 0.0 }
                    })
                    .collect();
                close(&c, &want, k, &format!("cols {what}"));
            }
            // rank_update: out (M, W = k) at stride k + 1, u (M, r), v (r, W)
            let w = k;
            let (ld, u, v) = (w + 1, rand(&mut rng, m * r), rand(&mut rng, r * w));
            let out0 = rand(&mut rng, m * ld);
            let mut out = out0.clone();
            rank_update_on(simd, (&mut out, ld), 0.5, &u, &v, mask, (m, w), r);
            for i in 0..m {
                for col in 0..ld {
                    let at = i * ld + col;
                    let want = if col < w {
                        let y: f64 = (0..r).map(|j| u[i * r + j] as f64 * v[j * w + col] as f64).sum::<f64>() * 0.5;
                        let y = match mask {
                            Some(mk) if !mk.keeps(i, col) => 0.0,
                            Some(_) => y / (1.0 - p),
                            None => y,
                        };
                        out0[at] as f64 + y
                    } else {
                        out0[at] as f64
                    };
                    close(
                        &out[at..at + 1],
                        &[want],
                        r,
                        &format!("update simd={simd} m{m} w{w} r{r} mask={} [{i},{col}]", mask.is_some()),
                    );
                }
            }
        }
    }
}

/// A row's result has the same bits whether it is computed alone or among others, and with one thread.
#[test]
fn rows_are_independent_of_the_batch() {
    let mut rng = common::Rng::new(8);
    let (m, k, r) = (200, 300, 16);
    let x = rand(&mut rng, m * k);
    let pt = rand(&mut rng, r * k);
    let mut all = vec![0f32; m * r];
    rank_rows(&mut all, false, 1.0, (&x, k), None, (m, k), &pt, r);
    let v = rand(&mut rng, r * k);
    let mut upd = vec![0f32; m * k];
    rank_update((&mut upd, k), 1.0, &all, &v, None, (m, k), r);
    for i in [0, 1, 15, 16, 199] {
        let mut one = vec![0f32; r];
        rank_rows(&mut one, false, 1.0, (&x[i * k..], k), None, (1, k), &pt, r);
        assert_eq!(one, all[i * r..(i + 1) * r], "rows: row {i}");
        let mut one_upd = vec![0f32; k];
        rank_update((&mut one_upd, k), 1.0, &one, &v, None, (1, k), r);
        assert_eq!(one_upd, upd[i * k..(i + 1) * k], "update: row {i}");
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let mut serial = vec![0f32; m * r];
    pool.install(|| rank_rows(&mut serial, false, 1.0, (&x, k), None, (m, k), &pt, r));
    assert_eq!(serial, all);
}
