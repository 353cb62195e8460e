//! `Collective` over MPI (feature `mpi`): rsmpi's `mpi` crate initialises and finalises MPI and names the
//! datatypes; the collectives themselves are its raw `mpi::ffi` calls with MPI_IN_PLACE (the safe API copies),
//! moved in rounds of at most `round` elements because MPI counts are `int`. Only the thread that called `init`
//! may call these (threading Funneled); rayon's workers never do.

use crate::blocks::{bf16_to_f32, block_starts, f32_to_bf16, round_pieces};
use crate::{err, Collective, CommStats, Launch, Result};
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;
use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::time::Instant;

extern "C" {
    /// `src/in_place.c`: the value of the C macro MPI_IN_PLACE.
    fn dist_mpi_in_place() -> *mut c_void;
}

/// Elements moved per MPI call; `DIST_ROUND_ELEMENTS` overrides it (tests make it small to cross rounds).
const ROUND_ELEMENTS: usize = 1 << 28;
const ROUND_VAR: &str = "DIST_ROUND_ELEMENTS";

/// The processes of an MPI job (MPI_COMM_WORLD). Dropping it finalises MPI.
pub struct Mpi {
    // Field order is drop order: the communicator before the universe, whose drop calls MPI_Finalize.
    world: SimpleCommunicator,
    _universe: Universe,
    rank: usize,
    size: usize,
    round: usize,
    version: String,
    stats: Cell<CommStats>,
}

fn check(rc: c_int, what: &str) -> Result<()> {
    if rc == ffi::MPI_SUCCESS as c_int {
        Ok(())
    } else {
        err(format!("{what} failed with MPI error code {rc}"))
    }
}

fn in_place() -> *const c_void {
    // SAFETY: returns a constant pointer; MPI never dereferences it as data.
    unsafe { dist_mpi_in_place() }
}

fn datatype<T: Equivalence>() -> ffi::MPI_Datatype {
    T::equivalent_datatype().as_raw()
}

fn round_from_env() -> Result<usize> {
    match std::env::var(ROUND_VAR) {
        Err(_) => Ok(ROUND_ELEMENTS),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 && n <= i32::MAX as usize => Ok(n),
            _ => err(format!("{ROUND_VAR}={v:?} must be a whole number from 1 to {}", i32::MAX)),
        },
    }
}

