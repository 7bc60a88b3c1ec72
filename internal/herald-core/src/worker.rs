//! The worker contract: what the Job Scheduler sends to the Messenger API and what it gets
//! back. Both sides use these types, so a renamed field breaks the build, not a run.

use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object, Union};
use serde::{Deserialize, Serialize};

pub use crate::message::{AttemptKind, AttemptRecord, ATTEMPTS_LOG_LEN};
use crate::message::{FailureKind, MessageStatus, MessageView};

/// Path of the claim operation.
pub const CLAIM_PATH: &str = "/api/messenger/get-two";

/// A claim request.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ClaimRequest {
    /// The claiming worker's id (recorded as `claimed_by`).
    pub worker: String,
    /// How many to claim, 1..=500 (default 2).
    #[oai(nullable)]
    pub limit: Option<u32>,
    /// How long the claim is held, 1..=3600 seconds (default `job_scheduler.lease_seconds`).
    #[oai(nullable)]
    pub lease_seconds: Option<u64>,
}

/// A claimed message: what a worker needs to send and commit it.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ClaimedMessage {
    /// 24-hex id; also the webhook's `Idempotency-Key`.
    pub id: String,
    /// Recipient.
    pub to: String,
    /// Text.
    pub content: String,
    /// Proof of the claim, required by commit, fail and release.
    pub claim_token: String,
    /// Which attempt this is (1 = first).
    pub attempt: i32,
    /// When the claim lapses and another worker may take the message.
    pub lease_until: DateTime<Utc>,
    /// Never send it after this time: report it `expired` instead.
    #[oai(nullable)]
    pub expires_at: Option<DateTime<Utc>>,
    /// The provider it is pinned to, when its creator chose one.
    #[oai(nullable)]
    #[serde(default)]
    pub provider: Option<String>,
    /// The provider of its last failed attempt: a retry goes to the next one of its route.
    #[oai(nullable)]
    #[serde(default)]
    pub last_provider: Option<String>,
}

impl ClaimedMessage {
    /// Whether it must no longer be sent at `now`.
    pub fn expired_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Commit of an accepted send: the body of `commit/{id}`, and a `sent` outcome beside its id.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct CommitRequest {
    /// The token from get-two.
    pub claim_token: String,
    /// The provider's `messageId`, when it gave one.
    #[oai(nullable)]
    pub webhook_message_id: Option<String>,
    /// When the provider accepted it (default: now).
    #[oai(nullable)]
    pub sent_at: Option<DateTime<Utc>>,
    /// The provider that accepted it.
    #[oai(nullable)]
    #[serde(default)]
    pub provider: Option<String>,
    /// Every request this claim made, in order (the accepted one last), for `attemptsLog`.
    #[oai(default)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptRecord>,
}

/// The committed message and whether its Redis entry was written.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
pub struct CommitView {
    /// The message, now `sent`.
    #[oai(flatten)]
    #[serde(flatten)]
    pub message: MessageView,
    /// False when Redis was unreachable (the commit still stands).
    pub cached: bool,
}

/// What went wrong with an attempt.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
pub struct DeliveryError {
    /// How it failed.
    pub kind: FailureKind,
    /// Provider HTTP status, when it answered.
    #[oai(nullable)]
    pub status: Option<u16>,
    /// Detail or body excerpt (cut to 4 KiB).
    pub detail: String,
}

/// A failed attempt: the body of `fail/{id}`, and a `failed` outcome beside its id.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct FailRequest {
    /// The token from get-two.
    pub claim_token: String,
    /// What went wrong.
    pub error: DeliveryError,
    /// True: retry per the schedule; false: mark failed.
    pub retryable: bool,
    /// Not before this many seconds (the provider's Retry-After; capped).
    #[oai(nullable)]
    pub retry_after_seconds: Option<u64>,
    /// Every request this claim made, in order, for `attemptsLog`.
    #[oai(default)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptRecord>,
}

/// The claim a message is held under: the body of `release/{id}`, and of a `released` or
/// `expired` outcome beside its id.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRequest {
    /// The token from get-two.
    pub claim_token: String,
    /// Released because every provider it may go to is paused: not due again for this many
    /// seconds (1..=3600), and counted as waiting for a provider until claimed again.
    #[oai(nullable)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_seconds: Option<u64>,
}

/// Path of the batched outcome report.
pub const OUTCOMES_PATH: &str = "/api/messenger/outcomes";

/// Most outcomes in one report.
pub const MAX_OUTCOMES: usize = 1000;

/// The provider accepted a claimed message.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
pub struct SentOutcome {
    /// The message id.
    pub id: String,
    /// The claim and what the provider answered.
    #[oai(flatten)]
    #[serde(flatten)]
    pub commit: CommitRequest,
}

