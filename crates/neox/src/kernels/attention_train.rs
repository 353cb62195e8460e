//! Causal multi-head attention for training, in blocks with an online softmax (FlashAttention-2): per (batch,
//! head) queries go in blocks of `BLK` against key blocks of `BLK`, with a running max, running sum and rescaled
//! output accumulator, so no (T,T) matrix exists. The forward keeps each query's log-sum-exp; the backward
//! recomputes the probabilities from it. Key blocks the mask hides entirely are skipped (causal, padding, other
//! documents of a packed row), so a packed row costs what its documents cost. Visibility of key j from query i
//! in row b: `j <= i && attention_mask[b,j] != 0 && doc[b,j] == doc[b,i]`. A query that sees no key gets a zero
//! output and zero gradients. Softmax in float32, scale 1/√D. Tile products go to `gemm`, one thread each.
//! Deterministic: fixed block order, every reduction on one thread. Letters: B batch, T time, H heads, D head
//! dim, C = H·D, N = B·T; the fused qkv buffer has rows of `(H, 3D)` (HF interleaves q,k,v per head). Score
//! tiles are key-major (Sᵀ): the per-query softmax steps vectorise along a key row. The materialising version is
//! `attention_ref` (tests only).

use super::matmul::{gemm, Mat};
use super::{math, SendPtr};
use gemm::Parallelism;
use rayon::prelude::*;

/// Queries per query block and keys per key block.
const BLK: usize = 64;

/// Which keys each query may see.
#[derive(Clone, Copy)]
pub struct Visibility<'a> {
    /// (B,T): 0 = padding.
    pub attention_mask: &'a [u8],
    /// (B,T): document index per token for packed rows; None = one document per row.
    pub doc_ids: Option<&'a [u32]>,
}

impl Visibility<'_> {
    /// Whether query i sees key j, both in the row starting at token row0.
    #[inline(always)]
    #[cfg(test)]
    pub(crate) fn visible(&self, row0: usize, i: usize, j: usize) -> bool {
        j <= i && self.attention_mask[row0 + j] != 0 && self.doc_ids.is_none_or(|d| d[row0 + j] == d[row0 + i])
    }
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub d: usize,
}

impl AttnShape {
    fn check(&self, vis: Visibility<'_>, qkv: &[f32]) {
        let n = self.b * self.t;
        assert!(qkv.len() >= n * 3 * self.h * self.d, "qkv shorter than {self:?}");
        assert!(
            vis.attention_mask.len() >= n && vis.doc_ids.is_none_or(|x| x.len() >= n),
            "mask shorter than {self:?}"
        );
    }
}

/// What one block of B·T tokens holds, for skipping (query block, key block) pairs in O(1).
#[derive(Clone, Copy)]
struct Block {
    /// Some key is not padding / every key is.
    any_key: bool,
    all_keys: bool,
    /// Document ids over the non-padding keys (u32::MAX, 0 when none).
    kmin: u32,
    kmax: u32,
    /// Document ids over all tokens (as queries; a padding query still sees keys).
    qmin: u32,
    qmax: u32,
}

/// (B, T/BLK) block summaries.
fn summaries(vis: Visibility<'_>, b: usize, t: usize) -> Vec<Block> {
    let nb = t.div_ceil(BLK);
    let mut out = Vec::with_capacity(b * nb);
    for bi in 0..b {
        for kb in 0..nb {
            let mut s = Block { any_key: false, all_keys: true, kmin: u32::MAX, kmax: 0, qmin: u32::MAX, qmax: 0 };
            for j in bi * t + kb * BLK..bi * t + ((kb + 1) * BLK).min(t) {
                let doc = vis.doc_ids.map_or(0, |d| d[j]);
                (s.qmin, s.qmax) = (s.qmin.min(doc), s.qmax.max(doc));
                if vis.attention_mask[j] != 0 {
                    s.any_key = true;
                    (s.kmin, s.kmax) = (s.kmin.min(doc), s.kmax.max(doc));
                } else {
                    s.all_keys = false;
                }
            }
            out.push(s);
        }
    }
    out
}

