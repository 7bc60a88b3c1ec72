//! Delivery receipts in (SPEC §17): a provider posts what became of a message; the receipt is
//! checked against the provider's `[providers.receipts]` (its signature, its fields, its status
//! words), then applied to the message it names by rank ([`crate::store::receipts`]).
//!
//! A receipt that finds no message is answered 202 and kept for a day: the provider's callback
//! may beat Herald's own commit (the provider answered, the worker has not yet written it), and
//! [`Receipts::match_committed`] applies it as the commit lands ([`Receipts::match_pending`]
//! catches one stored just after its commit looked, within [`MATCH_EVERY`]). An id
//! Herald never sent stays there until it expires, counted, for an operator to see; providers
//! retry a non-2xx for days, so answering it with an error would only bring it back.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bson::oid::ObjectId;
use bson::DateTime;
use herald_core::receipts::{verify, DeliveryState, ReceiptSettings, Signed};
use herald_core::settings::Settings;
use herald_core::ErrorCode;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::domain::DeliveryDoc;
use crate::error::ServiceError;
use crate::store::receipts::{Applied, PendingReceipt, DEFAULT_SWEEP};
use crate::store::MessageStore;

/// How often waiting receipts are matched again.
pub const MATCH_EVERY: Duration = Duration::from_secs(1);
/// Waiting receipts matched per round.
const MATCH_BATCH: i64 = 200;
/// A waiting receipt is looked at by the periodic round this long after it came.
const MATCH_DELAY: Duration = Duration::from_secs(2);
/// How far back the first round after start looks.
const MATCH_REACH: Duration = Duration::from_secs(600);
/// Sent messages one timeout sweep reads at most.
pub const SWEEP_BATCH: i64 = 500;
/// Where the first timeout sweep starts, behind its cutoff.
const FIRST_SWEEP_REACH: Duration = Duration::from_secs(7 * 86_400);

/// One receipt as it came.
pub struct Inbound<'a> {
    /// The provider named in the path.
    pub provider: &'a str,
    /// Its `Content-Type`.
    pub content_type: Option<&'a str>,
    /// Its headers, by name.
    pub header: &'a (dyn Fn(&str) -> Option<String> + Sync),
    /// The raw body.
    pub body: &'a [u8],
    /// The URL it reached, as the provider wrote it.
    pub url: &'a str,
}

/// What came of a receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// It moved the message's delivery to this state.
    Applied(DeliveryState),
    /// The message was at this rank or past it (a replay, a late intermediate).
    Ignored,
    /// No message yet: kept, applied when it comes.
    Pending,
}

/// Receipts, per provider.
pub struct Receipts {
    store: MessageStore,
    /// Receipts being applied now, at most `receipts.max_in_flight`.
    in_flight: std::sync::Arc<tokio::sync::Semaphore>,
    /// Where the periodic match round has got to (by `received_at`).
    floor: std::sync::Mutex<Option<DateTime>>,
    callbacks: std::sync::Arc<super::Callbacks>,
    providers: HashMap<String, ReceiptSettings>,
    counted: prometheus::IntCounterVec,
    deliveries: prometheus::IntCounterVec,
    timeout: Duration,
    sweep_every: Duration,
}

impl Receipts {
    /// The providers of `settings` that take receipts, over `store`; counted in `metrics`.
    pub fn new(
        store: MessageStore,
        callbacks: std::sync::Arc<super::Callbacks>,
        settings: &Settings,
        metrics: &crate::metrics::MessengerMetrics,
    ) -> Self {
        let providers = settings.receipt_providers().into_iter().collect();
        Self {
            store,
            in_flight: std::sync::Arc::new(tokio::sync::Semaphore::new(settings.receipts.max_in_flight)),
            floor: std::sync::Mutex::new(None),
            callbacks,
            providers,
            counted: metrics.receipts.clone(),
            deliveries: metrics.deliveries.clone(),
            timeout: Duration::from_secs_f64(settings.receipts.timeout_hours * 3600.0),
            sweep_every: Duration::from_secs(settings.receipts.sweep_seconds),
        }
    }

