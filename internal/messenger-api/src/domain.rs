//! Messages, their states and the rules for valid input.

use bson::oid::ObjectId;
use bson::DateTime;
use serde::{Deserialize, Serialize};

pub use herald_core::message::{AttemptKind, AttemptRecord, FailureKind, MessageStatus};
use herald_core::receipts::DeliveryState;
use herald_core::ErrorCode;

/// Input that broke a rule: which one (a code from the catalogue) and what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    /// Which rule.
    pub code: ErrorCode,
    /// What to fix.
    pub message: String,
}

impl ValidationError {
    /// A broken rule.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

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
    /// Came due (or would have been retried) after its `expires_at`: never sent again.
    Expired,
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
            Self::Expired => "expired",
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

impl From<LastError> for herald_core::message::LastErrorView {
    fn from(e: LastError) -> Self {
        Self {
            kind: e.kind,
            status: e.status,
            detail: e.detail,
            at: e.at.to_chrono(),
        }
    }
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
    /// Not sent before this time (absent: due when created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_at: Option<DateTime>,
    /// Never sent after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime>,
    /// Client idempotency key (unique, sparse: absent when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The provider it is pinned to; once sent, the provider that accepted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Its last [`herald_core::worker::ATTEMPTS_LOG_LEN`] requests to providers, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts_log: Vec<AttemptDoc>,
    /// True while it waits because every provider it may go to is paused; absent otherwise
    /// (cleared when it is claimed again). Sparse-indexed, so the waiting are counted without
    /// a scan.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waiting_for_provider: bool,
    /// Its delivery, from the provider's receipts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryDoc>,
    /// Where its status callbacks go (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// The receipts that moved `delivery`, oldest first (the last [`RECEIPTS_KEPT`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub receipts: Vec<DeliveryDoc>,
    /// Creation time.
    pub created_at: DateTime,
    /// Last change.
    pub updated_at: DateTime,
}

/// How many applied receipts a message keeps.
pub const RECEIPTS_KEPT: i32 = 20;

/// A delivery state as stored: `rank` orders the states, so one conditional update applies a
/// receipt only over a lower one ([`DeliveryState::rank`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryDoc {
    /// The state.
    pub state: DeliveryState,
    /// Its rank.
    pub rank: i32,
    /// When Herald took the receipt.
    pub at: DateTime,
    /// The provider's word.
    pub provider_status: String,
    /// The provider's error code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
}

impl DeliveryDoc {
    /// `state`, reported as `provider_status` (with `error_code`) at `at`.
    pub fn new(state: DeliveryState, provider_status: &str, error_code: Option<String>, at: DateTime) -> Self {
        Self {
            state,
            rank: state.rank(),
            at,
            provider_status: provider_status.to_owned(),
            error_code,
        }
    }
}

impl From<DeliveryDoc> for herald_core::message::DeliveryView {
    fn from(d: DeliveryDoc) -> Self {
        Self {
            state: d.state,
            at: d.at.to_chrono(),
            provider_status: d.provider_status,
            error_code: d.error_code,
        }
    }
}

/// One request to a provider, as stored in `attempts_log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptDoc {
    /// When.
    pub at: DateTime,
    /// Which provider.
    pub provider: String,
    /// What came of it.
    pub kind: AttemptKind,
    /// HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<i32>,
    /// Milliseconds it took.
    pub latency_ms: i64,
}

impl From<&AttemptRecord> for AttemptDoc {
    fn from(a: &AttemptRecord) -> Self {
        Self {
            at: DateTime::from_chrono(a.at),
            provider: a.provider.clone(),
            kind: a.kind,
            status: a.status.map(i32::from),
            latency_ms: i64::try_from(a.latency_ms).unwrap_or(i64::MAX),
        }
    }
}

impl From<AttemptDoc> for AttemptRecord {
    fn from(a: AttemptDoc) -> Self {
        Self {
            at: a.at.to_chrono(),
            provider: a.provider,
            kind: a.kind,
            status: a.status.and_then(|s| u16::try_from(s).ok()),
            latency_ms: u64::try_from(a.latency_ms).unwrap_or_default(),
        }
    }
}

/// A validated new message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidMessage {
    /// E.164 recipient.
    pub to: String,
    /// Trimmed content.
    pub content: String,
    /// When it may be sent and until when.
    pub schedule: Schedule,
    /// The provider it is pinned to.
    pub provider: Option<String>,
    /// Where its status callbacks go.
    pub callback_url: Option<String>,
}

