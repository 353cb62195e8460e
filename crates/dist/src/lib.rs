//! Collectives over the processes of one job: the `Collective` interface, its single-process implementation
//! (`Single`) and, behind the additive `mpi` feature, one over MPI (`Mpi`, rsmpi); plus how this process was
//! launched (`launch.rs`). It does not shard anything or know about models: the trainer's ZeRO code calls it.
//! Without the `mpi` feature nothing MPI is compiled or linked. An NCCL implementation is a third `Collective`
//! that uses MPI (`broadcast_bytes`) only to hand rank 0's NCCL id to the others (docs/distributed.md).

mod blocks;
mod launch;
#[cfg(feature = "mpi")]
mod mpi;

pub use launch::{detect, threads_per_rank, Launch, Launcher};
#[cfg(feature = "mpi")]
pub use mpi::Mpi;

use blocks::block_starts;
use std::fmt;

pub type Result<T> = std::result::Result<T, DistError>;

/// An error of launch detection, start-up or a collective call; the message says what to do.
#[derive(Clone, Debug, PartialEq)]
pub struct DistError(pub String);

impl fmt::Display for DistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DistError {}

pub(crate) fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(DistError(msg.into()))
}

/// Time spent inside collective calls and bytes passed to them (the buffers' sizes), since the start.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommStats {
    pub seconds: f64,
    pub bytes: u64,
    pub calls: u64,
}

/// Collectives over the processes of one job. Every rank must make the same calls in the same order, with
/// buffers of the same length and the same `counts`.
/// All buffers are in place. `counts` has one entry per rank (len == world), Σ counts == buf.len(); rank r's
/// block starts at Σ counts[..r]. Buffers of any size work (the MPI implementation splits them into rounds).
/// An error that only one rank sees (a failed file write, a bad input) must end in `abort`, not in a return
/// from `main`: the other ranks would otherwise wait in their next collective.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// "single process", or "MPI: " + the first line of MPI_Get_library_version, for start-up notes.
    fn describe(&self) -> String;
    fn barrier(&self) -> Result<()>;
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    fn all_reduce_min_u64(&self, buf: &mut [u64]) -> Result<()>;
    fn all_reduce_max_u64(&self, buf: &mut [u64]) -> Result<()>;
    /// On return rank r's block holds the elementwise sum over ranks of that block; other blocks unspecified.
    fn reduce_scatter_sum_f32(&self, buf: &mut [f32], counts: &[usize]) -> Result<()>;
    /// In place all-gather: each rank's own block is its input; on return every block holds its owner's data.
    fn all_gather_f32(&self, buf: &mut [f32], counts: &[usize]) -> Result<()>;
    /// Same for bf16 bit patterns (moved as u16).
    fn all_gather_bf16(&self, buf: &mut [u16], counts: &[usize]) -> Result<()>;
    /// Sum of bf16 values: widened to f32, summed, rounded to nearest-even once (MPI has no bf16 sum).
    fn all_reduce_sum_bf16(&self, buf: &mut [u16]) -> Result<()>;
    /// Root's bytes (length included) end up in every rank's `buf`.
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Every rank's bytes, in rank order (variable lengths).
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// End the whole job now with `code` (MPI_Abort); in the single process: std::process::exit(code).
    fn abort(&self, code: i32) -> !;
    /// Seconds spent inside collective calls and bytes passed to them since the start (for benchmarks).
    fn stats(&self) -> CommStats;
}

