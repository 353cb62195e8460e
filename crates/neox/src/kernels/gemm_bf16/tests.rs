//! Both paths (the AVX512_BF16 kernel where this CPU has it, and the portable widening path everywhere) against
//! float64 sums of the bf16-rounded operands (rounded by the `half` crate, an independent RNE implementation).
//!
//! Tolerance: the products of two bf16 values are exact in f32 (8 + 8 significant bits), so the only errors are
//! the f32 additions. Any order of k + 1 additions (k products plus the accumulated C) errs by at most
//! γ·(Σ|a·b| + |c0|), γ = (k + 1)·2⁻²⁴ (to first order; the factor 1.01 covers the rest and the float64
//! reference's own ~k·2⁻⁵³). `vdpbf16ps` also flushes denormals: each addition may lose up to 2⁻¹²⁶ more.
//! This bound holds for every summation order, so it does not depend on the kernel's blocking. It is ~100x
//! tighter than the effect of rounding the operands, which the tests check is really applied.

use super::{avx512_available, portable, Data, Operand};
use crate::kernels::matmul::Dims;
use common::Rng;

fn bf(x: f32) -> f64 {
    half::bf16::from_f32(x).to_f64()
}

/// An operand stored in one of three layouts, in f32 (random values, not bf16-representable) or bf16 bits.
struct Stored {
    f32: Vec<f32>,
    u16: Vec<u16>,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl Stored {
    /// layout 0: row-major, 1: column-major, 2: both strides > 1 (every other row and column of a bigger buffer).
    fn new(r: &mut Rng, rows: usize, cols: usize, layout: usize) -> Self {
        let (rs, cs, len) = match layout {
            0 => (cols, 1, rows * cols),
            1 => (1, rows, rows * cols),
            _ => (2 * (2 * cols + 1), 2, 2 * rows * (2 * cols + 1)),
        };
        let f32: Vec<f32> = (0..len).map(|_| r.normal() as f32).collect();
        let u16 = f32.iter().map(|&x| half::bf16::from_f32(x * 0.75).to_bits()).collect();
        Stored { f32, u16, rows, cols, rs, cs }
    }

    fn op(&self, bits: bool) -> Operand<'_> {
        let data = if bits { Data::Bf16(&self.u16) } else { Data::F32(&self.f32) };
        Operand { data, rows: self.rows, cols: self.cols, rs: self.rs, cs: self.cs }
    }

    /// Element (i, j) as the product reads it (bf16-rounded), and unrounded (f32 storage only).
    fn at(&self, i: usize, j: usize, bits: bool) -> (f64, f64) {
        let idx = i * self.rs + j * self.cs;
        if bits {
            let v = half::bf16::from_bits(self.u16[idx]).to_f64();
            (v, v)
        } else {
            (bf(self.f32[idx]), self.f32[idx] as f64)
        }
    }
}

type Path = fn(&mut [f32], usize, bool, Operand<'_>, Operand<'_>);

