//! Reads Dolly's DeepSpeed JSON configs (ZeRO-3 bf16/fp16 variants, CPU-offload variant) and applies what
//! applies to a single-process run: bf16/fp16 flag, AdamW hyper-parameters, WarmupLR schedule, gradient
//! clipping, accumulation and micro-batch size. `"auto"` means "take the command line's value". Every setting we
//! cannot honour here (ZeRO partitioning, offload, fp16 loss scaling, ...) is reported, not silently dropped.

use crate::config::{LrScheduler, TrainConfig};
use serde_json::Value;
use std::path::Path;

/// What reading the DeepSpeed config did.
#[derive(Debug, Default, Clone)]
pub struct DeepSpeedReport {
    pub applied: Vec<String>,
    pub not_honoured: Vec<String>,
    /// WarmupLR's `warmup_min_lr` when given.
    pub min_lr: f64,
}

fn num(v: &Value, key: &str, path: &Path) -> Result<Option<f64>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(x) => match x.as_f64() {
            Some(f) if f.is_finite() => Ok(Some(f)),
            _ => Err(format!("{}: `{key}` must be a finite number or \"auto\", got {x}", path.display())),
        },
    }
}

/// A number in `[lo, hi]` (or `[lo, hi)` when `hi_open`), named by its DeepSpeed key in errors.
fn ranged(v: &Value, key: &str, path: &Path, lo: f64, hi: f64, hi_open: bool) -> Result<Option<f64>, String> {
    let Some(x) = num(v, key, path)? else { return Ok(None) };
    let ok = x >= lo && if hi_open { x < hi } else { x <= hi };
    if !ok {
        let close = if hi_open { ")" } else { "]" };
        let range = if hi.is_infinite() { format!(">= {lo}") } else { format!("in [{lo}, {hi}{close}") };
        return Err(format!("{}: `{key}` must be {range}, got {x}", path.display()));
    }
    Ok(Some(x))
}

/// A whole number >= 1 (micro-batch, accumulation, warmup steps may be 0), named by its key in errors.
fn whole(v: &Value, key: &str, path: &Path, min: u64) -> Result<Option<u64>, String> {
    let Some(x) = num(v, key, path)? else { return Ok(None) };
    if x.fract() != 0.0 || x < min as f64 || x > (1u64 << 40) as f64 {
        return Err(format!("{}: `{key}` must be a whole number >= {min}, got {x}", path.display()));
    }
    Ok(Some(x as u64))
}

/// Top-level keys we read, or know and report.
const KNOWN: [&str; 12] = [
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
    "gradient_clipping",
    "gradient_accumulation_steps",
    "train_micro_batch_size_per_gpu",
    "train_batch_size",
    "zero_optimization",
    "steps_per_print",
    "wall_clock_breakdown",
    "zero_allow_untested_optimizer",
];

