//! Request and response bodies, named by direction and converted with `From`. The bodies the
//! Job Scheduler also speaks live in [`herald_core::worker`] and [`herald_core::message`].

use chrono::{DateTime, Utc};
pub use herald_core::message::{LastErrorView, MessageView};
pub use herald_core::worker::{ClaimedMessage, CommitView};
use poem_openapi::Object;

use crate::domain::{LastError, MessageDoc, MessageStatus};

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
