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
        }
    }
}

impl TrainConfig {
    /// Defaults, then the TOML file (if any), then `overrides` (a JSON object of flag-name keys, from the CLI).
    pub fn resolve(file: Option<&Path>, overrides: serde_json::Value) -> Result<TrainConfig, String> {
        let mut base = serde_json::to_value(TrainConfig::default()).map_err(|e| e.to_string())?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let table: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            let v = serde_json::to_value(table).map_err(|e| format!("{}: {e}", path.display()))?;
            merge(&mut base, v);
            // Validate the file alone first so its errors name it.
            serde_json::from_value::<TrainConfig>(base.clone()).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        merge(&mut base, overrides);
        let cfg: TrainConfig = serde_json::from_value(base).map_err(|e| format!("command line: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.local_output_dir.is_none() {
            return Err("--local-output-dir is required".into());
        }
        let positive = [
            ("per-device-train-batch-size", self.per_device_train_batch_size as u64),
            ("per-device-eval-batch-size", self.per_device_eval_batch_size as u64),
            ("gradient-accumulation-steps", self.gradient_accumulation_steps as u64),
            ("logging-steps", self.logging_steps),
            ("eval-steps", self.eval_steps),
            ("save-steps", self.save_steps),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(format!("{k} must be at least 1"));
            }
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return Err("epochs must be at least 1 (or give max-steps)".into());
        }
        if self.max_steps == Some(0) {
            return Err("max-steps must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!("lr must be a positive number, got {}", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(format!("weight-decay must be >= 0, got {}", self.weight_decay));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return Err(format!("max-grad-norm must be > 0, got {}", self.max_grad_norm));
        }
        if !matches!(self.on_bad_record.as_str(), "fail" | "skip") {
            return Err(format!("on-bad-record must be `fail` or `skip`, got `{}`", self.on_bad_record));
        }
        if let TestSize::Ratio(r) = self.test_size {
            if !(r > 0.0 && r < 1.0) {
                return Err(format!("test-size ratio must be in (0, 1), got {r}"));
            }
        }
        if self.threads == Some(0) {
            return Err("threads must be at least 1".into());
        }
        Ok(())
    }

    pub fn output_dir(&self) -> &Path {
        self.local_output_dir.as_deref().unwrap_or(Path::new("."))
    }
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
    fn shipped_example_config_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/dolly-notebook.toml");
        let c = TrainConfig::resolve(Some(&p), json!({"local-output-dir": "o"})).unwrap();
        assert_eq!((c.epochs, c.lr, c.warmup_steps), (2, 5e-6, 50));
    }
}
