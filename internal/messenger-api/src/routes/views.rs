//! Request and response bodies, named by direction and converted with `From`. The bodies the
//! Job Scheduler also speaks live in [`herald_core::worker`] and [`herald_core::message`].

use chrono::{DateTime, Utc};
pub use herald_core::message::MessageView;
use herald_core::worker::ClaimedMessage;
use poem_openapi::Object;

use crate::domain::{AttemptKind, Draft, MessageDoc, MessageStatus};

fn utc(at: bson::DateTime) -> DateTime<Utc> {
    at.to_chrono()
}

/// A message to create.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct NewMessage {
    /// Recipient, E.164: `+` then 8 to 15 digits (e.g. `+905551111111`).
    pub to: String,
    /// Text, 1..=`message.max_chars` Unicode characters after trimming.
    pub content: String,
    /// Not sent before this time (RFC 3339; at most `message.max_schedule_days` ahead; a past
    /// time means now).
    #[oai(nullable)]
    pub send_at: Option<DateTime<Utc>>,
    /// Never sent after this time (RFC 3339, after now and after `sendAt`): a message still
    /// unsent when it comes due past it becomes `expired`.
    #[oai(nullable)]
    pub expires_at: Option<DateTime<Utc>>,
    /// Send only through this provider (a `[[providers]]` name), whatever its route.
    #[oai(nullable)]
    pub provider: Option<String>,
    /// Where to POST its status callbacks (`message.sent`, `.failed`, `.expired`, `.delivered`,
    /// `.undelivered`, `.read`): `https`, or `http` on a host in `callbacks.allowed_hosts`; a
    /// private or loopback address only when its host is listed. Default:
    /// `callbacks.default_url`.
    #[oai(nullable)]
    pub callback_url: Option<String>,
}

impl NewMessage {
    /// The draft the service validates.
    pub fn draft(&self) -> Draft<'_> {
        Draft {
            to: &self.to,
            content: &self.content,
            send_at: self.send_at,
            expires_at: self.expires_at,
            provider: self.provider.as_deref(),
            callback_url: self.callback_url.as_deref(),
        }
    }
}

/// Several messages to create, all or none.
#[derive(Debug, Clone, Object)]
pub struct NewBatch {
    /// 1 to 1,000 messages.
    pub messages: Vec<NewMessage>,
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
            send_at: m.send_at.map(utc),
            expires_at: m.expires_at.map(utc),
            idempotency_key: m.idempotency_key,
            provider: m.provider,
            attempts_log: m.attempts_log.into_iter().map(Into::into).collect(),
            waiting_for_provider: m.waiting_for_provider,
            delivery: m.delivery.map(Into::into),
            receipts: m.receipts.into_iter().map(Into::into).collect(),
            callback_url: m.callback_url,
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
            expires_at: m.expires_at.map(utc),
            last_provider: m
                .attempts_log
                .last()
                .filter(|a| a.kind != AttemptKind::Accepted)
                .map(|a| a.provider.clone()),
            provider: m.provider,
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
    /// Came due after their `expiresAt`; never sent.
    pub expired: u64,
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
    /// Whether `counts` are known exact. False for a while after start on a collection written
    /// without them (a large import, an older version): they are served as kept meanwhile, and
    /// the start-up reconciliation corrects and marks them.
    pub counts_exact: bool,
    /// How long the oldest due pending message has waited, in seconds (delivery lag).
    pub oldest_due_age_seconds: f64,
    /// Messages sent in each of the last 60 minutes, oldest first (empty while Redis is down).
    pub sent_per_minute: Vec<MinuteCount>,
    /// Sum of `sentPerMinute`.
    pub sent_last_hour: u64,
    /// The sending job (absent before any scheduler has started).
    #[oai(nullable)]
    pub job: Option<herald_core::jobs::JobStatus>,
    /// Every configured provider: its state and its requests since `providerWindowStart`.
    pub providers: Vec<ProviderStatsView>,
    /// Start of the providers' window: the start of the previous clock hour.
    pub provider_window_start: DateTime<Utc>,
    /// Pending messages waiting because every provider they may go to is paused (counted up to
    /// 10,000).
    pub waiting_for_provider: u64,
    /// Admission control: `maxDueBacklog`, the backlog it is held to, creates refused.
    pub admission: crate::service::AdmissionReport,
    /// When the snapshot was taken.
    pub generated_at: DateTime<Utc>,
}

