//! Locating `../shared/data` (the real GPT-NeoX-20B tokenizer and databricks-dolly-15k) from the workspace root,
//! wherever the test runs from: the path comes from this crate's `CARGO_MANIFEST_DIR`, fixed at compile time.

use std::path::{Path, PathBuf};

/// The workspace root: this crate lives in `<root>/crates/test-support`.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    match manifest.ancestors().nth(2) {
        Some(root) => root.to_path_buf(),
        None => panic!("test-support: {} has no grandparent (expected <root>/crates/test-support)", manifest.display()),
    }
}

/// `../shared/data` next to the workspace root; panics naming the path when it is not a directory.
pub fn shared_data() -> PathBuf {
    let root = workspace_root();
    let dir = root.parent().unwrap_or(&root).join("shared").join("data");
    assert!(
        dir.is_dir(),
        "missing the shared data directory {} (CI lays ../shared beside the checkout)",
        dir.display()
    );
    dir
}

/// One file of `../shared/data` (e.g. `20B_tokenizer.json`, `databricks-dolly-15k.jsonl`); panics naming the path
/// when it is not a file.
pub fn shared_file(name: &str) -> PathBuf {
    let p = shared_data().join(name);
    assert!(p.is_file(), "missing {} (CI lays ../shared beside the checkout)", p.display());
    p
}
