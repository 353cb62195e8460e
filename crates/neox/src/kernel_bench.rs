//! Timing of the Linear products for `dolly bench gemm`: the bf16 product path (`kernels::gemm_bf16`) against
//! the f32 products training uses without `--bf16`, on one shape, in alternating rounds (the kernels are private;
//! this is their only public door).

use crate::kernels::gemm_bf16::{self, Weight};
use crate::kernels::matmul;
pub use crate::kernels::matmul::Dims;
use std::time::Instant;

/// Median seconds of one product on each path.
#[derive(Clone, Debug)]
pub struct ProductTiming {
    /// "fwd" (out = x·Wᵀ from the transposed copy), "dx" (dX = dY·W), "dw" (dW += dYᵀ·X).
    pub product: &'static str,
    pub bf16_s: f64,
    pub f32_s: f64,
    /// Where the bf16 path is AMX: the same product on the AVX512_BF16 (`vdpbf16ps`) kernel, in the same rounds.
    pub avx512_s: Option<f64>,
    /// Floating-point operations of one product (2·N·IC·OC).
    pub flops: f64,
}

/// The product path the bf16 kernel takes on this CPU: "amx-bf16", "avx512bf16" or "f32" (widened to the f32
/// gemm).
pub fn bf16_path() -> &'static str {
    gemm_bf16::path_name()
}

/// Allows or forbids the AMX path of the bf16 products for the whole process (on by default where the CPU has it).
pub fn set_amx(on: bool) {
    gemm_bf16::set_amx(on)
}

/// Times the three products of a Linear layer of `d` (random bf16-valued operands), `rounds` alternating rounds
/// of bf16 then f32 (then bf16 on the AVX512_BF16 kernel where the bf16 path is AMX) after one untimed round of
/// each; returns the median per product and path.
pub fn linear_products(d: Dims, rounds: usize) -> Vec<ProductTiming> {
    let Dims { n, ic, oc } = d;
    let mut r = common::Rng::new(1);
    let mut v = |len: usize| (0..len).map(|_| half::bf16::from_f32(r.normal() as f32).to_f32()).collect::<Vec<f32>>();
    let (x, w, dy) = (v(n * ic), v(oc * ic), v(n * oc));
    let mut wt = vec![0f32; ic * oc];
    crate::kernels::transpose::transpose(&mut wt, &w, oc, ic);
    let (mut out, mut dx, mut dw) = (vec![0f32; n * oc], vec![0f32; n * ic], vec![0f32; oc * ic]);
    let amx = gemm_bf16::path_name() == "amx-bf16";
    let mut times = [[vec![], vec![], vec![]], [vec![], vec![], vec![]], [vec![], vec![], vec![]]];
    // (bf16 path?, AMX allowed?)
    let paths: &[(bool, bool)] =
        if amx { &[(true, true), (false, true), (true, false)] } else { &[(true, true), (false, true)] };
    for round in 0..=rounds {
        for (path, &(bf16, allow_amx)) in paths.iter().enumerate() {
            gemm_bf16::set_amx(allow_amx);
            let time = |f: &mut dyn FnMut()| {
                let t0 = Instant::now();
                f();
                t0.elapsed().as_secs_f64()
            };
            let t = [
                time(&mut || match bf16 {
                    true => gemm_bf16::linear_fwd(&mut out, &x, Weight::Transposed(&wt), None, d, false),
                    false => matmul::linear_fwd_t(&mut out, &x, &wt, None, d, false),
                }),
                time(&mut || match bf16 {
                    true => gemm_bf16::linear_bwd_input(&mut dx, &dy, Weight::Rows(gemm_bf16::Data::F32(&w)), d, false),
                    false => matmul::linear_bwd_input(&mut dx, &dy, &w, d, false),
                }),
                time(&mut || match bf16 {
                    true => gemm_bf16::linear_bwd_weight(&mut dw, &dy, &x, d),
                    false => matmul::linear_bwd_weight_t(&mut dw, &dy, &x, d),
                }),
            ];
            if round > 0 {
                for (p, t) in t.into_iter().enumerate() {
                    times[p][path].push(t);
                }
            }
        }
        gemm_bf16::set_amx(true);
        // dW accumulates: keep it from growing without bound over many rounds
        dw.fill(0.0);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let flops = 2.0 * (n * ic * oc) as f64;
    ["fwd", "dx", "dw"]
        .into_iter()
        .zip(times.iter_mut())
        .map(|(product, [b, f, v])| {
            let avx512_s = (!v.is_empty()).then(|| median(v));
            ProductTiming { product, bf16_s: median(b), f32_s: median(f), avx512_s, flops }
        })
        .collect()
}
