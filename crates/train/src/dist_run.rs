//! What a distributed run agrees on before it trains: one start plan (rank 0 decides from the output directory
//! and tells the others), and the same configuration, data and model on every rank (each rank hashes its own;
//! the minimum and maximum over ranks must be equal, as DeepSpeed's checkpoint-tag validation does). Also the
//! collective yes/no decisions of the loop.

use crate::bail;
use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::rundir::RunInfo;
use crate::start::{plan, Plan};
use crate::zero::dist_err;
use dist::Collective;
use std::path::{Path, PathBuf};

/// The start plan, decided by rank 0 (the only rank that reads the run directory's checkpoints and verifies
/// their sha256) and broadcast; every rank then reads the chosen checkpoint's state itself.
pub fn shared_plan(
    comm: &dyn Collective,
    cfg: &TrainConfig,
    out: &Path,
    say: &dyn Fn(&str),
) -> Result<(Plan, Option<RunInfo>)> {
    if comm.world() == 1 {
        return plan(cfg, out, say);
    }
    let mut msg = Vec::new();
    let mine = if comm.rank() == 0 {
        let p = plan(cfg, out, say);
        msg = match &p {
            Ok((Plan::Fresh { clear }, _)) => format!("fresh:{}", *clear as u8),
            Ok((Plan::Resume { dir, .. }, _)) => format!("resume:{}", dir.display()),
            Err(e) => format!("error:{e}"),
        }
        .into_bytes();
        Some(p)
    } else {
        None
    };
    comm.broadcast_bytes(&mut msg, 0).map_err(dist_err)?;
    if let Some(p) = mine {
        return p;
    }
    let text = String::from_utf8_lossy(&msg).into_owned();
    let run = crate::rundir::read(out)?;
    if let Some(e) = text.strip_prefix("error:") {
        bail!("{e}");
    }
    if let Some(c) = text.strip_prefix("fresh:") {
        return Ok((Plan::Fresh { clear: c == "1" }, run));
    }
    let Some(d) = text.strip_prefix("resume:") else { bail!("rank 0 sent an unknown start plan `{text}`") };
    let dir = PathBuf::from(d);
    let state: TrainerState = checkpoint::read_state(&dir)?;
    Ok((Plan::Resume { dir, state: Box::new(state) }, run))
}

/// FNV-1a over bytes (a cheap fingerprint; not a security hash).
pub fn fnv(bytes: impl IntoIterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

pub const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

/// Every rank must have the same fingerprints of (what, hash): the minimum and maximum over ranks are compared
/// and the names that differ are reported.
pub fn check_same(comm: &dyn Collective, parts: &[(&str, u64)]) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    let mut lo: Vec<u64> = parts.iter().map(|p| p.1).collect();
    let mut hi = lo.clone();
    comm.all_reduce_min_u64(&mut lo).map_err(dist_err)?;
    comm.all_reduce_max_u64(&mut hi).map_err(dist_err)?;
    let differ: Vec<&str> =
        parts.iter().zip(lo.iter().zip(&hi)).filter(|(_, (a, b))| a != b).map(|(p, _)| p.0).collect();
    if !differ.is_empty() {
        return Err(TrainError(format!(
            "the ranks of this job do not agree on {}: every process must get the same flags, config files, \
             dataset and model (a shared filesystem, the same command line)",
            differ.join(", ")
        )));
    }
    Ok(())
}

/// True on every rank when any rank says true.
pub fn any(comm: &dyn Collective, mine: bool) -> Result<bool> {
    let mut v = [mine as u64];
    comm.all_reduce_max_u64(&mut v).map_err(dist_err)?;
    Ok(v[0] != 0)
}

/// Test-only fault injection: `var` names a step, `DOLLY_FAULT_RANK` (any rank when unset) the rank.
pub fn fault_here(var: &str, step: u64, rank: usize) -> bool {
    std::env::var(var).ok() == Some(step.to_string())
        && std::env::var("DOLLY_FAULT_RANK").map_or(true, |r| r == rank.to_string())
}
