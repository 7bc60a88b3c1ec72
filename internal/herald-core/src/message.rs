//! A message as both services see it: its status, its last failure and its public view.

use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object};
use serde::{Deserialize, Serialize};

/// The stable set of failure kinds (the webhook client's classification, kept typed from the
/// provider's answer to the stored message).
pub use webhook_client::FailureKind;

/// Where a message is in its life. Stored, filtered and answered as the lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Enum)]
#[serde(rename_all = "lowercase")]
#[oai(rename_all = "lowercase")]
pub enum MessageStatus {
    /// Waiting until `next_attempt_at`.
    Pending,
    /// Claimed by a worker until `lease_until`.
    Processing,
    /// Accepted by the provider. Final.
    Sent,
    /// Permanently failed or out of retries; only an operator can re-queue it.
    Failed,
    /// Came due after its `expiresAt`, so it was never sent (again). Final.
    Expired,
}

impl MessageStatus {
    /// Every status, in the order of a message's life.
    pub const ALL: [MessageStatus; 5] = [Self::Pending, Self::Processing, Self::Sent, Self::Failed, Self::Expired];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Sent => "sent",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }

    /// Whether a message in this status is done for good (no worker will touch it again).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Sent | Self::Failed | Self::Expired)
    }

    /// Reads a stored name or a status filter.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// The last failed attempt.
#[derive(Debug, Clone, PartialEq, Object, Serialize, Deserialize)]
pub struct LastErrorView {
    /// How it failed.
    pub kind: FailureKind,
    /// Provider HTTP status, when it answered.
    #[oai(nullable)]
    pub status: Option<i32>,
    /// Detail or the first 4 KiB of the provider's body.
    pub detail: String,
    /// When it was recorded.
    pub at: DateTime<Utc>,
}

/// A message with its delivery state.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct MessageView {
    /// 24-hex id.
    pub id: String,
    /// Recipient.
    pub to: String,
    /// Text.
    pub content: String,
    /// `pending`, `processing`, `sent`, `failed` or `expired`.
    pub status: MessageStatus,
    /// Delivery attempts made.
    pub attempts: i32,
    /// When a pending message is due (while processing: when its lease ends).
    pub next_attempt_at: DateTime<Utc>,
    /// Worker holding (or that last held) the claim.
    #[oai(nullable)]
    pub claimed_by: Option<String>,
    /// End of the current claim.
    #[oai(nullable)]
    pub lease_until: Option<DateTime<Utc>>,
    /// The provider's `messageId`.
    #[oai(nullable)]
    pub webhook_message_id: Option<String>,
    /// When the provider accepted it.
    #[oai(nullable)]
    pub sent_at: Option<DateTime<Utc>>,
    /// The last failed attempt.
    #[oai(nullable)]
    pub last_error: Option<LastErrorView>,
    /// Not sent before this time (absent: due when created).
    #[oai(nullable)]
    pub send_at: Option<DateTime<Utc>>,
    /// Never sent after this time: a message due past it becomes `expired`.
    #[oai(nullable)]
    pub expires_at: Option<DateTime<Utc>>,
    /// The client's idempotency key, if given.
    #[oai(nullable)]
    pub idempotency_key: Option<String>,
    /// The provider it is pinned to (while unsent), or the provider that accepted it (sent).
    #[oai(nullable)]
    pub provider: Option<String>,
    /// Its last 10 requests to providers, oldest first.
    pub attempts_log: Vec<AttemptRecord>,
    /// Every provider of its route is paused: it waits for one (see the stats).
    pub waiting_for_provider: bool,
    /// Whether it arrived, from the provider's receipts (absent until the first one); beside
    /// `status`, which stays `sent`.
    #[oai(nullable)]
    pub delivery: Option<DeliveryView>,
    /// The receipts that moved `delivery`, oldest first (the last 20).
    pub receipts: Vec<DeliveryView>,
    /// Where its status callbacks go (its own `callbackUrl`, or `callbacks.default_url` when it
    /// was created); see `GET /api/messenger/messages/{id}/callbacks`.
    #[oai(nullable)]
    #[serde(default)]
    pub callback_url: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A message's delivery as its provider reported it.
#[derive(Debug, Clone, PartialEq, Eq, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct DeliveryView {
    /// `sent` (on its way), `delivered`, `undelivered`, `failed`, `read`, or `unknown` (no final
    /// receipt in time).
    pub state: crate::receipts::DeliveryState,
    /// When Herald took the receipt.
    pub at: DateTime<Utc>,
    /// The provider's own word for it.
    pub provider_status: String,
    /// The provider's error code, if it gave one.
    #[oai(nullable)]
    pub error_code: Option<String>,
}

/// What came of one request to a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Serialize, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum AttemptKind {
    /// Accepted.
    Accepted,
    /// Failed; worth trying again (on the next provider).
    Retryable,
    /// Refused for good.
    Permanent,
    /// The provider refused Herald's credentials (401/403): it is paused as misconfigured and
    /// the message went on to the next provider.
    Misconfigured,
}

/// One request to a provider, as the message's `attemptsLog` keeps it (the last 10).
#[derive(Debug, Clone, PartialEq, Eq, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct AttemptRecord {
    /// When the request was made.
    pub at: DateTime<Utc>,
    /// Which provider (`[[providers]].name`).
    pub provider: String,
    /// What came of it.
    pub kind: AttemptKind,
    /// The provider's HTTP status, when it answered.
    #[oai(nullable)]
    #[serde(default)]
    pub status: Option<u16>,
    /// How long the request took, in milliseconds.
    pub latency_ms: u64,
}

/// How many attempts a message's log keeps.
pub const ATTEMPTS_LOG_LEN: usize = 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_back_what_they_store() {
        for status in MessageStatus::ALL {
            assert_eq!(MessageStatus::parse(status.as_str()), Some(status));
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        assert_eq!(MessageStatus::parse("Sent"), None);
    }

    #[test]
    fn failure_kinds_keep_their_stored_names() {
        assert_eq!(serde_json::to_value(FailureKind::HttpStatus).unwrap(), "http_status");
        assert_eq!(
            serde_json::from_value::<FailureKind>("invalid_response".into()).unwrap(),
            FailureKind::InvalidResponse
        );
    }
}
