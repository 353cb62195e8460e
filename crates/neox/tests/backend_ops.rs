//! Every backend op against a plain reference, in the style of llama.cpp's `test-backend-ops`: one table of ops,
//! each run on several random shapes, forward and backward, with outputs poisoned with NaN before the call (an
//! element the op forgets to write fails the comparison) and accumulated outputs started from random values (an
//! op that overwrites instead of adding fails). The references are straightforward float64 loops written from
//! the definitions (PyTorch's LayerNorm, HF GPT-NeoX rotary/attention, exact-erf GELU, `torch.optim.AdamW`);
//! no numbers come from elsewhere. A second backend (CUDA) joins by adding its constructor to `backends()`.

// The references index like the formulas they transcribe.
#![allow(clippy::needless_range_loop)]

use common::Rng;
use neox::backend::{AttnShape, Backend, Embedding, HeadGrad, Heads, KvShape, LayerNorm, Linear, Pass, Visibility};
use neox::{AdamW, AdamWConfig, Cpu, Layout, NeoxConfig};

/// A model shape whose tensors the ops address: hidden C, heads H, intermediate F, vocab V.
struct Shape {
    c: usize,
    h: usize,
    f: usize,
    v: usize,
}

const SHAPES: &[Shape] =
    &[Shape { c: 16, h: 2, f: 24, v: 37 }, Shape { c: 48, h: 3, f: 80, v: 64 }, Shape { c: 64, h: 1, f: 64, v: 130 }];

/// Row counts: one row, a few (the decode kernels' tiles and remainders), and more than the few-row limit.
const ROWS: &[usize] = &[1, 3, 9, 130];

/// One device under test: its name, the config, and the backend holding random parameters.
struct Dev<B: Backend> {
    cfg: NeoxConfig,
    layout: Layout,
    params: Vec<f32>,
    be: B,
}

fn config(s: &Shape) -> NeoxConfig {
    let mut c = NeoxConfig::new_pythia(s.v, s.c, 1, s.h, 256);
    c.intermediate_size = s.f;
    c.rotary_pct = 0.5;
    c
}

fn randn(r: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| scale * r.normal() as f32).collect()
}

fn cpu(s: &Shape, seed: u64, tweak: fn(&mut Cpu)) -> Dev<Cpu> {
    let cfg = config(s);
    let layout = Layout::new(&cfg);
    let mut r = Rng::new(seed);
    let params = randn(&mut r, layout.total, 0.5);
    let mut be = Cpu::new(params.clone(), &layout);
    tweak(&mut be);
    Dev { cfg, layout, params, be }
}

/// Every backend configuration under test: the CPU in f32, with bf16 decode panels, and in bf16 compute (its
/// products on the AVX512_BF16 kernel where this CPU has it, and on the f32 gemm).
fn backends(s: &Shape, seed: u64) -> Vec<(&'static str, Dev<Cpu>)> {
    vec![
        ("cpu f32", cpu(s, seed, |_| {})),
        ("cpu bf16-decode", cpu(s, seed, |b| b.set_decode_bf16(true))),
        ("cpu bf16-compute", cpu(s, seed, |b| b.set_compute_bf16(true))),
        (
            "cpu f32-products bf16-compute",
            cpu(s, seed, |b| {
                b.set_compute_bf16(true);
                b.set_bf16_kernel(false)
            }),
        ),
    ]
}

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

fn nan(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

/// |got - want| <= tol·(1 + |want|) everywhere (NaN fails).
fn close(what: &str, got: &[f32], want: &[f64], tol: f64) -> Result<(), String> {
    if got.len() < want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g as f64 - w).abs() <= tol * (1.0 + w.abs());
        if !ok {
            return Err(format!("{what}[{i}]: {g} vs reference {w}"));
        }
    }
    Ok(())
}

