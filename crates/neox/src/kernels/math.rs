//! Scalar math written to auto-vectorise (no table lookups, no branches): `exp`, `erf`, exact-erf GELU forward
//! and backward over slices (GELU also as explicit AVX-512, the same formulas). Accuracy: exp ~1-2 ulp; erf absolute error < 1.2e-7 (Numerical Recipes' erfc
//! Chebyshev fit), well inside float32 parity with PyTorch at 1e-4. Not for f64.

use rayon::prelude::*;

/// exp(x) for f32, Cephes-style range reduction + degree-6 polynomial; 0 below -87.3 (so exp(-inf) = 0, as
/// masking needs) and clamped at exp(88) ~ 1.6e38. Uses `floor`, which vectorises (`round` would be a libm call).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.0);
    let n = (xc * std::f32::consts::LOG2_E + 0.5).floor();
    let r = xc - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let r2 = r * r;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r2 + r + 1.0;
    // 2^n without a float->int conversion: adding 2^23 puts n + 127 (0..=255 here) into the low mantissa bits,
    // and shifting left by 23 moves them into the exponent (the high bits shift out).
    let scale = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    if x < -87.3 {
        0.0
    } else {
        y * scale
    }
}

/// Numerical Recipes' erfc fit: erfc(z) = t·exp(-z² + Σ ERFC[i]·tⁱ), t = 1/(1 + z/2).
const ERFC: [f32; 10] = [
    -1.265_512_2,
    1.000_023_7,
    0.374_091_96,
    0.096_784_18,
    -0.186_288_06,
    0.278_868_07,
    -1.135_204,
    1.488_515_9,
    -0.822_152_23,
    0.170_872_77,
];

/// erf(x), |error| < 1.2e-7.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let c = ERFC;
    let poly = c[0]
        + t * (c[1]
            + t * (c[2] + t * (c[3] + t * (c[4] + t * (c[5] + t * (c[6] + t * (c[7] + t * (c[8] + t * c[9]))))))));
    let erfc = t * exp(-z * z + poly);
    let r = 1.0 - erfc;
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// Σ x with 16 independent accumulators (vectorises; a plain `.sum()` is a serial chain of adds).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        for k in 0..16 {
            acc[k] += c[k];
        }
    }
    let tail: f32 = it.remainder().iter().sum();
    acc.iter().sum::<f32>() + tail
}

/// A weight element as stored: f32, or bf16 bits (`u16`) widened on the fly (f32 accumulation either way).
pub trait Weight: Copy {
    fn f32(self) -> f32;
}

impl Weight for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Weight for u16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

/// Σ a·b with 16 independent accumulators.
#[inline(always)]
pub fn dot<W: Weight>(a: &[f32], b: &[W]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let mut ia = a.chunks_exact(16);
    let mut ib = b.chunks_exact(16);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for k in 0..16 {
            acc[k] += ca[k] * cb[k].f32();
        }
    }
    let tail: f32 = ia.remainder().iter().zip(ib.remainder()).map(|(x, y)| x * y.f32()).sum();
    acc.iter().sum::<f32>() + tail
}

/// Four dot products against the same `w` in one pass over it (the weight is loaded once per 16 lanes).
#[inline(always)]
pub fn dot4<W: Weight>(x: [&[f32]; 4], w: &[W]) -> [f32; 4] {
    let n = w.len();
    let (x0, x1, x2, x3) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
    let (mut a0, mut a1, mut a2, mut a3) = ([0f32; 16], [0f32; 16], [0f32; 16], [0f32; 16]);
    let it = w
        .chunks_exact(16)
        .zip(x0.chunks_exact(16))
        .zip(x1.chunks_exact(16))
        .zip(x2.chunks_exact(16))
        .zip(x3.chunks_exact(16));
    for ((((wc, c0), c1), c2), c3) in it {
        for k in 0..16 {
            let wk = wc[k].f32();
            a0[k] += c0[k] * wk;
            a1[k] += c1[k] * wk;
            a2[k] += c2[k] * wk;
            a3[k] += c3[k] * wk;
        }
    }
    let full = n / 16 * 16;
    let tail = |xr: &[f32]| -> f32 { xr[full..].iter().zip(&w[full..]).map(|(a, b)| a * b.f32()).sum() };
    [
        a0.iter().sum::<f32>() + tail(x0),
        a1.iter().sum::<f32>() + tail(x1),
        a2.iter().sum::<f32>() + tail(x2),
        a3.iter().sum::<f32>() + tail(x3),
    ]
}

/// max x (−inf for an empty slice; NaNs are ignored as `f32::max` does).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        for k in 0..16 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let m = it.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    acc.iter().fold(m, |a, &b| a.max(b))
}

/// x = exp(x - m) in place; returns Σ of the results.
#[inline(always)]
pub fn exp_shift_sum(x: &mut [f32], m: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp(*v - m);
    }
    sum(x)
}

