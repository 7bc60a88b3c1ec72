//! HTTP operations of the Messenger API (poem-openapi). Each operation authorises, parses, calls
//! the service and maps its error once, to the catalogue.
//!
//! - [`messages`]: create, batch, list, sent list, get, operator retry.
//! - [`worker`]: `get-two` (claim) and the outcomes (`outcomes`; one at a time: `commit`,
//!   `fail`, `release`) — what the Job Scheduler calls.
//! - [`job`]: the start/stop toggle.
//! - [`audit`]: the audit trail of operator actions.
//! - [`receipts`]: delivery receipts from providers (signed by the provider, not a key).
//! - [`live`]: the event stream (SSE), the stats and the run history.
//! - [`socket`]: the same events over a WebSocket.
//! - [`console`]: the operator console page and its embedded assets.
//! - [`probes`]: health and readiness.

pub mod audit;
pub mod callbacks;
pub mod console;
pub mod job;
pub mod live;
pub mod messages;
pub mod probes;
pub mod receipts;
pub mod socket;
pub mod views;
pub mod worker;

use herald_core::{ApiError, ErrorCode};
use poem_openapi::Tags;

use crate::domain::ValidationError;
use crate::error::ServiceError;

/// Operation groups in the OpenAPI document.
#[derive(Tags)]
pub enum ApiTags {
    /// Messages: create, list and inspect.
    Messages,
    /// The worker protocol: claim, then report outcomes.
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

/// The one place a service error becomes an HTTP answer with its catalogue code; 5xx bodies
/// stay opaque and the cause goes to the log.
impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::Invalid(invalid) => invalid.into(),
            ServiceError::NotFound => ApiError::new(ErrorCode::MessageNotFound, "No message has this id."),
            ServiceError::IdempotencyConflict => ApiError::new(
                ErrorCode::IdempotencyConflict,
                "This Idempotency-Key was already used with a different body.",
            ),
            ServiceError::ClaimLost => ApiError::new(
                ErrorCode::ClaimLost,
                "The claim is no longer held: the lease expired and the message was claimed again, or it moved on.",
            ),
            ServiceError::NotFailed(status) => ApiError::new(
                ErrorCode::NotFailed,
                format!("Only a failed message can be retried; this one is {status}."),
            ),
            ServiceError::JobConflict { code, message } => ApiError::new(code, message),
            ServiceError::SchedulerUnreachable(cause) => {
                tracing::warn!(cause = %telemetry::Chain(&cause), "job scheduler unreachable");
                ApiError::new(
                    ErrorCode::JobSchedulerUnreachable,
                    "The Job Scheduler could not be reached.",
                )
            }
            ServiceError::Overloaded {
                backlog,
                limit,
                retry_after_seconds,
            } => ApiError::new(
                ErrorCode::BacklogFull,
                format!(
                    "{backlog} messages wait to be sent, over the limit of {limit} (messenger_api.max_due_backlog): nothing was stored; retry later."
                ),
            )
            .retry_after(retry_after_seconds),
            ServiceError::KeyRateLimited {
                key,
                retry_after_seconds,
            } => ApiError::new(
                ErrorCode::KeyRateLimited,
                format!("The key {key:?} is over its create rate (rate_per_second): nothing was stored; retry later."),
            )
            .retry_after(retry_after_seconds),
            ServiceError::ReceiptProviderUnknown(provider) => ApiError::new(
                ErrorCode::ReceiptProviderUnknown,
                format!("No provider named {provider:?} takes receipts ([providers.receipts])."),
            ),
            ServiceError::ReceiptUnauthorized(provider) => ApiError::new(
                ErrorCode::ReceiptUnauthorized,
                format!("The receipt is not signed by provider {provider:?}: nothing was changed."),
            ),
            ServiceError::ReceiptsBusy => ApiError::new(
                ErrorCode::ReceiptsBusy,
                "Too many delivery receipts are being applied at once: nothing was changed; send it again.",
            )
            .retry_after(1),
            ServiceError::Store(error) => error.into(),
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        ApiError::new(error.code, error.message)
    }
}
