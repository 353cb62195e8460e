//! The AMX path (Intel Sapphire Rapids and later: AMX-TILE + AMX-BF16), the same BLIS-style blocking as
//! `avx512.rs` with a tile micro-kernel: a 32 x 32 block of C lives in four 16 x 16 f32 tiles (tmm0-3), and each
//! step of 16 k-pairs loads two A tiles (16 rows x 16 k-pairs, k contiguous: tmm4-5) and two B tiles (16 k-pairs x
//! 16 columns in `pack.rs`'s pair layout: tmm6-7) and issues four `tdpbf16ps`.
//!
//! A panels are lane-major (`dst[l·kcp + p]`, the row layout an A tile reads) with `kcp` = the block's k-pairs
//! rounded up to 16 (zero pairs add nothing); B panels are pair-major, NR = 32 lanes wide. Rust has no stable AMX
//! intrinsics, so the tile instructions are inline assembly on hard-coded tile registers (the compiler never
//! allocates them). Linux grants a process the AMX state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`),
//! asked once by `available()`.
//!
//! `tdpbf16ps` has `vdpbf16ps`'s numerics (denormal inputs read as zero, denormal results flushed, round to
//! nearest even after each product is added), so the tolerance tests of the other paths apply unchanged. An
//! output element's sum runs over its k-pairs in order within a block, and blocks in order, on one task:
//! deterministic, independent of the thread count.

use super::avx512::{grow, with_scratch};
use super::pack::{self, Src};
use super::pack_avx512;
use super::{Data, Operand};
use crate::kernels::SendPtr;
use rayon::prelude::*;
use std::arch::asm;
use std::sync::OnceLock;

/// Rows per micro-tile (two A tiles).
const MR: usize = 32;
/// Columns per micro-tile (two B tiles).
const NR: usize = 32;
/// k-pairs per tile step (a tile row is 64 bytes).
const KT: usize = 16;
/// k-pairs per block (a multiple of KT).
const KC: usize = 512;
/// Rows of A per task (a multiple of MR): the packed block is MC·KC·4 bytes = 256 KiB, in L2.
const MC: usize = 128;
/// Columns per B block (a multiple of NR).
const NC: usize = 64 * NR;

/// Whether the CPU has AMX-TILE and AMX-BF16 and the kernel granted this process the tile state, checked once.
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // leaf 0 says how many leaves there are
        let max = std::arch::x86_64::__cpuid(0).eax;
        if max < 7 {
            return false;
        }
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        let (tile, bf16) = (edx & (1 << 24) != 0, edx & (1 << 22) != 0);
        tile && bf16 && super::available() && request_tile_state()
    })
}

/// Asks Linux for the AMX tile data state (ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18); false where
/// the kernel refuses or is not Linux.
fn request_tile_state() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes the process's permitted xsave features.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The tile configuration: palette 1, every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Configures the tiles on this thread for `f`, releasing them after (so the OS need not save them).
///
/// # Safety
/// `available()` is true.
unsafe fn with_tiles<R>(f: impl FnOnce() -> R) -> R {
    asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
    let r = f();
    asm!("tilerelease", options(nostack, nomem));
    r
}

/// `super::gemm` through the tile kernel (shapes already checked).
///
/// # Safety
/// `available()` is true.
pub(super) unsafe fn gemm(
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: Operand<'_>,
    b: Operand<'_>,
    pre: Option<&PackedB>,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if super::empty_product(c, ldc, accumulate, m, n, k) {
        return;
    }
    let pre = pre.filter(|p| p.k == k && p.n == n);
    let mut at = 0;
    let kp = k.div_ceil(2);
    let cp = SendPtr(c.as_mut_ptr());
    let tasks_m = m.div_ceil(MC);
    with_scratch(|bb| {
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            let nb = nc.div_ceil(NR);
            let splits = (4 * rayon::current_num_threads()).div_ceil(tasks_m).clamp(1, nb);
            let group = nb.div_ceil(splits);
            for pc in (0..kp).step_by(KC) {
                let kc = KC.min(kp - pc);
                let kcp = kc.next_multiple_of(KT);
                let len = nb * kcp * NR;
                // this block's B panels: packed once for the weight (`pack_whole`), or now
                let bb: &[u32] = match pre {
                    Some(p) => {
                        at += len;
                        &p.words[at - len..at]
                    }
                    None => {
                        grow(bb, len);
                        let pack = |(j, d): (usize, &mut [u32])| pack_b(d, &b, pc, kcp, jc + j * NR);
                        bb[..len].par_chunks_mut(kcp * NR).enumerate().for_each(pack);
                        &bb[..len]
                    }
                };
                let load = accumulate || pc > 0;
                (0..tasks_m * nb.div_ceil(group)).into_par_iter().for_each(|t| {
                    let (ti, tj) = (t % tasks_m, t / tasks_m);
                    let (i_lo, i_hi) = (ti * MC, m.min((ti + 1) * MC));
                    let panels = (i_hi - i_lo).div_ceil(MR);
                    with_scratch(|ab| {
                        grow(ab, panels * kcp * MR * 2);
                        let (ab, tmp) = ab.split_at_mut(panels * kcp * MR);
                        for (ip, d) in ab.chunks_mut(kcp * MR).enumerate() {
                            pack_a(d, &mut tmp[..kcp * MR], &a, pc, kc, kcp, i_lo + ip * MR);
                        }
                        // SAFETY: the caller's contract; each tile below is this task's alone in this k-block.
                        unsafe {
                            with_tiles(|| {
                                for jp in tj * group..nb.min((tj + 1) * group) {
                                    let j0 = jc + jp * NR;
                                    let bp = bb[jp * kcp * NR..(jp + 1) * kcp * NR].as_ptr();
                                    for (ip, ap) in ab.chunks(kcp * MR).enumerate() {
                                        let i0 = i_lo + ip * MR;
                                        let (mr, nr) = (MR.min(m - i0), NR.min(jc + nc - j0));
                                        let ct = cp.get().add(i0 * ldc + j0);
                                        kernel(kcp, ap.as_ptr(), bp, ct, ldc, mr, nr, load);
                                    }
                                }
                            })
                        }
                    })
                });
            }
        }
    })
}

