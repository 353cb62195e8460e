//! Checkpoints `OUT/checkpoint-STEP/`: the weights and AdamW moments (format 2, written by every rank:
//! `checkpoint_shards.rs`; format 1, `model.safetensors` + `optimizer.safetensors`, is still read),
//! `config.json`, `trainer_state.json` (step, sampler cursor, log accumulators, resolved config), the tokenizer
//! files, `manifest.json` (sha256 and size per file) and, written last, the `COMPLETE` marker. A directory
//! without the marker, or whose files do not match the manifest, is not a checkpoint: `latest` skips it and
//! saving the same step again replaces it. Retention keeps the newest N of the current run (other runs'
//! checkpoints are never deleted). Weights that are not finite are never saved.

use crate::config::TrainConfig;
use crate::error::{io_ctx, Result, TrainError};
use data::SamplerState;
use neox::Model;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MARKER: &str = "COMPLETE";
/// The files a format-1 checkpoint must list; format 2 lists `shards.json` and its shards instead of the two
/// safetensors files.
const FILES: [&str; 4] = ["config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"];
pub const TOKENIZER_FILES: [&str; 3] = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

/// Everything besides tensors that an exact resume needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    pub format_version: u32,
    /// The run this checkpoint belongs to (`OUT/dolly-run.json`); empty in checkpoints from before run ids.
    #[serde(default)]
    pub run_id: String,
    /// Optimizer steps completed.
    pub global_step: u64,
    pub total_steps: u64,
    pub sampler: SamplerState,
    /// AdamW's own step count (skipped non-finite steps do not advance it).
    pub adam_step: u64,
    /// Sum of per-step losses and number of steps since the last metrics row.
    pub log_loss_sum: f64,
    pub log_steps: u64,
    /// Real (non-padding) tokens processed so far, and at the last metrics row.
    pub tokens_seen: u64,
    pub log_tokens: u64,
    pub nonfinite_in_row: u32,
    pub nonfinite_total: u64,
    /// Wall time of the run so far (all sessions).
    pub elapsed_s: f64,
    pub elapsed_at_log: f64,
    pub config: TrainConfig,
    /// Processes, ZeRO stage and global batch (micro-batch x accumulation x processes) of the run that saved
    /// it; a resume may use others (the checkpoint reshards on load). 0 in checkpoints from before them.
    #[serde(default)]
    pub world: u32,
    #[serde(default)]
    pub zero_stage: u8,
    #[serde(default)]
    pub global_batch: u64,
}

#[derive(Serialize, Deserialize)]
struct ManifestEntry {
    sha256: String,
    bytes: u64,
}

pub fn dir_for(out: &Path, step: u64) -> PathBuf {
    out.join(format!("checkpoint-{step}"))
}

fn step_of(p: &Path) -> Option<u64> {
    p.file_name()?.to_str()?.strip_prefix("checkpoint-")?.parse().ok()
}

/// Checkpoint directories under `out` with their step, complete or not, oldest first.
pub fn list(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            Some((step_of(&p)?, p))
        })
        .collect();
    v.sort();
    v
}

/// Marker present and every manifest file present with the recorded size (cheap; `verify` checks sha256).
pub fn is_complete(dir: &Path) -> bool {
    if !dir.join(MARKER).is_file() {
        return false;
    }
    let Ok(text) = std::fs::read_to_string(dir.join("manifest.json")) else { return false };
    let Ok(m) = serde_json::from_str::<std::collections::BTreeMap<String, ManifestEntry>>(&text) else {
        return false;
    };
    let v1 = FILES.iter().all(|f| m.contains_key(*f));
    let v2 =
        ["config.json", "trainer_state.json", crate::checkpoint_shards::SHARDS_FILE].iter().all(|f| m.contains_key(*f));
    (v1 || v2) && m.iter().all(|(f, e)| std::fs::metadata(dir.join(f)).is_ok_and(|md| md.len() == e.bytes))
}

/// Full check: every file's sha256 equals the manifest's.
pub fn verify(dir: &Path) -> Result<()> {
    if !is_complete(dir) {
        crate::bail!("{}: not a complete checkpoint (no {MARKER} marker or files missing/truncated)", dir.display());
    }
    let text =
        io_ctx(std::fs::read_to_string(dir.join("manifest.json")), || format!("{}/manifest.json", dir.display()))?;
    let m: std::collections::BTreeMap<String, ManifestEntry> =
        serde_json::from_str(&text).map_err(|e| TrainError(format!("{}/manifest.json: {e}", dir.display())))?;
    for (name, e) in &m {
        let p = dir.join(name);
        let sha = io_ctx(common::sha256_file(&p), || p.display().to_string())?;
        if sha != e.sha256 {
            crate::bail!("{}: sha256 {sha} does not match the manifest ({})", p.display(), e.sha256);
        }
    }
    Ok(())
}

/// The newest complete checkpoint under `out` (marker and sizes; not the sha256).
pub fn latest(out: &Path) -> Option<PathBuf> {
    list(out).into_iter().rev().map(|(_, p)| p).find(|p| is_complete(p))
}

/// The newest complete checkpoint under `out` whose files pass their sha256 check. A newer one that fails is
/// reported through `warn` and skipped (the previous complete one is used instead).
pub fn latest_verified(out: &Path, warn: &dyn Fn(&str)) -> Option<PathBuf> {
    for (_, p) in list(out).into_iter().rev() {
        if !is_complete(&p) {
            continue;
        }
        match verify(&p) {
            Ok(()) => return Some(p),
            Err(e) => warn(&format!("warning: skipping {}: {e}; falling back to the previous checkpoint", p.display())),
        }
    }
    None
}

