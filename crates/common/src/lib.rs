//! Shared building blocks used by every crate: atomic file writes, the seeded RNG, sha256 of files.
//! Deliberately tiny and dependency-light; nothing model- or data-specific lives here.

pub mod atomic;
pub mod rng;
pub mod sysmem;

pub use atomic::{atomic_write, atomic_write_with, sha256_file, sha256_hex, sync_dir};
pub use rng::Rng;
pub use sysmem::{check_fits, human_bytes};
