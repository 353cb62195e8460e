//! `Backend` for the CPU: each op checks its sizes and calls the kernel that computes it.

use super::kv::{CpuKv, BLOCK};
use super::Cpu;
use crate::backend::{AttnShape, Backend, Embedding, HeadGrad, Heads, KvShape, LayerNorm, Linear, Pass, Visibility};
use crate::kernels::attention_train::{attention_bwd, attention_fwd, saved_len};
use crate::kernels::layernorm::{layernorm_bwd, layernorm_fwd, Norm};
use crate::kernels::lm_head_loss::{lm_head_xent, Head, HeadWeight, TokenRows, XentGrad, XentScratch};
use crate::kernels::math::{gelu_bwd_inplace, gelu_fwd, round_bf16_slice};
use crate::kernels::matmul::{linear_bwd_input, linear_bwd_input_t, linear_fwd_t, Dims};
use crate::kernels::matvec_bf16::linear_panels;
use crate::kernels::matvec_f32::{linear_rows, FEW_ROWS};
use crate::kernels::rotary::{rope_apply, rope_table, RopeTable};
use crate::kernels::w16::{bf16_to_f32, linear_bwd_input_w16, linear_fwd_w16};
use crate::kernels::{pool, SendPtr, SMALL};
use crate::optim::{self, AdamW};
use rayon::prelude::*;

