use super::*;

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Reference: ggml's `quantize_row_q4_K_ref` (llama-cpp-python 0.3.36's llama.cpp, gcc -ffp-contract=off),
/// and gguf-py 0.19.0's Q4_K dequantize, from tools/make_q4k_fixtures.py.
#[test]
fn quantizer_matches_ggml_bit_for_bit_and_dequantize_matches_gguf_py() {
    let x = floats(&fixture("q4_k_input.f32"));
    let want = fixture("q4_k_blocks.bin");
    let mut got = Vec::new();
    quantize_q4_k(&x, &mut got);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.chunks(BLOCK_BYTES).zip(want.chunks(BLOCK_BYTES)).enumerate() {
        assert_eq!(g, w, "super-block {i}");
    }
    let deq_want = floats(&fixture("q4_k_dequant.f32"));
    let mut deq = vec![0f32; x.len()];
    dequantize_q4_k(&want, &mut deq);
    for (i, (a, b)) in deq.iter().zip(&deq_want).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "value {i}: {a} vs gguf-py {b}");
    }
}

#[test]
fn round_trip_error_is_bounded_by_the_sub_block_steps() {
    // each value is within half a quantization step (plus the 6-bit scale's rounding) of its sub-block
    let x: Vec<f32> = (0..4 * QK_K).map(|i| ((i as f32 * 0.37).sin() * 0.05) + (i % 7) as f32 * 1e-3).collect();
    let mut q = Vec::new();
    quantize_q4_k(&x, &mut q);
    assert_eq!(q.len(), 4 * BLOCK_BYTES);
    let mut y = vec![0f32; x.len()];
    dequantize_q4_k(&q, &mut y);
    for (sb, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
        let range = xs.iter().cloned().fold(f32::MIN, f32::max) - xs.iter().cloned().fold(f32::MAX, f32::min);
        let worst = xs.iter().zip(ys).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // a step is range / 15; 6-bit scales and mins add at most a step more
        assert!(worst <= 2.0 * range / 15.0, "sub-block {sb}: error {worst}, range {range}");
    }
    assert_eq!(nearest_int(2.5), 2);
    assert_eq!(nearest_int(3.5), 4);
    assert_eq!(nearest_int(-2.5), -2);
}

// ---- the stored form and the products (`matrix`, `x86`) ----

use super::matrix::{portable, KRows, GROUP};
use crate::kernels::matmul::Dims;
use crate::kernels::matvec_f32::Dest;
use crate::kernels::SendPtr;

fn random(rng: &mut common::Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.next_f64() as f32 - 0.5) * scale).collect()
}

/// The fixture's ggml super-blocks held as 7 rows of 768: the same bytes back, ggml's dequantized values back,
/// and `Q4KMatrix::quantize` holds what `quantize_q4_k` writes.
#[test]
fn the_stored_form_gives_ggml_blocks_and_values_back() {
    let x = floats(&fixture("q4_k_input.f32"));
    let blocks = fixture("q4_k_blocks.bin");
    let (rows, cols) = (7, 768);
    assert_eq!(x.len(), rows * cols);
    let m = Q4KMatrix::from_blocks(&blocks, rows, cols).unwrap();
    let mut back = Vec::new();
    m.write_blocks(0, rows, &mut back);
    assert_eq!(back, blocks);
    let want = floats(&fixture("q4_k_dequant.f32"));
    let mut row = vec![0f32; cols];
    for r in 0..rows {
        m.dequantize_row(r, &mut row);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&row), bits(&want[r * cols..(r + 1) * cols]), "row {r}");
    }
    let q = Q4KMatrix::quantize(&x, rows, cols);
    let mut again = Vec::new();
    q.write_blocks(0, rows, &mut again);
    assert_eq!(again, blocks);
}

#[test]
fn malformed_q4k_blocks_are_refused() {
    assert!(Q4KMatrix::from_blocks(&[0u8; BLOCK_BYTES], 1, 128).unwrap_err().contains("multiple of 256"));
    assert!(Q4KMatrix::from_blocks(&[0u8; BLOCK_BYTES - 1], 1, 256).unwrap_err().contains("needs 144"));
    for at in [0, 2] {
        let mut b = vec![0u8; 2 * BLOCK_BYTES];
        b[BLOCK_BYTES + at..BLOCK_BYTES + at + 2].copy_from_slice(&f16::NAN.to_bits().to_le_bytes());
        let e = Q4KMatrix::from_blocks(&b, 2, 256).unwrap_err();
        assert!(e.contains("super-block 1 (row 1)") && e.contains(if at == 0 { " d" } else { "dmin" }), "{e}");
    }
}

