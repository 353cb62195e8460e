//! q8_0: the quantizer against ggml's reference (fixture from the `gguf` package, tools/make_quant_fixtures.py),
//! the stored form, and every product path against float64 sums of the dequantized operands.

use super::*;
use crate::kernels::matvec_f32::Dest;

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn random(rng: &mut common::Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.next_f64() as f32 - 0.5) * scale).collect()
}

/// Bit for bit the blocks that gguf-py's Q8_0 (ggml's quantize_row_q8_0_ref) wrote for the same inputs:
/// several scales, a zero block, ties that roundf breaks away from zero, f16-subnormal scales.
#[test]
fn quantizer_matches_ggml_reference_bit_for_bit() {
    let x: Vec<f32> =
        fixture("q8_0_input.f32").chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let want = fixture("q8_0_blocks.bin");
    let mut got = Vec::new();
    quantize_q8_0(&x, &mut got);
    assert_eq!(got.len(), want.len());
    for (k, (g, w)) in got.chunks(BLOCK_BYTES).zip(want.chunks(BLOCK_BYTES)).enumerate() {
        assert_eq!(g, w, "block {k}");
    }
    // the stored form gives the same blocks back, and the same values as GGUF's blocks
    let rows = x.len() / 64;
    let m = Q8Matrix::quantize(&x[..rows * 64], rows, 64);
    let mut back = Vec::new();
    m.write_blocks(0, rows, &mut back);
    assert_eq!(back, want[..back.len()]);
    let mut a = vec![0f32; rows * 64];
    dequantize_q8_0(&want[..back.len()], &mut a);
    let mut b = vec![0f32; 64];
    for r in 0..rows {
        m.dequantize_row(r, &mut b);
        assert_eq!(a[r * 64..(r + 1) * 64], b[..], "row {r}");
    }
}

/// |x − dequantize(quantize(x))| <= d/2 plus the f16 rounding of d (127 · |d − f16(d)|) per value.
#[test]
fn dequantized_values_are_within_half_a_step() {
    let mut rng = common::Rng::new(3);
    for scale in [1e-4f32, 0.05, 4.0, 2e3] {
        let x = random(&mut rng, 32 * 50, scale);
        let mut q = Vec::new();
        quantize_q8_0(&x, &mut q);
        let mut y = vec![0f32; x.len()];
        dequantize_q8_0(&q, &mut y);
        for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
            let d = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            let d16 = f16::from_f32(d).to_f32();
            let bound = d / 2.0 + 127.0 * (d - d16).abs() + 1e-6 * d;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= bound, "{a} vs {b} (d {d})");
            }
        }
    }
}

#[test]
fn malformed_blocks_are_refused() {
    assert!(Q8Matrix::from_blocks(&[0u8; 34], 1, 48).is_err());
    assert!(Q8Matrix::from_blocks(&[0u8; 33], 1, 32).is_err());
    let mut b = vec![0u8; 34];
    b[..2].copy_from_slice(&f16::INFINITY.to_bits().to_le_bytes());
    assert!(Q8Matrix::from_blocks(&b, 1, 32).unwrap_err().contains("non-finite"));
    // −128 (not made by ggml's quantizer, but representable) is accepted and multiplies exactly
    b[..2].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
    b[2..].fill(0x80);
    let m = Q8Matrix::from_blocks(&b, 1, 32).unwrap();
    let x = vec![-1.0f32; 32];
    let mut y = [0f32];
    linear_q8(&mut y, &x, &m, None, Dims { n: 1, ic: 32, oc: 1 }, false);
    assert_eq!(y[0], 128.0 * 32.0);
}

/// The float64 sum the kernels compute: Σ_b d_w · d_x · Σ q_w q_x with the input quantized as the kernels do.
fn reference(w: &Q8Matrix, inp: &[f32], n: usize) -> Vec<f64> {
    let (ic, oc) = (w.cols, w.rows);
    let mut x = QRows { n: 0, chunks: 0, qs: vec![], d: vec![] };
    x.fill(inp, n, ic);
    let mut out = vec![0f64; n * oc];
    let mut wr = vec![0f32; ic];
    for o in 0..oc {
        w.dequantize_row(o, &mut wr);
        for r in 0..n {
            let mut s = 0f64;
            for i in 0..ic / QK {
                let (c, b) = (i / 2, i % 2);
                let (xq, xd) = x.chunk(r, c);
                for j in 0..QK {
                    s += wr[i * QK + j] as f64 * (xq[pos(b, j)] as f64 * xd[b] as f64);
                }
            }
            out[r * oc + o] = s;
        }
    }
    out
}

