//! Helpers for work the host does on the engine's outputs (sampling from logits, per-row choices after a decode
//! step): the engine's low-latency task pool and its vectorised `exp`/`max`, so callers need not know the
//! kernels.

use crate::kernels::{math, pool};

/// Run `f(0..n)` on the decode threads (the caller works too); for many small per-row jobs between decode steps.
pub fn for_each<F: Fn(usize) + Sync>(n: usize, f: F) {
    pool::for_each(n, f)
}

/// exp(x), branch-free (relative error < 2.5e-7; what the engine's softmax uses). Inlined into callers' loops
/// in other crates, so that they vectorise (a call per element ran ~100x slower over a vocabulary row).
#[inline]
pub fn exp(x: f32) -> f32 {
    math::exp(x)
}

/// The largest value (NaN never wins; -inf for an empty or all-NaN slice).
pub fn max(x: &[f32]) -> f32 {
    math::max(x)
}
