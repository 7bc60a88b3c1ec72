//! Background upkeep of the messages collection: the counts reconciliation and the retention
//! sweep. Both run in every API replica; both are idempotent, so replicas need no coordination.

use std::time::Duration;

use bson::DateTime;
use herald_core::settings::RetentionSettings;
use tokio_util::sync::CancellationToken;

use crate::cache::{CacheError, SentCache, SentEntry};
use crate::domain::MessageStatus;
use crate::error::StoreError;
use crate::metrics::MessengerMetrics;
use crate::store::{MessageStore, Reconciled};

/// Messages removed per delete of the retention sweep.
pub const SWEEP_BATCH: usize = 1000;
/// Most messages one sweep removes per status, so a first sweep over years of history does not
/// hold the database for long; the rest goes in the next sweeps.
pub const SWEEP_MAX: u64 = 10_000;
/// How often the cache repair looks whether entries are missing and Redis answers again.
pub const REPAIR_EVERY: Duration = Duration::from_secs(2);
/// The least time between two reconciliations asked for by readers of inexact counts.
const INEXACT_GAP: Duration = Duration::from_secs(10);
/// The least time between two reconciliations after one that ended `busy_in_a_row` times busy
/// in a row: [`INEXACT_GAP`], doubled for each (counts that kept moving through five full
/// counts, as in a campaign's drain, will likely move through the next: a full count of a
/// million costs the database seconds), never more than the period.
fn least_gap(busy_in_a_row: u32, every: Duration) -> Duration {
    INEXACT_GAP.saturating_mul(1 << busy_in_a_row.min(16)).min(every)
}

/// The `sent_at` range the repair reads at once, in milliseconds: about a second of sends.
const REPAIR_WINDOW_MS: i64 = 1000;
/// Windows per repair pass: a pass catches up a minute of sends, twenty times faster than real
/// time at the period above, and holds the database for one small read at a time.
const REPAIR_WINDOWS: usize = 60;
/// How often a busy reconciliation (counts changed while it counted) is tried again.
const BUSY_RETRY: Duration = Duration::from_secs(2);
/// Busy attempts before waiting for the next period.
const BUSY_ATTEMPTS: usize = 5;

/// The upkeep of one API process.
#[derive(Clone)]
pub struct Upkeep {
    store: MessageStore,
    cache: SentCache,
    retention: RetentionSettings,
    reconcile_every: Duration,
    metrics: MessengerMetrics,
}

impl Upkeep {
    /// Upkeep of `store` with these retention rules, reconciling counts every `reconcile_every`.
    pub fn new(
        store: MessageStore,
        cache: SentCache,
        retention: RetentionSettings,
        reconcile_every: Duration,
        metrics: MessengerMetrics,
    ) -> Self {
        Self {
            store,
            cache,
            retention,
            reconcile_every,
            metrics,
        }
    }

