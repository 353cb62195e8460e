//! Unit tests of `attention_train.rs`. Forward and backward against the materialising reference (`attention_ref`: the
//! same float32 math without blocks), lse against a float64 evaluation of its definition. Tolerance
//! |a − b| <= 1e-5 + 1e-5·|b|: the two differ only in summation order and the online rescaling.

use super::*;
use crate::kernels::attention_ref;
use common::Rng;

struct Case {
    s: AttnShape,
    mask: Vec<u8>,
    docs: Option<Vec<u32>>,
}

impl Case {
    fn dense(b: usize, t: usize, h: usize, d: usize) -> Self {
        Case { s: AttnShape { b, t, h, d }, mask: vec![1; b * t], docs: None }
    }
    fn vis(&self) -> Visibility<'_> {
        Visibility { attention_mask: &self.mask, doc_ids: self.docs.as_deref() }
    }
}

/// Doc ids of one packed row from document lengths, then padding (mask 0, doc id 0) to `t`.
fn packed(lens: &[usize], t: usize) -> (Vec<u8>, Vec<u32>) {
    let docs: Vec<u32> = lens.iter().enumerate().flat_map(|(i, &n)| std::iter::repeat_n(i as u32, n)).collect();
    let real = docs.len();
    let mask = (0..t).map(|i| u8::from(i < real)).collect();
    (mask, docs.into_iter().chain(std::iter::repeat(0)).take(t).collect())
}

fn uniform(r: &mut Rng, n: usize, a: f64) -> Vec<f32> {
    (0..n).map(|_| ((r.next_f64() * 2.0 - 1.0) * a) as f32).collect()
}

/// (out, lse, dqkv) of the blocked kernels, every output poisoned with NaN first.
fn run(c: &Case, qkv: &[f32], dout: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttnShape { b, t, h, d } = c.s;
    let (mut out, mut lse, mut dqkv) = (vec![f32::NAN; b * t * h * d], vec![f32::NAN; b * h * t], vec![]);
    dqkv.resize(b * t * 3 * h * d, f32::NAN);
    attention_fwd(&mut out, &mut lse, qkv, c.vis(), c.s);
    attention_bwd(&mut dqkv, dout, &out, &lse, qkv, c.vis(), c.s);
    (out, lse, dqkv)
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = g == w || (g - w).abs() <= 1e-5 + 1e-5 * w.abs();
        assert!(ok, "{what}[{i}]: {g} vs {w}");
    }
}

/// lse (B,H,T) in float64 straight from its definition.
fn lse_f64(c: &Case, qkv: &[f32]) -> Vec<f32> {
    let AttnShape { b, t, h, d } = c.s;
    let row = 3 * h * d;
    let mut out = vec![];
    for bh in 0..b * h {
        let (bi, hi) = (bh / h, bh % h);
        let at = |i: usize, part: usize| &qkv[(bi * t + i) * row + (3 * hi + part) * d..][..d];
        for i in 0..t {
            let s: Vec<f64> = (0..t)
                .filter(|&j| c.vis().visible(bi * t, i, j))
                .map(|j| at(i, 0).iter().zip(at(j, 1)).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>())
                .map(|x| x / (d as f64).sqrt())
                .collect();
            let m = s.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
            out.push(if s.is_empty() {
                f32::NEG_INFINITY
            } else {
                (m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln()) as f32
            });
        }
    }
    out
}

fn check(c: &Case, seed: u64) {
    let AttnShape { b, t, h, d } = c.s;
    let (n, ch) = (b * t, h * d);
    let mut r = Rng::new(seed);
    let (qkv, dout) = (uniform(&mut r, n * 3 * ch, 1.5), uniform(&mut r, n * ch, 1.0));
    let (out, lse, dqkv) = run(c, &qkv, &dout);
    let (mut out_r, mut att, mut dqkv_r) = (vec![0.0; n * ch], vec![0.0; b * h * t * t], vec![0.0; n * 3 * ch]);
    attention_ref::attention_fwd(&mut out_r, &mut att, &qkv, c.vis(), AttnShape { b, t, h, d });
    let mut datt = vec![0.0; b * h * t * t];
    attention_ref::attention_bwd(&mut dqkv_r, &mut datt, &dout, &att, &qkv, AttnShape { b, t, h, d });
    let tag = format!("{:?}", c.s);
    close(&format!("out {tag}"), &out, &out_r);
    close(&format!("lse {tag}"), &lse, &lse_f64(c, &qkv));
    close(&format!("dqkv {tag}"), &dqkv, &dqkv_r);
    // A query that sees no key: exactly zero output and dq; a key no query sees: exactly zero dk, dv.
    let vis = c.vis();
    for (bi, i) in (0..b).flat_map(|bi| (0..t).map(move |i| (bi, i))) {
        let (tok, g) = (bi * t + i, &dqkv[(bi * t + i) * 3 * ch..][..3 * ch]);
        if !(0..=i).any(|j| vis.visible(bi * t, i, j)) {
            assert!(out[tok * ch..(tok + 1) * ch].iter().all(|&x| x == 0.0), "out row {tok} {tag}");
            assert!((0..h).all(|hi| lse[(bi * h + hi) * t + i] == f32::NEG_INFINITY), "lse {tok} {tag}");
            assert!((0..h).all(|hi| g[3 * hi * d..][..d].iter().all(|&x| x == 0.0)), "dq {tok} {tag}");
        }
        if !(i..t).any(|q| vis.visible(bi * t, q, i)) {
            assert!((0..h).all(|hi| g[(3 * hi + 1) * d..][..2 * d].iter().all(|&x| x == 0.0)), "dkv {tok} {tag}");
        }
    }
    // Deterministic: a second call, and calls on 1 and 3 threads, are bitwise equal.
    let again = run(c, &qkv, &dout);
    let on = |k| rayon::ThreadPoolBuilder::new().num_threads(k).build().unwrap().install(|| run(c, &qkv, &dout));
    for other in [again, on(1), on(3)] {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&other.0) == bits(&out) && bits(&other.1) == bits(&lse) && bits(&other.2) == bits(&dqkv));
    }
}

