//! The CPU KV cache: keys (L, B, H, S/KB, D, KB), transposed in blocks of `KB` slots, so a query's scores over a
//! block are a vector loop over registers and a row's keys are read front to back (one D x S transpose read 64
//! short runs S apart per head, which hardware prefetch could not follow); values (L, B, H, S, D). S = `slots`.
//! bf16 (bits in `u16`) halves the cache's memory traffic when decoding in bf16.

use crate::backend::KvShape;
use crate::kernels::attention_decode::{block_scores, prefetch_start, weighted_values, KB};
use crate::kernels::math::{self, Weight};
use crate::kernels::{pool, SendPtr};
use std::cell::RefCell;

/// Slots per key block.
pub(crate) const BLOCK: usize = KB;

enum Store {
    F32 { k: Vec<f32>, v: Vec<f32> },
    Bf16 { k: Vec<u16>, v: Vec<u16> },
}

/// Keys and values of every layer, row and head.
pub struct CpuKv {
    shape: KvShape,
    store: Store,
}

impl CpuKv {
    pub(crate) fn new(shape: KvShape, bf16: bool) -> Self {
        let per = shape.layers * shape.batch * shape.h * shape.d * shape.slots;
        let store = if bf16 {
            Store::Bf16 { k: vec![0; per], v: vec![0; per] }
        } else {
            Store::F32 { k: vec![0.0; per], v: vec![0.0; per] }
        };
        CpuKv { shape, store }
    }

    pub(crate) fn elem_bytes(&self) -> usize {
        match self.store {
            Store::F32 { .. } => 4,
            Store::Bf16 { .. } => 2,
        }
    }

    /// Touch every page: the cache is allocated zeroed and the OS maps its pages on first write, so otherwise the
    /// first batch to reach each row pays the page faults.
    pub(crate) fn commit(&mut self) {
        fn touch<T: Copy + Default>(x: &mut [T]) {
            let step = (4096 / size_of::<T>()).max(1);
            for i in (0..x.len()).step_by(step) {
                // SAFETY: i < x.len(); a volatile write so the store (which faults the page in) is kept.
                unsafe { std::ptr::write_volatile(x.as_mut_ptr().add(i), T::default()) }
            }
        }
        match &mut self.store {
            Store::F32 { k, v } => {
                touch(k);
                touch(v);
            }
            Store::Bf16 { k, v } => {
                touch(k);
                touch(v);
            }
        }
    }

    /// Batch row `dst` of every layer and head = row `src`'s slots 0..len (keys in whole blocks of `KB` slots).
    pub(crate) fn copy_row(&mut self, src: usize, dst: usize, len: usize) {
        let KvShape { layers, batch, slots, h, d } = self.shape;
        if src == dst || src >= batch || dst >= batch {
            return;
        }
        let len = len.min(slots);
        let (nk, nv) = (len.next_multiple_of(KB).min(slots) * d, len * d);
        fn copy<T: Copy>(x: &mut [T], from: usize, to: usize, n: usize) {
            x.copy_within(from..from + n, to);
        }
        for l in 0..layers {
            for hh in 0..h {
                let head = |b: usize| ((l * batch + b) * h + hh) * slots * d;
                let (s0, d0) = (head(src), head(dst));
                match &mut self.store {
                    Store::F32 { k, v } => {
                        copy(k, s0, d0, nk);
                        copy(v, s0, d0, nv);
                    }
                    Store::Bf16 { k, v } => {
                        copy(k, s0, d0, nk);
                        copy(v, s0, d0, nv);
                    }
                }
            }
        }
    }

