//! Training configuration: every `dolly train` flag as a typed key with the seed trainer's names and defaults
//! (plus our documented fixes), loadable from a TOML file whose keys are the flag names (`per-device-train-
//! batch-size = 8`). Unknown keys are rejected; the command line overrides the file. Does not read DeepSpeed
//! JSON (see `deepspeed.rs`) or touch the filesystem otherwise.

use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};

/// Learning-rate schedule after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrScheduler {
    /// HF Trainer's default: linear warmup 0 -> lr, then linear decay to 0 at the last step.
    Linear,
    /// Linear warmup, then constant.
    Constant,
    /// DeepSpeed `WarmupLR` (log-shaped warmup), then constant — what Dolly's DeepSpeed configs use.
    WarmupLog,
}

/// `--test-size`: a count of held-out records (`1000`) or a ratio (`0.05`); 0 = no eval split.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TestSize {
    Count(u64),
    Ratio(f64),
}

impl TestSize {
    pub fn parse(s: &str) -> Result<TestSize, String> {
        if let Ok(n) = s.parse::<u64>() {
            return Ok(TestSize::Count(n));
        }
        match s.parse::<f64>() {
            Ok(r) if r > 0.0 && r < 1.0 => Ok(TestSize::Ratio(r)),
            _ => Err(format!("test size `{s}` must be a whole number of records or a ratio in (0, 1)")),
        }
    }
    pub fn to_data(self) -> data::TestSize {
        match self {
            TestSize::Count(n) => data::TestSize::Count(n as usize),
            TestSize::Ratio(r) => data::TestSize::Ratio(r),
        }
    }
}

