//! The AVX512_BF16 path, BLIS-style: for each block of NC columns and KC k-pairs, B's block is packed once into
//! panels of NR = 16·NV columns (`pack.rs`) and shared; then each task packs its own MC rows of A (MR-row panels,
//! into a per-thread buffer that stays in L2) and runs the MR x NR micro-kernel over its group of B panels. The
//! kernel keeps MR·NV zmm accumulators in registers and, per k-pair, loads NV vectors of B and broadcasts one
//! k-pair word of A per row. A panel whose rows hold k contiguously (x, dY, the logit gradients) is stored
//! lane-major (each row's run of k converted in place, no transposition); others pair-major (`pack.rs`).
//!
//! Deterministic: an output element is written by one task per k-block, k-blocks run in order, and its sum
//! within a block runs over k-pairs in order, so the bits do not depend on the thread count or on how m and n
//! are cut into tasks.

use super::pack::{self, Src};
use super::pack_avx512;
use super::{Data, Elem, Operand};
use crate::kernels::SendPtr;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Rows per micro-tile.
const MR: usize = 8;
/// zmm columns per micro-tile (NR = 16·NV output columns): MR·NV = 24 accumulators + NV B vectors fit the 32
/// registers; A is a broadcast memory operand.
const NV: usize = 3;
const NR: usize = 16 * NV;
/// k-pairs per block. Long blocks amortise loading and storing the C tile around each kernel call, which
/// costs more than the streaming of A and B from L2 (docs/benchmarks.md#bf16-products).
const KC: usize = 512;
/// Rows of A per task (a multiple of MR): the packed block is MC·KC·4 bytes = 256 KiB, in L2.
const MC: usize = 128;
/// Columns per B block (a multiple of NR): KC·NC·4 bytes = 6 MiB, in L3.
const NC: usize = 64 * NR;

thread_local! {
    /// The packed B block (on the calling thread) or a task's A block (on each worker), kept between calls.
    static SCRATCH: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// This thread's scratch, taken out for `f` and put back after (a nested use on the same thread, through
/// rayon's work stealing, gets a fresh buffer instead of a double borrow).
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut Vec<u32>) -> R) -> R {
    let mut v = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let r = f(&mut v);
    SCRATCH.with(|s| *s.borrow_mut() = v);
    r
}

/// `super::gemm` through the `vdpbf16ps` kernel (shapes already checked).
///
/// # Safety
/// The CPU supports AVX512_BF16 and AVX-512 F/BW/VL (`super::available()`).
pub(super) unsafe fn gemm(c: &mut [f32], ldc: usize, accumulate: bool, a: Operand<'_>, b: Operand<'_>) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if super::empty_product(c, ldc, accumulate, m, n, k) {
        return;
    }
    let kp = k.div_ceil(2);
    let cp = SendPtr(c.as_mut_ptr());
    let tasks_m = m.div_ceil(MC);
    with_scratch(|bb| {
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            let nb = nc.div_ceil(NR);
            // enough tasks to balance the threads: split the B panels too when A has few row blocks (each
            // split packs its rows of A again)
            let splits = (4 * rayon::current_num_threads()).div_ceil(tasks_m).clamp(1, nb);
            let group = nb.div_ceil(splits);
            for pc in (0..kp).step_by(KC) {
                let kc = KC.min(kp - pc);
                grow(bb, nb * kc * NR);
                // B block (k-pairs pc.., columns jc..): nb panels of kc·NR words
                let pack = |(j, d): (usize, &mut [u32])| pack_b(d, &b, pc, kc, jc + j * NR);
                bb[..nb * kc * NR].par_chunks_mut(kc * NR).enumerate().for_each(pack);
                let bb = &bb[..];
                let load = accumulate || pc > 0;
                (0..tasks_m * nb.div_ceil(group)).into_par_iter().for_each(|t| {
                    let (ti, tj) = (t % tasks_m, t / tasks_m);
                    let (i_lo, i_hi) = (ti * MC, m.min((ti + 1) * MC));
                    let panels = (i_hi - i_lo).div_ceil(MR);
                    with_scratch(|ab| {
                        grow(ab, panels * kc * MR);
                        let mut lane_major = [false; MC / MR];
                        for (ip, d) in ab[..panels * kc * MR].chunks_mut(kc * MR).enumerate() {
                            lane_major[ip] = pack_a(d, &a, pc, kc, i_lo + ip * MR);
                        }
                        for jp in tj * group..nb.min((tj + 1) * group) {
                            let j0 = jc + jp * NR;
                            let bp = &bb[jp * kc * NR..(jp + 1) * kc * NR];
                            for (ip, ap) in ab[..panels * kc * MR].chunks(kc * MR).enumerate() {
                                let i0 = i_lo + ip * MR;
                                let (mr, nr) = (MR.min(m - i0), NR.min(jc + nc - j0));
                                // SAFETY: rows i0..i0 + mr and columns j0..j0 + nr of C lie inside `c` (checked
                                // by the caller: m rows of n at stride ldc); this task is the only writer of
                                // that tile in this k-block; the panels hold kc·MR and kc·NR words; the CPU
                                // features are the caller's contract.
                                unsafe {
                                    let ct = cp.get().add(i0 * ldc + j0);
                                    let (ap, bp) = (ap.as_ptr(), bp.as_ptr());
                                    if lane_major[ip] {
                                        kernel::<true>(kc, ap, bp, ct, ldc, mr, nr, load)
                                    } else {
                                        kernel::<false>(kc, ap, bp, ct, ldc, mr, nr, load)
                                    }
                                }
                            }
                        }
                    })
                });
            }
        }
    })
}

