//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`, written so that
//! `peft.PeftModel.from_pretrained` restores them exactly and read from what PEFT writes
//! (docs/adapter-format.md). Reading is strict where PEFT is lenient: every tensor the configuration implies
//! must be there with its shape, no other tensor may be, and every configuration field we do not implement must
//! be absent or off — an adapter never loads partially or with a feature silently ignored.

use crate::error::{Error, Result};
use crate::lora::{AdapterLayout, LoraConfig, Target, PREFIX};
use crate::model::Model;
use crate::model_lora::LoraInit;
use crate::weights::SaveDtype;
use crate::NeoxConfig;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// What `adapter_config.json` says besides the LoRA settings.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterMeta {
    pub lora: LoraConfig,
    /// `base_model_name_or_path`: the base the adapter was trained on (a hub id or a path, as its trainer named it).
    pub base_model: Option<String>,
}

/// Whether `dir` holds an adapter (its `adapter_config.json`).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

/// Fields whose value does not change what the adapter computes (informational, or PEFT training options).
const IGNORED: &[&str] = &[
    "base_model_name_or_path",
    "revision",
    "peft_version",
    "inference_mode",
    "init_lora_weights",
    "auto_mapping",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "ensure_weight_tying",
];

/// Fields we read.
const READ: &[&str] = &[
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "target_modules",
    "trainable_token_indices",
    "bias",
    "fan_in_fan_out",
];

/// A value that turns nothing on: null, false, an empty string, list or object.
fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(_) | Value::Bool(true) => false,
    }
}

/// Read and check `dir/adapter_config.json` against the model it is for.
pub fn read_adapter_config(dir: &Path, model: &NeoxConfig) -> Result<AdapterMeta> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("not valid JSON: {e}")))?;
    let Value::Object(o) = v else { return Err(Error::file(&path, "expected a JSON object")) };
    let bad = |key: &str, msg: String| Err(Error::file(&path, format!("`{key}`: {msg}")));
    for (k, val) in &o {
        if !READ.contains(&k.as_str()) && !IGNORED.contains(&k.as_str()) && !is_off(val) {
            return bad(
                k,
                format!("{val} is not supported (dolly implements plain LoRA: this field must be absent or off)"),
            );
        }
    }
    match o.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => return bad("peft_type", format!("{other:?}: only LORA adapters are supported")),
    }
    if let Some(t) = o.get("task_type").filter(|t| !t.is_null()) {
        if t.as_str() != Some("CAUSAL_LM") {
            return bad("task_type", format!("{t}: expected CAUSAL_LM"));
        }
    }
    if let Some(b) = o.get("bias").filter(|b| !b.is_null()) {
        if b.as_str() != Some("none") {
            return bad("bias", format!("{b}: only \"none\" is supported"));
        }
    }
    if o.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return bad("fan_in_fan_out", "true is wrong for GPT-NeoX's nn.Linear layers (PEFT forces it to false)".into());
    }
    let r = match o.get("r").and_then(Value::as_u64) {
        Some(r) if r >= 1 => r as usize,
        _ => return bad("r", format!("{:?}: expected a positive integer", o.get("r"))),
    };
    let alpha = match o.get("lora_alpha").and_then(Value::as_f64) {
        Some(a) if a.is_finite() && a > 0.0 => a,
        _ => return bad("lora_alpha", format!("{:?}: expected a positive number", o.get("lora_alpha"))),
    };
    let dropout = match o.get("lora_dropout") {
        None | Some(Value::Null) => 0.0,
        Some(d) => match d.as_f64() {
            Some(p) if (0.0..1.0).contains(&p) => p as f32,
            _ => return bad("lora_dropout", format!("{d}: expected a number in [0, 1)")),
        },
    };
    let rslora = match o.get("use_rslora") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(x) => return bad("use_rslora", format!("{x}: expected true or false")),
    };
    let targets = match o.get("target_modules") {
        Some(t) => {
            targets_of(t, model.num_hidden_layers).map_err(|m| Error::file(&path, format!("`target_modules`: {m}")))?
        }
        None => return bad("target_modules", "missing".into()),
    };
    let token_rows = match o.get("trainable_token_indices") {
        None | Some(Value::Null) => Vec::new(),
        Some(t) => token_rows_of(t).map_err(|m| Error::file(&path, format!("`trainable_token_indices`: {m}")))?,
    };
    let lora = LoraConfig { r, alpha, dropout, targets, rslora, token_rows };
    lora.validate(model).map_err(|e| Error::file(&path, e.to_string()))?;
    let base_model = o.get("base_model_name_or_path").and_then(Value::as_str).map(str::to_string);
    Ok(AdapterMeta { lora, base_model })
}

