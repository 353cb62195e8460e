//! bf16 x bf16 -> f32 matrix products: C (m x n, row stride `ldc`) = or += A (m x k) · B (k x n), where every
//! operand element is first rounded to bfloat16 (round to nearest, ties to even) and the products are summed in
//! f32. An operand is either f32 (any value; rounded here, so a value that already is bf16 is read exactly) or raw
//! bf16 bits (`u16`), with arbitrary row and column strides: x·Wᵀ with W (OC, IC) row-major, dY·W and dYᵀ·X are
//! all the same call.
//!
//! Two paths compute that one definition:
//! - `avx512` (CPUs with AVX512_BF16: Zen 4/5, Cooper Lake, Sapphire Rapids and later): our own packing (B as
//!   interleaved k-pairs, A as k-pairs to broadcast) and a register-tiled `vdpbf16ps` micro-kernel, blocked over
//!   k and n, parallel over rayon. `vdpbf16ps` treats denormal inputs as zero and flushes denormal results,
//!   and it rounds after each of the two products it adds (not one fused rounding), so it is not bitwise the
//!   widen-then-FMA result (tests bound the difference).
//! - `amx` (CPUs with AMX-TILE and AMX-BF16: Sapphire Rapids and later), taken before `avx512` where present:
//!   the same blocking with a 32 x 32 tile micro-kernel (`tdpbf16ps`, the same numerics as `vdpbf16ps`).
//! - `portable` (every other CPU): blocks of the operands widened to f32 and the f32 `gemm` crate.
//!
//! Both are deterministic: no split-k, each output sums its k-blocks in order on one thread, so the same inputs
//! and thread count give the same bits.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod linear;
mod pack;
#[cfg(target_arch = "x86_64")]
mod pack_avx512;
mod portable;
#[cfg(test)]
mod tests;

pub(crate) use linear::{linear_bwd_input, linear_bwd_weight, linear_fwd, PackedLinear, Weight};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The elements of an operand: f32 values (rounded to bf16 when read) or bf16 bits.
#[derive(Clone, Copy)]
pub(crate) enum Data<'a> {
    F32(&'a [f32]),
    /// Frozen weights stored in bf16 (read by the `w16` Linear wrappers).
    #[cfg_attr(not(test), allow(dead_code))]
    Bf16(&'a [u16]),
}

impl Data<'_> {
    fn len(&self) -> usize {
        match self {
            Data::F32(s) => s.len(),
            Data::Bf16(s) => s.len(),
        }
    }
}

/// A strided matrix operand: `rows x cols`, element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub data: Data<'a>,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Operand<'a> {
    /// Row-major with row stride `ld`.
    pub fn rm(data: Data<'a>, rows: usize, cols: usize, ld: usize) -> Self {
        Operand { data, rows, cols, rs: ld, cs: 1 }
    }

    /// Column-major with column stride `ld` (the transpose of a row-major `cols x rows` buffer).
    pub fn cm(data: Data<'a>, rows: usize, cols: usize, ld: usize) -> Self {
        Operand { data, rows, cols, rs: 1, cs: ld }
    }

    /// Panics unless every element the strides reach lies inside `data`.
    fn check(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < self.data.len(), "{what}: {}x{} view past its buffer", self.rows, self.cols);
        }
    }
}

/// Whether this CPU runs the `vdpbf16ps` kernel (AVX512_BF16 with AVX-512 F/BW/VL), detected once.
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512bf16")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether `gemm` may take the AMX path where the CPU has it (on by default; benchmarks turn it off to compare).
static AMX_ALLOWED: AtomicBool = AtomicBool::new(true);

/// Allows or forbids the AMX path for the whole process (`dolly bench gemm --no-amx`).
pub(crate) fn set_amx(on: bool) {
    AMX_ALLOWED.store(on, Ordering::Relaxed);
}

/// Whether `gemm` takes the AMX path: the CPU has it, the OS granted it, and it is allowed.
fn use_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        AMX_ALLOWED.load(Ordering::Relaxed) && amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The name of the product path `gemm` takes on this CPU: "amx-bf16", "avx512bf16" or "f32" (widening to the
/// f32 gemm).
pub(crate) fn path_name() -> &'static str {
    if use_amx() {
        "amx-bf16"
    } else if available() {
        "avx512bf16"
    } else {
        "f32"
    }
}

/// C (m x n, row stride `ldc`) = A · B, or `C +=` that when `accumulate`, with bf16-rounded operands and f32
/// sums: the AVX512_BF16 kernel where the CPU has it, the widening f32 path otherwise.
pub(crate) fn gemm(c: &mut [f32], ldc: usize, accumulate: bool, a: Operand<'_>, b: Operand<'_>) {
    gemm_pre(c, ldc, accumulate, a, b, None)
}

