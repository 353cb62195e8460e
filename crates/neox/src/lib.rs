//! `neox`: our GPT-NeoX (Pythia) engine — config, HF weights IO, explicit forward and backward, KV-cache decode,
//! AdamW, CPU kernels. Does not tokenize, read datasets, or run training loops (those live in other crates).

pub mod config;
pub mod error;
pub mod layout;
pub mod pickle;
mod torch_bin;
pub mod weights;

pub use config::NeoxConfig;
pub use error::{Error, Result};
pub use layout::Layout;

pub mod batch;
pub mod decode;
pub mod generate;
pub mod init;
pub mod kernels;
pub mod model;
pub mod optim;

pub use batch::{BatchInput, OwnedBatch, IGNORE_INDEX};
pub use decode::KvCache;
pub use model::{Activations, Model};
pub use optim::{clip_coef, clip_grad_norm, grad_norm, AdamW, AdamWConfig};
pub use weights::SaveDtype;