/// Make `v` at least `len` long (grown once, never re-zeroed: packing writes every word it hands out).
pub(super) fn grow(v: &mut Vec<u32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0);
    }
}

/// One B panel: k-pairs `p0..p0 + kp`, columns `j0..j0 + NR` (lanes = columns: sk = rs, sx = cs).
fn pack_b(dst: &mut [u32], b: &Operand<'_>, p0: usize, kp: usize, j0: usize) {
    pack_op(dst, b.data, (b.rs, b.cs), (b.rows, b.cols), (p0, kp), (j0, NR))
}

/// One A panel: rows `i0..i0 + MR`, k-pairs `p0..p0 + kp` (lanes = rows: sk = cs, sx = rs). Returns whether
/// it is lane-major (`dst[l·kp + p]`: a whole panel with k contiguous, each row's run converted in place)
/// rather than pair-major (`dst[p·MR + l]`, as `pack.rs` describes).
fn pack_a(dst: &mut [u32], a: &Operand<'_>, p0: usize, kp: usize, i0: usize) -> bool {
    if a.cs == 1 && i0 + MR <= a.rows && 2 * (p0 + kp) <= a.cols {
        // SAFETY: only reached from `gemm`, whose caller guarantees the CPU features; the panel lies inside the
        // checked operand and dst holds kp·MR words (asserted inside).
        unsafe { pack_avx512::rows(dst, a.data, a.rs, p0, kp, i0, MR) };
        return true;
    }
    pack_op(dst, a.data, (a.cs, a.rs), (a.cols, a.rows), (p0, kp), (i0, MR));
    false
}

/// `pack::panel` of either element kind: strides and sizes as (along k, along the lanes). Whole panels with a
/// contiguous stride take the AVX-512 packers.
fn pack_op(
    dst: &mut [u32],
    data: Data<'_>,
    s: (usize, usize),
    len: (usize, usize),
    p: (usize, usize),
    x: (usize, usize),
) {
    let (sk, sx, kn, xn) = (s.0, s.1, len.0, len.1);
    if x.0 + x.1 <= xn && 2 * (p.0 + p.1) <= kn {
        // SAFETY: only reached from `gemm`, whose caller guarantees the CPU features; the panel lies inside the
        // checked operand (lanes < xn, k < kn) and dst holds kp·w words (asserted inside).
        if unsafe { pack_avx512::panel(dst, data, sk, sx, p.0, p.1, x.0, x.1) } {
            return;
        }
    }
    match data {
        Data::F32(src) => packed(dst, Src { src, sk, sx, kn, xn }, p.0, p.1, x.0, x.1),
        Data::Bf16(src) => packed(dst, Src { src, sk, sx, kn, xn }, p.0, p.1, x.0, x.1),
    }
}

/// `pack::panel` compiled for AVX-512 (its loops vectorise with these features).
fn packed<E: Elem>(dst: &mut [u32], m: Src<'_, E>, p0: usize, kp: usize, x0: usize, w: usize) {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn go<E: Elem>(dst: &mut [u32], m: Src<'_, E>, p0: usize, kp: usize, x0: usize, w: usize) {
        pack::panel(dst, m, p0, kp, x0, w)
    }
    // SAFETY: only reached from `gemm`, whose caller guarantees AVX-512 F/BW/VL; `go` itself is safe code.
    unsafe { go(dst, m, p0, kp, x0, w) }
}

/// C tile (mr x nr, row stride ldc) = or += A panel (MR rows, kc k-pairs; lane-major when `LANES`, else
/// pair-major) · B panel (kc k-pairs, NR columns). Rows past `mr` are computed (their A lanes are zero) but not
/// stored; columns past `nr` are masked.
///
/// # Safety
/// AVX512_BF16 + AVX-512 F available; `a` holds kc·MR words, `b` kc·NR words; C's tile is valid for reads and
/// writes of its mr x nr elements.
#[inline]
#[allow(clippy::needless_range_loop)] // indices over const-sized register arrays read clearest
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
unsafe fn kernel<const LANES: bool>(
    kc: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    load: bool,
) {
    // word (row i, pair p) of the A panel at a + i·row + p·pair
    let (row, pair) = if LANES { (kc, 1) } else { (1, MR) };
    let mut masks = [0 as __mmask16; NV];
    for v in 0..NV {
        let cols = nr.saturating_sub(16 * v).min(16);
        masks[v] = ((1u32 << cols) - 1) as __mmask16;
    }
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    if load {
        for i in 0..MR {
            if i < mr {
                for v in 0..NV {
                    // masked: columns past nr are neither read nor faulted on
                    acc[i][v] = _mm512_maskz_loadu_ps(masks[v], c.wrapping_add(i * ldc + 16 * v));
                }
            }
        }
    }
    for p in 0..kc {
        let bp = b.add(p * NR);
        let mut bv = [_mm512_setzero_si512(); NV];
        for v in 0..NV {
            bv[v] = _mm512_loadu_si512(bp.add(16 * v) as *const __m512i);
        }
        let ap = a.add(p * pair);
        for i in 0..MR {
            // the k-pair (2p, 2p+1) of row i in every lane
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i * row) as i32));
            for v in 0..NV {
                acc[i][v] = _mm512_dpbf16_ps(acc[i][v], ai, std::mem::transmute::<__m512i, __m512bh>(bv[v]));
            }
        }
    }
    for i in 0..MR {
        if i < mr {
            for v in 0..NV {
                _mm512_mask_storeu_ps(c.wrapping_add(i * ldc + 16 * v), masks[v], acc[i][v]);
            }
        }
    }
}
