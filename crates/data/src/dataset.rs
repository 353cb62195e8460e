//! `--training-dataset` resolution: a local `.jsonl`/`.json`/`.parquet` file, a directory of them, or a hub
//! dataset id (downloaded into, or taken from, the hub cache), read into records with a bad-record report.
//! Does not tokenize; see `example` for what happens next.

use crate::error::{DataError, Result};
use crate::hub::{is_data_file, looks_like_repo_id, Hub, HubOptions, Repo};
use crate::record::{read_path, BadRecordPolicy, ReadReport, Record};
use std::path::{Path, PathBuf};

/// Dolly's dataset on the hub.
pub const DOLLY_DATASET: &str = "databricks/databricks-dolly-15k";

/// What a `--training-dataset` value names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatasetSource {
    Local(PathBuf),
    Hub(String),
}

impl DatasetSource {
    /// An existing path is local; otherwise a valid repo id is a hub dataset; otherwise an error.
    pub fn parse(spec: &str) -> Result<DatasetSource> {
        let p = Path::new(spec);
        if p.exists() {
            return Ok(DatasetSource::Local(p.to_path_buf()));
        }
        let has_data_ext = crate::record::FileFormat::of(p).is_some();
        if looks_like_repo_id(spec) && !has_data_ext {
            return Ok(DatasetSource::Hub(spec.to_string()));
        }
        Err(DataError::io(format!("{spec}: no such file or directory (and not a hub dataset id like owner/name)")))
    }
}

/// Records plus what reading them involved.
#[derive(Clone, Debug)]
pub struct LoadedDataset {
    pub records: Vec<Record>,
    pub report: ReadReport,
    /// The hub commit when the data came from the hub.
    pub commit: Option<String>,
}

/// Fetch (or find in the cache) the data files of hub dataset `id` at `revision`; returns the snapshot directory.
pub fn cache_hub_dataset(opts: &HubOptions, id: &str, revision: &str) -> Result<crate::hub::Snapshot> {
    Hub::new(opts.clone()).snapshot(&Repo::dataset(id, revision), &is_data_file)
}

/// Resolve and read a `--training-dataset` value (hub ids at revision `main`).
pub fn load_dataset(spec: &str, policy: BadRecordPolicy, hub: &HubOptions) -> Result<LoadedDataset> {
    match DatasetSource::parse(spec)? {
        DatasetSource::Local(p) => {
            let (records, report) = read_path(&p, policy)?;
            Ok(LoadedDataset { records, report, commit: None })
        }
        DatasetSource::Hub(id) => {
            let snap = cache_hub_dataset(hub, &id, "main")?;
            let mut records = Vec::new();
            let mut report = ReadReport::default();
            for f in snap.files.iter().filter(|f| is_data_file(f)) {
                crate::record::read_file_into(&snap.dir.join(f), policy, &mut records, &mut report)?;
            }
            Ok(LoadedDataset { records, report, commit: Some(snap.commit) })
        }
    }
}
