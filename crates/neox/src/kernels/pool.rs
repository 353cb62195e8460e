//! A low-latency parallel-for for decoding. A decode step is dozens of small parallel regions; rayon called from
//! a non-worker thread injects each one and wakes a sleeping worker, a large share of a batch-1 token in all
//! (docs/benchmarks.md#decode-path-tuning). Here the caller works on its own job and the helpers spin for a short
//! while between jobs (`SPIN`), then sleep on a condition variable, so a burst of regions costs little each and an
//! idle process costs nothing. Helper count follows rayon's thread count (`--threads`). One job at a time: a nested
//! or concurrent call runs on the calling thread alone.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper spins before sleeping.
const SPIN: Duration = Duration::from_micros(300);
/// Most helper threads ever started.
const MAX_HELPERS: usize = 255;
/// Most tasks in one job (16 bits of `state`); bigger jobs go to rayon.
const MAX_TASKS: usize = 0xffff;

type Task<'a> = dyn Fn(usize) + Sync + 'a;

struct Pool {
    /// (epoch << 32) | (task count << 16) | next task index. Claiming a task is a CAS on this word, so a helper
    /// can only run a task of the job it read (the job cannot finish, nor its slot be replaced, while one of its
    /// tasks is claimed).
    state: AtomicU64,
    /// The current job: a `*const Task` split in two words.
    job: [AtomicUsize; 2],
    /// Tasks finished in the current job.
    done: AtomicUsize,
    /// Helpers allowed to work on the current job (the rest stay idle).
    active: AtomicUsize,
    panicked: AtomicBool,
    submit: Mutex<()>,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
    started: Mutex<usize>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        state: AtomicU64::new(0),
        job: [AtomicUsize::new(0), AtomicUsize::new(0)],
        done: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
        submit: Mutex::new(()),
        sleepers: AtomicUsize::new(0),
        sleep: Mutex::new(()),
        wake: Condvar::new(),
        started: Mutex::new(0),
    })
}

/// Runs `f(0) .. f(n-1)`, spread over rayon's thread count (the caller included); returns when all are done.
/// Tasks must not depend on each other's order.
pub fn for_each<F: Fn(usize) + Sync>(n: usize, f: F) {
    let threads = rayon::current_num_threads().min(MAX_HELPERS + 1);
    let p = pool();
    if n > MAX_TASKS {
        use rayon::prelude::*;
        (0..n).into_par_iter().for_each(&f);
        return;
    }
    let guard = if n > 1 && threads > 1 { p.submit.try_lock().ok() } else { None };
    let Some(_guard) = guard else {
        (0..n).for_each(f);
        return;
    };
    p.ensure_helpers(threads - 1);
    let task: &Task<'_> = &f;
    // SAFETY: a fat pointer is two words; it is rebuilt only while this call waits for its tasks (see `state`).
    let words: [usize; 2] = unsafe { std::mem::transmute(task as *const Task<'_>) };
    p.job[0].store(words[0], Relaxed);
    p.job[1].store(words[1], Relaxed);
    p.done.store(0, Relaxed);
    p.active.store(threads - 1, Relaxed);
    let epoch = (p.state.load(Relaxed) >> 32).wrapping_add(1) & 0xffff_ffff;
    p.state.store(epoch << 32 | (n as u64) << 16, SeqCst);
    if p.sleepers.load(SeqCst) > 0 {
        let _l = p.sleep.lock().unwrap_or_else(|e| e.into_inner());
        p.wake.notify_all();
    }
    while let Some(i) = p.claim(epoch) {
        p.run(task, i);
    }
    while p.done.load(Acquire) < n {
        std::hint::spin_loop();
    }
    if p.panicked.swap(false, Relaxed) {
        resume_unwind(Box::new("a parallel decode task panicked"));
    }
}

impl Pool {
    /// Claims the next task of job `epoch`, if it has one left.
    fn claim(&self, epoch: u64) -> Option<usize> {
        let mut v = self.state.load(Acquire);
        loop {
            let (i, n) = ((v & 0xffff) as usize, (v >> 16 & 0xffff) as usize);
            if v >> 32 != epoch || i >= n {
                return None;
            }
            match self.state.compare_exchange_weak(v, v + 1, AcqRel, Acquire) {
                Ok(_) => return Some(i),
                Err(now) => v = now,
            }
        }
    }

    fn run(&self, task: &Task<'_>, i: usize) {
        if catch_unwind(AssertUnwindSafe(|| task(i))).is_err() {
            self.panicked.store(true, Relaxed);
        }
        self.done.fetch_add(1, Release);
    }

    fn ensure_helpers(&'static self, want: usize) {
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        while *started < want {
            let id = *started;
            let spawned = std::thread::Builder::new().name(format!("dolly-decode-{id}")).spawn(move || self.helper(id));
            if spawned.is_err() {
                break; // the caller still runs every task itself
            }
            *started += 1;
        }
    }

    /// The epoch of an unfinished job that helper `id` may join.
    fn available(&self, id: usize) -> Option<u64> {
        let v = self.state.load(Acquire);
        ((v & 0xffff) < (v >> 16 & 0xffff) && id < self.active.load(Relaxed)).then_some(v >> 32)
    }

    fn helper(&self, id: usize) {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            if let Some(epoch) = self.available(id) {
                let words = [self.job[0].load(Relaxed), self.job[1].load(Relaxed)];
                while let Some(i) = self.claim(epoch) {
                    // SAFETY: the claim succeeded for `epoch`, so the job read after the Acquire load of its state
                    // is that epoch's, and its caller waits until this task is done.
                    let task: &Task<'_> = unsafe { &*std::mem::transmute::<[usize; 2], *const Task<'_>>(words) };
                    self.run(task, i);
                }
                idle_since = Instant::now();
                continue;
            }
            // spin, reading the clock only every 256 rounds (a vDSO call each round showed up in a busy server's
            // profile, docs/benchmarks.md#decode-path-tuning)
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || idle_since.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.sleepers.fetch_add(1, SeqCst);
            let guard = if self.available(id).is_none() {
                self.wake.wait(guard).unwrap_or_else(|e| e.into_inner())
            } else {
                guard
            };
            self.sleepers.fetch_sub(1, SeqCst);
            drop(guard);
            idle_since = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once() {
        for n in [0, 1, 2, 3, 17, 1000, MAX_TASKS + 5] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for_each(n, |i| {
                hits[i].fetch_add(1, Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "n={n}");
        }
    }

    #[test]
    fn nested_and_concurrent_calls_complete() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..200 {
                        for_each(8, |_| {
                            for_each(4, |_| {
                                total.fetch_add(1, Relaxed);
                            })
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Relaxed), 3 * 200 * 8 * 4);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller() {
        let r = catch_unwind(|| for_each(64, |i| assert!(i != 40, "task 40")));
        assert!(r.is_err());
        for_each(64, |_| {}); // the pool still works
    }
}