const INV_SQRT2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * INV_SQRT2))
}

/// d gelu(x) / dx = Phi(x) + x * phi(x).
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * INV_SQRT2)) + x * INV_SQRT_2PI * exp(-0.5 * x * x)
}

const PAR_CHUNK: usize = 1 << 14;

/// out = gelu(inp), elementwise.
pub fn gelu_fwd(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len());
    let chunk = |(o, i): (&mut [f32], &[f32])| {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // SAFETY: AVX-512F checked; o and i have the same length.
            return unsafe { x86::gelu_fwd(o, i) };
        }
        gelu_fwd_portable(o, i)
    };
    if out.len() <= super::SMALL {
        chunk((out, inp));
    } else {
        out.par_chunks_mut(PAR_CHUNK).zip(inp.par_chunks(PAR_CHUNK)).for_each(chunk);
    }
}

fn gelu_fwd_portable(out: &mut [f32], inp: &[f32]) {
    pulp::Arch::new().dispatch(|| {
        for (o, &x) in out.iter_mut().zip(inp) {
            *o = gelu(x);
        }
    })
}

/// d = d · gelu'(inp), elementwise in place: `d` holds ∂L/∂out on entry and ∂L/∂inp on exit.
pub fn gelu_bwd_inplace(d: &mut [f32], inp: &[f32]) {
    assert_eq!(d.len(), inp.len());
    d.par_chunks_mut(PAR_CHUNK).zip(inp.par_chunks(PAR_CHUNK)).for_each(|(d, i)| {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // SAFETY: AVX-512F checked; d and i have the same length.
            return unsafe { x86::gelu_bwd(d, i) };
        }
        gelu_bwd_portable(d, i)
    });
}

fn gelu_bwd_portable(d: &mut [f32], inp: &[f32]) {
    pulp::Arch::new().dispatch(|| {
        for (d, &x) in d.iter_mut().zip(inp) {
            *d *= gelu_grad(x);
        }
    })
}

/// GELU forward and backward on AVX-512: the scalar formulas sixteen lanes at a time, with the one division
/// (erfc's t) as a 14-bit reciprocal plus a Newton step and 2ⁿ by `vscalefps` (faster than the auto-vectorised
/// scalar code, whose `vdivps` is a large part of it; docs/benchmarks.md).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ERFC, INV_SQRT2, INV_SQRT_2PI};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    #[inline(always)]
    unsafe fn splat(v: f32) -> __m512 {
        _mm512_set1_ps(v)
    }

    /// `super::exp` for x <= 0 (all GELU needs): range reduction, the same degree-6 polynomial, 2ⁿ by scalef.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp_neg(x: __m512) -> __m512 {
        let xc = _mm512_max_ps(x, splat(-87.3));
        let n = _mm512_roundscale_ps::<0x09>(_mm512_fmadd_ps(xc, splat(std::f32::consts::LOG2_E), splat(0.5)));
        let r = _mm512_fmadd_ps(n, splat(2.121_944_4e-4), _mm512_fnmadd_ps(n, splat(0.693_359_4), xc));
        let mut p = splat(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm512_fmadd_ps(p, r, splat(c));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), splat(1.0));
        let y = _mm512_scalef_ps(y, n);
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, splat(-87.3)), y)
    }

    /// erf(x/√2), as `super::erf` computes it (erfc = t·exp(-z² + P(t)), t = 1/(1 + z/2), z = |x|/√2).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn erf_scaled(x: __m512) -> __m512 {
        let z = _mm512_mul_ps(_mm512_abs_ps(x), splat(INV_SQRT2));
        let d = _mm512_fmadd_ps(splat(0.5), z, splat(1.0));
        let t0 = _mm512_rcp14_ps(d);
        // one Newton step: t = t0·(2 - d·t0)
        let t = _mm512_mul_ps(t0, _mm512_fnmadd_ps(d, t0, splat(2.0)));
        let mut p = splat(ERFC[9]);
        for &c in ERFC[..9].iter().rev() {
            p = _mm512_fmadd_ps(p, t, splat(c));
        }
        let erfc = _mm512_mul_ps(t, exp_neg(_mm512_fnmadd_ps(z, z, p)));
        let r = _mm512_sub_ps(splat(1.0), erfc);
        // erf has x's sign
        let sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN));
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), sign))
    }

    /// # Safety
    /// AVX-512F available; `out` and `inp` have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_fwd(out: &mut [f32], inp: &[f32]) {
        let n = out.len();
        let mut j = 0;
        while j < n {
            let m = crate::kernels::lanes16(n - j);
            let x = _mm512_maskz_loadu_ps(m, inp.as_ptr().add(j));
            let erf = erf_scaled(x);
            let y = _mm512_mul_ps(_mm512_mul_ps(splat(0.5), x), _mm512_add_ps(splat(1.0), erf));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(j), m, y);
            j += 16;
        }
    }

    /// # Safety
    /// AVX-512F available; `d` and `inp` have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_bwd(d: &mut [f32], inp: &[f32]) {
        let n = d.len();
        let mut j = 0;
        while j < n {
            let m = crate::kernels::lanes16(n - j);
            let x = _mm512_maskz_loadu_ps(m, inp.as_ptr().add(j));
            let erf = erf_scaled(x);
            let e = exp_neg(_mm512_mul_ps(_mm512_mul_ps(splat(-0.5), x), x));
            let phi = _mm512_mul_ps(_mm512_mul_ps(x, splat(INV_SQRT_2PI)), e);
            let g = _mm512_fmadd_ps(splat(0.5), _mm512_add_ps(splat(1.0), erf), phi);
            let dp = d.as_mut_ptr().add(j);
            _mm512_mask_storeu_ps(dp, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dp), g));
            j += 16;
        }
    }
}

