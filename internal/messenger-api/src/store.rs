//! The repository over the `messages` collection. The messages' BSON and `doc!` live here (the
//! event feed reads change documents, and [`crate::job_view`] the scheduler's collections).
//!
//! Claiming is the delicate part. A due message is `pending` with `next_attempt_at <= now`, or
//! `processing` whose lease has passed — and while a message is processing its
//! `next_attempt_at` *is* its lease end, so one condition and one index
//! (`{status, next_attempt_at, _id}`) serve both. The store offers the steps
//! ([`MessageStore::due_ids`], [`MessageStore::claim_ids`], [`MessageStore::held_by`]);
//! [`crate::claimer`] decides which ids go to which caller.

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use mongodb::options::{FindOneAndUpdateOptions, IndexOptions, ReturnDocument};
use mongodb::{Collection, Database, IndexModel};

use crate::counts::{Deltas, Reconciled, StatusCounts};
use crate::domain::{LastError, MessageDoc, MessageStatus, Transition};
use crate::error::StoreError;
use crate::window::{self, Axis, Walk, Widths};
use coalesce::Coalescer;
use herald_core::mongo::find_page;
use herald_core::pagination::{Fetched, PageRequest, PageStart};

/// Name of the collection.
pub const COLLECTION: &str = "messages";

/// The outcome of a conditional commit.
#[derive(Debug)]
pub enum CommitOutcome {
    /// This call marked it sent.
    Committed(MessageDoc),
    /// It was already committed under the same claim (a retried call).
    AlreadyCommitted(MessageDoc),
    /// The claim is no longer held.
    ClaimLost,
    /// No such message.
    NotFound,
}

/// The outcome of a conditional transition other than commit.
#[derive(Debug)]
pub enum TransitionOutcome {
    /// Done; the document after the change.
    Done(MessageDoc),
    /// The precondition did not hold; the document as it is.
    Conflict(MessageDoc),
    /// No such message.
    NotFound,
}

/// A conditional write to a claimed message: it applies only while `token` holds the claim.
#[derive(Debug, Clone)]
pub struct ClaimWrite {
    /// The message.
    pub id: ObjectId,
    /// `{_id, status: processing, claim_token}`.
    filter: Document,
    /// The transition.
    update: Document,
    /// The status it leaves the message in.
    to: MessageStatus,
    /// When it was sent, for a commit.
    sent_at: Option<DateTime>,
}

impl ClaimWrite {
    fn claimed(id: ObjectId, token: &str) -> Document {
        doc! {"_id": id, "status": MessageStatus::Processing.as_str(), "claim_token": token}
    }

    /// Sent: the provider accepted it at `sent_at`.
    pub fn sent(id: ObjectId, token: &str, webhook_message_id: Option<&str>, sent_at: DateTime, now: DateTime) -> Self {
        let mut set = doc! {
            "status": MessageStatus::Sent.as_str(),
            "sent_at": sent_at,
            "updated_at": now,
            "last_transition": Transition::Sent.as_str(),
        };
        if let Some(mid) = webhook_message_id {
            set.insert("webhook_message_id", mid);
        }
        Self {
            id,
            filter: Self::claimed(id, token),
            update: doc! {"$set": set, "$unset": {"lease_until": ""}},
            to: MessageStatus::Sent,
            sent_at: Some(sent_at),
        }
    }

    /// A failed attempt: `status` pending (due at `next_attempt_at`), failed, or expired.
    pub fn failure(
        id: ObjectId,
        token: &str,
        status: MessageStatus,
        next_attempt_at: DateTime,
        error: &LastError,
        now: DateTime,
    ) -> Result<Self, StoreError> {
        let transition = match status {
            MessageStatus::Failed => Transition::Failed,
            MessageStatus::Expired => Transition::Expired,
            _ => Transition::RetryScheduled,
        };
        Ok(Self {
            id,
            filter: Self::claimed(id, token),
            update: doc! {
                "$set": {
                    "status": status.as_str(),
                    "next_attempt_at": next_attempt_at,
                    "last_error": bson::to_bson(error)?,
                    "updated_at": now,
                    "last_transition": transition.as_str(),
                },
                "$unset": {"lease_until": ""},
            },
            to: status,
            sent_at: None,
        })
    }

