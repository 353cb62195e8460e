//! Where every parameter lives in the flat buffers (parameters, gradients, AdamW moments share one layout).
//! Names and order are Hugging Face's `GPTNeoXForCausalLM` state dict; nothing here knows about files.

use crate::config::NeoxConfig;

#[derive(Clone, Debug)]
pub struct ParamInfo {
    /// HF state-dict name, e.g. `gpt_neox.layers.0.attention.query_key_value.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// HF Trainer's weight-decay set: Linear and Embedding weights decay; biases and LayerNorm do not.
    pub decay: bool,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

/// Offsets of one transformer layer's tensors.
#[derive(Clone, Copy, Debug)]
pub struct LayerOffsets {
    pub ln1_w: usize,
    pub ln1_b: usize,
    pub ln2_w: usize,
    pub ln2_b: usize,
    pub qkv_w: usize,
    pub qkv_b: usize,
    pub dense_w: usize,
    pub dense_b: usize,
    pub fc_w: usize,
    pub fc_b: usize,
    pub proj_w: usize,
    pub proj_b: usize,
}

/// A contiguous range of the flat parameter/gradient/moment buffers (see `Layout::units`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub name: String,
    pub range: std::ops::Range<usize>,
}

#[derive(Clone, Debug)]
pub struct Layout {
    pub params: Vec<ParamInfo>,
    pub embed_in: usize,
    pub layers: Vec<LayerOffsets>,
    pub lnf_w: usize,
    pub lnf_b: usize,
    pub embed_out: usize,
    pub total: usize,
}

impl Layout {
    pub fn new(c: &NeoxConfig) -> Self {
        let (v, h, f) = (c.vocab_size, c.hidden_size, c.intermediate_size);
        let mut params = Vec::new();
        let mut off = 0usize;
        let mut add = |name: String, shape: Vec<usize>, decay: bool| -> usize {
            let o = off;
            off += shape.iter().product::<usize>();
            params.push(ParamInfo { name, shape, offset: o, decay });
            o
        };
        let embed_in = add("gpt_neox.embed_in.weight".into(), vec![v, h], true);
        let mut layers = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("gpt_neox.layers.{i}.");
            layers.push(LayerOffsets {
                ln1_w: add(format!("{p}input_layernorm.weight"), vec![h], false),
                ln1_b: add(format!("{p}input_layernorm.bias"), vec![h], false),
                ln2_w: add(format!("{p}post_attention_layernorm.weight"), vec![h], false),
                ln2_b: add(format!("{p}post_attention_layernorm.bias"), vec![h], false),
                qkv_w: add(format!("{p}attention.query_key_value.weight"), vec![3 * h, h], true),
                qkv_b: add(format!("{p}attention.query_key_value.bias"), vec![3 * h], false),
                dense_w: add(format!("{p}attention.dense.weight"), vec![h, h], true),
                dense_b: add(format!("{p}attention.dense.bias"), vec![h], false),
                fc_w: add(format!("{p}mlp.dense_h_to_4h.weight"), vec![f, h], true),
                fc_b: add(format!("{p}mlp.dense_h_to_4h.bias"), vec![f], false),
                proj_w: add(format!("{p}mlp.dense_4h_to_h.weight"), vec![h, f], true),
                proj_b: add(format!("{p}mlp.dense_4h_to_h.bias"), vec![h], false),
            });
        }
        let lnf_w = add("gpt_neox.final_layer_norm.weight".into(), vec![h], false);
        let lnf_b = add("gpt_neox.final_layer_norm.bias".into(), vec![h], false);
        let embed_out = add("embed_out.weight".into(), vec![v, h], true);
        Layout { params, embed_in, layers, lnf_w, lnf_b, embed_out, total: off }
    }

    /// The units of sharding and reduction, in layout order: the input embedding, each layer, and the final
    /// LayerNorm with the LM head. Each is one contiguous range of the flat buffers.
    pub fn units(&self) -> Vec<Unit> {
        let mut units = vec![Unit {
            name: "embed_in".into(),
            range: self.embed_in..self.layers.first().map_or(self.lnf_w, |l| l.ln1_w),
        }];
        for (i, l) in self.layers.iter().enumerate() {
            let end = self.layers.get(i + 1).map_or(self.lnf_w, |n| n.ln1_w);
            units.push(Unit { name: format!("layers.{i}"), range: l.ln1_w..end });
        }
        units.push(Unit { name: "final_layer_norm+embed_out".into(), range: self.lnf_w..self.total });
        units
    }

    pub fn find(&self, name: &str) -> Option<&ParamInfo> {
        self.params.iter().find(|p| p.name == name)
    }
}