impl<'de> Deserialize<'de> for TestSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Float(f64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(TestSize::Count(n)),
            Raw::Float(f) => TestSize::parse(&f.to_string()).map_err(serde::de::Error::custom),
            Raw::Str(s) => TestSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct TrainConfig {
    /// HF model directory or hub model id.
    pub input_model: String,
    /// Where checkpoints, metrics and the final model go (required).
    pub local_output_dir: Option<PathBuf>,
    /// A second place to copy the final model to.
    pub dbfs_output_dir: Option<PathBuf>,
    pub epochs: u32,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub test_size: TestSize,
    pub warmup_steps: u64,
    pub logging_steps: u64,
    pub eval_steps: u64,
    pub save_steps: u64,
    pub save_total_limit: usize,
    pub lr: f64,
    pub seed: u64,
    pub deepspeed: Option<PathBuf>,
    pub training_dataset: String,
    pub gradient_checkpointing: bool,
    /// None = default for the device (float32 on CPU).
    pub bf16: Option<bool>,
    pub max_steps: Option<u64>,
    pub gradient_accumulation_steps: usize,
    pub weight_decay: f64,
    pub lr_scheduler: LrScheduler,
    pub packing: bool,
    /// Row length for `packing` (default: the model's max length).
    pub pack_length: Option<usize>,
    /// A checkpoint directory or `latest`.
    pub resume_from_checkpoint: Option<String>,
    pub threads: Option<usize>,
    /// tokenizer.json to use instead of the model directory's.
    pub tokenizer: Option<PathBuf>,
    /// Override the max length from config.json.
    pub max_length: Option<usize>,
    /// `fail` (default) or `skip` for malformed records.
    pub on_bad_record: String,
    /// Remove exact duplicate records before the split.
    pub dedup: bool,
    pub max_grad_norm: f64,
    /// Abort after this many consecutive non-finite steps.
    pub max_nonfinite_steps: u32,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Learning rate at the start of a `warmup-log` warmup (DeepSpeed WarmupLR's `warmup_min_lr`).
    pub min_lr: f64,
    /// Clear a non-empty output directory that holds another run instead of refusing it (HF's flag).
    pub overwrite_output_dir: bool,
    /// `tensorboard` (event files in OUT/runs/, the seed trainer's default) or `none`.
    pub report_to: String,
    /// ZeRO stage 0-3 across the processes of a distributed run (None: the DeepSpeed JSON's, else 0).
    pub zero_stage: Option<u8>,
    /// `global-token-mean` (the loss of a step is its summed token loss over every micro-batch and process,
    /// divided by the step's supervised-token count: torchtitan, current HF) or `per-device-mean` (each
    /// micro-batch's mean, averaged over micro-batches and processes: the seed's HF 4.28 + DeepSpeed numbers).
    pub loss_normalization: String,
    /// DeepSpeed JSON `train_batch_size`, checked against micro-batch x accumulation x processes at start.
    #[serde(skip)]
    pub deepspeed_train_batch_size: Option<u64>,
    /// LoRA rank: train a LoRA adapter (PEFT semantics) on the frozen base instead of every weight. None: a full
    /// fine-tune.
    pub lora_r: Option<usize>,
    /// LoRA alpha: the branch is scaled by alpha / r (alpha / sqrt(r) with `use_rslora`).
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch's input (training only).
    pub lora_dropout: f64,
    /// `all-linear` or a comma-separated list of query_key_value, dense, dense_h_to_4h, dense_4h_to_h.
    pub lora_target_modules: String,
    pub use_rslora: bool,
    /// Rows of embed_in and embed_out a LoRA run trains: `special` (Dolly's three added tokens, whose rows
    /// Pythia never trained), `none`, or `all` (both whole matrices).
    pub train_token_rows: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            input_model: "EleutherAI/pythia-6.9b".into(),
            local_output_dir: None,
            dbfs_output_dir: None,
            epochs: 3,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            test_size: TestSize::Count(1000),
            warmup_steps: 0,
            logging_steps: 10,
            eval_steps: 50,
            save_steps: 400,
            save_total_limit: 10,
            lr: 1e-5,
            seed: 42,
            deepspeed: None,
            training_dataset: data::DOLLY_DATASET.into(),
            gradient_checkpointing: true,
            bf16: None,
            max_steps: None,
            gradient_accumulation_steps: 1,
            weight_decay: 0.0,
            lr_scheduler: LrScheduler::Linear,
            packing: false,
            pack_length: None,
            resume_from_checkpoint: None,
            threads: None,
            tokenizer: None,
            max_length: None,
            on_bad_record: "fail".into(),
            dedup: false,
            max_grad_norm: 1.0,
            max_nonfinite_steps: 10,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            min_lr: 0.0,
            overwrite_output_dir: false,
            report_to: "tensorboard".into(),
            zero_stage: None,
            loss_normalization: "global-token-mean".into(),
            deepspeed_train_batch_size: None,
            lora_r: None,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_target_modules: "all-linear".into(),
            use_rslora: false,
            train_token_rows: "special".into(),
        }
    }
}

/// Largest accepted values: far beyond any real run, small enough that products of them cannot overflow.
const MAX_BATCH: usize = 1 << 16;
const MAX_ACCUM: usize = 1 << 20;
const MAX_STEPS: u64 = 1 << 40;
const MAX_EPOCHS: u32 = 1 << 20;
const MAX_LORA_R: usize = 1 << 16;

/// A resolved configuration and the notes its sources left (what the DeepSpeed JSON applied or did not).
pub struct Resolved {
    pub config: TrainConfig,
    pub notes: Vec<String>,
}

impl TrainConfig {
    /// Defaults, then the TOML file (if any), then `overrides` (a JSON object of flag-name keys, from the CLI),
    /// then the DeepSpeed JSON (if `deepspeed` is set; its `"auto"` values keep what the others gave), then one
    /// validation of the merged result.
    pub fn resolve(file: Option<&Path>, overrides: serde_json::Value) -> Result<TrainConfig, String> {
        Self::resolve_full(file, overrides).map(|r| r.config)
    }

