//! Checks every `Collective` of the MPI implementation under `mpirun -np N` (run by tests/mpi.rs): each rank
//! fills its buffers with values any rank can compute, so it checks the result against what it computes
//! itself. Sums are of small integers (exact in f32 whatever the order), so any wrong element is a bug. Uneven
//! counts with a zero, buffers longer than one round (`DIST_ROUND_ELEMENTS` must be set small), bf16 rounded
//! once. Prints `ok rank R` and exits 0, or names the first mismatch and exits 1.
//! `DIST_TEST_DIE=1`: rank 1 aborts before the first barrier (the fault test).

use dist::Collective;
use std::process::ExitCode;

/// Rank q's value at index i: a small integer (exact sums over any number of ranks).
fn f(q: usize, i: usize) -> f32 {
    ((q + 1) * (i % 97)) as f32 - 40.0
}

/// bf16 bits of rank q at index i. Rank 0 holds 2^8 .. 2^11, the others small integers, so the f32 sum is exact
/// but often halfway between two bf16 values: rounding once gives the nearest even, summing in bf16 would not.
fn h(q: usize, i: usize) -> u16 {
    let x = if q == 0 { (256 << (i % 4)) as f32 } else { ((i + q) % 5) as f32 };
    half::bf16::from_f32(x).to_bits()
}

fn u(q: usize, i: usize) -> u64 {
    (u64::MAX - (i as u64) * 1_000_003).rotate_left((q * 7 + i) as u32 % 64)
}

fn bytes_of(q: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (q * 31 + i * 7) as u8).collect()
}

/// Block counts for `w` ranks: rank 1 gets nothing, rank 0 spans several rounds, the rest are uneven.
fn counts(w: usize, round: usize, flip: bool) -> Vec<usize> {
    let mut c: Vec<usize> = (0..w)
        .map(|r| match r {
            0 => 2 * round + 3,
            1 => 0,
            r => round / 2 + r,
        })
        .collect();
    if flip {
        c.reverse();
    }
    c
}

struct Check {
    rank: usize,
    failed: Option<String>,
}

impl Check {
    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, i: usize, got: T, want: T) {
        if self.failed.is_none() && got != want {
            self.failed = Some(format!("rank {}: {what} at {i}: got {got:?}, want {want:?}", self.rank));
        }
    }
}