/// One process: world 1, reductions and gathers leave the buffer as it is. It keeps no statistics.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn describe(&self) -> String {
        "single process".into()
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_min_u64(&self, _buf: &mut [u64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_max_u64(&self, _buf: &mut [u64]) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum_f32(&self, buf: &mut [f32], counts: &[usize]) -> Result<()> {
        block_starts(counts, 1, buf.len()).map(drop)
    }
    fn all_gather_f32(&self, buf: &mut [f32], counts: &[usize]) -> Result<()> {
        block_starts(counts, 1, buf.len()).map(drop)
    }
    fn all_gather_bf16(&self, buf: &mut [u16], counts: &[usize]) -> Result<()> {
        block_starts(counts, 1, buf.len()).map(drop)
    }
    /// A one-term sum of bf16 values is the value itself (no rounding happens).
    fn all_reduce_sum_bf16(&self, _buf: &mut [u16]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, root: usize) -> Result<()> {
        if root != 0 {
            return err(format!("broadcast root {root} but the world has 1 rank"));
        }
        Ok(())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn stats(&self) -> CommStats {
        CommStats::default()
    }
}

/// The message for a multi-process launch of a binary built without the `mpi` feature.
pub const NO_MPI: &str = "this dolly was built without MPI support; build it with \
    `cargo build --release --features mpi` (needs an MPI such as Debian's libopenmpi-dev and libclang-dev)";

/// Start the collective for `launch`: `Single` for world 1 (MPI is not initialised, even when built with it);
/// `Mpi` for an MPI launch (threading Funneled; the communicator's rank and size must equal `launch`'s).
pub fn init(launch: &Launch) -> Result<Box<dyn Collective>> {
    if launch.world == 1 {
        return Ok(Box::new(Single));
    }
    if launch.launcher == Launcher::Single {
        return err(format!("a single-process launch cannot have world {}", launch.world));
    }
    init_mpi(launch)
}

#[cfg(feature = "mpi")]
fn init_mpi(launch: &Launch) -> Result<Box<dyn Collective>> {
    Ok(Box::new(Mpi::init(launch)?))
}

#[cfg(not(feature = "mpi"))]
fn init_mpi(_launch: &Launch) -> Result<Box<dyn Collective>> {
    err(NO_MPI)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(launcher: Launcher, rank: usize, world: usize) -> Launch {
        Launch { launcher, rank, world, local_rank: rank, local_world: world }
    }

    #[test]
    fn single_is_world_one_and_leaves_buffers_as_they_are() {
        let c = init(&launch(Launcher::Single, 0, 1)).unwrap();
        assert_eq!((c.rank(), c.world(), c.describe()), (0, 1, "single process".to_string()));
        let mut f = vec![1.5f32, -2.0];
        c.all_reduce_sum_f32(&mut f).unwrap();
        c.reduce_scatter_sum_f32(&mut f, &[2]).unwrap();
        c.all_gather_f32(&mut f, &[2]).unwrap();
        assert_eq!(f, [1.5, -2.0]);
        // A wrong call fails here as it would under MPI.
        assert!(c.reduce_scatter_sum_f32(&mut f, &[1, 1]).is_err());
        assert!(c.all_gather_f32(&mut f, &[3]).is_err());
        let mut h = vec![0x3f80u16, 0x7fc1];
        c.all_reduce_sum_bf16(&mut h).unwrap();
        c.all_gather_bf16(&mut h, &[2]).unwrap();
        assert_eq!(h, [0x3f80, 0x7fc1]);
        let mut u = vec![u64::MAX, 7];
        c.all_reduce_min_u64(&mut u).unwrap();
        c.all_reduce_max_u64(&mut u).unwrap();
        assert_eq!(u, [u64::MAX, 7]);
        let mut b = b"abc".to_vec();
        c.broadcast_bytes(&mut b, 0).unwrap();
        assert_eq!(b, b"abc");
        assert!(c.broadcast_bytes(&mut b, 1).is_err());
        assert_eq!(c.all_gather_bytes(b"xy").unwrap(), vec![b"xy".to_vec()]);
        c.barrier().unwrap();
        assert_eq!(c.stats().calls, 0);
    }

    #[test]
    fn init_world_one_is_single_for_any_launcher() {
        for l in [Launcher::OpenMpi, Launcher::Mpich, Launcher::Slurm] {
            assert_eq!(init(&launch(l, 0, 1)).unwrap().describe(), "single process");
        }
        assert!(init(&launch(Launcher::Single, 0, 2)).is_err());
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn init_without_the_mpi_feature_says_how_to_build_it() {
        let e = init(&launch(Launcher::OpenMpi, 0, 2)).err().unwrap().0;
        assert!(e.contains("built without MPI support") && e.contains("--features mpi"), "{e}");
    }
}