/// An attempt at a claimed message failed.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
pub struct FailedOutcome {
    /// The message id.
    pub id: String,
    /// The claim and what went wrong.
    #[oai(flatten)]
    #[serde(flatten)]
    pub failure: FailRequest,
}

/// A claimed message given back unsent.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
pub struct ReleasedOutcome {
    /// The message id.
    pub id: String,
    /// The claim it gives back.
    #[oai(flatten)]
    #[serde(flatten)]
    pub claim: ReleaseRequest,
}

/// A claimed message whose `expiresAt` passed before it could be sent.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
pub struct ExpiredOutcome {
    /// The message id.
    pub id: String,
    /// The claim it reports under.
    #[oai(flatten)]
    #[serde(flatten)]
    pub claim: ReleaseRequest,
}

/// What became of one claimed message, told by its `outcome`.
#[derive(Debug, Clone, Union, Serialize, Deserialize)]
#[oai(discriminator_name = "outcome", one_of)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Accepted by the provider: commit it.
    #[oai(mapping = "sent")]
    Sent(SentOutcome),
    /// The attempt failed: retry later or fail for good.
    #[oai(mapping = "failed")]
    Failed(FailedOutcome),
    /// Never sent: give it back, the attempt not counted.
    #[oai(mapping = "released")]
    Released(ReleasedOutcome),
    /// Never sent because its `expiresAt` passed: mark it expired (final).
    #[oai(mapping = "expired")]
    Expired(ExpiredOutcome),
}

impl Outcome {
    /// The message the outcome is about.
    pub fn id(&self) -> &str {
        match self {
            Self::Sent(o) => &o.id,
            Self::Failed(o) => &o.id,
            Self::Released(o) => &o.id,
            Self::Expired(o) => &o.id,
        }
    }

    /// The claim it reports under.
    pub fn claim_token(&self) -> &str {
        match self {
            Self::Sent(o) => &o.commit.claim_token,
            Self::Failed(o) => &o.failure.claim_token,
            Self::Released(o) => &o.claim.claim_token,
            Self::Expired(o) => &o.claim.claim_token,
        }
    }

    /// The requests to providers it reports (none for a release or an expiry).
    pub fn attempts(&self) -> &[AttemptRecord] {
        match self {
            Self::Sent(o) => &o.commit.attempts,
            Self::Failed(o) => &o.failure.attempts,
            Self::Released(_) | Self::Expired(_) => &[],
        }
    }
}

/// Outcomes of many claimed messages, applied together.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
pub struct OutcomeBatch {
    /// 1 to 1,000 outcomes, at most one per message.
    pub items: Vec<Outcome>,
}

/// What the Messenger API made of one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Enum, Serialize, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum OutcomeResult {
    /// Marked sent by this report.
    Committed,
    /// Already sent under the same claim (a repeated report).
    AlreadyCommitted,
    /// Pending again, due after the retry delay.
    RetryScheduled,
    /// Failed for good (permanent, or out of retries).
    Failed,
    /// Pending again, due now.
    Released,
    /// Expired, never sent (reported so, or a retry would have come after `expiresAt`).
    Expired,
    /// The claim is no longer held: the lease expired and the message moved on.
    ClaimLost,
    /// No message has this id.
    NotFound,
    /// The id is not a 24-hex ObjectId.
    InvalidId,
}

/// One outcome's result.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
pub struct OutcomeReport {
    /// The message id, as given.
    pub id: String,
    /// What happened.
    pub result: OutcomeResult,
    /// The message's status after the report, when it exists.
    #[oai(nullable)]
    pub status: Option<MessageStatus>,
}

/// The result of every outcome, in the order given.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct OutcomeResults {
    /// One per outcome, in order.
    pub items: Vec<OutcomeReport>,
    /// False when Redis was unreachable for the commits (they still stand).
    pub cached: bool,
}

/// Path of the claim extension.
pub const EXTEND_PATH: &str = "/api/messenger/extend";

/// One claim its worker still holds: a message claimed and not yet reported.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct HeldClaim {
    /// The message id.
    pub id: String,
    /// The token its claim gave.
    pub claim_token: String,
}

/// Claims to keep for longer: the body of `extend`.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ExtendRequest {
    /// 1 to 1,000 claims, each message once.
    pub items: Vec<HeldClaim>,
    /// The new lease, from now: 1..=3600 seconds (default `job_scheduler.lease_seconds`). A
    /// lease is never shortened.
    #[oai(nullable)]
    #[serde(default)]
    pub lease_seconds: Option<u64>,
}

/// What an extension did.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ExtendResults {
    /// How many of the claims were still held, and now last until `leaseUntil` (or longer);
    /// the others had lapsed and moved on, or were already reported.
    pub extended: u64,
    /// The lease end the held claims were given.
    pub lease_until: DateTime<Utc>,
}
