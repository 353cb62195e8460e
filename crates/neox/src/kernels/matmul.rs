//! Matrix products through the `gemm` crate (AVX-512/AVX2 kernels picked at run time), in the three shapes a
//! Linear layer needs, plus a strided raw form for per-head attention. Row-major everywhere; a weight `w` is
//! `(OC, IC)` as in PyTorch's `nn.Linear`. Deterministic: no split-k reductions, fixed bias-sum order.

use super::SendPtr;
use gemm::Parallelism;
use rayon::prelude::*;

/// Parallelism for one whole-matrix product: all rayon threads.
pub(crate) fn par_all() -> Parallelism {
    if rayon::current_num_threads() > 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    }
}

/// dst (m×n) = alpha·dst + beta·lhs (m×k) · rhs (k×n), with explicit (row, col) strides.
///
/// # Safety
/// Pointers must be valid for every index the strides reach; `dst` must not overlap `lhs`/`rhs`, and no other
/// thread may touch the part of `dst` written here.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    dst_cs: isize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    beta: f32,
    par: Parallelism,
) {
    gemm::gemm(
        m, n, k, dst, dst_cs, dst_rs, accumulate, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, 1.0, beta, false, false,
        false, par,
    );
}

/// out (N, OC) = inp (N, IC) · wᵀ + bias, or `out +=` that when `accumulate`; `w` is (OC, IC) as stored. The
/// model uses `linear_fwd_t` instead (gemm packs this transposed operand ~1.5x slower); kept for comparison.
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd(
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    ic: usize,
    oc: usize,
    accumulate: bool,
) {
    assert!(w.len() >= oc * ic);
    // rhs = wᵀ (IC, OC): row stride 1, column stride IC
    linear_fwd_strided(out, inp, w.as_ptr(), (1, ic as isize), bias, n, ic, oc, accumulate)
}

/// out (N, OC) = inp (N, IC) · wt + bias (or `+=`), where `wt` (IC, OC) is the transposed weight, row-major.
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd_t(
    out: &mut [f32],
    inp: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    ic: usize,
    oc: usize,
    accumulate: bool,
) {
    assert!(wt.len() >= oc * ic);
    linear_fwd_strided(out, inp, wt.as_ptr(), (oc as isize, 1), bias, n, ic, oc, accumulate)
}

/// Shared body of the forward products: `rhs` (IC, OC) with (row, column) strides `rhs_strides`; the caller
/// has checked that those strides stay inside an (OC·IC)-element buffer.
#[allow(clippy::too_many_arguments)]
fn linear_fwd_strided(
    out: &mut [f32],
    inp: &[f32],
    rhs: *const f32,
    rhs_strides: (isize, isize),
    bias: Option<&[f32]>,
    n: usize,
    ic: usize,
    oc: usize,
    accumulate: bool,
) {
    assert!(out.len() >= n * oc && inp.len() >= n * ic);
    if let Some(b) = bias {
        assert_eq!(b.len(), oc);
        add_bias_rows(&mut out[..n * oc], b, accumulate);
    }
    // SAFETY: sizes asserted here and by the callers; out is exclusively borrowed.
    unsafe {
        gemm_strided(
            n,
            oc,
            ic,
            out.as_mut_ptr(),
            oc as isize,
            1,
            accumulate || bias.is_some(),
            inp.as_ptr(),
            ic as isize,
            1,
            rhs,
            rhs_strides.0,
            rhs_strides.1,
            1.0,
            par_all(),
        )
    }
}

pub use super::rows::{linear_rows, FEW_ROWS};

fn add_bias_rows(out: &mut [f32], b: &[f32], accumulate: bool) {
    let oc = b.len();
    out.par_chunks_mut(oc * 16).for_each(|rows| {
        rows.chunks_mut(oc).for_each(|r| {
            if accumulate {
                r.iter_mut().zip(b).for_each(|(o, b)| *o += b)
            } else {
                r.copy_from_slice(b)
            }
        })
    });
}

