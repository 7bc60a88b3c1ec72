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

/// What came of a receipt.
#[derive(Debug)]
pub enum Applied {
    /// It moved the message's delivery; the message after.
    Moved(Box<MessageDoc>),
    /// The message is at this rank or past it already (a replay, a late intermediate).
    Stale,
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
    pub async fn apply_receipt(
        &self,
        provider: &str,
        webhook_message_id: &str,
        delivery: &DeliveryDoc,
    ) -> Result<Applied, StoreError> {
        let delivery_bson = bson::to_bson(delivery)?;
        let moved = self
            .messages
            .find_one_and_update(
                doc! {
                    "webhook_message_id": webhook_message_id,
                    "provider": provider,
                    "$or": [{"delivery": {"$exists": false}}, {"delivery.rank": {"$lt": delivery.rank}}],
                },
                doc! {
                    "$set": {"delivery": delivery_bson.clone(), "updated_at": delivery.at},
                    "$push": {"receipts": {"$each": [delivery_bson], "$slice": -RECEIPTS_KEPT}},
                },
            )
            .return_document(ReturnDocument::After)
            .await?;
        if let Some(message) = moved {
            return Ok(Applied::Moved(Box::new(message)));
        }
        let exists = self
            .raw
            .find_one(doc! {"webhook_message_id": webhook_message_id, "provider": provider})
            .projection(doc! {"_id": 1})
            .await?
            .is_some();
        Ok(if exists { Applied::Stale } else { Applied::NoMessage })
    }

    /// Keeps a receipt that found no message.
    pub async fn keep_pending_receipt(&self, receipt: &PendingReceipt) -> Result<(), StoreError> {
        self.pending().insert_one(receipt).await?;
        Ok(())
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

    /// How many receipts wait (the collection's estimate: one metadata read).
    pub async fn pending_receipt_count(&self) -> Result<u64, StoreError> {
        Ok(self.pending().estimated_document_count().await?)
    }
}
