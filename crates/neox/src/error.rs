//! The engine's error type: every variant names the place (file, tensor, key) and what was expected vs found.
//! No panics on user input; callers add their own context on top.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum Error {
    /// An I/O failure on a named file.
    Io { path: PathBuf, source: std::io::Error },
    /// A problem with a file's content (config key, JSON syntax, index entry, safetensors header).
    File { path: PathBuf, msg: String },
    /// A problem with one tensor of a weights file.
    Tensor { path: PathBuf, tensor: String, msg: String },
    /// Invalid arguments or inputs to the engine (batch shapes, token ids, sizes).
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }
    pub fn file(path: &Path, msg: impl Into<String>) -> Self {
        Error::File { path: path.to_path_buf(), msg: msg.into() }
    }
    pub fn tensor(path: &Path, tensor: &str, msg: impl Into<String>) -> Self {
        Error::Tensor { path: path.to_path_buf(), tensor: tensor.to_string(), msg: msg.into() }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::File { path, msg } => write!(f, "{}: {msg}", path.display()),
            Error::Tensor { path, tensor, msg } => write!(f, "{}: tensor `{tensor}`: {msg}", path.display()),
            Error::Invalid(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