/// A few-row product path: columns o0..o1 of every row.
type Path = fn(&Dest<'_>, &Q8Matrix, &QRows, usize, usize);

/// Each path this CPU has (AVX512-VNNI, AVX2, portable) and the public entry, with bias and accumulation,
/// against the float64 sums, for shapes that hit every tile remainder and an odd block count.
#[test]
fn every_path_matches_the_f64_sum_of_the_quantized_operands() {
    let mut rng = common::Rng::new(9);
    for &(n, ic, oc) in
        &[(1, 32, 1), (1, 96, 5), (2, 64, 7), (3, 160, 70), (4, 256, 9), (5, 64, 66), (9, 96, 13), (131, 64, 40)]
    {
        let w = Q8Matrix::quantize(&random(&mut rng, oc * ic, 1.0), oc, ic);
        let inp = random(&mut rng, n * ic, 2.0);
        let bias = random(&mut rng, oc, 1.0);
        let want = reference(&w, &inp, n);
        let mut x = QRows { n: 0, chunks: 0, qs: vec![], d: vec![] };
        x.fill(&inp, n, ic);
        let scale = |r: usize| inp[r * ic..(r + 1) * ic].iter().map(|v| v.abs() as f64).sum::<f64>();
        let check = |got: &[f32], plus: &[f64], what: &str| {
            for r in 0..n {
                for o in 0..oc {
                    let want = want[r * oc + o] + plus[r * oc + o];
                    let err = (got[r * oc + o] as f64 - want).abs();
                    assert!(
                        err <= 1e-6 * (1.0 + scale(r)),
                        "{what} {n}x{ic}x{oc} ({r},{o}): {} vs {want}",
                        got[r * oc + o]
                    );
                }
            }
        };
        let mut paths: Vec<(&str, Path)> = vec![("portable", portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if x86::vnni() {
                paths.push(("vnni", |d, w, x, a, b| unsafe { x86::block_vnni(d, w, x, a, b) }));
            }
            if x86::avx2() {
                paths.push(("avx2", |d, w, x, a, b| unsafe { x86::block_avx2(d, w, x, a, b) }));
            }
        }
        for (name, path) in paths {
            let mut out = vec![f32::NAN; n * oc];
            let dst = Dest { out: SendPtr(out.as_mut_ptr()), bias: None, n, oc, accumulate: false };
            path(&dst, &w, &x, 0, oc);
            check(&out, &vec![0.0; n * oc], name);
        }
        for accumulate in [false, true] {
            let before = random(&mut rng, n * oc, 1.0);
            let mut out = before.clone();
            linear_q8(&mut out, &inp, &w, Some(&bias), Dims { n, ic, oc }, accumulate);
            let plus: Vec<f64> =
                (0..n * oc).map(|i| bias[i % oc] as f64 + if accumulate { before[i] as f64 } else { 0.0 }).collect();
            check(&out, &plus, "linear_q8");
        }
    }
}

/// A row's result does not depend on the rows that share the call: bitwise, for every tile remainder.
#[test]
fn a_row_gets_the_same_bits_alone_or_in_a_batch() {
    let mut rng = common::Rng::new(12);
    let n = 9;
    for &(ic, oc) in &[(64, 70), (96, 131), (32, 9)] {
        let w = Q8Matrix::quantize(&random(&mut rng, oc * ic, 1.0), oc, ic);
        let inp = random(&mut rng, n * ic, 1.0);
        let mut all = vec![0f32; n * oc];
        linear_q8(&mut all, &inp, &w, None, Dims { n, ic, oc }, false);
        for k in [1, 3, 5] {
            for r0 in (0..n).step_by(k) {
                let m = k.min(n - r0);
                let mut part = vec![0f32; m * oc];
                linear_q8(&mut part, &inp[r0 * ic..(r0 + m) * ic], &w, None, Dims { n: m, ic, oc }, false);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&part), bits(&all[r0 * oc..(r0 + m) * oc]), "ic {ic} rows {r0}..+{m}");
            }
        }
    }
}
