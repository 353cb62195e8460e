//! CPU kernels for the GPT-NeoX engine: everything but matrix multiplication is written here (fused, vectorisable
//! loops dispatched to AVX2/AVX-512 at run time through `pulp`); matmul goes to the `gemm` crate. No allocation
//! on the hot path beyond what callers pass in. Shapes: N rows (= B*T), C channels, etc. per function.

pub mod attention;
pub mod cached;
pub mod layernorm;
pub mod math;
pub mod matmul;
pub mod panels;
pub mod pool;
pub mod rotary;
pub mod rows;
pub mod transpose;
pub mod xent;

/// Elements below which an elementwise or per-row kernel runs on the calling thread: a rayon region costs tens of
/// µs when called from outside the pool (a decode step has dozens of one-row calls).
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
