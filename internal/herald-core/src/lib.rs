//! What both Herald services share.
//!
//! - [`settings`]: the typed configuration of every role, loaded in layers and validated once.
//! - [`errors`]: the catalogue of 6-digit internal codes (`configs/errors.toml`) and the one
//!   JSON error body every failure answers with.
//! - [`auth`]: bearer API keys, compared in constant time.
//! - [`http`]: binding (port 0 = any free port), the middleware stack every server wears,
//!   graceful serving, and the `/metrics` endpoint.
//! - [`probes`]: health and readiness bodies and the MongoDB ping.
//! - [`mongo`]: connecting to MongoDB with bounded waits.
//! - [`pagination`]: `limit`/`offset`/`after` page requests.
//! - [`jobs`]: the sending job's state as both services speak of it.
//! - [`testing`]: settings for integration tests.

#![forbid(unsafe_code)]

pub mod auth;
pub mod errors;
pub mod http;
pub mod jobs;
pub mod mongo;
pub mod pagination;
pub mod probes;
pub mod settings;
pub mod testing;

pub use errors::{ApiError, ErrorBody, ErrorCode};
pub use settings::Settings;

/// `herald/<version>`, sent as `User-Agent` on every outgoing request.
pub const USER_AGENT: &str = concat!("herald/", env!("CARGO_PKG_VERSION"));
