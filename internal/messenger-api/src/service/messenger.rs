//! The message rules: validation, the state machine, retry policy, and the order of commit
//! (MongoDB first, then the Redis cache).

use std::collections::HashMap;
use std::time::Duration;

use bson::oid::ObjectId;
use bson::DateTime;
use chrono::Utc;
use herald_core::mongo::after;
use herald_core::pagination::{Fetched, PageRequest};
use herald_core::settings::Settings;
use herald_core::ErrorCode;
use rand::Rng;

use crate::cache::{SentCache, SentEntry};
use crate::claimer::Claimer;
use crate::domain::{self, FailureKind, LastError, MessageDoc, MessageStatus};
use crate::error::ServiceError;
use crate::metrics::MessengerMetrics;
use crate::store::{ClaimWrite, CommitOutcome, MessageStore, TransitionOutcome};
use herald_core::worker::{Outcome, OutcomeReport, OutcomeResult, OutcomeResults, MAX_OUTCOMES};

/// Most messages in one batch create.
pub const MAX_BATCH: usize = 1000;
/// Most messages one bulk re-queue call changes (call again for the rest).
pub const MAX_REQUEUE: usize = 1000;
/// Most messages in one claim.
pub const MAX_CLAIM: u32 = 500;
/// Longest kept error detail, in bytes.
pub const MAX_ERROR_DETAIL: usize = 4096;

/// The knobs the rules need, taken from the settings once.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Content limit in characters.
    pub max_chars: usize,
    /// Lease used when a claimer names none.
    pub default_lease: Duration,
    /// Delay before retry n, in seconds.
    pub retry_schedule: Vec<u64>,
    /// Jitter in percent.
    pub jitter_percent: u32,
    /// Cap on a provider's Retry-After, in seconds.
    pub max_retry_after: u64,
    /// Furthest `sendAt`, from now.
    pub max_schedule: Duration,
}

impl Rules {
    /// Takes the rules out of the settings.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            max_chars: settings.message.max_chars,
            default_lease: Duration::from_secs(settings.job_scheduler.lease_seconds),
            retry_schedule: settings.delivery.retry_schedule_seconds.clone(),
            jitter_percent: settings.delivery.jitter_percent,
            max_retry_after: settings.webhook.max_retry_after_seconds,
            max_schedule: Duration::from_secs(settings.message.max_schedule_days * 86_400),
        }
    }

    /// The limits a new message is checked against.
    pub fn limits(&self) -> domain::Limits {
        domain::Limits {
            max_chars: self.max_chars,
            max_schedule: self.max_schedule,
        }
    }

    /// Where a failed attempt leaves `current`: pending at the next retry time, or failed
    /// (permanent, or out of retries), and the error to keep.
    pub fn after_failure(
        &self,
        current: &MessageDoc,
        report: FailureReport,
        stamp: DateTime,
    ) -> (MessageStatus, DateTime, LastError) {
        let delay = if report.retryable {
            self.retry_delay(current.attempts, report.retry_after_seconds)
        } else {
            None
        };
        let (mut status, mut next_attempt_at) = match delay {
            Some(delay) => (MessageStatus::Pending, after(stamp, delay)),
            None => (MessageStatus::Failed, stamp),
        };
        let mut detail = truncate(report.detail, MAX_ERROR_DETAIL);
        if report.retryable && delay.is_none() {
            detail = format!("retries exhausted after {} attempts: {detail}", current.attempts);
        }
        if status == MessageStatus::Pending && current.expires_at.is_some_and(|end| next_attempt_at >= end) {
            // The retry would come too late: the message expires now instead.
            status = MessageStatus::Expired;
            next_attempt_at = stamp;
        }
        let error = LastError {
            kind: report.kind,
            status: report.status,
            detail,
            at: stamp,
        };
        (status, next_attempt_at, error)
    }

    /// The delay before the next attempt after `attempts` attempts, or `None` when retries are
    /// exhausted. A provider's `retry_after` (capped) is a floor.
    pub fn retry_delay(&self, attempts: i32, retry_after: Option<u64>) -> Option<Duration> {
        let index = usize::try_from(attempts.max(1) - 1).ok()?;
        let base = *self.retry_schedule.get(index)? as f64;
        let spread = f64::from(self.jitter_percent) / 100.0;
        let factor = if spread > 0.0 {
            rand::rng().random_range(1.0 - spread..=1.0 + spread)
        } else {
            1.0
        };
        let mut seconds = base * factor;
        if let Some(after) = retry_after {
            seconds = seconds.max(after.min(self.max_retry_after) as f64);
        }
        Some(Duration::from_secs_f64(seconds))
    }
}

