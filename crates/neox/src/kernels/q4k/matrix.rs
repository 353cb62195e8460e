//! q4_K weights held for the kernels (`Q4KMatrix`) and their products with f32 activations (`linear_q4k`).
//!
//! - In memory a weight (OC, IC) is held in groups of 4 rows so that a tile streams memory front to back: per
//!   super-block, the 4 rows' 128 bytes of quants exactly as ggml stores them (2 cache lines a row), then, after
//!   all super-blocks, the 6-bit scales and mins unpacked to bytes (16 a row and super-block) and `d`, `dmin`
//!   (f16). 148 bytes per 256 weights (0.578 bytes a weight; GGUF's 144: the scales unpacked once at load, not
//!   per product).
//! - Each product quantizes its input rows once to int8 blocks of 256 values (one f32 scale `amax / 127` a
//!   block, as q8_0 does per 32: ggml's q8_K is the same idea), the values placed to meet the nibbles: a
//!   64-byte load of quants holds sub-blocks (4h, 4h+2) in its low nibbles and (4h+1, 4h+3) in its high ones,
//!   so the input's 128 values of half h are stored as [0..32, 64..96] then [32..64, 96..128]. Per block the
//!   input also keeps dx · Σq for each sub-block of 32.
//! - Per super-block: Σ_j scale_j · Σ q_w q_x exactly in int32 (u8 × s8 pair sums `vpmaddubsw`, at most
//!   2 · 15 · 127 so never saturated, then times the scales and summed `vpdpwssd`), times d · dx in f32, minus
//!   Σ_j (dmin · min_j)(dx · Σ q_x,j) in f32. Every output sums its super-blocks in the same order whatever the
//!   tile, so a row's result is bitwise the same alone or in a batch.

use super::{pack_scale_min, quantize_q4_k, scale_min, BLOCK_BYTES, QK_K};
use crate::kernels::matmul::Dims;
use crate::kernels::matvec_f32::Dest;
use crate::kernels::q8::{bytes_mut, Line};
use crate::kernels::{pool, SendPtr};
use half::f16;
use std::cell::RefCell;

/// Weight rows stored together: the rows a tile reads at once.
pub(super) const GROUP: usize = 4;
/// Bytes of quants per row and super-block.
const QS: usize = QK_K / 2;
/// Bytes of unpacked scales (8) and mins (8) per row and super-block.
const META: usize = 16;

/// A q4_K weight (rows, cols), `cols` a multiple of 256. Rows past the end of the last group are zeros with
/// scales 0.
pub struct Q4KMatrix {
    pub rows: usize,
    pub cols: usize,
    /// Super-blocks per row.
    pub(super) sbs: usize,
    /// Lines per group.
    gstride: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for Q4KMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q4KMatrix({} x {})", self.rows, self.cols)
    }
}

/// Byte offsets inside a group of `sbs` super-blocks, for its row `i` and super-block `s`: the quants, the
/// unpacked scales (then mins), and (d, dmin).
#[inline(always)]
fn qs_off(i: usize, s: usize) -> usize {
    (s * GROUP + i) * QS
}

#[inline(always)]
fn meta_off(sbs: usize, i: usize, s: usize) -> usize {
    sbs * GROUP * QS + (s * GROUP + i) * META
}

#[inline(always)]
fn dd_off(sbs: usize, i: usize, s: usize) -> usize {
    sbs * GROUP * (QS + META) + (s * GROUP + i) * 4
}

/// The parts of one GGUF super-block: d and dmin (f16 bits), 8 scales, 8 mins, 128 bytes of quants.
struct Parts<'a> {
    d: [u8; 2],
    dmin: [u8; 2],
    sc: [u8; 8],
    m: [u8; 8],
    qs: &'a [u8],
}

fn parts(b: &[u8]) -> Parts<'_> {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        (sc[j], m[j]) = scale_min(j, &b[4..16]);
    }
    Parts { d: [b[0], b[1]], dmin: [b[2], b[3]], sc, m, qs: &b[16..] }
}