/// The paths this CPU can run.
fn paths() -> Vec<(&'static str, Path)> {
    let mut p: Vec<(&'static str, Path)> = vec![("portable", portable::gemm)];
    if avx512_available() {
        p.push(("avx512bf16", super::avx512_gemm));
    }
    if super::amx_available() {
        p.push(("amx-bf16", super::amx_gemm));
    }
    p
}

/// C = or += A·B on one path, checked element by element against the float64 reference; returns how many
/// elements the unrounded operands would have put outside the tolerance.
#[allow(clippy::too_many_arguments)]
fn check_one(path: (&str, Path), a: &Stored, ab: bool, b: &Stored, bb: bool, accumulate: bool, r: &mut Rng) -> usize {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let ldc = n + 3;
    // C with a NaN gap after each row: the gap must stay untouched
    let mut c: Vec<f32> = (0..m * ldc).map(|i| if i % ldc < n { r.normal() as f32 } else { f32::NAN }).collect();
    let c0 = c.clone();
    (path.1)(&mut c, ldc, accumulate, a.op(ab), b.op(bb));
    let mut unrounded_off = 0;
    for i in 0..m {
        for j in 0..ldc {
            let got = c[i * ldc + j];
            if j >= n {
                assert!(got.is_nan(), "{}: gap of row {i} written", path.0);
                continue;
            }
            let start = if accumulate { c0[i * ldc + j] as f64 } else { 0.0 };
            let (mut want, mut want_raw, mut mag) = (start, start, start.abs());
            for kk in 0..k {
                let ((x, xr), (y, yr)) = (a.at(i, kk, ab), b.at(kk, j, bb));
                want += x * y;
                want_raw += xr * yr;
                mag += (x * y).abs();
            }
            let tol = 1.01 * (k + 1) as f64 * (2f64.powi(-24) * mag + 2f64.powi(-126));
            let err = (got as f64 - want).abs();
            assert!(
                err <= tol,
                "{} {m}x{k}x{n} kinds ({ab},{bb}) acc {accumulate}: C[{i}][{j}] = {got}, reference {want}, \
                 error {err:e} > {tol:e}",
                path.0
            );
            if (got as f64 - want_raw).abs() > tol {
                unrounded_off += 1;
            }
        }
    }
    unrounded_off
}

#[test]
fn matches_f64_sums_of_rounded_operands() {
    let mut r = Rng::new(3);
    // (m, k, n) ragged: 1 row, k odd, k past a k-block (512 pairs) and odd, m past a task's rows (128), n past
    // an n-block (3072 columns), shapes that only touch edge tiles, and whole tiles (the vector packers; AMX's
    // 32 x 32 tiles stored straight to C, over three k-blocks)
    let shapes = [
        (1, 1, 1),
        (1, 7, 50),
        (9, 3, 49),
        (17, 257, 95),
        (200, 31, 40),
        (5, 2, 3100),
        (24, 300, 96),
        (3, 2051, 17),
        (64, 2100, 64),
    ];
    let mut off = 0;
    for (si, &(m, k, n)) in shapes.iter().enumerate() {
        for la in 0..3 {
            for lb in 0..3 {
                let (a, b) = (Stored::new(&mut r, m, k, la), Stored::new(&mut r, k, n, lb));
                // operand kinds and accumulate cycle over the layout pairs so each meets every layout
                let v = si + la * 3 + lb;
                let (ab, bb, accumulate) = (v % 2 == 1, (v / 2) % 2 == 1, (v / 4) % 2 == 1);
                for path in paths() {
                    off += check_one(path, &a, ab, &b, bb, accumulate, &mut r);
                }
            }
        }
    }
    // the rounding of f32 operands is really applied: unrounded operands would miss the tolerance widely
    assert!(off > 1000, "only {off} elements distinguish rounded from unrounded operands");
}

#[test]
fn every_layout_kind_and_accumulate_on_one_shape() {
    let mut r = Rng::new(4);
    // whole and edge tiles in m (8-row panels) and n (48-column panels); k: one whole block and a ragged odd one
    let (m, k, n) = (21, 2 * 512 * 2 + 37, 98);
    for la in 0..2 {
        for lb in 0..2 {
            let (a, b) = (Stored::new(&mut r, m, k, la), Stored::new(&mut r, k, n, lb));
            for path in paths() {
                for ab in [false, true] {
                    for bb in [false, true] {
                        for acc in [false, true] {
                            check_one(path, &a, ab, &b, bb, acc, &mut r);
                        }
                    }
                }
            }
        }
    }
}

/// Where Linux reports AMX-BF16, the AMX path is granted and tested (not silently skipped).
#[test]
fn amx_path_runs_where_the_cpu_has_it() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if cpuinfo.contains(" amx_bf16") && cpuinfo.contains(" amx_tile") {
        assert!(super::amx_available(), "the CPU has AMX but the AMX path is not available");
        assert!(paths().iter().any(|p| p.0 == "amx-bf16"));
    }
}

