//! The Job Scheduler: the sending job, its start/stop surface and its run history.
//!
//! # Layout
//!
//! - [`job`]: [`job::SendingJob::run_once`] — one run, which tests call directly: `job/mod.rs`
//!   claims through the Messenger API (and in drain mode goes on batch after batch),
//!   `job/budget.rs` says how long a claim leaves to send, `job/deliver.rs` sends one message
//!   through the provider pause and the rate limit, `job/report.rs` reports the outcomes.
//! - `schedule`: *when* runs start — the cron tick, a Start, the drain-mode idle poll — on a
//!   tracked trigger, so shutdown waits for them. What tokio-cron-scheduler lacks is added
//!   here and in the run: no overlap (a try-lock per replica, held for the whole run) and a
//!   pause (the persisted `working` flag, read at every run).
//! - [`control`]: the service the routes call — start, stop (waiting for runs in flight on every
//!   replica), status, run history, readiness.
//! - `lanes`: one lane per configured provider (its client, pause and rate limit) and the
//!   routes that order the lanes a message may take.
//! - `provider`: the rules of a provider's pause every replica shares (Retry-After, failure
//!   streaks, 401/403 as misconfigured, one probe to resume).
//! - `limiter`: the send rate every replica shares, a GCRA in one Redis script, with an
//!   in-process share of it while Redis is away.
//! - `messenger_client`: the Messenger API's worker contract over HTTP.
//! - [`store`]: all the BSON — `job_state`, `job_runs` (TTL-indexed history) and
//!   `provider_state`.
//! - `routes`: start, stop, is-working, run history, probes.
//! - [`startup::Application`] wires it all to a bound port.
//!
//! # The walk of one message
//!
//! A run (`job/mod.rs`) claims a batch (the API's `routes/worker.rs` → `service/worker.rs` →
//! `store/claim.rs`), `job/deliver.rs` sends each message to the provider, and
//! `job/report.rs` reports what came of it (the API's `routes/worker.rs` →
//! `service/worker.rs` → `store/writes.rs` → `cache.rs`).

#![forbid(unsafe_code)]

pub mod callbacks;
pub mod control;
pub mod job;
mod lanes;
mod limiter;
mod messenger_client;
pub mod metrics;
mod provider;
mod routes;
mod schedule;
pub mod startup;
pub mod store;

pub use startup::{openapi_json, Application};
