//! Packing for the `vdpbf16ps` kernel. `vdpbf16ps acc, a, b` adds, in each of 16 f32 lanes j,
//! a[2j]·b[2j] + a[2j+1]·b[2j+1]: the two bf16 halves of a 32-bit word are two consecutive k. So both operands
//! are stored as k-pairs, one u32 per (pair, lane): bits 0..16 hold k = 2p, bits 16..32 hold k = 2p + 1.
//!
//! A panel covers `w` lanes (MR rows of A, or NR columns of B) and `kp` k-pairs:
//! `panel[p·w + l] = bf16(k = 2p, lane l) | bf16(k = 2p + 1, lane l) << 16`.
//! The kernel loads 16 consecutive lanes of a B panel as one vector and broadcasts one word of an A panel.
//! Lanes past the matrix edge and the missing partner of an odd k are zero (they add nothing).

use super::Elem;

/// A matrix as the packer reads it: element (k, x) at `src[k·sk + x·sx]` for k < kn, x < xn (x = the row of A
/// or the column of B).
#[derive(Clone, Copy)]
pub(super) struct Src<'a, E> {
    pub src: &'a [E],
    pub sk: usize,
    pub sx: usize,
    pub kn: usize,
    pub xn: usize,
}

/// Packs k-pairs `p0..p0 + kp` of lanes `x0..x0 + w` into `dst` (kp·w words), as the module describes.
#[inline(always)]
pub(super) fn panel<E: Elem>(dst: &mut [u32], m: Src<'_, E>, p0: usize, kp: usize, x0: usize, w: usize) {
    let dst = &mut dst[..kp * w];
    let lanes = w.min(m.xn.saturating_sub(x0));
    // pairs with both halves inside the matrix, then at most one with only its first half
    let full = (m.kn / 2).clamp(p0, p0 + kp) - p0;
    let half = usize::from(m.kn % 2 == 1 && (p0..p0 + kp).contains(&(m.kn / 2)));
    if lanes < w || full + half < kp {
        dst.fill(0);
    }
    if lanes == 0 || full + half == 0 {
        return;
    }
    let (sk, sx) = (m.sk, m.sx);
    let at = |k: usize, x: usize| k * sk + x * sx;
    if sx == 1 {
        // lanes contiguous in memory: two source rows give one packed row
        for p in 0..full {
            let k = 2 * (p0 + p);
            let r0 = &m.src[at(k, x0)..][..lanes];
            let r1 = &m.src[at(k + 1, x0)..][..lanes];
            for ((d, a), b) in dst[p * w..][..lanes].iter_mut().zip(r0).zip(r1) {
                *d = a.bf16_bits() | b.bf16_bits() << 16;
            }
        }
        if half == 1 {
            let r0 = &m.src[at(m.kn - 1, x0)..][..lanes];
            for (d, a) in dst[full * w..][..lanes].iter_mut().zip(r0) {
                *d = a.bf16_bits();
            }
        }
    } else if sk == 1 {
        // k contiguous: each lane's run of k gives one packed column
        for l in 0..lanes {
            let run = &m.src[at(2 * p0, x0 + l)..][..2 * full + half];
            let col = dst[l..].iter_mut().step_by(w);
            for (d, pair) in col.zip(run.chunks_exact(2)) {
                *d = pair[0].bf16_bits() | pair[1].bf16_bits() << 16;
            }
            if half == 1 {
                dst[full * w + l] = run[2 * full].bf16_bits();
            }
        }
    } else {
        for p in 0..full {
            let k = 2 * (p0 + p);
            for (l, d) in dst[p * w..][..lanes].iter_mut().enumerate() {
                *d = m.src[at(k, x0 + l)].bf16_bits() | m.src[at(k + 1, x0 + l)].bf16_bits() << 16;
            }
        }
        if half == 1 {
            for (l, d) in dst[full * w..][..lanes].iter_mut().enumerate() {
                *d = m.src[at(m.kn - 1, x0 + l)].bf16_bits();
            }
        }
    }
}
