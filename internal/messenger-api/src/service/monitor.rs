//! What an operator watches: the stats, readiness and the gauges read from MongoDB.

use std::collections::BTreeMap;
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
use crate::store::{JobView, MessageStore};

/// A snapshot for the stats endpoint and the console.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Messages per status.
    pub counts: Vec<(MessageStatus, u64)>,
    /// How long the most overdue pending message has been due, in seconds.
    pub oldest_due_age_seconds: f64,
    /// The start of the newest minute in `sent_per_minute`.
    pub last_minute: chrono::DateTime<Utc>,
    /// Messages sent in each of the last 60 minutes, oldest first (empty when Redis is down).
    pub sent_per_minute: Vec<u64>,
    /// The sending job, when a scheduler has ever started.
    pub job: Option<JobStatus>,
}

/// Stats, readiness and gauges.
pub struct Monitor {
    db: Database,
    store: MessageStore,
    jobs: JobView,
    cache: SentCache,
    metrics: MessengerMetrics,
}

fn now() -> DateTime {
    DateTime::now()
}

impl Monitor {
    /// Watches `db`'s messages (through `store`) and job state, and the cache's counters.
    pub fn new(db: Database, store: MessageStore, cache: SentCache, metrics: MessengerMetrics) -> Self {
        Self {
            store,
            jobs: JobView::new(&db),
            db,
            cache,
            metrics,
        }
    }

    /// Counts by status, the delivery lag, sends per minute over the last hour and the job.
    pub async fn stats(&self) -> Result<Stats, ServiceError> {
        let stamp = now();
        let (counts, age, job) = tokio::join!(
            self.store.count_by_status(),
            self.store.oldest_due_age_seconds(stamp),
            self.jobs.status(),
        );
        let last_minute = stamp.timestamp_millis().div_euclid(60_000);
        let sent_per_minute = match self.cache.sent_per_minute(last_minute, 60).await {
            Ok(counts) => counts,
            Err(error) => {
                tracing::warn!(error = %telemetry::Chain(&error), "could not read the per-minute sent counters from Redis");
                Vec::new()
            }
        };
        Ok(Stats {
            counts: counts?,
            oldest_due_age_seconds: age?,
            last_minute: chrono::DateTime::from_timestamp(last_minute * 60, 0).unwrap_or_default(),
            sent_per_minute,
            job: job?,
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
            for (status, count) in self.store.count_by_status().await? {
                self.metrics
                    .messages
                    .with_label_values(&[status.as_str()])
                    .set(count as i64);
            }
            let age = self.store.oldest_due_age_seconds(now()).await?;
            self.metrics.oldest_pending_age.set(age);
            Ok::<_, StoreError>(())
        };
        if let Err(error) = refresh.await {
            tracing::warn!(error = %telemetry::Chain(&error), "could not refresh message gauges");
        }
    }
}
