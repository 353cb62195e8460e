//! Rotary position embedding on the first `r` dims of each head's q and k (GPT-NeoX `rotate_half` convention:
//! pairs (i, i + r/2)), applied in place inside the fused qkv buffer, whose rows are `(H, 3D)` = per head
//! `[q | k | v]`. Backward applies the transposed (inverse) rotation. cos/sin are computed per row from the
//! row's position, as HF does in float32: `inv_freq[j] = 1 / base^(2j/r)`, angle = pos * inv_freq[j].

use rayon::prelude::*;

/// Fill cos/sin (N, r/2) for the given positions.
pub fn rope_table(cos: &mut [f32], sin: &mut [f32], positions: &[u32], r: usize, base: f64) {
    let half = r / 2;
    assert!(cos.len() >= positions.len() * half && sin.len() >= positions.len() * half);
    if half == 0 {
        return;
    }
    let inv_freq: Vec<f32> = (0..half).map(|j| 1.0 / (base as f32).powf((2 * j) as f32 / r as f32)).collect();
    let row = |((c, s), &p): ((&mut [f32], &mut [f32]), &u32)| {
        for j in 0..half {
            let a = (p as f32 * inv_freq[j]) as f64;
            c[j] = a.cos() as f32;
            s[j] = a.sin() as f32;
        }
    };
    let (cos, sin) = (&mut cos[..positions.len() * half], &mut sin[..positions.len() * half]);
    if positions.len() * half <= super::SMALL / 16 {
        cos.chunks_mut(half).zip(sin.chunks_mut(half)).zip(positions.iter()).for_each(row);
    } else {
        cos.par_chunks_mut(half).zip(sin.par_chunks_mut(half)).zip(positions.par_iter()).for_each(row);
    }
}

/// A filled rotary table: cos and sin (N, r/2) for rotary dims `r`.
#[derive(Clone, Copy)]
pub struct RopeTable<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub r: usize,
}

/// Rotate q and k of every row/head in `qkv` (N, H·3D), H heads of D. `inverse` applies the transpose (backward).
pub fn rope_apply(qkv: &mut [f32], tab: RopeTable<'_>, n: usize, h: usize, d: usize, inverse: bool) {
    let RopeTable { cos, sin, r } = tab;
    let half = r / 2;
    if half == 0 {
        return;
    }
    let row = h * 3 * d;
    assert!(qkv.len() >= n * row && cos.len() >= n * half && sin.len() >= n * half);
    let sgn = if inverse { -1.0f32 } else { 1.0 };
    let rotate = |(i, x): (usize, &mut [f32])| {
        let c = &cos[i * half..(i + 1) * half];
        let s = &sin[i * half..(i + 1) * half];
        for head in 0..h {
            for part in 0..2 {
                let base = head * 3 * d + part * d;
                let (lo, hi) = x[base..base + r].split_at_mut(half);
                for j in 0..half {
                    let (a, b) = (lo[j], hi[j]);
                    let sj = sgn * s[j];
                    lo[j] = a * c[j] - b * sj;
                    hi[j] = b * c[j] + a * sj;
                }
            }
        }
    };
    if n * row <= super::SMALL {
        qkv[..n * row].chunks_mut(row).enumerate().for_each(rotate);
    } else {
        qkv[..n * row].par_chunks_mut(row).enumerate().for_each(rotate);
    }
}