impl Q4KMatrix {
    fn empty(rows: usize, cols: usize) -> Self {
        assert!(cols.is_multiple_of(QK_K) && cols > 0, "q4_K rows must be a positive multiple of {QK_K}");
        let sbs = cols / QK_K;
        let gstride = (sbs * GROUP * (QS + META + 4)).div_ceil(64);
        Q4KMatrix { rows, cols, sbs, gstride, lines: vec![Line([0; 64]); rows.div_ceil(GROUP) * gstride] }
    }

    fn all_bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes (repr(C)); the slice covers exactly the lines.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const u8, self.lines.len() * 64) }
    }

    /// Byte offset of row `r`'s group.
    #[inline(always)]
    fn group_off(&self, r: usize) -> usize {
        r / GROUP * self.gstride * 64
    }

    /// A weight (rows, cols) from GGUF's q4_K super-blocks (row-major, 144 bytes per 256 values). A scale `d`
    /// or `dmin` that is not finite is refused.
    pub fn from_blocks(bytes: &[u8], rows: usize, cols: usize) -> Result<Self, String> {
        if !cols.is_multiple_of(QK_K) || cols == 0 {
            return Err(format!("q4_K rows of {cols} values: not a positive multiple of {QK_K}"));
        }
        let per_row = cols / QK_K;
        let want = rows * per_row * BLOCK_BYTES;
        if bytes.len() != want {
            return Err(format!("{} bytes of q4_K data, {rows} x {cols} needs {want}", bytes.len()));
        }
        for (k, b) in bytes.chunks_exact(BLOCK_BYTES).enumerate() {
            for (what, at) in [("d", 0), ("dmin", 2)] {
                if !f16::from_le_bytes([b[at], b[at + 1]]).is_finite() {
                    return Err(format!("super-block {k} (row {}) has a non-finite {what}", k / per_row));
                }
            }
        }
        Ok(Self::from_rows(bytes, rows, cols))
    }

    /// Quantizes a row-major f32 weight (rows, cols) with ggml's reference quantizer (groups of rows in
    /// parallel). `cols` must be a multiple of 256 and every value finite (the caller checks and names the
    /// tensor).
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Self {
        use rayon::prelude::*;
        assert_eq!(w.len(), rows * cols);
        let mut m = Q4KMatrix::empty(rows, cols);
        let (sbs, gstride) = (m.sbs, m.gstride);
        m.lines.par_chunks_mut(gstride).zip(w.par_chunks(GROUP * cols)).for_each(|(lines, rows)| {
            let mut blocks = Vec::with_capacity(sbs * BLOCK_BYTES);
            let group = bytes_mut(lines);
            for (i, row) in rows.chunks_exact(cols).enumerate() {
                blocks.clear();
                quantize_q4_k(row, &mut blocks);
                put_row(group, sbs, i, &blocks);
            }
        });
        m
    }

    /// Rows of GGUF super-blocks, already checked.
    fn from_rows(bytes: &[u8], rows: usize, cols: usize) -> Self {
        let mut m = Q4KMatrix::empty(rows, cols);
        let (sbs, gstride) = (m.sbs, m.gstride);
        let row_bytes = sbs * BLOCK_BYTES;
        for (g, lines) in m.lines.chunks_mut(gstride).enumerate() {
            let group = bytes_mut(lines);
            for i in 0..GROUP.min(rows - g * GROUP) {
                let r = g * GROUP + i;
                put_row(group, sbs, i, &bytes[r * row_bytes..(r + 1) * row_bytes]);
            }
        }
        m
    }

    /// The GGUF q4_K super-blocks of rows `r0..r1`, appended to `out` (the inverse of `from_blocks`, byte for
    /// byte).
    pub fn write_blocks(&self, r0: usize, r1: usize, out: &mut Vec<u8>) {
        let bytes = self.all_bytes();
        for r in r0..r1 {
            let (g, i) = (self.group_off(r), r % GROUP);
            for s in 0..self.sbs {
                let (dd, meta, qs) = (g + dd_off(self.sbs, i, s), g + meta_off(self.sbs, i, s), g + qs_off(i, s));
                out.extend_from_slice(&bytes[dd..dd + 4]);
                let sc: [u8; 8] = bytes[meta..meta + 8].try_into().expect("8 bytes");
                let m: [u8; 8] = bytes[meta + 8..meta + 16].try_into().expect("8 bytes");
                out.extend_from_slice(&pack_scale_min(&sc, &m));
                out.extend_from_slice(&bytes[qs..qs + QS]);
            }
        }
    }

    /// Row `r` as f32 (ggml's dequantization: d · scale · q − dmin · min).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols);
        let mut blocks = Vec::with_capacity(self.sbs * BLOCK_BYTES);
        self.write_blocks(r, r + 1, &mut blocks);
        super::dequantize_q4_k(&blocks, out);
    }

    /// Bytes of a group per super-block: 4 rows' quants, scales and mins, (d, dmin).
    pub(super) const SB_BYTES: usize = GROUP * (QS + META + 4);

    /// The first byte of row `r`'s group: a tile over the group reads its bytes front to back, `SB_BYTES` a
    /// super-block (the quants, scales and (d, dmin) regions advance together).
    #[inline(always)]
    pub(super) fn group_ptr(&self, r: usize) -> *const u8 {
        // SAFETY (of the callers' prefetches, which may run past the end: prefetches do not fault): in `lines`.
        (self.lines.as_ptr() as *const u8).wrapping_add(self.group_off(r))
    }

    /// Bytes between super-blocks `s` and `s + 1` of one row in the quants, scales and (d, dmin) regions.
    pub(super) const STEP: (usize, usize, usize) = (GROUP * QS, GROUP * META, GROUP * 4);

    /// Super-block 0 of row `r`: its quants, scales, (d, dmin); the next rows of its group follow at
    /// (+128, +16, +4) bytes, its next super-blocks at `STEP`.
    #[inline(always)]
    pub(super) fn row_ptrs(&self, r: usize) -> (*const u8, *const u8, *const u8) {
        (self.qs_ptr(r, 0), self.meta_ptr(r, 0), self.dd_ptr(r, 0) as *const u8)
    }

    /// The 128 bytes of quants of super-block `s` of row `r` (cache-line aligned).
    #[inline(always)]
    pub(super) fn qs_ptr(&self, r: usize, s: usize) -> *const u8 {
        debug_assert!(r < self.rows.div_ceil(GROUP) * GROUP && s < self.sbs);
        // SAFETY (of the callers' reads): the offset is inside `lines` for every r < rows, s < sbs.
        unsafe { (self.lines.as_ptr() as *const u8).add(self.group_off(r) + qs_off(r % GROUP, s)) }
    }

    /// The 8 scales then 8 mins of super-block `s` of row `r`.
    #[inline(always)]
    pub(super) fn meta_ptr(&self, r: usize, s: usize) -> *const u8 {
        // SAFETY: as `qs_ptr`.
        unsafe { (self.lines.as_ptr() as *const u8).add(self.group_off(r) + meta_off(self.sbs, r % GROUP, s)) }
    }

    /// d then dmin (f16) of super-block `s` of row `r`.
    #[inline(always)]
    pub(super) fn dd_ptr(&self, r: usize, s: usize) -> *const u16 {
        // SAFETY: as `qs_ptr`.
        unsafe {
            (self.lines.as_ptr() as *const u8).add(self.group_off(r) + dd_off(self.sbs, r % GROUP, s)) as *const u16
        }
    }

    /// (d, dmin, scales, mins, quants) of super-block `s` of row `r`: the portable kernel's view.
    fn block(&self, r: usize, s: usize) -> (f32, f32, &[u8], &[u8], &[u8]) {
        let bytes = self.all_bytes();
        let (g, i) = (self.group_off(r), r % GROUP);
        let (dd, meta, qs) = (g + dd_off(self.sbs, i, s), g + meta_off(self.sbs, i, s), g + qs_off(i, s));
        let f = |at: usize| f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
        (f(dd), f(dd + 2), &bytes[meta..meta + 8], &bytes[meta + 8..meta + 16], &bytes[qs..qs + QS])
    }
}

