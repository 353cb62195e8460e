//! Random initialisation of a GPT-NeoX model as HF `GPTNeoXPreTrainedModel._init_weights` does: Linear and
//! Embedding weights ~ N(0, initializer_range), biases 0, LayerNorm weight 1 and bias 0. Seeded and
//! reproducible with our own RNG (not bit-identical to PyTorch's generator, which no test relies on).

use crate::config::NeoxConfig;
use crate::layout::Layout;
use crate::model::Model;
use common::Rng;
use rayon::prelude::*;

impl Model {
    pub fn new_random(config: NeoxConfig, seed: u64) -> Model {
        let layout = Layout::new(&config);
        let std = config.raw.get("initializer_range").and_then(|x| x.as_f64()).unwrap_or(0.02);
        let mut params = vec![0f32; layout.total];
        for (k, info) in layout.params.iter().enumerate() {
            let dst = &mut params[info.range()];
            if info.name.ends_with("layernorm.weight") || info.name.ends_with("layer_norm.weight") {
                dst.fill(1.0);
            } else if info.name.ends_with(".bias") {
                dst.fill(0.0);
            } else {
                // One RNG stream per 64Ki-element block: parallel and independent of the thread count.
                dst.par_chunks_mut(1 << 16).enumerate().for_each(|(blk, d)| {
                    let mut r = Rng::derive(seed, ((k as u64) << 32) | blk as u64);
                    d.iter_mut().for_each(|x| *x = (r.normal() * std) as f32);
                });
            }
        }
        Model::from_parts(config, params).expect("layout-sized buffer")
    }
}
