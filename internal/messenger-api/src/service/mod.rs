//! The Messenger API's rules, one file per step of a message's life:
//! - `messages`: create (one or a batch), list, get — [`MessengerService`].
//! - `worker`: what a worker does to messages — claim, and report their outcomes (sent,
//!   failed, released, expired) through one path, whether one at a time or many at once.
//! - `requeue`: an operator sends failed messages back, one or many by filter.
//! - `retry_policy`: where a failed attempt leaves a message.
//! - `callbacks`: status callbacks out — the outbox written on each change, claimed and
//!   reported by the Job Scheduler.
//! - `job`: the sending job, steered through the Job Scheduler ([`JobRemote`]).
//! - `monitor`: what an operator watches — stats, readiness and the gauges.
//! - `upkeep`: the counts reconciliation, the cache repair and the retention sweep.

mod admission;
mod callbacks;
mod job;
mod messages;
mod monitor;
mod receipts;
mod requeue;
mod retry_policy;
mod upkeep;
mod worker;

use std::sync::Arc;

use bson::DateTime;

use crate::cache::SentCache;
use crate::metrics::MessengerMetrics;
use crate::store::MessageStore;

pub use crate::store::RequeueFilter;
pub use admission::{Admission, AdmissionReport, KeyRates};
pub use callbacks::{callback_view, event_of_delivery, event_of_status, Callbacks};
pub use job::{JobCommand, JobRemote, SchedulerClient};
pub use messages::MAX_BATCH;
pub use monitor::{Monitor, ProviderReport, Stats, WAITING_COUNT_CAP};
pub use receipts::{Inbound, Receipts, Taken, MATCH_EVERY};
pub use requeue::{BulkRequeue, MAX_REQUEUE};
pub use retry_policy::{RetryPolicy, MAX_ERROR_DETAIL};
pub use upkeep::{Upkeep, SWEEP_BATCH, SWEEP_MAX};
pub use worker::{Reported, MAX_CLAIM};

/// Messages and their life: create, list, claim, report outcomes, re-queue.
pub struct MessengerService {
    store: MessageStore,
    cache: SentCache,
    policy: RetryPolicy,
    metrics: MessengerMetrics,
    admission: Arc<Admission>,
    callbacks: Arc<Callbacks>,
    receipts: Arc<Receipts>,
}

impl MessengerService {
    /// The service over `store`, caching commits in `cache`.
    pub fn new(
        store: MessageStore,
        cache: SentCache,
        policy: RetryPolicy,
        metrics: MessengerMetrics,
        admission: Arc<Admission>,
        callbacks: Arc<Callbacks>,
        receipts: Arc<Receipts>,
    ) -> Self {
        Self {
            store,
            cache,
            policy,
            metrics,
            admission,
            callbacks,
            receipts,
        }
    }
}

fn now() -> DateTime {
    DateTime::now()
}