/// How a (query block, key block) tile is masked.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Tile {
    /// No query of the block sees any key of the block.
    Skip,
    /// Every query sees every key.
    Full,
    /// One document, no padding: only the causal cut.
    Causal,
    /// Element-wise visibility.
    Masked,
}

/// The tile kind of query block `qb` against key block `kb`; `blocks` are row b's summaries.
fn tile(blocks: &[Block], qb: usize, kb: usize, t: usize) -> Tile {
    let (q0, q1) = (qb * BLK, ((qb + 1) * BLK).min(t));
    let (k0, k1) = (kb * BLK, ((kb + 1) * BLK).min(t));
    let (q, k) = (&blocks[qb], &blocks[kb]);
    if k0 >= q1 || !k.any_key || k.kmax < q.qmin || k.kmin > q.qmax {
        Tile::Skip
    } else if !(k.all_keys && q.qmin == q.qmax && k.kmin == k.kmax && q.qmin == k.kmin) {
        Tile::Masked
    } else if k1 <= q0 + 1 {
        Tile::Full
    } else {
        Tile::Causal
    }
}

/// A tile's queries q0..q0+qn and keys k0..k0+kn.
#[derive(Clone, Copy)]
struct Span {
    q0: usize,
    qn: usize,
    k0: usize,
    kn: usize,
}

/// Sets the invisible scores of a key-major (kn, qn) tile (row stride BLK: row j is key k0 + j, column i query
/// q0 + i) to -inf.
fn mask_tile(st: &mut [f32], kind: Tile, vis: Visibility<'_>, row0: usize, span: Span) {
    let Span { q0, qn, k0, kn } = span;
    match kind {
        Tile::Skip | Tile::Full => {}
        Tile::Causal => {
            for j in 0..kn {
                let blind = (k0 + j).saturating_sub(q0).min(qn);
                st[j * BLK..j * BLK + blind].fill(f32::NEG_INFINITY);
            }
        }
        Tile::Masked => {
            // `visible` per element, one key row at a time: padding key, causal cut, then doc ids (vectorises)
            for j in 0..kn {
                let (kj, r) = (row0 + k0 + j, &mut st[j * BLK..j * BLK + qn]);
                if vis.attention_mask[kj] == 0 {
                    r.fill(f32::NEG_INFINITY);
                    continue;
                }
                let blind = (k0 + j).saturating_sub(q0).min(qn);
                r[..blind].fill(f32::NEG_INFINITY);
                if let Some(doc) = vis.doc_ids {
                    let qd = &doc[row0 + q0 + blind..row0 + q0 + qn];
                    for (x, &d) in r[blind..].iter_mut().zip(qd) {
                        *x = if d == doc[kj] { *x } else { f32::NEG_INFINITY };
                    }
                }
            }
        }
    }
}

/// c = [c +] a · b through `gemm` on this thread (a hand-written register tile was no faster at 64 x 64 x 64).
///
/// # Safety
/// As `matmul::gemm`: every element the views reach valid, `c` disjoint from `a` and `b` and from other threads.
unsafe fn mm(c: Mat<*mut f32>, acc: bool, a: Mat<*const f32>, b: Mat<*const f32>) {
    gemm(c, acc, a, b, 1.0, Parallelism::None);
}

/// `qt` (D, BLK) = Qᵀ·scale of the qn rows at `q` (row stride `row`).
///
/// # Safety
/// `q` valid for qn rows of D.
unsafe fn transpose_in(qt: &mut [f32], q: *const f32, row: usize, qn: usize, d: usize, scale: f32) {
    for i in 0..qn {
        let r = std::slice::from_raw_parts(q.add(i * row), d);
        for (dd, &x) in r.iter().enumerate() {
            qt[dd * BLK + i] = x * scale;
        }
    }
}

/// `dst` (n, D) contiguous = the n rows of D at `src` (row stride `row`). K and V are packed once per task and
/// read by every product on their blocks: rows 3C floats apart map onto few cache sets and thrash L1.
///
/// # Safety
/// `src` valid for n rows of D.
unsafe fn pack(dst: &mut [f32], src: *const f32, row: usize, n: usize, d: usize) {
    for (i, r) in dst[..n * d].chunks_exact_mut(d).enumerate() {
        r.copy_from_slice(std::slice::from_raw_parts(src.add(i * row), d));
    }
}