#[test]
fn dense_causal_matches_reference() {
    // T < block, T = block, T not a multiple of the block, several blocks; D = 8, 16, 64; B, H > 1
    for (i, &(b, t, h, d)) in
        [(1, 5, 1, 8), (2, 64, 2, 16), (2, 100, 3, 8), (1, 200, 2, 64), (3, 130, 2, 16), (2, 129, 1, 64)]
            .iter()
            .enumerate()
    {
        check(&Case::dense(b, t, h, d), 100 + i as u64);
    }
    // an empty batch is a no-op
    let empty = Case::dense(0, 16, 2, 8);
    attention_fwd(&mut [], &mut [], &[], empty.vis(), empty.s);
    attention_bwd(&mut [], &[], &[], &[], &[], empty.vis(), empty.s);
}

#[test]
fn padding_matches_reference() {
    // row 0 left-padded past a whole key block, row 1 right-padded, row 2 fully padded
    let t = 150;
    let mut c = Case::dense(3, t, 2, 16);
    c.mask[..70].fill(0);
    c.mask[t + 110..2 * t].fill(0);
    c.mask[2 * t..].fill(0);
    check(&c, 7);
    let mut c = Case::dense(2, 40, 1, 64); // T < block, both ends padded
    c.mask[..3].fill(0);
    c.mask[75..].fill(0);
    check(&c, 8);
}

#[test]
fn packed_documents_match_reference() {
    // several documents, one-token documents, documents across block boundaries, padding at the end
    let t = 300;
    let (m0, d0) = packed(&[1, 70, 3, 1, 130, 64, 31], t);
    let (m1, d1) = packed(&[150, 1, 100], t);
    check(&Case { s: AttnShape { b: 2, t, h: 2, d: 8 }, mask: [m0, m1].concat(), docs: Some([d0, d1].concat()) }, 9);
    let (m, docs) = packed(&[250, 250, 20], 530);
    check(&Case { s: AttnShape { b: 1, t: 530, h: 1, d: 64 }, mask: m, docs: Some(docs) }, 10);
    // unordered doc ids and scattered padding: only the element-wise mask is exact there
    let mut r = Rng::new(3);
    let docs = (0..140).map(|_| r.below(3) as u32).collect();
    let mask = (0..140).map(|_| u8::from(r.below(5) != 0)).collect();
    check(&Case { s: AttnShape { b: 1, t: 140, h: 2, d: 16 }, mask, docs: Some(docs) }, 11);
}

/// Every tile kind against a brute-force look at the tile's visible pairs; returns the tiles computed.
fn tiles_agree(c: &Case) -> usize {
    let (t, vis) = (c.s.t, c.vis());
    let blocks = summaries(vis, 1, t);
    let mut computed = 0;
    for qb in 0..t.div_ceil(BLK) {
        for kb in 0..t.div_ceil(BLK) {
            let pairs = |f: &dyn Fn(usize, usize) -> bool| {
                (qb * BLK..((qb + 1) * BLK).min(t)).all(|i| (kb * BLK..((kb + 1) * BLK).min(t)).all(|j| f(i, j)))
            };
            let kind = tile(&blocks, qb, kb, t);
            let ok = match kind {
                Tile::Skip => pairs(&|i, j| !vis.visible(0, i, j)),
                Tile::Full => pairs(&|i, j| vis.visible(0, i, j)),
                Tile::Causal => pairs(&|i, j| vis.visible(0, i, j) == (j <= i)),
                Tile::Masked => true,
            };
            assert!(ok, "tile ({qb},{kb}) is not {kind:?}");
            computed += usize::from(kind != Tile::Skip);
            // ordered documents: a tile is computed only if some query in it sees some key in it
            if c.docs.as_ref().is_none_or(|d| d.is_sorted()) {
                assert_eq!(kind == Tile::Skip, pairs(&|i, j| !vis.visible(0, i, j)), "tile ({qb},{kb})");
            }
        }
    }
    computed
}

#[test]
fn hidden_key_blocks_are_skipped() {
    // dense causal 2048: the 32·33/2 tiles on and below the diagonal
    assert_eq!(tiles_agree(&Case::dense(1, 2048, 1, 64)), 528);
    // packed 2048 row of ~250-token documents: each query block meets the key blocks of its one or two
    // documents (108 tiles here), not the causal 528
    let lens: Vec<usize> =
        (0..8).map(|i| 240 + 3 * i).chain([2048 - (0..8).map(|i| 240 + 3 * i).sum::<usize>()]).collect();
    let (mask, docs) = packed(&lens, 2048);
    let n = tiles_agree(&Case { s: AttnShape { b: 1, t: 2048, h: 1, d: 64 }, mask, docs: Some(docs) });
    assert!(n < 528 / 4, "{n} tiles");
    // left padding over two key blocks: no query computes against them
    let mut c = Case::dense(1, 300, 1, 8);
    c.mask[..150].fill(0);
    assert_eq!(tiles_agree(&c), 15 - 5 - 4);
    let mut r = Rng::new(5);
    let docs = (0..300).map(|_| r.below(4) as u32).collect();
    tiles_agree(&Case { s: AttnShape { b: 1, t: 300, h: 1, d: 8 }, mask: vec![1; 300], docs: Some(docs) });
}