/// The float64 sum the kernels compute: Σ w · x over the dequantized weights (ggml's values) and the input
/// quantized as the kernels do (int8 · dx per super-block).
fn reference(w: &Q4KMatrix, inp: &[f32], n: usize) -> Vec<f64> {
    let (ic, oc) = (w.cols, w.rows);
    let mut x = KRows::new();
    x.fill(inp, n, ic);
    let mut out = vec![0f64; n * oc];
    let mut wr = vec![0f32; ic];
    for o in 0..oc {
        w.dequantize_row(o, &mut wr);
        for r in 0..n {
            let mut s = 0f64;
            for (b, wb) in wr.chunks_exact(QK_K).enumerate() {
                let (dx, _) = x.scales(r, b);
                let xq = x.qs(r, b);
                for (v, &wv) in wb.iter().enumerate() {
                    s += wv as f64 * (xq[super::matrix::input_pos(v)] as f64 * dx as f64);
                }
            }
            out[r * oc + o] = s;
        }
    }
    out
}

type Path = fn(&Dest<'_>, &Q4KMatrix, &KRows, usize, usize);

/// Each path this CPU has (AVX512-VNNI, AVX2, portable) and the public entry, with bias and accumulation,
/// against the float64 sums, for shapes that hit every tile remainder (4 weight rows x 1-4 inputs) and the
/// last partial group of rows. Weights are shifted so that the sub-block mins matter.
#[test]
fn every_q4k_path_matches_the_f64_sum_of_the_quantized_operands() {
    let mut rng = common::Rng::new(21);
    for &(n, ic, oc) in &[(1, 256, 1), (1, 512, 5), (2, 256, 7), (3, 768, 70), (4, 256, 9), (5, 512, 66), (9, 256, 13)]
    {
        let wf: Vec<f32> =
            random(&mut rng, oc * ic, 1.0).iter().enumerate().map(|(i, v)| v + (i % 3) as f32 * 0.2).collect();
        let w = Q4KMatrix::quantize(&wf, oc, ic);
        let inp = random(&mut rng, n * ic, 2.0);
        let bias = random(&mut rng, oc, 1.0);
        let want = reference(&w, &inp, n);
        let mut x = KRows::new();
        x.fill(&inp, n, ic);
        // the terms' size: Σ |x| · (|w| + its sub-block's min)
        let scale = |r: usize| inp[r * ic..(r + 1) * ic].iter().map(|v| v.abs() as f64).sum::<f64>();
        let check = |got: &[f32], plus: &[f64], what: &str| {
            for r in 0..n {
                for o in 0..oc {
                    let want = want[r * oc + o] + plus[r * oc + o];
                    let err = (got[r * oc + o] as f64 - want).abs();
                    assert!(
                        err <= 2e-6 * (1.0 + scale(r)),
                        "{what} {n}x{ic}x{oc} ({r},{o}): {} vs {want}",
                        got[r * oc + o]
                    );
                }
            }
        };
        let mut paths: Vec<(&str, Path)> = vec![("portable", portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::kernels::q8::x86::vnni() {
                paths.push(("vnni", |d, w, x, a, b| unsafe { super::x86::block_vnni(d, w, x, a, b) }));
            }
            if crate::kernels::q8::x86::avx2() {
                paths.push(("avx2", |d, w, x, a, b| unsafe { super::x86::block_avx2(d, w, x, a, b) }));
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
            linear_q4k(&mut out, &inp, &w, Some(&bias), Dims { n, ic, oc }, accumulate);
            let plus: Vec<f64> =
                (0..n * oc).map(|i| bias[i % oc] as f64 + if accumulate { before[i] as f64 } else { 0.0 }).collect();
            check(&out, &plus, "linear_q4k");
        }
    }
    assert_eq!(GROUP, 4);
}

/// A row's result does not depend on the rows that share the call: bitwise, for every tile remainder.
#[test]
fn a_q4k_row_gets_the_same_bits_alone_or_in_a_batch() {
    let mut rng = common::Rng::new(22);
    let n = 9;
    for &(ic, oc) in &[(256, 70), (512, 131), (256, 9)] {
        let w = Q4KMatrix::quantize(&random(&mut rng, oc * ic, 1.0), oc, ic);
        let inp = random(&mut rng, n * ic, 1.0);
        let mut all = vec![0f32; n * oc];
        linear_q4k(&mut all, &inp, &w, None, Dims { n, ic, oc }, false);
        for k in [1, 3, 5] {
            for r0 in (0..n).step_by(k) {
                let m = k.min(n - r0);
                let mut part = vec![0f32; m * oc];
                linear_q4k(&mut part, &inp[r0 * ic..(r0 + m) * ic], &w, None, Dims { n: m, ic, oc }, false);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&part), bits(&all[r0 * oc..(r0 + m) * oc]), "ic {ic} rows {r0}..+{m}");
            }
        }
    }
}
