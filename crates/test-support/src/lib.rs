//! Helpers for the workspace's tests (a dev-dependency only; no library source uses it):
//! - [`hub`]: a fake Hugging Face hub on 127.0.0.1 serving one repo (listing, `resolve/` HEAD/GET, LFS redirects
//!   to a CDN path, the hub's error codes, injected faults), logging every request;
//! - [`http`]: a minimal blocking HTTP/1.1 client over `std::net::TcpStream` (Content-Length, chunked and
//!   read-to-close bodies, body lines and SSE events), so server tests need no HTTP client dependency;
//! - [`shared_data`] / [`shared_file`]: the real data files CI lays in `../shared/data` beside the checkout.
//!
//! Helpers panic with a message naming what failed: they run inside tests only.

pub mod http;
pub mod hub;
mod shared;

pub use shared::{shared_data, shared_file, workspace_root};