    /// Gives messages sent through a receipt-taking provider longer than `receipts.timeout_hours`
    /// ago, and still without a final receipt, the delivery state `unknown`: one bounded batch
    /// after where the last sweep stopped (the first starts a week behind the cutoff). Answers
    /// how many it marked and whether it caught up.
    ///
    /// Providers with their own `timeout_hours` are swept apart, each timeout with its own
    /// floor.
    pub async fn sweep_unknown(&self, now: DateTime) -> Result<(u64, bool), ServiceError> {
        let mut groups: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (name, settings) in &self.providers {
            let timeout = settings
                .timeout_hours
                .map_or(self.timeout, |h| Duration::from_secs_f64(h * 3600.0));
            groups.entry(timeout.as_millis() as u64).or_default().push(name.clone());
        }
        let unknown = DeliveryDoc::new(DeliveryState::Unknown, "no receipt in time", None, now);
        let (mut marked, mut caught_up) = (0, true);
        for (timeout_ms, providers) in groups {
            let sweep = if timeout_ms == self.timeout.as_millis() as u64 {
                DEFAULT_SWEEP.to_owned()
            } else {
                format!("{DEFAULT_SWEEP}:{timeout_ms}ms")
            };
            let cutoff = DateTime::from_millis(now.timestamp_millis() - timeout_ms as i64);
            let floor = match self.store.unknown_sweep_floor(&sweep).await? {
                Some(floor) => floor,
                None => DateTime::from_millis(cutoff.timestamp_millis() - FIRST_SWEEP_REACH.as_millis() as i64),
            };
            let (n, done) = self
                .store
                .mark_unknown_after(&sweep, &providers, floor, cutoff, SWEEP_BATCH, &unknown)
                .await?;
            marked += n;
            caught_up &= done;
        }
        if marked > 0 {
            self.counted.with_label_values(&["-", "timed_out"]).inc_by(marked);
        }
        Ok((marked, caught_up))
    }

    fn count(&self, provider: &str, result: &str) {
        self.counted.with_label_values(&[provider, result]).inc();
    }

    /// Checks, reads and applies one receipt.
    pub async fn take(&self, inbound: Inbound<'_>) -> Result<Taken, ServiceError> {
        let Some(settings) = self.providers.get(inbound.provider) else {
            return Err(ServiceError::ReceiptProviderUnknown(inbound.provider.to_owned()));
        };
        let provider = inbound.provider;
        let Ok(_slot) = self.in_flight.try_acquire() else {
            self.count(provider, "busy");
            return Err(ServiceError::ReceiptsBusy);
        };
        let is_form = inbound.content_type.is_some_and(|t| {
            t.split(';')
                .next()
                .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"))
        });
        let form: Vec<(String, String)> = if is_form {
            form_urlencoded::parse(inbound.body).into_owned().collect()
        } else {
            Vec::new()
        };
        let signed = Signed {
            header: inbound.header,
            body: inbound.body,
            url: inbound.url,
            form: &form,
        };
        if !verify(settings, &signed) {
            self.count(provider, "unauthorized");
            return Err(ServiceError::ReceiptUnauthorized(provider.to_owned()));
        }
        let fields = match Fields::read(is_form, &form, inbound.body) {
            Some(fields) => fields,
            None => {
                self.count(provider, "unreadable");
                return Err(unreadable("the body is neither a JSON object nor a form"));
            }
        };
        let (Some(id), Some(word)) = (
            fields.get(&settings.message_id_field),
            fields.get(&settings.status_field),
        ) else {
            self.count(provider, "unreadable");
            return Err(unreadable(&format!(
                "the receipt lacks {} or {}",
                settings.message_id_field, settings.status_field
            )));
        };
        let error_code = settings.error_code_field.as_deref().and_then(|f| fields.get(f));
        let state = settings.state_of(&word);
        let delivery = DeliveryDoc::new(state, &word, error_code, DateTime::now());
        let taken = match self.store.apply_receipt(provider, &id, &delivery).await? {
            Applied::Moved(message) => {
                self.moved(provider, &message, &delivery).await;
                self.tell(&message, state).await?;
                Taken::Applied(state)
            }
            Applied::Stale(message) => {
                // A replay of the receipt that moved it (the provider got no answer): its
                // callback is written again, a no-op unless the first answer never came.
                if message.delivery.as_ref().is_some_and(|d| d.state == state) {
                    self.tell(&message, state).await?;
                }
                Taken::Ignored
            }
            Applied::NoMessage => {
                self.store
                    .keep_pending_receipt(&PendingReceipt {
                        id: ObjectId::new(),
                        provider: provider.to_owned(),
                        webhook_message_id: id,
                        delivery,
                        received_at: DateTime::now(),
                    })
                    .await?;
                Taken::Pending
            }
        };
        self.count(
            provider,
            match taken {
                Taken::Applied(_) => "applied",
                Taken::Ignored => "ignored",
                Taken::Pending => "pending",
            },
        );
        Ok(taken)
    }

