//! `infer`: Dolly's instruction pipeline at inference time (dolly-spec section 9) — sampling (`sampling`), logit
//! rules (`penalties`), log-probabilities (`logprobs`), response extraction (`extract`), UTF-8-safe incremental text
//! streaming (`stream`) and stop strings (`stop`), batched generation on the KV cache with left padding, rows
//! joining a running batch and groups of rows sharing one prefill (`decoding`), the request scheduler
//! (`scheduler`) and the OpenAI-compatible HTTP server (`server`; its settings and their checks in `options`,
//! request validation in `request`, responses in `respond` and `choice`, connection handling in `conn`, metrics
//! and the request log in `observe`, `/tokenize` and `/detokenize` in `tokenize`). Does not train, and never
//! mutates the model: per-request state (KV cache rows, RNG, stop rules) lives in `decoding::BatchDecoder`.

pub mod auth;
mod choice;
mod conn;
mod cors;
pub mod decoding;
pub mod extract;
mod fields;
pub mod logprobs;
mod observe;
mod options;
pub mod penalties;
mod request;
mod respond;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod stop;
pub mod stream;
mod tokenize;

pub use decoding::{generate, BatchDecoder, FinishReason, GenOutput, SeqParams, TokenEvent};
pub use extract::extract_response;
pub use sampling::{sample, SamplingParams};
pub use stream::TextStream;

/// Errors of this crate, with context in the message.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<neox::Error> for Error {
    fn from(e: neox::Error) -> Self {
        Error(format!("engine: {e}"))
    }
}

impl From<data::DataError> for Error {
    fn from(e: data::DataError) -> Self {
        Error(format!("tokenizer: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, Error>;