/// The targets a `target_modules` value selects in a model of `layers` layers: a list of names matched as PEFT
/// matches them (the module's full path equals the entry or ends with `.entry`), each selecting a module in
/// every layer, or the string `all-linear`.
fn targets_of(v: &Value, layers: usize) -> std::result::Result<Vec<Target>, String> {
    let entries: Vec<&str> = match v {
        Value::String(s) if s == "all-linear" => return Ok(Target::ALL.to_vec()),
        Value::String(s) => return Err(format!("the pattern {s:?} is not supported: give a list of module names")),
        Value::Array(a) => a
            .iter()
            .map(|e| e.as_str().ok_or_else(|| format!("{e} is not a module name")))
            .collect::<std::result::Result<_, _>>()?,
        other => return Err(format!("{other}: expected a list of module names")),
    };
    let mut out = Vec::new();
    for e in entries {
        let mut matched = false;
        for t in Target::ALL {
            let hits = (0..layers)
                .filter(|l| {
                    let full = format!("gpt_neox.layers.{l}.{}", t.path());
                    full == e || full.ends_with(&format!(".{e}"))
                })
                .count();
            if hits == layers && layers > 0 {
                out.push(t);
                matched = true;
            } else if hits > 0 {
                return Err(format!(
                    "`{e}` selects {} in only {hits} of {layers} layers: per-layer adapters are not supported",
                    t.name()
                ));
            }
        }
        if !matched {
            return Err(format!(
                "`{e}` matches no Linear layer of GPT-NeoX (query_key_value, dense, dense_h_to_4h, dense_4h_to_h)"
            ));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The trained token rows of `trainable_token_indices`: the dict form naming the input embedding and the output
/// matrix with the same ids (dolly trains both or neither).
fn token_rows_of(v: &Value) -> std::result::Result<Vec<u32>, String> {
    let ids = |x: &Value| -> std::result::Result<Vec<u32>, String> {
        let a = x.as_array().ok_or_else(|| format!("{x}: expected a list of token ids"))?;
        a.iter()
            .map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| format!("{i} is not a token id")))
            .collect()
    };
    let Value::Object(o) = v else {
        return Err(
            "only the form {\"embed_in\": [...], \"lm_head\": [...]} is supported (the rows of both matrices)".into()
        );
    };
    let mut input = None;
    let mut output = None;
    for (k, x) in o {
        match k.as_str() {
            "embed_in" | "gpt_neox.embed_in" => input = Some(ids(x)?),
            "lm_head" | "embed_out" => output = Some(ids(x)?),
            other => return Err(format!("`{other}` is not an embedding of GPT-NeoX (embed_in, lm_head)")),
        }
    }
    match (input, output) {
        (Some(mut a), Some(mut b)) => {
            let order = a.clone();
            a.sort_unstable();
            b.sort_unstable();
            if a != b {
                return Err("embed_in and lm_head must train the same token ids".into());
            }
            if order != a || a.windows(2).any(|w| w[0] == w[1]) {
                return Err("token ids must be ascending and distinct".into());
            }
            Ok(a)
        }
        _ => Err("both embed_in and lm_head must be given (dolly trains the rows of both matrices)".into()),
    }
}

impl Model {
    /// Attach the adapter in `dir` (PEFT's format) to this model. Every error names the file and the field or
    /// tensor.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<AdapterMeta> {
        let meta = read_adapter_config(dir, &self.config)?;
        let layout = AdapterLayout::new(&self.config, &self.layout, &meta.lora);
        let path = dir.join(WEIGHTS_FILE);
        if !path.is_file() {
            let bin = dir.join("adapter_model.bin");
            let hint =
                if bin.is_file() { " (adapter_model.bin is not read: save the adapter with safetensors)" } else { "" };
            return Err(Error::file(&path, format!("missing{hint}")));
        }
        let values = read_tensors(&path, &layout)?;
        self.attach_lora(meta.lora.clone(), LoraInit::Values(values))?;
        Ok(meta)
    }

    /// Write the attached adapter into `dir` as PEFT writes it: `adapter_config.json` (naming `base_model` as
    /// the base) and `adapter_model.safetensors` (F32), each atomically.
    pub fn save_adapter(&self, dir: &Path, base_model: &str) -> Result<()> {
        let (Some(cfg), Some(layout)) = (self.lora(), self.adapter_layout()) else {
            return Err(Error::invalid("no LoRA adapter is attached"));
        };
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors: Vec<(&str, &[usize], &[f32])> =
            layout.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice(), &self.trainable()[p.range()])).collect();
        crate::weights::save_tensors(&dir.join(WEIGHTS_FILE), &tensors, SaveDtype::F32)?;
        let text = serde_json::to_string_pretty(&adapter_config_json(cfg, base_model))
            .map_err(|e| Error::invalid(e.to_string()))?
            + "\n";
        let cpath = dir.join(CONFIG_FILE);
        common::atomic_write(&cpath, text.as_bytes()).map_err(|e| Error::io(&cpath, e))
    }
}

