//! How a run starts: from the flags and what `--local-output-dir` holds, decide between a fresh run (clearing
//! the directory only with `--overwrite-output-dir`, or when `auto` finds no checkpoint and no final model) and
//! a resume from a verified checkpoint of the run the directory holds; check that a resume changes no setting
//! that changes the result; check that a local dataset path exists. Decides only: nothing is deleted here.

use crate::bail;
use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::rundir::{self, RunInfo};
use std::path::{Path, PathBuf};

/// How the run starts, decided from the flags and what the output directory holds. Nothing is deleted or
/// written until every check has passed (`clear` is carried out just before the loop).
pub enum Plan {
    Fresh { clear: bool },
    Resume { dir: PathBuf, state: Box<TrainerState> },
}

/// `a` lies inside (or is) directory `b`.
fn is_inside(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x.starts_with(y),
        _ => false,
    }
}

/// The plan, and the run the directory holds (its `dolly-run.json`), read once here.
pub fn plan(cfg: &TrainConfig, out: &Path, say: &dyn Fn(&str)) -> Result<(Plan, Option<RunInfo>)> {
    let names = rundir::entries(out);
    let run = rundir::read(out)?;
    let mode = cfg.resume_from_checkpoint.as_deref();
    if mode.is_some() && cfg.overwrite_output_dir {
        bail!("--overwrite-output-dir would delete the run that --resume-from-checkpoint continues: give one of them");
    }
    let resume = match mode {
        None => None,
        Some("latest") => Some(checkpoint::latest_verified(out, say).ok_or_else(|| {
            TrainError(format!(
                "--resume-from-checkpoint latest: no complete checkpoint in {} (`auto` starts the run when there is \
                 none)",
                out.display()
            ))
        })?),
        Some("auto") => checkpoint::latest_verified(out, say),
        Some(p) => {
            let d = PathBuf::from(p);
            if !d.is_dir() {
                bail!("--resume-from-checkpoint {p}: no such checkpoint directory (or give `latest` or `auto`)");
            }
            checkpoint::verify(&d)?;
            Some(d)
        }
    };
    let occupied = format!(
        "{} already holds a run ({}): continue it with --resume-from-checkpoint latest (or auto), write to another \
         --local-output-dir, or pass --overwrite-output-dir to delete it",
        out.display(),
        rundir::show(&names)
    );
    match resume {
        Some(dir) => {
            let state = checkpoint::read_state(&dir)?;
            match &run {
                Some(r) if r.run_id != state.run_id => bail!(
                    "{} belongs to run {} but {} holds run {}: resume into that run's own directory",
                    dir.display(),
                    if state.run_id.is_empty() { "(unnamed)" } else { &state.run_id },
                    out.display(),
                    r.run_id
                ),
                None if !names.is_empty() && !is_inside(&dir, out) => bail!("{occupied}"),
                _ => {}
            }
            Ok((Plan::Resume { dir, state: Box::new(state) }, run))
        }
        None if names.is_empty() => Ok((Plan::Fresh { clear: false }, run)),
        None if cfg.overwrite_output_dir => Ok((Plan::Fresh { clear: true }, run)),
        None if mode == Some("auto") => {
            if names.iter().any(|n| n == "model.safetensors" || n == "model.safetensors.index.json") {
                bail!(
                    "--resume-from-checkpoint auto: {} holds a final model but no complete checkpoint to continue \
                     from; pass --overwrite-output-dir to train it again from the start",
                    out.display()
                );
            }
            say(&format!("no complete checkpoint in {}: starting the run from the beginning", out.display()));
            Ok((Plan::Fresh { clear: true }, run))
        }
        None => bail!("{occupied}"),
    }
}

/// A local dataset path must exist before anything is loaded (hub ids are fetched later).
pub fn check_dataset_source(spec: &str) -> Result<()> {
    if Path::new(spec).exists() || data::hub::looks_like_repo_id(spec) {
        return Ok(());
    }
    bail!("--training-dataset {spec}: no such file or directory, and not a hub dataset id like databricks/databricks-dolly-15k")
}

/// Settings that changed since the checkpoint, each named with both values in the user's notation.
pub fn check_resume_compatible(saved: &TrainConfig, now: &TrainConfig) -> Result<()> {
    let diffs: Vec<String> = saved
        .result_settings()
        .into_iter()
        .zip(now.result_settings())
        .filter(|((_, a), (_, b))| a != b)
        .map(|((k, a), (_, b))| format!("--{k} was {a} in the checkpoint, now {b}"))
        .collect();
    if !diffs.is_empty() {
        bail!(
            "cannot resume: {} (these settings change the result; give the checkpoint's values, or start a new run \
             in another --local-output-dir)",
            diffs.join("; ")
        );
    }
    Ok(())
}
