//! Messages, their states and the rules for valid input.

use bson::oid::ObjectId;
use bson::DateTime;
use serde::{Deserialize, Serialize};

use crate::error::ServiceError;
pub use herald_core::message::{FailureKind, MessageStatus};
use herald_core::ErrorCode;

/// The state change a write made, stored as `last_transition` so the change feed can name the
/// event exactly (a released and a re-queued message are both `pending`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    /// Stored.
    Created,
    /// Claimed by a worker.
    Claimed,
    /// Accepted by the provider and committed.
    Sent,
    /// A retryable failure; pending again later.
    RetryScheduled,
    /// A permanent failure, or retries exhausted.
    Failed,
    /// Given back unsent by a worker.
    Released,
    /// Sent back to pending by an operator.
    Requeued,
}

impl Transition {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Claimed => "claimed",
            Self::Sent => "sent",
            Self::RetryScheduled => "retry_scheduled",
            Self::Failed => "failed",
            Self::Released => "released",
            Self::Requeued => "requeued",
        }
    }
}

/// The last failed attempt, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastError {
    /// How it failed.
    pub kind: FailureKind,
    /// Provider status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<i32>,
    /// Detail or body excerpt (at most 4 KiB).
    pub detail: String,
    /// When the failure was recorded.
    pub at: DateTime,
}

/// A document of the `messages` collection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageDoc {
    /// ObjectId; its time part orders messages by creation.
    #[serde(rename = "_id")]
    pub id: ObjectId,
    /// E.164 recipient.
    pub to: String,
    /// Trimmed content.
    pub content: String,
    /// State.
    pub status: MessageStatus,
    /// Delivery attempts made (a claim counts as one).
    pub attempts: i32,
    /// When a pending message is due; while processing, the lease end.
    pub next_attempt_at: DateTime,
    /// Token of the current (or last) claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_token: Option<String>,
    /// Worker of the current (or last) claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    /// End of the current claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<DateTime>,
    /// The provider's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_message_id: Option<String>,
    /// When the provider accepted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<DateTime>,
    /// Last failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
    /// The state change of the last write (absent on documents written by older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition: Option<Transition>,
    /// Client idempotency key (unique, sparse: absent when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Creation time.
    pub created_at: DateTime,
    /// Last change.
    pub updated_at: DateTime,
}

/// A validated new message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidMessage {
    /// E.164 recipient.
    pub to: String,
    /// Trimmed content.
    pub content: String,
}

impl MessageDoc {
    /// A fresh pending message, due now.
    pub fn new_pending(message: ValidMessage, idempotency_key: Option<String>, now: DateTime) -> Self {
        Self {
            id: ObjectId::new(),
            to: message.to,
            content: message.content,
            status: MessageStatus::Pending,
            attempts: 0,
            next_attempt_at: now,
            claim_token: None,
            claimed_by: None,
            lease_until: None,
            webhook_message_id: None,
            sent_at: None,
            last_error: None,
            last_transition: Some(Transition::Created),
            idempotency_key,
            created_at: now,
            updated_at: now,
        }
    }
}

/// Checks `to` is E.164: `+` then 8 to 15 digits (surrounding spaces are trimmed).
pub fn validate_phone(to: &str) -> Result<String, ServiceError> {
    let to = to.trim();
    let digits = to.strip_prefix('+').unwrap_or("");
    if (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(to.to_owned())
    } else {
        Err(ServiceError::invalid(
            ErrorCode::InvalidPhone,
            "to must be an E.164 phone number: `+` then 8 to 15 digits",
        ))
    }
}

/// Trims `content` and checks it holds 1..=`max_chars` Unicode characters.
pub fn validate_content(content: &str, max_chars: usize) -> Result<String, ServiceError> {
    let content = content.trim();
    if content.is_empty() {
        return Err(ServiceError::invalid(
            ErrorCode::EmptyContent,
            "content must not be empty",
        ));
    }
    let chars = content.chars().count();
    if chars > max_chars {
        return Err(ServiceError::invalid(
            ErrorCode::ContentTooLong,
            format!("content has {chars} characters; the limit is {max_chars}"),
        ));
    }
    Ok(content.to_owned())
}

/// Validates both fields.
pub fn validate(to: &str, content: &str, max_chars: usize) -> Result<ValidMessage, ServiceError> {
    Ok(ValidMessage {
        to: validate_phone(to)?,
        content: validate_content(content, max_chars)?,
    })
}

/// Parses a 24-hex id.
pub fn parse_id(id: &str) -> Result<ObjectId, ServiceError> {
    ObjectId::parse_str(id).map_err(|_| {
        ServiceError::invalid(
            ErrorCode::InvalidMessageId,
            "id must be a 24-character hexadecimal ObjectId",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_must_be_e164() {
        assert_eq!(validate_phone(" +905551234567 ").unwrap(), "+905551234567");
        assert!(validate_phone("+12345678").is_ok());
        assert!(validate_phone("+123456789012345").is_ok());
        for bad in [
            "905551234567",
            "+1234567",
            "+1234567890123456",
            "+90 555 123",
            "+90555abc4567",
            "",
            "+",
        ] {
            assert!(validate_phone(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn content_is_trimmed_and_counted_in_characters_not_bytes() {
        assert_eq!(validate_content("  hi  ", 160).unwrap(), "hi");
        assert!(matches!(
            validate_content("   ", 160),
            Err(ServiceError::Invalid {
                code: ErrorCode::EmptyContent,
                ..
            })
        ));
        let turkish = "ş".repeat(160);
        assert!(turkish.len() > 160);
        assert!(validate_content(&turkish, 160).is_ok());
        let emoji = "🙂".repeat(161);
        assert!(matches!(
            validate_content(&emoji, 160),
            Err(ServiceError::Invalid {
                code: ErrorCode::ContentTooLong,
                ..
            })
        ));
    }

    #[test]
    fn ids_must_be_object_ids() {
        assert!(parse_id("0123456789abcdef01234567").is_ok());
        assert!(parse_id("nope").is_err());
    }
}