/// When a message may be sent: not before `send_at`, never after `expires_at`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Not before (absent: at once).
    pub send_at: Option<DateTime>,
    /// Never after.
    pub expires_at: Option<DateTime>,
}

/// A message to validate, as a client sent it.
#[derive(Debug, Clone, Copy)]
pub struct Draft<'a> {
    /// Recipient.
    pub to: &'a str,
    /// Text.
    pub content: &'a str,
    /// Not before.
    pub send_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Never after.
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Pinned provider.
    pub provider: Option<&'a str>,
    /// Where its status callbacks go.
    pub callback_url: Option<&'a str>,
}

/// The limits a draft is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    /// Content limit in characters.
    pub max_chars: usize,
    /// Furthest `send_at`, from now.
    pub max_schedule: std::time::Duration,
    /// The configured provider names a message may pin.
    pub providers: &'a [String],
    /// Which callback URLs are allowed.
    pub callbacks: &'a herald_core::callbacks::UrlPolicy,
    /// The callback URL of a message created without one.
    pub default_callback: Option<&'a str>,
}

impl MessageDoc {
    /// A fresh pending message, due at its `send_at` or now.
    pub fn new_pending(message: ValidMessage, idempotency_key: Option<String>, now: DateTime) -> Self {
        let due = message.schedule.send_at.filter(|at| *at > now).unwrap_or(now);
        Self {
            id: ObjectId::new(),
            to: message.to,
            content: message.content,
            status: MessageStatus::Pending,
            attempts: 0,
            next_attempt_at: due,
            claim_token: None,
            claimed_by: None,
            lease_until: None,
            webhook_message_id: None,
            sent_at: None,
            last_error: None,
            last_transition: Some(Transition::Created),
            send_at: message.schedule.send_at,
            expires_at: message.schedule.expires_at,
            idempotency_key,
            provider: message.provider,
            attempts_log: Vec::new(),
            waiting_for_provider: false,
            delivery: None,
            receipts: Vec::new(),
            callback_url: message.callback_url,
            created_at: now,
            updated_at: now,
        }
    }
}

/// Checks `to` is E.164: `+` then 8 to 15 digits (surrounding spaces are trimmed).
pub fn validate_phone(to: &str) -> Result<String, ValidationError> {
    let to = to.trim();
    let digits = to.strip_prefix('+').unwrap_or("");
    if (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(to.to_owned())
    } else {
        Err(ValidationError::new(
            ErrorCode::InvalidPhone,
            "to must be an E.164 phone number: `+` then 8 to 15 digits",
        ))
    }
}

/// Trims `content` and checks it holds 1..=`max_chars` Unicode characters.
pub fn validate_content(content: &str, max_chars: usize) -> Result<String, ValidationError> {
    let content = content.trim();
    if content.is_empty() {
        return Err(ValidationError::new(
            ErrorCode::EmptyContent,
            "content must not be empty",
        ));
    }
    let chars = content.chars().count();
    if chars > max_chars {
        return Err(ValidationError::new(
            ErrorCode::ContentTooLong,
            format!("content has {chars} characters; the limit is {max_chars}"),
        ));
    }
    Ok(content.to_owned())
}

/// Checks `send_at` is within `max_schedule` of `now` (a past one means "now") and
/// `expires_at` lies after both `now` and `send_at`.
pub fn validate_schedule(
    send_at: Option<chrono::DateTime<chrono::Utc>>,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
    max_schedule: std::time::Duration,
) -> Result<Schedule, ValidationError> {
    if let Some(at) = send_at {
        let furthest = now + chrono::Duration::from_std(max_schedule).unwrap_or(chrono::Duration::MAX);
        if at > furthest {
            return Err(ValidationError::new(
                ErrorCode::InvalidSendAt,
                format!(
                    "sendAt {} is more than {} days ahead",
                    at.to_rfc3339(),
                    max_schedule.as_secs() / 86_400
                ),
            ));
        }
    }
    if let Some(at) = expires_at {
        let earliest = send_at.map_or(now, |s| s.max(now));
        if at <= earliest {
            return Err(ValidationError::new(
                ErrorCode::InvalidExpiresAt,
                format!("expiresAt {} must be after now and after sendAt", at.to_rfc3339()),
            ));
        }
    }
    Ok(Schedule {
        send_at: send_at.map(DateTime::from_chrono),
        expires_at: expires_at.map(DateTime::from_chrono),
    })
}

