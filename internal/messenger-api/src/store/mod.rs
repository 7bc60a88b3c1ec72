//! The repository over the `messages` collection, one file per step of a message's life. BSON
//! and `doc!` live here and nowhere above (the event feed reads change documents, and
//! [`job_view`] the scheduler's collections).
//!
//! - [`insert`]: creates, grouped into one `insert_many` when they arrive together.
//! - [`list`]: newest-first pages and the sent list, read through [`window`]s.
//! - [`claim`]: [`MessageStore::claim_due`] — one claimer per process, reading a bounded
//!   window of the claim index.
//! - [`writes`]: every conditional transition of a claimed message, and
//!   [`MessageStore::apply_outcomes`], many of them in one command.
//! - [`requeue`]: an operator sending failed messages back to pending.
//! - [`counts`]: counts by status, maintained as messages change.
//! - [`upkeep`]: reconciliation, retention and the stats' range reads.
//! - [`due`]: the earliest due time by existence checks, never a read of the due range.
//! - [`provider_stats`]: what each provider did with Herald's requests, per hour.
//! - [`receipts`]: delivery receipts, applied by rank; those that found no message wait.
//!
//! A due message is `pending` with `next_attempt_at <= now`, or `processing` whose lease has
//! passed — while a message is processing its `next_attempt_at` *is* its lease end, so one
//! condition and one index (`{status, next_attempt_at, _id}`) serve both. How each read is
//! shaped for the SecantusDB test server's planner: `docs/architecture.md`.

pub mod callbacks;
pub mod claim;
pub mod counts;
pub mod due;
pub mod insert;
pub mod job_view;
pub mod list;
pub mod provider_stats;
pub mod receipts;
pub mod requeue;
pub mod upkeep;
pub mod window;
pub mod writes;

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use herald_core::mongo::IndexSpec;
use mongodb::{Collection, Database};

use crate::domain::{MessageDoc, MessageStatus};
pub use claim::Claim;
use claim::Claimer;
use coalesce::Coalescer;
pub use counts::{Reconciled, StatusCounts};
pub use herald_core::mongo::StoreError;
pub use job_view::JobView;
pub use provider_stats::{ProviderStats, ProviderWindow};
pub use requeue::RequeueFilter;
pub use writes::{Accepted, ClaimWrite, TransitionOutcome};

/// Name of the collection.
pub const COLLECTION: &str = "messages";

/// The indexes [`MessageStore::ensure_indexes`] creates on `messages` (`herald doctor` checks
/// they are there, with these keys).
pub fn index_specs() -> Vec<IndexSpec> {
    let spec = |name, keys, unique, sparse| IndexSpec {
        name,
        keys,
        unique,
        sparse,
    };
    vec![
        spec(
            "claim",
            doc! {"status": 1, "next_attempt_at": 1, "_id": 1},
            false,
            false,
        ),
        spec("sent", doc! {"status": 1, "sent_at": -1}, false, false),
        spec("status_id", doc! {"status": 1, "_id": -1}, false, false),
        spec("idempotency_key", doc! {"idempotency_key": 1}, true, true),
        spec("recipient", doc! {"to": 1, "_id": -1}, false, false),
        spec("claim_token", doc! {"claim_token": 1}, false, true),
        spec("waiting_for_provider", doc! {"waiting_for_provider": 1}, false, true),
        // Receipts find their message by the provider's id (sparse: only sent messages hold one).
        spec("receipt", doc! {"webhook_message_id": 1, "provider": 1}, false, true),
        // Whether any message asked for status callbacks, answered without a scan.
        spec("callback_url", doc! {"callback_url": 1}, false, true),
    ]
}

/// The repository over `messages`: inserts, lists, claims, transitions and counts.
#[derive(Clone)]
pub struct MessageStore {
    db: Database,
    messages: Collection<MessageDoc>,
    raw: Collection<Document>,
    counts: StatusCounts,
    widths: std::sync::Arc<window::Widths>,
    /// Single creates arriving together, stored with one `insert_many` ([`insert`]).
    inserts: Coalescer<MessageDoc, Result<(), StoreError>>,
    /// Claims arriving together, served by one claimer ([`claim`]).
    claimer: Claimer,
    /// Per-provider request counts and latencies.
    providers: ProviderStats,
    /// Where the oldest-due search starts: about where it found the oldest last ([`upkeep`]).
    due_floor: std::sync::Arc<std::sync::Mutex<Option<DateTime>>>,
    /// Full counts by status asked for together, counted once ([`counts`]).
    recount: Coalescer<(), Result<[u64; 5], StoreError>>,
}