fn erf(x: f64) -> f64 {
    // Simpson's rule on 2/sqrt(pi) * exp(-t^2) over [0, x]: error far below f32 resolution at 4000 intervals
    let n = 4000;
    let h = x / n as f64;
    let g = |t: f64| (-t * t).exp();
    let mut s = g(0.0) + g(x);
    for i in 1..n {
        s += g(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
}

/// Reference Linear: out = x · Wᵀ + b (+ out0), W (OC, IC) from `w`.
fn ref_linear(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    out0: Option<&[f32]>,
    n: usize,
    ic: usize,
    oc: usize,
) -> Vec<f64> {
    let mut y = vec![0f64; n * oc];
    for i in 0..n {
        for o in 0..oc {
            let mut s = b.map_or(0.0, |b| b[o] as f64) + out0.map_or(0.0, |p| p[i * oc + o] as f64);
            for k in 0..ic {
                s += x[i * ic + k] as f64 * w[o * ic + k] as f64;
            }
            y[i * oc + o] = s;
        }
    }
    y
}

/// The weights a Linear reads on this backend configuration: rounded to bf16 where the op computes in bf16.
fn weights_read(name: &str, w: &[f32], pass: Pass, n: usize) -> Vec<f32> {
    // few-row decoding reads the bf16 panels (bf16-decode) or the f32 weights; everything else reads the
    // transposed copy, rounded in bf16 compute
    let few_row_decode = pass == Pass::Decode && n <= 128;
    let rounded = if few_row_decode { name.ends_with("bf16-decode") } else { name.ends_with("bf16-compute") };
    w.iter().map(|&x| if rounded { bf16(x) } else { x }).collect()
}

fn linears(d: &Dev<impl Backend>) -> Vec<(&'static str, Linear)> {
    let (o, c, f) = (d.layout.layers[0], d.cfg.hidden_size, d.cfg.intermediate_size);
    let v = d.cfg.vocab_size;
    vec![
        ("query_key_value", Linear { w: o.qkv_w, b: Some(o.qkv_b), ic: c, oc: 3 * c }),
        ("dense", Linear { w: o.dense_w, b: Some(o.dense_b), ic: c, oc: c }),
        ("dense_h_to_4h", Linear { w: o.fc_w, b: Some(o.fc_b), ic: c, oc: f }),
        ("dense_4h_to_h", Linear { w: o.proj_w, b: Some(o.proj_b), ic: f, oc: c }),
        ("embed_out", Linear { w: d.layout.embed_out, b: None, ic: c, oc: v }),
    ]
}

type Op<B> = fn(&str, &Dev<B>, &mut Rng, usize) -> Result<(), String>;

fn op_linear<B: Backend>(name: &str, d: &Dev<B>, r: &mut Rng, n: usize) -> Result<(), String> {
    for (lname, lin) in linears(d) {
        for pass in [Pass::Train, Pass::Decode] {
            let x = randn(r, n * lin.ic, 1.0);
            let xr: Vec<f32> =
                if name.ends_with("bf16-compute") { x.iter().map(|&v| bf16(v)).collect() } else { x.clone() };
            let w = weights_read(name, &d.params[lin.w..lin.w + lin.ic * lin.oc], pass, n);
            let b = lin.b.map(|b| &d.params[b..b + lin.oc]);
            let mut out = d.be.upload(&nan(n * lin.oc));
            d.be.linear(&mut out, &d.be.upload(&xr), lin, n, false, pass);
            let tol = if name.contains("bf16") { 1e-4 } else { 1e-5 };
            close(
                &format!("{lname} {pass:?}"),
                &d.be.download(&out),
                &ref_linear(&xr, &w, b, None, n, lin.ic, lin.oc),
                tol,
            )?;
            // accumulate: out += x·Wᵀ + b
            let prev = randn(r, n * lin.oc, 1.0);
            let mut out = d.be.upload(&prev);
            d.be.linear(&mut out, &d.be.upload(&xr), lin, n, true, pass);
            let want = ref_linear(&xr, &w, b, Some(&prev), n, lin.ic, lin.oc);
            close(&format!("{lname} {pass:?} accumulate"), &d.be.download(&out), &want, tol)?;
        }
    }
    Ok(())
}

fn op_linear_bwd<B: Backend>(name: &str, d: &Dev<B>, r: &mut Rng, n: usize) -> Result<(), String> {
    for (lname, lin) in linears(d) {
        let (ic, oc) = (lin.ic, lin.oc);
        // in bf16 compute the block hands the backward bf16 values (rounded activations and gradients)
        let rounded =
            |v: Vec<f32>| if name.ends_with("bf16-compute") { v.iter().map(|&x| bf16(x)).collect() } else { v };
        let x = rounded(randn(r, n * ic, 1.0));
        let dout = rounded(randn(r, n * oc, 1.0));
        let w = weights_read(name, &d.params[lin.w..lin.w + ic * oc], Pass::Train, n);
        let g0 = randn(r, d.layout.total, 1.0);
        let mut grads = d.be.upload(&g0);
        let mut dinp = d.be.upload(&nan(n * ic));
        d.be.linear_bwd(&mut dinp, &mut grads, &d.be.upload(&dout), &d.be.upload(&x), lin, n);
        let mut want_dx = vec![0f64; n * ic];
        let mut want_dw: Vec<f64> = g0[lin.w..lin.w + ic * oc].iter().map(|&v| v as f64).collect();
        for i in 0..n {
            for o in 0..oc {
                let g = dout[i * oc + o] as f64;
                for k in 0..ic {
                    want_dx[i * ic + k] += g * w[o * ic + k] as f64;
                    want_dw[o * ic + k] += g * x[i * ic + k] as f64;
                }
            }
        }
        let got = d.be.download(&grads);
        close(&format!("{lname} dinp"), &d.be.download(&dinp), &want_dx, 1e-5)?;
        close(&format!("{lname} dW"), &got[lin.w..lin.w + ic * oc], &want_dw, 1e-5)?;
        if let Some(b) = lin.b {
            let want: Vec<f64> =
                (0..oc).map(|o| g0[b + o] as f64 + (0..n).map(|i| dout[i * oc + o] as f64).sum::<f64>()).collect();
            close(&format!("{lname} db"), &got[b..b + oc], &want, 1e-5)?;
        }
        // every other gradient is untouched
        let touched =
            |i: usize| (lin.w..lin.w + ic * oc).contains(&i) || lin.b.is_some_and(|b| (b..b + oc).contains(&i));
        if let Some(i) = (0..d.layout.total).find(|&i| !touched(i) && got[i].to_bits() != g0[i].to_bits()) {
            return Err(format!("{lname}: gradient {i} outside the layer changed"));
        }
    }
    Ok(())
}

fn layer_norm(d: &Dev<impl Backend>) -> LayerNorm {
    let o = d.layout.layers[0];
    LayerNorm { w: o.ln1_w, b: o.ln1_b, c: d.cfg.hidden_size, eps: 1e-5 }
}

fn op_layernorm<B: Backend>(_: &str, d: &Dev<B>, r: &mut Rng, n: usize) -> Result<(), String> {
    let ln = layer_norm(d);
    let c = ln.c;
    let x: Vec<f32> = randn(r, n * c, 2.0).iter().map(|v| v + 0.5).collect();
    let (w, b) = (&d.params[ln.w..ln.w + c], &d.params[ln.b..ln.b + c]);
    let mut out = d.be.upload(&nan(n * c));
    let mut stats = d.be.upload(&nan(2 * n));
    let xb = d.be.upload(&x);
    d.be.layernorm(&mut out, &mut stats, &xb, ln, n);
    let mut want = vec![0f64; n * c];
    let mut norm = vec![0f64; n * c];
    let mut rstd = vec![0f64; n];
    for i in 0..n {
        let row = &x[i * c..(i + 1) * c];
        let mu = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = row.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / c as f64;
        rstd[i] = 1.0 / (var + 1e-5).sqrt();
        for k in 0..c {
            norm[i * c + k] = (row[k] as f64 - mu) * rstd[i];
            want[i * c + k] = norm[i * c + k] * w[k] as f64 + b[k] as f64;
        }
    }
    close("layernorm out", &d.be.download(&out), &want, 1e-5)?;
    // backward: dinp += ..., dw += Σ g·norm, db += Σ g
    let dout = randn(r, n * c, 1.0);
    let d0 = randn(r, n * c, 1.0);
    let g0 = randn(r, d.layout.total, 1.0);
    let (mut dinp, mut grads) = (d.be.upload(&d0), d.be.upload(&g0));
    d.be.layernorm_bwd(&mut dinp, &mut grads, &d.be.upload(&dout), (&xb, &stats), ln, n);
    let mut want_dx: Vec<f64> = d0.iter().map(|&v| v as f64).collect();
    let mut want_dw: Vec<f64> = g0[ln.w..ln.w + c].iter().map(|&v| v as f64).collect();
    let mut want_db: Vec<f64> = g0[ln.b..ln.b + c].iter().map(|&v| v as f64).collect();
    for i in 0..n {
        let dn: Vec<f64> = (0..c).map(|k| dout[i * c + k] as f64 * w[k] as f64).collect();
        let m1 = dn.iter().sum::<f64>() / c as f64;
        let m2 = (0..c).map(|k| dn[k] * norm[i * c + k]).sum::<f64>() / c as f64;
        for k in 0..c {
            want_dx[i * c + k] += (dn[k] - m1 - norm[i * c + k] * m2) * rstd[i];
            want_dw[k] += dout[i * c + k] as f64 * norm[i * c + k];
            want_db[k] += dout[i * c + k] as f64;
        }
    }
    let got = d.be.download(&grads);
    close("layernorm dinp", &d.be.download(&dinp), &want_dx, 1e-4)?;
    close("layernorm dw", &got[ln.w..ln.w + c], &want_dw, 1e-4)?;
    close("layernorm db", &got[ln.b..ln.b + c], &want_db, 1e-4)
}

fn heads(d: &Dev<impl Backend>) -> Heads {
    let c = &d.cfg;
    Heads { h: c.num_attention_heads, d: c.head_dim(), r: c.rotary_ndims(), base: c.rotary_emb_base }
}

fn op_rope<B: Backend>(_: &str, d: &Dev<B>, r: &mut Rng, n: usize) -> Result<(), String> {
    let hd = heads(d);
    let (c, half) = (hd.h * hd.d, hd.r / 2);
    let pos: Vec<u32> = (0..n).map(|_| r.below(200) as u32).collect();
    let (mut cos, mut sin) = (d.be.upload(&nan(n * half)), d.be.upload(&nan(n * half)));
    d.be.rope_table(&mut cos, &mut sin, &pos, hd);
    let x = randn(r, n * 3 * c, 1.0);
    for inverse in [false, true] {
        let mut q = d.be.upload(&x);
        d.be.rope(&mut q, (&cos, &sin), n, hd, inverse);
        let mut want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for i in 0..n {
            for h in 0..hd.h {
                for part in 0..2 {
                    let base = i * 3 * c + h * 3 * hd.d + part * hd.d;
                    for j in 0..half {
                        let inv_freq = 1.0 / (hd.base as f32).powf((2 * j) as f32 / hd.r as f32);
                        let a = (pos[i] as f32 * inv_freq) as f64;
                        let (s, co) = (if inverse { -a.sin() } else { a.sin() }, a.cos());
                        let (x1, x2) = (x[base + j] as f64, x[base + j + half] as f64);
                        want[base + j] = x1 * co - x2 * s;
                        want[base + j + half] = x2 * co + x1 * s;
                    }
                }
            }
        }
        close(&format!("rope inverse={inverse}"), &d.be.download(&q), &want, 1e-5)?;
    }
    Ok(())
}

/// Reference attention of (B,T) rows with visibility, and its backward for `dout`.
struct RefAttn {
    out: Vec<f64>,
    dqkv: Vec<f64>,
}

fn ref_attention(qkv: &[f32], dout: &[f32], mask: &[u8], docs: Option<&[u32]>, s: AttnShape) -> RefAttn {
    let (c, row) = (s.h * s.d, 3 * s.h * s.d);
    let scale = 1.0 / (s.d as f64).sqrt();
    let mut out = vec![0f64; s.b * s.t * c];
    let mut dqkv = vec![0f64; s.b * s.t * row];
    let at = |b: usize, i: usize, h: usize, part: usize, k: usize| (b * s.t + i) * row + h * 3 * s.d + part * s.d + k;
    for b in 0..s.b {
        for h in 0..s.h {
            for i in 0..s.t {
                let vis: Vec<usize> = (0..=i)
                    .filter(|&j| mask[b * s.t + j] != 0 && docs.is_none_or(|dd| dd[b * s.t + j] == dd[b * s.t + i]))
                    .collect();
                if vis.is_empty() {
                    continue;
                }
                let sc: Vec<f64> = vis
                    .iter()
                    .map(|&j| {
                        (0..s.d).map(|k| qkv[at(b, i, h, 0, k)] as f64 * qkv[at(b, j, h, 1, k)] as f64).sum::<f64>()
                            * scale
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|x| x / z).collect();
                let go = |k: usize| dout[(b * s.t + i) * c + h * s.d + k] as f64;
                for k in 0..s.d {
                    out[(b * s.t + i) * c + h * s.d + k] =
                        vis.iter().zip(&p).map(|(&j, pj)| pj * qkv[at(b, j, h, 2, k)] as f64).sum();
                }
                // dP_j = dO·V_j; dS_j = P_j (dP_j - Σ P dP) · scale
                let dp: Vec<f64> =
                    vis.iter().map(|&j| (0..s.d).map(|k| go(k) * qkv[at(b, j, h, 2, k)] as f64).sum()).collect();
                let dot: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (idx, &j) in vis.iter().enumerate() {
                    let ds = p[idx] * (dp[idx] - dot) * scale;
                    for k in 0..s.d {
                        dqkv[at(b, i, h, 0, k)] += ds * qkv[at(b, j, h, 1, k)] as f64;
                        dqkv[at(b, j, h, 1, k)] += ds * qkv[at(b, i, h, 0, k)] as f64;
                        dqkv[at(b, j, h, 2, k)] += p[idx] * go(k);
                    }
                }
            }
        }
    }
    RefAttn { out, dqkv }
}

fn op_attention<B: Backend>(_: &str, d: &Dev<B>, r: &mut Rng, n: usize) -> Result<(), String> {
    let hd = heads(d);
    let c = hd.h * hd.d;
    // n tokens as B rows of T: (1, n) and, when it divides, (3, n/3) with padding and packed documents
    let mut layouts = vec![(1, n)];
    if n.is_multiple_of(3) {
        layouts.push((3, n / 3));
    }
    for (b, t) in layouts {
        let s = AttnShape { b, t, h: hd.h, d: hd.d };
        let mut mask = vec![1u8; b * t];
        if b > 1 {
            // row 1 left-padded by half, row 2 fully padded
            mask[t..t + t / 2].fill(0);
            mask[2 * t..3 * t].fill(0);
        }
        let docs: Vec<u32> = (0..b * t).map(|i| ((i % t) / 4) as u32).collect();
        for doc_ids in [None, Some(&docs[..])] {
            let qkv = randn(r, b * t * 3 * c, 1.0);
            let dout = randn(r, b * t * c, 1.0);
            let vis = Visibility { attention_mask: &mask, doc_ids };
            let want = ref_attention(&qkv, &dout, &mask, doc_ids, s);
            let mut out = d.be.upload(&nan(b * t * c));
            let mut saved = d.be.upload(&nan(d.be.attention_saved_len(s)));
            let qb = d.be.upload(&qkv);
            d.be.attention(&mut out, &mut saved, &qb, vis, s);
            let what = format!("attention {b}x{t} docs={}", doc_ids.is_some());
            close(&what, &d.be.download(&out), &want.out, 1e-5)?;
            let mut dqkv = d.be.upload(&nan(b * t * 3 * c));
            d.be.attention_bwd(&mut dqkv, &d.be.upload(&dout), (&out, &saved), &qb, vis, s);
            close(&format!("{what} backward"), &d.be.download(&dqkv), &want.dqkv, 1e-4)?;
        }
    }
    Ok(())
}

fn op_gelu<B: Backend>(_: &str, d: &Dev<B>, r: &mut Rng, n: usize) -> Result<(), String> {
    let f = d.cfg.intermediate_size;
    let x = randn(r, n * f, 2.0);
    let mut out = d.be.upload(&nan(n * f));
    let xb = d.be.upload(&x);
    d.be.gelu(&mut out, &xb, n, f);
    let want: Vec<f64> = x.iter().map(|&v| 0.5 * v as f64 * (1.0 + erf(v as f64 / 2f64.sqrt()))).collect();
    close("gelu", &d.be.download(&out), &want, 1e-6)?;
    let g = randn(r, n * f, 1.0);
    let mut gb = d.be.upload(&g);
    d.be.gelu_bwd(&mut gb, &xb, n * f);
    let want: Vec<f64> = x
        .iter()
        .zip(&g)
        .map(|(&v, &g)| {
            let v = v as f64;
            let pdf = (-v * v / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            g as f64 * (0.5 * (1.0 + erf(v / 2f64.sqrt())) + v * pdf)
        })
        .collect();
    close("gelu backward", &d.be.download(&gb), &want, 1e-5)
}

fn op_embedding<B: Backend>(_: &str, d: &Dev<B>, r: &mut Rng, n: usize) -> Result<(), String> {
    let (c, v) = (d.cfg.hidden_size, d.cfg.vocab_size);
    let e = Embedding { w: d.layout.embed_in, v, c };
    let ids: Vec<u32> = (0..n).map(|_| r.below(v as u64) as u32).collect();
    let mut x = d.be.upload(&nan(n * c));
    d.be.embed(&mut x, &ids, e);
    let want: Vec<f64> =
        ids.iter().flat_map(|&i| d.params[e.w + i as usize * c..][..c].iter().map(|&v| v as f64)).collect();
    close("embed", &d.be.download(&x), &want, 0.0)?;
    let dx = randn(r, n * c, 1.0);
    let g0 = randn(r, d.layout.total, 1.0);
    let mut grads = d.be.upload(&g0);
    d.be.embed_bwd(&mut grads, &d.be.upload(&dx), &ids, e);
    let mut want: Vec<f64> = g0.iter().map(|&v| v as f64).collect();
    for (k, &i) in ids.iter().enumerate() {
        for j in 0..c {
            want[e.w + i as usize * c + j] += dx[k * c + j] as f64;
        }
    }
    close("embed backward", &d.be.download(&grads), &want, 1e-6)?;
    // gather and scatter rows
    let src = randn(r, n * c, 1.0);
    let rows: Vec<u32> = (0..n).rev().map(|i| i as u32).collect();
    let mut dst = d.be.upload(&nan(n * c));
    d.be.gather_rows(&mut dst, &d.be.upload(&src), &rows, c);
    let want: Vec<f64> = rows.iter().flat_map(|&i| src[i as usize * c..][..c].iter().map(|&v| v as f64)).collect();
    close("gather_rows", &d.be.download(&dst), &want, 0.0)?;
    let mut back = d.be.upload(&nan(n * c));
    d.be.scatter_rows(&mut back, &dst, &rows, c);
    close("scatter_rows", &d.be.download(&back), &src.iter().map(|&v| v as f64).collect::<Vec<_>>(), 0.0)
}

fn op_lm_head_loss<B: Backend>(name: &str, d: &Dev<B>, r: &mut Rng, n: usize) -> Result<(), String> {
    let (c, v) = (d.cfg.hidden_size, d.cfg.vocab_size);
    let head = Linear { w: d.layout.embed_out, b: None, ic: c, oc: v };
    let bf = name.ends_with("bf16-compute");
    let x: Vec<f32> = randn(r, n * c, 1.0).into_iter().map(|x| if bf { bf16(x) } else { x }).collect();
    let w = weights_read(name, &d.params[head.w..head.w + c * v], Pass::Train, n);
    let targets: Vec<(u32, u32)> =
        (0..n as u32).filter(|i| i % 3 != 1).map(|i| (i, r.below(v as u64) as u32)).collect();
    let logits = ref_linear(&x, &w, None, None, n, c, v);
    let scale = 0.37f32;
    let mut want_loss = 0f64;
    let dx0 = randn(r, n * c, 1.0);
    let g0 = randn(r, d.layout.total, 1.0);
    let mut want_dx: Vec<f64> = dx0.iter().map(|&v| v as f64).collect();
    let mut want_dw: Vec<f64> = g0[head.w..head.w + c * v].iter().map(|&v| v as f64).collect();
    for &(row, tgt) in &targets {
        let l = &logits[row as usize * v..(row as usize + 1) * v];
        let mx = l.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = l.iter().map(|x| (x - mx).exp()).sum();
        want_loss += mx + z.ln() - l[tgt as usize];
        for j in 0..v {
            let mut gj = (l[j] - mx).exp() / z - if j == tgt as usize { 1.0 } else { 0.0 };
            gj *= scale as f64;
            if bf {
                gj = bf16(gj as f32) as f64;
            }
            for k in 0..c {
                want_dx[row as usize * c + k] += gj * w[j * c + k] as f64;
                want_dw[j * c + k] += gj * x[row as usize * c + k] as f64;
            }
        }
    }
    let xb = d.be.upload(&x);
    let mut scratch = Default::default();
    let loss = d.be.lm_head_loss(&xb, head, &targets, None, &mut scratch);
    close("loss (no grad)", &[loss as f32], &[want_loss], 1e-5)?;
    let (mut dx, mut grads) = (d.be.upload(&dx0), d.be.upload(&g0));
    let grad = HeadGrad { dx: &mut dx, grads: &mut grads, scale };
    let loss = d.be.lm_head_loss(&xb, head, &targets, Some(grad), &mut scratch);
    close("loss", &[loss as f32], &[want_loss], 1e-5)?;
    let tol = if bf { 1e-2 } else { 1e-5 };
    close("loss dx", &d.be.download(&dx), &want_dx, tol)?;
    close("loss dW", &d.be.download(&grads)[head.w..head.w + c * v], &want_dw, tol)
}

fn op_kv_decode<B: Backend>(name: &str, d: &Dev<B>, r: &mut Rng, n: usize) -> Result<(), String> {
    let hd = heads(d);
    let c = hd.h * hd.d;
    let batch = 3;
    let slots = (n + 5).next_multiple_of(d.be.kv_block());
    let mut kv = d.be.kv_new(KvShape { layers: 2, batch, slots, h: hd.h, d: hd.d });
    // fill row 1 of layer 1 with n tokens one call at a time... in one call: n rows at slots 0..n
    let qkv = randn(r, n * 3 * c, 1.0);
    let at: Vec<(u32, u32)> = (0..n as u32).map(|i| (1, i)).collect();
    let qb = d.be.upload(&qkv);
    d.be.kv_append(&mut kv, 1, &qb, &at);
    let mut y = d.be.upload(&nan(n * c));
    d.be.attention_decode(&mut y, &qb, &kv, 1, &at);
    // reference: causal attention of the n tokens, keys and values as stored (bf16 when decoding in bf16)
    let stored: Vec<f32> = if name.ends_with("bf16-decode") {
        qkv.iter().enumerate().map(|(i, &v)| if (i % (3 * hd.d)) >= hd.d { bf16(v) } else { v }).collect()
    } else {
        qkv.clone()
    };
    let s = AttnShape { b: 1, t: n, h: hd.h, d: hd.d };
    let want = ref_attention(&stored, &vec![0.0; n * c], &vec![1; n], None, s);
    close("decode attention", &d.be.download(&y), &want.out, 1e-5)
}

fn op_adamw<B: Backend>(name: &str, d: &Dev<B>, r: &mut Rng, _: usize) -> Result<(), String> {
    if !name.ends_with("f32") {
        return Ok(()); // the same update in every configuration; f32 checks it once per shape
    }
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-6, weight_decay: 0.1 };
    let mut be = Cpu::new(d.params.clone(), &d.layout);
    let mut opt = AdamW::new(cfg, d.layout.total);
    let mut p: Vec<f64> = d.params.iter().map(|&v| v as f64).collect();
    let (mut m, mut v) = (vec![0f64; p.len()], vec![0f64; p.len()]);
    for step in 1..=3 {
        let g = randn(r, d.layout.total, 1.0);
        let mut gb = be.upload(&g);
        let (lr, coef) = (1e-2f32, 0.5f32);
        be.adamw_step(&mut opt, &mut gb, lr, coef);
        if be.download(&gb).iter().any(|&x| x != 0.0) {
            return Err("adamw_step left gradients unzeroed".into());
        }
        let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
        for info in &d.layout.params {
            let decay = if info.decay { 1.0 - lr as f64 * cfg.weight_decay as f64 } else { 1.0 };
            for i in info.range() {
                let gi = g[i] as f64 * coef as f64;
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                let (bc1, bc2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
                p[i] = p[i] * decay - lr as f64 / bc1 * m[i] / ((v[i] / bc2).sqrt() + cfg.eps as f64);
            }
        }
        close(&format!("adamw step {step} params"), be.params(), &p, 1e-5)?;
    }
    // the next product reads the updated weights (the backend's derived formats were refreshed)
    let lin = linears(d)[0].1;
    let x = randn(r, 2 * lin.ic, 1.0);
    let mut out = be.upload(&nan(2 * lin.oc));
    be.linear(&mut out, &be.upload(&x), lin, 2, false, Pass::Train);
    let w = &be.params()[lin.w..lin.w + lin.ic * lin.oc];
    let b = lin.b.map(|b| &be.params()[b..b + lin.oc]);
    close("product after adamw", &be.download(&out), &ref_linear(&x, w, b, None, 2, lin.ic, lin.oc), 1e-5)
}

fn op_reductions<B: Backend>(name: &str, d: &Dev<B>, r: &mut Rng, n: usize) -> Result<(), String> {
    let x = randn(r, n * 1000 + 7, 1.0);
    let want = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
    let mut xb = d.be.upload(&x);
    close("norm", &[d.be.norm(&xb) as f32], &[want], 1e-6)?;
    if !d.be.all_finite(&xb) {
        return Err("all_finite on finite values".into());
    }
    let mut bad = x.clone();
    bad[n * 500] = f32::INFINITY;
    if d.be.all_finite(&d.be.upload(&bad)) {
        return Err("all_finite missed an infinity".into());
    }
    d.be.operand(&mut xb, x.len());
    let rounded = name.ends_with("bf16-compute");
    let want: Vec<f64> = x.iter().map(|&v| if rounded { bf16(v) } else { v } as f64).collect();
    close("operand", &d.be.download(&xb), &want, 0.0)
}

fn ops<B: Backend>() -> Vec<(&'static str, Op<B>)> {
    vec![
        ("linear", op_linear::<B>),
        ("linear_bwd", op_linear_bwd::<B>),
        ("layernorm", op_layernorm::<B>),
        ("rope", op_rope::<B>),
        ("attention", op_attention::<B>),
        ("gelu", op_gelu::<B>),
        ("embedding", op_embedding::<B>),
        ("lm_head_loss", op_lm_head_loss::<B>),
        ("kv_decode", op_kv_decode::<B>),
        ("adamw", op_adamw::<B>),
        ("reductions", op_reductions::<B>),
    ]
}

#[test]
fn every_op_matches_the_reference() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for (si, s) in SHAPES.iter().enumerate() {
        for (name, dev) in backends(s, 100 + si as u64) {
            for (op, run) in ops::<Cpu>() {
                for &n in ROWS {
                    let mut r = Rng::new(1000 * si as u64 + n as u64);
                    checked += 1;
                    if let Err(e) = run(name, &dev, &mut r, n) {
                        failures.push(format!("{name} {op} C={} rows={n}: {e}", s.c));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {checked} cases failed:\n{}", failures.len(), failures.join("\n"));
}