    /// `resolve`, also returning the DeepSpeed notes for the start-up report.
    pub fn resolve_full(file: Option<&Path>, overrides: serde_json::Value) -> Result<Resolved, String> {
        let mut base = serde_json::to_value(TrainConfig::default()).map_err(|e| e.to_string())?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            // Deserialise the file on its own first: toml's errors carry the line and the key.
            let table: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            if let Some(k) = non_finite_key(&table) {
                return Err(format!("{}: `{k}` must be a finite number", path.display()));
            }
            toml::from_str::<TrainConfig>(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            let v = serde_json::to_value(table).map_err(|e| format!("{}: {e}", path.display()))?;
            merge(&mut base, v);
        }
        merge(&mut base, overrides);
        let mut cfg: TrainConfig = serde_json::from_value(base.clone()).map_err(|e| explain(&base, e))?;
        let mut notes = Vec::new();
        if let Some(ds) = cfg.deepspeed.clone() {
            let r = crate::deepspeed::apply(&ds, &mut cfg)?;
            notes.extend(r.applied.iter().map(|a| format!("deepspeed: applied {a}")));
            notes.extend(r.not_honoured.iter().map(|n| format!("deepspeed: not honoured here: {n}")));
        }
        cfg.validate()?;
        Ok(Resolved { config: cfg, notes })
    }

