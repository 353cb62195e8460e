//! The local Hugging Face hub cache, in the layout the Python `huggingface_hub` library reads and writes
//! (`{cache}/datasets--owner--name/` `blobs/{etag}`, `snapshots/{commit}/{file}` -> relative symlink to the blob,
//! `refs/{revision}` = commit), and where it is: `HubOptions` from HF_ENDPOINT, HF_HOME, HF_HUB_CACHE,
//! HF_HUB_OFFLINE, HF_TOKEN (and HF_TOKEN_PATH / `$HF_HOME/token`). Repository names, cache look-ups, the
//! pointer links and the file-name checks live here; talking to the hub is `hub.rs`. Re-exported from `hub`.

use crate::error::{DataError, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The public hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Model or dataset repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoType {
    Model,
    Dataset,
}

/// A repository at a revision (branch, tag or commit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repo {
    pub id: String,
    pub repo_type: RepoType,
    pub revision: String,
}

impl Repo {
    pub fn dataset(id: &str, revision: &str) -> Repo {
        Repo { id: id.to_string(), repo_type: RepoType::Dataset, revision: revision.to_string() }
    }
    pub fn model(id: &str, revision: &str) -> Repo {
        Repo { id: id.to_string(), repo_type: RepoType::Model, revision: revision.to_string() }
    }
    /// `datasets--owner--name` / `models--owner--name`.
    pub fn folder_name(&self) -> String {
        let kind = match self.repo_type {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
        };
        format!("{kind}--{}", self.id.replace('/', "--"))
    }
}

/// True when `s` can be a hub repository id (`name` or `owner/name`; letters, digits, `-`, `_`, `.`).
pub fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    let ok_part = |p: &&str| {
        !p.is_empty()
            && !p.starts_with('.')
            && !p.contains("..")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (1..=2).contains(&parts.len()) && parts.iter().all(ok_part)
}

/// Where and how to talk to the hub.
#[derive(Clone, Debug)]
pub struct HubOptions {
    pub endpoint: String,
    /// The hub cache root (holds `datasets--owner--name/` folders).
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
    pub progress: bool,
    /// Extra tries after a 5xx, 429 or network error.
    pub retries: u32,
    /// First back-off; doubles each retry.
    pub retry_delay: Duration,
}

fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
}

impl HubOptions {
    /// From the process environment.
    pub fn from_env() -> HubOptions {
        Self::from_env_fn(|k| std::env::var(k).ok())
    }

