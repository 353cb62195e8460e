//! LayerNorm over the last dimension with affine weight and bias (PyTorch semantics, biased variance, eps inside
//! the square root). Forward saves mean and 1/std per row for the backward. Backward accumulates into the input
//! gradient (residual streams add several branches) and into the parameter gradients in a fixed order.

use super::math;
use rayon::prelude::*;

/// One row's (output, input) and (mean, rstd) slots.
type RowArgs<'a> = ((&'a mut [f32], &'a [f32]), (&'a mut f32, &'a mut f32));

/// A LayerNorm's parameters: weight and bias (C) and the epsilon added to the variance.
#[derive(Clone, Copy)]
pub struct Norm<'a> {
    pub w: &'a [f32],
    pub b: &'a [f32],
    pub eps: f32,
}

/// out (N,C) = (inp - mean) * rstd * w + b; `stats` = (mean, rstd), each (N).
pub fn layernorm_fwd(out: &mut [f32], stats: (&mut [f32], &mut [f32]), inp: &[f32], norm: Norm<'_>, n: usize) {
    let (mean, rstd) = stats;
    let Norm { w, b, eps } = norm;
    let c = w.len();
    assert!(out.len() >= n * c && inp.len() >= n * c && mean.len() >= n && rstd.len() >= n);
    assert!(b.len() == c);
    let row = |((o, x), (m, r)): RowArgs<'_>| {
        pulp::Arch::new().dispatch(|| {
            let mu = math::sum(x) / c as f32;
            for (oi, &xi) in o.iter_mut().zip(x) {
                *oi = xi - mu;
            }
            let var = math::dot(o, o) / c as f32;
            let rs = 1.0 / (var + eps).sqrt();
            for i in 0..c {
                o[i] = o[i] * rs * w[i] + b[i];
            }
            *m = mu;
            *r = rs;
        })
    };
    let (out, inp, mean, rstd) = (&mut out[..n * c], &inp[..n * c], &mut mean[..n], &mut rstd[..n]);
    if n * c <= super::SMALL {
        out.chunks_mut(c).zip(inp.chunks(c)).zip(mean.iter_mut().zip(rstd.iter_mut())).for_each(row);
    } else {
        out.par_chunks_mut(c).zip(inp.par_chunks(c)).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).for_each(row);
    }
}

/// dinp (N,C) += ∂L/∂inp; `dparams` = (dw, db) (C) += parameter gradients. `dout` is ∂L/∂out, `stats` the
/// forward's (mean, rstd), `w` the LayerNorm weight.
pub fn layernorm_bwd(
    dinp: &mut [f32],
    dparams: (&mut [f32], &mut [f32]),
    dout: &[f32],
    inp: &[f32],
    stats: (&[f32], &[f32]),
    w: &[f32],
    n: usize,
) {
    let ((dw, db), (mean, rstd), c) = (dparams, stats, w.len());
    assert!(dinp.len() >= n * c && dout.len() >= n * c && inp.len() >= n * c && mean.len() >= n && rstd.len() >= n);
    assert!(dw.len() == c && db.len() == c);
    const ROWS: usize = 64;
    let chunks = n.div_ceil(ROWS);
    // Per-chunk partial sums of dw and db, reduced in chunk order below (deterministic).
    let mut partial = vec![0f32; chunks * 2 * c];
    partial.par_chunks_mut(2 * c).zip(dinp[..n * c].par_chunks_mut(ROWS * c)).enumerate().for_each(
        |(ci, (part, dinp_rows))| {
            let (pw, pb) = part.split_at_mut(c);
            let r0 = ci * ROWS;
            let rows = dinp_rows.len() / c;
            pulp::Arch::new().dispatch(|| {
                for r in 0..rows {
                    let row = r0 + r;
                    let x = &inp[row * c..(row + 1) * c];
                    let g = &dout[row * c..(row + 1) * c];
                    let (mu, rs) = (mean[row], rstd[row]);
                    // d holds dnorm = g·w for the two row reductions, then the input gradient
                    let d = &mut dinp_rows[r * c..(r + 1) * c];
                    let mut sum_dn_n = [0f32; 16];
                    let mut sum_dn = [0f32; 16];
                    for i in 0..c {
                        let norm = (x[i] - mu) * rs;
                        let dn = g[i] * w[i];
                        sum_dn[i % 16] += dn;
                        sum_dn_n[i % 16] += dn * norm;
                        pw[i] += g[i] * norm;
                        pb[i] += g[i];
                    }
                    let mean_dn = sum_dn.iter().sum::<f32>() / c as f32;
                    let mean_dn_n = sum_dn_n.iter().sum::<f32>() / c as f32;
                    for i in 0..c {
                        let norm = (x[i] - mu) * rs;
                        let dn = g[i] * w[i];
                        d[i] += (dn - mean_dn - norm * mean_dn_n) * rs;
                    }
                }
            })
        },
    );
    for part in partial.chunks(2 * c) {
        let (pw, pb) = part.split_at(c);
        for i in 0..c {
            dw[i] += pw[i];
            db[i] += pb[i];
        }
    }
}