/// Two disjoint mutable ranges of one buffer (a tensor's weight and bias gradients).
fn two_mut(buf: &mut [f32], a: (usize, usize), b: (usize, usize)) -> (&mut [f32], &mut [f32]) {
    assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "overlapping gradient ranges");
    if a.0 < b.0 {
        let (lo, hi) = buf.split_at_mut(b.0);
        (&mut lo[a.0..a.0 + a.1], &mut hi[..b.1])
    } else {
        let (lo, hi) = buf.split_at_mut(a.0);
        (&mut hi[..a.1], &mut lo[b.0..b.0 + b.1])
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type LossScratch = XentScratch;
    type Kv = CpuKv;

    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }

    fn len(buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn upload(&self, host: &[f32]) -> Vec<f32> {
        host.to_vec()
    }

    fn download(&self, buf: &Vec<f32>) -> Vec<f32> {
        buf.clone()
    }

    fn grow(&self, buf: &mut Vec<f32>, len: usize) {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
    }

    fn zero(&self, buf: &mut Vec<f32>, len: usize) {
        buf[..len].fill(0.0);
    }

    fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>, len: usize) {
        dst[..len].copy_from_slice(&src[..len]);
    }

    fn add(&self, dst: &mut Vec<f32>, src: &Vec<f32>, len: usize) {
        dst[..len].iter_mut().zip(&src[..len]).for_each(|(d, s)| *d += s);
    }

    fn gather_rows(&self, dst: &mut Vec<f32>, src: &Vec<f32>, rows: &[u32], c: usize) {
        for (d, &r) in dst[..rows.len() * c].chunks_mut(c).zip(rows) {
            d.copy_from_slice(&src[r as usize * c..(r as usize + 1) * c]);
        }
    }

    fn scatter_rows(&self, dst: &mut Vec<f32>, src: &Vec<f32>, rows: &[u32], c: usize) {
        for (s, &r) in src[..rows.len() * c].chunks(c).zip(rows) {
            dst[r as usize * c..(r as usize + 1) * c].copy_from_slice(s);
        }
    }

    fn embed(&self, x: &mut Vec<f32>, ids: &[u32], e: Embedding) {
        let c = e.c;
        for (row, &id) in x[..ids.len() * c].chunks_mut(c).zip(ids) {
            let at = id as usize * c;
            // a trained token row (LoRA) replaces the base row
            let trained = self.lora.as_ref().and_then(|l| Some((l, l.token_row(id)?, l.layout.embed_rows?)));
            match (trained, &self.base16) {
                (Some((l, k, o)), _) => row.copy_from_slice(&l.params[o + k * c..o + (k + 1) * c]),
                (None, _) if self.quant.is_some() => {
                    self.quant_matrix(e.w).expect("a quantized embedding").dequantize_row(id as usize, row)
                }
                (None, Some(b)) => row.iter_mut().zip(b.bits(e.w + at, c)).for_each(|(d, &s)| *d = bf16_to_f32(s)),
                (None, None) => row.copy_from_slice(&self.params[e.w + at..e.w + at + c]),
            }
        }
    }

    fn embed_bwd(&self, grads: &mut Vec<f32>, dx: &Vec<f32>, ids: &[u32], e: Embedding) {
        // sequential scatter-add: deterministic, duplicate ids add up in order
        let c = e.c;
        let add = |dst: &mut [f32], row: &[f32]| dst.iter_mut().zip(row).for_each(|(d, s)| *d += s);
        match &self.lora {
            // a frozen base: only the trained token rows get gradients
            Some(l) => {
                let Some(o) = l.layout.embed_rows else { return };
                for (row, &id) in dx[..ids.len() * c].chunks(c).zip(ids) {
                    if let Some(k) = l.token_row(id) {
                        add(&mut grads[o + k * c..o + (k + 1) * c], row);
                    }
                }
            }
            None => {
                let dt = &mut grads[e.w..e.w + e.v * c];
                for (row, &id) in dx[..ids.len() * c].chunks(c).zip(ids) {
                    add(&mut dt[id as usize * c..(id as usize + 1) * c], row);
                }
            }
        }
    }

    fn layernorm(&self, out: &mut Vec<f32>, stats: &mut Vec<f32>, inp: &Vec<f32>, ln: LayerNorm, n: usize) {
        let half = stats.len() / 2;
        let (mean, rstd) = stats.split_at_mut(half);
        let norm = Norm { w: self.p(ln.w, ln.c), b: self.p(ln.b, ln.c), eps: ln.eps };
        layernorm_fwd(out, (mean, rstd), inp, norm, n);
    }

    fn layernorm_bwd(
        &self,
        dinp: &mut Vec<f32>,
        grads: &mut Vec<f32>,
        dout: &Vec<f32>,
        saved: (&Vec<f32>, &Vec<f32>),
        ln: LayerNorm,
        n: usize,
    ) {
        let (inp, stats) = saved;
        let (mean, rstd) = stats.split_at(stats.len() / 2);
        if self.lora.is_some() {
            // a frozen base: the parameter gradients are computed into scratch and dropped
            let mut scratch = vec![0f32; 2 * ln.c];
            let (dw, db) = scratch.split_at_mut(ln.c);
            layernorm_bwd(dinp, (dw, db), dout, inp, (mean, rstd), self.p(ln.w, ln.c), n);
            return;
        }
        let dparams = two_mut(grads, (ln.w, ln.c), (ln.b, ln.c));
        layernorm_bwd(dinp, dparams, dout, inp, (mean, rstd), self.p(ln.w, ln.c), n);
    }

    fn linear(&self, out: &mut Vec<f32>, inp: &Vec<f32>, lin: Linear, n: usize, accumulate: bool, pass: Pass) {
        let d = Dims { n, ic: lin.ic, oc: lin.oc };
        let bias = lin.b.map(|b| self.p(b, lin.oc));
        let len = lin.ic * lin.oc;
        // few-row inference reads each weight once for all rows (memory-bound); everything else goes to gemm
        // on the transposed copy, which training's backward also reads; a bf16 base has its own products;
        // bf16 compute trains on the bf16 kernel where the CPU has one
        if let Some(q) = self.quant_matrix(lin.w) {
            q.linear(out, inp, bias, d, accumulate)
        } else if pass == Pass::Train && self.bf16_products() {
            self.linear_fwd_bf16(out, inp, lin, d, accumulate)
        } else if let Some(w16) = self.base_bits(lin.w, len) {
            linear_fwd_w16(out, inp, w16, bias, d, accumulate)
        } else if pass == Pass::Decode && n <= FEW_ROWS {
            match self.packed() {
                Some(p) => linear_panels(out, inp, p.matrix(lin.w), bias, d, accumulate),
                None => linear_rows(out, inp, self.p(lin.w, len), bias, d, accumulate),
            }
        } else {
            linear_fwd_t(out, inp, self.t(lin.w, len), bias, d, accumulate)
        }
        if let Some((l, slot)) = self.lora.as_ref().and_then(|l| Some((l, l.layout.slot(lin.w)?))) {
            l.forward(slot, out, inp, n, pass);
        }
        // the LM head as a plain product (full logits, decoding): trained token rows replace their columns
        if let Some((l, at)) = self.lora.as_ref().and_then(|l| Some((l, l.layout.head_rows?))) {
            if lin.w == self.layout.embed_out {
                // (the head's product never accumulates)
                debug_assert!(!accumulate);
                let (c, v) = (lin.ic, lin.oc);
                for (k, &id) in l.cfg.token_rows.iter().enumerate() {
                    let wk = &l.params[at + k * c..at + (k + 1) * c];
                    for (o, x) in out.chunks_mut(v).zip(inp.chunks(c)).take(n) {
                        o[id as usize] = crate::kernels::math::dot(x, wk);
                    }
                }
            }
        }
    }

    fn linear_bwd(
        &self,
        dinp: &mut Vec<f32>,
        grads: &mut Vec<f32>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        lin: Linear,
        n: usize,
    ) {
        assert!(self.quant.is_none(), "a quantized base has no backward (Model refuses to train it)");
        let d = Dims { n, ic: lin.ic, oc: lin.oc };
        let len = lin.ic * lin.oc;
        // dX = dY · W: from the f32 weights, in bf16 compute from the rounded transposed copy (or on the bf16
        // kernel), or from a bf16 base
        if self.bf16_products() {
            self.linear_bwd_input_bf16(dinp, dout, lin, d)
        } else if let Some(w16) = self.base_bits(lin.w, len) {
            linear_bwd_input_w16(dinp, dout, w16, d)
        } else if self.compute_bf16 {
            linear_bwd_input_t(dinp, dout, self.t(lin.w, len), d)
        } else {
            linear_bwd_input(dinp, dout, self.p(lin.w, len), d, false)
        }
        if let Some(l) = &self.lora {
            // a frozen base: no weight or bias gradient; the LoRA branch's own backward when it targets this layer
            if let Some(slot) = l.layout.slot(lin.w) {
                l.backward(slot, grads, dinp, dout, inp, n);
            }
            return;
        }
        match lin.b {
            Some(b) => {
                let (dw, db) = two_mut(grads, (lin.w, len), (b, lin.oc));
                self.linear_bwd_weight_any(dw, Some(db), dout, inp, d)
            }
            None => self.linear_bwd_weight_any(&mut grads[lin.w..lin.w + len], None, dout, inp, d),
        }
    }

    fn rounds_operands(&self) -> bool {
        self.compute_bf16
    }

    fn operand(&self, x: &mut Vec<f32>, len: usize) {
        if self.compute_bf16 {
            round_bf16_slice(&mut x[..len]);
        }
    }

    fn grad_operand<'a>(&self, scratch: &'a mut Vec<f32>, g: &'a Vec<f32>, len: usize) -> &'a Vec<f32> {
        if !self.compute_bf16 {
            return g;
        }
        scratch[..len].copy_from_slice(&g[..len]);
        round_bf16_slice(&mut scratch[..len]);
        scratch
    }

    fn rope_table(&self, cos: &mut Vec<f32>, sin: &mut Vec<f32>, positions: &[u32], heads: Heads) {
        rope_table(cos, sin, positions, heads.r, heads.base);
    }

    fn rope(&self, qkv: &mut Vec<f32>, table: (&Vec<f32>, &Vec<f32>), n: usize, heads: Heads, inverse: bool) {
        let tab = RopeTable { cos: table.0, sin: table.1, r: heads.r };
        rope_apply(qkv, tab, n, heads.h, heads.d, inverse);
    }

    fn attention_saved_len(&self, s: AttnShape) -> usize {
        saved_len(s)
    }

    fn attention(&self, out: &mut Vec<f32>, saved: &mut Vec<f32>, qkv: &Vec<f32>, vis: Visibility<'_>, s: AttnShape) {
        attention_fwd(out, saved, qkv, vis, s)
    }

    fn attention_bwd(
        &self,
        dqkv: &mut Vec<f32>,
        dout: &Vec<f32>,
        fwd: (&Vec<f32>, &Vec<f32>),
        qkv: &Vec<f32>,
        vis: Visibility<'_>,
        s: AttnShape,
    ) {
        attention_bwd(dqkv, dout, fwd.0, fwd.1, qkv, vis, s)
    }

    fn gelu(&self, out: &mut Vec<f32>, inp: &Vec<f32>, n: usize, f: usize) {
        if n > 1 && n * f <= SMALL {
            // a few rows (a decode step): one row per task on the decode pool, where the element-wise kernel
            // would run on one core
            let dst = SendPtr(out.as_mut_ptr());
            assert!(out.len() >= n * f && inp.len() >= n * f);
            pool::for_each(n, |r| {
                // SAFETY: row r of out (n x f, asserted) is written by this task only.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.get().add(r * f), f) };
                gelu_fwd(row, &inp[r * f..(r + 1) * f]);
            });
        } else {
            gelu_fwd(&mut out[..n * f], &inp[..n * f]);
        }
    }

    fn gelu_bwd(&self, d: &mut Vec<f32>, inp: &Vec<f32>, len: usize) {
        gelu_bwd_inplace(&mut d[..len], &inp[..len]);
    }

    fn lm_head_loss(
        &self,
        x: &Vec<f32>,
        head: Linear,
        targets: &[(u32, u32)],
        grad: Option<HeadGrad<'_, Self>>,
        scratch: &mut XentScratch,
    ) -> f64 {
        let (c, v) = (head.ic, head.oc);
        let len = c * v;
        let w = match (self.quant.as_ref(), self.base_bits(head.w, len)) {
            // a quantized head in f32, built at the first loss (evaluation)
            (Some(q), _) => {
                let (w, wt) = q.head_f32(head.w);
                HeadWeight::F32 { w, wt }
            }
            // the packed operands only serve the bf16 kernel
            (None, Some(w16)) => {
                let panels =
                    self.base16.as_ref().filter(|_| self.bf16_products()).and_then(|b| b.panels(head.w, &self.mats));
                HeadWeight::Bf16(w16, panels)
            }
            // (the bf16 kernel reads only `w`)
            (None, None) if self.bf16_products() => HeadWeight::F32 { w: self.p(head.w, len), wt: &[] },
            (None, None) => HeadWeight::F32 { w: self.p(head.w, len), wt: self.t(head.w, len) },
        };
        // with an adapter the head is frozen; its trained token rows replace their logits
        let lora = self.lora.as_ref();
        let rows_at = lora.and_then(|l| Some((l, l.layout.head_rows?)));
        let k = lora.map_or(0, |l| l.cfg.token_rows.len());
        let rows = rows_at.map(|(l, o)| TokenRows { ids: &l.cfg.token_rows, w: &l.params[o..o + k * c] });
        let h = Head { w, c, v, bf16: self.compute_bf16, kernel: self.bf16_products(), rows };
        let grad = grad.map(|g| {
            let grads = &mut g.grads[..];
            let (dw, drows) = match rows_at {
                Some((_, o)) => (None, Some(&mut grads[o..o + k * c])),
                None if lora.is_some() => (None, None),
                None => (Some(&mut grads[head.w..head.w + len]), None),
            };
            XentGrad { dx: &mut g.dx[..], dw, drows, scale: g.scale }
        });
        lm_head_xent(x, h, targets, grad, scratch)
    }

    fn kv_block(&self) -> usize {
        BLOCK
    }

    fn kv_new(&self, shape: KvShape) -> CpuKv {
        CpuKv::new(shape, self.decode_bf16)
    }

    fn kv_bytes(kv: &CpuKv) -> usize {
        kv.elem_bytes()
    }

    fn kv_commit(&self, kv: &mut CpuKv) {
        kv.commit()
    }

    fn kv_copy_row(&self, kv: &mut CpuKv, src: usize, dst: usize, len: usize) {
        kv.copy_row(src, dst, len)
    }

    fn kv_append(&self, kv: &mut CpuKv, layer: usize, qkv: &Vec<f32>, at: &[(u32, u32)]) {
        kv.append(layer, qkv, at)
    }

    fn attention_decode(&self, y: &mut Vec<f32>, qkv: &Vec<f32>, kv: &CpuKv, layer: usize, at: &[(u32, u32)]) {
        kv.attend(y, qkv, layer, at)
    }

    fn adamw_step(&mut self, opt: &mut AdamW, grads: &mut Vec<f32>, lr: f32, coef: f32) {
        match self.lora.as_mut() {
            // the adapter is all that trains; the base's derived formats stay as they are
            Some(l) => opt.step_scaled_and_zero(&mut l.params, grads, lr, &l.layout, coef),
            None => self.fused_adamw(opt, grads, lr, coef),
        }
    }

    fn trainable(&self) -> bool {
        self.quant.is_none()
    }

    fn grad_len(&self, params: usize) -> usize {
        self.lora.as_ref().map_or(params, |l| l.layout.total)
    }

    fn norm(&self, x: &Vec<f32>) -> f64 {
        optim::grad_norm(x)
    }

    fn all_finite(&self, x: &Vec<f32>) -> bool {
        x.par_chunks(1 << 15).all(|g| g.iter().all(|v| v.is_finite()))
    }
}