/// dinp (N, IC) = dout (N, OC) · w (OC, IC), or `+=` when `accumulate`.
pub fn linear_bwd_input(dinp: &mut [f32], dout: &[f32], w: &[f32], n: usize, ic: usize, oc: usize, accumulate: bool) {
    assert!(w.len() >= oc * ic);
    bwd_input_strided(dinp, dout, w.as_ptr(), (ic as isize, 1), n, ic, oc, accumulate)
}

/// `linear_bwd_input` reading the weight from its transposed (IC, OC) copy `wt` (gemm packs it transposed, ~1.5x
/// slower; used where only that copy holds the values wanted, as in bf16 compute).
pub fn linear_bwd_input_t(dinp: &mut [f32], dout: &[f32], wt: &[f32], n: usize, ic: usize, oc: usize) {
    assert!(wt.len() >= oc * ic);
    // W[o][i] = wt[i * oc + o]
    bwd_input_strided(dinp, dout, wt.as_ptr(), (1, oc as isize), n, ic, oc, false)
}

/// dinp (N, IC) (+)= dout (N, OC) · W, W (OC, IC) read at `w` with (row, col) strides `ws`; the caller asserted
/// that every element W[o][i], o < OC, i < IC, is inside w's buffer.
#[allow(clippy::too_many_arguments)]
fn bwd_input_strided(
    dinp: &mut [f32],
    dout: &[f32],
    w: *const f32,
    ws: (isize, isize),
    n: usize,
    ic: usize,
    oc: usize,
    accumulate: bool,
) {
    assert!(dinp.len() >= n * ic && dout.len() >= n * oc);
    // SAFETY: sizes asserted above and by the callers; dinp is exclusively borrowed.
    unsafe {
        gemm_strided(
            n,
            ic,
            oc,
            dinp.as_mut_ptr(),
            ic as isize,
            1,
            accumulate,
            dout.as_ptr(),
            oc as isize,
            1,
            w,
            ws.0,
            ws.1,
            1.0,
            par_all(),
        )
    }
}

/// dw (OC, IC) += doutᵀ (OC, N) · inp (N, IC); dbias (OC) += column sums of dout.
pub fn linear_bwd_weight(
    dw: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    n: usize,
    ic: usize,
    oc: usize,
) {
    linear_bwd_weight_t(dw, dout, inp, n, ic, oc);
    if let Some(db) = dbias {
        col_sum_acc(db, dout, n, oc);
    }
}

/// The product of `linear_bwd_weight` (without the bias), computed as dWᵀ (IC, OC) += inpᵀ · dout with dW
/// addressed column-major: `gemm` then never packs a transposed (OC, N) operand (5-15% faster, measured with
/// `examples/kernel_times`).
pub fn linear_bwd_weight_t(dw: &mut [f32], dout: &[f32], inp: &[f32], n: usize, ic: usize, oc: usize) {
    assert!(dw.len() >= oc * ic && dout.len() >= n * oc && inp.len() >= n * ic);
    // SAFETY: sizes asserted above; dw is exclusively borrowed.
    unsafe {
        gemm_strided(
            ic,
            oc,
            n,
            dw.as_mut_ptr(),
            1,
            ic as isize,
            true,
            inp.as_ptr(),
            1,
            ic as isize,
            dout.as_ptr(),
            oc as isize,
            1,
            1.0,
            par_all(),
        )
    }
}