/// The `n` rows of `src` (D contiguous) into rows of stride `row` at `dst`.
///
/// # Safety
/// `dst` valid for n rows of D, written by this caller only.
unsafe fn unpack(dst: *mut f32, row: usize, src: &[f32], n: usize, d: usize) {
    for (i, r) in src[..n * d].chunks_exact(d).enumerate() {
        std::ptr::copy_nonoverlapping(r.as_ptr(), dst.add(i * row), d);
    }
}

/// Per-task forward scratch: the head's K and V packed, one query block's Qᵀ, one score tile, the running state.
struct FwdScratch {
    kc: Vec<f32>,  // (T, D) K
    vc: Vec<f32>,  // (T, D) V
    qt: Vec<f32>,  // (D, BLK) Qᵀ/√D
    st: Vec<f32>,  // (BLK, BLK) key-major scores Sᵀ, then probabilities
    acc: Vec<f32>, // (BLK, D) unnormalised output
    m: [f32; BLK], // running max per query
    l: [f32; BLK], // running sum of exp(score − m)
}

/// Forward. out (N,C) = merged heads of softmax(q kᵀ/√D + mask) v; lse (B,H,T) = log-sum-exp of each query's
/// scaled visible scores (-inf if it sees none). Every element of out[..N·C] and lse[..B·H·T] is written.
/// Elements the forward keeps for the backward: the log-sum-exp of each (batch, head, query).
pub fn saved_len(s: AttnShape) -> usize {
    s.b * s.h * s.t
}

pub fn attention_fwd(out: &mut [f32], lse: &mut [f32], qkv: &[f32], vis: Visibility<'_>, s: AttnShape) {
    let AttnShape { b, t, h, d } = s;
    s.check(vis, qkv);
    assert!(out.len() >= b * t * h * d && lse.len() >= b * h * t, "out/lse shorter than {s:?}");
    if b * h * t == 0 {
        return;
    }
    let blocks = summaries(vis, b, t);
    let nb = t.div_ceil(BLK);
    // Tasks (b, h, run of query blocks): one run per head unless that leaves under 4 tasks per thread.
    let runs = (4 * rayon::current_num_threads()).div_ceil(b * h).clamp(1, nb.max(1));
    let (out_p, lse_p) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    let init = || FwdScratch {
        kc: vec![0.0; t * d],
        vc: vec![0.0; t * d],
        qt: vec![0.0; d * BLK],
        st: vec![0.0; BLK * BLK],
        acc: vec![0.0; BLK * d],
        m: [0.0; BLK],
        l: [0.0; BLK],
    };
    (0..b * h * runs).into_par_iter().for_each_init(init, |sc, idx| {
        let (bh, run) = (idx / runs, idx % runs);
        let (bi, hi, row) = (bh / h, bh % h, 3 * h * d);
        let (qb0, qb1) = (run * nb / runs, (run + 1) * nb / runs);
        // SAFETY: reads stay inside the batch-bi rows of qkv (sizes checked above); this task alone writes the
        // rows of query blocks qb0..qb1 of batch bi in head hi's columns of out, and their lse[bh, ..].
        unsafe {
            let q = qkv.as_ptr().add(bi * t * row + hi * 3 * d);
            let kn = (qb1 * BLK).min(t);
            pack(&mut sc.kc, q.add(d), row, kn, d);
            pack(&mut sc.vc, q.add(2 * d), row, kn, d);
            for qb in qb0..qb1 {
                let (q0, qn) = (qb * BLK, (t - qb * BLK).min(BLK));
                let o = out_p.get().add((bi * t + q0) * h * d + hi * d);
                let l = std::slice::from_raw_parts_mut(lse_p.get().add(bh * t + q0), qn);
                fwd_block(sc, o, l, q, FwdCall { vis, blocks: &blocks[bi * nb..(bi + 1) * nb], s }, bi, qb);
            }
        }
    });
}

/// What every query block of a forward call shares: visibility, the row's block summaries, the shape.
#[derive(Clone, Copy)]
struct FwdCall<'a> {
    vis: Visibility<'a>,
    blocks: &'a [Block],
    s: AttnShape,
}