/// A B operand packed once for the path `gemm` takes (the AMX path only; `pack` says None elsewhere).
pub(crate) struct Packed {
    #[cfg(target_arch = "x86_64")]
    b: amx::PackedB,
}

impl Packed {
    /// `b` packed whole, where `gemm` takes the AMX path; None on every other path (they pack per call).
    pub fn pack(b: Operand<'_>) -> Option<Packed> {
        b.check("gemm_bf16 packed B");
        #[cfg(target_arch = "x86_64")]
        if use_amx() {
            // SAFETY: the CPU has AMX and the OS granted the tile state (just checked).
            return Some(Packed { b: unsafe { amx::pack_whole(&b) } });
        }
        None
    }

    /// Bytes a packed k x n operand takes (where `pack` packs).
    pub fn bytes_for(k: usize, n: usize) -> usize {
        #[cfg(target_arch = "x86_64")]
        return amx::packed_words(k, n) * 4;
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (k, n);
            0
        }
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        #[cfg(target_arch = "x86_64")]
        return self.b.bytes();
        #[cfg(not(target_arch = "x86_64"))]
        0
    }
}

/// `gemm` with B's panels taken from `pre` (B packed by `Packed::pack`, the same values) where the AMX path
/// runs and `pre` has B's shape; the result is bitwise that of `gemm`.
pub(crate) fn gemm_pre(
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: Operand<'_>,
    b: Operand<'_>,
    pre: Option<&Packed>,
) {
    check(c, ldc, &a, &b);
    #[cfg(target_arch = "x86_64")]
    if use_amx() {
        // SAFETY: the CPU has AMX and the OS granted the tile state (just checked); shapes checked above.
        return unsafe { amx::gemm(c, ldc, accumulate, a, b, pre.map(|p| &p.b)) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = pre;
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has the features the kernel is compiled for (just checked); shapes checked above.
        return unsafe { avx512::gemm(c, ldc, accumulate, a, b) };
    }
    portable::gemm(c, ldc, accumulate, a, b)
}

/// Every path's degenerate shapes: nothing to do when m or n is 0, and C = 0 (or C unchanged when accumulating)
/// when k is 0. True when the product is done.
fn empty_product(c: &mut [f32], ldc: usize, accumulate: bool, m: usize, n: usize, k: usize) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 && !accumulate {
        c.chunks_mut(ldc).take(m).for_each(|r| r[..n].fill(0.0));
    }
    k == 0
}

/// Shapes agree and every view stays inside its buffer.
fn check(c: &[f32], ldc: usize, a: &Operand<'_>, b: &Operand<'_>) {
    assert_eq!(a.cols, b.rows, "gemm_bf16: inner dimensions");
    let (m, n) = (a.rows, b.cols);
    a.check("gemm_bf16 A");
    b.check("gemm_bf16 B");
    if m > 0 && n > 0 {
        assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "gemm_bf16: C is {m}x{n} with row stride {ldc}");
    }
}

/// An element as the kernels read it: its bf16 bits (f32 rounded to nearest even; NaN stays a quiet NaN).
pub(crate) trait Elem: Copy + Send + Sync {
    fn bf16_bits(self) -> u32;
}

impl Elem for f32 {
    #[inline(always)]
    fn bf16_bits(self) -> u32 {
        let b = self.to_bits();
        let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
        if self.is_nan() {
            (b >> 16) | 0x40
        } else {
            rounded
        }
    }
}

impl Elem for u16 {
    #[inline(always)]
    fn bf16_bits(self) -> u32 {
        self as u32
    }
}

/// Tests: whether the AVX512_BF16 path can run here.
#[cfg(test)]
fn avx512_available() -> bool {
    available()
}

/// Tests: the AVX512_BF16 path itself (only called when `avx512_available()`).
#[cfg(test)]
fn avx512_gemm(c: &mut [f32], ldc: usize, accumulate: bool, a: Operand<'_>, b: Operand<'_>) {
    check(c, ldc, &a, &b);
    assert!(available());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the features were just checked.
    unsafe {
        avx512::gemm(c, ldc, accumulate, a, b)
    }
}

/// Tests: whether the AMX path can run here.
#[cfg(test)]
fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Tests: the AMX path itself (only called when `amx_available()`).
#[cfg(test)]
fn amx_gemm(c: &mut [f32], ldc: usize, accumulate: bool, a: Operand<'_>, b: Operand<'_>) {
    check(c, ldc, &a, &b);
    assert!(amx_available());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the features were just checked.
    unsafe {
        amx::gemm(c, ldc, accumulate, a, b, None)
    }
}