    /// Counts a moved delivery: in `/metrics`, and a final one (or `read`) with its latency
    /// from the send in the provider's hour of the stats. A failed count is logged, never
    /// the receipt's answer: the message already holds it.
    async fn moved(&self, provider: &str, message: &crate::domain::MessageDoc, delivery: &DeliveryDoc) {
        self.deliveries
            .with_label_values(&[provider, delivery.state.as_str()])
            .inc();
        let kind = match delivery.state {
            DeliveryState::Delivered => "delivered",
            DeliveryState::Undelivered | DeliveryState::Failed => "undelivered",
            DeliveryState::Read => "read",
            DeliveryState::Sent | DeliveryState::Unknown => return,
        };
        let latency = message.sent_at.map_or(0, |sent| {
            (delivery.at.timestamp_millis() - sent.timestamp_millis()).max(0) as u64
        });
        if let Err(error) = self
            .store
            .provider_stats()
            .record_receipt(provider, kind, latency, delivery.at)
            .await
        {
            tracing::warn!(error = %telemetry::Chain(&error), provider, "could not add a receipt to the provider statistics");
        }
    }

    /// Up to `limit` receipts that found no message, oldest first.
    pub async fn waiting(&self, limit: u32) -> Result<Vec<PendingReceipt>, ServiceError> {
        Ok(self.store.pending_receipts(i64::from(limit)).await?)
    }

    /// Writes the status callback of a delivery that moved, when its message asked for them.
    async fn tell(&self, message: &crate::domain::MessageDoc, state: DeliveryState) -> Result<(), ServiceError> {
        match super::event_of_delivery(state) {
            Some(event) => self.callbacks.on_message(message, event).await,
            None => Ok(()),
        }
    }

    /// Applies the receipts that waited for these commits — `(provider, provider id)` of
    /// messages just committed (or committed again): one indexed read per provider that takes
    /// receipts, nothing for one that takes none. Answers how many applied.
    pub async fn match_committed(&self, committed: &[(&str, &str)]) -> Result<usize, ServiceError> {
        let mut by_provider: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (provider, id) in committed {
            if self.providers.contains_key(*provider) {
                by_provider.entry(provider).or_default().push(id);
            }
        }
        let mut matched = 0;
        for (provider, ids) in by_provider {
            let waiting = self.store.pending_receipts_for(provider, &ids).await?;
            matched += self.apply_waiting(waiting).await?;
        }
        Ok(matched)
    }

