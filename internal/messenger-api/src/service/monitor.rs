//! What an operator watches: the stats, readiness and the gauges read from MongoDB.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bson::DateTime;
use chrono::Utc;
use herald_core::jobs::JobStatus;
use herald_core::probes::{self, ReadyResponse};
use mongodb::Database;

use crate::cache::SentCache;
use crate::domain::MessageStatus;
use crate::error::{ServiceError, StoreError};
use crate::metrics::MessengerMetrics;
use crate::service::{Admission, AdmissionReport};
use crate::store::{JobView, MessageStore, ProviderWindow};

/// The stats count messages waiting for a provider up to this many.
pub const WAITING_COUNT_CAP: u64 = 10_000;

/// One provider as the stats show it: its shared state and what it did over the window.
#[derive(Debug, Clone)]
pub struct ProviderReport {
    /// Its pause state (with its name).
    pub status: herald_core::jobs::ProviderStatus,
    /// Its requests since [`Stats::provider_window_start`].
    pub window: ProviderWindow,
}

/// A snapshot for the stats endpoint and the console.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Messages per status.
    pub counts: Vec<(MessageStatus, u64)>,
    /// Whether the counts are known exact (false until a reconciliation checked them).
    pub counts_exact: bool,
    /// How long the most overdue pending message has been due, in seconds.
    pub oldest_due_age_seconds: f64,
    /// The start of the newest minute in `sent_per_minute`.
    pub last_minute: chrono::DateTime<Utc>,
    /// Messages sent in each of the last 60 minutes, oldest first (empty when Redis is down).
    pub sent_per_minute: Vec<u64>,
    /// The sending job, when a scheduler has ever started.
    pub job: Option<JobStatus>,
    /// Every configured provider, in configuration order.
    pub providers: Vec<ProviderReport>,
    /// Where the providers' window starts (the start of the previous clock hour).
    pub provider_window_start: chrono::DateTime<Utc>,
    /// Pending messages waiting because every provider they may go to is paused (up to
    /// [`WAITING_COUNT_CAP`]).
    pub waiting_for_provider: u64,
    /// Admission control: the backlog bound, the backlog, what it refused.
    pub admission: AdmissionReport,
}

/// Stats, readiness and gauges.
pub struct Monitor {
    db: Database,
    store: MessageStore,
    jobs: JobView,
    cache: SentCache,
    metrics: MessengerMetrics,
    admission: Arc<Admission>,
}

fn now() -> DateTime {
    DateTime::now()
}

impl Monitor {
    /// Watches `db`'s messages (through `store`), job state and the states of the providers
    /// `providers`, and the cache's counters.
    pub fn new(
        db: Database,
        store: MessageStore,
        cache: SentCache,
        metrics: MessengerMetrics,
        providers: Vec<String>,
        admission: Arc<Admission>,
    ) -> Self {
        Self {
            store,
            jobs: JobView::new(&db, providers),
            db,
            cache,
            metrics,
            admission,
        }
    }

    /// Counts by status, the delivery lag, sends per minute over the last hour and the job.
    pub async fn stats(&self) -> Result<Stats, ServiceError> {
        let stamp = now();
        let (counts, age, job, windows, waiting, admission) = tokio::join!(
            self.store.count_by_status(),
            self.store.oldest_due_age_seconds(stamp),
            self.jobs.status(),
            self.store.provider_stats().window(stamp.to_chrono()),
            self.store.count_waiting_for_provider(WAITING_COUNT_CAP),
            self.admission.report(),
        );
        let job = job?;
        // The job's status carries every provider's state; before any scheduler started there
        // is no job, and the states are read alone.
        let states = match &job {
            Some(job) => job.providers.clone(),
            None => self.jobs.providers().await?,
        };
        let mut windows = windows?;
        let providers = states
            .into_iter()
            .map(|status| ProviderReport {
                window: windows.remove(&status.name).unwrap_or_default(),
                status,
            })
            .collect();
        let last_minute = stamp.timestamp_millis().div_euclid(60_000);
        let sent_per_minute = match self.cache.sent_per_minute(last_minute, 60).await {
            Ok(counts) => counts,
            Err(error) => {
                tracing::warn!(error = %telemetry::Chain(&error), "could not read the per-minute sent counters from Redis");
                Vec::new()
            }
        };
        let (counts, counts_exact) = counts?;
        Ok(Stats {
            counts,
            counts_exact,
            oldest_due_age_seconds: age?,
            last_minute: chrono::DateTime::from_timestamp(last_minute * 60, 0).unwrap_or_default(),
            sent_per_minute,
            job,
            providers,
            provider_window_start: crate::store::provider_stats::window_start(stamp.to_chrono()),
            waiting_for_provider: waiting?,
            admission: admission?,
        })
    }

    /// Readiness: MongoDB is critical, Redis only degrades.
    pub async fn readiness(&self) -> ReadyResponse {
        let deadline = Duration::from_secs(2);
        let (mongo, redis) = tokio::join!(
            probes::check(true, deadline, herald_core::mongo::ping(&self.db)),
            probes::check(false, deadline, self.cache.ping()),
        );
        probes::verdict(BTreeMap::from([
            ("mongodb".to_owned(), mongo),
            ("redis".to_owned(), redis),
        ]))
    }

    /// Refreshes the gauges that are read from MongoDB. A down database leaves them as they were.
    pub async fn refresh_gauges(&self) {
        let refresh = async {
            let (counts, exact) = self.store.count_by_status().await?;
            for (status, count) in counts {
                self.metrics
                    .messages
                    .with_label_values(&[status.as_str()])
                    .set(count as i64);
            }
            self.metrics.counts_exact.set(i64::from(exact));
            let age = self.store.oldest_due_age_seconds(now()).await?;
            self.metrics.oldest_pending_age.set(age);
            Ok::<_, StoreError>(())
        };
        if let Err(error) = refresh.await {
            tracing::warn!(error = %telemetry::Chain(&error), "could not refresh message gauges");
        }
    }
}