    /// From any variable lookup (tests pass a map; the process environment is global).
    pub fn from_env_fn(get: impl Fn(&str) -> Option<String>) -> HubOptions {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        let hf_home = get("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = get("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(get("HOME").unwrap_or_else(|| ".".into())).join(".cache"));
            cache.join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = get("HF_TOKEN").or_else(|| {
            let path = get("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        HubOptions {
            endpoint: get("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.into()).trim_end_matches('/').to_string(),
            cache_dir,
            token,
            offline: get("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v)),
            progress: true,
            retries: 3,
            retry_delay: Duration::from_millis(500),
        }
    }

    pub(crate) fn repo_dir(&self, repo: &Repo) -> PathBuf {
        self.cache_dir.join(repo.folder_name())
    }
}

/// A repository snapshot present in the cache.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub commit: String,
    pub dir: PathBuf,
    /// Files fetched (repo-relative names), in order.
    pub files: Vec<String>,
}

pub(crate) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Reject repo-relative names that would escape the snapshot folder.
pub(crate) fn check_filename(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name.split('/').any(|p| p.is_empty() || p == "." || p == "..");
    if bad {
        return Err(DataError::hub(format!("refusing unsafe file name from the hub: {name:?}")));
    }
    Ok(())
}

/// The commit a cached revision points to.
pub fn cached_commit(opts: &HubOptions, repo: &Repo) -> Option<String> {
    if is_commit_hash(&repo.revision) {
        return Some(repo.revision.clone());
    }
    let r = std::fs::read_to_string(opts.repo_dir(repo).join("refs").join(&repo.revision)).ok()?;
    let r = r.trim();
    is_commit_hash(r).then(|| r.to_string())
}

/// The cached path of one file at the repo's revision, if present.
pub fn cached_file(opts: &HubOptions, repo: &Repo, filename: &str) -> Option<PathBuf> {
    let commit = cached_commit(opts, repo)?;
    let p = opts.repo_dir(repo).join("snapshots").join(commit).join(filename);
    p.exists().then_some(p)
}

/// The cached snapshot of the repo's revision with its files, if present.
pub fn cached_snapshot(opts: &HubOptions, repo: &Repo) -> Option<Snapshot> {
    let commit = cached_commit(opts, repo)?;
    let dir = opts.repo_dir(repo).join("snapshots").join(&commit);
    let mut files = Vec::new();
    list_dir(&dir, &dir, &mut files);
    files.sort();
    (!files.is_empty()).then_some(Snapshot { commit, dir, files })
}

fn list_dir(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            list_dir(root, &p, out);
        } else if p.exists() {
            if let Ok(rel) = p.strip_prefix(root) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
}

/// True for files that hold records (`.jsonl`, `.json`, `.parquet`), not the hub's metadata files.
pub fn is_data_file(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    !base.starts_with('.')
        && !matches!(base, "dataset_info.json" | "dataset_infos.json")
        && crate::record::FileFormat::of(Path::new(base)).is_some()
}

/// Point `refs/{revision}` at `commit`, atomically, unless it already does; a commit-hash revision has no ref.
pub(crate) fn write_ref(opts: &HubOptions, repo: &Repo, commit: &str) -> Result<()> {
    if is_commit_hash(&repo.revision) {
        return Ok(());
    }
    let refs = opts.repo_dir(repo).join("refs").join(&repo.revision);
    if let Some(parent) = refs.parent() {
        mkdirs(parent)?;
    }
    let current = std::fs::read_to_string(&refs).unwrap_or_default();
    if current.trim() != commit {
        common::atomic_write(&refs, commit.as_bytes())
            .map_err(|e| DataError::io(format!("{}: {e}", refs.display())))?;
    }
    Ok(())
}

pub(crate) fn mkdirs(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| DataError::io(format!("{}: cannot create directory: {e}", p.display())))
}

/// `snapshots/{commit}/{file}` -> relative symlink to `blobs/{etag}`, replaced atomically.
pub(crate) fn link_pointer(blob: &Path, pointer: &Path) -> Result<()> {
    let parent = pointer.parent().ok_or_else(|| DataError::io(format!("{}: no parent", pointer.display())))?;
    mkdirs(parent)?;
    let repo_dir = blob.parent().and_then(Path::parent).unwrap_or(Path::new("."));
    let depth = parent.strip_prefix(repo_dir).map(|r| r.components().count()).unwrap_or(0);
    let mut target = PathBuf::new();
    for _ in 0..depth {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob.file_name().unwrap_or_default());
    if std::fs::read_link(pointer).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let tmp = parent.join(format!(
        ".{}.link-{}",
        pointer.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    std::os::unix::fs::symlink(&target, &tmp).map_err(|e| DataError::io(format!("{}: {e}", tmp.display())))?;
    #[cfg(not(unix))]
    std::fs::copy(blob, &tmp).map_err(|e| DataError::io(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, pointer).map_err(|e| DataError::io(format!("{}: {e}", pointer.display())))?;
    common::sync_dir(parent).map_err(|e| DataError::io(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn opts(vars: &[(&str, &str)]) -> HubOptions {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HubOptions::from_env_fn(|k| m.get(k).cloned())
    }

    #[test]
    fn environment_is_honoured_in_hf_order() {
        let o = opts(&[("HOME", "/h")]);
        assert_eq!(o.cache_dir, PathBuf::from("/h/.cache/huggingface/hub"));
        assert_eq!(o.endpoint, DEFAULT_ENDPOINT);
        assert!(!o.offline && o.token.is_none());
        let o = opts(&[("HOME", "/h"), ("HF_HOME", "/x"), ("HF_ENDPOINT", "http://127.0.0.1:9/"), ("HF_TOKEN", "t")]);
        assert_eq!(o.cache_dir, PathBuf::from("/x/hub"));
        assert_eq!(o.endpoint, "http://127.0.0.1:9");
        assert_eq!(o.token.as_deref(), Some("t"));
        let o = opts(&[("HF_HOME", "/x"), ("HF_HUB_CACHE", "/c"), ("HF_HUB_OFFLINE", "yes")]);
        assert_eq!(o.cache_dir, PathBuf::from("/c"));
        assert!(o.offline);
        assert!(!opts(&[("HF_HUB_OFFLINE", "0")]).offline);
    }

    #[test]
    fn names_and_ids() {
        assert_eq!(
            Repo::dataset("databricks/databricks-dolly-15k", "main").folder_name(),
            "datasets--databricks--databricks-dolly-15k"
        );
        assert!(looks_like_repo_id("databricks/databricks-dolly-15k"));
        assert!(looks_like_repo_id("gpt2"));
        assert!(!looks_like_repo_id("../x"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(check_filename("data/x.jsonl").is_ok());
        assert!(check_filename("../x").is_err());
        assert!(is_data_file("data/train.parquet") && !is_data_file(".gitattributes") && !is_data_file("README.md"));
    }
}
