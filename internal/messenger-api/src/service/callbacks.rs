//! Status callbacks out: written to the outbox when a message's state changes, claimed and
//! reported by the Job Scheduler (the same lease and retry rules as messages), and shown per
//! message and by status to operators.
//!
//! A callback is written *after* the transition it tells of is in the database, and written
//! again (a no-op, by its id) whenever that transition is reported again: a retried commit or
//! a provider's retried receipt. If this process dies between the two writes, the caller —
//! whose request then got no answer — retries, and the callback is written then. If the outbox
//! write fails, the request fails (503) for the same reason.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bson::oid::ObjectId;
use bson::DateTime;
use herald_core::callbacks::{
    CallbackAttemptView, CallbackBody, CallbackEvent, CallbackOutcome, CallbackReportResults, CallbackReported,
    CallbackResultKind, CallbackStatus, CallbackView, ClaimedCallback, MAX_BATCH,
};
use herald_core::receipts::DeliveryState;
use herald_core::settings::Settings;
use herald_core::ErrorCode;
use prometheus::IntCounterVec;

use super::RetryPolicy;
use crate::domain::{MessageDoc, MessageStatus};
use crate::error::ServiceError;
use crate::store::callbacks::{AttemptEntry, CallbackDoc, CallbackStore, Settle};
use crate::store::MessageStore;

/// Default and longest claim lease, in seconds.
const LEASE: (u64, u64) = (60, 3600);
/// How long a "no message asked for callbacks" answer is trusted.
const RECHECK: Duration = Duration::from_secs(5);
/// Furthest a deferral may push a callback.
const MAX_DEFER: Duration = Duration::from_secs(3600);
/// Longest kept error text, in bytes.
const MAX_ERROR: usize = 1024;

/// The event a message's state tells of, if any.
pub fn event_of_status(status: MessageStatus) -> Option<CallbackEvent> {
    match status {
        MessageStatus::Sent => Some(CallbackEvent::Sent),
        MessageStatus::Failed => Some(CallbackEvent::Failed),
        MessageStatus::Expired => Some(CallbackEvent::Expired),
        MessageStatus::Pending | MessageStatus::Processing => None,
    }
}

/// The event a delivery state tells of, if any (`sent` and `unknown` are not told).
pub fn event_of_delivery(state: DeliveryState) -> Option<CallbackEvent> {
    match state {
        DeliveryState::Delivered => Some(CallbackEvent::Delivered),
        DeliveryState::Undelivered | DeliveryState::Failed => Some(CallbackEvent::Undelivered),
        DeliveryState::Read => Some(CallbackEvent::Read),
        DeliveryState::Sent | DeliveryState::Unknown => None,
    }
}

/// The outbox and its rules.
pub struct Callbacks {
    store: CallbackStore,
    messages: MessageStore,
    /// The callbacks' retry schedule, jitter and `Retry-After` cap (the messages' rules over
    /// `callbacks.retry_schedule_seconds`).
    retry: RetryPolicy,
    /// `callbacks.default_url` is set: every message asks.
    everyone: bool,
    /// Some stored message asked (sticky once seen).
    seen: AtomicBool,
    checked: Mutex<Option<tokio::time::Instant>>,
    counted: IntCounterVec,
}

impl Callbacks {
    /// The outbox over the database of `messages`.
    pub fn new(messages: MessageStore, settings: &Settings, counted: IntCounterVec) -> Self {
        let keep = Duration::from_secs(settings.callbacks.keep_days.max(1) * 86_400);
        let retry = RetryPolicy {
            retry_schedule: settings.callbacks.retry_schedule_seconds.clone(),
            ..RetryPolicy::from_settings(settings)
        };
        Self {
            store: CallbackStore::new(messages.database(), keep),
            messages,
            retry,
            everyone: !settings.callbacks.default_url.trim().is_empty(),
            seen: AtomicBool::new(false),
            checked: Mutex::new(None),
            counted,
        }
    }

    /// The outbox's repository (for start-up index creation).
    pub fn store(&self) -> &CallbackStore {
        &self.store
    }

    /// A message asking for callbacks was just stored here.
    pub fn note_asked(&self) {
        self.seen.store(true, Ordering::Relaxed);
    }

    /// Whether a transition may need a callback: the default URL is set, or some message
    /// asked (one index key read, at most every [`RECHECK`] until one is seen).
    async fn worth_looking(&self) -> Result<bool, ServiceError> {
        if self.everyone || self.seen.load(Ordering::Relaxed) {
            return Ok(true);
        }
        {
            let mut checked = self.checked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if checked.is_some_and(|at| at.elapsed() < RECHECK) {
                return Ok(false);
            }
            *checked = Some(tokio::time::Instant::now());
        }
        let any = self.messages.any_with_callbacks().await?;
        if any {
            self.seen.store(true, Ordering::Relaxed);
        }
        Ok(any)
    }

