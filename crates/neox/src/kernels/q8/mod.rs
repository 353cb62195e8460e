//! q8_0 weights (ggml's definition: blocks of 32 values, one f16 scale `d = amax / 127` and 32 int8 `q =
//! roundf(x / d)`, value = d · q) and their products with f32 activations.
//!
//! - The quantizer is ggml's reference `quantize_row_q8_0_ref`, bit for bit (the scale is rounded to f16 once
//!   and the values are divided by the unrounded f32 scale, as ggml does); GGUF stores the 34-byte blocks.
//! - In memory (`Q8Matrix`) a weight (OC, IC) is held structure-of-arrays: per row, the int8 values in chunks of
//!   64 (two blocks) and the f16 scales apart, 1.0625 bytes per weight as in the file. Inside a chunk the two
//!   blocks are interleaved four bytes at a time (block 0 bytes 0-3, block 1 bytes 0-3, block 0 bytes 4-7, ...),
//!   so a 32-bit lane of an int8 dot product sums four values of one block and the lanes alternate blocks:
//!   the per-block scales then apply as one vector `[d0, d1, d0, d1, ...]`, with no horizontal sum per block.
//! - Every product (decode steps and prompts alike) quantizes each input row once to the same blocks (f32 scale,
//!   same interleave) and takes exact int8 dot products per block — AVX512-VNNI `vpdpbusd` (64 products per
//!   instruction), or AVX2 `vpmaddubsw` + `vpmaddwd`, or a portable loop — then add `d_w · d_x · Σ q_w q_x` into
//!   f32 lanes, each weight chunk read once for all rows. Every output sums its chunks in the same order whatever
//!   the tile, so a row's result is bitwise the same alone or in a batch.
//! - Prompts take the same kernel: on a 512-token prompt at 410m it was 1.5x faster than widening blocks of
//!   weight rows to f32 for the f32 gemm (docs/benchmarks.md), and a prompt's rows then get the numerics of the
//!   decode steps.

#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use super::matmul::Dims;
use super::matvec_f32::Dest;
use super::{pool, SendPtr};
use half::f16;
use std::cell::RefCell;

/// Values per q8_0 block.
pub const QK: usize = 32;
/// Bytes of one q8_0 block in GGUF: f16 scale (little-endian) + 32 int8.
pub const BLOCK_BYTES: usize = 2 + QK;
/// Values per interleaved chunk (two blocks).
const CHUNK: usize = 2 * QK;

/// The byte position inside a chunk of element `j` (0..32) of block `b` (0 or 1).
#[inline(always)]
fn pos(b: usize, j: usize) -> usize {
    (j / 4) * 8 + b * 4 + j % 4
}

/// ggml's reference q8_0 quantization of one block: (f16 scale bits, f32 scale, values).
#[inline]
fn quantize_block(x: &[f32]) -> (u16, f32, [i8; QK]) {
    debug_assert_eq!(x.len(), QK);
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; QK];
    for (q, &v) in q.iter_mut().zip(x) {
        // roundf: half away from zero, as ggml; |v · id| <= 127 (plus rounding), so the cast does not clip
        *q = (v * id).round() as i8;
    }
    (f16::from_f32(d).to_bits(), d, q)
}

/// Appends the q8_0 blocks of `x` (a multiple of 32 values, all finite) in GGUF's layout: ggml's
/// `quantize_row_q8_0_ref`, bit for bit.
pub fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    assert!(x.len().is_multiple_of(QK), "q8_0 needs a multiple of {QK} values");
    out.reserve(x.len() / QK * BLOCK_BYTES);
    for blk in x.chunks_exact(QK) {
        let (d, _, q) = quantize_block(blk);
        out.extend_from_slice(&d.to_le_bytes());
        out.extend(q.iter().map(|&v| v as u8));
    }
}

/// The values of q8_0 blocks in GGUF's layout (`out.len()` values, 34 bytes per 32).
pub fn dequantize_q8_0(blocks: &[u8], out: &mut [f32]) {
    assert_eq!(blocks.len(), out.len() / QK * BLOCK_BYTES);
    for (b, o) in blocks.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        o.iter_mut().zip(&b[2..]).for_each(|(o, &q)| *o = d * (q as i8) as f32);
    }
}

