//! Admission: whether a create may come in. With `messenger_api.max_due_backlog` set, creates
//! are refused (429 with `Retry-After`, `429001`) while the backlog — pending and processing
//! messages, from the maintained counts: one document read, never a count — would go over it.
//! A batch is admitted whole or not at all. The backlog read is shared for [`FRESH`], so a
//! burst of creates costs one read, not one each; what this replica admits meanwhile is added to
//! it at once.
//!
//! Scheduled messages (a `sendAt` ahead) are pending too and count toward the backlog: the
//! bound is on what Herald holds to send, which is what a runaway client fills.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use poem_openapi::Object;
use tokio::sync::Mutex;

use crate::domain::MessageStatus;
use crate::error::ServiceError;
use crate::store::MessageStore;

/// How long one backlog read serves every create.
pub const FRESH: Duration = Duration::from_millis(250);

/// What a refused create is told to wait, in seconds.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// The backlog bound and what it refused.
pub struct Admission {
    store: MessageStore,
    max_backlog: u64,
    seen: Mutex<Option<(Instant, u64)>>,
    rejected: AtomicU64,
    metric: prometheus::IntCounterVec,
}

/// Admission as the stats show it.
#[derive(Debug, Clone, PartialEq, Eq, Object)]
#[oai(rename_all = "camelCase")]
pub struct AdmissionReport {
    /// `messenger_api.max_due_backlog` (0: creates are never refused for the backlog).
    pub max_due_backlog: u64,
    /// Pending and processing messages as last read (within 250 ms).
    pub backlog: u64,
    /// Creates refused for the backlog since this replica started (a batch counts once).
    pub rejected: u64,
}

impl Admission {
    /// The bound `max_backlog` (0 = off) over `store`'s counts; refusals counted in `metric`
    /// (label `reason`).
    pub fn new(store: MessageStore, max_backlog: u64, metric: prometheus::IntCounterVec) -> Self {
        Self {
            store,
            max_backlog,
            seen: Mutex::new(None),
            rejected: AtomicU64::new(0),
            metric,
        }
    }

    /// Admits `n` new messages, or refuses them all.
    pub async fn admit(&self, n: u64) -> Result<(), ServiceError> {
        if self.max_backlog == 0 {
            return Ok(());
        }
        let mut seen = self.seen.lock().await;
        let backlog = self.fresh(&mut seen).await?;
        if backlog.saturating_add(n) <= self.max_backlog {
            // What this replica admits counts at once; other replicas' creates show at the
            // next read, so together they may pass the bound by what they admit in one FRESH.
            *seen = Some((seen.map_or_else(Instant::now, |(at, _)| at), backlog + n));
            return Ok(());
        }
        drop(seen);
        self.rejected.fetch_add(1, Ordering::Relaxed);
        self.metric.with_label_values(&["backlog"]).inc();
        Err(ServiceError::Overloaded {
            backlog,
            limit: self.max_backlog,
            retry_after_seconds: RETRY_AFTER_SECONDS,
        })
    }

    /// The report for the stats (reads the backlog when the bound is on).
    pub async fn report(&self) -> Result<AdmissionReport, ServiceError> {
        let backlog = if self.max_backlog == 0 {
            self.read().await?
        } else {
            self.backlog().await?
        };
        Ok(AdmissionReport {
            max_due_backlog: self.max_backlog,
            backlog,
            rejected: self.rejected.load(Ordering::Relaxed),
        })
    }

    async fn backlog(&self) -> Result<u64, ServiceError> {
        let mut seen = self.seen.lock().await;
        self.fresh(&mut seen).await
    }

    async fn fresh(&self, seen: &mut Option<(Instant, u64)>) -> Result<u64, ServiceError> {
        if let Some((at, backlog)) = *seen {
            if at.elapsed() < FRESH {
                return Ok(backlog);
            }
        }
        let backlog = self.read().await?;
        *seen = Some((Instant::now(), backlog));
        Ok(backlog)
    }

    async fn read(&self) -> Result<u64, ServiceError> {
        let snapshot = self.store.counts().snapshot().await?;
        Ok(snapshot.map_or(0, |s| {
            s.by_status()
                .into_iter()
                .filter(|(status, _)| matches!(status, MessageStatus::Pending | MessageStatus::Processing))
                .map(|(_, n)| n)
                .sum()
        }))
    }
}