/// Those of `ids` that are in status `from` and due at `now`. `_id` leads the filter on
/// purpose: the SecantusDB test server plans by the first field it can use (real MongoDB
/// plans the same whatever the order).
fn due_among(ids: &[ObjectId], from: MessageStatus, now: DateTime) -> Document {
    doc! {"_id": {"$in": ids}, "status": from.as_str(), "next_attempt_at": {"$lte": now}}
}

impl MessageStore {
    /// The store over `db.messages`.
    pub fn new(db: &Database) -> Self {
        let messages: Collection<MessageDoc> = db.collection(COLLECTION);
        let raw: Collection<Document> = db.collection(COLLECTION);
        let counts = StatusCounts::new(db);
        Self {
            db: db.clone(),
            inserts: insert::coalescer(messages.clone(), counts.clone()),
            claimer: Claimer::new(claim::ClaimSteps::new(messages.clone(), raw.clone(), counts.clone())),
            messages,
            raw,
            counts,
            widths: std::sync::Arc::default(),
            providers: ProviderStats::new(db),
            due_floor: std::sync::Arc::default(),
            recount: counts::recounter(db.collection(COLLECTION)),
        }
    }

    /// The database the store is over.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// The per-provider statistics.
    pub fn provider_stats(&self) -> &ProviderStats {
        &self.providers
    }

    /// How many pending messages wait because every provider they may go to is paused,
    /// counted up to `cap` (an index count over those alone, bounded).
    pub async fn count_waiting_for_provider(&self, cap: u64) -> Result<u64, StoreError> {
        Ok(self
            .messages
            .count_documents(doc! {"waiting_for_provider": true})
            .limit(cap)
            .await?)
    }

    /// The maintained counts by status that every transition here keeps up to date.
    pub fn counts(&self) -> &StatusCounts {
        &self.counts
    }

    /// Creates the indexes (idempotent): [`index_specs`].
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        self.messages
            .create_indexes(index_specs().iter().map(IndexSpec::model))
            .await?;
        self.providers.ensure_indexes().await?;
        self.ensure_receipt_indexes().await?;
        Ok(())
    }

    /// One message by id.
    pub async fn find(&self, id: ObjectId) -> Result<Option<MessageDoc>, StoreError> {
        Ok(self.messages.find_one(doc! {"_id": id}).await?)
    }

    /// One message by idempotency key.
    pub async fn find_by_idempotency_key(&self, key: &str) -> Result<Option<MessageDoc>, StoreError> {
        Ok(self.messages.find_one(doc! {"idempotency_key": key}).await?)
    }

    /// The messages with these ids, in no particular order.
    pub async fn find_many(&self, ids: &[ObjectId]) -> Result<Vec<MessageDoc>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .messages
            .find(doc! {"_id": {"$in": ids}})
            .await?
            .try_collect()
            .await?)
    }

    /// Whether any stored message asked for status callbacks (the sparse `callback_url` index
    /// answers it from one key).
    pub async fn any_with_callbacks(&self) -> Result<bool, StoreError> {
        Ok(self
            .messages
            .count_documents(doc! {"callback_url": {"$exists": true}})
            .limit(1)
            .await?
            > 0)
    }

    /// Those of the messages with these ids that asked for status callbacks.
    pub async fn with_callbacks(&self, ids: &[ObjectId]) -> Result<Vec<MessageDoc>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .messages
            .find(doc! {"_id": {"$in": ids}, "callback_url": {"$exists": true}})
            .projection(doc! {"attempts_log": 0, "receipts": 0})
            .await?
            .try_collect()
            .await?)
    }

    /// The ids of up to `limit` messages matching `filter`, in `sort` order when given.
    async fn ids_matching(
        &self,
        filter: Document,
        sort: Option<Document>,
        limit: usize,
    ) -> Result<Vec<ObjectId>, StoreError> {
        let found: Vec<Document> = self
            .raw
            .find(filter)
            .with_options(
                mongodb::options::FindOptions::builder()
                    .sort(sort)
                    .limit(limit as i64)
                    .projection(doc! {"_id": 1})
                    .build(),
            )
            .await?
            .try_collect()
            .await?;
        Ok(found.iter().filter_map(|d| d.get_object_id("_id").ok()).collect())
    }
}