    /// Every value in range. Limits that need the model (max-length vs its context) are checked by the trainer
    /// once config.json is read, still before any weights are loaded.
    pub fn validate(&self) -> Result<(), String> {
        if self.local_output_dir.as_ref().is_none_or(|p| p.as_os_str().is_empty()) {
            return Err("--local-output-dir is required".into());
        }
        let counts = [
            ("per-device-train-batch-size", self.per_device_train_batch_size, MAX_BATCH),
            ("per-device-eval-batch-size", self.per_device_eval_batch_size, MAX_BATCH),
            ("gradient-accumulation-steps", self.gradient_accumulation_steps, MAX_ACCUM),
            ("save-total-limit", self.save_total_limit, usize::MAX),
        ];
        for (k, v, max) in counts {
            if v == 0 || v > max {
                return Err(format!("{k} must be between 1 and {max}, got {v}"));
            }
        }
        let steps = [
            ("logging-steps", self.logging_steps),
            ("eval-steps", self.eval_steps),
            ("save-steps", self.save_steps),
            ("max-steps", self.max_steps.unwrap_or(1)),
        ];
        for (k, v) in steps {
            if v == 0 || v > MAX_STEPS {
                return Err(format!("{k} must be between 1 and {MAX_STEPS}, got {v}"));
            }
        }
        if self.warmup_steps > MAX_STEPS {
            return Err(format!("warmup-steps must be at most {MAX_STEPS}, got {}", self.warmup_steps));
        }
        if self.epochs > MAX_EPOCHS {
            return Err(format!("epochs must be at most {MAX_EPOCHS}, got {}", self.epochs));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return Err("epochs must be at least 1 (or give max-steps)".into());
        }
        let reals = [
            ("lr", self.lr, 0.0, f64::INFINITY, true),
            ("min-lr", self.min_lr, 0.0, f64::INFINITY, true),
            ("weight-decay", self.weight_decay, 0.0, f64::INFINITY, true),
            ("max-grad-norm (0 = no clipping)", self.max_grad_norm, 0.0, f64::INFINITY, true),
            ("adam-beta1", self.adam_beta1, 0.0, 1.0, false),
            ("adam-beta2", self.adam_beta2, 0.0, 1.0, false),
        ];
        for (k, v, lo, hi, hi_inclusive) in reals {
            let ok = v.is_finite() && v >= lo && if hi_inclusive { v <= hi } else { v < hi };
            if !ok {
                let range = if hi.is_infinite() { format!(">= {lo}") } else { format!("in [{lo}, {hi})") };
                return Err(format!("{k} must be a finite number {range}, got {v}"));
            }
        }
        for (k, v) in [("lr", self.lr), ("weight-decay", self.weight_decay)] {
            if v > f32::MAX as f64 {
                return Err(format!("{k} {v} is beyond float32's range (the optimizer works in float32)"));
            }
        }
        if !(self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0) {
            return Err(format!("adam-epsilon must be a finite number > 0, got {}", self.adam_epsilon));
        }
        if self.min_lr > self.lr {
            return Err(format!("min-lr {} is above lr {}", self.min_lr, self.lr));
        }
        if !matches!(self.on_bad_record.as_str(), "fail" | "skip") {
            return Err(format!("on-bad-record must be `fail` or `skip`, got `{}`", self.on_bad_record));
        }
        if let Some(z) = self.zero_stage.filter(|&z| z > 3) {
            return Err(format!("zero-stage must be 0, 1, 2 or 3, got {z}"));
        }
        if !matches!(self.loss_normalization.as_str(), "global-token-mean" | "per-device-mean") {
            return Err(format!(
                "loss-normalization must be `global-token-mean` or `per-device-mean`, got `{}`",
                self.loss_normalization
            ));
        }
        if !matches!(self.report_to.as_str(), "tensorboard" | "none") {
            return Err(format!("report-to must be `tensorboard` or `none`, got `{}`", self.report_to));
        }
        if let TestSize::Ratio(r) = self.test_size {
            if !(r > 0.0 && r < 1.0) {
                return Err(format!("test-size ratio must be in (0, 1), got {r}"));
            }
        }
        if let Some(m) = self.max_length {
            if m < 2 {
                return Err(format!("max-length must be at least 2, got {m}"));
            }
        }
        if let Some(p) = self.pack_length {
            if p < 2 {
                return Err(format!("pack-length must be at least 2, got {p}"));
            }
        }
        if self.max_nonfinite_steps == 0 {
            return Err("max-nonfinite-steps must be at least 1".into());
        }
        if self.threads.is_some_and(|t| t == 0 || t > 4096) {
            return Err(format!("threads must be between 1 and 4096, got {}", self.threads.unwrap_or(0)));
        }
        if self.training_dataset.trim().is_empty() {
            return Err("training-dataset must not be empty".into());
        }
        if let Some(r) = self.lora_r {
            if r == 0 || r > MAX_LORA_R {
                return Err(format!("lora-r must be between 1 and {MAX_LORA_R}, got {r}"));
            }
            if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
                return Err(format!("lora-alpha must be a finite number > 0, got {}", self.lora_alpha));
            }
            if !(self.lora_dropout.is_finite() && (0.0..1.0).contains(&self.lora_dropout)) {
                return Err(format!("lora-dropout must be in [0, 1), got {}", self.lora_dropout));
            }
            neox::lora::parse_targets(&self.lora_target_modules).map_err(|e| format!("lora-target-modules: {e}"))?;
            if self.zero_stage.is_some_and(|z| z > 0) {
                return Err(format!(
                    "zero-stage {} with LoRA: the adapter is ~1% of the weights and the frozen base is not sharded; \
                     use --zero-stage 0 (each process holds the base once)",
                    self.zero_stage.unwrap_or(0)
                ));
            }
        }
        if !matches!(self.train_token_rows.as_str(), "special" | "none" | "all") {
            return Err(format!(
                "train-token-rows must be `special`, `none` or `all`, got `{}`",
                self.train_token_rows
            ));
        }
        if self.resume_from_checkpoint.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return Err("resume-from-checkpoint must be a checkpoint directory, `latest` or `auto`".into());
        }
        Ok(())
    }

    pub fn output_dir(&self) -> &Path {
        self.local_output_dir.as_deref().unwrap_or(Path::new("."))
    }

    /// The total number of optimizer steps for `steps_per_epoch`.
    pub fn total_steps(&self, steps_per_epoch: u64) -> u64 {
        self.max_steps.unwrap_or(steps_per_epoch.saturating_mul(self.epochs as u64))
    }

    /// The settings that change the result of a run, each as the user writes it (flag name, value). A resume
    /// must find them all unchanged; `epochs` and `max-steps` are not here (a run may be extended).
    pub fn result_settings(&self) -> Vec<(&'static str, String)> {
        let opt = |v: Option<usize>| v.map(|x| x.to_string()).unwrap_or_else(|| "(model default)".into());
        // the LoRA settings matter only to a LoRA run
        let lora = |v: String| if self.lora_r.is_some() { v } else { "(no LoRA)".into() };
        let sched = serde_json::to_value(self.lr_scheduler)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        vec![
            ("training-dataset", self.training_dataset.clone()),
            ("seed", self.seed.to_string()),
            ("per-device-train-batch-size", self.per_device_train_batch_size.to_string()),
            ("loss-normalization", self.loss_normalization.clone()),
            ("test-size", self.test_size.to_string()),
            ("max-length", opt(self.max_length)),
            ("packing", self.packing.to_string()),
            ("pack-length", opt(self.pack_length)),
            ("dedup", self.dedup.to_string()),
            ("on-bad-record", self.on_bad_record.clone()),
            ("lr", self.lr.to_string()),
            ("min-lr", self.min_lr.to_string()),
            ("lr-scheduler", sched),
            ("warmup-steps", self.warmup_steps.to_string()),
            ("weight-decay", self.weight_decay.to_string()),
            ("adam-beta1", self.adam_beta1.to_string()),
            ("adam-beta2", self.adam_beta2.to_string()),
            ("adam-epsilon", self.adam_epsilon.to_string()),
            ("max-grad-norm", self.max_grad_norm.to_string()),
            ("bf16", self.bf16.unwrap_or(false).to_string()),
            ("max-nonfinite-steps", self.max_nonfinite_steps.to_string()),
            ("lora-r", self.lora_r.map_or("(full fine-tune)".into(), |r| r.to_string())),
            ("lora-alpha", lora(self.lora_alpha.to_string())),
            ("lora-dropout", lora(self.lora_dropout.to_string())),
            ("lora-target-modules", lora(self.lora_target_modules.clone())),
            ("use-rslora", lora(self.use_rslora.to_string())),
            ("train-token-rows", lora(self.train_token_rows.clone())),
        ]
    }
}