/// A B operand (k x n) packed whole, in the order `gemm` walks it (NC-column blocks, then KC-pair blocks, then
/// each block's NR-column panels): a frozen weight packed once serves every product with it, which otherwise
/// re-packs it per call (about 40% of the product's time at 1024 rows; docs/benchmarks.md).
pub(super) struct PackedB {
    words: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedB {
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.words.len() * 4
    }
}

/// Words `pack_whole` needs for a k x n operand.
pub(super) fn packed_words(k: usize, n: usize) -> usize {
    let kp = k.div_ceil(2);
    let mut total = 0;
    for jc in (0..n).step_by(NC) {
        let nb = NC.min(n - jc).div_ceil(NR);
        for pc in (0..kp).step_by(KC) {
            total += nb * KC.min(kp - pc).next_multiple_of(KT) * NR;
        }
    }
    total
}

/// B packed whole for `gemm`'s `pre`.
///
/// # Safety
/// `available()` is true.
pub(super) unsafe fn pack_whole(b: &Operand<'_>) -> PackedB {
    let (k, n) = (b.rows, b.cols);
    let mut words = vec![0u32; packed_words(k, n)];
    let kp = k.div_ceil(2);
    let mut at = 0;
    for jc in (0..n).step_by(NC) {
        let nb = NC.min(n - jc).div_ceil(NR);
        for pc in (0..kp).step_by(KC) {
            let kcp = KC.min(kp - pc).next_multiple_of(KT);
            let len = nb * kcp * NR;
            let pack = |(j, d): (usize, &mut [u32])| pack_b(d, b, pc, kcp, jc + j * NR);
            words[at..at + len].par_chunks_mut(kcp * NR).enumerate().for_each(pack);
            at += len;
        }
    }
    PackedB { words, k, n }
}

/// One B panel: k-pairs `p0..p0 + kcp` (zero past the matrix), columns `j0..j0 + NR`, pair-major.
fn pack_b(dst: &mut [u32], b: &Operand<'_>, p0: usize, kcp: usize, j0: usize) {
    let (sk, sx, kn, xn) = (b.rs, b.cs, b.rows, b.cols);
    if j0 + NR <= xn && 2 * (p0 + kcp) <= kn {
        // SAFETY: `available()` implies the AVX-512 features; the panel lies inside the checked operand.
        if unsafe { pack_avx512::panel(dst, b.data, sk, sx, p0, kcp, j0, NR) } {
            return;
        }
    }
    portable(dst, b.data, (sk, sx, kn, xn), p0, kcp, j0, NR);
}

/// One A panel, lane-major with row stride `kcp`: rows `i0..i0 + MR`, k-pairs `p0..p0 + kc` then zeros to `kcp`.
/// Rows with k contiguous convert in place; any other layout packs pair-major into `tmp` and transposes.
fn pack_a(dst: &mut [u32], tmp: &mut [u32], a: &Operand<'_>, p0: usize, kc: usize, kcp: usize, i0: usize) {
    let dst = &mut dst[..kcp * MR];
    if a.cs == 1 && kc == kcp && i0 + MR <= a.rows && 2 * (p0 + kc) <= a.cols {
        // SAFETY: `available()` implies the AVX-512 features; the panel lies inside the checked operand and dst
        // holds kc·MR words.
        unsafe { pack_avx512::rows(dst, a.data, a.rs, p0, kc, i0, MR) };
        return;
    }
    let (sk, sx, kn, xn) = (a.cs, a.rs, a.cols, a.rows);
    let whole = i0 + MR <= xn && 2 * (p0 + kcp) <= kn;
    // SAFETY: as above (only reached for a whole panel).
    if !(whole && unsafe { pack_avx512::panel(tmp, a.data, sk, sx, p0, kcp, i0, MR) }) {
        portable(tmp, a.data, (sk, sx, kn, xn), p0, kcp, i0, MR);
    }
    for (l, row) in dst.chunks_exact_mut(kcp).enumerate() {
        for (p, d) in row.iter_mut().enumerate() {
            *d = tmp[p * MR + l];
        }
    }
}

