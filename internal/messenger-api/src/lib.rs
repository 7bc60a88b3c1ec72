//! The Messenger API: owns the `messages` collection.
//!
//! Layers, one way down:
//! - [`routes`]: poem-openapi operations; they parse, authorise and map errors to the catalogue.
//! - [`service`]: the rules — validation, the state machine, retry policy, the commit-then-cache
//!   order, the toggle call to the Job Scheduler.
//! - [`store`]: the repository over `Collection<MessageDoc>`; BSON stays here. Claims are atomic
//!   per document.
//! - [`claimer`]: one claimer per process — concurrent claims served together, each reading a
//!   bounded window of the due index.
//! - [`counts`]: counts by status, maintained as messages change and reconciled periodically.
//! - [`cache`]: the Redis sent-message cache (a cache, never the source of truth) and the
//!   per-minute sent counters.
//! - [`events`]: the live event feed from the database's change stream.
//! - [`job_view`]: the sending job's state, read for the stats and the console.
//! - [`routes::console`]: the operator console, embedded in the binary.
//!
//! [`startup::Application`] wires them to a bound port; [`openapi_json`] renders the document.

#![forbid(unsafe_code)]

pub mod cache;
pub mod claimer;
pub mod counts;
pub mod domain;
pub mod error;
pub mod events;
pub mod job_view;
pub mod metrics;
pub mod routes;
pub mod scheduler_client;
pub mod service;
pub mod startup;
pub mod store;
pub mod window;

pub use startup::{openapi_json, Application};
