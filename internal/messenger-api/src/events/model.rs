//! What a subscriber receives, and how a change of the database becomes one.

use bson::{Bson, Document};
use chrono::{DateTime, Utc};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use poem_openapi::{Enum, Object};

use crate::domain::{MessageStatus, Transition};
use herald_core::message::LastErrorView;

use herald_core::audit::{AuditDoc, AuditEntry, AUDIT_COLLECTION};
use herald_core::callbacks::{CallbackStatus, CallbackView};
use herald_core::jobs::JOB_STATE_COLLECTION as JOB_STATE;
use herald_core::jobs::PROVIDER_STATE_COLLECTION as PROVIDER_STATE;

use crate::store::callbacks::{CallbackDoc, COLLECTION as CALLBACKS};
use herald_core::receipts::DeliveryState;

/// The kinds of event (SPEC §11), plus the feed's own `reset` and `dropped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
pub enum EventType {
    /// A message was stored.
    #[oai(rename = "message.created")]
    MessageCreated,
    /// A worker claimed it.
    #[oai(rename = "message.claimed")]
    MessageClaimed,
    /// The provider accepted it and the worker committed it.
    #[oai(rename = "message.sent")]
    MessageSent,
    /// A retryable failure; it is pending again from `nextAttemptAt`.
    #[oai(rename = "message.retry_scheduled")]
    MessageRetryScheduled,
    /// A permanent failure, or retries exhausted.
    #[oai(rename = "message.failed")]
    MessageFailed,
    /// A worker gave it back unsent.
    #[oai(rename = "message.released")]
    MessageReleased,
    /// An operator sent a failed message back to pending.
    #[oai(rename = "message.requeued")]
    MessageRequeued,
    /// It passed its `expiresAt` unsent.
    #[oai(rename = "message.expired")]
    MessageExpired,
    /// Its provider reported it delivered to the handset.
    #[oai(rename = "message.delivered")]
    MessageDelivered,
    /// Its provider reported it undelivered or failed (`delivery.state` says which).
    #[oai(rename = "message.undelivered")]
    MessageUndelivered,
    /// Its provider reported it read.
    #[oai(rename = "message.read")]
    MessageRead,
    /// No final receipt came within `receipts.timeout_hours`.
    #[oai(rename = "message.delivery_unknown")]
    MessageDeliveryUnknown,
    /// The sending job was started.
    #[oai(rename = "job.started")]
    JobStarted,
    /// The sending job was stopped.
    #[oai(rename = "job.stopped")]
    JobStopped,
    /// Sending to the provider was paused.
    #[oai(rename = "provider.paused")]
    ProviderPaused,
    /// Sending to the provider resumed.
    #[oai(rename = "provider.resumed")]
    ProviderResumed,
    /// The provider refused Herald's credentials (401/403) and was paused as misconfigured.
    #[oai(rename = "provider.misconfigured")]
    ProviderMisconfigured,
    /// An operator action was written to the audit (who, what, result).
    #[oai(rename = "audit.recorded")]
    AuditRecorded,
    /// A status callback was dead-lettered: every attempt failed, or its address was refused.
    #[oai(rename = "callback.failed")]
    CallbackFailed,
    /// The feed no longer holds the position asked for: events were missed, re-read a snapshot.
    #[oai(rename = "reset")]
    Reset,
    /// This subscriber fell too far behind and is disconnected; resume with the last event id.
    #[oai(rename = "dropped")]
    Dropped,
}

impl EventType {
    /// The name on the wire (the SSE `event:` field).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MessageCreated => "message.created",
            Self::MessageClaimed => "message.claimed",
            Self::MessageSent => "message.sent",
            Self::MessageRetryScheduled => "message.retry_scheduled",
            Self::MessageFailed => "message.failed",
            Self::MessageReleased => "message.released",
            Self::MessageRequeued => "message.requeued",
            Self::MessageExpired => "message.expired",
            Self::MessageDelivered => "message.delivered",
            Self::MessageUndelivered => "message.undelivered",
            Self::MessageRead => "message.read",
            Self::MessageDeliveryUnknown => "message.delivery_unknown",
            Self::JobStarted => "job.started",
            Self::JobStopped => "job.stopped",
            Self::ProviderPaused => "provider.paused",
            Self::ProviderResumed => "provider.resumed",
            Self::ProviderMisconfigured => "provider.misconfigured",
            Self::AuditRecorded => "audit.recorded",
            Self::CallbackFailed => "callback.failed",
            Self::Reset => "reset",
            Self::Dropped => "dropped",
        }
    }

    fn of_transition(transition: Transition) -> Self {
        match transition {
            Transition::Created => Self::MessageCreated,
            Transition::Claimed => Self::MessageClaimed,
            Transition::Sent => Self::MessageSent,
            Transition::RetryScheduled => Self::MessageRetryScheduled,
            Transition::Failed => Self::MessageFailed,
            Transition::Released => Self::MessageReleased,
            Transition::Requeued => Self::MessageRequeued,
            Transition::Expired => Self::MessageExpired,
        }
    }
}

