//! The Job Scheduler: the sending job, its start/stop surface and its run history.
//!
//! - [`job`]: [`job::SendingJob::run_once`] — one run: claim through the Messenger API, send
//!   to the provider (at most `concurrency` at once), commit or fail each. Tests call it
//!   directly; tokio-cron-scheduler only decides *when*.
//! - [`cron`]: the schedule, with what tokio-cron-scheduler lacks added on top — no overlap
//!   (a try-lock per replica), a pause (the persisted `working` flag read at every run) and a
//!   drain on shutdown (a task tracker and a cancellation token).
//! - [`messenger_client`]: the Messenger API's worker protocol over HTTP.
//! - [`store`]: `job_state` (one document per job) and `job_runs` (TTL-indexed history).
//! - [`routes`]: start, stop, is-working, run history, probes.
//! - [`startup::Application`] wires it all to a bound port.

#![forbid(unsafe_code)]

pub mod control;
pub mod cron;
pub mod job;
pub mod messenger_client;
pub mod metrics;
pub mod routes;
pub mod startup;
pub mod store;

pub use startup::{openapi_json, Application};
