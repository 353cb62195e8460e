//! `neox`: our GPT-NeoX (Pythia) engine — config, HF weights IO, the model's forward and explicit backward over a
//! backend (`backend`: the seam a second device implements; `backend::cpu` today), KV-cache decode, AdamW.
//! Does not tokenize, read datasets, or run training loops (those live in other crates). The kernels are private:
//! other crates reach compute only through `Model`, `Backend` and the `host` helpers.

pub mod config;
pub mod error;
pub mod layout;
pub mod lora;
pub mod pickle;
mod torch_bin;
pub mod weights;

pub use config::NeoxConfig;
pub use error::{Error, Result};
pub use layout::{Layout, Unit};

pub mod adapter_io;
pub mod backend;
pub mod batch_input;
mod block;
pub mod decode;
pub mod generate;
pub mod gguf;
pub mod host;
pub mod init;
pub mod kernel_bench;
mod kernels;
pub mod model;
mod model_gguf;
mod model_io;
mod model_lora;
mod model_quant;
pub mod optim;

pub use backend::cpu::{Cpu, QuantType};

/// ggml's reference block formats (the quantizers bit-identical to ggml's `quantize_row_*_ref`), for GGUF files
/// and tools: q8_0 (blocks of 32) and q4_K (super-blocks of 256).
pub mod ggml_quants {
    pub use crate::kernels::q4k::{dequantize_q4_k, quantize_q4_k, BLOCK_BYTES as Q4_K_BYTES, QK_K};
    pub use crate::kernels::q8::{dequantize_q8_0, quantize_q8_0};
}
pub use backend::Backend;
pub use batch_input::{BatchInput, OwnedBatch, IGNORE_INDEX};
pub use decode::KvCache;
pub use model::{eval_events, training_events, Activations, Model, UnitEvent, UnitHooks};
pub use model_gguf::{gguf_name, GgufType};
pub use model_lora::LoraInit;
pub use optim::{clip_coef, clip_grad_norm, grad_norm, AdamW, AdamWConfig};
pub use weights::SaveDtype;
