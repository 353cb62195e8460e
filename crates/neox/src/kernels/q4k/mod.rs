//! q4_K, ggml's 4-bit "k-quant": super-blocks of 256 weights in 144 bytes (4.5 bits a weight) — `d` and `dmin`
//! (f16), twelve bytes packing eight 6-bit sub-block scales and eight 6-bit sub-block mins, then 128 bytes of
//! 4-bit quants; weight = d * scale_j * q - dmin * min_j for sub-block j of 32. The quantizer is ggml's reference
//! (`quantize_row_q4_K_ref`, what `llama-quantize` runs without an importance matrix) statement for statement,
//! with its float operations in the same order, so its blocks are bit-identical to ggml's built without fused
//! multiply-add (`tools/make_q4k_fixtures.py`). `matrix` holds q4_K weights for the decode kernels (`x86`).

mod matrix;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use matrix::{linear_q4k, Q4KMatrix};

use half::f16;

/// Weights per super-block.
pub const QK_K: usize = 256;
/// Bytes per super-block: d, dmin (f16 each), 12 bytes of scales and mins, 128 bytes of quants.
pub const BLOCK_BYTES: usize = 4 + 12 + QK_K / 2;

/// ggml's `nearest_int`: round half to even through the float adder (valid for |x| <= 4194303).
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `make_qkx2_quants(32, 15, x, weights, L, &min, Laux, -1, 0.1, 20, false)`: the scale and min of one
/// sub-block of 32 by a weighted least-squares search over 21 candidate scales; returns (scale, -min).
fn make_qkx2_quants(x: &[f32], weights: &[f32; 32], l: &mut [u8], laux: &mut [u8; 32]) -> (f32, f32) {
    const NMAX: i32 = 15;
    const RMIN: f32 = -1.0;
    const RDELTA: f32 = 0.1;
    const NSTEP: i32 = 20;
    let n = 32;
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let mut iscale = NMAX as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    for is in 0..=NSTEP {
        iscale = (RMIN + RDELTA * is as f32 + NMAX as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
            laux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Sub-block `j`'s 6-bit scale and min from the 12 packed bytes (ggml's `get_scale_min_k4`).
pub fn scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The 12 bytes that hold eight 6-bit scales and eight 6-bit mins (the inverse of `scale_min`: all 96 bits
/// are used, so unpacking and packing again gives a file's bytes back).
pub fn pack_scale_min(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut sm = [0u8; 12];
    for j in 0..8 {
        let (ls, lm) = (sc[j] & 63, m[j] & 63);
        if j < 4 {
            sm[j] |= ls;
            sm[j + 4] |= lm;
        } else {
            sm[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sm[j - 4] |= (ls >> 4) << 6;
            sm[j] |= (lm >> 4) << 6;
        }
    }
    sm
}

/// Append the q4_K super-blocks of `x` (a multiple of 256 values, finite) to `out`.
pub fn quantize_q4_k(x: &[f32], out: &mut Vec<u8>) {
    assert!(x.len().is_multiple_of(QK_K), "q4_K: {} values are not whole super-blocks of {QK_K}", x.len());
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    for x in x.chunks_exact(QK_K) {
        let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
        let (mut max_scale, mut max_min) = (0f32, 0f32);
        for j in 0..8 {
            let xs = &x[32 * j..32 * (j + 1)];
            let mut sum_x2 = 0f32;
            for &v in xs {
                sum_x2 += v * v;
            }
            let av_x = (sum_x2 / 32.0).sqrt();
            for (w, &v) in weights.iter_mut().zip(xs) {
                *w = av_x + v.abs();
            }
            (scales[j], mins[j]) = make_qkx2_quants(xs, &weights, &mut l[32 * j..32 * (j + 1)], &mut laux);
            if scales[j] > max_scale {
                max_scale = scales[j];
            }
            if mins[j] > max_min {
                max_min = mins[j];
            }
        }
        let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
        for j in 0..8 {
            // (C stores the int in a uint8_t first, then takes the minimum)
            ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
            lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
        }
        let sm = pack_scale_min(&ls, &lm);
        let d = f16::from_f32(max_scale / 63.0);
        let dmin = f16::from_f32(max_min / 63.0);
        for j in 0..8 {
            let (sc, m) = scale_min(j, &sm);
            let dj = d.to_f32() * sc as f32;
            if dj == 0.0 {
                continue;
            }
            let dm = dmin.to_f32() * m as f32;
            for ii in 0..32 {
                l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, 15) as u8;
            }
        }
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&dmin.to_le_bytes());
        out.extend_from_slice(&sm);
        for j in (0..QK_K).step_by(64) {
            out.extend((0..32).map(|i| l[j + i] | (l[j + i + 32] << 4)));
        }
    }
}

/// Values of whole q4_K super-blocks (`blocks.len()` = `out.len() / 256 * 144`), as ggml's
/// `dequantize_row_q4_K`: d * scale * q - dmin * min.
pub fn dequantize_q4_k(blocks: &[u8], out: &mut [f32]) {
    assert_eq!(blocks.len() * QK_K, out.len() * BLOCK_BYTES, "q4_K: blocks and values disagree");
    for (b, y) in blocks.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        let min = f16::from_le_bytes([b[2], b[3]]).to_f32();
        let (sm, qs) = (&b[4..16], &b[16..]);
        for (k, (y, q)) in y.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
            let (sc1, m1) = scale_min(2 * k, sm);
            let (sc2, m2) = scale_min(2 * k + 1, sm);
            let (d1, m1, d2, m2) = (d * sc1 as f32, min * m1 as f32, d * sc2 as f32, min * m2 as f32);
            for l in 0..32 {
                y[l] = d1 * (q[l] & 0xF) as f32 - m1;
                y[32 + l] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}
