//! The training loop, in one readable place: check everything cheap first (paths, the run directory, the
//! model's config.json, the data, the memory the run needs), then load the weights, then per optimizer step
//! micro-batches -> forward/backward (token-weighted over the whole step) -> reduce -> finite check -> clip ->
//! AdamW -> schedule -> log -> eval -> checkpoint; finally the Hugging Face export. Resume restores weights,
//! moments, sampler cursor and log accumulators so the continued run is bit-identical to an uninterrupted one.
//! SIGINT/SIGTERM (the `stop` flag) end the run after the current step with a checkpoint.
//!
//! Distributed (`Control::comm`): every rank draws the same global step (processes x accumulation
//! micro-batch slots of the seeded order) and computes slots `rank·A .. rank·A + A`; the ZeRO stage
//! (`zero.rs`) decides what is sharded and reduced. Only rank 0 prints, logs, plots and writes the export;
//! every rank writes its checkpoint shard.

use crate::batches::BatchSource;
use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::dist_run::{self, fnv, FNV0};
use crate::error::{io_ctx, Result, TrainError};
use crate::metrics::Metrics;
use crate::model_source::resolve_model;
use crate::progress::{LogLine, Progress};
use crate::rundir::{self, RunInfo};
use crate::schedule::Schedule;
use crate::start::{check_dataset_source, check_resume_compatible, Plan};
use crate::zero::{self, dist_err, Shards, Zero};
use crate::{bail, checkpoint_shards, lora_run, memory};
use data::{BadRecordPolicy, DollyTokenizer, Example, HubOptions, PrepareOptions, Sampler};
use dist::Collective;
use neox::{clip_coef, Activations, AdamWConfig, BatchInput, Layout, LoraInit, Model, NeoxConfig, SaveDtype};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// How a call to `train` ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Trained to the last step and exported the model.
    Finished,
    /// The run in the output directory was already complete at this length: nothing was done.
    AlreadyFinished,
    /// Stopped by a signal after a step; the checkpoint written then (None when stopped before the first step).
    Interrupted { checkpoint: Option<PathBuf> },
}

/// What a run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub output_dir: PathBuf,
    pub steps: u64,
    pub total_steps: u64,
    /// The last finite training loss of this session (None when no step ran).
    pub last_loss: Option<f64>,
    pub last_eval_loss: Option<f64>,
    pub train_examples: usize,
    pub tokens_per_s: f64,
    pub outcome: Outcome,
}

/// The caller's side of a run: where notes go, a flag that asks the loop to stop after the current step, and the
/// processes of a distributed run (None: this process alone).
pub struct Control<'a> {
    pub say: &'a dyn Fn(&str),
    pub stop: Option<&'a AtomicBool>,
    pub comm: Option<&'a dyn Collective>,
}

/// A collated batch as the engine's input (labels included).
pub fn view(b: &data::Batch) -> BatchInput<'_> {
    BatchInput {
        batch_size: b.batch_size,
        seq_len: b.seq_len,
        input_ids: &b.input_ids,
        labels: Some(&b.labels),
        attention_mask: &b.attention_mask,
        position_ids: &b.position_ids,
        doc_ids: b.doc_ids.as_deref(),
    }
}

/// Evaluation loss sum and target count over `test`, split over the ranks (batch i on rank i mod world) and
/// added up in batch order: the same value for any process count.
fn eval_loss(
    model: &mut Model,
    zero: &mut Zero<'_>,
    test: &[Example],
    bs: usize,
    acts: &mut Activations,
) -> Result<(f64, usize)> {
    let (rank, world) = (zero.shards.rank, zero.shards.world);
    let n = test.len().div_ceil(bs);
    let mut sums = vec![0f64; 2 * n];
    for k in 0..n.div_ceil(world) {
        let i = k * world + rank;
        if i >= n {
            zero.empty_eval(model)?;
            continue;
        }
        let refs: Vec<&Example> = test[i * bs..((i + 1) * bs).min(test.len())].iter().collect();
        let b = data::pad_batch(&refs, 8, 0)?;
        acts.ensure(&model.config, b.batch_size, b.seq_len);
        let (s, c) = zero.eval_batch(model, &view(&b), acts)?;
        sums[2 * i] = s;
        sums[2 * i + 1] = c as f64;
    }
    zero.comm.all_reduce_sum_f64(&mut sums).map_err(dist_err)?;
    let loss = sums.iter().step_by(2).sum::<f64>();
    let count = sums.iter().skip(1).step_by(2).sum::<f64>();
    Ok((loss, count as usize))
}

