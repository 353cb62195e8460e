//! The world-independent checkpoint (format 2): every rank writes `shard-R-of-W.safetensors` with three 1-D
//! float32 tensors, `param`, `exp_avg` and `exp_avg_sq`, holding the elements of the flat (layout-order,
//! unpadded) vectors in the ranges it owns, concatenated. Then a barrier with an all-reduced success flag; then
//! rank 0 writes `config.json`, `trainer_state.json`, `shards.json` (each file's ranges), the tokenizer files,
//! `manifest.json` (sha256 and size of every file, the shards' as their writers computed them) and, last,
//! `COMPLETE`. So a checkpoint is complete for every rank or not at all. Loading reads the ranges the loading
//! rank needs from whichever shards hold them: a resume at any process count and ZeRO stage reshards on load.
//! Format-1 checkpoints (`model.safetensors` + `optimizer.safetensors`) still load.

use crate::bail;
use crate::checkpoint::{self, TrainerState};
use crate::error::{io_ctx, Result, TrainError};
use crate::zero::{dist_err, Shards, Zero};
use data::DollyTokenizer;
use neox::{Model, NeoxConfig, SaveDtype};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};

pub const SHARDS_FILE: &str = "shards.json";
const TENSORS: [&str; 3] = ["param", "exp_avg", "exp_avg_sq"];

/// `shards.json`: which file holds which ranges of the flat vectors.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardIndex {
    pub format: u32,
    /// Elements of each flat vector.
    pub total: usize,
    /// The process count and ZeRO stage that wrote it (informational: loading does not depend on them).
    pub world: usize,
    pub zero_stage: u8,
    pub files: Vec<ShardFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardFile {
    pub file: String,
    /// [start, end) global offsets, ascending.
    pub ranges: Vec<[usize; 2]>,
}

/// What each rank reports to rank 0 after writing its shard.
#[derive(Serialize, Deserialize)]
struct Written {
    file: String,
    sha256: String,
    bytes: u64,
    error: Option<String>,
}

fn shard_name(rank: usize, world: usize) -> String {
    format!("shard-{rank:05}-of-{world:05}.safetensors")
}

/// Write checkpoint `state.global_step` under `out`, collectively (every rank calls this). Refuses non-finite
/// weights (on every rank, decided together).
pub fn save(
    out: &Path,
    model: &Model,
    zero: &Zero<'_>,
    state: &TrainerState,
    tok: Option<&DollyTokenizer>,
) -> Result<PathBuf> {
    let (comm, shards) = (zero.comm, &zero.shards);
    let (rank, world) = (shards.rank, shards.world);
    let ranges = shards.owned_ranges();
    // the trained values: every parameter, or a LoRA run's adapter
    let params = model.trainable();
    // finite check over what each rank owns, decided together
    let bad = ranges.iter().flat_map(|r| params[r.clone()].iter()).any(|x| !x.is_finite());
    let mut flag = [bad as u64];
    comm.all_reduce_max_u64(&mut flag).map_err(dist_err)?;
    if flag[0] != 0 {
        checkpoint::check_finite_ranges(model, &ranges, &format!("checkpoint at step {}", state.global_step))?;
        bail!("checkpoint at step {}: another rank's weights are not finite; nothing was written", state.global_step);
    }
    let dir = checkpoint::dir_for(out, state.global_step);
    if rank == 0 && dir.exists() {
        // A leftover from a crash (or a re-save of the same step): replace it whole.
        io_ctx(std::fs::remove_dir_all(&dir), || format!("removing stale {}", dir.display()))?;
    }
    if rank == 0 {
        io_ctx(std::fs::create_dir_all(&dir), || format!("creating {}", dir.display()))?;
    }
    comm.barrier().map_err(dist_err)?;

    // ---- every rank: its shard
    let file = shard_name(rank, world);
    let path = dir.join(&file);
    let written = write_shard(&path, params, zero, &ranges).and_then(|()| {
        let sha = io_ctx(common::sha256_file(&path), || path.display().to_string())?;
        let bytes = io_ctx(std::fs::metadata(&path), || path.display().to_string())?.len();
        Ok((sha, bytes))
    });
    if crate::dist_run::fault_here("DOLLY_FAULT_ABORT_IN_CHECKPOINT", state.global_step, rank) {
        // Test-only: die like `kill -9` after this rank's shard is on disk, before the checkpoint is complete.
        std::process::abort();
    }
    let mine = match &written {
        Ok((sha, bytes)) => Written { file: file.clone(), sha256: sha.clone(), bytes: *bytes, error: None },
        Err(e) => Written { file: file.clone(), sha256: String::new(), bytes: 0, error: Some(e.to_string()) },
    };
    let mine = serde_json::to_vec(&mine).map_err(|e| TrainError(e.to_string()))?;
    let all = comm.all_gather_bytes(&mine).map_err(dist_err)?;
    let all: Vec<Written> = all
        .iter()
        .map(|b| serde_json::from_slice(b).map_err(|e| TrainError(format!("a rank's shard report: {e}"))))
        .collect::<Result<_>>()?;
    if let Some((r, e)) = all.iter().enumerate().find_map(|(r, w)| w.error.as_ref().map(|e| (r, e))) {
        bail!(
            "checkpoint at step {}: rank {r} could not write its shard ({e}); the checkpoint is incomplete",
            state.global_step
        );
    }

    // ---- rank 0: the rest, then the marker
    let mut ok = [1u64];
    let mut failure = None;
    if rank == 0 {
        if let Err(e) = finish(&dir, model, zero, state, tok, &all) {
            ok[0] = 0;
            failure = Some(e);
        }
    }
    comm.all_reduce_min_u64(&mut ok).map_err(dist_err)?;
    if let Some(e) = failure {
        return Err(e);
    }
    if ok[0] == 0 {
        bail!("checkpoint at step {}: rank 0 could not complete it", state.global_step);
    }
    Ok(dir)
}

