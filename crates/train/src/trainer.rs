//! The training loop, in one readable place: check everything cheap first (paths, the run directory, the
//! model's config.json, the data, the memory the run needs), then load the weights, then per optimizer step
//! micro-batches -> forward/backward (token-weighted over the whole step) -> finite check -> clip -> AdamW ->
//! schedule -> log -> eval -> checkpoint; finally the Hugging Face export. Resume restores weights, moments,
//! sampler cursor and log accumulators so the continued run is bit-identical to an uninterrupted one.
//! SIGINT/SIGTERM (the `stop` flag) end the run after the current step with a checkpoint.

use crate::batches::BatchSource;
use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::error::{io_ctx, Result, TrainError};
use crate::metrics::Metrics;
use crate::model_source::resolve_model;
use crate::progress::{LogLine, Progress};
use crate::rundir::{self, RunInfo};
use crate::schedule::Schedule;
use crate::start::{check_dataset_source, check_resume_compatible, plan, Plan};
use crate::{bail, memory};
use data::{BadRecordPolicy, DollyTokenizer, Example, HubOptions, PrepareOptions, Sampler};
use neox::{clip_coef, Activations, AdamW, AdamWConfig, BatchInput, Model, NeoxConfig, SaveDtype};
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

/// The caller's side of a run: where notes go, and a flag that asks the loop to stop after the current step.
pub struct Control<'a> {
    pub say: &'a dyn Fn(&str),
    pub stop: Option<&'a AtomicBool>,
}

fn view(b: &data::Batch) -> BatchInput<'_> {
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

fn eval_loss(model: &Model, test: &[Example], bs: usize, acts: &mut Activations) -> Result<(f64, usize)> {
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in test.chunks(bs) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = data::pad_batch(&refs, 8, 0)?;
        acts.ensure(&model.config, b.batch_size, b.seq_len);
        let (s, c) = model.forward_loss(&view(&b), acts)?;
        sum += s;
        n += c;
    }
    Ok((sum, n))
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
    train_with(cfg, &Control { say, stop: None })
}

