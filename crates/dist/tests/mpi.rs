//! Runs `examples/collectives.rs` under Open MPI's `mpirun` on loopback with 2 and 3 ranks (oversubscribed on
//! a 2-core machine), with a hard timeout, and checks that a rank that dies ends the job with a non-zero exit
//! in bounded time. Builds nothing itself: `cargo test --release -p dist --features mpi` builds the example
//! (`--test mpi` alone does not, and would run a stale one).

#![cfg(feature = "mpi")]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);

/// One job at a time: the tests share two cores, and the fault test's time should be its own.
static ONE_JOB: Mutex<()> = Mutex::new(());

/// `target/<profile>/examples/collectives`, next to this test's `deps/` directory.
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    let path = profile.join("examples").join("collectives");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo test --release -p dist --features mpi` (which builds the examples), or \
         `cargo build --release -p dist --features mpi --examples` first",
        path.display()
    );
    path
}

fn mpirun() -> PathBuf {
    let out = Command::new("which").arg("mpirun").output().expect("run `which mpirun`");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !path.is_empty(),
        "no `mpirun` on PATH: install Open MPI (Debian: apt-get install openmpi-bin libopenmpi-dev)"
    );
    PathBuf::from(path)
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// `mpirun -np N` on loopback in its own process group; the whole group is killed after TIMEOUT.
fn run_mpi(np: usize, env: &[(&str, &str)]) -> Outcome {
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new(mpirun());
    cmd.args(["--bind-to", "none", "--oversubscribe", "--mca", "btl", "self,vader", "-np"])
        .arg(np.to_string())
        .arg(example())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("DIST_ROUND_ELEMENTS", "1000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("start mpirun");
    let pipe = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = pipe(Box::new(child.stdout.take().expect("stdout")));
    let err = pipe(Box::new(child.stderr.take().expect("stderr")));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for mpirun") {
            break Some(status);
        }
        if start.elapsed() > TIMEOUT {
            // SAFETY: signals the process group this test created (its id is mpirun's pid).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = start.elapsed();
    let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    match status {
        None => panic!("mpirun -np {np} did not finish within {TIMEOUT:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"),
        Some(s) => Outcome { code: s.code(), stdout, stderr, took },
    }
}

fn collectives_pass(np: usize) {
    let o = run_mpi(np, &[]);
    assert_eq!(o.code, Some(0), "mpirun -np {np} failed\nstdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    for r in 0..np {
        let n = o.stdout.lines().filter(|l| l.starts_with(&format!("ok rank {r} of {np} (MPI: "))).count();
        assert_eq!(n, 1, "rank {r}: expected one `ok` line\nstdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    }
    eprintln!("mpirun -np {np}: all collectives ok in {:.2?}", o.took);
}

#[test]
fn collectives_at_two_ranks() {
    collectives_pass(2);
}

#[test]
fn collectives_at_three_ranks() {
    collectives_pass(3);
}

/// Rank 1 aborts before a barrier rank 0 is waiting in: mpirun must end the job with a non-zero exit, well
/// within the timeout (run_mpi panics if it hangs).
#[test]
fn a_dead_rank_ends_the_job() {
    let o = run_mpi(2, &[("DIST_TEST_DIE", "1")]);
    eprintln!("mpirun -np 2 with a dead rank exited with {:?} after {:.2?}", o.code, o.took);
    assert_ne!(o.code, Some(0), "the job succeeded although rank 1 died\nstderr:\n{}", o.stderr);
    assert!(!o.stdout.contains("ok rank"), "a rank finished although rank 1 died:\n{}", o.stdout);
}
