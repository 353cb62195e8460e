//! Dolly's data pipeline: the hub client and its cache (`hub`, `hub_cache`), record readers with line-numbered
//! errors (`record`, `parquet_reader`, `dataset`), the byte-exact templates (`template`), the tokenizer set-up
//! (`tokenizer`), examples with labels built by construction plus filtering and the seeded split (`example`),
//! padded and packed batches (`collate`), the resumable sharded sampler (`sampler`), and `dolly data
//! stats|inspect` (`stats`). Does not know about models beyond `config.json`'s max length and vocabulary size; no
//! training logic. API overview: docs/data.md.

pub mod collate;
pub mod dataset;
pub mod error;
pub mod example;
pub mod hub;
mod hub_cache;
pub mod parquet_reader;
pub mod record;
pub mod sampler;
pub mod stats;
pub mod template;
pub mod tokenizer;

pub use collate::{pack_batch, pad_batch, Batch, Waste};
pub use dataset::{load_dataset, DatasetSource, LoadedDataset, DOLLY_DATASET};
pub use error::{DataError, ErrorKind, Result};
pub use example::{
    build_example, max_length_from_config, prepare_examples, Example, PrepareOptions, PrepareReport, Prepared,
    TestSize, IGNORE_INDEX,
};
pub use hub::{Hub, HubOptions, Repo};
pub use record::{BadRecordPolicy, Location, ReadReport, Record};
pub use sampler::{Sampler, SamplerState};
pub use template::generation_prompt;
pub use tokenizer::{DollyTokenizer, SpecialIds, VocabFit};
