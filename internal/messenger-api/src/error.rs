//! Errors of the store and service layers. The HTTP mapping happens once, in [`crate::routes`].

use herald_core::ErrorCode;

use crate::domain::ValidationError;

pub use herald_core::mongo::StoreError;

/// What the service can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Input broke a rule.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
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
    /// Admission control refused a create: the backlog is over `messenger_api.max_due_backlog`.
    #[error("the backlog ({backlog}) is over its limit ({limit})")]
    Overloaded {
        /// Pending and processing messages as read.
        backlog: u64,
        /// The configured bound.
        limit: u64,
        /// What the client is told to wait.
        retry_after_seconds: u64,
    },
    /// The key made more creates than its `rate_per_second` allows.
    #[error("key {key} is over its create rate")]
    KeyRateLimited {
        /// The key's name.
        key: String,
        /// Until its next slot.
        retry_after_seconds: u64,
    },
    /// No provider of this name takes receipts.
    #[error("provider {0} takes no receipts")]
    ReceiptProviderUnknown(String),
    /// The receipt's signature is missing or wrong.
    #[error("the receipt of provider {0} is not signed by it")]
    ReceiptUnauthorized(String),
    /// More receipts in flight than `receipts.max_in_flight`.
    #[error("too many receipts in flight")]
    ReceiptsBusy,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServiceError {
    /// A validation failure.
    pub fn invalid(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Invalid(ValidationError::new(code, message))
    }
}
