//! CORS for browsers on other origins (`dolly serve --cors-origin ORIGIN`, repeatable; `*` for any): a request
//! whose `Origin` is allowed gets `Access-Control-Allow-Origin`, and a preflight (`OPTIONS` with
//! `Access-Control-Request-Method`) is answered 204 with the methods and headers the API uses, before
//! authentication (browsers send preflights without credentials). Other origins get no CORS headers, so the
//! browser blocks them; servers without the option send none at all.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// The value of `Access-Control-Allow-Origin` for `origin`, if allowed.
fn allowed(origins: &[String], origin: &str) -> Option<HeaderValue> {
    if origins.iter().any(|o| o == "*") {
        return Some(HeaderValue::from_static("*"));
    }
    origins.iter().any(|o| o == origin).then(|| HeaderValue::from_str(origin).ok()).flatten()
}

/// Why `origin` cannot be a `--cors-origin` value.
pub fn check_origin(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Ok(());
    }
    let ok = (origin.starts_with("http://") || origin.starts_with("https://"))
        && !origin.ends_with('/')
        && origin.bytes().all(|b| b.is_ascii_graphic())
        && origin.len() <= 256;
    if ok {
        Ok(())
    } else {
        Err(format!("--cors-origin must be `*` or an origin like https://example.com (scheme and host, no path), got `{origin}`"))
    }
}

pub(crate) async fn cors(State(origins): State<Arc<Vec<String>>>, req: Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_string);
    let allow = origin.as_deref().and_then(|o| allowed(&origins, o));
    let preflight =
        req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = match (&allow, preflight) {
        (Some(_), true) => {
            let mut r = StatusCode::NO_CONTENT.into_response();
            let h = r.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
            r
        }
        _ => next.run(req).await,
    };
    if let Some(v) = allow {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_exactly_or_by_wildcard() {
        let list = vec!["https://a.example".to_string()];
        assert_eq!(allowed(&list, "https://a.example").unwrap(), "https://a.example");
        assert!(allowed(&list, "https://b.example").is_none());
        assert!(allowed(&list, "https://a.example.evil").is_none());
        assert_eq!(allowed(&["*".to_string()], "http://x").unwrap(), "*");
        assert!(check_origin("https://a.example").is_ok());
        assert!(check_origin("*").is_ok());
        assert!(check_origin("a.example").is_err());
        assert!(check_origin("https://a.example/").is_err());
    }
}
