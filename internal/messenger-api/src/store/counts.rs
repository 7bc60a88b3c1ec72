//! Counts by status, maintained as messages change instead of recounted per request, so the
//! stats, `/metrics` and the console cost one document read at 1k or 10M messages.
//!
//! Every write that changes a message's status is followed by an `$inc` of one document in
//! `message_counts` (the store does it: [`super`]); writes that land together share one `$inc`
//! (a group commit), and each caller returns once its share is in. The message write and its
//! count write are two writes, so a crash between them leaves drift:
//! [`super::MessageStore::reconcile_counts`] corrects it at start-up and every
//! `messenger_api.count_reconcile_seconds`, only when no count write moved the document while
//! it counted nor in the [`SETTLE`] second after. Until the first reconciliation the counts are
//! not known to be exact ([`Snapshot::exact`]). A write that may have landed without its count
//! (a count write that failed, or a message write whose answer never came: the connection
//! dropped, or the server was killed between writing and answering) is a doubt: the counts are
//! served as not known exact and reconciled as soon as the database answers, not a period
//! later ([`StatusCounts::doubt`]). More: `docs/architecture.md`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bson::oid::ObjectId;
use bson::{doc, Bson, DateTime, Document};
use coalesce::Coalescer;
use mongodb::{Collection, Database};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::domain::MessageStatus;
use crate::error::StoreError;

/// Name of the collection holding the one counts document.
pub const COLLECTION: &str = "message_counts";
const ID: &str = "messages";
const VERSION: &str = "v";
const EXACT: &str = "exact";
const FIRST_ID: &str = "first_id";
const FIRST_SENT_AT: &str = "first_sent_at";
const LAST_ID: &str = "last_id";

fn earliest<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Changes to the counts, one per status in [`MessageStatus::ALL`]'s order, the oldest `_id`
/// and `sent_at` they brought (the floors list walks stop at: [`super::window`]) and the
/// newest `_id` (where a first list page starts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deltas {
    counts: [i64; 5],
    first_id: Option<ObjectId>,
    first_sent_at: Option<DateTime>,
    last_id: Option<ObjectId>,
}

fn slot(status: MessageStatus) -> usize {
    MessageStatus::ALL.iter().position(|s| *s == status).unwrap_or(0)
}

impl Deltas {
    /// `n` messages that came into being in `status`.
    pub fn added(status: MessageStatus, n: u64) -> Self {
        let mut deltas = Self::default();
        deltas.counts[slot(status)] += n as i64;
        deltas
    }

    /// `n` messages that went from `from` to `to`.
    pub fn moved(from: MessageStatus, to: MessageStatus, n: u64) -> Self {
        let mut deltas = Self::default();
        deltas.counts[slot(from)] -= n as i64;
        deltas.counts[slot(to)] += n as i64;
        deltas
    }

    /// `n` messages of `status` that are gone.
    pub fn removed(status: MessageStatus, n: u64) -> Self {
        let mut deltas = Self::default();
        deltas.counts[slot(status)] -= n as i64;
        deltas
    }

    /// The same, also bringing messages with ids from `first` on.
    pub fn with_first_id(mut self, first: Option<ObjectId>) -> Self {
        self.first_id = earliest(self.first_id, first);
        self
    }

    /// The same, also bringing messages with ids up to `last`.
    pub fn with_last_id(mut self, last: Option<ObjectId>) -> Self {
        self.last_id = self.last_id.max(last);
        self
    }

    /// The same, also bringing messages sent from `first` on.
    pub fn with_first_sent_at(mut self, first: Option<DateTime>) -> Self {
        self.first_sent_at = earliest(self.first_sent_at, first);
        self
    }

    /// Adds `other` to these.
    pub fn add(&mut self, other: Self) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
        self.first_id = earliest(self.first_id, other.first_id);
        self.first_sent_at = earliest(self.first_sent_at, other.first_sent_at);
        self.last_id = self.last_id.max(other.last_id);
    }

    /// True when nothing changes.
    pub fn is_zero(&self) -> bool {
        self.counts.iter().all(|d| *d == 0)
            && self.first_id.is_none()
            && self.first_sent_at.is_none()
            && self.last_id.is_none()
    }

    /// The update that applies these deltas.
    fn update(&self) -> Document {
        let mut update = doc! {"$inc": self.inc(), "$setOnInsert": {EXACT: false}};
        let mut min = Document::new();
        if let Some(id) = self.first_id {
            min.insert(FIRST_ID, id);
        }
        if let Some(at) = self.first_sent_at {
            min.insert(FIRST_SENT_AT, at);
        }
        if !min.is_empty() {
            update.insert("$min", min);
        }
        if let Some(id) = self.last_id {
            update.insert("$max", doc! {LAST_ID: id});
        }
        update
    }

    fn inc(&self) -> Document {
        let mut inc = Document::new();
        for (status, delta) in MessageStatus::ALL.iter().zip(self.counts) {
            if delta != 0 {
                inc.insert(status.as_str(), delta);
            }
        }
        inc.insert(VERSION, 1_i64);
        inc
    }
}