    /// Writes the callbacks of these transitions (message id, event) for the messages that
    /// asked for them.
    pub async fn on_transitions(&self, changed: &[(ObjectId, CallbackEvent)]) -> Result<(), ServiceError> {
        if changed.is_empty() || !self.worth_looking().await? {
            return Ok(());
        }
        let ids: Vec<ObjectId> = changed.iter().map(|(id, _)| *id).collect();
        let asked = self.messages.with_callbacks(&ids).await?;
        if asked.is_empty() {
            return Ok(());
        }
        let docs: Vec<CallbackDoc> = changed
            .iter()
            .filter_map(|(id, event)| asked.iter().find(|m| m.id == *id).map(|m| (m, *event)))
            .filter_map(|(message, event)| outbox_doc(message, event, DateTime::now()))
            .collect();
        self.enqueue(docs).await
    }

    /// Writes the callback of one message's event, when it asked for callbacks.
    pub async fn on_message(&self, message: &MessageDoc, event: CallbackEvent) -> Result<(), ServiceError> {
        let docs: Vec<CallbackDoc> = outbox_doc(message, event, DateTime::now()).into_iter().collect();
        self.enqueue(docs).await
    }

    async fn enqueue(&self, docs: Vec<CallbackDoc>) -> Result<(), ServiceError> {
        if docs.is_empty() {
            return Ok(());
        }
        let new = self.store.enqueue(docs).await?;
        self.counted.with_label_values(&["written"]).inc_by(new);
        Ok(())
    }

    /// Claims up to `limit` due callbacks for `worker`.
    pub async fn claim(
        &self,
        worker: &str,
        limit: Option<u32>,
        lease_seconds: Option<u64>,
    ) -> Result<Vec<ClaimedCallback>, ServiceError> {
        let worker = worker.trim();
        if worker.is_empty() || worker.len() > 200 {
            return Err(bad("worker must be 1 to 200 characters"));
        }
        let limit = limit.unwrap_or(50);
        if !(1..=MAX_BATCH as u32).contains(&limit) {
            return Err(bad("limit must be 1..=200"));
        }
        let lease = lease_seconds.unwrap_or(LEASE.0);
        if !(1..=LEASE.1).contains(&lease) {
            return Err(bad("leaseSeconds must be 1..=3600"));
        }
        let now = DateTime::now();
        let lease_until = herald_core::mongo::after(now, Duration::from_secs(lease));
        let held = self.store.claim(worker, limit as usize, lease_until, now).await?;
        Ok(held
            .into_iter()
            .map(|c| ClaimedCallback {
                id: c.id,
                url: c.url,
                body: c.body,
                attempt: c.attempts,
                claim_token: c.claim_token.unwrap_or_default(),
                lease_until: lease_until.to_chrono(),
            })
            .collect())
    }