    /// The write that ends a message `expired`.
    fn expired(now: DateTime) -> Document {
        doc! {
            "$set": {
                "status": MessageStatus::Expired.as_str(),
                "next_attempt_at": now,
                "updated_at": now,
                "last_transition": Transition::Expired.as_str(),
            },
            "$unset": {"lease_until": ""},
        }
    }

    /// Expired before it could be sent: final, and the attempt not counted (it never went out).
    pub fn expire(id: ObjectId, token: &str, now: DateTime) -> Self {
        Self {
            id,
            filter: Self::claimed(id, token),
            update: {
                let mut update = Self::expired(now);
                update.insert("$inc", doc! {"attempts": -1});
                update
            },
            to: MessageStatus::Expired,
            sent_at: None,
        }
    }

    /// Given back unsent: pending, due now, the attempt not counted.
    pub fn release(id: ObjectId, token: &str, now: DateTime) -> Self {
        Self {
            id,
            filter: Self::claimed(id, token),
            update: doc! {
                "$set": {
                    "status": MessageStatus::Pending.as_str(),
                    "next_attempt_at": now,
                    "updated_at": now,
                    "last_transition": Transition::Released.as_str(),
                },
                "$unset": {"lease_until": ""},
                "$inc": {"attempts": -1},
            },
            to: MessageStatus::Pending,
            sent_at: None,
        }
    }
}

/// The repository over `messages`: inserts, lists, claims, transitions and counts.
#[derive(Clone)]
pub struct MessageStore {
    db: Database,
    messages: Collection<MessageDoc>,
    raw: Collection<Document>,
    counts: StatusCounts,
    widths: std::sync::Arc<Widths>,
    /// Single creates arriving together, stored with one `insert_many` ([`insert_group`]).
    inserts: Coalescer<MessageDoc, Result<(), StoreError>>,
}

/// Most creates one `insert_many` of [`MessageStore::insert`] takes.
const INSERT_GROUP: usize = 500;

/// Stores a group of single creates with one unordered `insert_many`, and answers each its own
/// result: stored, or refused on its own (a taken idempotency key is
/// [`StoreError::AlreadyExists`]) while the others stand. When the write fails as a whole (the
/// database away, a write concern not met) whatever of the group went in is removed again, so
/// no caller is told "not stored" about a message that is.
async fn insert_group(
    messages: Collection<MessageDoc>,
    counts: StatusCounts,
    group: Vec<MessageDoc>,
) -> Vec<Result<(), StoreError>> {
    let mut results: Vec<Result<(), StoreError>> = group.iter().map(|_| Ok(())).collect();
    if let Err(error) = messages.insert_many(&group).ordered(false).await {
        match &*error.kind {
            mongodb::error::ErrorKind::InsertMany(mongodb::error::InsertManyError {
                write_errors: Some(refused),
                write_concern_error: None,
                ..
            }) => {
                for item in refused {
                    if let Some(result) = results.get_mut(item.index) {
                        *result = Err(if item.code == 11000 {
                            StoreError::AlreadyExists
                        } else {
                            StoreError::Database(error.clone())
                        });
                    }
                }
            }
            _ => {
                let ids: Vec<ObjectId> = group.iter().map(|m| m.id).collect();
                if let Err(cleanup) = messages.delete_many(doc! {"_id": {"$in": ids}}).await {
                    tracing::error!(%cleanup, "could not remove a partly inserted group of creates");
                }
                let failure = StoreError::from(error);
                return group.iter().map(|_| Err(failure.clone())).collect();
            }
        }
    }
    let mut deltas = Deltas::default();
    for (message, _) in group.iter().zip(&results).filter(|(_, r)| r.is_ok()) {
        deltas.add(
            Deltas::added(message.status, 1)
                .with_first_id(Some(message.id))
                .with_last_id(Some(message.id)),
        );
    }
    counts.add(deltas).await;
    results
}