/// Input of a failure report.
#[derive(Debug, Clone)]
pub struct FailureReport {
    /// How it failed.
    pub kind: FailureKind,
    /// Provider status.
    pub status: Option<i32>,
    /// Detail (cut to 4 KiB).
    pub detail: String,
    /// Whether another attempt may help.
    pub retryable: bool,
    /// The provider's Retry-After, in seconds.
    pub retry_after_seconds: Option<u64>,
}

/// Which failed messages a bulk re-queue takes.
#[derive(Debug, Clone)]
pub struct RequeueFilter {
    /// Must be `failed`.
    pub status: MessageStatus,
    /// Created at or after.
    pub created_from: Option<chrono::DateTime<Utc>>,
    /// Created at or before.
    pub created_to: Option<chrono::DateTime<Utc>>,
    /// To this number.
    pub to: Option<String>,
}

/// What a bulk re-queue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkRequeue {
    /// Failed messages matching the filter when the call began.
    pub matched: u64,
    /// Re-queued by this call.
    pub requeued: u64,
    /// Still matching after it: call again.
    pub remaining: u64,
}

/// The outcome of a commit.
#[derive(Debug)]
pub struct Committed {
    /// The message after the commit.
    pub message: MessageDoc,
    /// Whether the Redis entry was written.
    pub cached: bool,
}

/// Messages and their life: create, list, claim, commit, fail, release, re-queue.
pub struct MessengerService {
    store: MessageStore,
    claimer: Claimer,
    cache: SentCache,
    rules: Rules,
    metrics: MessengerMetrics,
}