    /// Settles the reported callbacks, each only while its claim is held: delivered; dead when
    /// refused or out of retries; pending again after the schedule's next delay (a receiver's
    /// `Retry-After` is a floor); or pending at `deferUntil` with the attempt given back.
    pub async fn report(&self, items: Vec<CallbackOutcome>) -> Result<CallbackReportResults, ServiceError> {
        if items.is_empty() || items.len() > MAX_BATCH {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidCallbackReport,
                format!("a report holds 1 to {MAX_BATCH} outcomes; this one has {}", items.len()),
            ));
        }
        let mut ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != items.len() {
            return Err(bad("each callback may appear once in a report"));
        }
        let now = DateTime::now();
        let settles = items.iter().map(|item| async move {
            let Some(current) = self.store.find(&item.id).await? else {
                return Ok::<_, ServiceError>(CallbackReported {
                    id: item.id.clone(),
                    status: None,
                    applied: false,
                });
            };
            let settle = self.settle_of(item, &current, now);
            let after = self.store.settle(&item.id, &item.claim_token, &settle, now).await?;
            let label = match (&after, settle.status) {
                (None, _) => "claim_lost",
                (Some(_), CallbackStatus::Delivered) => "delivered",
                (Some(_), CallbackStatus::Dead) => "dead",
                (Some(_), _) if settle.uncount => "deferred",
                (Some(_), _) => "retry_scheduled",
            };
            self.counted.with_label_values(&[label]).inc();
            Ok(CallbackReported {
                id: item.id.clone(),
                applied: after.is_some(),
                status: Some(after.map_or(current.status, |a| a.status)),
            })
        });
        Ok(CallbackReportResults {
            items: futures::future::try_join_all(settles).await?,
        })
    }

    fn settle_of(&self, item: &CallbackOutcome, current: &CallbackDoc, now: DateTime) -> Settle {
        let entry = AttemptEntry {
            at: now,
            result: item.result,
            status_code: item.status_code.map(i32::from),
            error: item.error.clone().map(|e| cut(e, MAX_ERROR)),
            duration_ms: item.duration_ms.map(|ms| ms.min(i64::MAX as u64) as i64),
        };
        match item.result {
            CallbackResultKind::Delivered => Settle {
                status: CallbackStatus::Delivered,
                next_attempt_at: None,
                entry: Some(entry),
                uncount: false,
            },
            CallbackResultKind::Refused => Settle {
                status: CallbackStatus::Dead,
                next_attempt_at: None,
                entry: Some(entry),
                uncount: false,
            },
            CallbackResultKind::Failed => match self.retry.retry_delay(current.attempts, item.retry_after_seconds) {
                Some(delay) => Settle {
                    status: CallbackStatus::Pending,
                    next_attempt_at: Some(herald_core::mongo::after(now, delay)),
                    entry: Some(entry),
                    uncount: false,
                },
                None => Settle {
                    status: CallbackStatus::Dead,
                    next_attempt_at: None,
                    entry: Some(entry),
                    uncount: false,
                },
            },
            CallbackResultKind::Deferred => {
                let furthest = herald_core::mongo::after(now, MAX_DEFER);
                let until = item
                    .defer_until
                    .map(DateTime::from_chrono)
                    .unwrap_or(now)
                    .clamp(now, furthest);
                Settle {
                    status: CallbackStatus::Pending,
                    next_attempt_at: Some(until),
                    entry: None,
                    uncount: true,
                }
            }
        }
    }

    /// The callbacks of one message.
    pub async fn for_message(&self, id: ObjectId) -> Result<Vec<CallbackView>, ServiceError> {
        Ok(self
            .store
            .for_message(id)
            .await?
            .into_iter()
            .map(callback_view)
            .collect())
    }

    /// Up to `limit` callbacks in `status`, oldest due first.
    pub async fn in_status(&self, status: CallbackStatus, limit: usize) -> Result<Vec<CallbackView>, ServiceError> {
        Ok(self
            .store
            .in_status(status, limit)
            .await?
            .into_iter()
            .map(callback_view)
            .collect())
    }

    /// Sends a dead callback again.
    pub async fn resend(&self, id: &str) -> Result<CallbackView, ServiceError> {
        match self.store.revive(id, DateTime::now()).await? {
            Some(revived) => {
                self.counted.with_label_values(&["resent"]).inc();
                Ok(callback_view(revived))
            }
            None => match self.store.find(id).await? {
                Some(_) => Err(ServiceError::invalid(
                    ErrorCode::CallbackNotDead,
                    "only a dead callback can be sent again",
                )),
                None => Err(ServiceError::invalid(
                    ErrorCode::CallbackNotFound,
                    "no callback has this id",
                )),
            },
        }
    }
}

fn bad(message: &str) -> ServiceError {
    ServiceError::invalid(ErrorCode::InvalidCallbackReport, message)
}

fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The outbox document of `event` of `message`, when the message asked for callbacks.
fn outbox_doc(message: &MessageDoc, event: CallbackEvent, now: DateTime) -> Option<CallbackDoc> {
    let url = message.callback_url.clone()?;
    let delivery = match event {
        CallbackEvent::Delivered | CallbackEvent::Undelivered | CallbackEvent::Read => {
            message.delivery.clone().map(Into::into)
        }
        _ => None,
    };
    let at = match event {
        CallbackEvent::Sent => message.sent_at.unwrap_or(now),
        CallbackEvent::Failed | CallbackEvent::Expired => message.updated_at,
        _ => message.delivery.as_ref().map_or(now, |d| d.at),
    };
    let body = CallbackBody {
        kind: event,
        id: message.id.to_hex(),
        message_id: message.webhook_message_id.clone(),
        status: message.status.as_str().to_owned(),
        delivery,
        at: at.to_chrono(),
    };
    Some(CallbackDoc {
        id: CallbackDoc::id_of(message.id, event),
        message_id: message.id,
        event,
        url,
        body: serde_json::to_string(&body).ok()?,
        status: CallbackStatus::Pending,
        attempts: 0,
        next_attempt_at: now,
        claim_token: None,
        claimed_by: None,
        last_error: None,
        history: Vec::new(),
        created_at: now,
        updated_at: now,
        delivered_at: None,
    })
}

/// A callback as the API shows it.
pub fn callback_view(c: CallbackDoc) -> CallbackView {
    CallbackView {
        id: c.id,
        message_id: c.message_id.to_hex(),
        event: c.event,
        url: c.url,
        status: c.status,
        attempts: c.attempts,
        next_attempt_at: c.next_attempt_at.to_chrono(),
        delivered_at: c.delivered_at.map(|d| d.to_chrono()),
        last_error: c.last_error,
        history: c
            .history
            .into_iter()
            .map(|h| CallbackAttemptView {
                at: h.at.to_chrono(),
                result: h.result,
                status_code: h.status_code.and_then(|s| u16::try_from(s).ok()),
                error: h.error,
                duration_ms: h.duration_ms.and_then(|ms| u64::try_from(ms).ok()),
            })
            .collect(),
        created_at: c.created_at.to_chrono(),
    }
}