/// `train` with a stop flag (set by the caller's signal handler).
pub fn train_with(cfg: TrainConfig, ctl: &Control<'_>) -> Result<RunSummary> {
    let say = ctl.say;
    let stop_requested = || ctl.stop.is_some_and(|s| s.load(Ordering::SeqCst));
    cfg.validate()?;
    check_dataset_source(&cfg.training_dataset)?;
    let out = cfg.output_dir().to_path_buf();
    io_ctx(std::fs::create_dir_all(&out), || format!("cannot create output directory {}", out.display()))?;
    let probe = out.join(".dolly-write-probe");
    io_ctx(common::atomic_write(&probe, b"ok"), || format!("output directory {} is not writable", out.display()))?;
    let _ = std::fs::remove_file(&probe);
    let (plan, run_info) = plan(&cfg, &out, say)?;
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
    let steps_per_epoch = src.micro_batches_in_epoch(train_ex, 0)?.div_ceil(accum).max(1);
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
    let est = memory::training(&mcfg, vocab_rows, batch, rows, cfg.gradient_checkpointing, bf16);
    common::check_fits("this run", est.total_u64()).map_err(|e| {
        TrainError(format!(
            "{e}. Lower --per-device-train-batch-size/--per-device-eval-batch-size or --max-length, keep \
             --gradient-checkpointing on, or pick a smaller model"
        ))
    })?;

    // ---- start-up summary
    let params = memory::param_count(&mcfg, vocab_rows) as u64;
    let precision =
        if bf16 { "bf16 mixed precision (bf16 products, f32 master weights; saved in bf16)" } else { "float32" };
    say(&format!("model: {} ({} parameters), {precision}", cfg.input_model, thousands(params)));
    say(&format!(
        "data: {} records, {} dropped (length >= {max_length}), {} train, {} test",
        prep.report.records, prep.report.dropped, prep.report.train, prep.report.test
    ));
    say(&format!(
        "steps: {total_steps} ({steps_per_epoch} per epoch), effective batch {} ({} x {accum} accumulation), {}",
        cfg.per_device_train_batch_size as u64 * accum,
        cfg.per_device_train_batch_size,
        match pack_len {
            Some(p) => format!("packed rows of {p} tokens"),
            None => format!("padded rows of up to {max_length} tokens"),
        }
    ));
    let avail = common::sysmem::total_bytes().map(|t| format!(" of {}", common::human_bytes(t))).unwrap_or_default();
    say(&format!("memory: {}{avail}", est.describe()));
    // A stop request before the first step: nothing ran, nothing was saved.
    let stopped_before_training = || {
        summary(out.clone(), start_step, total_steps, train_ex.len(), 0.0, Outcome::Interrupted { checkpoint: None })
    };
    if stop_requested() {
        return Ok(stopped_before_training());
    }

    // ---- weights
    let (mut model, mut opt) = match &plan {
        Plan::Resume { dir, state } => {
            let (model, m, v, _) = checkpoint::load(dir)?;
            let mut opt = AdamW::new(adam_cfg(&cfg), model.num_params());
            opt.m = m;
            opt.v = v;
            opt.step = state.adam_step;
            say(&format!("resuming from {} (step {})", dir.display(), state.global_step));
            (model, opt)
        }
        Plan::Fresh { .. } => {
            let mut model = Model::load(&model_dir)?;
            let v = tok.vocab_size();
            if model.config.vocab_size != v {
                say(&format!("resizing vocabulary {} -> {v} (Dolly's resize)", model.config.vocab_size));
                model.resize_vocab(v)?;
            }
            let opt = AdamW::new(adam_cfg(&cfg), model.num_params());
            (model, opt)
        }
    };
    tok.check_model_vocab(model.config.vocab_size)?;
    model.set_compute_bf16(bf16);
    if stop_requested() {
        return Ok(stopped_before_training());
    }

    // ---- the run directory: now that every check passed
    let mut info = match (&plan, run_info) {
        (Plan::Fresh { clear }, _) => {
            if *clear {
                let gone = rundir::clear(&out)?;
                say(&format!("--overwrite-output-dir: removed {} from {}", rundir::show(&gone), out.display()));
            }
            RunInfo::new()
        }
        (Plan::Resume { state, .. }, Some(r)) if r.run_id == state.run_id => r,
        (Plan::Resume { state, .. }, _) => RunInfo { run_id: state.run_id.clone(), ..RunInfo::new() },
    };
    info.finished_step = None;
    rundir::write(&out, &info)?;
    let (stale, freed) = rundir::remove_stale(&out);
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

    // ---- state
    let resumed = resumed_state.is_some();
    let mut st = resumed_state.unwrap_or(TrainerState {
        format_version: 1,
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
    });
    st.total_steps = total_steps;
    st.config = cfg.clone();
    let mut metrics = Metrics::open(&out, Some(st.global_step).filter(|_| resumed), cfg.report_to == "tensorboard")?;
    if let Some(ev) = metrics.event_file() {
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

    while st.global_step < total_steps {
        // micro-batches of this optimizer step (an epoch's last step may have fewer)
        let mut mbs = Vec::with_capacity(accum as usize);
        while (mbs.len() as u64) < accum {
            match src.next(train_ex)? {
                Some(b) => mbs.push(b),
                None if mbs.is_empty() => src.sampler.start_next_epoch(),
                None => break,
            }
        }
        let targets: usize = mbs.iter().map(|b| view(b).target_count()).sum();
        if targets == 0 {
            bail!("step {}: the batch has no supervised tokens", st.global_step + 1);
        }
        // (gradients are zero here: set at start, and zeroed by the fused optimizer step or below)
        let mut loss_sum = 0f64;
        let mut real_tokens = 0u64;
        for b in &mbs {
            acts.ensure(&model.config, b.batch_size, b.seq_len);
            let (s, _) = model.forward_backward(&view(b), &mut acts, &mut grads, 1.0 / targets as f32)?;
            loss_sum += s;
            real_tokens += b.attention_mask.iter().map(|&m| m as u64).sum::<u64>();
        }
        let loss = loss_sum / targets as f64;
        let norm = model.grad_norm(&grads);
        let lr = sched.lr_at(st.global_step);
        st.global_step += 1;
        if loss.is_finite() && norm.is_finite() {
            // clip (as clip_grad_norm_ would; max-grad-norm 0 = off) + AdamW + zero the gradients + refresh the
            // transposed weights, in one pass
            let coef = if cfg.max_grad_norm > 0.0 { clip_coef(norm, cfg.max_grad_norm) } else { 1.0 };
            model.adamw_step(&mut opt, &mut grads, lr as f32, coef);
            st.adam_step = opt.step;
            st.nonfinite_in_row = 0;
            st.log_loss_sum += loss;
            st.log_steps += 1;
            last_loss = Some(loss);
        } else {
            model.zero_grads(&mut grads);
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
        progress.update(st.global_step, epoch, loss, last_eval);

        let last = st.global_step == total_steps;
        let mut replot = false;
        if st.global_step % cfg.logging_steps == 0 || last {
            let dt = (st.elapsed_s - st.elapsed_at_log).max(1e-9);
            let mean = if st.log_steps > 0 { st.log_loss_sum / st.log_steps as f64 } else { f64::NAN };
            let tps = (st.tokens_seen - st.log_tokens) as f64 / dt;
            metrics.write(&json!({
                "step": st.global_step, "epoch": epoch, "loss": mean, "lr": lr, "grad_norm": norm,
                "tokens": st.tokens_seen, "tokens_per_s": tps, "elapsed_s": st.elapsed_s,
                "skipped_nonfinite": st.nonfinite_total,
            }))?;
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
            let (s, n) = eval_loss(&model, test_ex, cfg.per_device_eval_batch_size, &mut acts)?;
            let el = s / n.max(1) as f64;
            last_eval = Some(el);
            metrics.write(&json!({"step": st.global_step, "epoch": epoch, "eval_loss": el, "eval_ppl": el.exp()}))?;
            progress.line(say, &format!("eval at step {}: loss {el:.4}  ppl {:.2}", st.global_step, el.exp()));
            replot = true;
        }
        if replot && (last || plotted.is_none_or(|t| t.elapsed() >= PLOT_EVERY)) {
            plotted = Some(Instant::now());
            if let Err(e) = crate::plot::plot_loss(&out, &title) {
                progress.line(say, &format!("warning: loss.png not drawn: {e}"));
            }
        }
        if std::env::var("DOLLY_FAULT_PAUSE_AFTER_STEP").ok() == Some(st.global_step.to_string()) {
            // Test-only: stop here (without exiting) so a test can `kill -9` the process or signal it.
            eprintln!("paused after step {}", st.global_step);
            while !stop_requested() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let stop = stop_requested();
        if st.global_step % cfg.save_steps == 0 || last || stop {
            let dir = checkpoint::save(&out, &model, &opt, &st, Some(&tok))?;
            checkpoint::enforce_limit(&out, cfg.save_total_limit, &info.run_id)?;
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

    // ---- final Hugging Face export (never of non-finite weights)
    checkpoint::check_finite(&model, "final model")?;
    let dtype = if bf16 { SaveDtype::Bf16 } else { SaveDtype::F32 };
    model.save(&out, dtype)?;
    tok.save_pretrained(&out, Some(model.config.max_position_embeddings))?;
    if let Some(dbfs) = &cfg.dbfs_output_dir {
        io_ctx(std::fs::create_dir_all(dbfs), || format!("cannot create {}", dbfs.display()))?;
        for f in
            ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
        {
            let bytes = io_ctx(std::fs::read(out.join(f)), || format!("reading {}", out.join(f).display()))?;
            io_ctx(common::atomic_write(&dbfs.join(f), &bytes), || format!("writing {}", dbfs.join(f).display()))?;
        }
        say(&format!("copied the final model to {}", dbfs.display()));
    }
    info.finished_step = Some(st.global_step);
    rundir::write(&out, &info)?;
    let tps = st.tokens_seen as f64 / st.elapsed_s.max(1e-9);
    let base = summary(out, st.global_step, total_steps, train_ex.len(), tps, Outcome::Finished);
    Ok(RunSummary { last_loss, last_eval_loss: last_eval, ..base })
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