/// The counts document as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Messages per status, in [`MessageStatus::ALL`]'s order.
    pub counts: [u64; 5],
    /// False until a reconciliation has set them from a real count.
    pub exact: bool,
    /// No message ever had a smaller `_id` (`None` when unknown).
    pub first_id: Option<ObjectId>,
    /// No message was ever sent earlier (`None` when unknown).
    pub first_sent_at: Option<DateTime>,
    /// No message ever had a larger `_id` (`None` when unknown).
    pub last_id: Option<ObjectId>,
    /// Bumped by every write; a reconciliation applies only if it did not move.
    version: i64,
    raw: [i64; 5],
}

/// How long a reconciliation that found a difference waits for count writes still on their
/// way before it calls the difference drift.
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

impl Snapshot {
    /// True when `actual` is not what these counts say, or they were never exact.
    pub fn differs(&self, actual: &[u64; 5]) -> bool {
        !self.exact || self.raw.iter().zip(actual).any(|(kept, real)| *kept != *real as i64)
    }

    /// `(status, count)` pairs.
    pub fn by_status(&self) -> Vec<(MessageStatus, u64)> {
        MessageStatus::ALL.into_iter().zip(self.counts).collect()
    }

    fn from_doc(doc: &Document) -> Self {
        let number = |key: &str| match doc.get(key) {
            Some(Bson::Int32(n)) => i64::from(*n),
            Some(Bson::Int64(n)) => *n,
            Some(Bson::Double(n)) => *n as i64,
            _ => 0,
        };
        let raw = MessageStatus::ALL.map(|s| number(s.as_str()));
        Self {
            counts: raw.map(|n| n.max(0) as u64),
            exact: doc.get_bool(EXACT).unwrap_or(false),
            first_id: doc.get_object_id(FIRST_ID).ok(),
            first_sent_at: doc.get_datetime(FIRST_SENT_AT).ok().copied(),
            last_id: doc.get_object_id(LAST_ID).ok(),
            version: number(VERSION),
            raw,
        }
    }
}

/// What a reconciliation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// The counts were right.
    InSync,
    /// They were off by this much (actual − maintained, per status) and are right now.
    Corrected(Vec<(MessageStatus, i64)>),
    /// Counts changed while it counted: nothing applied, try again later.
    Busy,
}

/// The counts' own metrics.
#[derive(Clone)]
pub struct CountMetrics {
    /// Count writes that failed (the counts drift until the next reconciliation).
    pub write_failures: IntCounter,
    /// Reconciliations by result: in_sync, corrected, busy, error.
    pub reconciliations: IntCounterVec,
    /// Messages by which the maintained counts were off when reconciled, by status.
    pub drift: IntCounterVec,
    /// When the counts were last confirmed or corrected, in Unix seconds.
    pub reconciled_at: IntGauge,
    /// Writes after which the counts may be off ([`StatusCounts::doubt`]).
    pub doubts: IntCounter,
}

impl CountMetrics {
    fn new() -> Self {
        // The names and labels are constants: creating them cannot fail.
        Self {
            write_failures: IntCounter::new(
                "message_counts_write_failures_total",
                "Writes of the maintained counts by status that failed (corrected by the next reconciliation).",
            )
            .expect("valid metric"),
            reconciliations: IntCounterVec::new(
                Opts::new(
                    "message_counts_reconciliations_total",
                    "Reconciliations of the maintained counts by status, by result: in_sync, corrected, busy, error.",
                ),
                &["result"],
            )
            .expect("valid metric"),
            drift: IntCounterVec::new(
                Opts::new(
                    "message_counts_drift_total",
                    "Messages by which a reconciliation found the maintained counts off, by status.",
                ),
                &["status"],
            )
            .expect("valid metric"),
            reconciled_at: IntGauge::new(
                "message_counts_reconciled_timestamp_seconds",
                "When the maintained counts by status were last confirmed by a full count (Unix seconds).",
            )
            .expect("valid metric"),
            doubts: IntCounter::new(
                "message_counts_doubts_total",
                "Writes after which the maintained counts by status may be off (a count write failed, or a message write's answer never came); each asks for a reconciliation as soon as the database answers.",
            )
            .expect("valid metric"),
        }
    }

    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.write_failures.clone()))?;
        registry.register(Box::new(self.reconciliations.clone()))?;
        registry.register(Box::new(self.drift.clone()))?;
        registry.register(Box::new(self.reconciled_at.clone()))?;
        registry.register(Box::new(self.doubts.clone()))?;
        Ok(())
    }
}

