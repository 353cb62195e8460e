//! `dolly cache-dataset` and `dolly data stats|inspect`: thin wrappers over the `data` crate.

use clap::{Args, Subcommand};

#[derive(Args)]
pub struct CacheDatasetArgs {}

#[derive(Subcommand)]
pub enum DataCommand {}

pub fn run_cache(_a: CacheDatasetArgs) -> anyhow::Result<()> {
    anyhow::bail!("cache-dataset is not implemented yet")
}

pub fn run(c: DataCommand) -> anyhow::Result<()> {
    match c {}
}