fn write_shard(path: &Path, params: &[f32], zero: &Zero<'_>, ranges: &[Range<usize>]) -> Result<()> {
    let held: usize = ranges.iter().map(|r| r.len()).sum();
    let shape = [held];
    let specs: Vec<(&str, &[usize])> = TENSORS.iter().map(|t| (*t, &shape[..])).collect();
    // stage 0 keeps whole moments (every rank the same): the shard takes the owned ranges of them
    let whole = zero.opt.m.len() == params.len() && zero.stage == 0;
    let moment = |m: &[f32], buf: &mut Vec<f32>| {
        if whole {
            ranges.iter().for_each(|r| buf.extend_from_slice(&m[r.clone()]));
        } else {
            buf.extend_from_slice(m);
        }
    };
    neox::weights::save_tensors_with(path, &specs, SaveDtype::F32, |k, buf| {
        match k {
            0 => ranges.iter().for_each(|r| buf.extend_from_slice(&params[r.clone()])),
            1 => moment(&zero.opt.m, buf),
            _ => moment(&zero.opt.v, buf),
        }
        Ok(())
    })?;
    Ok(())
}

fn finish(
    dir: &Path,
    model: &Model,
    zero: &Zero<'_>,
    state: &TrainerState,
    tok: Option<&DollyTokenizer>,
    shards: &[Written],
) -> Result<()> {
    model.save_config(dir, SaveDtype::F32)?;
    let mut names = vec!["config.json", "trainer_state.json", SHARDS_FILE];
    if let Some(lora) = model.lora() {
        // a LoRA checkpoint's vectors are the adapter's: its configuration says how to read them
        let base = crate::lora_run::base_name(&state.config.input_model);
        let text = serde_json::to_string_pretty(&neox::adapter_io::adapter_config_json(lora, &base))
            .map_err(|e| TrainError(e.to_string()))?;
        let ap = dir.join(neox::adapter_io::CONFIG_FILE);
        io_ctx(common::atomic_write(&ap, text.as_bytes()), || ap.display().to_string())?;
        names.push(neox::adapter_io::CONFIG_FILE);
    }
    let st = serde_json::to_string_pretty(state).map_err(|e| TrainError(e.to_string()))?;
    let sp = dir.join("trainer_state.json");
    io_ctx(common::atomic_write(&sp, st.as_bytes()), || sp.display().to_string())?;
    let world = zero.shards.world;
    let files = (0..world)
        .map(|r| {
            let s = Shards { rank: r, ..zero.shards.clone() };
            ShardFile {
                file: shard_name(r, world),
                ranges: s.owned_ranges().iter().map(|x| [x.start, x.end]).collect(),
            }
        })
        .collect();
    let index = ShardIndex { format: 2, total: zero.shards.total(), world, zero_stage: zero.stage, files };
    let ip = dir.join(SHARDS_FILE);
    let text = serde_json::to_string_pretty(&index).map_err(|e| TrainError(e.to_string()))?;
    io_ctx(common::atomic_write(&ip, text.as_bytes()), || ip.display().to_string())?;
    if let Some(t) = tok {
        t.save_pretrained(dir, Some(model.config.max_position_embeddings))?;
        names.extend(checkpoint::TOKENIZER_FILES);
    }
    let mut entries: Vec<(String, String, u64)> =
        shards.iter().map(|w| (w.file.clone(), w.sha256.clone(), w.bytes)).collect();
    for f in names {
        let p = dir.join(f);
        let sha = io_ctx(common::sha256_file(&p), || p.display().to_string())?;
        let bytes = io_ctx(std::fs::metadata(&p), || p.display().to_string())?.len();
        entries.push((f.to_string(), sha, bytes));
    }
    checkpoint::write_manifest_and_marker(dir, &entries, state.global_step)
}