/// Row `i` of a group (its bytes) from that row's GGUF super-blocks.
fn put_row(group: &mut [u8], sbs: usize, i: usize, blocks: &[u8]) {
    for (s, b) in blocks.chunks_exact(BLOCK_BYTES).enumerate() {
        let p = parts(b);
        let (dd, meta, qs) = (dd_off(sbs, i, s), meta_off(sbs, i, s), qs_off(i, s));
        group[dd..dd + 2].copy_from_slice(&p.d);
        group[dd + 2..dd + 4].copy_from_slice(&p.dmin);
        group[meta..meta + 8].copy_from_slice(&p.sc);
        group[meta + 8..meta + 16].copy_from_slice(&p.m);
        group[qs..qs + QS].copy_from_slice(p.qs);
    }
}

/// Where value `v` (0..256) of a super-block sits in the quantized input: half h = v / 128 holds its
/// quarters in the order 0, 2, 1, 3 (low nibbles' sub-blocks, then high nibbles').
#[inline(always)]
pub(super) fn input_pos(v: usize) -> usize {
    const AT: [usize; 4] = [0, 64, 32, 96];
    (v / 128) * 128 + AT[(v % 128) / 32] + v % 32
}

/// Input rows quantized for one product: int8 in super-blocks of 256 (placed by `input_pos`), the scale of
/// each, and per super-block 16 floats: dx · Σq of its 8 sub-blocks, then 8 zeros (one 64-byte load).
pub(super) struct KRows {
    pub n: usize,
    pub sbs: usize,
    pub qs: Vec<i8>,
    pub dx: Vec<f32>,
    pub xs: Vec<f32>,
}