/// The maintained counts of one database's messages.
#[derive(Clone)]
pub struct StatusCounts {
    inner: Arc<Inner>,
}

struct Inner {
    counts: Collection<Document>,
    /// Deltas arriving together, written as one `$inc` ([`write`]).
    writes: Coalescer<Deltas, bool>,
    metrics: CountMetrics,
    /// Raised when the counts may be off (a reader found them not known exact, or a doubt):
    /// the upkeep reconciles soon.
    asked: tokio::sync::Notify,
    /// Doubts noted so far ([`StatusCounts::doubt`]).
    doubts: AtomicU64,
    /// `doubts` as it stood when the last reconciliation that finished began: those are
    /// settled, any later one is not.
    settled: AtomicU64,
}

impl StatusCounts {
    /// The counts in `db.message_counts`.
    pub fn new(db: &Database) -> Self {
        let counts: Collection<Document> = db.collection(COLLECTION);
        let metrics = CountMetrics::new();
        let writes = {
            let (counts, metrics) = (counts.clone(), metrics.clone());
            Coalescer::new(move |group: Vec<Deltas>| write(counts.clone(), metrics.clone(), group))
        };
        Self {
            inner: Arc::new(Inner {
                counts,
                writes,
                metrics,
                asked: tokio::sync::Notify::new(),
                doubts: AtomicU64::new(0),
                settled: AtomicU64::new(0),
            }),
        }
    }

    /// Notes that a write may have landed without its count: until a reconciliation that
    /// began after now finishes, the counts are served as not known exact
    /// ([`super::MessageStore::count_by_status`]), and the upkeep reconciles as soon as it may
    /// and again until one finishes (the database may still be down).
    pub fn doubt(&self) {
        self.inner.doubts.fetch_add(1, Ordering::SeqCst);
        self.inner.metrics.doubts.inc();
        self.inner.asked.notify_one();
    }

    /// Passes on the result of a write that moves the counts, noting a [`Self::doubt`] when it
    /// failed: an error does not say the write did not land (the server may have applied it
    /// and died, or the connection dropped, before the answer came).
    pub fn doubting<T, E>(&self, result: Result<T, E>) -> Result<T, E> {
        if result.is_err() {
            self.doubt();
        }
        result
    }

    /// Whether a doubt is not settled by a reconciliation yet.
    pub fn in_doubt(&self) -> bool {
        self.inner.doubts.load(Ordering::SeqCst) > self.inner.settled.load(Ordering::SeqCst)
    }

    /// Asks the upkeep to reconcile soon.
    pub fn ask_reconcile(&self) {
        self.inner.asked.notify_one();
    }

    /// Resolves once a reconciliation was asked for since the last call.
    pub async fn reconcile_asked(&self) {
        self.inner.asked.notified().await;
    }

    /// The doubts noted so far: a reconciliation that begins now and finishes settles them.
    pub(super) fn doubts(&self) -> u64 {
        self.inner.doubts.load(Ordering::SeqCst)
    }

    /// Settles the doubts up to `seen` (a reconciliation that began when there were that many
    /// finished).
    pub(super) fn settle(&self, seen: u64) {
        self.inner.settled.fetch_max(seen, Ordering::SeqCst);
    }

    /// The counts' metrics (to register with the service's registry).
    pub fn metrics(&self) -> &CountMetrics {
        &self.inner.metrics
    }

    /// Applies `deltas`, sharing the write with whatever else arrives meanwhile; returns once
    /// they are written. A failed write is logged and counted, never returned: the message
    /// write it follows stands, and it is a [`Self::doubt`].
    pub async fn add(&self, deltas: Deltas) {
        if deltas.is_zero() {
            return;
        }
        // Unanswered only if the write panicked: as for a failed write.
        if !matches!(self.inner.writes.call(deltas).await, Ok(true)) {
            self.doubt();
        }
    }

    /// The counts as maintained, or `None` before anything was ever counted.
    pub async fn snapshot(&self) -> Result<Option<Snapshot>, StoreError> {
        Ok(self
            .inner
            .counts
            .find_one(doc! {"_id": ID})
            .await?
            .as_ref()
            .map(Snapshot::from_doc))
    }

