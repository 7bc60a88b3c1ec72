//! Request and response bodies, named by direction and converted with `From`.

use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object};

use crate::domain::{LastError, MessageDoc, MessageStatus};
use crate::store::Page;

fn utc(at: bson::DateTime) -> DateTime<Utc> {
    at.to_chrono()
}

/// A message to create.
#[derive(Debug, Clone, Object)]
pub struct NewMessage {
    /// Recipient, E.164: `+` then 8 to 15 digits (e.g. `+905551111111`).
    pub to: String,
    /// Text, 1..=`message.max_chars` Unicode characters after trimming.
    pub content: String,
}

/// Several messages to create, all or none.
#[derive(Debug, Clone, Object)]
pub struct NewBatch {
    /// 1 to 1,000 messages.
    pub messages: Vec<NewMessage>,
}

/// The last failed attempt.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct LastErrorView {
    /// `timeout`, `connection`, `http_status` or `invalid_response`.
    pub kind: String,
    /// Provider HTTP status, when it answered.
    pub status: Option<i32>,
    /// Detail or the first 4 KiB of the provider's body.
    pub detail: String,
    /// When it was recorded.
    pub at: DateTime<Utc>,
}

impl From<LastError> for LastErrorView {
    fn from(e: LastError) -> Self {
        Self {
            kind: e.kind,
            status: e.status,
            detail: e.detail,
            at: utc(e.at),
        }
    }
}

/// A message with its delivery state.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct MessageView {
    /// 24-hex id.
    pub id: String,
    /// Recipient.
    pub to: String,
    /// Text.
    pub content: String,
    /// `pending`, `processing`, `sent` or `failed`.
    pub status: MessageStatus,
    /// Delivery attempts made.
    pub attempts: i32,
    /// When a pending message is due (while processing: when its lease ends).
    pub next_attempt_at: DateTime<Utc>,
    /// Worker holding (or that last held) the claim.
    pub claimed_by: Option<String>,
    /// End of the current claim.
    pub lease_until: Option<DateTime<Utc>>,
    /// The provider's `messageId`.
    pub webhook_message_id: Option<String>,
    /// When the provider accepted it.
    pub sent_at: Option<DateTime<Utc>>,
    /// The last failed attempt.
    pub last_error: Option<LastErrorView>,
    /// The client's idempotency key, if given.
    pub idempotency_key: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl From<MessageDoc> for MessageView {
    fn from(m: MessageDoc) -> Self {
        Self {
            id: m.id.to_hex(),
            to: m.to,
            content: m.content,
            status: m.status,
            attempts: m.attempts,
            next_attempt_at: utc(m.next_attempt_at),
            claimed_by: m.claimed_by,
            lease_until: m.lease_until.map(utc),
            webhook_message_id: m.webhook_message_id,
            sent_at: m.sent_at.map(utc),
            last_error: m.last_error.map(Into::into),
            idempotency_key: m.idempotency_key,
            created_at: utc(m.created_at),
            updated_at: utc(m.updated_at),
        }
    }
}

/// Messages created by a batch.
#[derive(Debug, Clone, Object)]
pub struct BatchCreated {
    /// In the order given.
    pub items: Vec<MessageView>,
}

/// One page of messages.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct MessagePage {
    /// The messages.
    pub items: Vec<MessageView>,
    /// Page size asked for.
    pub limit: i64,
    /// Offset of this page (offset pagination only).
    pub offset: Option<i64>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
    /// Matching messages in all (offset pagination only).
    pub total: Option<u64>,
}

impl MessagePage {
    /// Builds the page body.
    pub fn new(page: Page, limit: i64, offset: Option<i64>) -> Self {
        let next_cursor = if page.has_more {
            page.items.last().map(|m| m.id.to_hex())
        } else {
            None
        };
        Self {
            items: page.items.into_iter().map(Into::into).collect(),
            limit,
            offset,
            next_cursor,
            total: page.total,
        }
    }
}

/// A claim request.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct ClaimRequest {
    /// The claiming worker's id (recorded as `claimed_by`).
    pub worker: String,
    /// How many to claim, 1..=500 (default 2).
    pub limit: Option<u32>,
    /// How long the claim is held, 1..=3600 seconds (default `job_scheduler.lease_seconds`).
    pub lease_seconds: Option<u64>,
}

/// A claimed message: what a worker needs to send and commit it.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
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
}

impl From<MessageDoc> for ClaimedMessage {
    fn from(m: MessageDoc) -> Self {
        Self {
            id: m.id.to_hex(),
            to: m.to,
            content: m.content,
            claim_token: m.claim_token.unwrap_or_default(),
            attempt: m.attempts,
            lease_until: utc(m.lease_until.unwrap_or(m.next_attempt_at)),
        }
    }
}

