//! What a training run will hold in memory, estimated from config.json and the batch shape before anything is
//! allocated, so a run that cannot fit is refused with "needs ~N GiB, this machine has M" instead of dying on a
//! failed allocation hours in. Mirrors the buffers the engine allocates: f32 weights, gradients, two AdamW
//! moments, the transposed forward copy of the Linear/head weights (`Model::wt`), and the activation buffers of
//! `neox::Activations` (all layers, or one layer's worth with gradient checkpointing). u128 arithmetic: hostile
//! sizes saturate instead of wrapping.

use neox::NeoxConfig;

/// One line of the estimate: what, and how many bytes.
#[derive(Clone, Debug)]
pub struct Estimate {
    pub parts: Vec<(&'static str, u128)>,
}

impl Estimate {
    pub fn total(&self) -> u128 {
        self.parts.iter().map(|(_, b)| *b).sum()
    }

    /// The total as u64 (saturating).
    pub fn total_u64(&self) -> u64 {
        u64::try_from(self.total()).unwrap_or(u64::MAX)
    }

    /// `~3.1 GiB (weights 1.2 GiB, optimizer 2.4 GiB, ...)`.
    pub fn describe(&self) -> String {
        let h = |b: u128| common::human_bytes(u64::try_from(b).unwrap_or(u64::MAX));
        let parts: Vec<String> = self.parts.iter().map(|(k, b)| format!("{k} {}", h(*b))).collect();
        format!("~{} ({})", h(self.total()), parts.join(", "))
    }
}

/// `x` as u128, clamped to 2^bits: sizes beyond these are refused anyway, and the clamp keeps every product
/// below u128's range.
fn cap(x: usize, bits: u32) -> u128 {
    (x as u128).min(1u128 << bits)
}

/// Parameters of a GPT-NeoX with `vocab` rows in each embedding.
pub fn param_count(c: &NeoxConfig, vocab: usize) -> u128 {
    let (h, f, v, l) =
        (cap(c.hidden_size, 24), cap(c.intermediate_size, 24), cap(vocab, 26), cap(c.num_hidden_layers, 16));
    // per layer: 2 LayerNorms, query_key_value, dense, dense_h_to_4h, dense_4h_to_h (weights and biases)
    let layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (f * h + f) + (h * f + h);
    v * h + l * layer + 2 * h + v * h
}

/// Training memory for micro-batches of up to `batch` rows of `seq` tokens.
pub fn training(c: &NeoxConfig, vocab: usize, batch: usize, seq: usize, recompute: bool, bf16: bool) -> Estimate {
    let p = param_count(c, vocab);
    let (h, v) = (cap(c.hidden_size, 24), cap(vocab, 26));
    let mut parts = vec![
        ("weights", 4 * p),
        ("gradients", 4 * p),
        ("AdamW moments", 8 * p),
        ("transposed weights", 4 * (p - v * h)),
        ("activations", activations(c, vocab, batch, seq, recompute, bf16)),
    ];
    if bf16 {
        parts.push(("bf16 copies", 2 * p));
    }
    Estimate { parts }
}

/// Training memory of a LoRA run with `adapter` trainable values: the frozen base held once (bf16: 2 bytes per
/// parameter and no transposed copy; f32: 4 bytes plus the transposed Linear/head copies), gradients and AdamW
/// moments of the adapter only, and the same activations as a full fine-tune (the branch's scratch is (N, F)
/// at most).
pub fn lora(
    c: &NeoxConfig,
    vocab: usize,
    batch: usize,
    seq: usize,
    recompute: bool,
    bf16: bool,
    adapter: usize,
) -> Estimate {
    let p = param_count(c, vocab);
    let (h, v, f) = (cap(c.hidden_size, 24), cap(vocab, 26), cap(c.intermediate_size, 24));
    let a = adapter as u128;
    let n = cap(batch, 20) * cap(seq, 24);
    let mut parts = vec![
        ("frozen base", if bf16 { 2 * p } else { 4 * p }),
        ("transposed weights", if bf16 { 0 } else { 4 * (p - v * h) }),
        ("adapter", 4 * a),
        ("gradients", 4 * a),
        ("AdamW moments", 8 * a),
        ("activations", activations(c, vocab, batch, seq, recompute, bf16) + 4 * n * f + (4 << 20)),
    ];
    parts.retain(|p| p.1 > 0);
    Estimate { parts }
}

/// Activation buffers and the LM head's logits chunk, in bytes.
fn activations(c: &NeoxConfig, vocab: usize, batch: usize, seq: usize, recompute: bool, bf16: bool) -> u128 {
    let (h, f, l) = (cap(c.hidden_size, 24), cap(c.intermediate_size, 24), cap(c.num_hidden_layers, 16));
    let (b, t, heads, v) = (cap(batch, 20), cap(seq, 24), cap(c.num_attention_heads, 24), cap(vocab, 26));
    let n = b * t;
    // the blocked attention keeps one log-sum-exp per (batch, head, query)
    let lse = b * heads * t;
    // one layer's kept activations (LayerActs): ln1/attn_y/ln2/mid (N,C), qkv (N,3C), lse, fc_pre (N,F),
    // LayerNorm statistics; in bf16 the rounded copy of attn_y
    let layer = 4 * n * h + 3 * n * h + lse + n * f + 4 * n + if bf16 { n * h } else { 0 };
    let kept = if recompute { 1 } else { l };
    // residual stream at every boundary, final LayerNorm, backward buffers (5 x (N,C), (N,3C), 2 x (N,F))
    let acts = (l + 1) * n * h + kept * layer + n * h + 5 * n * h + 3 * n * h + 2 * n * f;
    // the fused LM head + cross-entropy works in chunks of at most 256 MiB of logits
    let xent = (n * v * 4).min(256 << 20);
    4 * acts + xent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pythia_parameter_counts() {
        // Published sizes (HF model cards / config.json shapes): pythia-70m has 70,426,624 parameters with its
        // 50304-row vocabulary, pythia-1b 1,011,781,632.
        let c = NeoxConfig::preset("pythia-70m").unwrap();
        assert_eq!(param_count(&c, c.vocab_size), 70_426_624);
        let c = NeoxConfig::preset("pythia-1b").unwrap();
        assert_eq!(param_count(&c, c.vocab_size), 1_011_781_632);
    }

    #[test]
    fn hostile_sizes_saturate_and_refuse() {
        let mut c = NeoxConfig::preset("pythia-70m").unwrap();
        c.hidden_size = 1 << 40;
        let e = training(&c, 50280, usize::MAX, 1 << 20, false, true);
        assert!(e.total() > 1 << 70);
        assert!(e.total_u64() == u64::MAX);
    }
}
