//! CPU kernels for the GPT-NeoX engine: everything but f32 matrix multiplication is written here (fused,
//! vectorisable loops dispatched to AVX2/AVX-512 at run time through `pulp`, and our own bf16 gemm on
//! AVX512_BF16); f32 matmul goes to the `gemm` crate. No allocation
//! on the hot path beyond what callers pass in. Shapes: N rows (= B*T), C channels, etc. per function.

//!
//! Files are named by what they compute: `attention_train` (causal attention over a batch, forward and backward),
//! `attention_decode` (a query against the KV cache), `matmul` (gemm-backed Linear products), `gemm_bf16` (bf16
//! products with f32 sums: the `vdpbf16ps` kernel or a widening path), `w16` (frozen bf16 weights), `matvec_f32` and
//! `matvec_bf16` (few-row Linear on f32 rows or bf16 panels), `lm_head_loss` (fused head + cross-entropy),
//! `layernorm`, `rotary`, `math` (exp/erf/GELU/reductions), `transpose`, `pool` (the decode task pool), `rank_r` (products with a
//! LoRA-rank-wide output) and `dropout` (the LoRA branch's hashed mask).

pub(crate) mod attention_decode;
/// The materialising attention that `attention_train` replaced: the plain reference of its tests.
#[cfg(test)]
mod attention_ref;
pub(crate) mod attention_train;
pub(crate) mod dropout;
pub(crate) mod gemm_bf16;
pub(crate) mod layernorm;
pub(crate) mod lm_head_loss;
pub(crate) mod math;
pub(crate) mod matmul;
pub(crate) mod matvec_bf16;
pub(crate) mod matvec_f32;
pub(crate) mod pool;
pub(crate) mod q4k;
pub(crate) mod q8;
pub(crate) mod rank_r;
pub(crate) mod rotary;
pub(crate) mod transpose;
pub(crate) mod w16;

/// Elements below which an elementwise or per-row kernel runs on the calling thread: a rayon region entered from
/// outside the pool costs more than such a kernel (a decode step has dozens of one-row calls; see
/// docs/benchmarks.md#decode-path-tuning).
pub(crate) const SMALL: usize = 1 << 15;

/// The mask of the first `n` of 16 lanes (all 16 for n >= 16): the tail of an AVX-512 loop.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn lanes16(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// A raw pointer that may cross rayon threads; each user writes disjoint ranges (documented at each use).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T = f32>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole Send wrapper).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// `$run!(R)` with the run-time row count `$n` (1 to 8; 8 for more) as the literal `R`: the few-row kernels keep
/// R rows of accumulators in registers, so R is a const generic.
macro_rules! const_rows {
    ($n:expr, $run:ident) => {
        match $n {
            1 => $run!(1),
            2 => $run!(2),
            3 => $run!(3),
            4 => $run!(4),
            5 => $run!(5),
            6 => $run!(6),
            7 => $run!(7),
            _ => $run!(8),
        }
    };
}
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_imports))]
pub(crate) use const_rows;

/// `$name(dst, w, x, o0, o1)`: output columns o0..o1 of every input row of a quantized few-row product, by
/// `$tile::<R, M>(w, o, x, r0, res)` over R = `$r` weight rows x M <= 4 input rows (`$W` the weight, `$X` the
/// quantized input rows, with a field `n`). Shared by the q8_0 and q4_K kernels.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_macros))]
macro_rules! few_row_tiles {
    ($name:ident, $tile:ident, $feat:literal, $r:literal, $W:ty, $X:ty) => {
        /// Columns o0..o1 of every row: R weight rows x up to 4 inputs per tile (R x 4 accumulators in
        /// registers); more inputs take further passes over the same weight rows, which are then in L1.
        ///
        /// # Safety
        /// The CPU features of this path are present; `dst`, `w` and `x` are as the product's entry asserted.
        #[target_feature(enable = $feat)]
        #[allow(clippy::int_plus_one)] // `o + R <= o1` reads as "R more rows fit", also for R = 1
        pub(super) unsafe fn $name(dst: &crate::kernels::matvec_f32::Dest<'_>, w: &$W, x: &$X, o0: usize, o1: usize) {
            macro_rules! rows {
                ($R:literal, $o:expr) => {{
                    let o = $o;
                    let mut r = 0;
                    while r < x.n {
                        let left = x.n - r;
                        macro_rules! go {
                            ($M:literal) => {{
                                let mut res = [[0f32; $M]; $R];
                                $tile::<$R, $M>(w, o, x, r, &mut res);
                                for (i, row) in res.iter().enumerate() {
                                    for (m, &y) in row.iter().enumerate() {
                                        dst.put(r + m, o + i, y);
                                    }
                                }
                                r += $M;
                            }};
                        }
                        match left {
                            1 => go!(1),
                            2 => go!(2),
                            3 => go!(3),
                            _ => go!(4),
                        }
                    }
                }};
            }
            let mut o = o0;
            while o + $r <= o1 {
                rows!($r, o);
                o += $r;
            }
            while o < o1 {
                rows!(1, o);
                o += 1;
            }
        }
    };
}
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_imports))]
pub(crate) use few_row_tiles;

/// Asserts that a few-row Linear gives a row the same bits whether other rows share the call or not (batched
/// decoding then gives the same greedy ids as decoding alone): `linear(out, inp, w, dims)` on random (N, IC) inputs
/// and (OC, IC) weights, all `n` rows in one call against groups of each size in `groups`, for a few shapes.
#[cfg(test)]
pub(crate) fn assert_rows_independent(
    seed: u64,
    n: usize,
    groups: &[usize],
    linear: impl Fn(&mut [f32], &[f32], &[f32], matmul::Dims),
) {
    let mut rng = common::Rng::new(seed);
    for &(ic, oc) in &[(64, 70), (33, 9), (96, 131)] {
        let inp: Vec<f32> = (0..n * ic).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let w: Vec<f32> = (0..oc * ic).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let mut all = vec![0f32; n * oc];
        linear(&mut all, &inp, &w, matmul::Dims { n, ic, oc });
        for &k in groups {
            for r0 in (0..n).step_by(k) {
                let m = k.min(n - r0);
                let mut part = vec![0f32; m * oc];
                linear(&mut part, &inp[r0 * ic..(r0 + m) * ic], &w, matmul::Dims { n: m, ic, oc });
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&part), bits(&all[r0 * oc..(r0 + m) * oc]), "ic {ic} rows {r0}..+{m}");
            }
        }
    }
}