impl Mpi {
    /// MPI_Init_thread(Funneled), then checks that MPI's rank and size are the launcher's.
    pub fn init(launch: &Launch) -> Result<Mpi> {
        let round = round_from_env()?;
        let Some((universe, provided)) = mpi::initialize_with_threading(Threading::Funneled) else {
            return err("MPI was already initialised in this process");
        };
        if provided == Threading::Single {
            return err("this MPI library provides only MPI_THREAD_SINGLE; dolly needs MPI_THREAD_FUNNELED");
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if (rank, size) != (launch.rank, launch.world) {
            return err(format!(
                "MPI says this is rank {rank} of {size}, but the {:?} launcher's environment says rank {} of {}: \
                 is this binary linked to the MPI of the mpirun that started it (`ldd $(which dolly) | grep mpi`)?",
                launch.launcher, launch.rank, launch.world
            ));
        }
        let version = mpi::environment::library_version().unwrap_or_default();
        let version = version.lines().next().unwrap_or("unknown library").trim().to_string();
        Ok(Mpi { world, _universe: universe, rank, size, round, version, stats: Cell::new(CommStats::default()) })
    }

    fn comm(&self) -> ffi::MPI_Comm {
        self.world.as_raw()
    }

    /// Runs one collective call, adding its time and `bytes` to the statistics.
    fn timed<R>(&self, bytes: usize, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let start = Instant::now();
        let out = f();
        let mut s = self.stats.get();
        s.seconds += start.elapsed().as_secs_f64();
        s.bytes += bytes as u64;
        s.calls += 1;
        self.stats.set(s);
        out
    }

    fn all_reduce<T: Equivalence>(&self, buf: &mut [T], op: ffi::MPI_Op, what: &str) -> Result<()> {
        for chunk in buf.chunks_mut(self.round) {
            // SAFETY: in place over `chunk` (len <= round <= i32::MAX elements of T's MPI type).
            let rc = unsafe {
                ffi::MPI_Allreduce(
                    in_place(),
                    chunk.as_mut_ptr().cast(),
                    chunk.len() as c_int,
                    datatype::<T>(),
                    op,
                    self.comm(),
                )
            };
            check(rc, what)?;
        }
        Ok(())
    }

    /// In place MPI_Allgatherv, round by round: each round's pieces are already where they belong.
    fn all_gather<T: Equivalence>(&self, buf: &mut [T], counts: &[usize], what: &str) -> Result<()> {
        let starts = block_starts(counts, self.size, buf.len())?;
        let mut a = 0;
        while a < buf.len() {
            let b = (a + self.round).min(buf.len());
            let (n, displ) = round_pieces(&starts, counts, a, b);
            let chunk = &mut buf[a..b];
            // SAFETY: n/displ describe disjoint pieces inside `chunk`; with MPI_IN_PLACE the send count and type
            // are ignored and this rank's input is its own piece of `chunk`.
            let rc = unsafe {
                ffi::MPI_Allgatherv(
                    in_place(),
                    0,
                    datatype::<T>(),
                    chunk.as_mut_ptr().cast(),
                    n.as_ptr(),
                    displ.as_ptr(),
                    datatype::<T>(),
                    self.comm(),
                )
            };
            check(rc, what)?;
            a = b;
        }
        Ok(())
    }
}

fn sum() -> ffi::MPI_Op {
    // SAFETY: reads an MPI handle constant of the shim mpi-sys compiles.
    unsafe { ffi::RSMPI_SUM }
}
fn min() -> ffi::MPI_Op {
    // SAFETY: as `sum`.
    unsafe { ffi::RSMPI_MIN }
}
fn max() -> ffi::MPI_Op {
    // SAFETY: as `sum`.
    unsafe { ffi::RSMPI_MAX }
}

impl Drop for Mpi {
    /// A panic unwinding past the collective would finalise MPI while the other ranks wait in their next
    /// collective (a hang): end the whole job instead, with Rust's panic exit code.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort(101);
        }
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.size
    }
    fn describe(&self) -> String {
        format!("MPI: {}", self.version)
    }
    fn barrier(&self) -> Result<()> {
        // SAFETY: a barrier on this communicator.
        self.timed(0, || check(unsafe { ffi::MPI_Barrier(self.comm()) }, "MPI_Barrier"))
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.timed(std::mem::size_of_val(buf), || self.all_reduce(buf, sum(), "MPI_Allreduce(sum, f32)"))
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.timed(std::mem::size_of_val(buf), || self.all_reduce(buf, sum(), "MPI_Allreduce(sum, f64)"))
    }
    fn all_reduce_min_u64(&self, buf: &mut [u64]) -> Result<()> {
        self.timed(std::mem::size_of_val(buf), || self.all_reduce(buf, min(), "MPI_Allreduce(min, u64)"))
    }
    fn all_reduce_max_u64(&self, buf: &mut [u64]) -> Result<()> {
        self.timed(std::mem::size_of_val(buf), || self.all_reduce(buf, max(), "MPI_Allreduce(max, u64)"))
    }
    /// In place MPI_Reduce_scatter per round [a, b): each rank's sum of its piece arrives at the start of the
    /// round (MPI's in-place rule) and is moved to its place in the block.
    fn reduce_scatter_sum_f32(&self, buf: &mut [f32], counts: &[usize]) -> Result<()> {
        let starts = block_starts(counts, self.size, buf.len())?;
        self.timed(std::mem::size_of_val(buf), || {
            let mut a = 0;
            while a < buf.len() {
                let b = (a + self.round).min(buf.len());
                let (n, displ) = round_pieces(&starts, counts, a, b);
                let chunk = &mut buf[a..b];
                // SAFETY: Σ n == chunk.len() (the pieces tile the round); the result for this rank is written to
                // the first n[rank] elements of `chunk`.
                let rc = unsafe {
                    ffi::MPI_Reduce_scatter(
                        in_place(),
                        chunk.as_mut_ptr().cast(),
                        n.as_ptr(),
                        datatype::<f32>(),
                        sum(),
                        self.comm(),
                    )
                };
                check(rc, "MPI_Reduce_scatter(sum, f32)")?;
                let (mine, at) = (n[self.rank] as usize, displ[self.rank] as usize);
                chunk.copy_within(0..mine, at);
                a = b;
            }
            Ok(())
        })
    }
    fn all_gather_f32(&self, buf: &mut [f32], counts: &[usize]) -> Result<()> {
        self.timed(std::mem::size_of_val(buf), || self.all_gather(buf, counts, "MPI_Allgatherv(f32)"))
    }
    fn all_gather_bf16(&self, buf: &mut [u16], counts: &[usize]) -> Result<()> {
        self.timed(std::mem::size_of_val(buf), || self.all_gather(buf, counts, "MPI_Allgatherv(bf16 as u16)"))
    }
    /// Widened to f32 one round at a time (the scratch is at most one round), summed, rounded once.
    fn all_reduce_sum_bf16(&self, buf: &mut [u16]) -> Result<()> {
        self.timed(std::mem::size_of_val(buf), || {
            let mut wide: Vec<f32> = Vec::with_capacity(self.round.min(buf.len()));
            for chunk in buf.chunks_mut(self.round) {
                wide.clear();
                wide.extend(chunk.iter().map(|&h| bf16_to_f32(h)));
                self.all_reduce(&mut wide, sum(), "MPI_Allreduce(sum, bf16 as f32)")?;
                for (h, &x) in chunk.iter_mut().zip(&wide) {
                    *h = f32_to_bf16(x);
                }
            }
            Ok(())
        })
    }
    /// The length first (u64), then the bytes in rounds.
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.size {
            return err(format!("broadcast root {root} but the world has {} ranks", self.size));
        }
        let bytes = if self.rank == root { buf.len() } else { 0 };
        self.timed(bytes, || {
            let mut len = [buf.len() as u64];
            // SAFETY: one u64 from root.
            let rc =
                unsafe { ffi::MPI_Bcast(len.as_mut_ptr().cast(), 1, datatype::<u64>(), root as c_int, self.comm()) };
            check(rc, "MPI_Bcast(length)")?;
            if self.rank != root {
                let Ok(n) = usize::try_from(len[0]) else {
                    return err(format!("broadcast of {} bytes does not fit this machine", len[0]));
                };
                buf.clear();
                buf.resize(n, 0);
            }
            for chunk in buf.chunks_mut(self.round) {
                // SAFETY: every rank has the same length now, so the same rounds.
                let rc = unsafe {
                    ffi::MPI_Bcast(
                        chunk.as_mut_ptr().cast(),
                        chunk.len() as c_int,
                        datatype::<u8>(),
                        root as c_int,
                        self.comm(),
                    )
                };
                check(rc, "MPI_Bcast(bytes)")?;
            }
            Ok(())
        })
    }
    /// Lengths all-gathered first, then the bytes gathered in place into one buffer and split.
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.timed(mine.len(), || {
            let mut lens = vec![0u64; self.size];
            lens[self.rank] = mine.len() as u64;
            self.all_gather(&mut lens, &vec![1; self.size], "MPI_Allgatherv(lengths)")?;
            let mut counts = Vec::with_capacity(self.size);
            for &l in &lens {
                let Ok(n) = usize::try_from(l) else {
                    return err(format!("all-gather of {l} bytes does not fit this machine"));
                };
                counts.push(n);
            }
            let total = counts.iter().try_fold(0usize, |s, &c| s.checked_add(c));
            let Some(total) = total else { return err("all-gathered byte lengths overflow usize") };
            let starts = block_starts(&counts, self.size, total)?;
            let mut all = vec![0u8; total];
            all[starts[self.rank]..starts[self.rank] + mine.len()].copy_from_slice(mine);
            self.all_gather(&mut all, &counts, "MPI_Allgatherv(bytes)")?;
            Ok(starts.iter().zip(&counts).map(|(&s, &c)| all[s..s + c].to_vec()).collect())
        })
    }
    fn abort(&self, code: i32) -> ! {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        self.world.abort(code)
    }
    fn stats(&self) -> CommStats {
        self.stats.get()
    }
}