    /// Runs the loops until `stop` is cancelled: a reconciliation now and every period, the
    /// cache repair every `REPAIR_EVERY`, and (when any retention is set) a sweep every
    /// `retention.sweep_seconds`.
    pub fn spawn(&self, stop: CancellationToken) {
        let repair = self.clone();
        let halt = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = halt.cancelled() => return,
                    () = tokio::time::sleep(REPAIR_EVERY) => {}
                }
                match repair.repair_cache(DateTime::now()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(entries = n, "wrote missing Redis cache entries of sent messages"),
                    Err(error) => {
                        tracing::debug!(error = %error, "cache repair waits: Redis or MongoDB not answering")
                    }
                }
            }
        });
        let counts = self.clone();
        let halt = stop.clone();
        tokio::spawn(async move {
            let mut busy_in_a_row = 0;
            loop {
                let outcome = counts.reconcile().await;
                busy_in_a_row = match outcome {
                    Some(Reconciled::Busy) => busy_in_a_row + 1,
                    _ => 0,
                };
                // At the period, or sooner when a reader found the counts not known exact or a
                // write may have landed without its count (no sooner than `least_gap` after
                // the last one: a full count is not free). While such a doubt is not settled
                // (the database was down, or the counts kept moving), again after that gap.
                let gap = least_gap(busy_in_a_row, counts.reconcile_every);
                tokio::select! {
                    () = halt.cancelled() => return,
                    () = tokio::time::sleep(gap) => {}
                }
                if counts.store.counts().in_doubt() {
                    continue;
                }
                tokio::select! {
                    () = halt.cancelled() => return,
                    () = tokio::time::sleep(counts.reconcile_every.saturating_sub(gap)) => {}
                    () = counts.store.counts().reconcile_asked() => {}
                }
            }
        });
        if self.retention.sent_days == 0 && self.retention.failed_days == 0 {
            return;
        }
        let sweeper = self.clone();
        tokio::spawn(async move {
            let every = Duration::from_secs(sweeper.retention.sweep_seconds);
            loop {
                if let Err(error) = sweeper.sweep(DateTime::now()).await {
                    tracing::warn!(error = %telemetry::Chain(&error), "retention sweep failed; trying again next time");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        });
    }

    /// Reconciles the counts, trying a busy moment again a few times.
    pub async fn reconcile(&self) -> Option<Reconciled> {
        for _ in 0..BUSY_ATTEMPTS {
            match self.store.reconcile_counts().await {
                Ok(Reconciled::Busy) => tokio::time::sleep(BUSY_RETRY).await,
                Ok(done) => return Some(done),
                Err(error) => {
                    tracing::warn!(error = %telemetry::Chain(&error), "could not reconcile the counts by status");
                    return None;
                }
            }
        }
        tracing::info!("counts by status kept changing during reconciliation; trying again next period");
        Some(Reconciled::Busy)
    }

    /// One cache repair pass: when commits could not write their Redis entries, and Redis
    /// answers again, writes the entries of the sent messages from the earliest miss onwards
    /// that are still missing (`SET … NX`, with the time they have left), a second of `sent_at`
    /// at a time and at most `REPAIR_WINDOWS` of them; answers how many it wrote. Idempotent:
    /// an entry that is there is left alone, so replicas and repeated passes do no harm.
    pub async fn repair_cache(&self, now: DateTime) -> Result<u64, RepairError> {
        let seen = self.cache.missed();
        let Some(mut from) = seen.since else {
            self.metrics.cache_repair_pending.set(0);
            return Ok(0);
        };
        self.metrics.cache_repair_pending.set(1);
        self.cache.ping().await?;
        let ttl_ms = self.cache.ttl_seconds() as i64 * 1000;
        let mut written = 0;
        for _ in 0..REPAIR_WINDOWS {
            if from > now.timestamp_millis() {
                break;
            }
            let to = from + REPAIR_WINDOW_MS;
            let sent = self
                .store
                .sent_between(DateTime::from_millis(from), DateTime::from_millis(to))
                .await?;
            let entries: Vec<_> = sent
                .iter()
                .filter_map(|message| {
                    let sent_at = message.sent_at?;
                    let left_ms = ttl_ms - (now.timestamp_millis() - sent_at.timestamp_millis());
                    (left_ms >= 1000).then(|| {
                        let entry = SentEntry {
                            message_id: message.webhook_message_id.clone(),
                            sent_at: sent_at.to_chrono().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                        };
                        (message.id.to_hex(), entry, (left_ms / 1000) as u64)
                    })
                })
                .collect();
            let n = self.cache.put_missing(&entries).await?;
            self.metrics.cache_repaired.inc_by(n);
            written += n;
            from = to;
        }
        let done = from > now.timestamp_millis();
        self.cache.repaired(seen, (!done).then_some(from));
        if done && self.cache.missed().since.is_none() {
            self.metrics.cache_repair_pending.set(0);
        }
        Ok(written)
    }

    /// One retention sweep at `now`: removes what is past its age, at most [`SWEEP_MAX`] per
    /// status; answers how many per status.
    pub async fn sweep(&self, now: DateTime) -> Result<Vec<(MessageStatus, u64)>, StoreError> {
        let day_ms = 86_400_000_i64;
        let rules = [
            (MessageStatus::Sent, self.retention.sent_days),
            (MessageStatus::Failed, self.retention.failed_days),
            (MessageStatus::Expired, self.retention.failed_days),
        ];
        let mut removed = Vec::new();
        for (status, days) in rules {
            if days == 0 {
                continue;
            }
            let cutoff = DateTime::from_millis(now.timestamp_millis() - days as i64 * day_ms);
            let mut total = 0;
            while total < SWEEP_MAX {
                let n = self.store.remove_final(status, cutoff, SWEEP_BATCH).await?;
                total += n;
                self.metrics.removed.with_label_values(&[status.as_str()]).inc_by(n);
                if n < SWEEP_BATCH as u64 {
                    break;
                }
            }
            if total > 0 {
                tracing::info!(
                    status = status.as_str(),
                    removed = total,
                    days,
                    "retention removed old messages"
                );
            }
            removed.push((status, total));
        }
        self.metrics.retention_swept_at.set(now.timestamp_millis() / 1000);
        Ok(removed)
    }
}

/// Why a cache repair pass stopped; it is tried again next period.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    /// Redis is still away.
    #[error("Redis: {0}")]
    Cache(#[from] CacheError),
    /// The sent messages could not be read.
    #[error("MongoDB: {0}")]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciliations_that_keep_finding_the_counts_moving_back_off_up_to_the_period() {
        let every = Duration::from_secs(600);
        let gaps: Vec<u64> = (0..8).map(|busy| least_gap(busy, every).as_secs()).collect();
        assert_eq!(gaps, [10, 20, 40, 80, 160, 320, 600, 600]);
        assert_eq!(least_gap(u32::MAX, every), every);
        assert_eq!(least_gap(0, Duration::from_secs(3)), Duration::from_secs(3));
    }
}