/// acc (C) += Σ_rows x (N, C). Columns are split across threads; each column is summed in row order, so the
/// result does not depend on the thread count.
pub fn col_sum_acc(acc: &mut [f32], x: &[f32], n: usize, c: usize) {
    assert!(acc.len() == c && x.len() >= n * c);
    const COLS: usize = 256;
    let xp = SendPtr(x.as_ptr() as *mut f32);
    acc.par_chunks_mut(COLS).enumerate().for_each(|(ci, a)| {
        let c0 = ci * COLS;
        for r in 0..n {
            // SAFETY: r < n and c0 + a.len() <= c, inside x (asserted); read-only.
            let row = unsafe { std::slice::from_raw_parts(xp.get().add(r * c + c0), a.len()) };
            pulp::Arch::new().dispatch(|| {
                for (a, &v) in a.iter_mut().zip(row) {
                    *a += v;
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::panels::{linear_panels, pack_bf16, packed_lines, Line};
    use crate::kernels::transpose::transpose;

    fn naive(inp: &[f32], w: &[f32], b: &[f32], n: usize, ic: usize, oc: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * oc];
        for i in 0..n {
            for o in 0..oc {
                let mut s = b[o] as f64;
                for k in 0..ic {
                    s += inp[i * ic + k] as f64 * w[o * ic + k] as f64;
                }
                out[i * oc + o] = s as f32;
            }
        }
        out
    }

    #[test]
    fn linear_matches_naive_forward_and_backward() {
        let (n, ic, oc) = (7, 37, 5);
        let mut r = common::Rng::new(1);
        let mut v = |k: usize| (0..k).map(|_| r.normal() as f32).collect::<Vec<_>>();
        let (inp, w, b, dout) = (v(n * ic), v(oc * ic), v(oc), v(n * oc));
        let mut out = vec![0f32; n * oc];
        linear_fwd(&mut out, &inp, &w, Some(&b), n, ic, oc, false);
        for (a, e) in out.iter().zip(naive(&inp, &w, &b, n, ic, oc)) {
            assert!((a - e).abs() < 1e-5);
        }
        let mut wt = vec![0f32; ic * oc];
        transpose(&mut wt, &w, oc, ic);
        let mut out_t = vec![0f32; n * oc];
        linear_fwd_t(&mut out_t, &inp, &wt, Some(&b), n, ic, oc, false);
        for (a, e) in out_t.iter().zip(&out) {
            assert!((a - e).abs() < 1e-5);
        }
        let mut out_r = vec![0f32; n * oc];
        linear_rows(&mut out_r, &inp, &w, Some(&b), n, ic, oc, false);
        linear_rows(&mut out_r, &inp, &w, None, n, ic, oc, true);
        for ((a, e), bb) in out_r.iter().zip(&out).zip(b.iter().cycle()) {
            assert!((a - (2.0 * e - bb)).abs() < 1e-4);
        }
        let mut wb = vec![Line::default(); packed_lines(oc, ic)];
        pack_bf16(&mut wb, &w, oc, ic);
        let mut out_b = vec![0f32; n * oc];
        linear_panels(&mut out_b, &inp, &wb, Some(&b), n, ic, oc, false);
        for (a, e) in out_b.iter().zip(&out) {
            assert!((a - e).abs() < 0.05 * (1.0 + e.abs()), "bf16 {a} vs {e}");
        }
        let mut dinp = vec![0f32; n * ic];
        linear_bwd_input(&mut dinp, &dout, &w, n, ic, oc, false);
        for i in 0..n {
            for k in 0..ic {
                let e: f32 = (0..oc).map(|o| dout[i * oc + o] * w[o * ic + k]).sum();
                assert!((dinp[i * ic + k] - e).abs() < 1e-5);
            }
        }
        let mut dw = vec![1f32; oc * ic];
        let mut db = vec![1f32; oc];
        linear_bwd_weight(&mut dw, Some(&mut db), &dout, &inp, n, ic, oc);

        for o in 0..oc {
            let e: f32 = 1.0 + (0..n).map(|i| dout[i * oc + o]).sum::<f32>();
            assert!((db[o] - e).abs() < 1e-5);
            for k in 0..ic {
                let e: f32 = 1.0 + (0..n).map(|i| dout[i * oc + o] * inp[i * ic + k]).sum::<f32>();
                assert!((dw[o * ic + k] - e).abs() < 1e-4);
            }
        }
    }
}