/// The run id a checkpoint directory's `trainer_state.json` names (None when it cannot be read).
pub fn run_id_of(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("trainer_state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(v.get("run_id").and_then(|x| x.as_str()).unwrap_or("").to_string())
}

/// The first tensor of `model` holding a NaN or infinity, with the index of the first such value.
pub fn first_nonfinite(model: &Model) -> Option<(String, usize)> {
    let params = model.params();
    model
        .layout
        .params
        .iter()
        .find_map(|p| params[p.range()].iter().position(|x| !x.is_finite()).map(|i| (p.name.clone(), i)))
}

/// Err naming the first non-finite tensor: such weights are never written as a checkpoint or a model.
pub fn check_finite(model: &Model, what: &str) -> Result<()> {
    match first_nonfinite(model) {
        Some((name, i)) => crate::bail!(
            "{what}: the weights are not finite (first in `{name}`, element {i}); nothing was written. Lower \
             --lr, check --adam-beta2/--adam-epsilon, or resume from an earlier checkpoint"
        ),
        None => Ok(()),
    }
}

/// Err naming the first non-finite element of `model` inside `ranges`.
pub fn check_finite_ranges(model: &Model, ranges: &[std::ops::Range<usize>], what: &str) -> Result<()> {
    let params = model.trainable();
    for p in model.trainable_tensors() {
        for r in ranges {
            let (a, b) = (p.offset.max(r.start), (p.offset + p.numel()).min(r.end));
            if let Some(i) = (a < b).then(|| params[a..b].iter().position(|x| !x.is_finite())).flatten() {
                crate::bail!(
                    "{what}: the weights are not finite (first in `{}`, element {}); nothing was written. Lower \
                     --lr, check --adam-beta2/--adam-epsilon, or resume from an earlier checkpoint",
                    p.name,
                    a - p.offset + i
                );
            }
        }
    }
    Ok(())
}

/// Write `manifest.json` for `entries` (file, sha256, bytes), then the `COMPLETE` marker: the checkpoint's
/// commit point.
pub fn write_manifest_and_marker(dir: &Path, entries: &[(String, String, u64)], step: u64) -> Result<()> {
    let manifest: std::collections::BTreeMap<&str, ManifestEntry> = entries
        .iter()
        .map(|(f, sha, bytes)| (f.as_str(), ManifestEntry { sha256: sha.clone(), bytes: *bytes }))
        .collect();
    let mp = dir.join("manifest.json");
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| TrainError(e.to_string()))?;
    io_ctx(common::atomic_write(&mp, text.as_bytes()), || mp.display().to_string())?;
    let marker = dir.join(MARKER);
    io_ctx(common::atomic_write(&marker, format!("step {step}\n").as_bytes()), || marker.display().to_string())?;
    Ok(())
}

/// The `trainer_state.json` of a checkpoint directory.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let sp = dir.join("trainer_state.json");
    let text = io_ctx(std::fs::read_to_string(&sp), || sp.display().to_string())?;
    serde_json::from_str(&text).map_err(|e| TrainError(format!("{}: {e}", sp.display())))
}

/// Load a format-1 checkpoint that `verify` passed: (model, optimizer moments m and v, state).
pub fn load(dir: &Path) -> Result<(Model, Vec<f32>, Vec<f32>, TrainerState)> {
    let model = Model::load(dir)?;
    let state = read_state(dir)?;
    let op = dir.join("optimizer.safetensors");
    let mut wanted: Vec<(String, Vec<usize>)> = Vec::new();
    for p in &model.layout.params {
        wanted.push((format!("exp_avg.{}", p.name), p.shape.clone()));
        wanted.push((format!("exp_avg_sq.{}", p.name), p.shape.clone()));
    }
    let refs: Vec<(&str, &[usize])> = wanted.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    let tensors = neox::weights::load_tensors(&op, &refs)?;
    let (mut m, mut v) = (vec![0f32; model.num_params()], vec![0f32; model.num_params()]);
    for (k, p) in model.layout.params.iter().enumerate() {
        m[p.range()].copy_from_slice(&tensors[2 * k]);
        v[p.range()].copy_from_slice(&tensors[2 * k + 1]);
    }
    Ok((model, m, v, state))
}

/// Delete the oldest complete checkpoints of run `run_id` beyond `keep` (and incomplete ones older than the
/// newest complete). Checkpoints of any other run are left alone.
pub fn enforce_limit(out: &Path, keep: usize, run_id: &str) -> Result<()> {
    let all = list(out);
    let complete: Vec<&(u64, PathBuf)> =
        all.iter().filter(|(_, p)| is_complete(p) && run_id_of(p).as_deref() == Some(run_id)).collect();
    let newest = complete.last().map(|(s, _)| *s);
    let excess = complete.len().saturating_sub(keep.max(1));
    for (_, p) in complete.iter().take(excess) {
        io_ctx(std::fs::remove_dir_all(p), || format!("removing old checkpoint {}", p.display()))?;
    }
    for (s, p) in &all {
        if !is_complete(p) && newest.is_some_and(|n| *s < n) {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    Ok(())
}