/// `14,067,712`.
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Run (or resume) a training job. `say` receives human-readable progress notes.
pub fn train(cfg: TrainConfig, say: &dyn Fn(&str)) -> Result<RunSummary> {
    train_with(cfg, &Control { say, stop: None, comm: None })
}

/// `train` with a stop flag (set by the caller's signal handler).
pub fn train_with(cfg: TrainConfig, ctl: &Control<'_>) -> Result<RunSummary> {
    let single = dist::Single;
    let comm: &dyn Collective = ctl.comm.unwrap_or(&single);
    let (rank, world) = (comm.rank(), comm.world());
    let quiet = |_: &str| {};
    let say: &dyn Fn(&str) = if rank == 0 { ctl.say } else { &quiet };
    let local_stop = || ctl.stop.is_some_and(|s| s.load(Ordering::SeqCst));
    // a stop request on any rank stops every rank after the same step
    let stop_requested = || dist_run::any(comm, local_stop());
    cfg.validate()?;
    check_dataset_source(&cfg.training_dataset)?;
    let out = cfg.output_dir().to_path_buf();
    io_ctx(std::fs::create_dir_all(&out), || format!("cannot create output directory {}", out.display()))?;
    if rank == 0 {
        // (the other ranks write only their checkpoint shards, whose failure is reported when it happens)
        let probe = out.join(".dolly-write-probe");
        io_ctx(common::atomic_write(&probe, b"ok"), || format!("output directory {} is not writable", out.display()))?;
        let _ = std::fs::remove_file(&probe);
    }
    let (plan, run_info) = dist_run::shared_plan(comm, &cfg, &out, say)?;
    let stage = cfg.zero_stage.unwrap_or(0);
    let per_device_mean = cfg.loss_normalization == "per-device-mean";
    let bf16 = cfg.bf16.unwrap_or(false);

    // ---- the model's config and tokenizer (no weights yet)
    let model_dir = resolve_model(&cfg.input_model)?;
    let weights_dir = match &plan {
        Plan::Resume { dir, .. } => dir.clone(),
        Plan::Fresh { .. } => model_dir.clone(),
    };
    let mcfg = NeoxConfig::from_file(&weights_dir.join("config.json"))?;
    let tok_dir = match &plan {
        Plan::Resume { dir, .. } if cfg.tokenizer.is_none() && dir.join("tokenizer.json").is_file() => dir,
        _ => &model_dir,
    };
    let tok = DollyTokenizer::resolve(Some(tok_dir), cfg.tokenizer.as_deref())?;
    let context = mcfg.max_position_embeddings;
    let max_length = match cfg.max_length {
        Some(m) => m,
        None => data::max_length_from_config(&weights_dir.join("config.json"))?,
    };
    if max_length > context {
        bail!(
            "--max-length {max_length} exceeds the model's context window of {context} tokens \
             (max_position_embeddings in {})",
            weights_dir.join("config.json").display()
        );
    }
    let pack_len = cfg.packing.then(|| cfg.pack_length.unwrap_or(max_length));
    if let Some(p) = pack_len.filter(|&p| p > context) {
        bail!("--pack-length {p} exceeds the model's context window of {context} tokens");
    }

    // ---- data
    let policy = if cfg.on_bad_record == "skip" { BadRecordPolicy::Skip } else { BadRecordPolicy::Fail };
    let loaded = data::load_dataset(&cfg.training_dataset, policy, &HubOptions::from_env())?;
    if loaded.report.skipped_count() > 0 {
        say(&format!("warning: {}", loaded.report.summary()));
    }
    let prep = data::prepare_examples(
        &loaded.records,
        &tok,
        &PrepareOptions { max_length, seed: cfg.seed, test_size: cfg.test_size.to_data(), dedup: cfg.dedup },
    )?;
    let (train_ex, test_ex) = (&prep.train, &prep.test);
    let resumed_state = match &plan {
        Plan::Resume { state, .. } => Some(state.as_ref().clone()),
        Plan::Fresh { .. } => None,
    };
    let start_step = resumed_state.as_ref().map_or(0, |s| s.global_step);
    let sampler = match &resumed_state {
        Some(s) => Sampler::from_state(s.sampler.clone(), train_ex.len())?,
        None => Sampler::new(train_ex.len(), cfg.seed, 0, 1, true)?,
    };
    let mut src = BatchSource { sampler, batch_size: cfg.per_device_train_batch_size, pack_len };
    let accum = cfg.gradient_accumulation_steps as u64;
    // micro-batch slots of one optimizer step over all processes
    let slots = accum * world as u64;
    let global_batch = cfg.per_device_train_batch_size as u64 * slots;
    if let Some(t) = cfg.deepspeed_train_batch_size.filter(|&t| t != global_batch) {
        bail!(
            "the DeepSpeed config's `train_batch_size` {t} != micro-batch {} x gradient accumulation {accum} x              {world} process(es) = {global_batch}",
            cfg.per_device_train_batch_size
        );
    }
    let steps_per_epoch = src.micro_batches_in_epoch(train_ex, 0)?.div_ceil(slots).max(1);
    let total_steps = cfg.total_steps(steps_per_epoch);
    let sched = Schedule {
        kind: cfg.lr_scheduler,
        lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup_steps: cfg.warmup_steps,
        total_steps,
    };

    // ---- resume checks, before the weights are read
    if let Some(s) = &resumed_state {
        check_resume_compatible(&s.config, &cfg)?;
        if s.global_step > total_steps {
            bail!(
                "cannot resume: the checkpoint is at step {}, beyond the new total of {total_steps} steps \
                 (--max-steps/--epochs)",
                s.global_step
            );
        }
        if s.global_step == total_steps && run_info.as_ref().is_some_and(|r| r.finished_step == Some(total_steps)) {
            say(&format!(
                "the run in {} is already complete at step {total_steps}; its model is there. Give a larger \
                 --max-steps or --epochs to continue it",
                out.display()
            ));
            let tps = s.tokens_seen as f64 / s.elapsed_s.max(1e-9);
            return Ok(summary(out, s.global_step, total_steps, train_ex.len(), tps, Outcome::AlreadyFinished));
        }
        if s.global_batch != 0 && s.global_batch != global_batch {
            say(&format!(
                "global batch {} -> {global_batch} ({world} process(es) x {} x {accum} accumulation): the step count                  and schedule follow the new batch; the sample cursor carries over, so no example is repeated or                  skipped",
                s.global_batch, cfg.per_device_train_batch_size
            ));
        }
        if s.total_steps != total_steps {
            say(&format!(
                "total steps {} -> {total_steps} (--max-steps/--epochs changed): the learning-rate schedule is \
                 recomputed for {total_steps} steps from step {}",
                s.total_steps, s.global_step
            ));
        }
    }

    // ---- memory: refuse what cannot fit, before allocating it
    let vocab_rows = mcfg.vocab_size.max(tok.vocab_size());
    let rows = pack_len.unwrap_or(max_length.next_multiple_of(8).min(context.max(8)));
    let batch = cfg.per_device_train_batch_size.max(cfg.per_device_eval_batch_size);
    // the vocabulary the run trains: the checkpoint's, or the tokenizer's (Dolly's resize) when fresh
    let run_cfg = {
        let mut c = mcfg.clone();
        if matches!(plan, Plan::Fresh { .. }) {
            c.vocab_size = tok.vocab_size();
        }
        c
    };
    // LoRA: the adapter trains, the base is frozen (held in bf16 when the run computes in bf16)
    let lora = lora_run::lora_config(&cfg, &run_cfg, &tok)?;
    let units = match &lora {
        Some(l) => lora_run::adapter_units(&run_cfg, l),
        None => Layout::new(&run_cfg).units(),
    };
    // the sharded state of this rank (ZeRO), in place of the whole model's weights, gradients and moments
    let shards = Shards::new(&units, world, rank);
    let recompute = cfg.gradient_checkpointing;
    let mut est = match &lora {
        Some(_) => memory::lora(&mcfg, vocab_rows, batch, rows, recompute, bf16, shards.total()),
        None => memory::training(&mcfg, vocab_rows, batch, rows, recompute, bf16),
    };
    if lora.is_none() {
        let zmem = zero::memory(stage, &shards, accum);
        est.parts.retain(|(k, _)| !matches!(*k, "weights" | "gradients" | "AdamW moments" | "transposed weights"));
        est.parts.splice(
            0..0,
            [
                ("weights", zmem.params as u128),
                ("gradients", (zmem.grads + zmem.grad_shard + zmem.accum_scratch) as u128),
                ("AdamW moments", zmem.moments as u128),
                ("transposed weights", zmem.transposed as u128),
            ],
        );
    }
    // LoRA on a bf16 base: where the products run on AMX, the frozen weights are packed once instead of in every
    // product, when that (4 bytes per weight) leaves 30% of the available memory free; the memory line shows it
    let packed = if lora.is_some() && bf16 { Model::packed_weight_bytes(&run_cfg) as u128 } else { 0 };
    let use_packed = packed > 0
        && common::sysmem::available_bytes().is_some_and(|a| (est.total_u64() as u128 + packed) * 10 <= a as u128 * 7);
    if use_packed {
        est.parts.push(("packed weights", packed));
    }
    common::check_fits("this run", est.total_u64()).map_err(|e| {
        TrainError(format!(
            "{e}. Lower --per-device-train-batch-size/--per-device-eval-batch-size or --max-length, keep \
             --gradient-checkpointing on, or pick a smaller model"
        ))
    })?;

    // ---- start-up summary
    let params = memory::param_count(&mcfg, vocab_rows) as u64;
    let precision = match (&lora, bf16) {
        (None, true) => "bf16 mixed precision (bf16 products, f32 master weights; saved in bf16)",
        (None, false) => "float32",
        (Some(_), true) => "bf16 products on a frozen bf16 base, f32 adapter",
        (Some(_), false) => "float32 (frozen float32 base)",
    };
    say(&format!("model: {} ({} parameters), {precision}", cfg.input_model, thousands(params)));
    if let Some(l) = &lora {
        let share = 100.0 * shards.total() as f64 / params.max(1) as f64;
        say(&format!(
            "LoRA: r {}, alpha {} (scale {:.4}{}), dropout {}, targets {}, {} trained token rows: {} trainable \
             values ({share:.3}% of the model)",
            l.r,
            l.alpha,
            l.scale(),
            if l.rslora { ", rsLoRA" } else { "" },
            l.dropout,
            l.targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(","),
            l.token_rows.len(),
            thousands(shards.total() as u64)
        ));
    }
    say(&format!(
        "data: {} records, {} dropped (length >= {max_length}), {} train, {} test",
        prep.report.records, prep.report.dropped, prep.report.train, prep.report.test
    ));
    say(&format!(
        "steps: {total_steps} ({steps_per_epoch} per epoch), effective batch {global_batch} ({} x {accum} \
         accumulation x {world} process(es)), {}",
        cfg.per_device_train_batch_size,
        match pack_len {
            Some(p) => format!("packed rows of {p} tokens"),
            None => format!("padded rows of up to {max_length} tokens"),
        }
    ));
    let avail = common::sysmem::total_bytes().map(|t| format!(" of {}", common::human_bytes(t))).unwrap_or_default();
    say(&format!("memory: {}{avail}{}", est.describe(), if world > 1 { " per process" } else { "" }));
    if world > 1 {
        say(&format!("processes: {world} ({}), ZeRO stage {stage}", comm.describe()));
        let h = common::human_bytes;
        for z in 0..=3u8 {
            let m = zero::memory(z, &shards, accum);
            say(&format!(
                "  stage {z}{}: per rank {} (weights {}, transposed {}, gradients {}, moments {})",
                if z == stage { " (this run)" } else { "" },
                h(m.total()),
                h(m.params),
                h(m.transposed),
                h(m.grads + m.grad_shard + m.accum_scratch),
                h(m.moments)
            ));
        }
    }
    // A stop request before the first step: nothing ran, nothing was saved.
    let stopped_before_training = || {
        summary(out.clone(), start_step, total_steps, train_ex.len(), 0.0, Outcome::Interrupted { checkpoint: None })
    };
    if stop_requested()? {
        return Ok(stopped_before_training());
    }

    // ---- weights
    let mut zero = Zero::new(stage, shards, comm, adam_cfg(&cfg), accum);
    let (mut model, model_hash) = match &plan {
        Plan::Resume { dir, state } => {
            let l = checkpoint_shards::load(dir, &zero.shards, stage)?;
            zero.opt.m = l.m;
            zero.opt.v = l.v;
            zero.opt.step = state.adam_step;
            say(&format!("resuming from {} (step {})", dir.display(), state.global_step));
            let h = fnv(dir.display().to_string().into_bytes(), fnv(state.global_step.to_le_bytes(), FNV0));
            let model = match &lora {
                Some(lc) => {
                    // the frozen base again from the input model, the adapter from the checkpoint
                    let mut m = lora_run::load_base(&model_dir, bf16, l.config.vocab_size, say)?;
                    m.attach_lora(lc.clone(), LoraInit::Values(l.params))?;
                    m
                }
                None => Model::from_parts(l.config, l.params)?,
            };
            (model, h)
        }
        Plan::Fresh { .. } => {
            let model = match &lora {
                Some(lc) => {
                    let mut m = lora_run::load_base(&model_dir, bf16, tok.vocab_size(), say)?;
                    m.attach_lora(lc.clone(), LoraInit::Seed(cfg.seed))?;
                    m
                }
                None => lora_run::load_base(&model_dir, false, tok.vocab_size(), say)?,
            };
            let h = if world > 1 { params_hash(model.trainable()) } else { 0 };
            (model, h)
        }
    };
    model.set_packed_weights(use_packed);
    if model.grad_len() != zero.shards.total() {
        bail!("the model trains {} values, {} were planned for", model.grad_len(), zero.shards.total());
    }
    zero.shard_model(&mut model);
    tok.check_model_vocab(model.config.vocab_size)?;
    model.set_compute_bf16(bf16);
    let data_hash = train_ex.iter().fold(FNV0, |h, e| fnv(e.input_ids.iter().flat_map(|x| x.to_le_bytes()), h));
    let cfg_hash = fnv(serde_json::to_vec(&cfg).map_err(|e| TrainError(e.to_string()))?, FNV0);
    dist_run::check_same(comm, &[("the configuration", cfg_hash), ("the data", data_hash), ("the model", model_hash)])?;
    if stop_requested()? {
        return Ok(stopped_before_training());
    }

    // ---- the run directory: now that every check passed (rank 0 writes it; the others wait)
    let mut info = match (&plan, run_info) {
        (Plan::Fresh { .. }, _) => RunInfo::new(),
        (Plan::Resume { state, .. }, Some(r)) if r.run_id == state.run_id => r,
        (Plan::Resume { state, .. }, _) => RunInfo { run_id: state.run_id.clone(), ..RunInfo::new() },
    };
    if world > 1 {
        // one run id for every rank (rank 0's)
        let mut id = info.run_id.clone().into_bytes();
        comm.broadcast_bytes(&mut id, 0).map_err(dist_err)?;
        info.run_id = String::from_utf8_lossy(&id).into_owned();
    }
    info.finished_step = None;
    let prepared = if rank == 0 { prepare_run_dir(&plan, &out, &info, &cfg, say) } else { Ok(()) };
    let failed = dist_run::any(comm, prepared.is_err())?;
    prepared?;
    if failed {
        bail!("rank 0 could not prepare {}", out.display());
    }

    // ---- state
    let resumed = resumed_state.is_some();
    let mut st = resumed_state.unwrap_or(TrainerState {
        format_version: 2,
        run_id: info.run_id.clone(),
        global_step: 0,
        total_steps,
        sampler: src.sampler.state(),
        adam_step: 0,
        log_loss_sum: 0.0,
        log_steps: 0,
        tokens_seen: 0,
        log_tokens: 0,
        nonfinite_in_row: 0,
        nonfinite_total: 0,
        elapsed_s: 0.0,
        elapsed_at_log: 0.0,
        config: cfg.clone(),
        world: world as u32,
        zero_stage: stage,
        global_batch,
    });
    st.format_version = 2;
    st.total_steps = total_steps;
    st.config = cfg.clone();
    (st.world, st.zero_stage, st.global_batch) = (world as u32, stage, global_batch);
    let mut metrics = match rank {
        0 => Some(Metrics::open(&out, Some(st.global_step).filter(|_| resumed), cfg.report_to == "tensorboard")?),
        _ => None,
    };
    if let Some(ev) = metrics.as_ref().and_then(|m| m.event_file()) {
        say(&format!("tensorboard: {} (tensorboard --logdir {})", ev.display(), out.join("runs").display()));
    }
    let mut acts = Activations::new(&model.config, cfg.per_device_train_batch_size, 8, cfg.gradient_checkpointing);
    let mut grads = model.new_grads();
    let t0 = Instant::now();
    let elapsed0 = st.elapsed_s;
    let progress = Progress::new(total_steps, st.global_step);
    let mut last_loss = None;
    let mut last_eval = None;
    let mut saved_at = None;
    // drawing loss.png takes a while (docs/benchmarks.md#training-step-tuning): at most every PLOT_EVERY of wall
    // time (and at the last step), so that `--logging-steps 1` on a fast step does not spend its time plotting.
    const PLOT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
    let mut plotted: Option<Instant> = None;
    let title = crate::plot::run_name(&out);
    let mine = (rank as u64 * accum) as usize..((rank as u64 + 1) * accum) as usize;

    while st.global_step < total_steps {
        // the micro-batch slots of this optimizer step, the same on every rank (an epoch's last step may have
        // fewer)
        let mut mbs = Vec::with_capacity(slots as usize);
        while (mbs.len() as u64) < slots {
            match src.next(train_ex)? {
                Some(b) => mbs.push(b),
                None if mbs.is_empty() => src.sampler.start_next_epoch(),
                None => break,
            }
        }
        let slot_targets: Vec<usize> = mbs.iter().map(|b| view(b).target_count()).collect();
        let targets: usize = slot_targets.iter().sum();
        if targets == 0 {
            bail!("step {}: the batch has no supervised tokens", st.global_step + 1);
        }
        // (gradients are zero here: set at start, and zeroed by the optimizer step or a skip)
        let mut slot_loss = vec![0f64; slots as usize];
        for (i, k) in mine.clone().enumerate() {
            let Some(b) = mbs.get(k) else {
                zero.empty_micro_batch(&mut model, &mut grads)?;
                continue;
            };
            acts.ensure(&model.config, b.batch_size, b.seq_len);
            let t = slot_targets[k];
            // token-weighted over the whole step, or (the seed's DeepSpeed numbers) each micro-batch's mean
            // averaged over the step's micro-batches
            let scale = match per_device_mean {
                false => 1.0 / targets as f32,
                true if t == 0 => 0.0,
                true => 1.0 / (t as f32 * mbs.len() as f32),
            };
            if lora.is_some() {
                model.set_dropout_seed(Some(lora_run::dropout_seed(cfg.seed, st.global_step + 1, k)));
            }
            let (s, _) = zero.micro_batch(&mut model, &view(b), &mut acts, &mut grads, scale, i == 0)?;
            slot_loss[k] = if per_device_mean { s / t.max(1) as f64 } else { s };
        }
        zero.reduce(&mut grads)?;
        let real_tokens: u64 = mbs.iter().flat_map(|b| b.attention_mask.iter()).map(|&m| m as u64).sum();
        let loss_sum = zero::exact_sum(comm, &mut slot_loss)?;
        let loss = if per_device_mean { loss_sum / mbs.len() as f64 } else { loss_sum / targets as f64 };
        let norm = zero.grad_norm(&grads)?;
        let lr = sched.lr_at(st.global_step);
        st.global_step += 1;
        if loss.is_finite() && norm.is_finite() {
            // clip (as clip_grad_norm_ would; max-grad-norm 0 = off) + AdamW + zero the gradients (+ on one
            // process, refresh the transposed weights), in one pass
            let coef = if cfg.max_grad_norm > 0.0 { clip_coef(norm, cfg.max_grad_norm) } else { 1.0 };
            zero.step(&mut model, &mut grads, lr as f32, coef)?;
            st.adam_step = zero.opt.step;
            st.nonfinite_in_row = 0;
            st.log_loss_sum += loss;
            st.log_steps += 1;
            last_loss = Some(loss);
        } else {
            zero.skip(&mut grads);
            st.nonfinite_in_row += 1;
            st.nonfinite_total += 1;
            progress.line(
                say,
                &format!("step {}: non-finite loss {loss} / grad norm {norm}; update skipped", st.global_step),
            );
            if st.nonfinite_in_row >= cfg.max_nonfinite_steps {
                bail!("aborting: {} non-finite steps in a row (last at step {})", st.nonfinite_in_row, st.global_step);
            }
        }
        st.tokens_seen += real_tokens;
        st.elapsed_s = elapsed0 + t0.elapsed().as_secs_f64();
        st.sampler = src.sampler.state();
        let epoch = st.global_step as f64 / steps_per_epoch as f64;
        if rank == 0 {
            progress.update(st.global_step, epoch, loss, last_eval);
        }

        let last = st.global_step == total_steps;
        let mut replot = false;
        if st.global_step % cfg.logging_steps == 0 || last {
            let dt = (st.elapsed_s - st.elapsed_at_log).max(1e-9);
            let mean = if st.log_steps > 0 { st.log_loss_sum / st.log_steps as f64 } else { f64::NAN };
            let tps = (st.tokens_seen - st.log_tokens) as f64 / dt;
            let mut row = json!({
                "step": st.global_step, "epoch": epoch, "loss": mean, "lr": lr, "grad_norm": norm,
                "tokens": st.tokens_seen, "tokens_per_s": tps, "elapsed_s": st.elapsed_s,
                "skipped_nonfinite": st.nonfinite_total,
            });
            if world > 1 {
                row["comm_s"] = json!(comm.stats().seconds);
            }
            if let Some(m) = metrics.as_mut() {
                m.write(&row)?;
            }
            let line = LogLine {
                step: st.global_step,
                total: total_steps,
                epoch,
                loss: mean,
                lr,
                grad_norm: norm,
                tokens_per_s: tps,
                elapsed_s: st.elapsed_s,
                eta_s: progress.eta_s(st.global_step),
            };
            progress.line(say, &line.to_string());
            st.log_loss_sum = 0.0;
            st.log_steps = 0;
            st.log_tokens = st.tokens_seen;
            st.elapsed_at_log = st.elapsed_s;
            replot = true;
        }
        if !test_ex.is_empty() && st.global_step % cfg.eval_steps == 0 {
            model.set_dropout_seed(None);
            let (s, n) = eval_loss(&mut model, &mut zero, test_ex, cfg.per_device_eval_batch_size, &mut acts)?;
            let el = s / n.max(1) as f64;
            last_eval = Some(el);
            if let Some(m) = metrics.as_mut() {
                m.write(&json!({"step": st.global_step, "epoch": epoch, "eval_loss": el, "eval_ppl": el.exp()}))?;
            }
            progress.line(say, &format!("eval at step {}: loss {el:.4}  ppl {:.2}", st.global_step, el.exp()));
            replot = true;
        }
        if rank == 0 && replot && (last || plotted.is_none_or(|t| t.elapsed() >= PLOT_EVERY)) {
            plotted = Some(Instant::now());
            if let Err(e) = crate::plot::plot_loss(&out, &title) {
                progress.line(say, &format!("warning: loss.png not drawn: {e}"));
            }
        }
        if std::env::var("DOLLY_FAULT_PAUSE_AFTER_STEP").ok() == Some(st.global_step.to_string()) {
            // Test-only: stop here (without exiting) so a test can `kill -9` the process or signal it.
            eprintln!("paused after step {}", st.global_step);
            while !local_stop() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        if dist_run::fault_here("DOLLY_FAULT_ABORT_AFTER_STEP", st.global_step, rank) {
            // Test-only: this rank dies like `kill -9` between steps.
            std::process::abort();
        }
        let stop = stop_requested()?;
        if st.global_step % cfg.save_steps == 0 || last || stop {
            let dir = checkpoint_shards::save(&out, &model, &zero, &st, Some(&tok))?;
            if rank == 0 {
                checkpoint::enforce_limit(&out, cfg.save_total_limit, &info.run_id)?;
            }
            progress.line(say, &format!("saved {}", dir.display()));
            saved_at = Some(dir);
        }
        if stop && !last {
            progress.finish();
            let tps = st.tokens_seen as f64 / st.elapsed_s.max(1e-9);
            let outcome = Outcome::Interrupted { checkpoint: saved_at };
            let base = summary(out, st.global_step, total_steps, train_ex.len(), tps, outcome);
            return Ok(RunSummary { last_loss, last_eval_loss: last_eval, ..base });
        }
    }
    progress.finish();

    // ---- final Hugging Face export (never of non-finite weights), by rank 0, gathered unit by unit under ZeRO-3
    let dtype = if bf16 { SaveDtype::Bf16 } else { SaveDtype::F32 };
    let files: &[&str] = match &lora {
        // a LoRA run's result is its adapter (PEFT's format), beside the tokenizer
        Some(_) => {
            if rank == 0 {
                lora_run::export(&out, &model, &cfg.input_model)?;
            }
            &[neox::adapter_io::CONFIG_FILE, neox::adapter_io::WEIGHTS_FILE]
        }
        None => {
            checkpoint_shards::export(&out, &mut model, &zero, dtype)?;
            &["config.json", "model.safetensors"]
        }
    };
    if rank == 0 {
        tok.save_pretrained(&out, Some(model.config.max_position_embeddings))?;
        if let Some(dbfs) = &cfg.dbfs_output_dir {
            io_ctx(std::fs::create_dir_all(dbfs), || format!("cannot create {}", dbfs.display()))?;
            for f in files.iter().chain(&["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]) {
                let bytes = io_ctx(std::fs::read(out.join(f)), || format!("reading {}", out.join(f).display()))?;
                io_ctx(common::atomic_write(&dbfs.join(f), &bytes), || format!("writing {}", dbfs.join(f).display()))?;
            }
            say(&format!("copied the final model to {}", dbfs.display()));
        }
        info.finished_step = Some(st.global_step);
        rundir::write(&out, &info)?;
    }
    // every rank's peak resident memory (what ZeRO saves), recorded by rank 0
    let mine = common::sysmem::peak_rss_bytes().unwrap_or(0).to_le_bytes();
    let all = comm.all_gather_bytes(&mine).map_err(dist_err)?;
    let peaks: Vec<u64> = all.iter().map(|b| u64::from_le_bytes(b.as_slice().try_into().unwrap_or([0; 8]))).collect();
    if let Some(m) = metrics.as_mut() {
        m.write(&json!({"step": st.global_step, "peak_rss_bytes": peaks, "comm_s": comm.stats().seconds}))?;
    }
    if world > 1 {
        let peaks: Vec<String> = peaks.iter().map(|&b| common::human_bytes(b)).collect();
        let c = comm.stats();
        say(&format!(
            "peak memory per rank (VmHWM): {}; collectives: {:.2} s, {} on rank 0",
            peaks.join(", "),
            c.seconds,
            common::human_bytes(c.bytes)
        ));
    }
    comm.barrier().map_err(dist_err)?;
    let tps = st.tokens_seen as f64 / st.elapsed_s.max(1e-9);
    let base = summary(out, st.global_step, total_steps, train_ex.len(), tps, Outcome::Finished);
    Ok(RunSummary { last_loss, last_eval_loss: last_eval, ..base })
}

/// Rank 0's part of starting the run: clear the directory when the plan says so, record the run, remove what
/// interrupted writes left.
fn prepare_run_dir(
    plan: &Plan,
    out: &std::path::Path,
    info: &RunInfo,
    cfg: &TrainConfig,
    say: &dyn Fn(&str),
) -> Result<()> {
    if let Plan::Fresh { clear: true } = plan {
        let gone = rundir::clear(out)?;
        say(&format!("--overwrite-output-dir: removed {} from {}", rundir::show(&gone), out.display()));
    }
    rundir::write(out, info)?;
    let (stale, freed) = rundir::remove_stale(out);
    if !stale.is_empty() {
        say(&format!(
            "removed {} stale file(s) of interrupted writes ({}): {}",
            stale.len(),
            common::human_bytes(freed),
            rundir::show(&stale)
        ));
    }
    say(&format!(
        "output: {} (run {}), checkpoint every {} steps, keeping {}",
        out.display(),
        info.run_id,
        cfg.save_steps,
        cfg.save_total_limit
    ));
    Ok(())
}

/// A cheap fingerprint of the parameters (the ranks must start from the same weights).
fn params_hash(p: &[f32]) -> u64 {
    use rayon::prelude::*;
    let parts: Vec<u64> = p.par_chunks(1 << 16).map(|c| fnv(c.iter().flat_map(|x| x.to_le_bytes()), FNV0)).collect();
    fnv(parts.iter().flat_map(|x| x.to_le_bytes()), FNV0)
}

/// A summary without losses (none were computed in this session, or the caller adds them).
fn summary(
    output_dir: PathBuf,
    steps: u64,
    total_steps: u64,
    train_examples: usize,
    tokens_per_s: f64,
    outcome: Outcome,
) -> RunSummary {
    RunSummary {
        output_dir,
        steps,
        total_steps,
        last_loss: None,
        last_eval_loss: None,
        train_examples,
        tokens_per_s,
        outcome,
    }
}

fn adam_cfg(cfg: &TrainConfig) -> AdamWConfig {
    AdamWConfig {
        beta1: cfg.adam_beta1 as f32,
        beta2: cfg.adam_beta2 as f32,
        eps: cfg.adam_epsilon as f32,
        weight_decay: cfg.weight_decay as f32,
    }
}
