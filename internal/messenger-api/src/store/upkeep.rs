//! Upkeep reads and writes: reconciling the maintained counts with a full count, removing
//! final messages past retention, and the range reads behind the stats.

use bson::{doc, DateTime};

use super::counts::{Deltas, Reconciled};
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

    /// Compares the maintained counts with a full count and corrects them when no count write
    /// happened while it counted (see [`super::counts`]).
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
                tokio::time::sleep(super::counts::SETTLE).await;
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
    ///
    /// Never a sorted read of the whole due range (which some servers read whole before their
    /// limit: seconds at a million due). It starts at a kept floor — no pending message is due
    /// before it — and gallops forward through the claim index with existence checks (an
    /// unsorted `limit 1` stops at its first key) in windows that double while empty; a window
    /// that holds one is halved down to [`FINE_WINDOW`], and only that is read sorted. The floor
    /// then moves to what it found (or, with none due, to [`FLOOR_MARGIN`] before now: a write
    /// always dates a message's due time from its own clock, so none lands behind that). Every
    /// [`FLOOR_RESET`] it starts again from the oldest message's creation, which also finds a
    /// due time edited back by hand (to any time after that).
    pub async fn oldest_due_age_seconds(&self, now: DateTime) -> Result<f64, StoreError> {
        let kept = *self.due_floor.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let floor = match kept {
            Some((floor, at)) if at.elapsed() < FLOOR_RESET => floor,
            _ => match self.counts.snapshot().await?.and_then(|s| s.first_id) {
                Some(first) => DateTime::from_millis(first.timestamp().timestamp_millis() - 1000),
                None => return self.oldest_due_by_sort(now).await,
            },
        };
        let oldest = self.oldest_due_from(floor, now).await?;
        let margin = DateTime::from_millis(now.timestamp_millis() - FLOOR_MARGIN.as_millis() as i64);
        let next = oldest.map_or(margin, |o| o.min(margin)).max(floor);
        let reset_at = match kept {
            Some((_, at)) if at.elapsed() < FLOOR_RESET => at,
            _ => tokio::time::Instant::now(),
        };
        *self.due_floor.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((next, reset_at));
        Ok(oldest.map_or(0.0, |o| {
            (now.timestamp_millis() - o.timestamp_millis()).max(0) as f64 / 1000.0
        }))
    }

    /// The earliest `next_attempt_at` of a pending message in `[floor, now]`, by windows.
    async fn oldest_due_from(&self, floor: DateTime, now: DateTime) -> Result<Option<DateTime>, StoreError> {
        let pending = MessageStatus::Pending.as_str();
        let any_in = |from: i64, to: i64| async move {
            Ok::<_, StoreError>(
                self.raw
                    .find_one(doc! {"status": pending, "next_attempt_at": {
                    "$gte": DateTime::from_millis(from), "$lte": DateTime::from_millis(to)}})
                    .projection(doc! {"_id": 1})
                    .await?
                    .is_some(),
            )
        };
        let end = now.timestamp_millis();
        let (mut from, mut width) = (floor.timestamp_millis(), FINE_WINDOW.as_millis() as i64);
        // Gallop: the first window that holds a due pending message.
        let mut to = loop {
            if from > end {
                return Ok(None);
            }
            let to = (from + width - 1).min(end);
            if any_in(from, to).await? {
                break to;
            }
            from = to + 1;
            width = width.saturating_mul(2);
        };
        // Halve it down to a fine window whose first half is empty or that is fine already.
        while to - from + 1 > FINE_WINDOW.as_millis() as i64 {
            let mid = from + (to - from) / 2;
            if any_in(from, mid).await? {
                to = mid;
            } else {
                from = mid + 1;
            }
        }
        let first = self
            .raw
            .find_one(doc! {"status": pending, "next_attempt_at": {
            "$gte": DateTime::from_millis(from), "$lte": DateTime::from_millis(to)}})
            .sort(doc! {"next_attempt_at": 1})
            .projection(doc! {"next_attempt_at": 1})
            .await?;
        Ok(first.and_then(|d| d.get_datetime("next_attempt_at").ok().copied()))
    }

    /// The same by one sorted read: only while the store has no counts document (and so no
    /// oldest message) yet — an empty or brand-new collection.
    async fn oldest_due_by_sort(&self, now: DateTime) -> Result<f64, StoreError> {
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

/// The narrowest window the oldest-due search reads sorted.
const FINE_WINDOW: std::time::Duration = std::time::Duration::from_millis(16);
/// How far behind now the oldest-due floor stays when nothing is due.
const FLOOR_MARGIN: std::time::Duration = std::time::Duration::from_secs(60);
/// How often the oldest-due search starts again from the oldest message.
const FLOOR_RESET: std::time::Duration = std::time::Duration::from_secs(300);
