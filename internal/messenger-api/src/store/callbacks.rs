//! The status-callback outbox: one document per (message, event) in `callbacks`, written when
//! the message's state changes and held, attempted and retried the way messages are — a due
//! callback is `pending` with `next_attempt_at <= now`, or `processing` whose lease (then its
//! `next_attempt_at`) has passed; a claim takes it under a fresh token with a conditional
//! update, so two replicas never hold the same one; every report is conditional on that token.
//!
//! The id is `msg_<message id>_<event>`: the same event of the same message is written once
//! however often its transition is reported again (a retried commit, a replayed receipt), and
//! it is the `webhook-id` the receiver deduplicates by.

use std::time::Duration;

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use herald_core::callbacks::{CallbackEvent, CallbackResultKind, CallbackStatus};
use herald_core::mongo::{is_duplicate_key, IndexSpec};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};

use super::StoreError;

/// Name of the collection.
pub const COLLECTION: &str = "callbacks";
/// Attempts kept on a callback.
pub const HISTORY_KEPT: i32 = 10;

/// One attempt, as kept on its callback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptEntry {
    /// When it was reported.
    pub at: DateTime,
    /// What happened.
    pub result: CallbackResultKind,
    /// The receiver's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i32>,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,
}

impl AttemptEntry {
    fn to_document(&self) -> Document {
        let mut d = doc! {"at": self.at, "result": result_word(self.result)};
        if let Some(code) = self.status_code {
            d.insert("status_code", code);
        }
        if let Some(error) = &self.error {
            d.insert("error", error);
        }
        if let Some(ms) = self.duration_ms {
            d.insert("duration_ms", ms);
        }
        d
    }
}

fn result_word(result: CallbackResultKind) -> &'static str {
    match result {
        CallbackResultKind::Delivered => "delivered",
        CallbackResultKind::Failed => "failed",
        CallbackResultKind::Refused => "refused",
        CallbackResultKind::Deferred => "deferred",
    }
}

/// A document of `callbacks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackDoc {
    /// `msg_<message id>_<event>`: the `webhook-id`.
    #[serde(rename = "_id")]
    pub id: String,
    /// The message it tells about.
    pub message_id: ObjectId,
    /// What it tells.
    pub event: CallbackEvent,
    /// Where it goes.
    pub url: String,
    /// The JSON body, fixed when written (every attempt signs the same bytes).
    pub body: String,
    /// Where it stands.
    pub status: CallbackStatus,
    /// Attempts made.
    pub attempts: i32,
    /// When it is due; while processing, the lease end.
    pub next_attempt_at: DateTime,
    /// The current (or last) claim's token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_token: Option<String>,
    /// The current (or last) claimer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    /// The last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Its last [`HISTORY_KEPT`] attempts, oldest first.
    #[serde(default)]
    pub history: Vec<AttemptEntry>,
    /// When it was written.
    pub created_at: DateTime,
    /// Last change.
    pub updated_at: DateTime,
    /// When the receiver took it (the TTL runs from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<DateTime>,
}

impl CallbackDoc {
    /// The id of `event` of `message`.
    pub fn id_of(message: ObjectId, event: CallbackEvent) -> String {
        format!("msg_{}_{}", message.to_hex(), event.short())
    }
}

/// Where a report leaves a claimed callback.
#[derive(Debug, Clone)]
pub struct Settle {
    /// Its status after.
    pub status: CallbackStatus,
    /// When it is due next (pending only).
    pub next_attempt_at: Option<DateTime>,
    /// The attempt to keep; `None` for a deferral (no attempt was made).
    pub entry: Option<AttemptEntry>,
    /// Give back the attempt the claim counted (a deferral).
    pub uncount: bool,
}

/// The indexes of `callbacks` (`herald doctor` checks the first two).
pub fn index_specs() -> Vec<IndexSpec> {
    vec![
        IndexSpec {
            name: "callbacks_claim",
            keys: doc! {"status": 1, "next_attempt_at": 1, "_id": 1},
            unique: false,
            sparse: false,
        },
        IndexSpec {
            name: "callbacks_message",
            keys: doc! {"message_id": 1, "_id": 1},
            unique: false,
            sparse: false,
        },
    ]
}