/// x rounded to the nearest bfloat16 (ties to even), kept as f32: the value a bf16 tensor holds. NaN stays NaN.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let r = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    if x.is_nan() {
        x
    } else {
        f32::from_bits(r)
    }
}

/// `round_bf16` over a slice, in place (parallel for large slices).
pub fn round_bf16_slice(x: &mut [f32]) {
    let chunk = |c: &mut [f32]| {
        pulp::Arch::new().dispatch(|| {
            for v in c.iter_mut() {
                *v = round_bf16(*v);
            }
        })
    };
    if x.len() <= super::SMALL {
        chunk(x);
    } else {
        x.par_chunks_mut(PAR_CHUNK).for_each(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the `half` crate's round-to-nearest-even conversion, on values that hit ties, subnormals,
    /// overflow to infinity and NaN.
    #[test]
    fn round_bf16_matches_half() {
        let mut r = common::Rng::new(11);
        let mut xs: Vec<f32> = (0..20000).map(|_| ((r.next_f64() - 0.5) * 1e3) as f32).collect();
        xs.extend([0.0, -0.0, 1.0, 3.4e38, -3.4e38, 1e-40, f32::INFINITY, f32::MIN_POSITIVE]);
        xs.extend([f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000)]); // 1 + 2^-8, 1 + 3·2^-8: ties
        xs.extend((0..2000u32).map(|i| f32::from_bits(0x3f80_8000 + (i << 16)))); // exact ties
        for x in xs {
            let want = half::bf16::from_f32(x).to_f32();
            assert_eq!(round_bf16(x).to_bits(), want.to_bits(), "{x:e}");
        }
        assert!(round_bf16(f32::NAN).is_nan());
    }

    fn erf64(x: f64) -> f64 {
        // Abramowitz-Stegun 7.1.5 series, converges fast for |x| <= 3; used only as a reference here.
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 || n < 5.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst: f64 = 0.0;
        let mut x = -80.0f32;
        while x < 80.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "max rel err {worst}");
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(-87.0) > 0.0);
    }

    /// The AVX-512 GELU forward and backward give the scalar formulas' values to a few ulps, over [-12, 12]
    /// (both tails, zero and the exp cut-off included).
    #[test]
    fn vector_gelu_matches_the_scalar_formulas() {
        let xs: Vec<f32> = (0..24001).map(|i| -12.0 + i as f32 * 0.001).chain([0.0, -0.0, 40.0, -40.0]).collect();
        let mut fwd = vec![0f32; xs.len()];
        gelu_fwd(&mut fwd, &xs);
        let mut bwd = vec![1f32; xs.len()];
        gelu_bwd_inplace(&mut bwd, &xs);
        for (i, &x) in xs.iter().enumerate() {
            assert!((fwd[i] - gelu(x)).abs() <= 4e-7 * (1.0 + x.abs()), "gelu({x}): {} vs {}", fwd[i], gelu(x));
            assert!((bwd[i] - gelu_grad(x)).abs() <= 4e-7, "gelu'({x}): {} vs {}", bwd[i], gelu_grad(x));
        }
    }

    #[test]
    fn erf_and_gelu_are_accurate() {
        let mut x = -3.0f32;
        while x <= 3.0 {
            let e = (erf(x) as f64 - erf64(x as f64)).abs();
            assert!(e < 2.5e-7, "erf({x}) err {e}");
            x += 0.01;
        }
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
        // gelu' by central differences in f64 of the f64 reference.
        let g = |x: f64| 0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2));
        for &x in &[-2.5f32, -0.7, 0.0, 0.3, 1.9] {
            let h = 1e-5;
            let fd = (g(x as f64 + h) - g(x as f64 - h)) / (2.0 * h);
            assert!((gelu_grad(x) as f64 - fd).abs() < 1e-6, "gelu'({x})");
            assert!((gelu(x) as f64 - g(x as f64)).abs() < 1e-6, "gelu({x})");
        }
    }
}
