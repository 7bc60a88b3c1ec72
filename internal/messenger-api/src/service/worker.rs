//! What a worker does to messages: claim due ones, then report what became of each — sent
//! (commit), failed (retry later or fail for good), released, expired.
//!
//! Every outcome goes through one path, [`MessengerService::report_outcomes`]: the writes are
//! planned once, applied with one unordered bulk write in which each update stays conditional
//! on its claim, and the commits cached with one Redis pipeline (MongoDB first, then Redis).
//! The single `commit`, `fail` and `release` routes are one-item reports
//! ([`MessengerService::report_one`]).

use std::collections::HashMap;
use std::time::Duration;

use bson::oid::ObjectId;
use bson::DateTime;
use herald_core::worker::{
    AttemptRecord, ExtendResults, HeldClaim, Outcome, OutcomeReport, OutcomeResult, OutcomeResults, MAX_OUTCOMES,
};
use herald_core::ErrorCode;

use herald_core::callbacks::CallbackEvent;

use super::{event_of_status, now, MessengerService};
use crate::cache::SentEntry;
use crate::domain::{self, MessageDoc, MessageStatus};
use crate::error::ServiceError;
use crate::store::{Accepted, ClaimWrite};

/// Longest a release may hold a message back for a paused provider.
pub const MAX_WAIT_SECONDS: u64 = 3600;

/// The attempts as stored, the last [`herald_core::worker::ATTEMPTS_LOG_LEN`] at most.
fn attempt_docs(attempts: &[herald_core::worker::AttemptRecord]) -> Vec<domain::AttemptDoc> {
    let keep = attempts.len().saturating_sub(herald_core::worker::ATTEMPTS_LOG_LEN);
    attempts[keep..].iter().map(Into::into).collect()
}

/// When a release that waits for a provider makes the message due again.
fn wait_until(wait_seconds: Option<u64>, stamp: DateTime) -> Result<Option<DateTime>, ServiceError> {
    match wait_seconds {
        None => Ok(None),
        Some(s) if (1..=MAX_WAIT_SECONDS).contains(&s) => {
            Ok(Some(herald_core::mongo::after(stamp, Duration::from_secs(s))))
        }
        Some(_) => Err(ServiceError::invalid(
            ErrorCode::InvalidOutcomes,
            format!("waitSeconds must be 1..={MAX_WAIT_SECONDS}"),
        )),
    }
}

/// Most messages in one claim.
pub const MAX_CLAIM: u32 = 500;

/// A message after a one-item report, and whether a commit's Redis entry was written.
#[derive(Debug)]
pub struct Reported {
    /// The message as it is now.
    pub message: MessageDoc,
    /// False when Redis could not take a commit's entry (the commit still stands).
    pub cached: bool,
}

/// An outcome on its way through the bulk update: the write it made, if any, as the status
/// and result it gives and the cache entry of a commit.
struct Planned {
    index: usize,
    id: ObjectId,
    outcome: Outcome,
    write: Option<(MessageStatus, OutcomeResult, Option<SentEntry>)>,
}

/// The write one outcome makes, the status and result it gives, and a commit's cache entry.
type Plan = (ClaimWrite, MessageStatus, OutcomeResult, Option<SentEntry>);

/// A `sent:<id>` entry to write, and the minute to count it in (a first commit only).
type CacheWrite = (String, SentEntry, Option<i64>);

fn sent_entry(webhook_message_id: Option<&str>, sent_at: DateTime) -> SentEntry {
    SentEntry {
        message_id: webhook_message_id.map(str::to_owned),
        sent_at: sent_at.to_chrono().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }
}

fn minute_of(at: DateTime) -> i64 {
    at.timestamp_millis().div_euclid(60_000)
}