/// The repository over `callbacks`.
#[derive(Clone)]
pub struct CallbackStore {
    callbacks: Collection<CallbackDoc>,
    raw: Collection<Document>,
    keep: Duration,
}

impl CallbackStore {
    /// The store over `db.callbacks`; delivered ones are removed `keep` after delivery.
    pub fn new(db: &Database, keep: Duration) -> Self {
        Self {
            callbacks: db.collection(COLLECTION),
            raw: db.collection(COLLECTION),
            keep,
        }
    }

    /// Creates the indexes (idempotent), with the TTL of delivered callbacks.
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let mut models: Vec<IndexModel> = index_specs().iter().map(IndexSpec::model).collect();
        models.push(
            IndexModel::builder()
                .keys(doc! {"delivered_at": 1})
                .options(
                    IndexOptions::builder()
                        .name("callbacks_delivered_ttl".to_owned())
                        .expire_after(self.keep.max(Duration::from_secs(60)))
                        .build(),
                )
                .build(),
        );
        self.callbacks.create_indexes(models).await?;
        Ok(())
    }

    /// Writes callbacks; one already written (the same event of the same message) is left as
    /// it is. Answers how many were new.
    pub async fn enqueue(&self, docs: Vec<CallbackDoc>) -> Result<u64, StoreError> {
        if docs.is_empty() {
            return Ok(0);
        }
        let total = docs.len() as u64;
        match self.callbacks.insert_many(docs).ordered(false).await {
            Ok(done) => Ok(done.inserted_ids.len() as u64),
            Err(error) if is_duplicate_key(&error) => {
                let duplicates = match &*error.kind {
                    mongodb::error::ErrorKind::InsertMany(e) => {
                        let errors = e.write_errors.as_deref().unwrap_or_default();
                        if errors.iter().any(|w| w.code != 11000) || e.write_concern_error.is_some() {
                            return Err(error.into());
                        }
                        errors.len() as u64
                    }
                    _ => total,
                };
                Ok(total.saturating_sub(duplicates))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Claims up to `limit` due callbacks for `worker` until `lease_until`, oldest due first.
    /// Each claim is one conditional update: a callback another replica took in between is
    /// skipped, never shared.
    pub async fn claim(
        &self,
        worker: &str,
        limit: usize,
        lease_until: DateTime,
        now: DateTime,
    ) -> Result<Vec<CallbackDoc>, StoreError> {
        // One read per due status, each an equality and a range on the claim index.
        let read = |status: CallbackStatus| {
            let filter = doc! {"status": status.as_str(), "next_attempt_at": {"$lte": now}};
            async move {
                self.raw
                    .find(filter)
                    .sort(doc! {"next_attempt_at": 1, "_id": 1})
                    .limit(limit as i64)
                    .projection(doc! {"_id": 1, "status": 1, "next_attempt_at": 1})
                    .await?
                    .try_collect::<Vec<Document>>()
                    .await
            }
        };
        let (pending, lapsed) = futures::try_join!(read(CallbackStatus::Pending), read(CallbackStatus::Processing))?;
        let mut due: Vec<(DateTime, String, String)> = pending
            .iter()
            .chain(&lapsed)
            .filter_map(|d| {
                Some((
                    *d.get_datetime("next_attempt_at").ok()?,
                    d.get_str("_id").ok()?.to_owned(),
                    d.get_str("status").ok()?.to_owned(),
                ))
            })
            .collect();
        due.sort();
        due.truncate(limit);
        let token = uuid::Uuid::new_v4().to_string();
        let claims = due.iter().map(|(_, id, status)| {
            let filter = doc! {"_id": id, "status": status, "next_attempt_at": {"$lte": now}};
            let update = doc! {
                "$set": {
                    "status": CallbackStatus::Processing.as_str(),
                    "claim_token": &token,
                    "claimed_by": worker,
                    "next_attempt_at": lease_until,
                    "updated_at": now,
                },
                "$inc": {"attempts": 1},
            };
            async move { self.raw.update_one(filter, update).await }
        });
        let claimed: u64 = futures::future::try_join_all(claims)
            .await?
            .iter()
            .map(|r| r.modified_count)
            .sum();
        if claimed == 0 {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = due.iter().map(|(_, id, _)| id.as_str()).collect();
        let mut held: Vec<CallbackDoc> = self
            .callbacks
            .find(doc! {"_id": {"$in": ids}, "claim_token": &token})
            .await?
            .try_collect()
            .await?;
        held.sort_by_key(|c| (c.created_at, c.id.clone()));
        Ok(held)
    }

    /// Settles one claimed callback, if `token` still holds it; answers it after, or `None`
    /// when the claim is no longer held.
    pub async fn settle(
        &self,
        id: &str,
        token: &str,
        settle: &Settle,
        now: DateTime,
    ) -> Result<Option<CallbackDoc>, StoreError> {
        let mut set = doc! {"status": settle.status.as_str(), "updated_at": now};
        if let Some(next) = settle.next_attempt_at {
            set.insert("next_attempt_at", next);
        }
        if settle.status == CallbackStatus::Delivered {
            set.insert("delivered_at", now);
        }
        let mut update = doc! {"$set": set};
        if let Some(entry) = &settle.entry {
            if let Some(error) = &entry.error {
                update
                    .get_document_mut("$set")
                    .expect("set")
                    .insert("last_error", error);
            }
            update.insert(
                "$push",
                doc! {"history": {"$each": [entry.to_document()], "$slice": -HISTORY_KEPT}},
            );
        }
        if settle.uncount {
            update.insert("$inc", doc! {"attempts": -1});
        }
        let filter = doc! {"_id": id, "claim_token": token, "status": CallbackStatus::Processing.as_str()};
        Ok(self
            .callbacks
            .find_one_and_update(filter, update)
            .return_document(ReturnDocument::After)
            .await?)
    }

    /// One callback.
    pub async fn find(&self, id: &str) -> Result<Option<CallbackDoc>, StoreError> {
        Ok(self.callbacks.find_one(doc! {"_id": id}).await?)
    }

    /// The callbacks of one message, in the order they were written.
    pub async fn for_message(&self, message: ObjectId) -> Result<Vec<CallbackDoc>, StoreError> {
        let mut found: Vec<CallbackDoc> = self
            .callbacks
            .find(doc! {"message_id": message})
            .limit(64)
            .await?
            .try_collect()
            .await?;
        found.sort_by_key(|c| (c.created_at, c.id.clone()));
        Ok(found)
    }

    /// Up to `limit` callbacks in `status`, oldest due first (a bounded read of the claim
    /// index).
    pub async fn in_status(&self, status: CallbackStatus, limit: usize) -> Result<Vec<CallbackDoc>, StoreError> {
        Ok(self
            .callbacks
            .find(doc! {"status": status.as_str()})
            .sort(doc! {"next_attempt_at": 1, "_id": 1})
            .limit(limit as i64)
            .await?
            .try_collect()
            .await?)
    }

    /// Sends a dead callback again: pending now, its attempts from zero, its history kept.
    /// Answers it after, or `None` when it is not dead.
    pub async fn revive(&self, id: &str, now: DateTime) -> Result<Option<CallbackDoc>, StoreError> {
        Ok(self
            .callbacks
            .find_one_and_update(
                doc! {"_id": id, "status": CallbackStatus::Dead.as_str()},
                doc! {"$set": {
                    "status": CallbackStatus::Pending.as_str(),
                    "attempts": 0,
                    "next_attempt_at": now,
                    "updated_at": now,
                }},
            )
            .return_document(ReturnDocument::After)
            .await?)
    }
}
