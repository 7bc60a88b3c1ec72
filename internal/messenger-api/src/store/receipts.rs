//! Delivery receipts on messages: one conditional update applies a receipt only over a lower
//! delivery rank (so order, replays and races between replicas cannot move a message back), and
//! receipts that found no message — the provider's callback beat Herald's own commit, or the id
//! was never Herald's — wait in `receipts_pending` for a day (TTL), matched again by the upkeep.

use std::time::Duration;

use bson::oid::ObjectId;
use bson::{doc, DateTime};
use futures::TryStreamExt;
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Collection, IndexModel};
use serde::{Deserialize, Serialize};

use super::MessageStore;
use crate::domain::{DeliveryDoc, MessageDoc, RECEIPTS_KEPT};
use crate::error::StoreError;

/// The collection of receipts that found no message yet.
pub const PENDING_COLLECTION: &str = "receipts_pending";
/// How long a receipt waits for its message.
pub const PENDING_KEPT: Duration = Duration::from_secs(86_400);
/// Where the sweep for receipts that never came has got to.
const SWEEP_STATE_COLLECTION: &str = "receipts_sweep";
/// The sweep of the providers on `receipts.timeout_hours` (others: `unknown:<hours>`).
pub const DEFAULT_SWEEP: &str = "unknown";
/// How often a receipt is tried on a message that appeared while it was applied.
const APPLY_TRIES: usize = 3;
/// The span of sends one timeout sweep looks at, at most.
pub const SWEEP_WINDOW: Duration = Duration::from_secs(3600);

/// What came of a receipt.
#[derive(Debug)]
pub enum Applied {
    /// It moved the message's delivery; the message after.
    Moved(Box<MessageDoc>),
    /// The message is at this rank or past it already (a replay, a late intermediate); the
    /// message as it stands.
    Stale(Box<MessageDoc>),
    /// No message sent through this provider has this id (yet).
    NoMessage,
}

/// A receipt waiting for its message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingReceipt {
    /// Its id.
    #[serde(rename = "_id")]
    pub id: ObjectId,
    /// The provider it came from.
    pub provider: String,
    /// The provider's message id.
    pub webhook_message_id: String,
    /// What it reports.
    pub delivery: DeliveryDoc,
    /// When it came (the TTL runs from here).
    pub received_at: DateTime,
}

impl MessageStore {
    fn pending(&self) -> Collection<PendingReceipt> {
        self.db.collection(PENDING_COLLECTION)
    }

    /// The TTL index of waiting receipts and the index that matches them.
    pub(super) async fn ensure_receipt_indexes(&self) -> Result<(), StoreError> {
        self.pending()
            .create_indexes([
                IndexModel::builder()
                    .keys(doc! {"received_at": 1})
                    .options(
                        IndexOptions::builder()
                            .name("receipts_pending_ttl".to_owned())
                            .expire_after(PENDING_KEPT)
                            .build(),
                    )
                    .build(),
                IndexModel::builder()
                    .keys(doc! {"provider": 1, "webhook_message_id": 1})
                    .options(IndexOptions::builder().name("receipts_pending_id".to_owned()).build())
                    .build(),
            ])
            .await?;
        Ok(())
    }

    /// Applies `delivery` to the message `provider` accepted as `webhook_message_id`.
    ///
    /// The conditional update and the read that tells "stale" from "no message" are two steps:
    /// a commit that lands between them makes the message appear with a lower rank. The update
    /// is then tried again (a stale answer would drop the receipt: it was seen under load, 190
    /// of 20,000 in a drain), at most [`APPLY_TRIES`] times.
    pub async fn apply_receipt(
        &self,
        provider: &str,
        webhook_message_id: &str,
        delivery: &DeliveryDoc,
    ) -> Result<Applied, StoreError> {
        let delivery_bson = bson::to_bson(delivery)?;
        let mut tries = 0;
        loop {
            tries += 1;
            let moved = self
                .messages
                .find_one_and_update(
                    doc! {
                        "webhook_message_id": webhook_message_id,
                        "provider": provider,
                        // "No delivery yet, or a lower one" as one condition: SecantusDB plans a
                        // findAndModify with an `$or` as a collection scan (17 ms at 20k messages
                        // against 0.8 ms for this form).
                        "delivery.rank": {"$not": {"$gte": delivery.rank}},
                    },
                    doc! {
                        "$set": {"delivery": delivery_bson.clone(), "updated_at": delivery.at},
                        "$push": {"receipts": {"$each": [delivery_bson.clone()], "$slice": -RECEIPTS_KEPT}},
                    },
                )
                .return_document(ReturnDocument::After)
                .await?;
            if let Some(message) = moved {
                return Ok(Applied::Moved(Box::new(message)));
            }
            let found = self
                .messages
                .find_one(doc! {"webhook_message_id": webhook_message_id, "provider": provider})
                .projection(doc! {"attempts_log": 0, "receipts": 0})
                .await?;
            match found {
                None => return Ok(Applied::NoMessage),
                Some(message) if message.delivery.as_ref().is_some_and(|d| d.rank >= delivery.rank) => {
                    return Ok(Applied::Stale(Box::new(message)))
                }
                // It appeared (or moved back) between the two steps: try the update again.
                Some(message) if tries >= APPLY_TRIES => return Ok(Applied::Stale(Box::new(message))),
                Some(_) => {}
            }
        }
    }