impl MessengerService {
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
            None => self.policy.default_lease,
            Some(s) if (1..=3600).contains(&s) => Duration::from_secs(s),
            Some(_) => return Err(bad("leaseSeconds must be 1..=3600")),
        };
        let claim = self.store.claim_due(worker, limit as usize, lease).await?;
        if claim.expired > 0 {
            self.metrics.expired.with_label_values(&["claim"]).inc_by(claim.expired);
            let ended: Vec<_> = claim
                .expired_ids
                .iter()
                .map(|id| (*id, CallbackEvent::Expired))
                .collect();
            if let Err(error) = self.callbacks.on_transitions(&ended).await {
                // The messages stay expired; their callbacks are not written again by anyone.
                tracing::warn!(error = %error, messages = ended.len(), "could not write the callbacks of messages expired at claim");
            }
        }
        self.metrics.claimed.inc_by(claim.messages.len() as u64);
        Ok(claim.messages)
    }

    /// Reports one outcome (the single `commit`, `fail` and `release` routes) and answers the
    /// message as it is after it: a repeated report answers what the first one did; a claim no
    /// longer held is `ServiceError::ClaimLost`.
    pub async fn report_one(&self, outcome: Outcome) -> Result<Reported, ServiceError> {
        let id = domain::parse_id(outcome.id())?;
        let results = self.report_outcomes(vec![outcome]).await?;
        match results.items.first().map(|r| r.result) {
            Some(OutcomeResult::ClaimLost) => Err(ServiceError::ClaimLost),
            Some(OutcomeResult::NotFound | OutcomeResult::InvalidId) | None => Err(ServiceError::NotFound),
            Some(_) => Ok(Reported {
                message: self.store.find(id).await?.ok_or(ServiceError::NotFound)?,
                cached: results.cached,
            }),
        }
    }

    /// Keeps the claims in `items` that are still held for `lease_seconds` more from now (the
    /// default lease when absent; never shortening one): a worker whose reports are slow to
    /// land keeps its messages from being handed to another worker and sent twice.
    pub async fn extend(
        &self,
        items: Vec<HeldClaim>,
        lease_seconds: Option<u64>,
    ) -> Result<ExtendResults, ServiceError> {
        let bad = |msg: String| ServiceError::invalid(ErrorCode::InvalidExtendRequest, msg);
        if items.is_empty() || items.len() > MAX_OUTCOMES {
            return Err(bad(format!(
                "an extension holds 1 to {MAX_OUTCOMES} claims; this one has {}",
                items.len()
            )));
        }
        let lease = match lease_seconds {
            None => self.policy.default_lease,
            Some(s) if (1..=3600).contains(&s) => Duration::from_secs(s),
            Some(_) => return Err(bad("leaseSeconds must be 1..=3600".to_owned())),
        };
        let mut claims = Vec::with_capacity(items.len());
        for item in items {
            let id =
                ObjectId::parse_str(&item.id).map_err(|_| bad(format!("{:?} is not a 24-hex message id", item.id)))?;
            claims.push((id, item.claim_token));
        }
        let mut ids: Vec<ObjectId> = claims.iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        if ids.len() != claims.len() {
            return Err(bad("each message may appear once in an extension".to_owned()));
        }
        let until = herald_core::mongo::after(bson::DateTime::now(), lease);
        let extended = self.store.extend_claims(&claims, until).await?;
        self.metrics
            .claims_extended
            .with_label_values(&["held"])
            .inc_by(extended);
        self.metrics
            .claims_extended
            .with_label_values(&["lost"])
            .inc_by(claims.len() as u64 - extended.min(claims.len() as u64));
        Ok(ExtendResults {
            extended,
            lease_until: until.to_chrono(),
        })
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
            reports.push(OutcomeReport {
                id: outcome.id().to_owned(),
                result: match id {
                    Some(_) => OutcomeResult::NotFound,
                    None => OutcomeResult::InvalidId,
                },
                status: None,
            });
            let Some(id) = id else { continue };
            let write = self.plan(&outcome, id, before.get(&id), stamp)?;
            if let Some((write, ..)) = &write {
                writes.push(write.clone());
            }
            planned.push(Planned {
                index,
                id,
                outcome,
                write: write.map(|(_, status, result, entry)| (status, result, entry)),
            });
        }
        let expected = writes.len() as u64;
        let matched = self.store.apply_outcomes(writes).await?;
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
        let mut cache_writes: Vec<CacheWrite> = Vec::new();
        let mut attempts: Vec<AttemptRecord> = Vec::new();
        // Transitions done now or reported again with the same claim: their callbacks (a
        // repeat writes nothing new).
        let mut changed: Vec<(ObjectId, CallbackEvent)> = Vec::new();
        // Commits (first or repeated) by provider and provider id: receipts may wait for them.
        let mut committed: Vec<(String, String)> = Vec::new();
        // Outcomes reported before with the same claim.
        let mut replays = 0;
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
                    changed.extend(event_of_status(status).map(|e| (plan.id, e)));
                    if let Outcome::Sent(o) = &plan.outcome {
                        if let (Some(provider), Some(mid)) = (&o.commit.provider, &o.commit.webhook_message_id) {
                            committed.push((provider.clone(), mid.trim().to_owned()));
                        }
                    }
                    report.status = Some(status);
                    report.result = result;
                    attempts.extend(plan.outcome.attempts().iter().cloned());
                    self.count_outcome(&plan.outcome, status, result);
                    if let Some(entry) = commit {
                        let minute = chrono::DateTime::parse_from_rfc3339(&entry.sent_at)
                            .map_or(minute_of(stamp), |at| at.timestamp_millis().div_euclid(60_000));
                        cache_writes.push((report.id.clone(), entry, Some(minute)));
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
                    if report.result != OutcomeResult::ClaimLost {
                        changed.extend(event_of_status(doc.status).map(|e| (plan.id, e)));
                        replays += 1;
                    }
                    match report.result {
                        OutcomeResult::ClaimLost => self.metrics.commits.with_label_values(&["claim_lost"]).inc(),
                        OutcomeResult::AlreadyCommitted => self.metrics.commits.with_label_values(&["replayed"]).inc(),
                        _ => {} // counted when first reported
                    }
                    if let (OutcomeResult::AlreadyCommitted, Some(provider), Some(mid)) =
                        (report.result, &doc.provider, &doc.webhook_message_id)
                    {
                        committed.push((provider.clone(), mid.clone()));
                    }
                    if report.result == OutcomeResult::AlreadyCommitted {
                        // A repeated commit writes the entry again (it may have been missed)
                        // but counts nothing twice.
                        let entry = sent_entry(doc.webhook_message_id.as_deref(), doc.sent_at.unwrap_or(stamp));
                        cache_writes.push((report.id.clone(), entry, None));
                    }
                }
            }
        }
        if replays > 0 {
            // A worker reports again only when it never heard how its report went: the first
            // may have landed without its count (its answer lost, or the replica that wrote it
            // killed before the count write), perhaps through another replica than this one.
            self.store.counts().doubt();
        }
        let pairs: Vec<(&str, &str)> = committed.iter().map(|(p, m)| (p.as_str(), m.as_str())).collect();
        let (cached, (), written, matched) = tokio::join!(
            self.cache_commits(&cache_writes, stamp),
            self.record_attempts(&attempts),
            self.callbacks.on_transitions(&changed),
            self.receipts.match_committed(&pairs)
        );
        // Unwritten callbacks, or receipts left waiting, fail the report: the worker reports
        // again, and the repeat writes and matches them.
        written?;
        matched?;
        Ok(OutcomeResults { cached, items: reports })
    }

    /// Adds the attempts of applied outcomes to the per-provider statistics (a failure there is
    /// logged: the outcomes stand).
    async fn record_attempts(&self, attempts: &[AttemptRecord]) {
        let refs: Vec<&AttemptRecord> = attempts.iter().collect();
        if let Err(error) = self.store.provider_stats().record(&refs).await {
            tracing::warn!(error = %telemetry::Chain(&error), "could not add attempts to the provider statistics");
        }
    }

    /// The write one outcome makes, with the status and result it gives and, for a commit, the
    /// cache entry; `None` for a failure whose claim is not held (answered as it stands).
    fn plan(
        &self,
        outcome: &Outcome,
        id: ObjectId,
        before: Option<&MessageDoc>,
        stamp: DateTime,
    ) -> Result<Option<Plan>, ServiceError> {
        Ok(Some(match outcome {
            Outcome::Sent(o) => {
                let sent_at = o.commit.sent_at.map(DateTime::from_chrono).unwrap_or(stamp);
                let mid = o
                    .commit
                    .webhook_message_id
                    .as_deref()
                    .map(str::trim)
                    .filter(|m| !m.is_empty());
                let accepted = Accepted {
                    webhook_message_id: mid,
                    sent_at,
                    provider: o.commit.provider.as_deref(),
                };
                let attempts = attempt_docs(&o.commit.attempts);
                let write = ClaimWrite::sent(id, &o.commit.claim_token, accepted, &attempts, stamp)?;
                let entry = sent_entry(mid, sent_at);
                (write, MessageStatus::Sent, OutcomeResult::Committed, Some(entry))
            }
            Outcome::Released(o) => (
                ClaimWrite::release(
                    id,
                    &o.claim.claim_token,
                    wait_until(o.claim.wait_seconds, stamp)?,
                    stamp,
                ),
                MessageStatus::Pending,
                OutcomeResult::Released,
                None,
            ),
            Outcome::Expired(o) => (
                ClaimWrite::expire(id, &o.claim.claim_token, stamp),
                MessageStatus::Expired,
                OutcomeResult::Expired,
                None,
            ),
            Outcome::Failed(o) => {
                let token = &o.failure.claim_token;
                let held =
                    before.filter(|d| d.status == MessageStatus::Processing && d.claim_token.as_deref() == Some(token));
                let Some(doc) = held else {
                    return Ok(None);
                };
                let (status, next, error) = self.policy.after_failure(doc, &o.failure, stamp);
                let result = match status {
                    MessageStatus::Failed => OutcomeResult::Failed,
                    MessageStatus::Expired => OutcomeResult::Expired,
                    _ => OutcomeResult::RetryScheduled,
                };
                (
                    ClaimWrite::failure(
                        id,
                        token,
                        status,
                        next,
                        &error,
                        &attempt_docs(&o.failure.attempts),
                        stamp,
                    )?,
                    status,
                    result,
                    None,
                )
            }
        }))
    }

    /// Counts what one outcome did in the metrics.
    fn count_outcome(&self, outcome: &Outcome, status: MessageStatus, result: OutcomeResult) {
        let commits = |label: &str| self.metrics.commits.with_label_values(&[label]).inc();
        match (outcome, result) {
            (_, OutcomeResult::Committed) => commits("committed"),
            (Outcome::Failed(_), OutcomeResult::RetryScheduled | OutcomeResult::Failed | OutcomeResult::Expired) => {
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
            (Outcome::Expired(_), OutcomeResult::Expired) => {
                self.metrics.expired.with_label_values(&["worker"]).inc();
            }
            _ => {}
        }
    }

    /// Caches commits in one pipeline; false when Redis could not take them (the repair writes
    /// them later).
    async fn cache_commits(&self, writes: &[CacheWrite], stamp: DateTime) -> bool {
        if writes.is_empty() {
            return true;
        }
        match self.cache.put_sent_many(writes).await {
            Ok(()) => true,
            Err(error) => {
                self.metrics.cache_write_failures.inc_by(writes.len() as u64);
                let earliest = writes
                    .iter()
                    .filter_map(|(_, entry, _)| chrono::DateTime::parse_from_rfc3339(&entry.sent_at).ok())
                    .map(|at| at.timestamp_millis())
                    .min()
                    .unwrap_or(stamp.timestamp_millis());
                self.cache.note_missed(earliest);
                tracing::warn!(
                    messages = writes.len(),
                    error = %telemetry::Chain(&error),
                    "messages committed but their Redis cache entries were not written; the repair will write them"
                );
                false
            }
        }
    }
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