/// One query block of one (b, h): online softmax over its visible key blocks, then out rows `o` and their lse.
///
/// # Safety
/// `q` must point at this head's q column in batch b's first qkv row; `o` must be valid for qn rows of stride C
/// and D columns, written by this caller only.
unsafe fn fwd_block(
    sc: &mut FwdScratch,
    o: *mut f32,
    lse: &mut [f32],
    q: *const f32,
    call: FwdCall<'_>,
    bi: usize,
    qb: usize,
) {
    let FwdCall { vis, blocks, s } = call;
    let AttnShape { t, h, d, .. } = s;
    let (row, c) = (3 * h * d, h * d);
    let (q0, qn) = (qb * BLK, lse.len());
    let FwdScratch { kc, vc, qt, st, acc, m, l } = sc;
    transpose_in(qt, q.add(q0 * row), row, qn, d, 1.0 / (d as f32).sqrt());
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    acc[..qn * d].fill(0.0);
    for kb in 0..=qb {
        let kind = tile(blocks, qb, kb, t);
        if kind == Tile::Skip {
            continue;
        }
        let (k0, kn) = (kb * BLK, (t - kb * BLK).min(BLK));
        // Sᵀ (Kn,Qn) = K[k0..] · Qᵀ/√D
        mm(
            Mat::rm(st.as_mut_ptr(), kn, qn, BLK),
            false,
            Mat::rm(kc.as_ptr().add(k0 * d), kn, d, d),
            Mat::rm(qt.as_ptr(), d, qn, BLK),
        );
        mask_tile(st, kind, vis, bi * t, Span { q0, qn, k0, kn });
        pulp::Arch::new().dispatch(|| online_softmax(st, m, l, acc, qn, kn, d));
        // acc (Qn,D) += P (Qn,Kn) · V[k0..]; P is the tile read with swapped strides
        mm(
            Mat::rm(acc.as_mut_ptr(), qn, d, d),
            true,
            Mat::cm(st.as_ptr(), qn, kn, BLK),
            Mat::rm(vc.as_ptr().add(k0 * d), kn, d, d),
        );
    }
    for i in 0..qn {
        let orow = std::slice::from_raw_parts_mut(o.add(i * c), d);
        if l[i] > 0.0 {
            let inv = 1.0 / l[i];
            orow.iter_mut().zip(&acc[i * d..(i + 1) * d]).for_each(|(y, a)| *y = a * inv);
            lse[i] = m[i] + l[i].ln();
        } else {
            orow.fill(0.0);
            lse[i] = f32::NEG_INFINITY;
        }
    }
}

/// One key block's step of the online softmax, per query (column) of the key-major tile `st`: new running max,
/// st = exp(st − max), running sum and the accumulator's rows rescaled by exp(old max − new max).
#[inline(always)]
fn online_softmax(st: &mut [f32], m: &mut [f32], l: &mut [f32], acc: &mut [f32], qn: usize, kn: usize, d: usize) {
    let mut mx = [f32::NEG_INFINITY; BLK];
    for j in 0..kn {
        for (x, &s) in mx[..qn].iter_mut().zip(&st[j * BLK..j * BLK + qn]) {
            *x = if s > *x { s } else { *x };
        }
    }
    // `mu`, the max used as the shift: 0 for a query that has seen nothing (its exps are exp(-inf) = 0)
    let (mut mu, mut alpha) = ([0f32; BLK], [1f32; BLK]);
    for i in 0..qn {
        let new = m[i].max(mx[i]);
        mu[i] = if new == f32::NEG_INFINITY { 0.0 } else { new };
        alpha[i] = math::exp(m[i] - mu[i]);
        m[i] = new;
    }
    let mut sum = [0f32; BLK];
    for j in 0..kn {
        let r = &mut st[j * BLK..j * BLK + qn];
        for ((p, &u), s) in r.iter_mut().zip(&mu[..qn]).zip(&mut sum[..qn]) {
            *p = math::exp(*p - u);
            *s += *p;
        }
    }
    for i in 0..qn {
        l[i] = l[i] * alpha[i] + sum[i];
        if alpha[i] != 1.0 {
            acc[i * d..(i + 1) * d].iter_mut().for_each(|x| *x *= alpha[i]);
        }
    }
}

