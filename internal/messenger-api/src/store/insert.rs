//! Creates: one message, grouped with those arriving at the same moment into one
//! `insert_many` (a group commit), or a whole batch stored all or nothing.

use bson::doc;
use bson::oid::ObjectId;
use coalesce::Coalescer;
use mongodb::Collection;

use super::counts::{Deltas, StatusCounts};
use super::{MessageStore, StoreError};
use crate::domain::{MessageDoc, MessageStatus};

/// Most creates one `insert_many` of [`MessageStore::insert`] takes.
const INSERT_GROUP: usize = 500;

/// The group commit behind [`MessageStore::insert`].
pub(super) fn coalescer(
    messages: Collection<MessageDoc>,
    counts: StatusCounts,
) -> Coalescer<MessageDoc, Result<(), StoreError>> {
    Coalescer::limited(
        INSERT_GROUP,
        |_| 1,
        move |group| insert_group(messages.clone(), counts.clone(), group),
    )
}

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
                    // Some of the group may stand, uncounted.
                    counts.doubt();
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

impl MessageStore {
    /// Inserts one message; a taken idempotency key gives [`StoreError::AlreadyExists`].
    /// Creates that arrive together share one write (group commit, `insert_group`): each
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
}
