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

use crate::domain::{LastError, MessageDoc, MessageStatus, Transition};
use crate::error::StoreError;
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
        }
    }
}

/// The repository over `messages`: inserts, lists, claims, transitions and counts.
#[derive(Clone)]
pub struct MessageStore {
    db: Database,
    messages: Collection<MessageDoc>,
    raw: Collection<Document>,
}

fn due_filter(now: DateTime) -> Document {
    doc! {
        "status": {"$in": [MessageStatus::Pending.as_str(), MessageStatus::Processing.as_str()]},
        "next_attempt_at": {"$lte": now},
    }
}

impl MessageStore {
    /// The store over `db.messages`.
    pub fn new(db: &Database) -> Self {
        Self {
            db: db.clone(),
            messages: db.collection(COLLECTION),
            raw: db.collection(COLLECTION),
        }
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
    pub async fn insert(&self, message: &MessageDoc) -> Result<(), StoreError> {
        self.messages.insert_one(message).await?;
        Ok(())
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

    /// Newest first, optionally of one status and/or one recipient.
    pub async fn list(
        &self,
        status: Option<MessageStatus>,
        to: Option<&str>,
        page: &PageRequest,
    ) -> Result<Fetched<MessageDoc>, StoreError> {
        let mut filter = Document::new();
        if let Some(status) = status {
            filter.insert("status", status.as_str());
        }
        if let Some(to) = to {
            filter.insert("to", to);
        }
        let (total, skip) = match page.start {
            PageStart::Offset(skip) => (Some(self.messages.count_documents(filter.clone()).await?), skip),
            PageStart::After(after) => {
                filter.insert("_id", doc! {"$lt": after});
                (None, 0)
            }
        };
        let sort = doc! {"_id": -1};
        find_page(&self.messages, filter, sort, skip, page, total, |m| m.id.to_hex()).await
    }

    /// Sent messages, newest `sent_at` first (ties by id).
    pub async fn list_sent(&self, page: &PageRequest) -> Result<Fetched<MessageDoc>, StoreError> {
        let base = doc! {"status": MessageStatus::Sent.as_str()};
        let (filter, total, skip) = match page.start {
            PageStart::Offset(skip) => (base.clone(), Some(self.messages.count_documents(base).await?), skip),
            PageStart::After(after) => {
                let anchor = self.messages.find_one(doc! {"_id": after, "status": "sent"}).await?;
                let filter = match anchor.and_then(|a| a.sent_at) {
                    Some(at) => doc! {
                        "status": "sent",
                        "$or": [
                            {"sent_at": {"$lt": at}},
                            {"sent_at": at, "_id": {"$lt": after}},
                        ],
                    },
                    // An unknown cursor yields an empty page rather than restarting the walk.
                    None => doc! {"_id": {"$exists": false}},
                };
                (filter, None, 0)
            }
        };
        let sort = doc! {"sent_at": -1, "_id": -1};
        find_page(&self.messages, filter, sort, skip, page, total, |m| m.id.to_hex()).await
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
        let mut filter = due_filter(until);
        if let Some(from) = from {
            filter.insert("next_attempt_at", doc! {"$gte": from, "$lte": until});
        }
        let found: Vec<Document> = self
            .raw
            .find(filter)
            .sort(doc! {"next_attempt_at": 1, "_id": 1})
            .limit(limit as i64)
            .projection(doc! {"_id": 1, "next_attempt_at": 1})
            .await?
            .try_collect()
            .await?;
        Ok(found
            .iter()
            .filter_map(|d| Some((d.get_object_id("_id").ok()?, *d.get_datetime("next_attempt_at").ok()?)))
            .collect())
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
        let mut filter = due_filter(now);
        filter.insert("_id", doc! {"$in": ids});
        // Never hand out a message past its expiry ([`MessageStore::expire_due`] ends those).
        filter.insert(
            "$or",
            vec![
                doc! {"expires_at": {"$exists": false}},
                doc! {"expires_at": {"$gt": now}},
            ],
        );
        let result = self
            .messages
            .update_many(
                filter,
                doc! {
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
                },
            )
            .await?;
        Ok(result.modified_count)
    }

    /// Ends those of `ids` that are due at `now` but past their `expires_at`: `expired`, final,
    /// never sent (again). Returns how many.
    pub async fn expire_due(&self, ids: &[ObjectId], now: DateTime) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut filter = due_filter(now);
        filter.insert("_id", doc! {"$in": ids});
        filter.insert("expires_at", doc! {"$lte": now});
        let result = self.messages.update_many(filter, ClaimWrite::expired(now)).await?;
        Ok(result.modified_count)
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
        self.transition(write.filter, write.update, id).await
    }

    /// Gives a claimed, unsent message back: pending, due now, the attempt not counted.
    pub async fn release(&self, id: ObjectId, token: &str, now: DateTime) -> Result<TransitionOutcome, StoreError> {
        let write = ClaimWrite::release(id, token, now);
        self.transition(write.filter, write.update, id).await
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
        self.transition(
            doc! {"_id": id, "status": MessageStatus::Failed.as_str()},
            Self::requeue(now),
            id,
        )
        .await
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
        let ids: Vec<ObjectId> = self
            .raw
            .find(filter)
            .sort(doc! {"_id": 1})
            .limit(limit as i64)
            .projection(doc! {"_id": 1})
            .await?
            .try_collect::<Vec<Document>>()
            .await?
            .iter()
            .filter_map(|d| d.get_object_id("_id").ok())
            .collect();
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
        Ok(result.modified_count)
    }

    async fn transition(
        &self,
        filter: Document,
        update: Document,
        id: ObjectId,
    ) -> Result<TransitionOutcome, StoreError> {
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

    /// Applies `writes` with one unordered `update` command (each write stays conditional on
    /// its claim) and returns how many matched.
    pub async fn apply_claim_writes(&self, writes: Vec<ClaimWrite>) -> Result<u64, StoreError> {
        if writes.is_empty() {
            return Ok(0);
        }
        let updates: Vec<Document> = writes
            .into_iter()
            .map(|w| doc! {"q": w.filter, "u": w.update})
            .collect();
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

    /// Messages per status.
    pub async fn count_by_status(&self) -> Result<Vec<(MessageStatus, u64)>, StoreError> {
        let mut counts = Vec::new();
        for status in MessageStatus::ALL {
            counts.push((
                status,
                self.messages.count_documents(doc! {"status": status.as_str()}).await?,
            ));
        }
        Ok(counts)
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