/// Backward. dqkv (N,3C) is overwritten with the gradients of q, k, v (after rotary) from dout (N,C), the
/// forward's out (N,C) and lse (B,H,T), and qkv. Every element of dqkv[..N·3C] is written.
pub fn attention_bwd(
    dqkv: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    qkv: &[f32],
    vis: Visibility<'_>,
    s: AttnShape,
) {
    let AttnShape { b, t, h, d } = s;
    s.check(vis, qkv);
    let n = b * t;
    assert!(dqkv.len() >= n * 3 * h * d, "dqkv shorter than {s:?}");
    assert!(dout.len() >= n * h * d && out.len() >= n * h * d && lse.len() >= b * h * t, "dout/out/lse: {s:?}");
    if b * h * t == 0 {
        return;
    }
    let blocks = summaries(vis, b, t);
    let nb = t.div_ceil(BLK);
    let dqkv_p = SendPtr(dqkv.as_mut_ptr());
    let (tile_d, head) = (|| vec![0f32; BLK * d], || vec![0f32; t * d]);
    let init = || BwdScratch {
        kc: head(),
        vc: head(),
        dk: head(),
        dv: head(),
        qc: tile_d(),
        goc: tile_d(),
        dq: tile_d(),
        qt: tile_d(),
        got: tile_d(),
        pt: vec![0.0; BLK * BLK],
        dst: vec![0.0; BLK * BLK],
        di: [0.0; BLK],
        lu: [0.0; BLK],
    };
    (0..b * h).into_par_iter().for_each_init(init, |sc, bh| {
        let bi = bh / h;
        // SAFETY: reads stay inside batch bi's rows of the inputs (sizes checked above); this task alone
        // writes the q, k, v columns of head bh % h in batch bi's rows of dqkv.
        unsafe {
            let g = dqkv_p.get().add(bi * t * 3 * h * d + (bh % h) * 3 * d);
            let x = BwdCtx { dout, out, lse: &lse[bh * t..(bh + 1) * t], qkv, vis, s, bh };
            bwd_head(&x, sc, g, &blocks[bi * nb..(bi + 1) * nb]);
        }
    });
}

/// The read-only inputs of one (b, h) backward task.
struct BwdCtx<'a> {
    dout: &'a [f32],
    out: &'a [f32],
    lse: &'a [f32], // (T) of this (b, h)
    qkv: &'a [f32],
    vis: Visibility<'a>,
    s: AttnShape,
    bh: usize,
}

/// Per-task backward scratch: the head's K, V and their gradients packed, and one query block's operands.
struct BwdScratch {
    kc: Vec<f32>,   // (T, D) K
    vc: Vec<f32>,   // (T, D) V
    dk: Vec<f32>,   // (T, D) dK accumulator
    dv: Vec<f32>,   // (T, D) dV accumulator
    qc: Vec<f32>,   // (BLK, D) Q of the query block
    goc: Vec<f32>,  // (BLK, D) dO of the query block
    dq: Vec<f32>,   // (BLK, D) dQ accumulator of the query block
    qt: Vec<f32>,   // (D, BLK) Qᵀ/√D
    got: Vec<f32>,  // (D, BLK) dOᵀ
    pt: Vec<f32>,   // (BLK, BLK) key-major Sᵀ, then Pᵀ
    dst: Vec<f32>,  // (BLK, BLK) key-major dPᵀ, then dSᵀ
    di: [f32; BLK], // rowsum(dO ∘ O) per query
    lu: [f32; BLK], // lse per query, +inf for a query that sees nothing (its P is exp(−inf) = 0)
}