/// Those of `ids` that are in status `from` and due at `now`. `_id` leads the filter on
/// purpose: the SecantusDB test server plans by the first field it can use, and a filter led by
/// `status` makes it walk the claim index's whole due range to find 100 ids (69 ms against
/// 18 ms for the same update at 20k due). Real MongoDB plans the same whatever the order.
fn due_among(ids: &[ObjectId], from: MessageStatus, now: DateTime) -> Document {
    doc! {"_id": {"$in": ids}, "status": from.as_str(), "next_attempt_at": {"$lte": now}}
}

impl MessageStore {
    /// The store over `db.messages`.
    pub fn new(db: &Database) -> Self {
        let messages: Collection<MessageDoc> = db.collection(COLLECTION);
        let counts = StatusCounts::new(db);
        let inserts = {
            let (messages, counts) = (messages.clone(), counts.clone());
            Coalescer::limited(
                INSERT_GROUP,
                |_| 1,
                move |group| insert_group(messages.clone(), counts.clone(), group),
            )
        };
        Self {
            db: db.clone(),
            messages,
            raw: db.collection(COLLECTION),
            counts,
            widths: std::sync::Arc::default(),
            inserts,
        }
    }

    /// The maintained counts by status that every transition here keeps up to date.
    pub fn counts(&self) -> &StatusCounts {
        &self.counts
    }

