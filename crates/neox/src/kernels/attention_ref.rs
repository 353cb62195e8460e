//! The materialising attention that `attention_train.rs` replaced, kept as the plain reference for its tests and
//! timings: per (batch, head) the whole (T,T) score block is built with `gemm`, masked, softmaxed in float32 and
//! kept for the backward, which uses a second (T,T) scratch. Same visibility rule and zero output for a query
//! that sees no key as `attention_train.rs`; not used by the model.

use super::attention_train::{AttnShape, Visibility};
use super::matmul::{gemm, Mat};
use super::{math, SendPtr};
use gemm::Parallelism;
use rayon::prelude::*;

/// Query rows per causal block: keys beyond a block's last query are never computed.
const QB: usize = 64;

/// Forward. out (N,C) = merged heads of softmax(q kᵀ/√D + mask) v; att (B,H,T,T) = probabilities.
pub fn attention_fwd(out: &mut [f32], att: &mut [f32], qkv: &[f32], vis: Visibility<'_>, s: AttnShape) {
    let AttnShape { b, t, h, d } = s;
    let (c, row) = (h * d, 3 * h * d);
    assert!(out.len() >= b * t * c && att.len() >= b * h * t * t && qkv.len() >= b * t * row);
    assert!(vis.attention_mask.len() >= b * t && vis.doc_ids.is_none_or(|x| x.len() >= b * t));
    let scale = 1.0 / (d as f32).sqrt();
    let out_p = SendPtr(out.as_mut_ptr());
    att[..b * h * t * t].par_chunks_mut(t * t).enumerate().for_each(|(bh, p)| {
        let (bi, hi) = (bh / h, bh % h);
        let base = qkv[bi * t * row..].as_ptr();
        // SAFETY: all strided reads stay inside qkv rows of batch bi (sizes asserted above); p is this task's
        // own (T,T) block; the output block (rows of bi, columns of head hi) is written by this task only.
        unsafe {
            let q = base.add(hi * 3 * d);
            let k = q.add(d);
            let v = q.add(2 * d);
            // Causal blocks: queries [q0, q1) only ever see keys [0, q1), so only that part is computed.
            for q0 in (0..t).step_by(QB) {
                let q1 = (q0 + QB).min(t);
                let (qn, kl) = (q1 - q0, q1);
                // (Qn,D) x (D,Kl) -> scores rows q0..q1, columns 0..kl
                gemm(
                    Mat { ptr: p.as_mut_ptr().add(q0 * t), rows: qn, cols: kl, rs: t as isize, cs: 1 },
                    false,
                    Mat { ptr: q.add(q0 * row), rows: qn, cols: d, rs: row as isize, cs: 1 },
                    Mat { ptr: k, rows: d, cols: kl, rs: 1, cs: row as isize },
                    scale,
                    Parallelism::None,
                );
            }
            masked_softmax_rows(p, vis, bi * t, t);
            for q0 in (0..t).step_by(QB) {
                let q1 = (q0 + QB).min(t);
                let (qn, kl) = (q1 - q0, q1);
                // (Qn,Kl) x (Kl,D) -> (Qn,D) into out[bi, q0..q1, hi*D..]
                gemm(
                    Mat { ptr: out_p.get().add((bi * t + q0) * c + hi * d), rows: qn, cols: d, rs: c as isize, cs: 1 },
                    false,
                    Mat { ptr: p.as_ptr().add(q0 * t), rows: qn, cols: kl, rs: t as isize, cs: 1 },
                    Mat { ptr: v, rows: kl, cols: d, rs: row as isize, cs: 1 },
                    1.0,
                    Parallelism::None,
                );
            }
        }
    });
}

/// In-place masked softmax of a (T,T) score block; invisible entries become exactly 0.
fn masked_softmax_rows(p: &mut [f32], vis: Visibility<'_>, row0: usize, t: usize) {
    for i in 0..t {
        let s = &mut p[i * t..(i + 1) * t];
        let (head, tail) = s.split_at_mut(i + 1);
        tail.fill(0.0);
        for (j, x) in head.iter_mut().enumerate() {
            if !vis.visible(row0, i, j) {
                *x = f32::NEG_INFINITY;
            }
        }
        pulp::Arch::new().dispatch(|| {
            let mx = math::max(head);
            if mx == f32::NEG_INFINITY {
                head.fill(0.0);
                return;
            }
            let inv = 1.0 / math::exp_shift_sum(head, mx);
            head.iter_mut().for_each(|x| *x *= inv);
        });
    }
}