    /// Keeps a receipt that found no message.
    pub async fn keep_pending_receipt(&self, receipt: &PendingReceipt) -> Result<(), StoreError> {
        self.pending().insert_one(receipt).await?;
        Ok(())
    }

    /// The waiting receipts of `provider` for these provider ids (one read of the matching
    /// index: what a batch of commits checks).
    pub async fn pending_receipts_for(
        &self,
        provider: &str,
        webhook_message_ids: &[&str],
    ) -> Result<Vec<PendingReceipt>, StoreError> {
        if webhook_message_ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .pending()
            .find(doc! {"provider": provider, "webhook_message_id": {"$in": webhook_message_ids}})
            .await?
            .try_collect()
            .await?)
    }

    /// Up to `limit` waiting receipts that came in `(after, until]`, oldest first (a bounded
    /// read of the TTL index).
    pub async fn pending_receipts_between(
        &self,
        after: DateTime,
        until: DateTime,
        limit: i64,
    ) -> Result<Vec<PendingReceipt>, StoreError> {
        Ok(self
            .pending()
            .find(doc! {"received_at": {"$gt": after, "$lte": until}})
            .sort(doc! {"received_at": 1})
            .limit(limit)
            .await?
            .try_collect()
            .await?)
    }

    /// The oldest `limit` waiting receipts.
    pub async fn pending_receipts(&self, limit: i64) -> Result<Vec<PendingReceipt>, StoreError> {
        Ok(self
            .pending()
            .find(doc! {})
            .sort(doc! {"_id": 1})
            .limit(limit)
            .await?
            .try_collect()
            .await?)
    }

    /// Drops a waiting receipt that found its message.
    pub async fn drop_pending_receipt(&self, id: ObjectId) -> Result<(), StoreError> {
        self.pending().delete_one(doc! {"_id": id}).await?;
        Ok(())
    }

    /// Where the timeout sweep `sweep` stopped: it has looked at every message sent up to then.
    pub async fn unknown_sweep_floor(&self, sweep: &str) -> Result<Option<DateTime>, StoreError> {
        let state = self
            .db
            .collection::<bson::Document>(SWEEP_STATE_COLLECTION)
            .find_one(doc! {"_id": sweep})
            .await?;
        Ok(state.and_then(|s| s.get_datetime("floor").ok().copied()))
    }

    /// Gives messages sent through `providers` in `(floor, cutoff]` — the first `batch` of
    /// them by `sent_at`, within one [`SWEEP_WINDOW`] of the floor — that hold no final
    /// delivery the state `unknown` (`delivery`), then moves the floor past them (or to the
    /// window's end when it held fewer). Reads at most a window of the sent index, never the
    /// collection: a server that reads a sorted range whole before its limit (the SecantusDB
    /// test server) reads one window's sends. Answers how many it marked and whether it reached
    /// the cutoff.
    pub async fn mark_unknown_after(
        &self,
        sweep: &str,
        providers: &[String],
        floor: DateTime,
        cutoff: DateTime,
        batch: i64,
        unknown: &DeliveryDoc,
    ) -> Result<(u64, bool), StoreError> {
        let window_end = DateTime::from_millis(
            (floor.timestamp_millis() + SWEEP_WINDOW.as_millis() as i64).min(cutoff.timestamp_millis()),
        );
        let seen: Vec<bson::Document> = self
            .raw
            .find(doc! {"status": "sent", "sent_at": {"$gt": floor, "$lte": window_end}})
            .sort(doc! {"status": 1, "sent_at": 1})
            .limit(batch)
            .projection(doc! {"_id": 1, "sent_at": 1})
            .await?
            .try_collect()
            .await?;
        let full = seen.len() as i64 >= batch;
        let next_floor = match seen.last().and_then(|d| d.get_datetime("sent_at").ok().copied()) {
            Some(last) if full => last,
            _ => window_end,
        };
        let ids: Vec<ObjectId> = seen.iter().filter_map(|d| d.get_object_id("_id").ok()).collect();
        if ids.is_empty() {
            self.save_sweep_floor(sweep, next_floor).await?;
            return Ok((0, window_end == cutoff));
        }
        let unknown_bson = bson::to_bson(unknown)?;
        let marked = self
            .messages
            .update_many(
                doc! {
                    "_id": {"$in": ids},
                    "provider": {"$in": providers},
                    "delivery.rank": {"$not": {"$gte": unknown.rank}},
                },
                doc! {
                    "$set": {"delivery": unknown_bson.clone(), "updated_at": unknown.at},
                    "$push": {"receipts": {"$each": [unknown_bson], "$slice": -RECEIPTS_KEPT}},
                },
            )
            .await?
            .modified_count;
        self.save_sweep_floor(sweep, next_floor).await?;
        Ok((marked, !full && window_end == cutoff))
    }

    async fn save_sweep_floor(&self, sweep: &str, floor: DateTime) -> Result<(), StoreError> {
        self.db
            .collection::<bson::Document>(SWEEP_STATE_COLLECTION)
            .update_one(doc! {"_id": sweep}, doc! {"$set": {"floor": floor}})
            .upsert(true)
            .await?;
        Ok(())
    }

    /// How many receipts wait (the collection's estimate: one metadata read).
    pub async fn pending_receipt_count(&self) -> Result<u64, StoreError> {
        Ok(self.pending().estimated_document_count().await?)
    }
}