/// A message as an event carries it.
#[derive(Debug, Clone, PartialEq, Object)]
#[oai(rename_all = "camelCase")]
pub struct MessageEvent {
    /// 24-hex id.
    pub id: String,
    /// Recipient.
    pub to: String,
    /// Status after the change.
    pub status: MessageStatus,
    /// Delivery attempts made.
    pub attempts: i32,
    /// When a pending message is due (while processing: when its lease ends).
    #[oai(nullable)]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the provider accepted it.
    #[oai(nullable)]
    pub sent_at: Option<DateTime<Utc>>,
    /// The provider's `messageId`.
    #[oai(nullable)]
    pub webhook_message_id: Option<String>,
    /// The last failed attempt.
    #[oai(nullable)]
    pub last_error: Option<LastErrorView>,
    /// Its delivery, from the provider's receipts.
    #[oai(nullable)]
    pub delivery: Option<herald_core::message::DeliveryView>,
}

/// The sending job as an event carries it.
#[derive(Debug, Clone, PartialEq, Object)]
#[oai(rename_all = "camelCase")]
pub struct JobEvent {
    /// Whether the job sends.
    pub working: bool,
    /// When `working` last changed.
    #[oai(nullable)]
    pub changed_at: Option<DateTime<Utc>>,
    /// Who changed it.
    #[oai(nullable)]
    pub changed_by: Option<String>,
}

/// A provider's pause as an event carries it.
#[derive(Debug, Clone, PartialEq, Object)]
#[oai(rename_all = "camelCase")]
pub struct ProviderEvent {
    /// Which provider (`default` for `[webhook]`).
    pub name: String,
    /// No sends before this time (absent when resumed).
    #[oai(nullable)]
    pub paused_until: Option<DateTime<Utc>>,
    /// Why it paused.
    #[oai(nullable)]
    pub reason: Option<String>,
}

/// One event of the live feed.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct FeedEvent {
    /// Position in the feed (the change stream's resume token): send it back as
    /// `Last-Event-ID` to resume after this event. Empty on `reset` and `dropped`.
    pub id: String,
    /// What happened.
    #[oai(rename = "type")]
    pub kind: EventType,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// The message, for `message.*` events.
    #[oai(nullable)]
    pub message: Option<MessageEvent>,
    /// The job, for `job.*` events.
    #[oai(nullable)]
    pub job: Option<JobEvent>,
    /// The provider, for `provider.*` events.
    #[oai(nullable)]
    pub provider: Option<ProviderEvent>,
    /// The audit entry, for `audit.*` events.
    #[oai(nullable)]
    pub audit: Option<AuditEntry>,
    /// The callback, for `callback.*` events.
    #[oai(nullable)]
    pub callback: Option<CallbackView>,
}

impl FeedEvent {
    /// A `reset` or `dropped` event, which carries no position.
    pub fn control(kind: EventType) -> Self {
        Self {
            id: String::new(),
            kind,
            at: Utc::now(),
            message: None,
            job: None,
            provider: None,
            audit: None,
            callback: None,
        }
    }
}

/// What a subscriber wants to see. Empty means everything; otherwise only message events of
/// these statuses and/or ids (job and provider events are left out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only these statuses (empty: any).
    pub statuses: Vec<MessageStatus>,
    /// Only these message ids (empty: any).
    pub ids: Vec<String>,
}

impl EventFilter {
    /// Whether `event` passes. Control events always pass.
    pub fn accepts(&self, event: &FeedEvent) -> bool {
        if matches!(event.kind, EventType::Reset | EventType::Dropped) {
            return true;
        }
        if self.statuses.is_empty() && self.ids.is_empty() {
            return true;
        }
        let Some(message) = &event.message else {
            return false;
        };
        (self.statuses.is_empty() || self.statuses.contains(&message.status))
            && (self.ids.is_empty() || self.ids.contains(&message.id))
    }
}