    /// Creates the indexes (idempotent).
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        // (keys, name, unique, sparse)
        let specs = [
            (
                doc! {"status": 1, "next_attempt_at": 1, "_id": 1},
                "claim",
                false,
                false,
            ),
            (doc! {"status": 1, "sent_at": -1}, "sent", false, false),
            (doc! {"status": 1, "_id": -1}, "status_id", false, false),
            (doc! {"idempotency_key": 1}, "idempotency_key", true, true),
            (doc! {"to": 1, "_id": -1}, "recipient", false, false),
            (doc! {"claim_token": 1}, "claim_token", false, true),
        ];
        let indexes = specs.into_iter().map(|(keys, name, unique, sparse)| {
            let options = IndexOptions::builder()
                .name(name.to_owned())
                .unique(unique.then_some(true))
                .sparse(sparse.then_some(true))
                .build();
            IndexModel::builder().keys(keys).options(options).build()
        });
        self.messages.create_indexes(indexes).await?;
        Ok(())
    }

    /// Inserts one message; a taken idempotency key gives [`StoreError::AlreadyExists`].
    /// Creates that arrive together share one write (group commit, [`insert_group`]): each
    /// still succeeds or fails on its own, and a lone one is written at once.
    pub async fn insert(&self, message: &MessageDoc) -> Result<(), StoreError> {
        self.inserts
            .call(message.clone())
            .await
            .unwrap_or_else(|unanswered| Err(StoreError::Database(mongodb::error::Error::custom(unanswered))))
    }

    /// Inserts many in order. If the database fails part-way, the ones that went in are removed
    /// again, so a batch is stored whole or not at all.
    pub async fn insert_many(&self, messages: &[MessageDoc]) -> Result<(), StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        if let Err(error) = self.messages.insert_many(messages).await {
            let ids: Vec<ObjectId> = messages.iter().map(|m| m.id).collect();
            if let Err(cleanup) = self.messages.delete_many(doc! {"_id": {"$in": ids}}).await {
                tracing::error!(%cleanup, "could not remove a partly inserted batch");
            }
            return Err(error.into());
        }
        self.counts
            .add(
                Deltas::added(MessageStatus::Pending, messages.len() as u64)
                    .with_first_id(messages.iter().map(|m| m.id).min())
                    .with_last_id(messages.iter().map(|m| m.id).max()),
            )
            .await;
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

    /// Newest first, optionally of one status and/or one recipient; `total` only `with_total`
    /// (it counts every match). Offset pages past the first skip, as offsets do; the first
    /// page and cursor pages read windows ([`crate::window`]), about a page's worth at any depth.
    pub async fn list(
        &self,
        status: Option<MessageStatus>,
        to: Option<&str>,
        page: &PageRequest,
        with_total: bool,
    ) -> Result<Fetched<MessageDoc>, StoreError> {
        let mut base = Document::new();
        if let Some(status) = status {
            base.insert("status", status.as_str());
        }
        if let Some(to) = to {
            base.insert("to", to);
        }
        let total = self.total_if(with_total, &base).await?;
        let before = match page.start {
            PageStart::Offset(skip) if skip > 0 => {
                let sort = doc! {"_id": -1};
                return find_page(&self.messages, base, sort, skip, page, total, |m| m.id.to_hex()).await;
            }
            PageStart::Offset(_) => None,
            PageStart::After(after) => Some(window::id_position(after)),
        };
        let walk = Walk {
            kind: format!("id|{}|{}", status.map_or("", MessageStatus::as_str), to.is_some()),
            base,
            axis: Axis::Id,
            before,
        };
        let bounds = self.counts.snapshot().await?;
        let floor = bounds.as_ref().and_then(|s| s.first_id).map(window::id_position);
        let ceiling = bounds.as_ref().and_then(|s| s.last_id).map(window::id_position);
        let items = window::read(
            &self.messages,
            &self.widths,
            walk,
            page.fetch_limit() as usize,
            floor,
            ceiling,
        )
        .await?;
        Ok(Fetched::new(items, page, total, |m| m.id.to_hex()))
    }

    /// How many messages match `filter`, only when `wanted`: it reads every match.
    async fn total_if(&self, wanted: bool, filter: &Document) -> Result<Option<u64>, StoreError> {
        Ok(match wanted {
            true => Some(self.messages.count_documents(filter.clone()).await?),
            false => None,
        })
    }

    /// Sent messages, newest `sent_at` first (ties by id); `total` only `with_total`.
    pub async fn list_sent(&self, page: &PageRequest, with_total: bool) -> Result<Fetched<MessageDoc>, StoreError> {
        let base = doc! {"status": MessageStatus::Sent.as_str()};
        let total = self.total_if(with_total, &base).await?;
        let want = page.fetch_limit() as usize;
        let (mut items, before) = match page.start {
            PageStart::Offset(skip) if skip > 0 => {
                let sort = doc! {"sent_at": -1, "_id": -1};
                return find_page(&self.messages, base, sort, skip, page, total, |m| m.id.to_hex()).await;
            }
            PageStart::Offset(_) => (Vec::new(), None),
            PageStart::After(after) => {
                let anchor = self.messages.find_one(doc! {"_id": after, "status": "sent"}).await?;
                let Some(at) = anchor.and_then(|a| a.sent_at) else {
                    // An unknown cursor yields an empty page rather than restarting the walk.
                    return Ok(Fetched::new(Vec::new(), page, total, |m: &MessageDoc| m.id.to_hex()));
                };
                // Those sent in the cursor's own millisecond come first, then the windows below it.
                let ties: Vec<MessageDoc> = self
                    .messages
                    .find(doc! {"status": "sent", "sent_at": at, "_id": {"$lt": after}})
                    .sort(doc! {"_id": -1})
                    .limit(want as i64)
                    .await?
                    .try_collect()
                    .await?;
                (ties, Some(i128::from(at.timestamp_millis())))
            }
        };
        if items.len() < want {
            let walk = Walk {
                kind: "sent".to_owned(),
                base,
                axis: Axis::SentAt,
                before,
            };
            let floor = self
                .counts
                .snapshot()
                .await?
                .and_then(|s| s.first_sent_at)
                .map(|at| i128::from(at.timestamp_millis()));
            let more = window::read(&self.messages, &self.widths, walk, want - items.len(), floor, None).await?;
            items.extend(more);
        }
        Ok(Fetched::new(items, page, total, |m| m.id.to_hex()))
    }

    /// Ids and due times of up to `limit` due messages, oldest due first. With `from`, only
    /// those due at or after it (and not after `now`): the range read then follows the window,
    /// not the backlog, on servers that read a whole sorted range before limiting it.
    pub async fn due_ids(
        &self,
        from: Option<DateTime>,
        until: DateTime,
        limit: usize,
    ) -> Result<Vec<(ObjectId, DateTime)>, StoreError> {
        // One read per due status, each an equality on the claim index's first field and a
        // range on its second. With `status: {$in: [pending, processing]}` the SecantusDB test
        // server leaves the range unbounded (108 ms against 4 ms for 100 ids of a 20 ms window
        // at 20k due); real MongoDB bounds both. The two are merged in due order.
        let range = match from {
            Some(from) => doc! {"$gte": from, "$lte": until},
            None => doc! {"$lte": until},
        };
        let read = |status: MessageStatus| {
            let filter = doc! {"status": status.as_str(), "next_attempt_at": range.clone()};
            async move {
                self.raw
                    .find(filter)
                    .sort(doc! {"next_attempt_at": 1, "_id": 1})
                    .limit(limit as i64)
                    .projection(doc! {"_id": 1, "next_attempt_at": 1})
                    .await?
                    .try_collect::<Vec<Document>>()
                    .await
            }
        };
        let (pending, lapsed) = futures::try_join!(read(MessageStatus::Pending), read(MessageStatus::Processing))?;
        let mut found: Vec<(ObjectId, DateTime)> = pending
            .iter()
            .chain(&lapsed)
            .filter_map(|d| Some((d.get_object_id("_id").ok()?, *d.get_datetime("next_attempt_at").ok()?)))
            .collect();
        found.sort_by_key(|(id, at)| (*at, *id));
        found.truncate(limit);
        Ok(found)
    }

    /// Claims those of `ids` that are still due at `now` for `worker` under `token` until
    /// `lease_until`. Each document's update is atomic, so a message another caller took in
    /// between is skipped, never shared. Returns how many it claimed.
    pub async fn claim_ids(
        &self,
        ids: &[ObjectId],
        worker: &str,
        token: &str,
        lease_until: DateTime,
        now: DateTime,
    ) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let claim = doc! {
            "$set": {
                "status": MessageStatus::Processing.as_str(),
                "claim_token": token,
                "claimed_by": worker,
                "lease_until": lease_until,
                "next_attempt_at": lease_until,
                "updated_at": now,
                "last_transition": Transition::Claimed.as_str(),
            },
            "$inc": {"attempts": 1},
        };
        // Pending ones first, then (only when some are left) those whose lease ran out: the
        // counts need to know which status each claimed message left.
        let mut claimed = 0;
        for from in [MessageStatus::Pending, MessageStatus::Processing] {
            let mut filter = due_among(ids, from, now);
            // Never hand out a message past its expiry ([`MessageStore::expire_due`] ends those).
            // `$not` rather than an `$or` of "absent" and "later": with a top-level `$or` the
            // SecantusDB test server stops using an index for the whole filter (340 ms instead
            // of 8 ms beside a million messages).
            filter.insert("expires_at", doc! {"$not": {"$lte": now}});
            let n = self.messages.update_many(filter, claim.clone()).await?.modified_count;
            self.counts.add(Deltas::moved(from, MessageStatus::Processing, n)).await;
            claimed += n;
            if claimed as usize >= ids.len() {
                break;
            }
        }
        Ok(claimed)
    }

    /// Ends those of `ids` that are due at `now` but past their `expires_at`: `expired`, final,
    /// never sent (again). Returns how many.
    pub async fn expire_due(&self, ids: &[ObjectId], now: DateTime) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut expired = 0;
        for from in [MessageStatus::Pending, MessageStatus::Processing] {
            let mut filter = due_among(ids, from, now);
            filter.insert("expires_at", doc! {"$lte": now});
            let n = self
                .messages
                .update_many(filter, ClaimWrite::expired(now))
                .await?
                .modified_count;
            self.counts.add(Deltas::moved(from, MessageStatus::Expired, n)).await;
            expired += n;
        }
        Ok(expired)
    }

    /// The messages held under any of `tokens`, by id.
    pub async fn held_by(&self, tokens: &[String]) -> Result<Vec<MessageDoc>, StoreError> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .messages
            .find(doc! {"claim_token": {"$in": tokens}, "status": MessageStatus::Processing.as_str()})
            .sort(doc! {"_id": 1})
            .await?
            .try_collect()
            .await?)
    }

    /// Marks a message sent if `token` still holds its claim.
    pub async fn commit_sent(
        &self,
        id: ObjectId,
        token: &str,
        webhook_message_id: Option<&str>,
        sent_at: DateTime,
        now: DateTime,
    ) -> Result<CommitOutcome, StoreError> {
        let write = ClaimWrite::sent(id, token, webhook_message_id, sent_at, now);
        let updated = self
            .messages
            .find_one_and_update(write.filter, write.update)
            .with_options(
                FindOneAndUpdateOptions::builder()
                    .return_document(ReturnDocument::After)
                    .build(),
            )
            .await?;
        if let Some(doc) = updated {
            self.counts
                .add(Deltas::moved(MessageStatus::Processing, MessageStatus::Sent, 1).with_first_sent_at(Some(sent_at)))
                .await;
            return Ok(CommitOutcome::Committed(doc));
        }
        Ok(match self.find(id).await? {
            None => CommitOutcome::NotFound,
            Some(doc) if doc.status == MessageStatus::Sent && doc.claim_token.as_deref() == Some(token) => {
                CommitOutcome::AlreadyCommitted(doc)
            }
            Some(_) => CommitOutcome::ClaimLost,
        })
    }

    /// Moves a claimed message to `status` (pending with a later `next_attempt_at`, failed or expired)
    /// if `token` still holds the claim.
    pub async fn record_failure(
        &self,
        id: ObjectId,
        token: &str,
        status: MessageStatus,
        next_attempt_at: DateTime,
        error: &LastError,
        now: DateTime,
    ) -> Result<TransitionOutcome, StoreError> {
        let write = ClaimWrite::failure(id, token, status, next_attempt_at, error, now)?;
        self.transition(write, MessageStatus::Processing).await
    }

    /// Gives a claimed, unsent message back: pending, due now, the attempt not counted.
    pub async fn release(&self, id: ObjectId, token: &str, now: DateTime) -> Result<TransitionOutcome, StoreError> {
        let write = ClaimWrite::release(id, token, now);
        self.transition(write, MessageStatus::Processing).await
    }

    /// What an operator re-queue writes: pending, due now, a fresh retry budget.
    fn requeue(now: DateTime) -> Document {
        doc! {"$set": {
            "status": MessageStatus::Pending.as_str(),
            "next_attempt_at": now,
            "attempts": 0,
            "updated_at": now,
            "last_transition": Transition::Requeued.as_str(),
        }}
    }

    /// Operator re-queue: a failed message becomes pending, due now, with a fresh retry budget.
    pub async fn requeue_failed(&self, id: ObjectId, now: DateTime) -> Result<TransitionOutcome, StoreError> {
        let write = ClaimWrite {
            id,
            filter: doc! {"_id": id, "status": MessageStatus::Failed.as_str()},
            update: Self::requeue(now),
            to: MessageStatus::Pending,
            sent_at: None,
        };
        self.transition(write, MessageStatus::Failed).await
    }

    /// How many failed messages match `filter` (a document over `created_at` and `to`).
    pub async fn count_failed(&self, mut filter: Document) -> Result<u64, StoreError> {
        filter.insert("status", MessageStatus::Failed.as_str());
        Ok(self.messages.count_documents(filter).await?)
    }

    /// Re-queues up to `limit` failed messages matching `filter`, oldest first; answers how
    /// many it re-queued (each one stays conditional on still being failed).
    pub async fn requeue_failed_matching(
        &self,
        mut filter: Document,
        limit: usize,
        now: DateTime,
    ) -> Result<u64, StoreError> {
        filter.insert("status", MessageStatus::Failed.as_str());
        let ids = self.ids_matching(filter, Some(doc! {"_id": 1}), limit).await?;
        if ids.is_empty() {
            return Ok(0);
        }
        let result = self
            .messages
            .update_many(
                doc! {"_id": {"$in": ids}, "status": MessageStatus::Failed.as_str()},
                Self::requeue(now),
            )
            .await?;
        self.counts
            .add(Deltas::moved(
                MessageStatus::Failed,
                MessageStatus::Pending,
                result.modified_count,
            ))
            .await;
        Ok(result.modified_count)
    }

    /// Applies one conditional `write` to a message in status `from`.
    async fn transition(&self, write: ClaimWrite, from: MessageStatus) -> Result<TransitionOutcome, StoreError> {
        let ClaimWrite {
            id, filter, update, to, ..
        } = write;
        let updated = self
            .messages
            .find_one_and_update(filter, update)
            .with_options(
                FindOneAndUpdateOptions::builder()
                    .return_document(ReturnDocument::After)
                    .build(),
            )
            .await?;
        if let Some(doc) = updated {
            self.counts.add(Deltas::moved(from, to, 1)).await;
            return Ok(TransitionOutcome::Done(doc));
        }
        Ok(match self.find(id).await? {
            Some(doc) => TransitionOutcome::Conflict(doc),
            None => TransitionOutcome::NotFound,
        })
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

    /// Applies `writes` with one unordered `update` command per status they lead to (each
    /// write stays conditional on its claim; mostly that is one command) and returns how many
    /// matched.
    pub async fn apply_claim_writes(&self, writes: Vec<ClaimWrite>) -> Result<u64, StoreError> {
        let mut groups: Vec<(MessageStatus, Option<DateTime>, Vec<Document>)> = Vec::new();
        for write in writes {
            let update = doc! {"q": write.filter, "u": write.update};
            match groups.iter_mut().find(|(to, ..)| *to == write.to) {
                Some((_, first, updates)) => {
                    *first = (*first).min(write.sent_at).or(*first).or(write.sent_at);
                    updates.push(update);
                }
                None => groups.push((write.to, write.sent_at, vec![update])),
            }
        }
        let applied =
            futures::future::try_join_all(groups.into_iter().map(|(to, first_sent_at, updates)| async move {
                let n = self.update_unordered(updates).await?;
                self.counts
                    .add(
                        Deltas::moved(MessageStatus::Processing, to, n)
                            .with_first_sent_at(first_sent_at.filter(|_| n > 0)),
                    )
                    .await;
                Ok::<_, StoreError>(n)
            }))
            .await?;
        Ok(applied.into_iter().sum())
    }

    /// One unordered `update` command; how many matched.
    async fn update_unordered(&self, updates: Vec<Document>) -> Result<u64, StoreError> {
        let answer = self
            .db
            .run_command(doc! {"update": COLLECTION, "updates": updates, "ordered": false})
            .await?;
        if let Ok(errors) = answer.get_array("writeErrors") {
            if !errors.is_empty() {
                tracing::warn!(errors = errors.len(), "some outcome writes were refused");
            }
        }
        Ok(match answer.get("n") {
            Some(bson::Bson::Int32(n)) => *n as u64,
            Some(bson::Bson::Int64(n)) => *n as u64,
            _ => 0,
        })
    }

    /// Messages per status, as maintained ([`crate::counts`]): one document read. Before the
    /// counts of this collection were ever reconciled, it counts instead.
    pub async fn count_by_status(&self) -> Result<Vec<(MessageStatus, u64)>, StoreError> {
        match self.counts.snapshot().await? {
            Some(snapshot) if snapshot.exact => Ok(snapshot.by_status()),
            _ => Ok(MessageStatus::ALL
                .into_iter()
                .zip(self.count_exactly().await?)
                .collect()),
        }
    }

    /// Counts every status in the collection (expensive on a large one).
    async fn count_exactly(&self) -> Result<[u64; 5], StoreError> {
        let counts = futures::future::try_join_all(
            MessageStatus::ALL
                .map(|status| async move { self.messages.count_documents(doc! {"status": status.as_str()}).await }),
        )
        .await?;
        let mut exact = [0; 5];
        exact.copy_from_slice(&counts);
        Ok(exact)
    }

    /// Finds the oldest and newest `_id` and the oldest `sent_at` there are (full reads on
    /// some servers, like the count beside them) and widens the bounds list walks use to them.
    async fn widen_bounds(&self) -> Result<(), StoreError> {
        let end_id = |direction: i32| async move {
            Ok::<_, StoreError>(
                self.raw
                    .find_one(doc! {})
                    .sort(doc! {"_id": direction})
                    .projection(doc! {"_id": 1})
                    .await?
                    .and_then(|d| d.get_object_id("_id").ok()),
            )
        };
        let (first_id, last_id) = (end_id(1).await?, end_id(-1).await?);
        let first_sent_at = self
            .raw
            .find_one(doc! {"status": MessageStatus::Sent.as_str()})
            .sort(doc! {"sent_at": 1})
            .projection(doc! {"sent_at": 1})
            .await?
            .and_then(|d| d.get_datetime("sent_at").ok().copied());
        self.counts.widen_bounds(first_id, first_sent_at, last_id).await
    }

    /// Compares the maintained counts with a full count and corrects them when no count write
    /// happened while it counted (see [`crate::counts`]).
    pub async fn reconcile_counts(&self) -> Result<Reconciled, StoreError> {
        let run = async {
            // The floors first: on a collection that has messages but no counts document yet
            // (data from before counts were kept) this write creates it, and it must not land
            // between the two reads the correction compares.
            self.widen_bounds().await?;
            let before = self.counts.snapshot().await?;
            let actual = self.count_exactly().await?;
            let mut after = self.counts.snapshot().await?;
            if after.as_ref().is_none_or(|a| a.differs(&actual)) {
                // A message written before the count may still have its count write on the
                // way: give it time to land (and move the version) before calling it drift.
                tokio::time::sleep(crate::counts::SETTLE).await;
                after = self.counts.snapshot().await?;
            }
            self.counts.correct(before, actual, after).await
        };
        let outcome = run.await;
        if outcome.is_err() {
            self.counts.reconcile_failed();
        }
        outcome
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

    /// Removes up to `limit` messages that ended in final `status` before `ended_before` (sent
    /// ones by `sent_at`, failed and expired ones by when they ended, which their
    /// `next_attempt_at` records); answers how many. Both steps stay within the status's index
    /// range, and the delete repeats the condition, so a message re-queued meanwhile stays.
    pub async fn remove_final(
        &self,
        status: MessageStatus,
        ended_before: DateTime,
        limit: usize,
    ) -> Result<u64, StoreError> {
        let field = match status {
            MessageStatus::Sent => "sent_at",
            MessageStatus::Failed | MessageStatus::Expired => "next_attempt_at",
            MessageStatus::Pending | MessageStatus::Processing => return Ok(0),
        };
        let filter = doc! {"status": status.as_str(), field: {"$lt": ended_before}};
        let ids = self.ids_matching(filter.clone(), None, limit).await?;
        if ids.is_empty() {
            return Ok(0);
        }
        // `_id` first, as in [`due_among`].
        let mut by_id = doc! {"_id": {"$in": ids}};
        by_id.extend(filter);
        let removed = self.messages.delete_many(by_id).await?.deleted_count;
        self.counts.add(Deltas::removed(status, removed)).await;
        Ok(removed)
    }

    /// Sent messages with `from <= sent_at < to`: one bounded range of the `sent` index.
    pub async fn sent_between(&self, from: DateTime, to: DateTime) -> Result<Vec<MessageDoc>, StoreError> {
        let filter = doc! {"status": MessageStatus::Sent.as_str(), "sent_at": {"$gte": from, "$lt": to}};
        Ok(self.messages.find(filter).await?.try_collect().await?)
    }

    /// How long the most overdue pending message has been due, in seconds (0 when none is).
    pub async fn oldest_due_age_seconds(&self, now: DateTime) -> Result<f64, StoreError> {
        let oldest = self
            .messages
            .find_one(doc! {"status": MessageStatus::Pending.as_str(), "next_attempt_at": {"$lte": now}})
            .sort(doc! {"next_attempt_at": 1})
            .await?;
        Ok(oldest
            .map(|m| (now.timestamp_millis() - m.next_attempt_at.timestamp_millis()).max(0) as f64 / 1000.0)
            .unwrap_or(0.0))
    }
}