    /// Applies the waiting receipts whose message has come, of those that came since the last
    /// round (the commits apply most of them as they land: this catches a receipt stored just
    /// after its commit looked). Each is looked at from [`MATCH_DELAY`] after it came, and the
    /// round moves on past it whether it matched or not, so receipts for ids Herald never sent
    /// cannot hold the others back. Answers how many applied.
    pub async fn match_pending(&self) -> Result<usize, ServiceError> {
        let now = DateTime::now();
        let until = DateTime::from_millis(now.timestamp_millis() - MATCH_DELAY.as_millis() as i64);
        let after = {
            let floor = *self.floor.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            floor.unwrap_or(DateTime::from_millis(
                until.timestamp_millis() - MATCH_REACH.as_millis() as i64,
            ))
        };
        let waiting = self.store.pending_receipts_between(after, until, MATCH_BATCH).await?;
        let next = if (waiting.len() as i64) < MATCH_BATCH {
            until
        } else {
            waiting.last().map_or(until, |r| r.received_at)
        };
        let matched = self.apply_waiting(waiting).await?;
        *self.floor.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(next);
        Ok(matched)
    }

    /// Applies those of `waiting` whose message is there now, and drops them.
    async fn apply_waiting(&self, waiting: Vec<PendingReceipt>) -> Result<usize, ServiceError> {
        let mut matched = 0;
        for receipt in waiting {
            let applied = self
                .store
                .apply_receipt(&receipt.provider, &receipt.webhook_message_id, &receipt.delivery)
                .await?;
            match applied {
                Applied::NoMessage => continue,
                Applied::Moved(message) => {
                    self.moved(&receipt.provider, &message, &receipt.delivery).await;
                    self.tell(&message, receipt.delivery.state).await?;
                }
                Applied::Stale(_) => {}
            }
            self.store.drop_pending_receipt(receipt.id).await?;
            self.count(&receipt.provider, "matched_late");
            matched += 1;
        }
        Ok(matched)
    }

    /// Matches waiting receipts every [`MATCH_EVERY`] until `stop`.
    pub fn spawn_matcher(self: std::sync::Arc<Self>, stop: CancellationToken) {
        if self.providers.is_empty() {
            return;
        }
        let matcher = self.clone();
        let halt = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = halt.cancelled() => return,
                    () = tokio::time::sleep(MATCH_EVERY) => {}
                }
                match matcher.match_pending().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(receipts = n, "receipts that came before their commit applied"),
                    Err(error) => tracing::debug!(error = %error, "waiting receipts not matched this round"),
                }
            }
        });
        tokio::spawn(async move {
            loop {
                // A sweep that did not catch up goes again at once, batch after batch.
                let wait = match self.sweep_unknown(DateTime::now()).await {
                    Ok((_, true)) => self.sweep_every,
                    Ok((marked, false)) => {
                        tracing::info!(marked, "messages with no receipt in time marked unknown; more to sweep");
                        Duration::ZERO
                    }
                    Err(error) => {
                        tracing::debug!(error = %error, "receipt timeout sweep waits for MongoDB");
                        self.sweep_every
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        });
    }
}

fn unreadable(why: &str) -> ServiceError {
    ServiceError::invalid(
        ErrorCode::ReceiptUnreadable,
        format!("The receipt cannot be read: {why}."),
    )
}

/// A receipt's fields: a JSON object (a field is a JSON pointer, or a top-level key) or a form.
enum Fields<'a> {
    Json(Value),
    Form(&'a [(String, String)]),
}

impl<'a> Fields<'a> {
    fn read(is_form: bool, form: &'a [(String, String)], body: &[u8]) -> Option<Self> {
        if is_form {
            return Some(Self::Form(form));
        }
        serde_json::from_slice::<Value>(body)
            .ok()
            .filter(Value::is_object)
            .map(Self::Json)
    }

    fn get(&self, field: &str) -> Option<String> {
        let text = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        match self {
            Self::Json(value) if field.starts_with('/') => value.pointer(field).and_then(text),
            Self::Json(value) => value.get(field).and_then(text),
            Self::Form(form) => form.iter().find(|(k, _)| k == field).map(|(_, v)| v.clone()),
        }
        .filter(|s| !s.trim().is_empty())
    }
}