#[test]
fn k_zero_writes_zeros_or_leaves_c() {
    let (a, b) = (vec![0f32; 0], vec![0f32; 0]);
    for path in paths() {
        for acc in [false, true] {
            let mut c = vec![2f32; 6];
            let (ao, bo) = (Operand::rm(Data::F32(&a), 2, 0, 0), Operand::rm(Data::F32(&b), 0, 3, 3));
            (path.1)(&mut c, 3, acc, ao, bo);
            assert_eq!(c, vec![if acc { 2.0 } else { 0.0 }; 6], "{}", path.0);
        }
    }
}

/// Same inputs give the same bits: twice in a row, and with 1 or 3 threads (no split-k, fixed order).
#[test]
fn deterministic_across_calls_and_thread_counts() {
    let mut r = Rng::new(5);
    let (a, b) = (Stored::new(&mut r, 300, 333, 0), Stored::new(&mut r, 333, 200, 1));
    for path in paths() {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut c = vec![0f32; 300 * 200];
            pool.install(|| (path.1)(&mut c, 200, false, a.op(false), b.op(true)));
            c.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        let once = run(2);
        assert_eq!(once, run(2), "{}: two calls differ", path.0);
        if path.0 != "portable" {
            // the gemm crate's own blocking may depend on the thread count; ours does not
            assert_eq!(once, run(1), "{}: 1 thread differs", path.0);
            assert_eq!(once, run(3), "{}: 3 threads differ", path.0);
        }
    }
}

/// The f32 -> bf16 conversion of the packers is RNE as the `half` crate does it, NaN stays NaN.
#[test]
fn conversion_is_round_to_nearest_even() {
    use super::Elem;
    let mut r = Rng::new(6);
    let special = [0.0, -0.0, 1.0, f32::MAX, f32::MIN_POSITIVE, 1e-40, -3e-39, f32::INFINITY, f32::NEG_INFINITY];
    let rand = (0..100_000).map(|_| f32::from_bits(r.next_u64() as u32));
    for x in special.into_iter().chain(rand) {
        let want = half::bf16::from_f32(x);
        let got = half::bf16::from_bits(x.bf16_bits() as u16);
        if x.is_nan() {
            assert!(got.is_nan(), "{:#x}", x.to_bits());
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{x:e}");
        }
    }
}

/// The Linear wrappers read the weight in each of its forms (f32 rows, bf16 rows, the transposed f32 copy) as
/// the same bf16 matrix: forward with bias, the input gradient, the weight gradient.
#[test]
fn linear_wrappers_match_reference() {
    use super::{linear_bwd_input, linear_bwd_weight, linear_fwd, Weight};
    let (n, ic, oc) = (11, 37, 29);
    let d = Dims { n, ic, oc };
    let mut r = Rng::new(8);
    let mut v = |len: usize| (0..len).map(|_| r.normal() as f32).collect::<Vec<_>>();
    let (x, w, bias, dy, dw0) = (v(n * ic), v(oc * ic), v(oc), v(n * oc), v(oc * ic));
    let w16: Vec<u16> = w.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
    let mut wt = vec![0f32; ic * oc];
    crate::kernels::transpose::transpose(&mut wt, &w, oc, ic);
    let close = |got: f32, want: f64, mag: f64, k: usize| {
        assert!((got as f64 - want).abs() <= 1.01 * (k + 1) as f64 * 2f64.powi(-24) * mag, "{got} vs {want}");
    };
    for weight in [Weight::Rows(Data::F32(&w)), Weight::Rows(Data::Bf16(&w16)), Weight::Transposed(&wt)] {
        let mut y = vec![f32::NAN; n * oc];
        linear_fwd(&mut y, &x, weight, Some(&bias), d, false);
        for i in 0..n {
            for o in 0..oc {
                let p = (0..ic).map(|k| bf(x[i * ic + k]) * bf(w[o * ic + k]));
                let (s, mag) = p.fold((bias[o] as f64, bias[o].abs() as f64), |(s, m), t| (s + t, m + t.abs()));
                close(y[i * oc + o], s, mag, ic);
            }
        }
        let mut dx = vec![f32::NAN; n * ic];
        linear_bwd_input(&mut dx, &dy, weight, d, false);
        for i in 0..n {
            for k in 0..ic {
                let p = (0..oc).map(|o| bf(dy[i * oc + o]) * bf(w[o * ic + k]));
                let (s, mag) = p.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()));
                close(dx[i * ic + k], s, mag, oc);
            }
        }
    }
    let mut dw = dw0.clone();
    linear_bwd_weight(&mut dw, &dy, &x, d);
    for o in 0..oc {
        for k in 0..ic {
            let p = (0..n).map(|i| bf(dy[i * oc + o]) * bf(x[i * ic + k]));
            let init = (dw0[o * ic + k] as f64, dw0[o * ic + k].abs() as f64);
            let (s, mag) = p.fold(init, |(s, m), t| (s + t, m + t.abs()));
            close(dw[o * ic + k], s, mag, n);
        }
    }
}