fn now() -> DateTime {
    DateTime::now()
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

impl MessengerService {
    /// The service over `store`, caching commits in `cache`.
    pub fn new(store: MessageStore, cache: SentCache, rules: Rules, metrics: MessengerMetrics) -> Self {
        Self {
            claimer: Claimer::new(store.clone(), metrics.expired.with_label_values(&["claim"])),
            store,
            cache,
            rules,
            metrics,
        }
    }

    /// Creates one message. With an idempotency key, a repeat with the same body returns the
    /// first message (`false`), another body is a conflict.
    pub async fn create(
        &self,
        draft: domain::Draft<'_>,
        idempotency_key: Option<String>,
    ) -> Result<(MessageDoc, bool), ServiceError> {
        let valid = domain::validate(draft, self.rules.limits(), Utc::now())?;
        if let Some(key) = &idempotency_key {
            if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ServiceError::invalid(
                    ErrorCode::InvalidIdempotencyKey,
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                ));
            }
            if let Some(existing) = self.store.find_by_idempotency_key(key).await? {
                return same_body(existing, &valid).map(|m| (m, false));
            }
        }
        let message = MessageDoc::new_pending(valid.clone(), idempotency_key.clone(), now());
        match self.store.insert(&message).await {
            Ok(()) => Ok((message, true)),
            Err(crate::error::StoreError::AlreadyExists) => {
                // Lost a race with a concurrent request carrying the same key.
                let key = idempotency_key.unwrap_or_default();
                let existing = self
                    .store
                    .find_by_idempotency_key(&key)
                    .await?
                    .ok_or(ServiceError::IdempotencyConflict)?;
                same_body(existing, &valid).map(|m| (m, false))
            }
            Err(other) => Err(other.into()),
        }
    }

    /// Creates all of `items` or none; a bad item is named by index.
    pub async fn create_batch(&self, items: &[domain::Draft<'_>]) -> Result<Vec<MessageDoc>, ServiceError> {
        if items.is_empty() || items.len() > MAX_BATCH {
            return Err(ServiceError::invalid(
                ErrorCode::BatchSize,
                format!("a batch holds 1 to {MAX_BATCH} messages; this one has {}", items.len()),
            ));
        }
        let stamp = now();
        let limits = self.rules.limits();
        let mut problems = Vec::new();
        let mut docs = Vec::with_capacity(items.len());
        for (index, draft) in items.iter().enumerate() {
            match domain::validate(*draft, limits, stamp.to_chrono()) {
                Ok(valid) => docs.push(MessageDoc::new_pending(valid, None, stamp)),
                Err(error) => problems.push(format!("messages[{index}]: {error}")),
            }
        }
        if !problems.is_empty() {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidBatch,
                format!(
                    "{} invalid item(s), nothing stored: {}",
                    problems.len(),
                    problems.join("; ")
                ),
            ));
        }
        self.store.insert_many(&docs).await?;
        Ok(docs)
    }

    /// A page of messages, newest first, optionally of one status and/or recipient; counted
    /// in all only `with_total`.
    pub async fn list(
        &self,
        status: Option<&str>,
        to: Option<&str>,
        page: &PageRequest,
        with_total: bool,
    ) -> Result<Fetched<MessageDoc>, ServiceError> {
        let to = to.map(domain::validate_phone).transpose()?;
        let status = match status {
            None => None,
            Some(text) => Some(MessageStatus::parse(text).ok_or_else(|| {
                ServiceError::invalid(
                    ErrorCode::InvalidStatusFilter,
                    "status must be pending, processing, sent, failed or expired",
                )
            })?),
        };
        Ok(self.store.list(status, to.as_deref(), page, with_total).await?)
    }

    /// A page of sent messages, newest `sent_at` first; counted in all only `with_total`.
    pub async fn list_sent(&self, page: &PageRequest, with_total: bool) -> Result<Fetched<MessageDoc>, ServiceError> {
        Ok(self.store.list_sent(page, with_total).await?)
    }

    /// One message.
    pub async fn get(&self, id: &str) -> Result<MessageDoc, ServiceError> {
        let id = domain::parse_id(id)?;
        self.store.find(id).await?.ok_or(ServiceError::NotFound)
    }

    /// Operator re-queue of a failed message.
    pub async fn retry(&self, id: &str) -> Result<MessageDoc, ServiceError> {
        let id = domain::parse_id(id)?;
        match self.store.requeue_failed(id, now()).await? {
            TransitionOutcome::Done(doc) => {
                self.metrics.requeued.with_label_values(&["one"]).inc();
                tracing::info!(target: "herald::audit", action = "requeue", message_id = %id, "operator re-queue");
                Ok(doc)
            }
            TransitionOutcome::Conflict(doc) => Err(ServiceError::NotFailed(doc.status.as_str())),
            TransitionOutcome::NotFound => Err(ServiceError::NotFound),
        }
    }

    /// Operator bulk re-queue of failed messages matching `filter`: counts them, and unless
    /// `dry_run` re-queues up to [`MAX_REQUEUE`] of them (oldest first). Idempotent: a message
    /// re-queued is no longer failed, so a second call does not touch it again.
    pub async fn requeue_many(&self, filter: &RequeueFilter, dry_run: bool) -> Result<BulkRequeue, ServiceError> {
        let bad = |msg: String| ServiceError::invalid(ErrorCode::InvalidRequeueFilter, msg);
        if filter.status != MessageStatus::Failed {
            return Err(bad(format!(
                "only failed messages can be re-queued; the filter asks for {}",
                filter.status.as_str()
            )));
        }
        if let (Some(from), Some(to)) = (filter.created_from, filter.created_to) {
            if from > to {
                return Err(bad("createdFrom must not be after createdTo".into()));
            }
        }
        let mut query = bson::Document::new();
        let mut created = bson::Document::new();
        if let Some(from) = filter.created_from {
            created.insert("$gte", DateTime::from_chrono(from));
        }
        if let Some(to) = filter.created_to {
            created.insert("$lte", DateTime::from_chrono(to));
        }
        if !created.is_empty() {
            query.insert("created_at", created);
        }
        if let Some(to) = &filter.to {
            let to = domain::validate_phone(to).map_err(|e| bad(e.to_string()))?;
            query.insert("to", to);
        }
        let matched = self.store.count_failed(query.clone()).await?;
        let requeued = if dry_run || matched == 0 {
            0
        } else {
            self.store.requeue_failed_matching(query, MAX_REQUEUE, now()).await?
        };
        self.metrics.requeued.with_label_values(&["bulk"]).inc_by(requeued);
        tracing::info!(
            target: "herald::audit",
            action = "bulk_requeue",
            dry_run,
            created_from = ?filter.created_from,
            created_to = ?filter.created_to,
            to = filter.to.as_deref().map(telemetry::mask_phone).unwrap_or_default(),
            matched,
            requeued,
            "operator bulk re-queue"
        );
        Ok(BulkRequeue {
            matched,
            requeued,
            remaining: matched.saturating_sub(requeued),
        })
    }

    /// Claims up to `limit` due messages for `worker`.
    pub async fn claim(
        &self,
        worker: &str,
        limit: Option<u32>,
        lease_seconds: Option<u64>,
    ) -> Result<Vec<MessageDoc>, ServiceError> {
        let bad = |msg: &str| ServiceError::invalid(ErrorCode::InvalidClaimRequest, msg);
        let worker = worker.trim();
        if worker.is_empty() || worker.len() > 200 {
            return Err(bad("worker must be 1 to 200 characters"));
        }
        let limit = limit.unwrap_or(2);
        if !(1..=MAX_CLAIM).contains(&limit) {
            return Err(bad("limit must be 1..=500"));
        }
        let lease = match lease_seconds {
            None => self.rules.default_lease,
            Some(s) if (1..=3600).contains(&s) => Duration::from_secs(s),
            Some(_) => return Err(bad("leaseSeconds must be 1..=3600")),
        };
        let claimed = self.claimer.claim(worker, limit as usize, lease).await?;
        self.metrics.claimed.inc_by(claimed.len() as u64);
        Ok(claimed)
    }

    /// Marks a claimed message sent (MongoDB), then caches the provider id (Redis). Idempotent
    /// for the same claim; a lost claim is a conflict and Redis is not touched.
    pub async fn commit(
        &self,
        id: &str,
        claim_token: &str,
        webhook_message_id: Option<&str>,
        sent_at: Option<chrono::DateTime<Utc>>,
    ) -> Result<Committed, ServiceError> {
        let oid = domain::parse_id(id)?;
        let sent_at = sent_at.map(DateTime::from_chrono).unwrap_or_else(now);
        let webhook_message_id = webhook_message_id.map(str::trim).filter(|m| !m.is_empty());
        let (message, first) = match self
            .store
            .commit_sent(oid, claim_token, webhook_message_id, sent_at, now())
            .await?
        {
            CommitOutcome::Committed(doc) => {
                self.metrics.commits.with_label_values(&["committed"]).inc();
                (doc, true)
            }
            CommitOutcome::AlreadyCommitted(doc) => {
                self.metrics.commits.with_label_values(&["replayed"]).inc();
                (doc, false)
            }
            CommitOutcome::ClaimLost => {
                self.metrics.commits.with_label_values(&["claim_lost"]).inc();
                return Err(ServiceError::ClaimLost);
            }
            CommitOutcome::NotFound => return Err(ServiceError::NotFound),
        };
        let accepted_at = message.sent_at.unwrap_or(sent_at);
        let entry = SentEntry {
            message_id: message.webhook_message_id.clone(),
            sent_at: accepted_at
                .to_chrono()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        let minute = first.then(|| accepted_at.timestamp_millis().div_euclid(60_000));
        let cached = match self.cache.put_sent(id, &entry, minute).await {
            Ok(()) => true,
            Err(error) => {
                self.metrics.cache_write_failures.inc();
                self.cache.note_missed(accepted_at.timestamp_millis());
                tracing::warn!(message_id = id, error = %telemetry::Chain(&error), "message committed but the Redis cache entry was not written; the repair will write it");
                false
            }
        };
        Ok(Committed { message, cached })
    }

    /// Records a failed attempt: retry later per the schedule, or `failed` when permanent or
    /// exhausted.
    pub async fn fail(&self, id: &str, claim_token: &str, report: FailureReport) -> Result<MessageDoc, ServiceError> {
        let oid = domain::parse_id(id)?;
        let current = self.store.find(oid).await?.ok_or(ServiceError::NotFound)?;
        if current.claim_token.as_deref() != Some(claim_token) {
            return Err(ServiceError::ClaimLost);
        }
        if current.status != MessageStatus::Processing {
            // The same claim reported twice: answer with what the first report did.
            return match current.status {
                MessageStatus::Pending | MessageStatus::Failed | MessageStatus::Expired => Ok(current),
                _ => Err(ServiceError::ClaimLost),
            };
        }
        let stamp = now();
        let (status, next_attempt_at, error) = self.rules.after_failure(&current, report, stamp);
        match self
            .store
            .record_failure(oid, claim_token, status, next_attempt_at, &error, stamp)
            .await?
        {
            TransitionOutcome::Done(doc) => {
                self.count_failure(status);
                Ok(doc)
            }
            TransitionOutcome::Conflict(_) => Err(ServiceError::ClaimLost),
            TransitionOutcome::NotFound => Err(ServiceError::NotFound),
        }
    }

    fn count_failure(&self, status: MessageStatus) {
        let label = match status {
            MessageStatus::Failed => "failed",
            MessageStatus::Expired => {
                self.metrics.expired.with_label_values(&["retry"]).inc();
                "expired"
            }
            _ => "retry_scheduled",
        };
        self.metrics.failures.with_label_values(&[label]).inc();
    }

    /// Applies many outcomes at once: one unordered bulk write whose every update stays
    /// conditional on its claim, and one Redis pipeline for the commits. Only failures need the
    /// message first (its attempts decide retry or fail); anything a write did not match is
    /// read back once and answered as it stands. Each outcome gets its own result; a repeated
    /// report answers what the first one did.
    pub async fn report_outcomes(&self, outcomes: Vec<Outcome>) -> Result<OutcomeResults, ServiceError> {
        if outcomes.is_empty() || outcomes.len() > MAX_OUTCOMES {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidOutcomes,
                format!(
                    "a report holds 1 to {MAX_OUTCOMES} outcomes; this one has {}",
                    outcomes.len()
                ),
            ));
        }
        let ids: Vec<Option<ObjectId>> = outcomes.iter().map(|o| ObjectId::parse_str(o.id()).ok()).collect();
        let mut unique: Vec<ObjectId> = ids.iter().flatten().copied().collect();
        unique.sort();
        unique.dedup();
        if unique.len() != ids.iter().flatten().count() {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidOutcomes,
                "each message may appear once in a report",
            ));
        }
        let failing: Vec<ObjectId> = outcomes
            .iter()
            .zip(&ids)
            .filter(|(o, _)| matches!(o, Outcome::Failed(_)))
            .filter_map(|(_, id)| *id)
            .collect();
        let before: HashMap<ObjectId, MessageDoc> = self
            .store
            .find_many(&failing)
            .await?
            .into_iter()
            .map(|m| (m.id, m))
            .collect();
        let stamp = now();
        let mut reports = Vec::with_capacity(outcomes.len());
        let mut writes = Vec::new();
        let mut planned: Vec<Planned> = Vec::new();
        for (index, (outcome, id)) in outcomes.into_iter().zip(ids).enumerate() {
            let Some(id) = id else {
                reports.push(OutcomeReport {
                    id: outcome.id().to_owned(),
                    result: OutcomeResult::InvalidId,
                    status: None,
                });
                continue;
            };
            reports.push(OutcomeReport {
                id: outcome.id().to_owned(),
                result: OutcomeResult::NotFound,
                status: None,
            });
            let (write, status, result, commit) = match &outcome {
                Outcome::Sent(o) => {
                    let sent_at = o.sent_at.map(DateTime::from_chrono).unwrap_or(stamp);
                    let mid = o.webhook_message_id.as_deref().map(str::trim).filter(|m| !m.is_empty());
                    let entry = SentEntry {
                        message_id: mid.map(str::to_owned),
                        sent_at: sent_at.to_chrono().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    };
                    let write = ClaimWrite::sent(id, &o.claim_token, mid, sent_at, stamp);
                    (write, MessageStatus::Sent, OutcomeResult::Committed, Some(entry))
                }
                Outcome::Released(o) => (
                    ClaimWrite::release(id, &o.claim_token, stamp),
                    MessageStatus::Pending,
                    OutcomeResult::Released,
                    None,
                ),
                Outcome::Expired(o) => (
                    ClaimWrite::expire(id, &o.claim_token, stamp),
                    MessageStatus::Expired,
                    OutcomeResult::Expired,
                    None,
                ),
                Outcome::Failed(o) => {
                    let held = before.get(&id).filter(|d| {
                        d.status == MessageStatus::Processing && d.claim_token.as_deref() == Some(&o.claim_token)
                    });
                    let Some(doc) = held else {
                        // Not held under this claim: answered from what is read back below.
                        planned.push(Planned {
                            index,
                            id,
                            outcome,
                            write: None,
                        });
                        continue;
                    };
                    let failure = FailureReport {
                        kind: o.error.kind,
                        status: o.error.status.map(i32::from),
                        detail: o.error.detail.clone(),
                        retryable: o.retryable,
                        retry_after_seconds: o.retry_after_seconds,
                    };
                    let (status, next, error) = self.rules.after_failure(doc, failure, stamp);
                    let result = match status {
                        MessageStatus::Failed => OutcomeResult::Failed,
                        MessageStatus::Expired => OutcomeResult::Expired,
                        _ => OutcomeResult::RetryScheduled,
                    };
                    (
                        ClaimWrite::failure(id, &o.claim_token, status, next, &error, stamp)?,
                        status,
                        result,
                        None,
                    )
                }
            };
            writes.push(write);
            planned.push(Planned {
                index,
                id,
                outcome,
                write: Some((status, result, commit)),
            });
        }
        let expected = writes.len() as u64;
        let matched = self.store.apply_claim_writes(writes).await?;
        // Some write did not match (a repeated report, a lost claim, an unknown id), or some
        // failure was not held: read those messages back once and answer as they stand.
        let unsettled = matched < expected || planned.iter().any(|p| p.write.is_none());
        let now_held: HashMap<ObjectId, MessageDoc> = if unsettled {
            let planned_ids: Vec<ObjectId> = planned.iter().map(|p| p.id).collect();
            let docs = self.store.find_many(&planned_ids).await?;
            docs.into_iter().map(|m| (m.id, m)).collect()
        } else {
            HashMap::new()
        };
        let mut commits = Vec::new();
        for plan in planned {
            let report = &mut reports[plan.index];
            let current = now_held.get(&plan.id);
            let token = plan.outcome.claim_token();
            let applied = plan.write.as_ref().is_some_and(|(status, ..)| {
                !unsettled
                    || current.is_some_and(|d| {
                        d.status == *status && d.updated_at == stamp && d.claim_token.as_deref() == Some(token)
                    })
            });
            match (applied, plan.write, current) {
                (true, Some((status, result, commit)), _) => {
                    report.status = Some(status);
                    report.result = result;
                    match (&plan.outcome, result) {
                        (_, OutcomeResult::Committed) => self.metrics.commits.with_label_values(&["committed"]).inc(),
                        (Outcome::Failed(_), _) => self.count_failure(status),
                        (Outcome::Expired(_), _) => self.metrics.expired.with_label_values(&["worker"]).inc(),
                        _ => {}
                    }
                    if let Some(entry) = commit {
                        commits.push((report.id.clone(), entry));
                    }
                }
                (_, _, None) => {} // not found
                (_, _, Some(doc)) => {
                    report.status = Some(doc.status);
                    report.result = if doc.claim_token.as_deref() == Some(token) {
                        replayed(&plan.outcome, doc.status)
                    } else {
                        OutcomeResult::ClaimLost
                    };
                    if report.result == OutcomeResult::ClaimLost {
                        self.metrics.commits.with_label_values(&["claim_lost"]).inc();
                    }
                }
            }
        }
        Ok(OutcomeResults {
            cached: self.cache_commits(&commits, stamp).await,
            items: reports,
        })
    }

    /// Caches first commits in one pipeline; false when Redis could not take them.
    async fn cache_commits(&self, commits: &[(String, SentEntry)], stamp: DateTime) -> bool {
        if commits.is_empty() {
            return true;
        }
        let minute = stamp.timestamp_millis().div_euclid(60_000);
        match self.cache.put_sent_many(commits, minute).await {
            Ok(()) => true,
            Err(error) => {
                self.metrics.cache_write_failures.inc_by(commits.len() as u64);
                let earliest = commits
                    .iter()
                    .filter_map(|(_, entry)| chrono::DateTime::parse_from_rfc3339(&entry.sent_at).ok())
                    .map(|at| at.timestamp_millis())
                    .min()
                    .unwrap_or(stamp.timestamp_millis());
                self.cache.note_missed(earliest);
                tracing::warn!(
                    messages = commits.len(),
                    error = %telemetry::Chain(&error),
                    "messages committed but their Redis cache entries were not written; the repair will write them"
                );
                false
            }
        }
    }

    /// Gives an unsent claim back (graceful shutdown).
    pub async fn release(&self, id: &str, claim_token: &str) -> Result<MessageDoc, ServiceError> {
        let oid = domain::parse_id(id)?;
        match self.store.release(oid, claim_token, now()).await? {
            TransitionOutcome::Done(doc) => Ok(doc),
            TransitionOutcome::Conflict(doc)
                if doc.status == MessageStatus::Pending && doc.claim_token.as_deref() == Some(claim_token) =>
            {
                Ok(doc)
            }
            TransitionOutcome::Conflict(_) => Err(ServiceError::ClaimLost),
            TransitionOutcome::NotFound => Err(ServiceError::NotFound),
        }
    }
}

