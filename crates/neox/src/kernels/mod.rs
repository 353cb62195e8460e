//! CPU kernels for the GPT-NeoX engine: everything but matrix multiplication is written here (fused, vectorisable
//! loops dispatched to AVX2/AVX-512 at run time through `pulp`); matmul goes to the `gemm` crate. No allocation
//! on the hot path beyond what callers pass in. Shapes: N rows (= B*T), C channels, etc. per function.

//!
//! Files are named by what they compute: `attention_train` (causal attention over a batch, forward and backward),
//! `attention_decode` (a query against the KV cache), `matmul` (gemm-backed Linear products), `matvec_f32` and
//! `matvec_bf16` (few-row Linear on f32 rows or bf16 panels), `lm_head_loss` (fused head + cross-entropy),
//! `layernorm`, `rotary`, `math` (exp/erf/GELU/reductions), `transpose`, `pool` (the decode task pool).

pub(crate) mod attention_decode;
pub(crate) mod attention_train;
pub(crate) mod layernorm;
pub(crate) mod lm_head_loss;
pub(crate) mod math;
pub(crate) mod matmul;
pub(crate) mod matvec_bf16;
pub(crate) mod matvec_f32;
pub(crate) mod pool;
pub(crate) mod rotary;
pub(crate) mod transpose;

/// Elements below which an elementwise or per-row kernel runs on the calling thread: a rayon region entered from
/// outside the pool costs more than such a kernel (a decode step has dozens of one-row calls; see
/// docs/benchmarks.md#decode-path-tuning).
pub(crate) const SMALL: usize = 1 << 15;

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