    /// Sets the counts to `actual` (counted between reading `before` and `after`) if no count
    /// write happened meanwhile, and records what it found.
    pub async fn correct(
        &self,
        before: Option<Snapshot>,
        actual: [u64; 5],
        after: Option<Snapshot>,
    ) -> Result<Reconciled, StoreError> {
        let metrics = &self.inner.metrics;
        let now = DateTime::now();
        let outcome = match (before, after) {
            (None, None) => {
                let mut fresh = doc! {"_id": ID, VERSION: 1_i64, EXACT: true, "reconciled_at": now};
                for (status, n) in MessageStatus::ALL.iter().zip(actual) {
                    fresh.insert(status.as_str(), n as i64);
                }
                match self.inner.counts.insert_one(fresh).await {
                    Ok(_) => Reconciled::InSync,
                    Err(error) => match StoreError::from(error) {
                        StoreError::AlreadyExists => Reconciled::Busy,
                        other => return Err(other),
                    },
                }
            }
            (Some(before), Some(after)) if before.version == after.version => {
                let drift: Vec<(MessageStatus, i64)> = MessageStatus::ALL
                    .iter()
                    .zip(actual.iter().zip(after.raw))
                    .map(|(status, (real, kept))| (*status, *real as i64 - kept))
                    .filter(|(_, d)| *d != 0)
                    .collect();
                if drift.is_empty() && after.exact {
                    Reconciled::InSync
                } else {
                    let mut inc = doc! {VERSION: 1_i64};
                    for (status, d) in &drift {
                        inc.insert(status.as_str(), *d);
                    }
                    let applied = self
                        .inner
                        .counts
                        .update_one(
                            doc! {"_id": ID, VERSION: after.version},
                            doc! {"$inc": inc, "$set": {EXACT: true, "reconciled_at": now}},
                        )
                        .await?;
                    match (applied.matched_count, after.exact) {
                        (0, _) => Reconciled::Busy,
                        // The first count of a collection sets the counts; that is no drift.
                        (_, false) => Reconciled::InSync,
                        _ if drift.is_empty() => Reconciled::InSync,
                        _ => Reconciled::Corrected(drift),
                    }
                }
            }
            _ => Reconciled::Busy,
        };
        let label = match &outcome {
            Reconciled::InSync => "in_sync",
            Reconciled::Corrected(_) => "corrected",
            Reconciled::Busy => "busy",
        };
        metrics.reconciliations.with_label_values(&[label]).inc();
        if !matches!(outcome, Reconciled::Busy) {
            metrics.reconciled_at.set(now.timestamp_millis() / 1000);
        }
        if let Reconciled::Corrected(drift) = &outcome {
            for (status, d) in drift {
                metrics
                    .drift
                    .with_label_values(&[status.as_str()])
                    .inc_by(d.unsigned_abs());
            }
            tracing::warn!(?drift, "the maintained counts by status were off and are corrected");
        }
        Ok(outcome)
    }

    /// Widens the bounds to what a full read found: lowers the floors and raises the newest
    /// `_id` (never the other way: lists only need bounds outside every message).
    pub async fn widen_bounds(
        &self,
        first_id: Option<ObjectId>,
        first_sent_at: Option<DateTime>,
        last_id: Option<ObjectId>,
    ) -> Result<(), StoreError> {
        let floors = Deltas::default()
            .with_first_id(first_id)
            .with_first_sent_at(first_sent_at)
            .with_last_id(last_id);
        if floors.is_zero() {
            return Ok(());
        }
        let mut update = floors.update();
        update.remove("$inc");
        // A document this creates has counted nothing yet: version 0, not exact, so the
        // reconciliation that follows can set its counts under the version it read.
        update.insert("$setOnInsert", doc! {EXACT: false, VERSION: 0_i64});
        self.inner
            .counts
            .update_one(doc! {"_id": ID}, update)
            .upsert(true)
            .await?;
        Ok(())
    }

    /// Counts a reconciliation that could not finish.
    pub fn reconcile_failed(&self) {
        self.inner.metrics.reconciliations.with_label_values(&["error"]).inc();
    }
}

