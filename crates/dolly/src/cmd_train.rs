//! `dolly train`: the seed trainer's flags (same names and defaults; see `train::TrainConfig`), an optional
//! `--config FILE.toml` whose keys are these flag names, the command line overriding the file.

use crate::flags::parse_bool;
use anyhow::Context;
use clap::Args;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Flags; each is optional so that only what is given overrides the config file and the defaults.
#[derive(Args, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct TrainArgs {
    /// TOML file with any of these flags as keys (`lr = 5e-6`); flags given here override it.
    #[arg(long, help_heading = "Model")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// HF model directory or hub id [default: EleutherAI/pythia-6.9b].
    #[arg(long, help_heading = "Model")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_model: Option<String>,
    /// Output directory: checkpoints, metrics.jsonl, final model (required).
    #[arg(long, help_heading = "Checkpoints and output")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_output_dir: Option<PathBuf>,
    /// Also copy the final model here.
    #[arg(long, help_heading = "Checkpoints and output")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dbfs_output_dir: Option<PathBuf>,
    /// [default: 3]
    #[arg(long, help_heading = "Schedule")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u32>,
    /// [default: 8]
    #[arg(long, help_heading = "Optimisation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_device_train_batch_size: Option<usize>,
    /// [default: 8]
    #[arg(long, help_heading = "Optimisation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_device_eval_batch_size: Option<usize>,
    /// Held-out records: a count (1000) or a ratio (0.05); 0 = no eval [default: 1000].
    #[arg(long, help_heading = "Data")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_size: Option<String>,
    /// [default: 0]
    #[arg(long, help_heading = "Schedule")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// [default: 10]
    #[arg(long, help_heading = "Logging and evaluation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logging_steps: Option<u64>,
    /// [default: 50]
    #[arg(long, help_heading = "Logging and evaluation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_steps: Option<u64>,
    /// [default: 400]
    #[arg(long, help_heading = "Checkpoints and output")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_steps: Option<u64>,
    /// [default: 10]
    #[arg(long, help_heading = "Checkpoints and output")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_total_limit: Option<usize>,
    /// Peak learning rate [default: 1e-5].
    #[arg(long, help_heading = "Optimisation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// [default: 42]
    #[arg(long, help_heading = "Optimisation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// DeepSpeed JSON config (Dolly's ZeRO configs): what applies here is applied, the rest reported.
    #[arg(long, help_heading = "Optimisation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deepspeed: Option<PathBuf>,
    /// Hub dataset id, .jsonl/.json/.parquet file, or a directory [default: databricks/databricks-dolly-15k].
    #[arg(long, help_heading = "Data")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training_dataset: Option<String>,
    /// Recompute activations per layer in the backward [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool, help_heading = "Precision and memory")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
    /// Same as --gradient-checkpointing false.
    #[arg(long, help_heading = "Precision and memory")]
    #[serde(skip)]
    pub no_gradient_checkpointing: bool,
    /// bf16 mixed precision: true|false (bare --bf16 = true) [default: false, float32 on CPU].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool, help_heading = "Precision and memory")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bf16: Option<bool>,
    /// Stop after this many optimizer steps (overrides epochs).
    #[arg(long, help_heading = "Schedule")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// [default: 1]
    #[arg(long, help_heading = "Optimisation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gradient_accumulation_steps: Option<usize>,
    /// AdamW decoupled weight decay (biases and LayerNorm excluded) [default: 0].
    #[arg(long, help_heading = "Optimisation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// linear | constant | warmup-log [default: linear].
    #[arg(long, help_heading = "Schedule")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_scheduler: Option<String>,
    /// Pack examples into fixed-length rows (per-document attention) instead of padding.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool, help_heading = "Data")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packing: Option<bool>,
    /// Row length for --packing [default: the model's max length].
    #[arg(long, help_heading = "Data")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pack_length: Option<usize>,
    /// A checkpoint directory; `latest` (the newest complete, verified one in the output directory); or `auto`
    /// (`latest` when there is one, else start the run).
    #[arg(long, help_heading = "Checkpoints and output")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_from_checkpoint: Option<String>,
    /// tokenizer.json to use instead of the model directory's.
    #[arg(long, help_heading = "Model")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// Max tokens per example (default: from config.json, Dolly's lookup).
    #[arg(long, help_heading = "Data")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// fail | skip for malformed records [default: fail].
    #[arg(long, help_heading = "Data")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_bad_record: Option<String>,
    /// Drop exact duplicate records before the split.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool, help_heading = "Data")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup: Option<bool>,
    /// Global gradient-norm clip [default: 1.0].
    #[arg(long, help_heading = "Optimisation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// AdamW beta1, in [0, 1) [default: 0.9].
    #[arg(long, help_heading = "Optimisation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adam_beta1: Option<f64>,
    /// AdamW beta2, in [0, 1) [default: 0.999].
    #[arg(long, help_heading = "Optimisation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adam_beta2: Option<f64>,
    /// AdamW epsilon, > 0 [default: 1e-8].
    #[arg(long, help_heading = "Optimisation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adam_epsilon: Option<f64>,
    /// Learning rate at the start of a warmup-log warmup (DeepSpeed's warmup_min_lr) [default: 0].
    #[arg(long, help_heading = "Schedule")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    /// tensorboard (event files in OUT/runs/) | none [default: tensorboard].
    #[arg(long, help_heading = "Logging and evaluation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_to: Option<String>,
    /// Delete what an earlier run wrote in --local-output-dir and start afresh (refused when it holds files
    /// dolly did not write). Without it a directory that holds a run is refused unless the run is resumed.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool, help_heading = "Checkpoints and output")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overwrite_output_dir: Option<bool>,
    /// Abort after this many non-finite steps in a row [default: 10].
    #[arg(long, help_heading = "Optimisation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_nonfinite_steps: Option<u32>,
    /// ZeRO stage over the processes of an MPI launch: 0 replicates everything; 1 shards the AdamW moments;
    /// 2 also the gradients; 3 also the parameters [default: the DeepSpeed JSON's zero_optimization.stage,
    /// else 0]. Results are the same at every stage.
    #[arg(long, help_heading = "Distributed")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_stage: Option<u8>,
    /// global-token-mean (a step's loss is its token losses summed over all micro-batches and processes, over
    /// its supervised-token count) | per-device-mean (each micro-batch's mean, averaged: the seed's DeepSpeed
    /// numbers) [default: global-token-mean].
    #[arg(long, help_heading = "Distributed")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_normalization: Option<String>,
    /// Train a LoRA adapter of this rank on the frozen base (PEFT semantics; written as adapter_config.json +
    /// adapter_model.safetensors) instead of every weight. With --bf16 true the base is held in bf16 (2 bytes per
    /// parameter) [default: a full fine-tune].
    #[arg(long, help_heading = "LoRA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_r: Option<usize>,
    /// LoRA alpha: the branch is scaled by alpha / r [default: 32].
    #[arg(long, help_heading = "LoRA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA branch's input, in [0, 1) [default: 0.05].
    #[arg(long, help_heading = "LoRA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    /// all-linear | a comma-separated list of query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    /// [default: all-linear].
    #[arg(long, help_heading = "LoRA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_target_modules: Option<String>,
    /// Scale the LoRA branch by alpha / sqrt(r) (rsLoRA) instead of alpha / r.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool, help_heading = "LoRA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_rslora: Option<bool>,
    /// Rows of embed_in and embed_out a LoRA run trains besides the adapter: special (Dolly's three added
    /// tokens, whose rows Pythia never trained: without them a frozen model can hardly learn to emit `### End`)
    /// | none | all (both whole matrices) [default: special].
    #[arg(long, help_heading = "LoRA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_token_rows: Option<String>,
    /// Appended by the deepspeed launcher; checked against the local rank of the environment.
    #[arg(long = "local_rank", alias = "local-rank", help_heading = "Distributed")]
    #[serde(skip)]
    pub local_rank: Option<usize>,
}

