//! Errors of the store and service layers. The HTTP mapping happens once, in `routes`.

use herald_core::{ApiError, ErrorCode};

pub use herald_core::mongo::StoreError;

/// What the service can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Input broke a rule.
    #[error("{message}")]
    Invalid {
        /// Which rule.
        code: ErrorCode,
        /// What to fix.
        message: String,
    },
    /// No such message.
    #[error("message not found")]
    NotFound,
    /// Same idempotency key, other body.
    #[error("idempotency key reused with a different body")]
    IdempotencyConflict,
    /// The caller's claim is gone.
    #[error("the claim is no longer held")]
    ClaimLost,
    /// Retry of a message that is not failed.
    #[error("only a failed message can be retried; this one is {0}")]
    NotFailed(&'static str),
    /// The Job Scheduler said no (already in that state).
    #[error("{message}")]
    JobConflict {
        /// 409004 or 409005.
        code: ErrorCode,
        /// The scheduler's message.
        message: String,
    },
    /// The Job Scheduler could not be reached or answered oddly.
    #[error("the job scheduler could not be reached")]
    SchedulerUnreachable(#[from] herald_core::peer::PeerError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServiceError {
    /// A validation failure.
    pub fn invalid(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Invalid {
            code,
            message: message.into(),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::Invalid { code, message } => ApiError::new(code, message),
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
            ServiceError::Store(error) => error.into(),
        }
    }
}