    /// Store k, v of `layer` from qkv (n, H·3D) row j into (batch row, slot) `at[j]`.
    pub(crate) fn append(&mut self, layer: usize, qkv: &[f32], at: &[(u32, u32)]) {
        let KvShape { batch, slots, h, d, .. } = self.shape;
        let c = h * d;
        let lbase = layer * batch * h * slots * d;
        for (j, &(b, slot)) in at.iter().enumerate() {
            let src = &qkv[j * 3 * c..(j + 1) * 3 * c];
            let slot = slot as usize;
            for hh in 0..h {
                let head = lbase + (b as usize * h + hh) * slots * d;
                let (ks, vs) = (&src[hh * 3 * d + d..hh * 3 * d + 2 * d], &src[hh * 3 * d + 2 * d..hh * 3 * d + 3 * d]);
                let dst = head + slot * d;
                let kslot = head + slot / KB * d * KB + slot % KB;
                match &mut self.store {
                    Store::F32 { k, v } => {
                        for (dd, &x) in ks.iter().enumerate() {
                            k[kslot + dd * KB] = x;
                        }
                        v[dst..dst + d].copy_from_slice(vs);
                    }
                    Store::Bf16 { k, v } => {
                        let bits = |x: f32| half::bf16::from_f32(x).to_bits();
                        for (dd, &x) in ks.iter().enumerate() {
                            k[kslot + dd * KB] = bits(x);
                        }
                        v[dst..dst + d].iter_mut().zip(vs).for_each(|(o, &x)| *o = bits(x));
                    }
                }
            }
        }
    }

    /// y (n, C) = attention of qkv row j's queries over batch row `at[j].0`, slots 0..=at[j].1.
    pub(crate) fn attend(&self, y: &mut [f32], qkv: &[f32], layer: usize, at: &[(u32, u32)]) {
        assert!(y.len() >= at.len() * self.shape.h * self.shape.d);
        let y = SendPtr(y.as_mut_ptr());
        match &self.store {
            Store::F32 { k, v } => attend(k, v, self.shape, Query { qkv, layer, at, y }),
            Store::Bf16 { k, v } => attend(k, v, self.shape, Query { qkv, layer, at, y }),
        }
    }
}

/// One `attend` call's queries and output.
struct Query<'a> {
    qkv: &'a [f32],
    layer: usize,
    at: &'a [(u32, u32)],
    y: SendPtr,
}

fn attend<W: Weight + Sync>(k: &[W], v: &[W], shape: KvShape, q: Query<'_>) {
    let KvShape { batch, slots, h, d, .. } = shape;
    let c = h * d;
    let scale = 1.0 / (d as f32).sqrt();
    let lbase = q.layer * batch * h * slots * d;
    thread_local! {
        static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    pool::for_each(q.at.len() * h, |task| {
        SCORES.with_borrow_mut(|scores| {
            scores.resize(scores.len().max(slots), 0.0);
            let (row, hh) = (task / h, task % h);
            let (b, pos) = q.at[row];
            let bh = b as usize * h + hh;
            let kb = &k[lbase + bh * slots * d..lbase + (bh + 1) * slots * d];
            let vb = &v[lbase + bh * slots * d..lbase + (bh + 1) * slots * d];
            let qv = &q.qkv[row * 3 * c + hh * 3 * d..row * 3 * c + hh * 3 * d + d];
            let upto = pos as usize + 1;
            // SAFETY: the (row, head hh) output block is written by this task only; row < at.len() and y holds
            // at.len() rows of C (asserted by `attend`).
            let out = unsafe { std::slice::from_raw_parts_mut(q.y.get().add(row * c + hh * d), d) };
            // scores over slots 0..upto, a block of KB at a time (the last block's slots past upto are computed
            // and ignored), then softmax and the weighted values
            prefetch_start(&kb[..upto.div_ceil(KB) * KB * d]);
            prefetch_start(&vb[..upto * d]);
            block_scores(kb, qv, scores, upto.div_ceil(KB), scale);
            let sc = &mut scores[..upto];
            let mx = math::max(sc);
            let inv = 1.0 / math::exp_shift_sum(sc, mx);
            sc.iter_mut().for_each(|e| *e *= inv);
            weighted_values(out, vb, sc);
        })
    });
}