/// Float flags must be finite: the JSON that carries them to the config would turn NaN into `null`, which
/// reads as "not given".
fn check_finite_flags(a: &TrainArgs) -> anyhow::Result<()> {
    let floats = [
        ("lr", a.lr),
        ("weight-decay", a.weight_decay),
        ("max-grad-norm", a.max_grad_norm),
        ("adam-beta1", a.adam_beta1),
        ("adam-beta2", a.adam_beta2),
        ("adam-epsilon", a.adam_epsilon),
        ("min-lr", a.min_lr),
        ("lora-alpha", a.lora_alpha),
        ("lora-dropout", a.lora_dropout),
    ];
    for (k, v) in floats {
        if let Some(x) = v.filter(|x| !x.is_finite()) {
            anyhow::bail!("--{k} must be a finite number, got {x}");
        }
    }
    Ok(())
}

/// SIGINT/SIGTERM: the first sets the flag (the loop finishes its step, checkpoints and stops); a second one
/// exits at once (signal-hook's conditional shutdown, registered before the flag so it sees the first signal's
/// flag only from the second signal on).
fn install_stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop))
            .context("installing the signal handler")?;
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("installing the signal handler")?;
    }
    Ok(stop)
}

pub fn run(mut a: TrainArgs, threads: Option<usize>) -> anyhow::Result<()> {
    if a.no_gradient_checkpointing {
        a.gradient_checkpointing = Some(false);
    }
    check_finite_flags(&a)?;
    let mut overrides = serde_json::to_value(&a)?;
    if let (Some(t), Some(m)) = (threads, overrides.as_object_mut()) {
        m.insert("threads".into(), t.into());
    }
    let resolved = train::TrainConfig::resolve_full(a.config.as_deref(), overrides).map_err(anyhow::Error::msg)?;
    for n in &resolved.notes {
        eprintln!("{n}");
    }
    let env = |k: &str| std::env::var(k).ok();
    let launch = dist::detect(&env, a.local_rank).map_err(anyhow::Error::msg)?;
    if threads.is_none() && std::env::var_os("RAYON_NUM_THREADS").is_none() && launch.local_world > 1 {
        // several ranks on this machine share its cores
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = dist::threads_per_rank(cores, &launch);
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting up the thread pool")?;
    }
    let comm = dist::init(&launch).map_err(anyhow::Error::msg)?;
    let stop = install_stop_flag()?;
    // Not eprintln!: a closed stderr (`dolly train ... 2>&1 | head`) must not panic the run mid-step.
    let say = |s: &str| {
        let _ = writeln!(std::io::stderr(), "{s}");
    };
    let ctl = train::Control { say: &say, stop: Some(&stop), comm: Some(comm.as_ref()) };
    let summary = match train::train_with(resolved.config, &ctl) {
        Ok(s) => s,
        Err(e) if comm.world() > 1 => {
            // the other ranks may be waiting in a collective this rank will not make: end the whole job
            let _ = writeln!(std::io::stderr(), "error: training failed on rank {}: {e}", comm.rank());
            comm.abort(1)
        }
        Err(e) => return Err(anyhow::Error::msg(e).context("training failed")),
    };
    if comm.rank() != 0 {
        return Ok(());
    }
    match &summary.outcome {
        train::Outcome::Finished => eprintln!(
            "done: {} steps{}{}, {:.0} tokens/s; model in {}",
            summary.steps,
            summary.last_loss.map(|l| format!(", last loss {l:.4}")).unwrap_or_default(),
            summary.last_eval_loss.map(|e| format!(", eval loss {e:.4}")).unwrap_or_default(),
            summary.tokens_per_s,
            summary.output_dir.display()
        ),
        train::Outcome::AlreadyFinished => {}
        train::Outcome::Interrupted { checkpoint } => {
            match checkpoint {
                Some(c) => eprintln!(
                    "interrupted after step {} of {}: checkpoint {} written. Resume with the same command plus \
                     --resume-from-checkpoint latest",
                    summary.steps,
                    summary.total_steps,
                    c.display()
                ),
                None => eprintln!("interrupted before the first step: nothing to save"),
            }
            std::process::exit(130);
        }
    }
    Ok(())
}