/// Turns a resume token into the text of an event id (hex of its BSON), so it survives HTTP
/// headers unchanged whatever the server puts in it.
pub fn encode_token(token: &ResumeToken) -> String {
    let Ok(value) = bson::to_bson(token) else {
        return String::new();
    };
    let mut bytes = Vec::new();
    if bson::doc! {"t": value}.to_writer(&mut bytes).is_err() {
        return String::new();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The token an event id stands for; `None` when the text is not one of ours.
pub fn decode_token(text: &str) -> Option<ResumeToken> {
    let text = text.trim();
    if text.is_empty() || !text.len().is_multiple_of(2) || text.len() > 8192 {
        return None;
    }
    let bytes: Vec<u8> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    let document = Document::from_reader(bytes.as_slice()).ok()?;
    bson::from_bson(document.get("t")?.clone()).ok()
}

/// The feed's view of one change: `None` for changes no subscriber is told about (other
/// collections, deletes, updates that change no state).
pub fn from_change(change: &ChangeStreamEvent<Document>) -> Option<FeedEvent> {
    let collection = change.ns.as_ref()?.coll.as_deref()?;
    let at = change.wall_time.map(|t| t.to_chrono()).unwrap_or_else(Utc::now);
    let id = encode_token(&change.id);
    let state = current_state(change)?;
    match collection {
        crate::store::COLLECTION => {
            let kind = message_event_type(change, &state)?;
            Some(FeedEvent {
                id,
                kind,
                at,
                message: Some(message_event(&state)?),
                job: None,
                provider: None,
                audit: None,
                callback: None,
            })
        }
        JOB_STATE => {
            if change.operation_type == OperationType::Update && !changed(change, "working") {
                return None;
            }
            let working = state.get_bool("working").ok()?;
            Some(FeedEvent {
                id,
                kind: if working {
                    EventType::JobStarted
                } else {
                    EventType::JobStopped
                },
                at,
                message: None,
                job: Some(JobEvent {
                    working,
                    changed_at: state.get_datetime("changed_at").ok().map(|d| d.to_chrono()),
                    changed_by: state.get_str("changed_by").ok().map(str::to_owned),
                }),
                provider: None,
                audit: None,
                callback: None,
            })
        }
        PROVIDER_STATE => {
            if change.operation_type == OperationType::Update && !changed(change, "paused_until") {
                return None;
            }
            let paused_until = state.get_datetime("paused_until").ok().map(|d| d.to_chrono());
            if change.operation_type != OperationType::Update && paused_until.is_none() {
                return None; // created by a failure count, not a pause
            }
            Some(FeedEvent {
                id,
                kind: match paused_until {
                    Some(_) if state.get_bool("misconfigured").unwrap_or(false) => EventType::ProviderMisconfigured,
                    Some(_) => EventType::ProviderPaused,
                    None => EventType::ProviderResumed,
                },
                at,
                message: None,
                job: None,
                provider: Some(ProviderEvent {
                    name: state.get_str("_id").unwrap_or("default").to_owned(),
                    paused_until,
                    reason: state
                        .get_str("reason")
                        .ok()
                        .map(str::to_owned)
                        .filter(|_| paused_until.is_some()),
                }),
                audit: None,
                callback: None,
            })
        }
        AUDIT_COLLECTION if change.operation_type == OperationType::Insert => {
            let entry = AuditDoc::from_document(state)?;
            Some(FeedEvent {
                id,
                kind: EventType::AuditRecorded,
                at,
                message: None,
                job: None,
                provider: None,
                audit: Some(entry.into()),
                callback: None,
            })
        }
        CALLBACKS
            if change.operation_type == OperationType::Update
                && changed(change, "status")
                && state.get_str("status").ok() == Some(CallbackStatus::Dead.as_str()) =>
        {
            let doc: CallbackDoc = bson::from_document(state.clone()).ok()?;
            Some(FeedEvent {
                id,
                kind: EventType::CallbackFailed,
                at,
                message: None,
                job: None,
                provider: None,
                audit: None,
                callback: Some(crate::service::callback_view(doc)),
            })
        }
        _ => None,
    }
}

fn changed(change: &ChangeStreamEvent<Document>, field: &str) -> bool {
    change
        .update_description
        .as_ref()
        .is_some_and(|u| u.updated_fields.contains_key(field))
}

/// The document as this change left it: the looked-up document with this change's own fields
/// laid over it (the lookup may already show a later state).
fn current_state(change: &ChangeStreamEvent<Document>) -> Option<Document> {
    match change.operation_type {
        OperationType::Insert | OperationType::Replace => change.full_document.clone(),
        OperationType::Update => {
            let mut state = change.full_document.clone().unwrap_or_default();
            if let Some(key) = &change.document_key {
                if let Some(id) = key.get("_id") {
                    state.insert("_id", id.clone());
                }
            }
            if let Some(update) = &change.update_description {
                for (field, value) in &update.updated_fields {
                    if !field.contains('.') {
                        state.insert(field.clone(), value.clone());
                    }
                }
                for field in &update.removed_fields {
                    state.remove(field);
                }
            }
            Some(state)
        }
        _ => None,
    }
}

fn message_event_type(change: &ChangeStreamEvent<Document>, state: &Document) -> Option<EventType> {
    if change.operation_type == OperationType::Insert {
        return Some(EventType::MessageCreated);
    }
    // Herald's own writes name their transition; a change made by hand is read from its status.
    if change.operation_type == OperationType::Replace || changed(change, "last_transition") {
        if let Some(transition) = state
            .get("last_transition")
            .and_then(|t| bson::from_bson::<Transition>(t.clone()).ok())
        {
            return Some(EventType::of_transition(transition));
        }
    }
    // A receipt moves `delivery` alone; an intermediate one (`sent`) is not an event.
    if change.operation_type == OperationType::Update && changed(change, "delivery") && !changed(change, "status") {
        let delivery = bson::from_bson::<crate::domain::DeliveryDoc>(state.get("delivery")?.clone()).ok()?;
        return match delivery.state {
            DeliveryState::Delivered => Some(EventType::MessageDelivered),
            DeliveryState::Undelivered | DeliveryState::Failed => Some(EventType::MessageUndelivered),
            DeliveryState::Read => Some(EventType::MessageRead),
            DeliveryState::Unknown => Some(EventType::MessageDeliveryUnknown),
            DeliveryState::Sent => None,
        };
    }
    if !changed(change, "status") && change.operation_type == OperationType::Update {
        return None;
    }
    let status = bson::from_bson::<MessageStatus>(state.get("status")?.clone()).ok()?;
    Some(match status {
        MessageStatus::Pending => EventType::MessageRequeued,
        MessageStatus::Processing => EventType::MessageClaimed,
        MessageStatus::Sent => EventType::MessageSent,
        MessageStatus::Failed => EventType::MessageFailed,
        MessageStatus::Expired => EventType::MessageExpired,
    })
}

fn message_event(state: &Document) -> Option<MessageEvent> {
    let status = bson::from_bson::<MessageStatus>(state.get("status")?.clone()).ok()?;
    let date = |field: &str| state.get_datetime(field).ok().map(|d| d.to_chrono());
    let sent = status == MessageStatus::Sent;
    Some(MessageEvent {
        id: state.get_object_id("_id").ok()?.to_hex(),
        to: state.get_str("to").unwrap_or_default().to_owned(),
        status,
        attempts: match state.get("attempts") {
            Some(Bson::Int32(n)) => *n,
            Some(Bson::Int64(n)) => i32::try_from(*n).unwrap_or(i32::MAX),
            _ => 0,
        },
        next_attempt_at: date("next_attempt_at"),
        sent_at: if sent { date("sent_at") } else { None },
        webhook_message_id: if sent {
            state.get_str("webhook_message_id").ok().map(str::to_owned)
        } else {
            None
        },
        last_error: state
            .get("last_error")
            .and_then(|e| bson::from_bson::<crate::domain::LastError>(e.clone()).ok())
            .map(Into::into),
        delivery: state
            .get("delivery")
            .and_then(|d| bson::from_bson::<crate::domain::DeliveryDoc>(d.clone()).ok())
            .map(Into::into),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_junk_is_refused() {
        let token: ResumeToken = bson::from_bson(Bson::Document(bson::doc! {"_data": "8263AB"})).unwrap();
        let text = encode_token(&token);
        assert!(text.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(decode_token(&text), Some(token));
        for junk in ["", "zz", "abc", "00", "deadbeef"] {
            assert_eq!(decode_token(junk), None, "{junk}");
        }
    }

    #[test]
    fn filters_narrow_to_matching_message_events() {
        let event = |status| FeedEvent {
            id: "1".into(),
            kind: EventType::MessageSent,
            at: Utc::now(),
            message: Some(MessageEvent {
                id: "a".into(),
                to: "+900000000".into(),
                status,
                attempts: 1,
                next_attempt_at: None,
                sent_at: None,
                webhook_message_id: None,
                last_error: None,
                delivery: None,
            }),
            job: None,
            provider: None,
            audit: None,
            callback: None,
        };
        let job = FeedEvent {
            kind: EventType::JobStopped,
            message: None,
            ..event(MessageStatus::Sent)
        };
        assert!(EventFilter::default().accepts(&job));
        let sent_only = EventFilter {
            statuses: vec![MessageStatus::Sent],
            ids: vec![],
        };
        assert!(sent_only.accepts(&event(MessageStatus::Sent)));
        assert!(!sent_only.accepts(&event(MessageStatus::Failed)));
        assert!(!sent_only.accepts(&job));
        let other_id = EventFilter {
            statuses: vec![],
            ids: vec!["b".into()],
        };
        assert!(!other_id.accepts(&event(MessageStatus::Sent)));
        assert!(other_id.accepts(&FeedEvent::control(EventType::Reset)));
    }
}