/// `pack::panel` of either element kind; `m` = (stride along k, stride along lanes, k length, lane count).
fn portable(
    dst: &mut [u32],
    data: Data<'_>,
    m: (usize, usize, usize, usize),
    p0: usize,
    kp: usize,
    x0: usize,
    w: usize,
) {
    let (sk, sx, kn, xn) = m;
    match data {
        Data::F32(src) => pack::panel(dst, Src { src, sk, sx, kn, xn }, p0, kp, x0, w),
        Data::Bf16(src) => pack::panel(dst, Src { src, sk, sx, kn, xn }, p0, kp, x0, w),
    }
}

/// A 16 x 16 f32 tile buffer for the edges of C.
#[repr(C, align(64))]
struct Edge([f32; 256]);

/// Loads (`$load`) or stores C tile `$t` from/to `ptr` with row stride `stride` bytes.
macro_rules! tile_io {
    (load $t:literal, $p:expr, $s:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $s, options(nostack, readonly))
    };
    (store $t:literal, $p:expr, $s:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $p, s = in(reg) $s, options(nostack))
    };
    (zero $t:literal) => {
        asm!(concat!("tilezero tmm", $t), options(nostack, nomem))
    };
}

/// C (mr x nr of a 32 x 32 tile, row stride ldc) = or += A panel (32 rows, kcp k-pairs) · B panel (kcp k-pairs,
/// 32 columns). Rows and columns past the edge are computed from zero lanes and not stored.
///
/// # Safety
/// Tiles configured (`with_tiles`); `a` holds 32·kcp words, `b` kcp·32; the mr x nr tile of C is valid for reads
/// and writes.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(kcp: usize, a: *const u32, b: *const u32, c: *mut f32, ldc: usize, mr: usize, nr: usize, load: bool) {
    let mut edge = [Edge([0.0; 256]), Edge([0.0; 256]), Edge([0.0; 256]), Edge([0.0; 256])];
    // quadrant q = 2·(row half) + column half: its C origin, rows, columns
    let quad = |q: usize| {
        let (r0, c0) = (16 * (q / 2), 16 * (q % 2));
        (r0, c0, mr.saturating_sub(r0).min(16), nr.saturating_sub(c0).min(16))
    };
    let full = |q: usize| quad(q).2 == 16 && quad(q).3 == 16;
    let cstride = ldc * 4;
    // where each C tile is loaded from and stored to: C itself, or its edge buffer
    let mut at = [(std::ptr::null_mut::<f32>(), 0usize); 4];
    for (q, e) in edge.iter_mut().enumerate() {
        let (r0, c0, rows, cols) = quad(q);
        if full(q) {
            at[q] = (c.add(r0 * ldc + c0), cstride);
        } else {
            if load {
                for r in 0..rows {
                    for j in 0..cols {
                        e.0[r * 16 + j] = *c.add((r0 + r) * ldc + c0 + j);
                    }
                }
            }
            at[q] = (e.0.as_mut_ptr(), 64);
        }
    }
    if load {
        tile_io!(load 0, at[0].0, at[0].1);
        tile_io!(load 1, at[1].0, at[1].1);
        tile_io!(load 2, at[2].0, at[2].1);
        tile_io!(load 3, at[3].0, at[3].1);
    } else {
        tile_io!(zero 0);
        tile_io!(zero 1);
        tile_io!(zero 2);
        tile_io!(zero 3);
    }
    let (astride, bstride) = (kcp * 4, NR * 4);
    for p in (0..kcp).step_by(KT) {
        let (a0, a1) = (a.add(p), a.add(16 * kcp + p));
        let (b0, b1) = (b.add(p * NR), b.add(p * NR + 16));
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
            sa = in(reg) astride, sb = in(reg) bstride,
            options(nostack, readonly),
        );
    }
    tile_io!(store 0, at[0].0, at[0].1);
    tile_io!(store 1, at[1].0, at[1].1);
    tile_io!(store 2, at[2].0, at[2].1);
    tile_io!(store 3, at[3].0, at[3].1);
    for (q, e) in edge.iter().enumerate() {
        let (r0, c0, rows, cols) = quad(q);
        if !full(q) {
            for r in 0..rows {
                for j in 0..cols {
                    *c.add((r0 + r) * ldc + c0 + j) = e.0[r * 16 + j];
                }
            }
        }
    }
}
