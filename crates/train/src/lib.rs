//! `train`: Dolly fine-tuning on one process or many (data parallel with ZeRO stages 0-3 over `dist`'s
//! collectives) — typed config (TOML + CLI), DeepSpeed JSON, schedules, the loop, world-independent checkpoints
//! with exact resume, metrics, and the Hugging Face export. Model math lives in `neox`, data in
//! `data`; this crate only orchestrates.

pub mod batches;
pub mod checkpoint;
pub mod checkpoint_shards;
pub mod config;
pub mod deepspeed;
pub mod dist_run;
pub mod error;
pub mod lora_run;
pub mod memory;
pub mod metrics;
pub mod model_source;
pub mod plot;
pub mod progress;
pub mod rundir;
pub mod schedule;
pub mod start;
pub mod tensorboard;
pub mod trainer;
pub mod zero;

pub use config::{LrScheduler, TestSize, TrainConfig};
pub use error::{Result, TrainError};
pub use model_source::resolve_model;
pub use trainer::{train, train_with, Control, Outcome, RunSummary};
