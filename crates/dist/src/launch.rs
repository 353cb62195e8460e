//! How this process was started: rank, world and node-local rank from the launcher's environment (Open MPI's
//! mpirun, MPICH's hydra, Slurm's srun with PMI) and the `--local_rank` flag deepspeed appends. A pure function of
//! the environment; it starts nothing. Torch-style launchers (torchrun, deepspeed's local launcher) rendezvous over
//! TCP, which dolly does not speak: they get an error naming the MPI command to use instead.

use crate::{err, DistError, Result};

/// How this process was started.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub launcher: Launcher,
    pub rank: usize,
    pub world: usize,
    /// This process's index among the ranks on its node, and how many ranks the node has.
    pub local_rank: usize,
    pub local_world: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Launcher {
    Single,
    /// mpirun/mpiexec of Open MPI: OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}.
    OpenMpi,
    /// MPICH's hydra (mpiexec): PMI_RANK/PMI_SIZE, MPI_LOCALRANKID/MPI_LOCALNRANKS.
    Mpich,
    /// srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_TASKS_PER_NODE/SLURM_NTASKS_PER_NODE; needs PMI.
    Slurm,
}

/// The variables that tell an MPI library started by srun how to reach its peers (pmix, pmi2, pmi1).
const PMI_VARS: [&str; 4] = ["PMIX_RANK", "PMIX_NAMESPACE", "PMI_RANK", "PMI_FD"];

/// What the torch-style error suggests (also written out in docs/distributed.md, "Building and launching").
fn mpi_commands(world: usize) -> String {
    format!(
        "start the {world} processes with an MPI launcher instead: `mpirun --bind-to none -np {world} dolly ...` \
         (Open MPI; MPICH: `mpiexec -n {world} dolly ...`), `srun --mpi=pmix -n {world} dolly ...` under Slurm, \
         or deepspeed through mpirun: `deepspeed --hostfile HOSTFILE --no_ssh_check --launcher openmpi \
         --launcher_args \"--bind-to none\" --force_multi --no_python dolly ...` (see docs/distributed.md)"
    )
}

/// A variable's value; unset and empty are the same.
fn var(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name).filter(|v| !v.trim().is_empty())
}

fn num(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>> {
    match var(env, name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|_| DistError(format!("environment variable {name}={v:?} is not a non-negative integer"))),
    }
}

fn need(env: &dyn Fn(&str) -> Option<String>, name: &str, because: &str) -> Result<usize> {
    num(env, name)?.ok_or_else(|| DistError(format!("{because} is set but {name} is not")))
}

/// A launch read from the environment, with the names of the variables it came from (for error messages).
struct Found {
    launch: Launch,
    rank_var: &'static str,
    world_var: &'static str,
    local_rank_var: &'static str,
    local_world_var: &'static str,
}

/// Node-local rank and size; a launcher that does not say is taken to have put every rank on this node (the
/// fewest threads per rank, so never oversubscribed).
fn local(
    env: &dyn Fn(&str) -> Option<String>,
    names: (&'static str, &'static str),
    rank: usize,
    world: usize,
) -> Result<(usize, usize, &'static str, &'static str)> {
    match (num(env, names.0)?, num(env, names.1)?) {
        (Some(r), Some(w)) => Ok((r, w, names.0, names.1)),
        (Some(r), None) => Ok((r, world, names.0, "its world size")),
        _ => Ok((rank, world, "its rank", "its world size")),
    }
}

