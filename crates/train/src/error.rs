//! The training crate's error: one message that already names the place (file, flag, step). Converts from the
//! engine's and the data pipeline's errors, whose messages carry their own context.

use std::fmt;

#[derive(Debug)]
pub struct TrainError(pub String);

pub type Result<T> = std::result::Result<T, TrainError>;

impl fmt::Display for TrainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TrainError {}

impl From<String> for TrainError {
    fn from(s: String) -> Self {
        TrainError(s)
    }
}
impl From<neox::Error> for TrainError {
    fn from(e: neox::Error) -> Self {
        TrainError(e.to_string())
    }
}
impl From<data::DataError> for TrainError {
    fn from(e: data::DataError) -> Self {
        TrainError(e.to_string())
    }
}

/// `Err(TrainError(format!(...)))`.
#[macro_export]
macro_rules! bail {
    ($($t:tt)*) => { return Err($crate::error::TrainError(format!($($t)*))) };
}

/// Attach a description of what was being done to an I/O error.
pub fn io_ctx<T>(r: std::io::Result<T>, what: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|e| TrainError(format!("{}: {e}", what())))
}