/// Floats of `xs` per super-block.
pub(super) const XS: usize = 16;

thread_local! {
    /// The quantized input rows, reused across products.
    static QIN: RefCell<KRows> =
        const { RefCell::new(KRows { n: 0, sbs: 0, qs: Vec::new(), dx: Vec::new(), xs: Vec::new() }) };
}

impl KRows {
    #[cfg(test)]
    pub(super) fn new() -> Self {
        KRows { n: 0, sbs: 0, qs: Vec::new(), dx: Vec::new(), xs: Vec::new() }
    }

    /// Quantizes `n` rows of `ic` values (`ic` a multiple of 256) in place of the previous contents.
    pub(super) fn fill(&mut self, inp: &[f32], n: usize, ic: usize) {
        let sbs = ic / QK_K;
        self.n = n;
        self.sbs = sbs;
        self.qs.clear();
        self.qs.resize(n * ic, 0);
        self.dx.clear();
        self.dx.resize(n * sbs, 0.0);
        self.xs.clear();
        self.xs.resize(n * sbs * XS, 0.0);
        for (k, x) in inp[..n * ic].chunks_exact(QK_K).enumerate() {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q = &mut self.qs[k * QK_K..(k + 1) * QK_K];
            let mut sums = [0i32; 8];
            for (v, &x) in x.iter().enumerate() {
                // |x · id| <= 127 (plus rounding): the cast does not clip
                let t = (x * id).round() as i8;
                q[input_pos(v)] = t;
                sums[v / 32] += t as i32;
            }
            self.dx[k] = d;
            for (o, &s) in self.xs[k * XS..k * XS + 8].iter_mut().zip(&sums) {
                *o = d * s as f32;
            }
        }
    }

    /// The 256 int8 values of super-block `s` of row `r`.
    #[inline(always)]
    pub(super) fn qs(&self, r: usize, s: usize) -> &[i8] {
        let at = (r * self.sbs + s) * QK_K;
        &self.qs[at..at + QK_K]
    }

