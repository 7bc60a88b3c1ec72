//! Background upkeep of the messages collection: the counts reconciliation and the retention
//! sweep. Both run in every API replica; both are idempotent, so replicas need no coordination.

use std::time::Duration;

use bson::DateTime;
use herald_core::settings::RetentionSettings;
use tokio_util::sync::CancellationToken;

use crate::counts::Reconciled;
use crate::domain::MessageStatus;
use crate::error::StoreError;
use crate::metrics::MessengerMetrics;
use crate::store::MessageStore;

/// Messages removed per delete of the retention sweep.
pub const SWEEP_BATCH: usize = 1000;
/// Most messages one sweep removes per status, so a first sweep over years of history does not
/// hold the database for long; the rest goes in the next sweeps.
pub const SWEEP_MAX: u64 = 10_000;
/// How often a busy reconciliation (counts changed while it counted) is tried again.
const BUSY_RETRY: Duration = Duration::from_secs(2);
/// Busy attempts before waiting for the next period.
const BUSY_ATTEMPTS: usize = 5;

/// The upkeep of one API process.
#[derive(Clone)]
pub struct Upkeep {
    store: MessageStore,
    retention: RetentionSettings,
    reconcile_every: Duration,
    metrics: MessengerMetrics,
}

impl Upkeep {
    /// Upkeep of `store` with these retention rules, reconciling counts every `reconcile_every`.
    pub fn new(
        store: MessageStore,
        retention: RetentionSettings,
        reconcile_every: Duration,
        metrics: MessengerMetrics,
    ) -> Self {
        Self {
            store,
            retention,
            reconcile_every,
            metrics,
        }
    }

    /// Runs both loops until `stop` is cancelled: a reconciliation now and every period, and
    /// (when any retention is set) a sweep every `retention.sweep_seconds`.
    pub fn spawn(&self, stop: CancellationToken) {
        let counts = self.clone();
        let halt = stop.clone();
        tokio::spawn(async move {
            loop {
                counts.reconcile().await;
                tokio::select! {
                    () = halt.cancelled() => return,
                    () = tokio::time::sleep(counts.reconcile_every) => {}
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