/// Checks a pinned provider is one of `known`.
pub fn validate_provider(provider: Option<&str>, known: &[String]) -> Result<Option<String>, ValidationError> {
    match provider.map(str::trim) {
        None => Ok(None),
        Some(name) if known.iter().any(|k| k == name) => Ok(Some(name.to_owned())),
        Some(name) => Err(ValidationError::new(
            ErrorCode::UnknownProvider,
            format!(
                "provider {:?} is not configured; known: {}",
                name.chars().take(40).collect::<String>(),
                known.join(", ")
            ),
        )),
    }
}

/// Checks a callback URL against `policy`; none given means `default`.
pub fn validate_callback_url(
    url: Option<&str>,
    policy: &herald_core::callbacks::UrlPolicy,
    default: Option<&str>,
) -> Result<Option<String>, ValidationError> {
    match url.map(str::trim).filter(|u| !u.is_empty()) {
        Some(url) => policy
            .check_url(url)
            .map(Some)
            .map_err(|refused| ValidationError::new(ErrorCode::InvalidCallbackUrl, refused.0)),
        None => Ok(default.map(str::to_owned)),
    }
}

/// Validates every field of a draft at `now`.
pub fn validate(
    draft: Draft<'_>,
    limits: Limits<'_>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<ValidMessage, ValidationError> {
    Ok(ValidMessage {
        to: validate_phone(draft.to)?,
        content: validate_content(draft.content, limits.max_chars)?,
        schedule: validate_schedule(draft.send_at, draft.expires_at, now, limits.max_schedule)?,
        provider: validate_provider(draft.provider, limits.providers)?,
        callback_url: validate_callback_url(draft.callback_url, limits.callbacks, limits.default_callback)?,
    })
}

/// Parses a 24-hex id.
pub fn parse_id(id: &str) -> Result<ObjectId, ValidationError> {
    ObjectId::parse_str(id).map_err(|_| {
        ValidationError::new(
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
            Err(ValidationError {
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
            Err(ValidationError {
                code: ErrorCode::ContentTooLong,
                ..
            })
        ));
    }

    #[test]
    fn schedules_stay_within_the_horizon_and_expire_after_they_start() {
        let now = chrono::Utc::now();
        let day = std::time::Duration::from_secs(86_400);
        let horizon = day * 30;
        let hours = chrono::Duration::hours;
        let ok = validate_schedule(Some(now + hours(1)), Some(now + hours(2)), now, horizon).unwrap();
        assert_eq!(ok.send_at, Some(DateTime::from_chrono(now + hours(1))));
        assert!(
            validate_schedule(Some(now - hours(1)), None, now, horizon).is_ok(),
            "past = now"
        );
        assert!(validate_schedule(None, None, now, horizon).unwrap() == Schedule::default());
        let code = |r: Result<Schedule, ValidationError>| match r {
            Err(ValidationError { code, .. }) => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            code(validate_schedule(Some(now + hours(24 * 31)), None, now, horizon)),
            ErrorCode::InvalidSendAt
        );
        assert_eq!(
            code(validate_schedule(None, Some(now - hours(1)), now, horizon)),
            ErrorCode::InvalidExpiresAt
        );
        assert_eq!(
            code(validate_schedule(
                Some(now + hours(3)),
                Some(now + hours(2)),
                now,
                horizon
            )),
            ErrorCode::InvalidExpiresAt
        );
    }

    #[test]
    fn a_future_send_at_is_when_the_message_comes_due() {
        let now = DateTime::now();
        let later = DateTime::from_millis(now.timestamp_millis() + 60_000);
        let message = |send_at| ValidMessage {
            to: "+905551234567".into(),
            content: "hi".into(),
            schedule: Schedule {
                send_at,
                expires_at: None,
            },
            provider: None,
            callback_url: None,
        };
        assert_eq!(
            MessageDoc::new_pending(message(Some(later)), None, now).next_attempt_at,
            later
        );
        let past = DateTime::from_millis(now.timestamp_millis() - 60_000);
        assert_eq!(
            MessageDoc::new_pending(message(Some(past)), None, now).next_attempt_at,
            now
        );
    }

    #[test]
    fn ids_must_be_object_ids() {
        assert!(parse_id("0123456789abcdef01234567").is_ok());
        assert!(parse_id("nope").is_err());
    }
}