/// Writes a group of deltas as one: their sum in one `$inc` of the counts document; answers
/// each whether it was written.
async fn write(counts: Collection<Document>, metrics: CountMetrics, group: Vec<Deltas>) -> Vec<bool> {
    let mut deltas = Deltas::default();
    for one in &group {
        deltas.add(*one);
    }
    let mut written = true;
    if !deltas.is_zero() {
        let write = counts.update_one(doc! {"_id": ID}, deltas.update()).upsert(true).await;
        if let Err(error) = write {
            metrics.write_failures.inc();
            tracing::warn!(
                ?deltas,
                error = %telemetry::Chain(&error),
                "could not update the counts by status; a reconciliation corrects them once the database answers"
            );
            written = false;
        }
    }
    vec![written; group.len()]
}

impl super::MessageStore {
    /// Messages per status, as maintained (this module): one document read, and whether they
    /// are known exact. Before a reconciliation has checked them (at start, on a collection
    /// that was written without them, after the database lost recent writes, or while a
    /// [`StatusCounts::doubt`] of this process is not settled) they are served as kept, marked not exact, and the upkeep is asked to reconcile soon — never
    /// recounted per reader. Only a collection with no counts document at all is counted, once
    /// for all the readers waiting together.
    pub async fn count_by_status(&self) -> Result<(Vec<(MessageStatus, u64)>, bool), StoreError> {
        match self.counts.snapshot().await? {
            Some(snapshot) => {
                let exact = snapshot.exact && !self.counts.in_doubt();
                if !exact {
                    // Not recounted here: the upkeep reconciles soon, once for every reader.
                    self.counts.ask_reconcile();
                }
                Ok((snapshot.by_status(), exact))
            }
            None => {
                // Unanswered only if the count panicked: count again, alone.
                let counted = match self.recount.call(()).await {
                    Ok(counted) => counted?,
                    Err(_) => count_statuses(&self.messages).await?,
                };
                Ok((MessageStatus::ALL.into_iter().zip(counted).collect(), true))
            }
        }
    }

    /// Counts every status in the collection (expensive on a large one).
    pub(super) async fn count_exactly(&self) -> Result<[u64; 5], StoreError> {
        count_statuses(&self.messages).await
    }
}

/// Counts every status of `messages` (expensive on a large collection).
pub(super) async fn count_statuses(messages: &Collection<crate::domain::MessageDoc>) -> Result<[u64; 5], StoreError> {
    let counts = futures::future::try_join_all(
        MessageStatus::ALL
            .map(|status| async move { messages.count_documents(doc! {"status": status.as_str()}).await }),
    )
    .await?;
    let mut exact = [0; 5];
    exact.copy_from_slice(&counts);
    Ok(exact)
}

/// One full count served to every reader waiting for it.
pub(super) fn recounter(
    messages: Collection<crate::domain::MessageDoc>,
) -> Coalescer<(), Result<[u64; 5], StoreError>> {
    Coalescer::new(move |group: Vec<()>| {
        let messages = messages.clone();
        async move {
            let counted = count_statuses(&messages).await;
            vec![counted; group.len()]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_add_up_and_name_only_what_changes() {
        let mut deltas = Deltas::added(MessageStatus::Pending, 3);
        deltas.add(Deltas::moved(MessageStatus::Pending, MessageStatus::Processing, 2));
        deltas.add(Deltas::moved(MessageStatus::Processing, MessageStatus::Sent, 2));
        assert_eq!(deltas.counts, [1, 0, 2, 0, 0]);
        assert_eq!(deltas.inc(), doc! {"pending": 1_i64, "sent": 2_i64, "v": 1_i64});
        deltas.add(Deltas::removed(MessageStatus::Sent, 2));
        deltas.add(Deltas::removed(MessageStatus::Pending, 1));
        assert!(deltas.is_zero());
        let old = ObjectId::from_bytes([1; 12]);
        let new = ObjectId::from_bytes([2; 12]);
        let mut floors = Deltas::added(MessageStatus::Pending, 1).with_first_id(Some(new));
        floors.add(Deltas::default().with_first_id(Some(old)).with_last_id(Some(old)));
        floors.add(Deltas::default().with_last_id(Some(new)));
        assert_eq!(floors.update().get_document("$min").unwrap(), &doc! {"first_id": old});
        assert_eq!(floors.update().get_document("$max").unwrap(), &doc! {"last_id": new});
    }

    #[test]
    fn a_snapshot_never_shows_a_negative_count() {
        let snapshot = Snapshot::from_doc(&doc! {"pending": -2_i64, "sent": 5_i32, "v": 7_i64, "exact": true});
        assert_eq!(snapshot.counts, [0, 0, 5, 0, 0]);
        assert_eq!(snapshot.raw, [-2, 0, 5, 0, 0]);
        assert!(snapshot.exact);
        assert_eq!(snapshot.version, 7);
    }
}
