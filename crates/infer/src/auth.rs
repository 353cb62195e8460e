//! Bearer-token authentication (`dolly serve --api-key`): every endpoint but `GET /health` and the static chat
//! page `GET /` needs
//! `Authorization: Bearer KEY`; a missing or wrong key is a 401 with OpenAI's error (`invalid_api_key`). The key
//! is compared in time independent of where it differs (no early exit on the first differing byte).

use crate::request::ApiError;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Longest accepted key, in bytes.
pub const MAX_KEY: usize = 256;

/// Why `key` cannot be an API key: empty, too long, or with bytes a header cannot carry.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(format!("--api-key must be 1 to {MAX_KEY} bytes long, got {}", key.len()));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("--api-key must be printable ASCII without spaces".into());
    }
    Ok(())
}

/// Equal contents, compared over the whole of both (the length still shows, as in every such check).
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= (a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

/// The middleware: passes `/health` and requests bearing the key.
pub(crate) async fn require_key(State(key): State<Arc<String>>, req: Request, next: Next) -> Response {
    // `/health` for probes; `/` is the static chat page (a browser cannot send the key with a page load: the
    // page asks for it and sends it with each API call)
    if matches!(req.uri().path(), "/health" | "/") {
        return next.run(req).await;
    }
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let token = given.and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    match token {
        Some(t) if same(t.as_bytes(), key.as_bytes()) => next.run(req).await,
        _ => {
            let msg = if given.is_none() {
                "missing API key: send `Authorization: Bearer KEY`"
            } else {
                "incorrect API key provided"
            };
            ApiError::invalid(None, msg).status(StatusCode::UNAUTHORIZED).code("invalid_api_key").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_and_validate() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"a"));
        assert!(check_key("sk-local-123").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("has space").is_err());
        assert!(check_key(&"k".repeat(MAX_KEY + 1)).is_err());
    }
}