/// A loaded checkpoint, cut for one rank: `params` full length (stage 3: only the owned ranges filled, the rest
/// zero and never touched), moments whole (stage 0) or the owned ranges concatenated.
pub struct Loaded {
    pub config: NeoxConfig,
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub state: TrainerState,
}

/// Read checkpoint `dir` (verified by the caller) for a rank of `shards` at ZeRO `stage`: the vectors of what the
/// run trains (every parameter, or a LoRA adapter), as many elements as `shards` covers.
pub fn load(dir: &Path, shards: &Shards, stage: u8) -> Result<Loaded> {
    let config = NeoxConfig::from_file(&dir.join("config.json"))?;
    let total = shards.total();
    let whole: Vec<Range<usize>> = std::iter::once(0..total).collect();
    let owned = shards.owned_ranges();
    let p_ranges: &[Range<usize>] = if stage == 3 { &owned } else { &whole };
    let m_ranges: &[Range<usize>] = if stage == 0 { &whole } else { &owned };
    let state = checkpoint::read_state(dir)?;
    let src = Source::open(dir, total)?;
    let mut params = vec![0f32; total];
    for r in p_ranges {
        src.read(0, r.clone(), &mut params[r.clone()])?;
    }
    let held: usize = m_ranges.iter().map(|r| r.len()).sum();
    let (mut m, mut v) = (vec![0f32; held], vec![0f32; held]);
    let mut at = 0;
    for r in m_ranges {
        src.read(1, r.clone(), &mut m[at..at + r.len()])?;
        src.read(2, r.clone(), &mut v[at..at + r.len()])?;
        at += r.len();
    }
    Ok(Loaded { config, params, m, v, state })
}

/// The model of a checkpoint directory (its weights only), for `dolly generate`/`serve` on a checkpoint.
pub fn load_model(dir: &Path) -> Result<Model> {
    let config = NeoxConfig::from_file(&dir.join("config.json"))?;
    if neox::adapter_io::is_adapter_dir(dir) {
        // a LoRA checkpoint: its base, resized as the run resized it, with the adapter of the shards
        let meta = neox::adapter_io::read_adapter_config(dir, &config)?;
        let Some(base) = meta.base_model else {
            bail!("{}: adapter_config.json names no base_model_name_or_path", dir.display());
        };
        let local = neox::adapter_io::resolve_base(dir, &base);
        let base_dir = if local.join("config.json").is_file() { local } else { crate::resolve_model(&base)? };
        let mut model = crate::lora_run::load_base(&base_dir, false, config.vocab_size, &|_| {})?;
        let total = neox::lora::AdapterLayout::new(&model.config, &model.layout, &meta.lora).total;
        let mut values = vec![0f32; total];
        Source::open(dir, total)?.read(0, 0..total, &mut values)?;
        model.attach_lora(meta.lora, neox::LoraInit::Values(values))?;
        return Ok(model);
    }
    let total = neox::Layout::new(&config).total;
    let src = Source::open(dir, total)?;
    let mut params = vec![0f32; total];
    src.read(0, 0..total, &mut params)?;
    Ok(Model::from_parts(config, params)?)
}