/// Backward of one (b, h): query blocks outer, key blocks inner; dQ per query block and dK, dV per head
/// accumulate in scratch and are written to `g` when complete.
///
/// # Safety
/// `g` must point at this head's q column in batch b's first dqkv row, valid for T rows of stride 3C and 3D
/// columns, and written by this caller only.
unsafe fn bwd_head(x: &BwdCtx<'_>, sc: &mut BwdScratch, g: *mut f32, blocks: &[Block]) {
    let AttnShape { t, h, d, .. } = x.s;
    let (bi, hi, row, c) = (x.bh / h, x.bh % h, 3 * h * d, h * d);
    let scale = 1.0 / (d as f32).sqrt();
    let q = x.qkv.as_ptr().add(bi * t * row + hi * 3 * d);
    let go = x.dout.as_ptr().add(bi * t * c + hi * d);
    let BwdScratch { kc, vc, dk, dv, qc, goc, dq, qt, got, pt, dst, di, lu } = sc;
    pack(kc, q.add(d), row, t, d);
    pack(vc, q.add(2 * d), row, t, d);
    dk[..t * d].fill(0.0);
    dv[..t * d].fill(0.0);
    for qb in 0..t.div_ceil(BLK) {
        let (q0, qn) = (qb * BLK, (t - qb * BLK).min(BLK));
        pack(qc, q.add(q0 * row), row, qn, d);
        pack(goc, go.add(q0 * c), c, qn, d);
        transpose_in(qt, q.add(q0 * row), row, qn, d, scale);
        transpose_in(got, go.add(q0 * c), c, qn, d, 1.0);
        dq[..qn * d].fill(0.0);
        pulp::Arch::new().dispatch(|| {
            for i in 0..qn {
                let at = (bi * t + q0 + i) * c + hi * d;
                di[i] = math::dot(&x.dout[at..at + d], &x.out[at..at + d]);
                let m = x.lse[q0 + i];
                lu[i] = if m == f32::NEG_INFINITY { f32::INFINITY } else { m };
            }
        });
        for kb in 0..=qb {
            let kind = tile(blocks, qb, kb, t);
            if kind == Tile::Skip {
                continue;
            }
            let (k0, kn) = (kb * BLK, (t - kb * BLK).min(BLK));
            let (kk, vk) = (kc.as_ptr().add(k0 * d), vc.as_ptr().add(k0 * d));
            // Pᵀ (Kn,Qn) = exp(K[k0..] · Qᵀ/√D − lse), 0 where invisible;  dPᵀ (Kn,Qn) = V[k0..] · dOᵀ
            mm(Mat::rm(pt.as_mut_ptr(), kn, qn, BLK), false, Mat::rm(kk, kn, d, d), Mat::rm(qt.as_ptr(), d, qn, BLK));
            mask_tile(pt, kind, x.vis, bi * t, Span { q0, qn, k0, kn });
            mm(Mat::rm(dst.as_mut_ptr(), kn, qn, BLK), false, Mat::rm(vk, kn, d, d), Mat::rm(got.as_ptr(), d, qn, BLK));
            // dSᵀ = Pᵀ ∘ (dPᵀ − Di) / √D
            pulp::Arch::new().dispatch(|| {
                for j in 0..kn {
                    let (pr, dr) = (&mut pt[j * BLK..j * BLK + qn], &mut dst[j * BLK..j * BLK + qn]);
                    for (((p, g), &l), &dd) in pr.iter_mut().zip(dr).zip(&lu[..qn]).zip(&di[..qn]) {
                        *p = math::exp(*p - l);
                        *g = *p * (*g - dd) * scale;
                    }
                }
            });
            // dV[k0..] (Kn,D) += Pᵀ · dO[q0..];  dK[k0..] += dSᵀ · Q[q0..];  dQ[q0..] (Qn,D) += dS · K[k0..]
            mm(
                Mat::rm(dv.as_mut_ptr().add(k0 * d), kn, d, d),
                true,
                Mat::rm(pt.as_ptr(), kn, qn, BLK),
                Mat::rm(goc.as_ptr(), qn, d, d),
            );
            mm(
                Mat::rm(dk.as_mut_ptr().add(k0 * d), kn, d, d),
                true,
                Mat::rm(dst.as_ptr(), kn, qn, BLK),
                Mat::rm(qc.as_ptr(), qn, d, d),
            );
            mm(Mat::rm(dq.as_mut_ptr(), qn, d, d), true, Mat::cm(dst.as_ptr(), qn, kn, BLK), Mat::rm(kk, kn, d, d));
        }
        unpack(g.add(q0 * row), row, dq, qn, d);
    }
    unpack(g.add(d), row, dk, t, d);
    unpack(g.add(2 * d), row, dv, t, d);
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
