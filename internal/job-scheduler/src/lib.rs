//! The Job Scheduler: the sending job, its start/stop surface and its run history.
//!
//! - [`job`]: [`job::SendingJob::run_once`] — one run: claim through the Messenger API, send
//!   to the provider (at most `concurrency` at once), commit or fail each. Tests call it
//!   directly; tokio-cron-scheduler only decides *when*.
//!   What tokio-cron-scheduler lacks is added here: no overlap (a try-lock per replica, held
//!   for the whole run) and a pause (the persisted `working` flag, read at every run).
//! - [`cron`]: the schedule — it only decides *when* to call back.
//! - [`control`]: the service the routes call — start, stop (waiting for runs in flight on every
//!   replica), status, run history, readiness — and the tracked trigger that starts runs, so
//!   shutdown drains them (a task tracker and a cancellation token).
//! - [`provider`]: the provider pause every replica shares (Retry-After, failure streaks, one
//!   probe to resume), kept in MongoDB.
//! - [`limiter`]: the send rate every replica shares, a GCRA in one Redis script, with an
//!   in-process share of it while Redis is away.
//! - [`messenger_client`]: the Messenger API's worker contract over HTTP.
//! - [`store`]: `job_state` (one document per job) and `job_runs` (TTL-indexed history).
//! - [`routes`]: start, stop, is-working, run history, probes.
//! - [`startup::Application`] wires it all to a bound port.

#![forbid(unsafe_code)]

pub mod control;
pub mod job;
pub mod limiter;
pub mod messenger_client;
pub mod metrics;
pub mod provider;
pub mod routes;
pub mod schedule;
pub mod startup;
pub mod store;

pub use startup::{openapi_json, Application};
