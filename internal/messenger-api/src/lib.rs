//! The Messenger API: owns the `messages` collection.
//!
//! # Layout
//!
//! Three layers, one way down, each with one file per step of a message's life:
//! - `routes`: poem-openapi operations — `messages`, `worker`, `job`, `live`, `socket`,
//!   `console`, `probes`, and the `views` they answer; they parse, authorise, and map a
//!   service error to the catalogue once.
//! - [`service`]: the rules — `messages` (create, list), `worker` (claim, outcomes),
//!   `requeue`, `retry_policy`, `job` (the toggle, through the Job Scheduler), `monitor`
//!   (stats, readiness) and `upkeep` (reconciliation, cache repair, retention).
//! - [`store`]: the repository over `messages`, the only place BSON is written — `insert`,
//!   `list` (through `window`), `claim`, `writes`, `requeue`, `counts`, `upkeep`, `job_view`.
//!
//! Beside them: [`domain`] (the message document and its validation), [`cache`] (the Redis
//! sent-message cache, never the source of truth), `events` (the live feed from the change
//! stream), [`metrics`], `error` and [`startup::Application`], which wires it all to a port.
//!
//! # The walk of one message
//!
//! 1. Created: `routes/messages.rs` → `service/messages.rs` → `store/insert.rs`.
//! 2. Claimed by a scheduler's run (`job/mod.rs` there): `routes/worker.rs` →
//!    `service/worker.rs` → `store/claim.rs`.
//! 3. Sent to the provider by the scheduler (`job/deliver.rs` there).
//! 4. Its outcome reported (`job/report.rs` there): `routes/worker.rs` → `service/worker.rs`
//!    → `store/writes.rs` → `cache.rs` (the `sent:<id>` entry).
//!
//! [`openapi_json`] renders the OpenAPI document.

#![forbid(unsafe_code)]

pub mod cache;
pub mod domain;
mod error;
mod events;
pub mod metrics;
mod routes;
pub mod service;
mod startup;
pub mod store;

pub use startup::{openapi_json, Application};