/// One 64-byte cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub [u8; 64]);

/// Weight rows stored together (`Q8Matrix`): the rows a tile reads at once.
const GROUP: usize = 4;

/// A q8_0 weight (rows, cols) held for the kernels, in groups of 4 rows so that a tile streams memory front to
/// back: a group holds, per chunk, its 4 rows' 64 values (4 cache lines), then the 4 rows' f16 scales (2 ·
/// `chunks` per row, padded to whole lines). Rows past the end of the last group and a missing second block
/// of an odd tail are zeros with scale 0.
pub struct Q8Matrix {
    pub rows: usize,
    pub cols: usize,
    chunks: usize,
    /// Lines per group: 4 · `chunks` of values, then the scales.
    gstride: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Matrix({} x {})", self.rows, self.cols)
    }
}

/// Byte offsets inside one group of `chunks` chunks: the values of chunk `c` of its row `i`, the scale of block
/// `b` of that chunk.
#[inline(always)]
fn val_off(chunks: usize, i: usize, c: usize) -> usize {
    let _ = chunks;
    (c * GROUP + i) * CHUNK
}

#[inline(always)]
fn scale_off(chunks: usize, i: usize, c: usize, b: usize) -> usize {
    GROUP * chunks * CHUNK + (i * chunks + c) * 4 + b * 2
}

impl Q8Matrix {
    fn empty(rows: usize, cols: usize) -> Self {
        assert!(cols.is_multiple_of(QK) && cols > 0, "q8_0 rows must be a positive multiple of {QK}");
        let chunks = cols.div_ceil(CHUNK);
        let gstride = GROUP * chunks + (GROUP * chunks * 4).div_ceil(64);
        Q8Matrix { rows, cols, chunks, gstride, lines: vec![Line([0; 64]); rows.div_ceil(GROUP) * gstride] }
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

    /// Block `i` of row `r` (scale bits, values) stored in place.
    fn put(&mut self, r: usize, i: usize, d: u16, q: &[i8]) {
        let (chunks, g) = (self.chunks, self.group_off(r));
        put_block(&mut bytes_mut(&mut self.lines)[g..], chunks, r % GROUP, i, d, q);
    }

    /// Quantizes a row-major f32 weight (rows, cols) with ggml's reference quantizer (groups of rows in
    /// parallel). `cols` must be a multiple of 32 and every value finite (the caller checks and names the tensor).
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Self {
        use rayon::prelude::*;
        assert_eq!(w.len(), rows * cols);
        let mut m = Q8Matrix::empty(rows, cols);
        let (chunks, gstride) = (m.chunks, m.gstride);
        m.lines.par_chunks_mut(gstride).zip(w.par_chunks(GROUP * cols)).for_each(|(lines, rows)| {
            let bytes = bytes_mut(lines);
            for (i, row) in rows.chunks_exact(cols).enumerate() {
                for (k, blk) in row.chunks_exact(QK).enumerate() {
                    let (d, _, q) = quantize_block(blk);
                    put_block(bytes, chunks, i, k, d, &q);
                }
            }
        });
        m
    }

    /// A weight (rows, cols) from GGUF's q8_0 blocks (row-major, 34 bytes per 32 values). Any int8 value and
    /// any finite scale is accepted (ggml's own files may hold −128); a non-finite scale is refused.
    pub fn from_blocks(bytes: &[u8], rows: usize, cols: usize) -> Result<Self, String> {
        if !cols.is_multiple_of(QK) || cols == 0 {
            return Err(format!("q8_0 rows of {cols} values: not a positive multiple of {QK}"));
        }
        let want = rows * (cols / QK) * BLOCK_BYTES;
        if bytes.len() != want {
            return Err(format!("{} bytes of q8_0 data, {rows} x {cols} needs {want}", bytes.len()));
        }
        let mut m = Q8Matrix::empty(rows, cols);
        let per_row = cols / QK;
        let mut q = [0i8; QK];
        for (k, b) in bytes.chunks_exact(BLOCK_BYTES).enumerate() {
            let d = u16::from_le_bytes([b[0], b[1]]);
            if !f16::from_bits(d).is_finite() {
                return Err(format!("block {k} (row {}) has a non-finite scale", k / per_row));
            }
            q.iter_mut().zip(&b[2..]).for_each(|(q, &v)| *q = v as i8);
            m.put(k / per_row, k % per_row, d, &q);
        }
        Ok(m)
    }

    /// Scale bits of block `k` of row `r`, and the offset of its chunk's values.
    #[inline(always)]
    fn block_at(&self, r: usize, k: usize) -> (u16, usize) {
        let (c, b, g, i) = (k / 2, k % 2, self.group_off(r), r % GROUP);
        let at = g + scale_off(self.chunks, i, c, b);
        let bytes = self.all_bytes();
        (u16::from_le_bytes([bytes[at], bytes[at + 1]]), g + val_off(self.chunks, i, c))
    }

    /// The GGUF q8_0 blocks of rows `r0..r1`, appended to `out` (the inverse of `from_blocks`).
    pub fn write_blocks(&self, r0: usize, r1: usize, out: &mut Vec<u8>) {
        let bytes = self.all_bytes();
        for r in r0..r1 {
            for k in 0..self.cols / QK {
                let (d, v) = self.block_at(r, k);
                out.extend_from_slice(&d.to_le_bytes());
                out.extend((0..QK).map(|j| bytes[v + pos(k % 2, j)]));
            }
        }
    }

    /// Row `r` as f32 (d · q, exact).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols);
        let bytes = self.all_bytes();
        for (k, o) in out.chunks_exact_mut(QK).enumerate() {
            let (d, v) = self.block_at(r, k);
            let d = f16::from_bits(d).to_f32();
            for (j, o) in o.iter_mut().enumerate() {
                *o = d * (bytes[v + pos(k % 2, j)] as i8) as f32;
            }
        }
    }