/// A B operand packed once (`Packed`) gives bitwise the product of packing it per call, for shapes that cross
/// the AMX path's column (2048) and k-pair (512) blocks and end in partial panels, as a (OC, IC) weight both
/// ways (`PackedLinear`); where the path is not AMX nothing is packed. Reference: the per-call path itself.
#[test]
fn packed_weights_give_the_per_call_bits() {
    use super::{gemm, gemm_pre, linear_bwd_input, linear_fwd, Packed, PackedLinear, Weight};
    let mut r = Rng::new(9);
    for &(m, k, n) in &[(37, 1100, 2100), (64, 96, 40), (5, 2050, 33)] {
        let (a, b) = (Stored::new(&mut r, m, k, 0), Stored::new(&mut r, k, n, 1));
        let Some(pre) = Packed::pack(b.op(true)) else {
            assert!(!super::use_amx(), "AMX runs but nothing was packed");
            return;
        };
        assert_eq!(pre.bytes(), Packed::bytes_for(k, n));
        let (mut want, mut got) = (vec![0.5f32; m * n], vec![0.5f32; m * n]);
        gemm(&mut want, n, true, a.op(false), b.op(true));
        gemm_pre(&mut got, n, true, a.op(false), b.op(true), Some(&pre));
        assert!(want.iter().zip(&got).all(|(x, y)| x.to_bits() == y.to_bits()), "{m}x{k}x{n}");
        // as a weight: W (OC = n, IC = k) row-major bf16, forward and dX
        let w = Stored::new(&mut r, n, k, 0);
        let d = Dims { n: m, ic: k, oc: n };
        let pl = PackedLinear::new(Data::Bf16(&w.u16), d).expect("packed where AMX runs");
        assert_eq!(pl.bytes(), PackedLinear::bytes_for(d));
        let (x, dy) = (Stored::new(&mut r, m, k, 0), Stored::new(&mut r, m, n, 0));
        let wt = Weight::Packed(Data::Bf16(&w.u16), &pl);
        let (mut y, mut dx) = (vec![0f32; m * n], vec![0f32; m * k]);
        linear_fwd(&mut y, &x.f32, wt, None, d, false);
        linear_bwd_input(&mut dx, &dy.f32, wt, d, false);
        assert_eq!(y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want_y(&x, &w, d), "fwd {m}x{k}x{n}");
        assert_eq!(dx.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want_dx(&dy, &w, d), "dx {m}x{k}x{n}");
    }

    fn want_y(x: &Stored, w: &Stored, d: Dims) -> Vec<u32> {
        let mut y = vec![0f32; d.n * d.oc];
        linear_fwd(&mut y, &x.f32, Weight::Rows(Data::Bf16(&w.u16)), None, d, false);
        y.iter().map(|v| v.to_bits()).collect()
    }

    fn want_dx(dy: &Stored, w: &Stored, d: Dims) -> Vec<u32> {
        let mut dx = vec![0f32; d.n * d.ic];
        linear_bwd_input(&mut dx, &dy.f32, Weight::Rows(Data::Bf16(&w.u16)), d, false);
        dx.iter().map(|v| v.to_bits()).collect()
    }
}