/// A shard file mapped, with its ranges and where each starts in the file's tensors.
struct MappedShard {
    map: memmap2::Mmap,
    path: PathBuf,
    pieces: Vec<(Range<usize>, usize)>,
}

/// Where the flat vectors of a checkpoint come from: format-2 shards, or a format-1 checkpoint read whole.
enum Source {
    Shards(Vec<MappedShard>),
    Whole([Vec<f32>; 3]),
}

impl Source {
    fn open(dir: &Path, total: usize) -> Result<Source> {
        let ip = dir.join(SHARDS_FILE);
        if !ip.is_file() {
            let (model, m, v, _) = checkpoint::load(dir)?;
            return Ok(Source::Whole([model.params().to_vec(), m, v]));
        }
        let text = io_ctx(std::fs::read_to_string(&ip), || ip.display().to_string())?;
        let index: ShardIndex =
            serde_json::from_str(&text).map_err(|e| TrainError(format!("{}: {e}", ip.display())))?;
        if index.format != 2 || index.total != total {
            bail!(
                "{}: format {} for {} elements, expected format 2 for {total}",
                ip.display(),
                index.format,
                index.total
            );
        }
        check_cover(&index, &ip)?;
        let mut files = Vec::new();
        for f in &index.files {
            if f.file.contains('/') || f.file.contains('\\') || f.file.starts_with('.') {
                bail!("{}: shard file name `{}` is not a plain file name", ip.display(), f.file);
            }
            let p = dir.join(&f.file);
            let file = io_ctx(std::fs::File::open(&p), || p.display().to_string())?;
            // SAFETY: the checkpoint is ours and complete (verified); nothing writes a complete checkpoint.
            let map = io_ctx(unsafe { memmap2::Mmap::map(&file) }, || p.display().to_string())?;
            let held: usize = f.ranges.iter().map(|r| r[1] - r[0]).sum();
            {
                let st = safetensors::SafeTensors::deserialize(&map)
                    .map_err(|e| TrainError(format!("{}: not a valid safetensors file: {e}", p.display())))?;
                for t in TENSORS {
                    let view =
                        st.tensor(t).map_err(|_| TrainError(format!("{}: tensor `{t}` missing", p.display())))?;
                    if view.dtype() != safetensors::Dtype::F32 || view.shape() != [held] {
                        bail!(
                            "{}: tensor `{t}` is {:?} {:?}, expected F32 [{held}]",
                            p.display(),
                            view.dtype(),
                            view.shape()
                        );
                    }
                }
            }
            let mut at = 0;
            let pieces = f
                .ranges
                .iter()
                .map(|r| {
                    let piece = (r[0]..r[1], at);
                    at += r[1] - r[0];
                    piece
                })
                .collect();
            files.push(MappedShard { map, path: p, pieces });
        }
        Ok(Source::Shards(files))
    }