/// `adapter_config.json` as PEFT 0.21 writes it for this configuration (keys sorted, as PEFT's json dump).
pub fn adapter_config_json(cfg: &LoraConfig, base_model: &str) -> Value {
    let mut o = Map::new();
    let tokens = if cfg.token_rows.is_empty() {
        Value::Null
    } else {
        json!({ "embed_in": cfg.token_rows, "lm_head": cfg.token_rows })
    };
    let alpha = if cfg.alpha.fract() == 0.0 && cfg.alpha < 1e15 { json!(cfg.alpha as u64) } else { json!(cfg.alpha) };
    for (k, v) in [
        ("alpha_pattern", json!({})),
        ("auto_mapping", Value::Null),
        ("base_model_name_or_path", json!(base_model)),
        ("bias", json!("none")),
        ("exclude_modules", Value::Null),
        ("fan_in_fan_out", json!(false)),
        ("inference_mode", json!(true)),
        ("init_lora_weights", json!(true)),
        ("layer_replication", Value::Null),
        ("layers_pattern", Value::Null),
        ("layers_to_transform", Value::Null),
        ("lora_alpha", alpha),
        ("lora_bias", json!(false)),
        ("lora_dropout", json!(cfg.dropout as f64)),
        ("modules_to_save", Value::Null),
        ("peft_type", json!("LORA")),
        ("r", json!(cfg.r)),
        ("rank_pattern", json!({})),
        ("revision", Value::Null),
        ("target_modules", json!(cfg.targets.iter().map(|t| t.name()).collect::<Vec<_>>())),
        ("task_type", json!("CAUSAL_LM")),
        ("trainable_token_indices", tokens),
        ("use_dora", json!(false)),
        ("use_qalora", json!(false)),
        ("use_rslora", json!(cfg.rslora)),
    ] {
        o.insert(k.into(), v);
    }
    Value::Object(o)
}

/// The adapter tensors of `layout` from `path`, every key checked: known (PEFT's `lm_head` or transformers 4's
/// `embed_out` spelling for the output rows), of the expected shape, none missing.
fn read_tensors(path: &Path, layout: &AdapterLayout) -> Result<Vec<f32>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map used only within this call; a concurrent writer could only change values.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| Error::file(path, format!("not a valid safetensors file (truncated or corrupt?): {e}")))?;
    let mut values = vec![0f32; layout.total];
    let mut seen = vec![false; layout.params.len()];
    let head_old = format!("{PREFIX}embed_out.token_adapter.trainable_tokens_delta");
    // in name order, so that the first error reported does not depend on hashing
    let mut all: Vec<_> = st.iter().collect();
    all.sort_by(|a, b| a.0.cmp(b.0));
    for (name, view) in all {
        let canonical = if name == head_old { crate::lora::token_rows_key("lm_head") } else { name.to_string() };
        let Some(i) = layout.params.iter().position(|p| p.name == canonical) else {
            let hint = if name.ends_with("base_layer.weight")
                || name.ends_with("embed_in.weight")
                || name.ends_with("lm_head.weight")
            {
                " (full embedding matrices, as PEFT saves after a vocabulary resize or with modules_to_save: save with save_embedding_layers=False; dolly trains token rows only)"
            } else if name.contains("lora_magnitude_vector") {
                " (DoRA is not supported)"
            } else {
                ""
            };
            return Err(Error::tensor(path, name, format!("not a tensor of this adapter configuration{hint}")));
        };
        let p = &layout.params[i];
        if view.shape() != p.shape.as_slice() {
            return Err(Error::tensor(
                path,
                name,
                format!("shape {:?}, adapter_config.json and the base model give {:?}", view.shape(), p.shape),
            ));
        }
        if std::mem::replace(&mut seen[i], true) {
            return Err(Error::tensor(path, name, "appears twice"));
        }
        let elem = crate::weights::elem_of(view.dtype()).map_err(|m| Error::tensor(path, name, m))?;
        crate::weights::convert(path, name, elem, view.data(), &mut values[p.range()])?;
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(Error::tensor(path, &layout.params[i].name, "missing"));
    }
    if let Some(p) = layout.params.iter().find(|p| values[p.range()].iter().any(|x| !x.is_finite())) {
        return Err(Error::tensor(path, &p.name, "holds non-finite values"));
    }
    Ok(values)
}

/// The directory an adapter names as its base, resolved as PEFT resolves it: relative to the current directory,
/// and, failing that, relative to the adapter directory's parent.
pub fn resolve_base(adapter_dir: &Path, base: &str) -> PathBuf {
    let p = PathBuf::from(base);
    if p.is_absolute() || p.join("config.json").is_file() {
        return p;
    }
    adapter_dir.parent().map(|d| d.join(&p)).filter(|q| q.join("config.json").is_file()).unwrap_or(p)
}