fn run(c: &dyn Collective, round: usize, ck: &mut Check) -> dist::Result<()> {
    let (r, w) = (c.rank(), c.world());
    ck.eq("describe", 0, c.describe().starts_with("MPI: "), true);

    // All-reduce below and above one round.
    for n in [1, 13, 3 * round + 1] {
        let mut a: Vec<f32> = (0..n).map(|i| f(r, i)).collect();
        c.all_reduce_sum_f32(&mut a)?;
        for (i, &x) in a.iter().enumerate() {
            ck.eq("all_reduce_sum_f32", i, x, (0..w).map(|q| f(q, i)).sum::<f32>());
        }
        let mut d: Vec<f64> = (0..n).map(|i| f(r, i) as f64 * 0.25).collect();
        c.all_reduce_sum_f64(&mut d)?;
        for (i, &x) in d.iter().enumerate() {
            ck.eq("all_reduce_sum_f64", i, x, (0..w).map(|q| f(q, i) as f64 * 0.25).sum::<f64>());
        }
        let mut lo: Vec<u64> = (0..n).map(|i| u(r, i)).collect();
        let mut hi = lo.clone();
        c.all_reduce_min_u64(&mut lo)?;
        c.all_reduce_max_u64(&mut hi)?;
        for i in 0..n {
            ck.eq("all_reduce_min_u64", i, lo[i], (0..w).map(|q| u(q, i)).min().unwrap_or(0));
            ck.eq("all_reduce_max_u64", i, hi[i], (0..w).map(|q| u(q, i)).max().unwrap_or(0));
        }
        let mut b: Vec<u16> = (0..n).map(|i| h(r, i)).collect();
        c.all_reduce_sum_bf16(&mut b)?;
        for (i, &x) in b.iter().enumerate() {
            let exact: f32 = (0..w).map(|q| half::bf16::from_bits(h(q, i)).to_f32()).sum();
            ck.eq("all_reduce_sum_bf16", i, x, half::bf16::from_f32(exact).to_bits());
        }
    }

    // Reduce-scatter and all-gathers: one small uneven split, and two spanning rounds (zero count included).
    let small: Vec<usize> = (0..w).map(|q| q % 3).collect();
    for cs in [small, counts(w, round, false), counts(w, round, true)] {
        let n: usize = cs.iter().sum();
        let start: usize = cs[..r].iter().sum();
        let mine = start..start + cs[r];
        let mut a: Vec<f32> = (0..n).map(|i| f(r, i)).collect();
        c.reduce_scatter_sum_f32(&mut a, &cs)?;
        for i in mine.clone() {
            ck.eq("reduce_scatter_sum_f32", i, a[i], (0..w).map(|q| f(q, i)).sum::<f32>());
        }
        let owner = |i: usize| {
            let mut s = 0;
            (0..w).find(|&q| {
                s += cs[q];
                i < s
            })
        };
        // Only the own block is input; the rest holds garbage that must be overwritten.
        let mut g: Vec<f32> = (0..n).map(|i| if mine.contains(&i) { f(r, i) } else { f32::NAN }).collect();
        c.all_gather_f32(&mut g, &cs)?;
        for (i, &x) in g.iter().enumerate() {
            ck.eq("all_gather_f32", i, x.to_bits(), f(owner(i).unwrap_or(0), i).to_bits());
        }
        let mut g: Vec<u16> = (0..n).map(|i| if mine.contains(&i) { h(r, i) } else { 0xffff }).collect();
        c.all_gather_bf16(&mut g, &cs)?;
        for (i, &x) in g.iter().enumerate() {
            ck.eq("all_gather_bf16", i, x, h(owner(i).unwrap_or(0), i));
        }
    }

    // Broadcast: from the last rank, longer than a round, into buffers of other lengths; then an empty one.
    for (root, len) in [(w - 1, 2 * round + 5), (0, 0)] {
        let mut b = if r == root { bytes_of(root, len) } else { vec![9; 3] };
        c.broadcast_bytes(&mut b, root)?;
        ck.eq("broadcast_bytes length", 0, b.len(), len);
        ck.eq("broadcast_bytes", 0, b == bytes_of(root, len), true);
    }

    // All-gather of variable lengths: rank 1 sends nothing, the others more than a round.
    let len = |q: usize| if q == 1 { 0 } else { q * round + 3 };
    let all = c.all_gather_bytes(&bytes_of(r, len(r)))?;
    ck.eq("all_gather_bytes ranks", 0, all.len(), w);
    for (q, b) in all.iter().enumerate() {
        ck.eq("all_gather_bytes", q, b == &bytes_of(q, len(q)), true);
    }

    c.barrier()?;
    let s = c.stats();
    // main's barrier, 3 sizes x 5 all-reduces, 3 splits x 3, 2 broadcasts, 1 byte all-gather, this barrier.
    ck.eq("stats calls", 0, s.calls, 1 + 3 * 5 + 3 * 3 + 2 + 1 + 1);
    ck.eq("stats bytes", 0, s.bytes > 0 && s.seconds > 0.0, true);
    Ok(())
}

fn main() -> ExitCode {
    let launch = match dist::detect(&|k| std::env::var(k).ok(), None) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("launch: {e}");
            return ExitCode::FAILURE;
        }
    };
    let round = match std::env::var("DIST_ROUND_ELEMENTS").ok().and_then(|v| v.parse::<usize>().ok()) {
        Some(n) if (1..=1 << 16).contains(&n) => n,
        _ => {
            eprintln!("set DIST_ROUND_ELEMENTS to a small round size (1..65536) so buffers cross rounds");
            return ExitCode::FAILURE;
        }
    };
    let c = match dist::init(&launch) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("init: {e}");
            return ExitCode::FAILURE;
        }
    };
    if c.world() < 2 {
        eprintln!("run under mpirun -np 2 or more (world is {})", c.world());
        return ExitCode::FAILURE;
    }
    if std::env::var("DIST_TEST_DIE").as_deref() == Ok("1") && c.rank() == 1 {
        std::process::abort();
    }
    let mut ck = Check { rank: c.rank(), failed: None };
    if let Err(e) = c.barrier().and_then(|_| run(c.as_ref(), round, &mut ck)) {
        eprintln!("rank {}: {e}", c.rank());
        c.abort(1);
    }
    match ck.failed {
        None => {
            println!("ok rank {} of {} ({})", c.rank(), c.world(), c.describe());
            ExitCode::SUCCESS
        }
        Some(why) => {
            eprintln!("{why}");
            ExitCode::FAILURE
        }
    }
}