    /// Elements `range` of vector `which` (0 param, 1 exp_avg, 2 exp_avg_sq) into `out`.
    fn read(&self, which: usize, range: Range<usize>, out: &mut [f32]) -> Result<()> {
        match self {
            Source::Whole(v) => out.copy_from_slice(&v[which][range]),
            Source::Shards(files) => {
                for MappedShard { map, path: p, pieces } in files {
                    let st = safetensors::SafeTensors::deserialize(map)
                        .map_err(|e| TrainError(format!("{}: {e}", p.display())))?;
                    let data = st.tensor(TENSORS[which]).map_err(|e| TrainError(format!("{}: {e}", p.display())))?;
                    let bytes = data.data();
                    for (r, at) in pieces {
                        let (a, b) = (r.start.max(range.start), r.end.min(range.end));
                        if a >= b {
                            continue;
                        }
                        let src = &bytes[(at + a - r.start) * 4..(at + b - r.start) * 4];
                        for (o, c) in out[a - range.start..b - range.start].iter_mut().zip(src.chunks_exact(4)) {
                            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The files' ranges are ascending, disjoint and cover [0, total) exactly.
fn check_cover(index: &ShardIndex, path: &Path) -> Result<()> {
    let mut all: Vec<[usize; 2]> = index.files.iter().flat_map(|f| f.ranges.iter().copied()).collect();
    if all.iter().any(|r| r[0] >= r[1] || r[1] > index.total) {
        bail!("{}: a range is empty or past the {} elements", path.display(), index.total);
    }
    all.sort();
    let mut at = 0;
    for r in &all {
        if r[0] != at {
            bail!("{}: ranges leave a gap or overlap at element {at}", path.display());
        }
        at = r[1];
    }
    if at != index.total {
        bail!("{}: ranges end at {at}, the vectors have {} elements", path.display(), index.total);
    }
    Ok(())
}

/// The final Hugging Face export, written by rank 0 (every rank calls this). Stages 0-2 hold the whole model on
/// every rank; under ZeRO-3 each unit is all-gathered in layout order while rank 0 streams its tensors to the
/// file and gives the unit's pages back, so no rank holds more than one unit beyond its shard. The bytes are
/// those of a one-process export (the same writer, the same values). Refuses non-finite weights.
pub fn export(out: &Path, model: &mut Model, zero: &Zero<'_>, dtype: SaveDtype) -> Result<()> {
    let (comm, rank) = (zero.comm, zero.shards.rank);
    let ranges = zero.shards.owned_ranges();
    let bad = ranges.iter().flat_map(|r| model.params()[r.clone()].iter()).any(|x| !x.is_finite());
    if crate::dist_run::any(comm, bad)? {
        checkpoint::check_finite_ranges(model, &ranges, "final model")?;
        bail!("final model: another rank's weights are not finite; nothing was written");
    }
    let units = zero.shards.units.len();
    let result = if rank == 0 {
        model.save_config(out, dtype)?;
        let layout = model.layout.clone();
        let specs: Vec<(&str, &[usize])> =
            layout.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
        let unit_of = |off: usize| zero.shards.units.iter().position(|u| u.range.contains(&off)).unwrap_or(0);
        let mut held: Option<usize> = None;
        let path = out.join("model.safetensors");
        let r = neox::weights::save_tensors_with(&path, &specs, dtype, |k, buf| {
            let p = &layout.params[k];
            let u = unit_of(p.offset);
            if held != Some(u) {
                // units arrive in layout order: every unit up to this one is gathered (a unit without tensors
                // cannot exist, but the loop keeps the ranks' call sequences equal regardless)
                let from = held.map_or(0, |h| h + 1);
                if let Some(h) = held {
                    zero.release_unit(model, h);
                }
                for v in from..=u {
                    zero.gather_unit(model, v).map_err(|e| neox::Error::invalid(e.to_string()))?;
                    if v < u {
                        zero.release_unit(model, v);
                    }
                }
                held = Some(u);
            }
            buf.extend_from_slice(&model.params()[p.range()]);
            Ok(())
        });
        if let Some(h) = held {
            zero.release_unit(model, h);
        }
        r.map_err(TrainError::from)
    } else {
        let mut r = Ok(());
        for u in 0..units {
            if let Err(e) = zero.gather_unit(model, u) {
                r = Err(e);
                break;
            }
            zero.release_unit(model, u);
        }
        r
    };
    if let Err(e) = &result {
        if zero.stage == 3 && comm.world() > 1 {
            // the other ranks are inside the unit gathers rank 0 no longer makes: end the job
            eprintln!("error: final export failed on rank {rank}: {e}");
            comm.abort(1);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zero::Shards;
    use neox::{AdamWConfig, Layout};

    /// A checkpoint written by two ranks (ZeRO-1 shards) loads at one rank (stage 0) and at three ranks (stages 1
    /// and 3, uneven shards) with the logical parameter and moment vectors bitwise equal to what was saved.
    #[test]
    fn shards_written_at_two_ranks_load_bitwise_at_one_and_three() {
        let mut c = NeoxConfig::preset("pythia-14m").unwrap();
        c.num_hidden_layers = 2;
        c.vocab_size = 1000;
        let units = Layout::new(&c).units();
        let n = Layout::new(&c).total;
        let p: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
        let m: Vec<f32> = (0..n).map(|i| i as f32 + 0.25).collect();
        let v: Vec<f32> = (0..n).map(|i| -(i as f32) - 0.75).collect();
        let model = Model::from_parts(c.clone(), p.clone()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("checkpoint-3");
        std::fs::create_dir_all(&dir).unwrap();
        let cut = |x: &[f32], s: &Shards| s.owned_ranges().iter().flat_map(|r| x[r.clone()].to_vec()).collect();
        let single = dist::Single;
        let mut written = Vec::new();
        let mut zeros = Vec::new();
        for r in 0..2 {
            let sh = Shards::new(&units, 2, r);
            let mut z = Zero::new(1, sh.clone(), &single, AdamWConfig::default(), 1);
            (z.opt.m, z.opt.v) = (cut(&m, &sh), cut(&v, &sh));
            let file = shard_name(r, 2);
            write_shard(&dir.join(&file), &p, &z, &sh.owned_ranges()).unwrap();
            let sha = common::sha256_file(&dir.join(&file)).unwrap();
            let bytes = std::fs::metadata(dir.join(&file)).unwrap().len();
            written.push(Written { file, sha256: sha, bytes, error: None });
            zeros.push(z);
        }
        let state = TrainerState {
            format_version: 2,
            run_id: "t".into(),
            global_step: 3,
            total_steps: 9,
            sampler: data::Sampler::new(10, 1, 0, 1, true).unwrap().state(),
            adam_step: 3,
            log_loss_sum: 0.0,
            log_steps: 0,
            tokens_seen: 0,
            log_tokens: 0,
            nonfinite_in_row: 0,
            nonfinite_total: 0,
            elapsed_s: 0.0,
            elapsed_at_log: 0.0,
            config: Default::default(),
            world: 2,
            zero_stage: 1,
            global_batch: 8,
        };
        finish(&dir, &model, &zeros[0], &state, None, &written).unwrap();
        checkpoint::verify(&dir).unwrap();
        for (world, stage) in [(1, 0u8), (3, 1), (3, 3), (2, 2)] {
            for rank in 0..world {
                let sh = Shards::new(&units, world, rank);
                let l = load(&dir, &sh, stage).unwrap();
                if stage == 3 {
                    assert_eq!(cut(&l.params, &sh), cut(&p, &sh) as Vec<f32>);
                } else {
                    assert!(l.params == p, "world {world} stage {stage}: parameters");
                }
                let (em, ev): (Vec<f32>, Vec<f32>) =
                    if stage == 0 { (m.clone(), v.clone()) } else { (cut(&m, &sh), cut(&v, &sh)) };
                assert!(l.m == em && l.v == ev, "world {world} rank {rank} stage {stage}: moments");
                assert_eq!(l.state.global_step, 3);
            }
        }
        // a shard index that leaves a gap is refused, naming the file
        let ip = dir.join(SHARDS_FILE);
        let mut index: ShardIndex = serde_json::from_str(&std::fs::read_to_string(&ip).unwrap()).unwrap();
        index.files[0].ranges[0][0] = 8;
        std::fs::write(&ip, serde_json::to_string(&index).unwrap()).unwrap();
        let e = load(&dir, &Shards::new(&units, 1, 0), 0).err().unwrap().to_string();
        assert!(e.contains("shards.json") && e.contains("gap"), "{e}");
    }
}