    /// Values and scale bits of chunk `c` of row `r`.
    #[inline(always)]
    fn chunk(&self, r: usize, c: usize) -> (&[u8], [u16; 2]) {
        let (d0, v) = self.block_at(r, 2 * c);
        let (d1, _) = self.block_at(r, 2 * c + 1);
        (&self.all_bytes()[v..v + CHUNK], [d0, d1])
    }

    /// The 64 values of chunk `c` of row `r` (cache-line aligned).
    #[inline(always)]
    fn val_ptr(&self, r: usize, c: usize) -> *const u8 {
        debug_assert!(r < self.rows.div_ceil(GROUP) * GROUP && c < self.chunks);
        // SAFETY (of the callers' reads): the offset is inside `lines` for every r < rows, c < chunks.
        unsafe { (self.lines.as_ptr() as *const u8).add(self.group_off(r) + val_off(self.chunks, r % GROUP, c)) }
    }

    /// The two f16 scales of chunk `c` of row `r`.
    #[inline(always)]
    fn scale_ptr(&self, r: usize, c: usize) -> *const u16 {
        // SAFETY: as `val_ptr`.
        unsafe {
            (self.lines.as_ptr() as *const u8).add(self.group_off(r) + scale_off(self.chunks, r % GROUP, c, 0))
                as *const u16
        }
    }
}

pub(crate) fn bytes_mut(lines: &mut [Line]) -> &mut [u8] {
    // SAFETY: `Line` is 64 plain bytes (repr(C)); the slice covers exactly these lines.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, lines.len() * 64) }
}

/// Block `k` (scale bits `d`, values `q`) of row `i` of a group (the group's bytes) of `chunks` chunks.
fn put_block(group: &mut [u8], chunks: usize, i: usize, k: usize, d: u16, q: &[i8]) {
    let (c, b) = (k / 2, k % 2);
    let v = val_off(chunks, i, c);
    for (j, &x) in q.iter().enumerate() {
        group[v + pos(b, j)] = x as u8;
    }
    let at = scale_off(chunks, i, c, b);
    group[at..at + 2].copy_from_slice(&d.to_le_bytes());
}

/// Input rows quantized for one product: the same blocks and interleave as `Q8Matrix`, f32 scales.
struct QRows {
    n: usize,
    chunks: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
}

thread_local! {
    /// The quantized input rows, reused across products (a decode step makes ~100 of them).
    static QIN: RefCell<QRows> = const { RefCell::new(QRows { n: 0, chunks: 0, qs: Vec::new(), d: Vec::new() }) };
}

