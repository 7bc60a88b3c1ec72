//! What both Herald services share.
//!
//! - [`settings`]: the typed configuration of every role, loaded in layers and validated once.
//! - [`errors`]: the catalogue of 6-digit internal codes (`configs/errors.toml`) and the one
//!   JSON error body every failure answers with.
//! - [`auth`]: bearer API keys, compared in constant time.
//! - [`doctor`]: `herald doctor`'s checks of what a deployment points at.
//! - [`http`]: binding (port 0 = any free port), the middleware stack every server wears,
//!   graceful serving, and the `/metrics` endpoint.
//! - [`probes`]: health and readiness bodies and the MongoDB ping.
//! - [`mongo`]: connecting to MongoDB with bounded waits; the store error both services map.
//! - [`redis_conn`]: a lazily connecting Redis connection with bounded waits.
//! - [`pagination`]: `limit`/`offset`/`after` page requests and the page they answer with.
//! - [`message`]: a message's status, failure kind and public view.
//! - [`worker`]: the worker contract between the Job Scheduler and the Messenger API.
//! - [`peer`]: one service calling the other, with the key and the correlation id.
//! - [`jobs`]: the sending job's state as both services speak of it.
//! - [`providers`]: the providers and routes in effect, and the order a message tries them.
//! - `testing` (feature `testing`): settings, the key and seeding for integration tests, and
//!   the one `ProcessStack` of real `herald` processes for the CLI tests, chaos and benches.

#![forbid(unsafe_code)]

pub mod apidoc;
pub mod audit;
pub mod auth;
pub mod callbacks;
pub mod doctor;
pub mod errors;
pub mod gcra;
pub mod http;
pub mod jobs;
pub mod message;
pub mod mongo;
pub mod pagination;
pub mod peer;
pub mod probes;
pub mod providers;
pub mod receipts;
pub mod redis_conn;
pub mod settings;
#[cfg(feature = "testing")]
pub mod testing;
pub mod worker;

pub use errors::{ApiError, ErrorBody, ErrorCode};
pub use settings::Settings;

/// `herald/<version>`, sent as `User-Agent` on every outgoing request.
pub const USER_AGENT: &str = concat!("herald/", env!("CARGO_PKG_VERSION"));