/// Commit of an accepted send.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct CommitRequest {
    /// The token from get-two.
    pub claim_token: String,
    /// The provider's `messageId`, when it gave one.
    pub webhook_message_id: Option<String>,
    /// When the provider accepted it (default: now).
    pub sent_at: Option<DateTime<Utc>>,
}

/// The committed message and whether its Redis entry was written.
#[derive(Debug, Clone, Object)]
pub struct CommitView {
    /// The message, now `sent`.
    #[oai(flatten)]
    pub message: MessageView,
    /// False when Redis was unreachable (the commit still stands).
    pub cached: bool,
}

/// Failure kinds (stable set).
#[derive(Debug, Clone, Copy, Enum)]
#[oai(rename_all = "snake_case")]
pub enum FailureKindInput {
    /// No answer in time.
    Timeout,
    /// No connection.
    Connection,
    /// A non-success status.
    HttpStatus,
    /// An answer that could not be understood.
    InvalidResponse,
}

impl FailureKindInput {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::HttpStatus => "http_status",
            Self::InvalidResponse => "invalid_response",
        }
    }
}

/// What went wrong with an attempt.
#[derive(Debug, Clone, Object)]
pub struct DeliveryErrorInput {
    /// The kind.
    pub kind: FailureKindInput,
    /// Provider HTTP status, when it answered.
    pub status: Option<u16>,
    /// Detail or body excerpt (cut to 4 KiB).
    pub detail: String,
}

/// A failed attempt.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct FailRequest {
    /// The token from get-two.
    pub claim_token: String,
    /// What went wrong.
    pub error: DeliveryErrorInput,
    /// True: retry per the schedule; false: mark failed.
    pub retryable: bool,
    /// Not before this many seconds (the provider's Retry-After; capped).
    pub retry_after_seconds: Option<u64>,
}

/// Giving back an unsent claim.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct ReleaseRequest {
    /// The token from get-two.
    pub claim_token: String,
}

/// Messages per status.
#[derive(Debug, Clone, Default, Object)]
pub struct StatusCounts {
    /// Waiting to be due or to be claimed.
    pub pending: u64,
    /// Claimed by a worker.
    pub processing: u64,
    /// Accepted by the provider.
    pub sent: u64,
    /// Failed for good (until an operator re-queues them).
    pub failed: u64,
    /// All of them.
    pub total: u64,
}

/// Messages sent in one minute.
#[derive(Debug, Clone, Object)]
pub struct MinuteCount {
    /// Start of the minute.
    pub minute: DateTime<Utc>,
    /// Messages whose provider acceptance fell in it.
    pub sent: u64,
}

/// A snapshot of delivery.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct StatsView {
    /// Messages per status.
    pub counts: StatusCounts,
    /// How long the oldest due pending message has waited, in seconds (delivery lag).
    pub oldest_due_age_seconds: f64,
    /// Messages sent in each of the last 60 minutes, oldest first (empty while Redis is down).
    pub sent_per_minute: Vec<MinuteCount>,
    /// Sum of `sentPerMinute`.
    pub sent_last_hour: u64,
    /// The sending job (absent before any scheduler has started).
    pub job: Option<herald_core::jobs::JobStatus>,
    /// When the snapshot was taken.
    pub generated_at: DateTime<Utc>,
}

impl From<crate::service::Stats> for StatsView {
    fn from(stats: crate::service::Stats) -> Self {
        let mut counts = StatusCounts::default();
        for (status, n) in stats.counts {
            match status {
                MessageStatus::Pending => counts.pending = n,
                MessageStatus::Processing => counts.processing = n,
                MessageStatus::Sent => counts.sent = n,
                MessageStatus::Failed => counts.failed = n,
            }
            counts.total += n;
        }
        let minutes = stats.sent_per_minute.len() as i64;
        let sent_per_minute: Vec<MinuteCount> = stats
            .sent_per_minute
            .iter()
            .enumerate()
            .map(|(i, &sent)| MinuteCount {
                minute: stats.last_minute - chrono::Duration::minutes(minutes - 1 - i as i64),
                sent,
            })
            .collect();
        Self {
            counts,
            oldest_due_age_seconds: stats.oldest_due_age_seconds,
            sent_last_hour: sent_per_minute.iter().map(|m| m.sent).sum(),
            sent_per_minute,
            job: stats.job,
            generated_at: Utc::now(),
        }
    }
}
