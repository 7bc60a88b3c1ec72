//! HTTP operations of the Messenger API (poem-openapi). Each operation authorises, parses, calls
//! the service and maps its error once, to the catalogue.
//!
//! - [`messages`]: create, batch, list, sent list, get, operator retry.
//! - [`worker`]: `get-two` (claim), `commit`, `fail`, `release` — what the Job Scheduler calls.
//! - [`job`]: the start/stop toggle.
//! - [`live`]: the event stream (SSE and WebSocket), the stats and the run history.
//! - [`console`]: the operator console page and its embedded assets.
//! - [`probes`]: health and readiness.

pub mod console;
pub mod job;
pub mod live;
pub mod messages;
pub mod probes;
pub mod views;
pub mod worker;

use poem_openapi::Tags;

/// Operation groups in the OpenAPI document.
#[derive(Tags)]
pub enum ApiTags {
    /// Messages: create, list and inspect.
    Messages,
    /// The worker protocol: claim, commit, fail, release.
    Worker,
    /// Start and stop the sending job.
    Job,
    /// Live delivery status: events, stats, run history.
    Live,
    /// Liveness and readiness.
    Probes,
}

/// The correlation id of the current request, for calls to the other service.
pub(crate) fn correlation(req: &poem::Request) -> Option<String> {
    req.extensions()
        .get::<telemetry::CorrelationIdValue>()
        .map(|c| c.0.clone())
}