/// Apply `path` to `cfg`.
pub fn apply(path: &Path, cfg: &mut TrainConfig) -> Result<DeepSpeedReport, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: invalid JSON at line {} column {}: {e}", path.display(), e.line(), e.column()))?;
    let Some(obj) = v.as_object() else { return Err(format!("{}: must be a JSON object", path.display())) };
    let mut r = DeepSpeedReport::default();
    for k in obj.keys().filter(|k| !KNOWN.contains(&k.as_str())) {
        r.not_honoured.push(format!("`{k}`: not a setting dolly reads (ignored)"));
    }
    let enabled = |k: &str| v.get(k).and_then(|x| x.get("enabled")).and_then(|x| x.as_bool()).unwrap_or(false);
    if enabled("bf16") {
        cfg.bf16.get_or_insert(true);
        r.applied.push("bf16.enabled: bf16 mixed precision (bf16 operands, f32 master weights), bf16 save".into());
    }
    if enabled("fp16") {
        r.not_honoured.push("fp16 with dynamic loss scaling: not used; training runs in float32".into());
    }
    if let Some(opt) = v.get("optimizer") {
        let ty = opt.get("type").and_then(|x| x.as_str()).unwrap_or("");
        if !ty.eq_ignore_ascii_case("adamw") && !ty.eq_ignore_ascii_case("adam") {
            return Err(format!("{}: optimizer type `{ty}` is not supported (AdamW only)", path.display()));
        }
        let p = opt.get("params").cloned().unwrap_or(Value::Null);
        if let Some(lr) = ranged(&p, "lr", path, 0.0, f64::INFINITY, false)? {
            cfg.lr = lr;
            r.applied.push(format!("optimizer.lr = {lr}"));
        }
        if let Some(wd) = ranged(&p, "weight_decay", path, 0.0, f64::INFINITY, false)? {
            cfg.weight_decay = wd;
            r.applied.push(format!("optimizer.weight_decay = {wd}"));
        }
        if let Some(eps) = num(&p, "eps", path)? {
            if eps <= 0.0 {
                return Err(format!("{}: `eps` must be > 0, got {eps}", path.display()));
            }
            cfg.adam_epsilon = eps;
            r.applied.push(format!("optimizer.eps = {eps}"));
        }
        match p.get("betas") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "auto" => {}
            Some(Value::Array(b)) if b.len() == 2 => {
                let beta = |i: usize| match b[i].as_f64() {
                    Some(x) if (0.0..1.0).contains(&x) => Ok(x),
                    _ => Err(format!("{}: `betas[{i}]` must be a number in [0, 1), got {}", path.display(), b[i])),
                };
                cfg.adam_beta1 = beta(0)?;
                cfg.adam_beta2 = beta(1)?;
                r.applied.push(format!("optimizer.betas = [{}, {}]", cfg.adam_beta1, cfg.adam_beta2));
            }
            Some(x) => return Err(format!("{}: `betas` must be [beta1, beta2] or \"auto\", got {x}", path.display())),
        }
        if let Some(po) = p.as_object() {
            for k in po.keys().filter(|k| !["lr", "weight_decay", "eps", "betas"].contains(&k.as_str())) {
                r.not_honoured.push(format!("optimizer.params.{k}: not read"));
            }
        }
        r.applied.push("optimizer: AdamW".into());
    }
    if let Some(s) = v.get("scheduler") {
        let ty = s.get("type").and_then(|x| x.as_str()).unwrap_or("");
        if ty != "WarmupLR" {
            return Err(format!("{}: scheduler type `{ty}` is not supported (WarmupLR only)", path.display()));
        }
        let p = s.get("params").cloned().unwrap_or(Value::Null);
        cfg.lr_scheduler = LrScheduler::WarmupLog;
        if let Some(max) = ranged(&p, "warmup_max_lr", path, 0.0, f64::INFINITY, false)? {
            cfg.lr = max;
        }
        if let Some(min) = ranged(&p, "warmup_min_lr", path, 0.0, f64::INFINITY, false)? {
            r.min_lr = min;
            cfg.min_lr = min;
        }
        if let Some(w) = whole(&p, "warmup_num_steps", path, 0)? {
            cfg.warmup_steps = w;
        }
        if p.get("warmup_type").and_then(|x| x.as_str()).is_some_and(|t| t != "log") {
            r.not_honoured.push("scheduler.warmup_type other than `log`: log warmup used".into());
        }
        r.applied.push("scheduler: WarmupLR (log warmup, then constant)".into());
    }
    if let Some(c) = ranged(&v, "gradient_clipping", path, 0.0, f64::INFINITY, false)? {
        cfg.max_grad_norm = c;
        r.applied.push(format!("gradient_clipping = {c}{}", if c == 0.0 { " (off)" } else { "" }));
    }
    if let Some(a) = whole(&v, "gradient_accumulation_steps", path, 1)? {
        cfg.gradient_accumulation_steps = a as usize;
        r.applied.push(format!("gradient_accumulation_steps = {a}"));
    }
    if let Some(m) = whole(&v, "train_micro_batch_size_per_gpu", path, 1)? {
        cfg.per_device_train_batch_size = m as usize;
        r.applied.push(format!("train_micro_batch_size_per_gpu = {m}"));
    }
    if let Some(t) = whole(&v, "train_batch_size", path, 1)? {
        // DeepSpeed's own rule, train_batch_size = micro-batch x accumulation x data-parallel ranks, is checked
        // once the process count is known (at the start of training).
        cfg.deepspeed_train_batch_size = Some(t);
    }
    if let Some(z) = v.get("zero_optimization") {
        match z.get("stage") {
            None => {}
            Some(x) => match x.as_u64().filter(|&s| s <= 3) {
                Some(stage) if stage > 0 && cfg.lora_r.is_some() => {
                    // the adapter is ~1% of the weights and the frozen base is not sharded
                    r.not_honoured.push(format!(
                        "zero_optimization.stage = {stage} (a LoRA run keeps the frozen base whole on each process \
                         and its adapter state is small: stage 0)"
                    ));
                }
                Some(stage) => {
                    cfg.zero_stage = Some(stage as u8);
                    r.applied.push(format!("zero_optimization.stage = {stage}"));
                }
                None => {
                    return Err(format!("{}: `zero_optimization.stage` must be 0, 1, 2 or 3, got {x}", path.display()))
                }
            },
        }
        for k in ["offload_optimizer", "offload_param"] {
            if z.get(k).is_some() {
                r.not_honoured.push(format!(
                    "zero_optimization.{k}: has no meaning on CPU (the state already lives in host memory)"
                ));
            }
        }
        for k in [
            "overlap_comm",
            "contiguous_gradients",
            "reduce_bucket_size",
            "stage3_prefetch_bucket_size",
            "stage3_param_persistence_threshold",
            "stage3_max_live_parameters",
            "stage3_max_reuse_distance",
            "stage3_gather_16bit_weights_on_model_save",
            "sub_group_size",
            "allgather_partitions",
            "allgather_bucket_size",
            "reduce_scatter",
        ] {
            if z.get(k).is_some() {
                r.not_honoured.push(format!(
                    "zero_optimization.{k}: dolly communicates per unit (embedding, each layer, head); see docs/distributed.md"
                ));
            }
        }
    }
    for k in ["steps_per_print", "wall_clock_breakdown"] {
        if v.get(k).is_some() {
            r.not_honoured.push(format!("{k}: dolly logs every --logging-steps"));
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dolly_z3_bf16_config_applies() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/ds_z3_bf16_config.json");
        let mut c = TrainConfig { lr: 5e-6, warmup_steps: 50, ..Default::default() };
        let r = apply(&p, &mut c).unwrap();
        assert_eq!(c.lr_scheduler, LrScheduler::WarmupLog);
        assert_eq!((c.lr, c.warmup_steps, c.bf16), (5e-6, 50, Some(true)));
        assert_eq!(c.zero_stage, Some(3), "the seed's ZeRO-3 is applied, not reported");
        assert!(r.applied.iter().any(|s| s == "zero_optimization.stage = 3"), "{:?}", r.applied);
        assert!(r.not_honoured.iter().any(|s| s.contains("stage3_max_live_parameters")), "{:?}", r.not_honoured);
    }

    #[test]
    fn a_lora_run_keeps_stage_0_under_the_seeds_zero3_json() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/ds_z3_bf16_config.json");
        let mut c = TrainConfig { lora_r: Some(16), ..TrainConfig::default() };
        let r = apply(&p, &mut c).unwrap();
        assert_eq!(c.zero_stage, None);
        assert!(
            r.not_honoured.iter().any(|s| s.contains("zero_optimization.stage = 3") && s.contains("LoRA")),
            "{:?}",
            r.not_honoured
        );
    }

    #[test]
    fn zero_stage_is_checked_and_train_batch_size_is_kept_for_the_start_check() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ds.json");
        std::fs::write(&p, "{\"zero_optimization\": {\"stage\": 4}}").unwrap();
        assert!(apply(&p, &mut TrainConfig::default()).unwrap_err().contains("`zero_optimization.stage`"));
        std::fs::write(
            &p,
            "{\"train_batch_size\": 16, \"zero_optimization\": {\"stage\": 1, \"offload_optimizer\": {}}}",
        )
        .unwrap();
        let mut c = TrainConfig::default();
        let r = apply(&p, &mut c).unwrap();
        assert_eq!((c.zero_stage, c.deepspeed_train_batch_size), (Some(1), Some(16)));
        assert!(r.not_honoured.iter().any(|s| s.contains("offload_optimizer") && s.contains("no meaning on CPU")));
    }

    #[test]
    fn bad_deepspeed_files_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ds.json");
        std::fs::write(&p, "{\"optimizer\": {\"type\": \"SGD\"}}").unwrap();
        assert!(apply(&p, &mut TrainConfig::default()).unwrap_err().contains("SGD"));
        std::fs::write(&p, "{\n\"bf16\": }").unwrap();
        assert!(apply(&p, &mut TrainConfig::default()).unwrap_err().contains("line 2"));
        std::fs::write(&p, "{\"gradient_clipping\": \"x\"}").unwrap();
        assert!(apply(&p, &mut TrainConfig::default()).unwrap_err().contains("gradient_clipping"));
        // Values that used to pass unchecked: each is an error naming its key.
        for (json, key) in [
            ("{\"train_micro_batch_size_per_gpu\": 0}", "train_micro_batch_size_per_gpu"),
            ("{\"train_micro_batch_size_per_gpu\": -1}", "train_micro_batch_size_per_gpu"),
            ("{\"train_micro_batch_size_per_gpu\": 2.7}", "train_micro_batch_size_per_gpu"),
            ("{\"gradient_accumulation_steps\": 0}", "gradient_accumulation_steps"),
            ("{\"gradient_clipping\": -1}", "gradient_clipping"),
            ("{\"optimizer\": {\"type\": \"AdamW\", \"params\": {\"lr\": -0.1}}}", "lr"),
            ("{\"optimizer\": {\"type\": \"AdamW\", \"params\": {\"eps\": 0}}}", "eps"),
            ("{\"optimizer\": {\"type\": \"AdamW\", \"params\": {\"betas\": [1, 1]}}}", "betas[0]"),
            ("{\"optimizer\": {\"type\": \"AdamW\", \"params\": {\"betas\": [0.9]}}}", "betas"),
        ] {
            std::fs::write(&p, json).unwrap();
            let e = apply(&p, &mut TrainConfig::default()).unwrap_err();
            assert!(e.contains(&format!("`{key}`")), "{json}: {e}");
        }
    }

    #[test]
    fn unknown_sections_are_reported_and_zero_clipping_is_off() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ds.json");
        std::fs::write(&p, "{\"activation_checkpointing\": {}, \"gradient_clipping\": 0}").unwrap();
        let mut c = TrainConfig::default();
        let r = apply(&p, &mut c).unwrap();
        assert!(r.not_honoured.iter().any(|n| n.contains("activation_checkpointing")), "{:?}", r.not_honoured);
        assert_eq!(c.max_grad_norm, 0.0);
    }
}