/// An outcome on its way through the bulk update: the write it made, if any, as the status
/// and result it gives and the cache entry of a commit.
struct Planned {
    index: usize,
    id: ObjectId,
    outcome: Outcome,
    write: Option<(MessageStatus, OutcomeResult, Option<SentEntry>)>,
}

/// What a repeated report of an outcome answers, given where the message already is.
fn replayed(outcome: &Outcome, status: MessageStatus) -> OutcomeResult {
    match (outcome, status) {
        (Outcome::Sent(_), MessageStatus::Sent) => OutcomeResult::AlreadyCommitted,
        (Outcome::Failed(_), MessageStatus::Pending) => OutcomeResult::RetryScheduled,
        (Outcome::Failed(_), MessageStatus::Failed) => OutcomeResult::Failed,
        (Outcome::Failed(_), MessageStatus::Expired) => OutcomeResult::Expired,
        (Outcome::Released(_), MessageStatus::Pending) => OutcomeResult::Released,
        (Outcome::Expired(_), MessageStatus::Expired) => OutcomeResult::Expired,
        _ => OutcomeResult::ClaimLost,
    }
}

fn same_body(existing: MessageDoc, valid: &domain::ValidMessage) -> Result<MessageDoc, ServiceError> {
    let schedule = domain::Schedule {
        send_at: existing.send_at,
        expires_at: existing.expires_at,
    };
    if existing.to == valid.to && existing.content == valid.content && schedule == valid.schedule {
        Ok(existing)
    } else {
        Err(ServiceError::IdempotencyConflict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(jitter: u32) -> Rules {
        Rules {
            max_chars: 160,
            default_lease: Duration::from_secs(30),
            retry_schedule: vec![5, 300, 1800],
            jitter_percent: jitter,
            max_retry_after: 3600,
            max_schedule: Duration::from_secs(30 * 86_400),
        }
    }

    #[test]
    fn retry_delays_follow_the_schedule_and_run_out() {
        let r = rules(0);
        assert_eq!(r.retry_delay(1, None), Some(Duration::from_secs(5)));
        assert_eq!(r.retry_delay(3, None), Some(Duration::from_secs(1800)));
        assert_eq!(r.retry_delay(4, None), None);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let r = rules(20);
        for _ in 0..200 {
            let d = r.retry_delay(2, None).unwrap().as_secs_f64();
            assert!((240.0..=360.0).contains(&d), "{d}");
        }
    }

    #[test]
    fn retry_after_is_a_capped_floor() {
        let r = rules(0);
        assert_eq!(r.retry_delay(1, Some(60)), Some(Duration::from_secs(60)));
        assert_eq!(r.retry_delay(1, Some(1)), Some(Duration::from_secs(5)));
        assert_eq!(r.retry_delay(1, Some(999_999)), Some(Duration::from_secs(3600)));
    }
}