impl std::fmt::Display for TestSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TestSize::Count(n) => write!(f, "{n}"),
            TestSize::Ratio(r) => write!(f, "{r}"),
        }
    }
}

/// The first key (dotted) of a TOML table whose value is a NaN or infinite float.
fn non_finite_key(t: &toml::Table) -> Option<String> {
    t.iter().find_map(|(k, v)| match v {
        toml::Value::Float(f) if !f.is_finite() => Some(k.clone()),
        toml::Value::Table(sub) => non_finite_key(sub).map(|s| format!("{k}.{s}")),
        _ => None,
    })
}

/// A serde error on the merged object, with the key that caused it found by deserialising keys one at a time.
fn explain(merged: &serde_json::Value, e: serde_json::Error) -> String {
    if let Some(m) = merged.as_object() {
        for (k, v) in m {
            let one = serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect());
            if let Err(e1) = serde_json::from_value::<TrainConfig>(one) {
                return format!("`{k}`: {e1}");
            }
        }
    }
    format!("configuration: {e}")
}

/// Overlay `top` onto `base` (objects merge key by key).
fn merge(base: &mut serde_json::Value, top: serde_json::Value) {
    match (base, top) {
        (serde_json::Value::Object(b), serde_json::Value::Object(t)) => {
            for (k, v) in t {
                b.insert(k, v);
            }
        }
        (b, t) if !t.is_null() => *b = t,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_match_the_seed_trainer() {
        let c = TrainConfig::default();
        assert_eq!(c.input_model, "EleutherAI/pythia-6.9b");
        assert_eq!((c.epochs, c.per_device_train_batch_size, c.per_device_eval_batch_size), (3, 8, 8));
        assert_eq!(c.test_size, TestSize::Count(1000));
        assert_eq!((c.warmup_steps, c.logging_steps, c.eval_steps, c.save_steps), (0, 10, 50, 400));
        assert_eq!((c.save_total_limit, c.lr, c.seed), (10, 1e-5, 42));
        assert!(c.gradient_checkpointing);
    }

    #[test]
    fn file_then_cli_and_unknown_keys_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
        std::fs::write(&f, "lr = 5e-6\nepochs = 2\ntest-size = 0.05\nlocal-output-dir = \"out\"\n").unwrap();
        let c = TrainConfig::resolve(Some(&f), json!({"epochs": 1})).unwrap();
        assert_eq!((c.lr, c.epochs, c.test_size), (5e-6, 1, TestSize::Ratio(0.05)));
        std::fs::write(&f, "lr = 5e-6\nlearning-rate = 1\n").unwrap();
        let e = TrainConfig::resolve(Some(&f), json!({})).unwrap_err();
        assert!(e.contains("t.toml") && e.contains("learning-rate"), "{e}");
        std::fs::write(&f, "lr = [1\n").unwrap();
        let e = TrainConfig::resolve(Some(&f), json!({})).unwrap_err();
        assert!(e.contains("t.toml") && e.contains("line 1"), "{e}");
        let e = TrainConfig::resolve(None, json!({"local-output-dir": "o", "lr": -1.0})).unwrap_err();
        assert!(e.contains("lr"), "{e}");
        let e = TrainConfig::resolve(None, json!({})).unwrap_err();
        assert!(e.contains("local-output-dir"), "{e}");
        let e = TrainConfig::resolve(None, json!({"local-output-dir": "o", "test-size": "1.5"})).unwrap_err();
        assert!(e.contains("test size"), "{e}");
    }

    #[test]
    fn merged_values_are_validated_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
        std::fs::write(&f, "lr = 1e-4\nepochs = \"two\"\n").unwrap();
        let e = TrainConfig::resolve(Some(&f), json!({"local-output-dir": "o"})).unwrap_err();
        assert!(e.contains("t.toml") && e.contains("epochs") && e.contains("line 2"), "{e}");
        std::fs::write(&f, "lr = nan\n").unwrap();
        let e = TrainConfig::resolve(Some(&f), json!({"local-output-dir": "o"})).unwrap_err();
        assert!(e.contains("`lr`") && e.contains("finite"), "{e}");
        let base = json!({"local-output-dir": "o"});
        let bad = [
            (json!({"adam-beta2": 1.0}), "adam-beta2"),
            (json!({"adam-epsilon": 0.0}), "adam-epsilon"),
            (json!({"max-grad-norm": -1.0}), "max-grad-norm"),
            (json!({"per-device-train-batch-size": 9_223_372_036_854_775_808u64}), "per-device-train-batch-size"),
            (json!({"lr": 1e39}), "float32"),
            (json!({"report-to": "wandb"}), "report-to"),
            (json!({"max-length": 1}), "max-length"),
        ];
        for (v, key) in bad {
            let mut o = base.clone();
            merge(&mut o, v.clone());
            let e = TrainConfig::resolve(None, o).unwrap_err();
            assert!(e.contains(key), "{v}: {e}");
        }
        // DeepSpeed values are merged first, then validated: a 0 micro-batch is an error, not a division by 0.
        let ds = dir.path().join("ds.json");
        std::fs::write(&ds, "{\"train_micro_batch_size_per_gpu\": 0}").unwrap();
        let e = TrainConfig::resolve(None, json!({"local-output-dir": "o", "deepspeed": ds})).unwrap_err();
        assert!(e.contains("train_micro_batch_size_per_gpu"), "{e}");
        std::fs::write(&ds, "{\"gradient_clipping\": 0, \"flops_profiler\": {}}").unwrap();
        let r = TrainConfig::resolve_full(None, json!({"local-output-dir": "o", "deepspeed": ds})).unwrap();
        assert_eq!(r.config.max_grad_norm, 0.0);
        assert!(r.notes.iter().any(|n| n.contains("flops_profiler")), "{:?}", r.notes);
    }

    #[test]
    fn shipped_example_config_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/dolly-notebook.toml");
        let c = TrainConfig::resolve(Some(&p), json!({"local-output-dir": "o"})).unwrap();
        assert_eq!((c.epochs, c.lr, c.warmup_steps), (2, 5e-6, 50));
    }
}
