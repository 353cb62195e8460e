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
        Some(x) => {
            x.as_f64().map(Some).ok_or_else(|| format!("{}: `{key}` must be a number or \"auto\"", path.display()))
        }
    }
}

/// Apply `path` to `cfg`.
pub fn apply(path: &Path, cfg: &mut TrainConfig) -> Result<DeepSpeedReport, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: invalid JSON at line {} column {}: {e}", path.display(), e.line(), e.column()))?;
    if !v.is_object() {
        return Err(format!("{}: must be a JSON object", path.display()));
    }
    let mut r = DeepSpeedReport::default();
    let enabled = |k: &str| v.get(k).and_then(|x| x.get("enabled")).and_then(|x| x.as_bool()).unwrap_or(false);
    if enabled("bf16") {
        cfg.bf16.get_or_insert(true);
        r.applied.push("bf16.enabled: bf16 weights on save (compute stays float32 on CPU)".into());
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
        if let Some(lr) = num(&p, "lr", path)? {
            cfg.lr = lr;
            r.applied.push(format!("optimizer.lr = {lr}"));
        }
        if let Some(wd) = num(&p, "weight_decay", path)? {
            cfg.weight_decay = wd;
            r.applied.push(format!("optimizer.weight_decay = {wd}"));
        }
        if let Some(eps) = num(&p, "eps", path)? {
            cfg.adam_epsilon = eps;
        }
        if let Some(Value::Array(b)) = p.get("betas") {
            if let (Some(b1), Some(b2)) = (b.first().and_then(|x| x.as_f64()), b.get(1).and_then(|x| x.as_f64())) {
                cfg.adam_beta1 = b1;
                cfg.adam_beta2 = b2;
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
        if let Some(max) = num(&p, "warmup_max_lr", path)? {
            cfg.lr = max;
        }
        if let Some(min) = num(&p, "warmup_min_lr", path)? {
            r.min_lr = min;
        }
        if let Some(w) = num(&p, "warmup_num_steps", path)? {
            cfg.warmup_steps = w as u64;
        }
        if p.get("warmup_type").and_then(|x| x.as_str()).is_some_and(|t| t != "log") {
            r.not_honoured.push("scheduler.warmup_type other than `log`: log warmup used".into());
        }
        r.applied.push("scheduler: WarmupLR (log warmup, then constant)".into());
    }
    if let Some(c) = num(&v, "gradient_clipping", path)? {
        cfg.max_grad_norm = c;
        r.applied.push(format!("gradient_clipping = {c}"));
    }
    if let Some(a) = num(&v, "gradient_accumulation_steps", path)? {
        cfg.gradient_accumulation_steps = a as usize;
        r.applied.push(format!("gradient_accumulation_steps = {a}"));
    }
    if let Some(m) = num(&v, "train_micro_batch_size_per_gpu", path)? {
        cfg.per_device_train_batch_size = m as usize;
        r.applied.push(format!("train_micro_batch_size_per_gpu = {m}"));
    }
    if let Some(z) = v.get("zero_optimization") {
        let stage = z.get("stage").and_then(|x| x.as_u64()).unwrap_or(0);
        r.not_honoured.push(format!(
            "zero_optimization.stage {stage}: one process holds all parameters and optimizer state here"
        ));
        if z.get("offload_optimizer").is_some() || z.get("offload_param").is_some() {
            r.not_honoured.push("offload_optimizer/offload_param: state already lives in CPU memory".into());
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
        assert!(r.not_honoured.iter().any(|s| s.contains("stage 3")));
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
    }
}