    /// The scale of super-block `s` of row `r`, and its 16 floats of dx · Σq.
    #[inline(always)]
    pub(super) fn scales(&self, r: usize, s: usize) -> (f32, &[f32]) {
        let at = r * self.sbs + s;
        (self.dx[at], &self.xs[at * XS..(at + 1) * XS])
    }
}

/// Most weight rows per parallel task (148 KiB of q4_K at IC 1024), fewer when that would leave a thread
/// without a task.
const COLS: usize = 256;

/// out (N, OC) = inp (N, IC) · Wᵀ + bias (or `+=` when `accumulate`) for a q4_K weight W (OC, IC).
pub fn linear_q4k(out: &mut [f32], inp: &[f32], w: &Q4KMatrix, bias: Option<&[f32]>, d: Dims, accumulate: bool) {
    let Dims { n, ic, oc } = d;
    assert!(w.rows == oc && w.cols == ic, "q4_K weight {}x{} for a {oc}x{ic} product", w.rows, w.cols);
    assert!(out.len() >= n * oc && inp.len() >= n * ic);
    assert!(bias.is_none_or(|b| b.len() == oc));
    if n == 0 {
        return;
    }
    QIN.with(|q| {
        let mut q = q.borrow_mut();
        q.fill(inp, n, ic);
        let x = &*q;
        let dst = Dest { out: SendPtr(out.as_mut_ptr()), bias, n, oc, accumulate };
        // whole groups of 4 rows per task, so that every 4-row tile is one group
        let cols = COLS.min(oc.div_ceil(rayon::current_num_threads()).next_multiple_of(GROUP));
        pool::for_each(oc.div_ceil(cols), |blk| {
            let (o0, o1) = (blk * cols, (blk * cols + cols).min(oc));
            run(&dst, w, x, o0, o1)
        });
    })
}

/// Output columns o0..o1 of every row.
fn run(dst: &Dest<'_>, w: &Q4KMatrix, x: &KRows, o0: usize, o1: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::q8::x86::vnni() {
            // SAFETY: AVX-512 F/BW/VL/DQ + VNNI + F16C checked at run time; sizes asserted by `linear_q4k`.
            unsafe { super::x86::block_vnni(dst, w, x, o0, o1) };
            return;
        }
        if crate::kernels::q8::x86::avx2() {
            // SAFETY: AVX2 + FMA + F16C checked at run time; sizes asserted by `linear_q4k`.
            unsafe { super::x86::block_avx2(dst, w, x, o0, o1) };
            return;
        }
    }
    portable(dst, w, x, o0, o1)
}

/// Σ over super-blocks of d · dx · Σ_j scale_j Σ q_w q_x − Σ_j (dmin · min_j)(dx · Σ q_x,j), for one (weight
/// row, input row): the reference loop.
pub(super) fn dot_portable(w: &Q4KMatrix, o: usize, x: &KRows, r: usize) -> f32 {
    let mut acc = 0f32;
    for s in 0..w.sbs {
        let (d, dmin, sc, m, qs) = w.block(o, s);
        let (dx, xs) = x.scales(r, s);
        let xq = x.qs(r, s);
        let mut isum = 0i32;
        for v in 0..QK_K {
            let (k, l) = (v / 64, v % 64);
            let q = if l < 32 { qs[32 * k + l] & 0xF } else { qs[32 * k + l - 32] >> 4 };
            isum += sc[v / 32] as i32 * q as i32 * xq[input_pos(v)] as i32;
        }
        acc += isum as f32 * (d * dx);
        for j in 0..8 {
            acc -= dmin * m[j] as f32 * xs[j];
        }
    }
    acc
}

pub(super) fn portable(dst: &Dest<'_>, w: &Q4KMatrix, x: &KRows, o0: usize, o1: usize) {
    for o in o0..o1 {
        for r in 0..x.n {
            dst.put(r, o, dot_portable(w, o, x, r));
        }
    }
}
