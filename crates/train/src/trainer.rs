//! The training loop, in one readable place: resolve model/tokenizer/data, then per optimizer step
//! micro-batches -> forward/backward (token-weighted over the whole step) -> finite check -> clip -> AdamW ->
//! schedule -> log -> eval -> checkpoint; finally the Hugging Face export. Resume restores weights, moments,
//! sampler cursor and log accumulators so the continued run is bit-identical to an uninterrupted one.

use crate::batches::BatchSource;
use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::error::{io_ctx, Result, TrainError};
use crate::metrics::Metrics;
use crate::model_source::resolve_model;
use crate::schedule::Schedule;
use crate::{bail, deepspeed};
use data::{BadRecordPolicy, DollyTokenizer, Example, HubOptions, PrepareOptions, Sampler};
use neox::{clip_coef, grad_norm, Activations, AdamW, AdamWConfig, BatchInput, Model, SaveDtype};
use rayon::prelude::*;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub output_dir: PathBuf,
    pub steps: u64,
    pub last_loss: f64,
    pub last_eval_loss: Option<f64>,
    pub train_examples: usize,
    pub tokens_per_s: f64,
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

/// Fields that must not change across a resume (they decide the data order and the schedule).
fn check_resume_compatible(saved: &TrainConfig, now: &TrainConfig) -> Result<()> {
    let pairs = [
        ("training-dataset", saved.training_dataset.clone(), now.training_dataset.clone()),
        ("seed", saved.seed.to_string(), now.seed.to_string()),
        (
            "per-device-train-batch-size",
            saved.per_device_train_batch_size.to_string(),
            now.per_device_train_batch_size.to_string(),
        ),
        (
            "gradient-accumulation-steps",
            saved.gradient_accumulation_steps.to_string(),
            now.gradient_accumulation_steps.to_string(),
        ),
        ("packing", saved.packing.to_string(), now.packing.to_string()),
        ("test-size", format!("{:?}", saved.test_size), format!("{:?}", now.test_size)),
        ("max-length", format!("{:?}", saved.max_length), format!("{:?}", now.max_length)),
        ("epochs", saved.epochs.to_string(), now.epochs.to_string()),
        ("max-steps", format!("{:?}", saved.max_steps), format!("{:?}", now.max_steps)),
    ];
    let diffs: Vec<String> =
        pairs.iter().filter(|(_, a, b)| a != b).map(|(k, a, b)| format!("{k}: checkpoint {a}, now {b}")).collect();
    if !diffs.is_empty() {
        bail!("cannot resume: settings differ from the checkpoint's ({})", diffs.join("; "));
    }
    Ok(())
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

/// Run (or resume) a training job. `say` receives human-readable progress notes.
pub fn train(mut cfg: TrainConfig, say: &dyn Fn(&str)) -> Result<RunSummary> {
    cfg.validate()?;
    if let Some(ds) = cfg.deepspeed.clone() {
        let r = deepspeed::apply(&ds, &mut cfg)?;
        for a in &r.applied {
            say(&format!("deepspeed: applied {a}"));
        }
        for n in &r.not_honoured {
            say(&format!("deepspeed: not honoured here: {n}"));
        }
    }
    let bf16 = cfg.bf16.unwrap_or(false);
    if bf16 {
        say("bf16 mixed precision: matrix products take bf16 operands (f32 accumulation, float32 master weights \
             and optimizer); on this CPU that reproduces bf16 numerics, not bf16 speed; the final model is saved \
             in bfloat16");
    }
    let out = cfg.output_dir().to_path_buf();
    io_ctx(std::fs::create_dir_all(&out), || format!("cannot create output directory {}", out.display()))?;
    let probe = out.join(".dolly-write-probe");
    io_ctx(common::atomic_write(&probe, b"ok"), || format!("output directory {} is not writable", out.display()))?;
    let _ = std::fs::remove_file(&probe);

    // ---- model, tokenizer, optional resume
    let model_dir = resolve_model(&cfg.input_model)?;
    let tok = DollyTokenizer::resolve(Some(&model_dir), cfg.tokenizer.as_deref())?;
    let resume_dir = match cfg.resume_from_checkpoint.as_deref() {
        None => None,
        Some("latest") => Some(checkpoint::latest(&out).ok_or_else(|| {
            TrainError(format!("--resume-from-checkpoint latest: no complete checkpoint in {}", out.display()))
        })?),
        Some(p) => Some(PathBuf::from(p)),
    };
    let (mut model, mut opt, resumed) = match &resume_dir {
        Some(dir) => {
            let (model, m, v, state) = checkpoint::load(dir)?;
            check_resume_compatible(&state.config, &cfg)?;
            let mut opt = AdamW::new(adam_cfg(&cfg), model.num_params());
            opt.m = m;
            opt.v = v;
            opt.step = state.adam_step;
            say(&format!("resuming from {} (step {})", dir.display(), state.global_step));
            (model, opt, Some(state))
        }
        None => {
            let mut model = Model::load(&model_dir)?;
            let v = tok.vocab_size();
            if model.config.vocab_size != v {
                say(&format!("resizing vocabulary {} -> {v} (Dolly's resize)", model.config.vocab_size));
                model.resize_vocab(v)?;
            }
            let opt = AdamW::new(adam_cfg(&cfg), model.num_params());
            (model, opt, None)
        }
    };
    tok.check_model_vocab(model.config.vocab_size)?;
    model.set_compute_bf16(bf16);

    // ---- data
    let max_length = match cfg.max_length {
        Some(m) => m,
        None => data::max_length_from_config(&model_dir.join("config.json"))?,
    };
    let policy = if cfg.on_bad_record == "skip" { BadRecordPolicy::Skip } else { BadRecordPolicy::Fail };
    let loaded = data::load_dataset(&cfg.training_dataset, policy, &HubOptions::from_env())?;
    if loaded.report.skipped_count() > 0 {
        say(&format!("skipped {} bad records: {}", loaded.report.skipped_count(), loaded.report.summary()));
    }
    let prep = data::prepare_examples(
        &loaded.records,
        &tok,
        &PrepareOptions { max_length, seed: cfg.seed, test_size: cfg.test_size.to_data(), dedup: cfg.dedup },
    )?;
    say(&format!(
        "data: {} records, {} dropped (length >= {max_length}), {} train, {} test",
        prep.report.records, prep.report.dropped, prep.report.train, prep.report.test
    ));
    if prep.train.is_empty() {
        bail!("no training examples left after filtering and the test split");
    }
    let (train_ex, test_ex) = (&prep.train, &prep.test);
    let sampler = match &resumed {
        Some(s) => Sampler::from_state(s.sampler.clone(), train_ex.len())?,
        None => Sampler::new(train_ex.len(), cfg.seed, 0, 1, true)?,
    };
    let pack_len = cfg.packing.then(|| cfg.pack_length.unwrap_or(max_length));
    let mut src = BatchSource { sampler, batch_size: cfg.per_device_train_batch_size, pack_len };
    let accum = cfg.gradient_accumulation_steps as u64;
    let steps_per_epoch = src.micro_batches_in_epoch(train_ex, 0)?.div_ceil(accum).max(1);
    let total_steps = cfg.max_steps.unwrap_or(steps_per_epoch * cfg.epochs as u64);
    let sched =
        Schedule { kind: cfg.lr_scheduler, lr: cfg.lr, min_lr: 0.0, warmup_steps: cfg.warmup_steps, total_steps };

    // ---- state
    let mut st = resumed.unwrap_or(TrainerState {
        format_version: 1,
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
    let mut metrics = Metrics::open(&out, Some(st.global_step).filter(|_| resume_dir.is_some()))?;
    let mut acts = Activations::new(&model.config, cfg.per_device_train_batch_size, 8, cfg.gradient_checkpointing);
    let mut grads = vec![0f32; model.num_params()];
    let t0 = Instant::now();
    let elapsed0 = st.elapsed_s;
    let bar = indicatif::ProgressBar::new(total_steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(st.global_step);
    let mut last_loss = f64::NAN;
    let mut last_eval = None;

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
        let norm = grad_norm(&grads);
        let lr = sched.lr_at(st.global_step);
        st.global_step += 1;
        if loss.is_finite() && norm.is_finite() {
            // clip (as clip_grad_norm_ would) + AdamW + zero the gradients + refresh the transposed weights, in
            // one pass
            let coef = clip_coef(norm, cfg.max_grad_norm);
            model.adamw_step(&mut opt, &mut grads, lr as f32, coef);
            st.adam_step = opt.step;
            st.nonfinite_in_row = 0;
            st.log_loss_sum += loss;
            st.log_steps += 1;
            last_loss = loss;
        } else {
            grads.par_iter_mut().for_each(|g| *g = 0.0);
            st.nonfinite_in_row += 1;
            st.nonfinite_total += 1;
            say(&format!("step {}: non-finite loss {loss} / grad norm {norm}; update skipped", st.global_step));
            if st.nonfinite_in_row >= cfg.max_nonfinite_steps {
                bail!("aborting: {} non-finite steps in a row (last at step {})", st.nonfinite_in_row, st.global_step);
            }
        }
        st.tokens_seen += real_tokens;
        st.elapsed_s = elapsed0 + t0.elapsed().as_secs_f64();
        st.sampler = src.sampler.state();
        let epoch = st.global_step as f64 / steps_per_epoch as f64;
        bar.set_position(st.global_step);
        bar.set_message(format!(
            "loss {loss:.4}  lr {lr:.2e}  {:.0} tok/s",
            st.tokens_seen as f64 / st.elapsed_s.max(1e-9)
        ));

        if st.global_step % cfg.logging_steps == 0 || st.global_step == total_steps {
            let dt = (st.elapsed_s - st.elapsed_at_log).max(1e-9);
            let row = json!({
                "step": st.global_step, "epoch": epoch,
                "loss": if st.log_steps > 0 { st.log_loss_sum / st.log_steps as f64 } else { f64::NAN },
                "lr": lr, "grad_norm": norm, "tokens": st.tokens_seen,
                "tokens_per_s": (st.tokens_seen - st.log_tokens) as f64 / dt, "elapsed_s": st.elapsed_s,
                "skipped_nonfinite": st.nonfinite_total,
            });
            metrics.write(&row)?;
            st.log_loss_sum = 0.0;
            st.log_steps = 0;
            st.log_tokens = st.tokens_seen;
            st.elapsed_at_log = st.elapsed_s;
        }
        if !test_ex.is_empty() && st.global_step % cfg.eval_steps == 0 {
            let (s, n) = eval_loss(&model, test_ex, cfg.per_device_eval_batch_size, &mut acts)?;
            let el = s / n.max(1) as f64;
            last_eval = Some(el);
            metrics.write(&json!({"step": st.global_step, "epoch": epoch, "eval_loss": el, "eval_ppl": el.exp()}))?;
        }
        if std::env::var("DOLLY_FAULT_PAUSE_AFTER_STEP").ok() == Some(st.global_step.to_string()) {
            // Test-only: stop here (without exiting) so a test can `kill -9` the process at a known step.
            eprintln!("paused after step {}", st.global_step);
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        if st.global_step % cfg.save_steps == 0 {
            let dir = checkpoint::save(&out, &model, &opt, &st)?;
            checkpoint::enforce_limit(&out, cfg.save_total_limit)?;
            bar.println(format!("saved {}", dir.display()));
        }
    }
    bar.finish_and_clear();
    match crate::plot::plot_metrics(&out) {
        Ok((lo, hi)) => say(&format!("loss curve: {} (loss axis {lo:.3} .. {hi:.3})", out.join("loss.png").display())),
        Err(e) => say(&format!("no loss curve: {e}")),
    }

    // ---- final Hugging Face export
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
    Ok(RunSummary {
        output_dir: out,
        steps: st.global_step,
        last_loss,
        last_eval_loss: last_eval,
        train_examples: train_ex.len(),
        tokens_per_s: st.tokens_seen as f64 / st.elapsed_s.max(1e-9),
    })
}

fn adam_cfg(cfg: &TrainConfig) -> AdamWConfig {
    AdamWConfig {
        beta1: cfg.adam_beta1 as f32,
        beta2: cfg.adam_beta2 as f32,
        eps: cfg.adam_epsilon as f32,
        weight_decay: cfg.weight_decay as f32,
    }
}