/// SLURM_TASKS_PER_NODE's form, e.g. "2(x3),1": tasks on each node of the step, in node order.
fn tasks_per_node(v: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in v.split(',') {
        let part = part.trim();
        match part.split_once("(x") {
            Some((n, rep)) => {
                let n: usize = n.parse().ok()?;
                let rep: usize = rep.strip_suffix(')')?.parse().ok()?;
                out.extend(std::iter::repeat_n(n, rep));
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

fn slurm(env: &dyn Fn(&str) -> Option<String>) -> Result<Found> {
    let rank = need(env, "SLURM_PROCID", "SLURM_PROCID")?;
    let (world, world_var) = match num(env, "SLURM_NTASKS")? {
        Some(w) => (w, "SLURM_NTASKS"),
        None => (need(env, "SLURM_NPROCS", "SLURM_PROCID (without SLURM_NTASKS)")?, "SLURM_NPROCS"),
    };
    if world > 1 && !PMI_VARS.iter().any(|v| var(env, v).is_some()) {
        return err(format!(
            "Slurm started this process as task {rank} of {world} (SLURM_PROCID, {world_var}) without PMI, so MPI \
             cannot connect the tasks: launch them with `srun --mpi=pmix dolly ...` (or `--mpi=pmi2`; \
             `srun --mpi=list` shows what this cluster has), or run `mpirun` inside the allocation"
        ));
    }
    let local_rank = num(env, "SLURM_LOCALID")?;
    let node = num(env, "SLURM_NODEID")?;
    let per_node = match (var(env, "SLURM_TASKS_PER_NODE"), node) {
        (Some(v), Some(node)) => {
            let list = tasks_per_node(&v).ok_or_else(|| {
                DistError(format!("environment variable SLURM_TASKS_PER_NODE={v:?} is not like \"2(x3),1\""))
            })?;
            let n = list.get(node).copied().ok_or_else(|| {
                DistError(format!("SLURM_NODEID={node} but SLURM_TASKS_PER_NODE={v:?} lists {} nodes", list.len()))
            })?;
            Some((n, "SLURM_TASKS_PER_NODE"))
        }
        _ => num(env, "SLURM_NTASKS_PER_NODE")?.map(|n| (n, "SLURM_NTASKS_PER_NODE")),
    };
    let (local_world, local_world_var) = per_node.unwrap_or((world, "its world size"));
    let (local_rank, local_rank_var) = match local_rank {
        Some(r) => (r, "SLURM_LOCALID"),
        None => (rank, "its rank"),
    };
    Ok(Found {
        launch: Launch { launcher: crate::Launcher::Slurm, rank, world, local_rank, local_world },
        rank_var: "SLURM_PROCID",
        world_var,
        local_rank_var,
        local_world_var,
    })
}

/// torchrun or deepspeed's local launcher: fine for one process, an error naming the MPI command otherwise.
fn torch_style(env: &dyn Fn(&str) -> Option<String>, flag: Option<usize>) -> Result<Option<Found>> {
    let rank = num(env, "RANK")?;
    let local_rank = num(env, "LOCAL_RANK")?;
    if rank.is_none() && local_rank.is_none() && var(env, "WORLD_SIZE").is_none() {
        return Ok(None);
    }
    let world = [num(env, "WORLD_SIZE")?, num(env, "LOCAL_WORLD_SIZE")?, num(env, "LOCAL_SIZE")?]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(1);
    let (rank, local_rank) = (rank.unwrap_or(0), local_rank.unwrap_or(0));
    if world > 1 || rank > 0 || local_rank > 0 {
        let who = if var(env, "TORCHELASTIC_RUN_ID").is_some() {
            "torchrun"
        } else if flag.is_some() || var(env, "CROSS_RANK").is_some() || var(env, "LOCAL_SIZE").is_some() {
            "deepspeed's local launcher"
        } else {
            "a torch-style launcher"
        };
        return err(format!(
            "{who} started this process (RANK={rank}, LOCAL_RANK={local_rank}, world {world}) with a TCP \
             rendezvous (MASTER_ADDR/MASTER_PORT), which dolly does not use: its processes connect through MPI; {}",
            mpi_commands(world.max(2))
        ));
    }
    Ok(Some(Found {
        launch: Launch { launcher: crate::Launcher::Single, rank: 0, world: 1, local_rank: 0, local_world: 1 },
        rank_var: "RANK",
        world_var: "WORLD_SIZE",
        local_rank_var: "LOCAL_RANK",
        local_world_var: "WORLD_SIZE",
    }))
}

fn from_env(env: &dyn Fn(&str) -> Option<String>, flag: Option<usize>) -> Result<Found> {
    // Open MPI first: mpirun inside a Slurm allocation (or under deepspeed's openmpi runner) leaves the
    // allocation's SLURM_* and the runner's variables in the environment, but its own are the truth.
    if let Some(world) = num(env, "OMPI_COMM_WORLD_SIZE")? {
        let rank = need(env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")?;
        let names = ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE");
        let (local_rank, local_world, lr, lw) = local(env, names, rank, world)?;
        return Ok(Found {
            launch: Launch { launcher: Launcher::OpenMpi, rank, world, local_rank, local_world },
            rank_var: "OMPI_COMM_WORLD_RANK",
            world_var: "OMPI_COMM_WORLD_SIZE",
            local_rank_var: lr,
            local_world_var: lw,
        });
    }
    // Hydra sets MPI_LOCALRANKID; srun's pmi2 sets PMI_RANK/PMI_SIZE too, but that is a Slurm launch.
    let hydra = var(env, "MPI_LOCALRANKID").is_some() || var(env, "SLURM_PROCID").is_none();
    if let (Some(world), true) = (num(env, "PMI_SIZE")?, hydra) {
        let rank = need(env, "PMI_RANK", "PMI_SIZE")?;
        let (local_rank, local_world, lr, lw) = local(env, ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"), rank, world)?;
        return Ok(Found {
            launch: Launch { launcher: Launcher::Mpich, rank, world, local_rank, local_world },
            rank_var: "PMI_RANK",
            world_var: "PMI_SIZE",
            local_rank_var: lr,
            local_world_var: lw,
        });
    }
    if var(env, "SLURM_PROCID").is_some() {
        return slurm(env);
    }
    if let Some(found) = torch_style(env, flag)? {
        return Ok(found);
    }
    Ok(Found {
        launch: Launch { launcher: Launcher::Single, rank: 0, world: 1, local_rank: 0, local_world: 1 },
        rank_var: "no launcher",
        world_var: "no launcher",
        local_rank_var: "no launcher",
        local_world_var: "no launcher",
    })
}

/// How this process was started, from the environment (`env` looks up a variable) and the `--local_rank` flag
/// deepspeed appends. Open MPI, then MPICH hydra, then Slurm (with PMI), then torch-style variables (an error
/// unless they describe one process), else a single process.
pub fn detect(env: &dyn Fn(&str) -> Option<String>, local_rank_flag: Option<usize>) -> Result<Launch> {
    let f = from_env(env, local_rank_flag)?;
    let l = &f.launch;
    if l.world == 0 {
        return err(format!("{} says the world has 0 processes", f.world_var));
    }
    if l.rank >= l.world {
        return err(format!(
            "rank {} ({}) is not below the world size {} ({})",
            l.rank, f.rank_var, l.world, f.world_var
        ));
    }
    if l.local_world == 0 || l.local_world > l.world {
        return err(format!(
            "{} ranks on this node ({}) for a world of {} ({})",
            l.local_world, f.local_world_var, l.world, f.world_var
        ));
    }
    if l.local_rank >= l.local_world {
        return err(format!(
            "local rank {} ({}) is not below the ranks on this node {} ({})",
            l.local_rank, f.local_rank_var, l.local_world, f.local_world_var
        ));
    }
    if let Some(flag) = local_rank_flag {
        if flag != l.local_rank {
            return err(format!(
                "--local_rank {flag} disagrees with the launcher's local rank {} ({})",
                l.local_rank, f.local_rank_var
            ));
        }
    }
    Ok(f.launch)
}

/// Threads per rank when the user set no RAYON_NUM_THREADS: the node's cores split among its ranks, at least 1.
pub fn threads_per_rank(cores: usize, launch: &Launch) -> usize {
    (cores / launch.local_world.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(vars: &[(&str, &str)], flag: Option<usize>) -> Result<Launch> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        detect(&|k| map.get(k).cloned(), flag)
    }

    type Vars = Vec<(&'static str, &'static str)>;
    /// (case, environment, --local_rank, expected) and (case, environment, --local_rank, words in the error).
    type Case = (&'static str, Vars, Option<usize>, Result<Launch>);
    type Failing = (&'static str, Vars, Option<usize>, Vec<&'static str>);

    fn ok(launcher: Launcher, rank: usize, world: usize, local_rank: usize, local_world: usize) -> Result<Launch> {
        Ok(Launch { launcher, rank, world, local_rank, local_world })
    }

    /// Environments as each launcher sets them (variable lists: docs/research/distributed.md section 2, and
    /// DeepSpeed 0.19.6 `deepspeed/launcher/launch.py` for the local launcher).
    #[test]
    fn launchers_are_detected_from_their_environments() {
        use Launcher::*;
        let ompi = [
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ];
        let hydra = [("PMI_RANK", "3"), ("PMI_SIZE", "4"), ("MPI_LOCALRANKID", "1"), ("MPI_LOCALNRANKS", "2")];
        let slurm_pmix = [
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "7"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "1"),
            ("SLURM_TASKS_PER_NODE", "4,3"),
            ("PMIX_RANK", "5"),
        ];
        let table: Vec<Case> = vec![
            ("nothing set", vec![], None, ok(Single, 0, 1, 0, 1)),
            ("nothing set, --local_rank 0", vec![], Some(0), ok(Single, 0, 1, 0, 1)),
            ("Open MPI, 2 ranks", ompi.to_vec(), None, ok(OpenMpi, 1, 2, 1, 2)),
            (
                "Open MPI under deepspeed's openmpi runner, which appends no flag",
                ompi.to_vec(),
                None,
                ok(OpenMpi, 1, 2, 1, 2),
            ),
            (
                "Open MPI inside a Slurm allocation: mpirun's variables win",
                [&ompi[..], &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]].concat(),
                None,
                ok(OpenMpi, 1, 2, 1, 2),
            ),
            ("MPICH hydra", hydra.to_vec(), None, ok(Mpich, 3, 4, 1, 2)),
            (
                "MPICH under deepspeed's mpich runner (it adds RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_SIZE)",
                [&hydra[..], &[("RANK", "3"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_SIZE", "2")]].concat(),
                None,
                ok(Mpich, 3, 4, 1, 2),
            ),
            (
                "PMI without local variables: every rank taken as local",
                vec![("PMI_RANK", "1"), ("PMI_SIZE", "3")],
                None,
                ok(Mpich, 1, 3, 1, 3),
            ),
            ("Slurm srun --mpi=pmix, second node of 4,3", slurm_pmix.to_vec(), None, ok(Slurm, 5, 7, 1, 3)),
            (
                "Slurm srun --mpi=pmi2 (PMI_RANK without hydra's MPI_LOCALRANKID), 2(x3),1",
                vec![
                    ("SLURM_PROCID", "2"),
                    ("SLURM_NTASKS", "7"),
                    ("SLURM_LOCALID", "0"),
                    ("SLURM_NODEID", "3"),
                    ("SLURM_TASKS_PER_NODE", "2(x3),1"),
                    ("PMI_RANK", "2"),
                    ("PMI_SIZE", "7"),
                ],
                None,
                ok(Slurm, 2, 7, 0, 1),
            ),
            (
                "Slurm with SLURM_NTASKS_PER_NODE only",
                vec![
                    ("SLURM_PROCID", "1"),
                    ("SLURM_NTASKS", "4"),
                    ("SLURM_LOCALID", "1"),
                    ("SLURM_NTASKS_PER_NODE", "2"),
                    ("PMI_FD", "5"),
                ],
                None,
                ok(Slurm, 1, 4, 1, 2),
            ),
            (
                "Slurm, one task, no PMI",
                vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_LOCALID", "0")],
                None,
                ok(Slurm, 0, 1, 0, 1),
            ),
            (
                "torchrun with one process",
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "1"),
                    ("LOCAL_RANK", "0"),
                    ("LOCAL_WORLD_SIZE", "1"),
                    ("TORCHELASTIC_RUN_ID", "x"),
                ],
                None,
                ok(Single, 0, 1, 0, 1),
            ),
            (
                "deepspeed --num_gpus 1 --no_python: --local_rank=0",
                vec![("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_SIZE", "1"), ("CROSS_RANK", "0")],
                Some(0),
                ok(Single, 0, 1, 0, 1),
            ),
        ];
        for (name, vars, flag, want) in table {
            assert_eq!(run(&vars, flag), want, "{name}");
        }
    }

    /// Each error must say what to do instead; the table holds the words that must appear.
    #[test]
    fn wrong_launches_fail_saying_what_to_do() {
        let table: Vec<Failing> = vec![
            (
                "torchrun, 2 processes",
                vec![
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", "1"),
                    ("LOCAL_WORLD_SIZE", "2"),
                    ("TORCHELASTIC_RUN_ID", "x"),
                ],
                None,
                vec![
                    "torchrun",
                    "mpirun --bind-to none -np 2 dolly",
                    "srun --mpi=pmix -n 2",
                    "--launcher openmpi",
                    "--no_python",
                ],
            ),
            (
                "deepspeed's local launcher + --local_rank",
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "8"),
                    ("LOCAL_RANK", "0"),
                    ("LOCAL_SIZE", "8"),
                    ("CROSS_RANK", "0"),
                    ("MASTER_PORT", "29500"),
                ],
                Some(0),
                vec!["deepspeed's local launcher", "-np 8", "--force_multi"],
            ),
            ("LOCAL_RANK alone above 0", vec![("LOCAL_RANK", "1")], None, vec!["a torch-style launcher", "mpirun"]),
            (
                "Slurm, 4 tasks, no PMI",
                vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "0")],
                None,
                vec!["task 0 of 4", "without PMI", "srun --mpi=pmix"],
            ),
            (
                "--local_rank disagrees with Open MPI",
                vec![
                    ("OMPI_COMM_WORLD_RANK", "1"),
                    ("OMPI_COMM_WORLD_SIZE", "2"),
                    ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
                    ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
                ],
                Some(0),
                vec!["--local_rank 0", "local rank 1", "OMPI_COMM_WORLD_LOCAL_RANK"],
            ),
            ("--local_rank 3 with no launcher", vec![], Some(3), vec!["--local_rank 3", "local rank 0"]),
            (
                "not a number",
                vec![("OMPI_COMM_WORLD_SIZE", "two"), ("OMPI_COMM_WORLD_RANK", "0")],
                None,
                vec!["OMPI_COMM_WORLD_SIZE=\"two\""],
            ),
            ("rank missing", vec![("OMPI_COMM_WORLD_SIZE", "2")], None, vec!["OMPI_COMM_WORLD_RANK"]),
            (
                "rank beyond world",
                vec![("PMI_RANK", "4"), ("PMI_SIZE", "4")],
                None,
                vec!["rank 4 (PMI_RANK)", "world size 4 (PMI_SIZE)"],
            ),
            ("world 0", vec![("PMI_RANK", "0"), ("PMI_SIZE", "0")], None, vec!["PMI_SIZE says"]),
            (
                "local rank beyond the node",
                vec![("PMI_RANK", "1"), ("PMI_SIZE", "4"), ("MPI_LOCALRANKID", "2"), ("MPI_LOCALNRANKS", "2")],
                None,
                vec!["local rank 2 (MPI_LOCALRANKID)", "MPI_LOCALNRANKS"],
            ),
            (
                "bad SLURM_TASKS_PER_NODE",
                vec![
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_NODEID", "0"),
                    ("SLURM_TASKS_PER_NODE", "2(3)"),
                    ("PMIX_RANK", "0"),
                ],
                None,
                vec!["SLURM_TASKS_PER_NODE=\"2(3)\""],
            ),
            (
                "SLURM_NODEID beyond the node list",
                vec![
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_NODEID", "2"),
                    ("SLURM_TASKS_PER_NODE", "1(x2)"),
                    ("PMIX_RANK", "0"),
                ],
                None,
                vec!["SLURM_NODEID=2", "lists 2 nodes"],
            ),
        ];
        for (name, vars, flag, words) in table {
            let e = match run(&vars, flag) {
                Ok(l) => panic!("{name}: expected an error, got {l:?}"),
                Err(e) => e.0,
            };
            for w in words {
                assert!(e.contains(w), "{name}: {w:?} not in {e:?}");
            }
        }
    }

    #[test]
    fn tasks_per_node_expands_repeats() {
        assert_eq!(tasks_per_node("2(x3),1"), Some(vec![2, 2, 2, 1]));
        assert_eq!(tasks_per_node("4"), Some(vec![4]));
        assert_eq!(tasks_per_node("x"), None);
        assert_eq!(tasks_per_node("2(x3"), None);
    }

    #[test]
    fn threads_split_the_node_cores_among_its_ranks() {
        let l = |local_world| Launch { launcher: Launcher::OpenMpi, rank: 0, world: 8, local_rank: 0, local_world };
        assert_eq!(threads_per_rank(16, &l(4)), 4);
        assert_eq!(threads_per_rank(2, &l(2)), 1);
        assert_eq!(threads_per_rank(2, &l(3)), 1);
        assert_eq!(threads_per_rank(7, &l(2)), 3);
        assert_eq!(threads_per_rank(0, &l(1)), 1);
    }
}