impl QRows {
    /// Quantizes `n` rows of `ic` values (`ic` a multiple of 32) in place of the previous contents.
    fn fill(&mut self, inp: &[f32], n: usize, ic: usize) {
        let chunks = ic.div_ceil(CHUNK);
        self.n = n;
        self.chunks = chunks;
        self.qs.clear();
        self.qs.resize(n * chunks * CHUNK, 0);
        self.d.clear();
        self.d.resize(n * chunks * 2, 0.0);
        for r in 0..n {
            for (i, blk) in inp[r * ic..(r + 1) * ic].chunks_exact(QK).enumerate() {
                let (_, d, q) = quantize_block(blk);
                let (c, b) = (i / 2, i % 2);
                let base = (r * chunks + c) * CHUNK;
                for (j, &v) in q.iter().enumerate() {
                    self.qs[base + pos(b, j)] = v;
                }
                self.d[(r * chunks + c) * 2 + b] = d;
            }
        }
    }

    #[inline(always)]
    fn chunk(&self, r: usize, c: usize) -> (&[i8], &[f32]) {
        let at = r * self.chunks + c;
        (&self.qs[at * CHUNK..(at + 1) * CHUNK], &self.d[at * 2..at * 2 + 2])
    }
}

/// Most weight rows per parallel task (256 KiB of q8_0 at IC 1024), fewer when that would leave a thread
/// without a task.
const COLS: usize = 256;

/// Which int8 dot product the few-row kernel uses on this CPU: "avx512vnni", "avx2" or "portable".
pub fn path_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::vnni() {
            return "avx512vnni";
        }
        if x86::avx2() {
            return "avx2";
        }
    }
    "portable"
}

/// out (N, OC) = inp (N, IC) · Wᵀ + bias (or `+=` when `accumulate`) for a q8_0 weight W (OC, IC).
pub fn linear_q8(out: &mut [f32], inp: &[f32], w: &Q8Matrix, bias: Option<&[f32]>, d: Dims, accumulate: bool) {
    let Dims { n, ic, oc } = d;
    assert!(w.rows == oc && w.cols == ic, "q8_0 weight {}x{} for a {oc}x{ic} product", w.rows, w.cols);
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
        let cols = COLS.min(oc.div_ceil(rayon::current_num_threads()));
        pool::for_each(oc.div_ceil(cols), |blk| {
            let (o0, o1) = (blk * cols, (blk * cols + cols).min(oc));
            run(&dst, w, x, o0, o1)
        });
    })
}

/// Output columns o0..o1 of every row.
fn run(dst: &Dest<'_>, w: &Q8Matrix, x: &QRows, o0: usize, o1: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::vnni() {
            // SAFETY: AVX-512 F/BW/VL/DQ + VNNI + F16C checked at run time; sizes asserted by `linear_q8`.
            unsafe { x86::block_vnni(dst, w, x, o0, o1) };
            return;
        }
        if x86::avx2() {
            // SAFETY: AVX2 + FMA + F16C checked at run time; sizes asserted by `linear_q8`.
            unsafe { x86::block_avx2(dst, w, x, o0, o1) };
            return;
        }
    }
    portable(dst, w, x, o0, o1)
}

/// Σ over chunks of d_w · d_x · (Σ q_w q_x) per block, for one (weight row, input row): the reference loop.
fn dot_portable(w: &Q8Matrix, o: usize, x: &QRows, r: usize) -> f32 {
    let mut acc = 0f32;
    for c in 0..w.chunks {
        let ((wq, wd), (xq, xd)) = (w.chunk(o, c), x.chunk(r, c));
        let mut s = [0i32; 2];
        for (g, (a, b)) in wq.chunks_exact(4).zip(xq.chunks_exact(4)).enumerate() {
            s[g % 2] += a.iter().zip(b).map(|(&a, &b)| a as i8 as i32 * b as i32).sum::<i32>();
        }
        for b in 0..2 {
            acc += s[b] as f32 * (f16::from_bits(wd[b]).to_f32() * xd[b]);
        }
    }
    acc
}

fn portable(dst: &Dest<'_>, w: &Q8Matrix, x: &QRows, o0: usize, o1: usize) {
    for o in o0..o1 {
        for r in 0..x.n {
            dst.put(r, o, dot_portable(w, o, x, r));
        }
    }
}
