//! Pure arithmetic the collectives share: the blocks `counts` cut a buffer into, the per-rank pieces of one
//! round of a buffer that is moved in rounds (MPI counts are `int`), and bf16 <-> f32.

use crate::{err, DistError, Result};

/// Checks `counts` against the world and the buffer (the same rule for every implementation, so a wrong call
/// fails in the single process too, not only under MPI). Returns each rank's block start.
pub(crate) fn block_starts(counts: &[usize], world: usize, len: usize) -> Result<Vec<usize>> {
    if counts.len() != world {
        return err(format!("collective counts have {} entries for {} ranks (one per rank)", counts.len(), world));
    }
    let mut starts = Vec::with_capacity(world);
    let mut sum = 0usize;
    for &c in counts {
        starts.push(sum);
        sum = sum.checked_add(c).ok_or_else(|| DistError("collective counts overflow usize".into()))?;
    }
    if sum != len {
        return err(format!("collective counts sum to {sum} but the buffer has {len} elements"));
    }
    Ok(starts)
}

/// The round `[a, b)` of a buffer cut into blocks (`starts`, `counts`): each rank's part of the round as
/// (count, displacement from `a`). Blocks outside the round get (0, 0). `b - a` must fit an MPI `int`.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn round_pieces(starts: &[usize], counts: &[usize], a: usize, b: usize) -> (Vec<i32>, Vec<i32>) {
    let mut n = Vec::with_capacity(counts.len());
    let mut displ = Vec::with_capacity(counts.len());
    for (&s, &c) in starts.iter().zip(counts) {
        let (lo, hi) = (s.max(a), (s + c).min(b));
        if hi > lo {
            n.push((hi - lo) as i32);
            displ.push((lo - a) as i32);
        } else {
            n.push(0);
            displ.push(0);
        }
    }
    (n, displ)
}

/// bf16 bits -> f32 (exact).
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    half::bf16::from_bits(h).to_f32()
}

/// f32 -> bf16 bits, rounded to nearest, ties to even (NaN stays NaN).
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_starts_follow_counts_and_reject_wrong_ones() {
        assert_eq!(block_starts(&[3, 0, 2], 3, 5).unwrap(), vec![0, 3, 3]);
        assert_eq!(block_starts(&[], 0, 0).unwrap(), Vec::<usize>::new());
        let e = block_starts(&[3, 2], 3, 5).unwrap_err().0;
        assert!(e.contains("2 entries for 3 ranks"), "{e}");
        let e = block_starts(&[3, 1, 2], 3, 5).unwrap_err().0;
        assert!(e.contains("sum to 6") && e.contains("5 elements"), "{e}");
        assert!(block_starts(&[usize::MAX, 1], 2, 0).is_err());
    }

    /// Blocks [0,5) [5,5) [5,12) in rounds of 4: every element lands in exactly one round piece of its owner.
    #[test]
    fn round_pieces_cover_each_block_once() {
        let counts = [5, 0, 7];
        let starts = block_starts(&counts, 3, 12).unwrap();
        assert_eq!(round_pieces(&starts, &counts, 0, 4), (vec![4, 0, 0], vec![0, 0, 0]));
        assert_eq!(round_pieces(&starts, &counts, 4, 8), (vec![1, 0, 3], vec![0, 0, 1]));
        assert_eq!(round_pieces(&starts, &counts, 8, 12), (vec![0, 0, 4], vec![0, 0, 0]));
        let mut owner = vec![usize::MAX; 12];
        for a in (0..12).step_by(4) {
            let (n, d) = round_pieces(&starts, &counts, a, a + 4);
            assert_eq!(n.iter().sum::<i32>(), 4);
            for q in 0..3 {
                for i in 0..n[q] as usize {
                    let at = a + d[q] as usize + i;
                    assert_eq!(owner[at], usize::MAX, "element {at} twice");
                    owner[at] = q;
                }
            }
        }
        assert_eq!(owner, [0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2]);
    }

    /// Expected bits worked by hand: 257 is halfway between the bf16 neighbours 256 and 258 (spacing 2 at 2^8)
    /// and rounds to the even mantissa 256; 259 rounds to 260; 1 + 2^-8 (halfway 1 .. 1 + 2^-7) to 1.
    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(f32_to_bf16(257.0), 0x4380);
        assert_eq!(bf16_to_f32(0x4380), 256.0);
        assert_eq!(bf16_to_f32(f32_to_bf16(259.0)), 260.0);
        assert_eq!(bf16_to_f32(f32_to_bf16(257.5)), 258.0);
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80);
    }
}
