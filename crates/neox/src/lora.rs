//! LoRA with PEFT's semantics on GPT-NeoX: a targeted Linear computes `y = W x + b + s · B A dropout(x)` with
//! A (r, IC), B (OC, r), `s = alpha / r` (or `alpha / sqrt(r)` with rsLoRA); the base stays frozen. Optionally
//! some token rows of `embed_in` and `embed_out` are trained too (Dolly's three special tokens sit in rows
//! Pythia never trained). The trainable tensors live in one flat f32 buffer whose layout (`AdapterLayout`)
//! names each tensor by the key PEFT saves it under, so the buffer is written and read as
//! `adapter_model.safetensors` without renaming.

use crate::config::NeoxConfig;
use crate::error::{Error, Result};
use crate::layout::{Layout, ParamInfo};

/// The Linear layers LoRA can target, by their Hugging Face module names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    QueryKeyValue,
    Dense,
    DenseHTo4h,
    Dense4hToH,
}

impl Target {
    /// Every target, in a layer's order (PEFT's `all-linear` on GPT-NeoX: the head is excluded).
    pub const ALL: [Target; 4] = [Target::QueryKeyValue, Target::Dense, Target::DenseHTo4h, Target::Dense4hToH];

    /// The module's name, as in `target_modules`.
    pub fn name(self) -> &'static str {
        match self {
            Target::QueryKeyValue => "query_key_value",
            Target::Dense => "dense",
            Target::DenseHTo4h => "dense_h_to_4h",
            Target::Dense4hToH => "dense_4h_to_h",
        }
    }

    /// The module's path inside a layer (`gpt_neox.layers.N.<path>`).
    pub fn path(self) -> &'static str {
        match self {
            Target::QueryKeyValue => "attention.query_key_value",
            Target::Dense => "attention.dense",
            Target::DenseHTo4h => "mlp.dense_h_to_4h",
            Target::Dense4hToH => "mlp.dense_4h_to_h",
        }
    }

    /// A `target_modules` entry: the module name or its path inside a layer (PEFT matches a module whose full
    /// name is the entry or ends with `.entry`; entries naming single layers are not supported).
    pub fn parse(s: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| s == t.name() || s == t.path())
    }

    /// (IC, OC) of this module in `c`'s model.
    pub fn dims(self, c: &NeoxConfig) -> (usize, usize) {
        let (h, f) = (c.hidden_size, c.intermediate_size);
        match self {
            Target::QueryKeyValue => (h, 3 * h),
            Target::Dense => (h, h),
            Target::DenseHTo4h => (h, f),
            Target::Dense4hToH => (f, h),
        }
    }
}

/// Parse `all-linear` or a comma-separated list of module names (`query_key_value,dense,...`).
pub fn parse_targets(s: &str) -> std::result::Result<Vec<Target>, String> {
    let s = s.trim();
    if s == "all-linear" {
        return Ok(Target::ALL.to_vec());
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let t = Target::parse(part).ok_or_else(|| {
            format!("unknown LoRA target module `{part}` (GPT-NeoX has query_key_value, dense, dense_h_to_4h, dense_4h_to_h; or all-linear)")
        })?;
        out.push(t);
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err("no LoRA target modules given".into());
    }
    Ok(out)
}

/// Which rows of `embed_in` / `embed_out` a LoRA run trains.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    /// Probability of zeroing an input element of the LoRA branch in training (the base product sees x).
    pub dropout: f32,
    /// Sorted, without duplicates.
    pub targets: Vec<Target>,
    pub rslora: bool,
    /// Token ids whose rows of `embed_in` and `embed_out` are trained (sorted, without duplicates).
    pub token_rows: Vec<u32>,
}

impl LoraConfig {
    /// The branch's scale: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        (if self.rslora { self.alpha / r.sqrt() } else { self.alpha / r }) as f32
    }

    /// Every value checked against the model it will be attached to.
    pub fn validate(&self, c: &NeoxConfig) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(m));
        let smallest = Target::ALL.iter().map(|t| t.dims(c)).map(|(i, o)| i.min(o)).min().unwrap_or(0);
        if self.r == 0 || self.r > smallest {
            return bad(format!(
                "lora_r {} must be between 1 and {smallest} (the smallest targeted dimension)",
                self.r
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("lora_alpha {} must be a positive number", self.alpha));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return bad(format!("lora_dropout {} must be in [0, 1)", self.dropout));
        }
        if self.targets.is_empty() {
            return bad("no LoRA target modules".into());
        }
        if !self.targets.windows(2).all(|w| w[0] < w[1]) || !self.token_rows.windows(2).all(|w| w[0] < w[1]) {
            return bad("LoRA targets and token rows must be sorted and distinct".into());
        }
        if let Some(&id) = self.token_rows.iter().find(|&&id| id as usize >= c.vocab_size) {
            return bad(format!("trained token row {id} is outside the vocabulary of {} rows", c.vocab_size));
        }
        Ok(())
    }
}