/// Backward. Given dout (N,C), att (B,H,T,T) and qkv, writes dqkv (N, H·3D) (overwrites) using datt as
/// (B,H,T,T) scratch.
pub fn attention_bwd(dqkv: &mut [f32], datt: &mut [f32], dout: &[f32], att: &[f32], qkv: &[f32], s: AttnShape) {
    let AttnShape { b, t, h, d } = s;
    let (c, row) = (h * d, 3 * h * d);
    assert!(dqkv.len() >= b * t * row && datt.len() >= b * h * t * t && att.len() >= b * h * t * t);
    assert!(dout.len() >= b * t * c && qkv.len() >= b * t * row);
    let scale = 1.0 / (d as f32).sqrt();
    let dqkv_p = SendPtr(dqkv.as_mut_ptr());
    datt[..b * h * t * t].par_chunks_mut(t * t).enumerate().for_each(|(bh, dp)| {
        let (bi, hi) = (bh / h, bh % h);
        let p = &att[bh * t * t..(bh + 1) * t * t];
        // SAFETY: reads stay inside the batch-bi rows of qkv/dout; writes go to the q,k,v columns of head hi in
        // the batch-bi rows of dqkv, which no other task touches; dp is this task's block.
        unsafe {
            let q = qkv.as_ptr().add(bi * t * row + hi * 3 * d);
            let k = q.add(d);
            let v = q.add(2 * d);
            let dq = dqkv_p.get().add(bi * t * row + hi * 3 * d);
            let dk = dq.add(d);
            let dv = dq.add(2 * d);
            let go = dout.as_ptr().add(bi * t * c + hi * d);
            // dK and dV accumulate over query blocks: start from zero.
            for i in 0..t {
                std::ptr::write_bytes(dk.add(i * row), 0, 2 * d);
            }
            for q0 in (0..t).step_by(QB) {
                let q1 = (q0 + QB).min(t);
                let (qn, kl) = (q1 - q0, q1);
                let pb = p.as_ptr().add(q0 * t);
                let db = dp.as_mut_ptr().add(q0 * t);
                // dP (Qn,Kl) = dO (Qn,D) · V[0:kl]ᵀ
                gemm(
                    Mat { ptr: db, rows: qn, cols: kl, rs: t as isize, cs: 1 },
                    false,
                    Mat { ptr: go.add(q0 * c), rows: qn, cols: d, rs: c as isize, cs: 1 },
                    Mat { ptr: v, rows: d, cols: kl, rs: 1, cs: row as isize },
                    1.0,
                    Parallelism::None,
                );
                // dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale, on columns 0..kl (P is 0 beyond the diagonal)
                pulp::Arch::new().dispatch(|| {
                    for i in 0..qn {
                        let pr = std::slice::from_raw_parts(pb.add(i * t), kl);
                        let dr = std::slice::from_raw_parts_mut(db.add(i * t), kl);
                        let dot = math::dot(pr, dr);
                        for (dd, &pv) in dr.iter_mut().zip(pr) {
                            *dd = pv * (*dd - dot) * scale;
                        }
                    }
                });
                // dV[0:kl] += P[q0:q1, 0:kl]ᵀ · dO[q0:q1]
                gemm(
                    Mat { ptr: dv, rows: kl, cols: d, rs: row as isize, cs: 1 },
                    true,
                    Mat { ptr: pb, rows: kl, cols: qn, rs: 1, cs: t as isize },
                    Mat { ptr: go.add(q0 * c), rows: qn, cols: d, rs: c as isize, cs: 1 },
                    1.0,
                    Parallelism::None,
                );
                // dQ[q0:q1] = dS · K[0:kl]
                gemm(
                    Mat { ptr: dq.add(q0 * row), rows: qn, cols: d, rs: row as isize, cs: 1 },
                    false,
                    Mat { ptr: db, rows: qn, cols: kl, rs: t as isize, cs: 1 },
                    Mat { ptr: k, rows: kl, cols: d, rs: row as isize, cs: 1 },
                    1.0,
                    Parallelism::None,
                );
                // dK[0:kl] += dSᵀ · Q[q0:q1]
                gemm(
                    Mat { ptr: dk, rows: kl, cols: d, rs: row as isize, cs: 1 },
                    true,
                    Mat { ptr: db, rows: kl, cols: qn, rs: 1, cs: t as isize },
                    Mat { ptr: q.add(q0 * row), rows: qn, cols: d, rs: row as isize, cs: 1 },
                    1.0,
                    Parallelism::None,
                );
            }
        }
    });
}
