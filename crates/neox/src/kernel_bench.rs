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
/// The int8 dot product the q8_0 and q4_K kernels use here: "avx512vnni", "avx2" or "portable".
pub fn q8_path() -> &'static str {
    crate::kernels::q8::path_name()
}

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

/// Median seconds of one LoRA-branch product: the fused `rank_r` kernel against the `gemm` crate plus a separate
/// dropout pass (what the branch ran before the kernel), in the same rounds.
#[derive(Clone, Debug)]
pub struct RankTiming {
    /// "u=drop(x)·Aᵀ", "dAᵀ=drop(x)ᵀ·du", "dx+=drop(du·A)".
    pub product: &'static str,
    pub fused_s: f64,
    pub gemm_s: f64,
    /// 2·N·IC·r.
    pub flops: f64,
}

/// Times the three LoRA products that read or write an (N, IC) matrix through the dropout mask (p = 0.05) at
/// rank `r`, `rounds` alternating rounds of the fused kernel then gemm + mask pass after one untimed round.
pub fn lora_products(n: usize, ic: usize, r: usize, rounds: usize) -> Vec<RankTiming> {
    use crate::kernels::dropout::Mask;
    use crate::kernels::matmul::{gemm, par_all, Mat};
    use crate::kernels::rank_r::{rank_cols, rank_rows, rank_update};
    use rayon::prelude::*;
    let mut rng = common::Rng::new(2);
    let mut v = |len: usize| (0..len).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
    let (x, a, du) = (v(n * ic), v(r * ic), v(n * r));
    let (mut u, mut dat, mut dx, mut xd) = (vec![0f32; n * r], vec![0f32; ic * r], v(n * ic), vec![0f32; n * ic]);
    let mask = Mask::new(3, 1, 0.05);
    let dropped = |dst: &mut [f32], src: &[f32], add: bool| {
        dst.par_chunks_mut(ic).zip(src.par_chunks(ic)).enumerate().for_each(|(row, (d, s))| match add {
            true => mask.add(d, s, row, 0),
            false => mask.apply(d, s, row, 0),
        })
    };
    let mut times = [[vec![], vec![]], [vec![], vec![]], [vec![], vec![]]];
    for round in 0..=rounds {
        for fused in [true, false] {
            let time = |f: &mut dyn FnMut()| {
                let t0 = Instant::now();
                f();
                t0.elapsed().as_secs_f64()
            };
            // SAFETY (gemm calls): every view is inside the buffers sized above; destinations are distinct.
            let t = [
                time(&mut || match fused {
                    true => rank_rows(&mut u, false, 1.0, (&x, ic), Some(&mask), (n, ic), &a, r),
                    false => unsafe {
                        dropped(&mut xd, &x, false);
                        let (dst, lhs) = (Mat::rm(u.as_mut_ptr(), n, r, r), Mat::rm(xd.as_ptr(), n, ic, ic));
                        gemm(dst, false, lhs, Mat::cm(a.as_ptr(), ic, r, ic), 1.0, par_all())
                    },
                }),
                time(&mut || match fused {
                    true => rank_cols(&mut dat, false, 1.0, (&x, ic), Some(&mask), (ic, n), &du, r),
                    false => unsafe {
                        dropped(&mut xd, &x, false);
                        let (dst, lhs) = (Mat::rm(dat.as_mut_ptr(), ic, r, r), Mat::cm(xd.as_ptr(), ic, n, ic));
                        gemm(dst, false, lhs, Mat::rm(du.as_ptr(), n, r, r), 1.0, par_all())
                    },
                }),
                time(&mut || match fused {
                    true => rank_update((&mut dx, ic), 1.0, &du, &a, Some(&mask), (n, ic), r),
                    false => unsafe {
                        let (dst, lhs) = (Mat::rm(xd.as_mut_ptr(), n, ic, ic), Mat::rm(du.as_ptr(), n, r, r));
                        gemm(dst, false, lhs, Mat::rm(a.as_ptr(), r, ic, ic), 1.0, par_all());
                        dropped(&mut dx, &xd, true)
                    },
                }),
            ];
            if round > 0 {
                for (p, t) in t.into_iter().enumerate() {
                    times[p][usize::from(!fused)].push(t);
                }
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let flops = 2.0 * (n * ic * r) as f64;
    ["u=drop(x)·Aᵀ", "dAᵀ=drop(x)ᵀ·du", "dx+=drop(du·A)"]
        .into_iter()
        .zip(times.iter_mut())
        .map(|(product, [f, g])| RankTiming { product, fused_s: median(f), gemm_s: median(g), flops })
        .collect()
}
