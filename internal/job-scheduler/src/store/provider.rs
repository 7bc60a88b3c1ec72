//! The `provider_state` collection: each provider's pause, shared by every replica, one
//! document per provider named by its `_id` (the rules that decide it are in
//! [`crate::provider`]).

use std::time::Duration;

use bson::{doc, DateTime};
use herald_core::jobs::{ProviderStateDoc, PROVIDER_STATE_COLLECTION};
use herald_core::mongo::{after, StoreError};
use mongodb::options::{FindOneAndUpdateOptions, ReturnDocument};
use mongodb::{Collection, Database};

/// One provider's document of the `provider_state` collection.
#[derive(Clone)]
pub struct ProviderStore {
    state: Collection<ProviderStateDoc>,
    name: String,
}

impl ProviderStore {
    /// The store of provider `name` over `db.provider_state`.
    pub fn new(db: &Database, name: &str) -> Self {
        Self {
            state: db.collection(PROVIDER_STATE_COLLECTION),
            name: name.to_owned(),
        }
    }

    /// The state (default: open).
    pub async fn read(&self) -> Result<ProviderStateDoc, StoreError> {
        Ok(self
            .state
            .find_one(doc! {"_id": &self.name})
            .await?
            .unwrap_or_else(|| ProviderStateDoc {
                id: self.name.clone(),
                ..Default::default()
            }))
    }

    fn upsert_after() -> FindOneAndUpdateOptions {
        FindOneAndUpdateOptions::builder()
            .upsert(true)
            .return_document(ReturnDocument::After)
            .build()
    }

    /// Pauses until `until`, or keeps a later pause already set; `misconfigured` when the
    /// provider refused Herald's credentials. Returns the state after.
    pub async fn pause(
        &self,
        until: DateTime,
        reason: &str,
        misconfigured: bool,
        now: DateTime,
    ) -> Result<ProviderStateDoc, StoreError> {
        let current = self.read().await?;
        let until = match current.paused_until {
            Some(set) if set > until => set,
            _ => until,
        };
        let updated = self
            .state
            .find_one_and_update(
                doc! {"_id": &self.name},
                doc! {
                    "$set": {"paused_until": until, "paused_at": now, "reason": reason, "failure_streak": 0, "misconfigured": misconfigured},
                    "$unset": {"probe_by": "", "probe_until": ""},
                    "$inc": {"pauses_in_a_row": 1},
                },
            )
            .with_options(Self::upsert_after())
            .await?;
        Ok(updated.unwrap_or(current))
    }

    /// Takes the probe when the pause is over and nobody holds it. True when this call took it.
    pub async fn take_probe(&self, worker: &str, now: DateTime, hold: Duration) -> Result<bool, StoreError> {
        let taken = self
            .state
            .find_one_and_update(
                doc! {
                    "_id": &self.name,
                    "paused_until": {"$lte": now},
                    "$or": [{"probe_until": {"$exists": false}}, {"probe_until": {"$lte": now}}],
                },
                doc! {"$set": {"probe_by": worker, "probe_until": after(now, hold)}},
            )
            .await?;
        Ok(taken.is_some())
    }

    /// Opens the provider again (a probe went through).
    pub async fn resume(&self) -> Result<(), StoreError> {
        self.state
            .update_one(
                doc! {"_id": &self.name},
                doc! {
                    "$set": {"paused_until": null, "reason": null, "pauses_in_a_row": 0, "failure_streak": 0, "misconfigured": false},
                    "$unset": {"probe_by": "", "probe_until": ""},
                },
            )
            .await?;
        Ok(())
    }

    /// Counts one more retryable failure in a row; answers the state after it (the streak,
    /// and any pause another replica set meanwhile).
    pub async fn count_failure(&self) -> Result<ProviderStateDoc, StoreError> {
        // The document is made first, apart from the count: replicas counting the first
        // failure at once race to create it, and an upserting `$inc` that loses that race
        // did not answer the count it made (on SecantusDB, three of ten racing first
        // failures were answered 1 while all ten landed). Made first, every `$inc` is a plain
        // update that answers exactly the count it made. The loop only turns again if the
        // document was deleted in between, which nothing in Herald does.
        loop {
            match self
                .state
                .update_one(doc! {"_id": &self.name}, doc! {"$setOnInsert": {"failure_streak": 0}})
                .upsert(true)
                .await
                .map_err(StoreError::from)
            {
                Ok(_) | Err(StoreError::AlreadyExists) => {}
                Err(e) => return Err(e),
            }
            let counted = self
                .state
                .find_one_and_update(doc! {"_id": &self.name}, doc! {"$inc": {"failure_streak": 1}})
                .return_document(ReturnDocument::After)
                .await?;
            if let Some(state) = counted {
                return Ok(state);
            }
        }
    }

    /// Gives a probe back unsent, so another sender may take it at once.
    pub async fn drop_probe(&self, worker: &str) -> Result<(), StoreError> {
        self.state
            .update_one(
                doc! {"_id": &self.name, "probe_by": worker},
                doc! {"$unset": {"probe_by": "", "probe_until": ""}},
            )
            .await?;
        Ok(())
    }

    /// Ends a failure streak.
    pub async fn end_streak(&self) -> Result<(), StoreError> {
        self.state
            .update_one(
                doc! {"_id": &self.name, "failure_streak": {"$gt": 0}},
                doc! {"$set": {"failure_streak": 0}},
            )
            .await?;
        Ok(())
    }
}
