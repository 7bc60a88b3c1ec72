//! Upkeep reads and writes: reconciling the maintained counts with a full count, removing
//! final messages past retention, and the range reads behind the stats.

use bson::{doc, DateTime};

use super::counts::{Deltas, Reconciled};
use super::due::earliest_due;
use super::{MessageStore, StoreError};
use crate::domain::{MessageDoc, MessageStatus};
use futures::TryStreamExt;

impl MessageStore {
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

    /// On a database with no messages and no counts yet, starts the counts at zero, exact,
    /// before anything is written: the first creates (a campaign imported right after the
    /// first start) then keep them exact, where otherwise the first create would make them
    /// "not yet checked" and a full recount of the campaign would follow. Answers whether it
    /// did. The emptiness comes from the collection's metadata, never a read of it; a create
    /// that lands first (another replica) only leaves the counts to the reconciliation.
    pub async fn start_counts_if_empty(&self) -> Result<bool, StoreError> {
        if self.counts.snapshot().await?.is_some() || self.raw.estimated_document_count().await? > 0 {
            return Ok(false);
        }
        let started = self.counts.correct(None, [0; 5], None).await?;
        Ok(!matches!(started, Reconciled::Busy))
    }

    /// Compares the maintained counts with a full count and corrects them when no count write
    /// happened while it counted (see [`super::counts`]); one that finishes settles the doubts
    /// noted before it began.
    pub async fn reconcile_counts(&self) -> Result<Reconciled, StoreError> {
        let doubts = self.counts.doubts();
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
                tokio::time::sleep(super::counts::SETTLE).await;
                after = self.counts.snapshot().await?;
            }
            self.counts.correct(before, actual, after).await
        };
        let outcome = run.await;
        match &outcome {
            Ok(Reconciled::InSync | Reconciled::Corrected(_)) => self.counts.settle(doubts),
            Ok(Reconciled::Busy) => {}
            Err(_) => self.counts.reconcile_failed(),
        }
        outcome
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
        let removed = self
            .counts
            .doubting(self.messages.delete_many(by_id).await)?
            .deleted_count;
        self.counts.add(Deltas::removed(status, removed)).await;
        Ok(removed)
    }

    /// Sent messages with `from <= sent_at < to`: one bounded range of the `sent` index.
    pub async fn sent_between(&self, from: DateTime, to: DateTime) -> Result<Vec<MessageDoc>, StoreError> {
        let filter = doc! {"status": MessageStatus::Sent.as_str(), "sent_at": {"$gte": from, "$lt": to}};
        Ok(self.messages.find(filter).await?.try_collect().await?)
    }

    /// How long the most overdue pending message has been due, in seconds (0 when none is).
    ///
    /// Never a read of the whole due range (which some servers read whole: seconds at a
    /// million due): [`super::due::earliest_due`] from a kept hint — the oldest due time found
    /// last, or, when none was due, [`HINT_MARGIN`] before then. The first time, the oldest
    /// message's creation is the hint.
    pub async fn oldest_due_age_seconds(&self, now: DateTime) -> Result<f64, StoreError> {
        let kept = *self.due_floor.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let hint = match kept {
            Some(hint) => hint,
            None => first_created(&self.counts).await?.unwrap_or(now),
        };
        let oldest = earliest_due(&self.raw, &[MessageStatus::Pending], hint, now).await?;
        let margin = DateTime::from_millis(now.timestamp_millis() - HINT_MARGIN.as_millis() as i64);
        *self.due_floor.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(oldest.unwrap_or(margin));
        Ok(oldest.map_or(0.0, |o| {
            (now.timestamp_millis() - o.timestamp_millis()).max(0) as f64 / 1000.0
        }))
    }
}

/// The second the oldest message there is was created in (no message is due before it unless
/// edited by hand), from the counts' bounds; `None` before any message.
pub(super) async fn first_created(counts: &super::counts::StatusCounts) -> Result<Option<DateTime>, StoreError> {
    Ok(counts
        .snapshot()
        .await?
        .and_then(|s| s.first_id)
        .map(|first| DateTime::from_millis(first.timestamp().timestamp_millis())))
}

/// How far behind the last search the oldest-due hint starts when nothing was due then (a
/// message written since by a replica whose clock is a little behind still lies after it).
const HINT_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);