/// The last failed request to a provider.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct ProviderFailureView {
    /// When.
    pub at: DateTime<Utc>,
    /// What came of it: retryable, permanent or misconfigured.
    pub kind: herald_core::worker::AttemptKind,
    /// The provider's HTTP status, when it answered.
    #[oai(nullable)]
    pub status: Option<u16>,
}

/// One provider in the stats.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct ProviderStatsView {
    /// Its name, state and pause.
    #[oai(flatten)]
    pub status: herald_core::jobs::ProviderStatus,
    /// Requests it accepted in the window.
    pub sent: u64,
    /// Requests that failed in the window (retryable, permanent or misconfigured).
    pub failed: u64,
    /// Median request latency in the window, in milliseconds (the upper bound of its bucket).
    #[oai(nullable)]
    pub p50_ms: Option<u64>,
    /// 99th percentile request latency in the window, in milliseconds (the same way).
    #[oai(nullable)]
    pub p99_ms: Option<u64>,
    /// The last failed request in the window.
    #[oai(nullable)]
    pub last_failure: Option<ProviderFailureView>,
    /// Final receipts in the window that said delivered.
    pub delivered: u64,
    /// Final receipts in the window that said undelivered or failed.
    pub undelivered: u64,
    /// Receipts in the window that said read.
    pub read: u64,
    /// `delivered / (delivered + undelivered)` in the window (absent before any final receipt).
    #[oai(nullable)]
    pub delivered_rate: Option<f64>,
    /// Median time from a send to its final receipt in the window, in milliseconds (the upper
    /// bound of its bucket: 1 s, 5 s, 15 s, 1 min, 5 min, 15 min, 1 h, 6 h, 24 h).
    #[oai(nullable)]
    pub receipt_p50_ms: Option<u64>,
    /// 99th percentile of the same.
    #[oai(nullable)]
    pub receipt_p99_ms: Option<u64>,
}

impl From<crate::service::ProviderReport> for ProviderStatsView {
    fn from(report: crate::service::ProviderReport) -> Self {
        let window = report.window;
        Self {
            status: report.status,
            sent: window.accepted,
            failed: window.failed,
            p50_ms: window.p50_ms,
            p99_ms: window.p99_ms,
            last_failure: window
                .last_failure
                .map(|(at, kind, status)| ProviderFailureView { at, kind, status }),
            delivered: window.delivered,
            undelivered: window.undelivered,
            read: window.read,
            delivered_rate: (window.delivered + window.undelivered > 0)
                .then(|| window.delivered as f64 / (window.delivered + window.undelivered) as f64),
            receipt_p50_ms: window.receipt_p50_ms,
            receipt_p99_ms: window.receipt_p99_ms,
        }
    }
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
                MessageStatus::Expired => counts.expired = n,
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
            counts_exact: stats.counts_exact,
            oldest_due_age_seconds: stats.oldest_due_age_seconds,
            sent_last_hour: sent_per_minute.iter().map(|m| m.sent).sum(),
            sent_per_minute,
            job: stats.job,
            providers: stats.providers.into_iter().map(Into::into).collect(),
            provider_window_start: stats.provider_window_start,
            waiting_for_provider: stats.waiting_for_provider,
            admission: stats.admission,
            generated_at: Utc::now(),
        }
    }
}

/// Which failed messages to re-queue.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct RequeueFilterBody {
    /// Only `failed` messages can be re-queued.
    pub status: MessageStatus,
    /// Created at or after this time (RFC 3339).
    #[oai(nullable)]
    pub created_from: Option<DateTime<Utc>>,
    /// Created at or before this time (RFC 3339).
    #[oai(nullable)]
    pub created_to: Option<DateTime<Utc>>,
    /// Only messages to this number (E.164).
    #[oai(nullable)]
    pub to: Option<String>,
}

/// A bulk re-queue.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct RequeueRequest {
    /// Which messages.
    pub filter: RequeueFilterBody,
    /// Count only; change nothing (default false).
    #[oai(default)]
    pub dry_run: bool,
}

/// What a bulk re-queue did.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct RequeueResult {
    /// Failed messages matching the filter when the call began.
    pub matched: u64,
    /// Re-queued by this call (0 on a dry run; at most 1,000 per call).
    pub requeued: u64,
    /// Still matching after this call: call again to re-queue them.
    pub remaining: u64,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

impl From<RequeueFilterBody> for crate::service::RequeueFilter {
    fn from(f: RequeueFilterBody) -> Self {
        Self {
            status: f.status,
            created_from: f.created_from,
            created_to: f.created_to,
            to: f.to,
        }
    }
}
