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
pub use backend::Backend;
pub use batch_input::{BatchInput, OwnedBatch, IGNORE_INDEX};
pub use decode::KvCache;
pub use model::{eval_events, training_events, Activations, Model, UnitEvent, UnitHooks};
pub use model_gguf::{gguf_name, GgufType};
pub use model_lora::LoraInit;
pub use optim::{clip_coef, clip_grad_norm, grad_norm, AdamW, AdamWConfig};
pub use weights::SaveDtype;