/// One targeted Linear: where its frozen weight is in the model's layout and its A, B in the adapter buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub layer: usize,
    pub target: Target,
    /// Offset of the base weight (OC, IC) in the model's layout: how the backend finds the slot of a Linear.
    pub w: usize,
    pub ic: usize,
    pub oc: usize,
    /// A (r, IC) and B (OC, r) in the adapter buffer.
    pub a: usize,
    pub b: usize,
}

/// The adapter's flat buffer: every LoRA A and B (layer by layer, targets in order), then the trained rows of
/// `embed_in` (k, C) and of `embed_out` (k, C).
#[derive(Clone, Debug)]
pub struct AdapterLayout {
    /// Names are the keys of PEFT's `adapter_model.safetensors`; all decay (HF Trainer's decay set holds every
    /// weight that is not a bias or a LayerNorm).
    pub params: Vec<ParamInfo>,
    /// Sorted by `w`.
    pub slots: Vec<Slot>,
    pub r: usize,
    /// Offsets of the trained rows, when there are any.
    pub embed_rows: Option<usize>,
    pub head_rows: Option<usize>,
    pub total: usize,
}

/// PEFT's prefix of every saved key.
pub const PREFIX: &str = "base_model.model.";

/// The saved key of a LoRA matrix (`lora_A` or `lora_B`).
pub fn lora_key(layer: usize, t: Target, which: &str) -> String {
    format!("{PREFIX}gpt_neox.layers.{layer}.{}.{which}.weight", t.path())
}

/// The saved key of the trained rows of `module` (`gpt_neox.embed_in`, or `lm_head`: transformers 5's name of
/// the output matrix that `model.safetensors` calls `embed_out`): PEFT's trainable-token layer stores the rows'
/// VALUES (not differences, despite the name) under `token_adapter.trainable_tokens_delta`
/// (docs/adapter-format.md).
pub fn token_rows_key(module: &str) -> String {
    format!("{PREFIX}{module}.token_adapter.trainable_tokens_delta")
}

impl AdapterLayout {
    pub fn new(c: &NeoxConfig, base: &Layout, cfg: &LoraConfig) -> Self {
        let mut params = Vec::new();
        let mut slots = Vec::new();
        let mut off = 0;
        let mut add = |name: String, shape: Vec<usize>| {
            let o = off;
            off += shape.iter().product::<usize>();
            params.push(ParamInfo { name, shape, offset: o, decay: true });
            o
        };
        for (layer, lo) in base.layers.iter().enumerate() {
            for &target in &cfg.targets {
                let (ic, oc) = target.dims(c);
                let w = match target {
                    Target::QueryKeyValue => lo.qkv_w,
                    Target::Dense => lo.dense_w,
                    Target::DenseHTo4h => lo.fc_w,
                    Target::Dense4hToH => lo.proj_w,
                };
                let a = add(lora_key(layer, target, "lora_A"), vec![cfg.r, ic]);
                let b = add(lora_key(layer, target, "lora_B"), vec![oc, cfg.r]);
                slots.push(Slot { layer, target, w, ic, oc, a, b });
            }
        }
        let k = cfg.token_rows.len();
        let (embed_rows, head_rows) = if k > 0 {
            let e = add(token_rows_key("gpt_neox.embed_in"), vec![k, c.hidden_size]);
            let h = add(token_rows_key("lm_head"), vec![k, c.hidden_size]);
            (Some(e), Some(h))
        } else {
            (None, None)
        };
        slots.sort_by_key(|s| s.w);
        AdapterLayout { params, slots, r: cfg.r, embed_rows, head_rows, total: off }
    }

    /// The slot of the Linear whose base weight is at `w`, if LoRA targets it.
    pub fn slot(&self, w: usize) -> Option<&Slot> {
        self.slots.binary_search_by_key(&w, |s| s.w).ok().map(|i| &self.slots[i])
    }

    pub fn find(&self, name: &str) -> Option<&ParamInfo> {
        self.params.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_as_peft_matches_them() {
        assert_eq!(parse_targets("all-linear").unwrap(), Target::ALL.to_vec());
        assert_eq!(parse_targets("dense, query_key_value").unwrap(), vec![Target::QueryKeyValue, Target::Dense]);
        assert_eq!(parse_targets("attention.dense").unwrap(), vec![Target::Dense]);
        assert_eq!(parse_targets("mlp.dense_4h_to_h").unwrap(), vec![Target::Dense4hToH]);
        assert!(parse_targets("embed_out").unwrap_err().contains("embed_out"));
        assert!(parse_targets("q_proj").is_err());
        assert!(parse_targets(" , ").is_err());
    }
}
