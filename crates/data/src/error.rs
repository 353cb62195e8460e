//! The data crate's one error type: a message that already names the file, line, field or URL it is about.
//! Does not classify errors for programmatic recovery beyond a coarse `ErrorKind`; callers print it.

use std::fmt;

/// Coarse class of a data error, for callers and tests that need to tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Reading or writing a local file failed.
    Io,
    /// A record (or a whole input file) is malformed.
    BadRecord,
    /// A tokenizer file is missing, malformed or incompatible.
    Tokenizer,
    /// A configuration value (flag or config.json field) is invalid.
    Config,
    /// Talking to the hub failed (HTTP status, truncated body, checksum, offline without cache).
    Hub,
}

/// An error with its context in the message (`file:line: what; expected vs got`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataError {
    pub kind: ErrorKind,
    pub message: String,
}

impl DataError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        DataError { kind, message: message.into() }
    }
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io, message)
    }
    pub fn record(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRecord, message)
    }
    pub fn tokenizer(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Tokenizer, message)
    }
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }
    pub fn hub(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Hub, message)
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DataError {}

pub type Result<T> = std::result::Result<T, DataError>;
