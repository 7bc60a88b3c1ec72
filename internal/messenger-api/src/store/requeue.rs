//! An operator sends failed messages back to pending: one by id, or many by filter.

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use chrono::Utc;

use super::counts::Deltas;
use super::writes::{ClaimWrite, TransitionOutcome};
use super::{MessageStore, StoreError};
use crate::domain::{MessageStatus, Transition};

/// Which failed messages a bulk re-queue takes.
#[derive(Debug, Clone)]
pub struct RequeueFilter {
    /// Must be `failed`.
    pub status: MessageStatus,
    /// Created at or after.
    pub created_from: Option<chrono::DateTime<Utc>>,
    /// Created at or before.
    pub created_to: Option<chrono::DateTime<Utc>>,
    /// To this number.
    pub to: Option<String>,
}

impl RequeueFilter {
    /// The failed messages it matches, as a query.
    fn query(&self) -> Document {
        let mut query = doc! {"status": MessageStatus::Failed.as_str()};
        let mut created = Document::new();
        if let Some(from) = self.created_from {
            created.insert("$gte", DateTime::from_chrono(from));
        }
        if let Some(to) = self.created_to {
            created.insert("$lte", DateTime::from_chrono(to));
        }
        if !created.is_empty() {
            query.insert("created_at", created);
        }
        if let Some(to) = &self.to {
            query.insert("to", to.as_str());
        }
        query
    }
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

impl MessageStore {
    /// Operator re-queue: a failed message becomes pending, due now, with a fresh retry budget.
    pub async fn requeue_failed(&self, id: ObjectId, now: DateTime) -> Result<TransitionOutcome, StoreError> {
        let write = ClaimWrite {
            id,
            filter: doc! {"_id": id, "status": MessageStatus::Failed.as_str()},
            update: requeue(now),
            to: MessageStatus::Pending,
            sent_at: None,
            commit: None,
        };
        self.transition(write, MessageStatus::Failed).await
    }

    /// How many failed messages match `filter`.
    pub async fn count_failed(&self, filter: &RequeueFilter) -> Result<u64, StoreError> {
        Ok(self.messages.count_documents(filter.query()).await?)
    }

    /// Re-queues up to `limit` failed messages matching `filter`, oldest first; answers how
    /// many it re-queued (each one stays conditional on still being failed).
    pub async fn requeue_failed_matching(
        &self,
        filter: &RequeueFilter,
        limit: usize,
        now: DateTime,
    ) -> Result<u64, StoreError> {
        let ids = self.ids_matching(filter.query(), Some(doc! {"_id": 1}), limit).await?;
        if ids.is_empty() {
            return Ok(0);
        }
        let result = self
            .messages
            .update_many(
                doc! {"_id": {"$in": ids}, "status": MessageStatus::Failed.as_str()},
                requeue(now),
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
}
