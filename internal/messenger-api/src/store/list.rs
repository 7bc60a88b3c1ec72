//! Newest-first pages of messages and the sent list. The first page and cursor pages read
//! [`super::window`]s, about a page's worth of the index at any depth; offset pages past the
//! first skip, as offsets do.

use bson::{doc, Document};
use futures::TryStreamExt;
use herald_core::mongo::find_page;
use herald_core::pagination::{Fetched, PageRequest, PageStart};

use super::window::{self, Axis, Walk};
use super::{MessageStore, StoreError};
use crate::domain::{MessageDoc, MessageStatus};

impl MessageStore {
    /// Newest first, optionally of one status and/or one recipient; `total` only `with_total`
    /// (it counts every match). Offset pages past the first skip, as offsets do; the first
    /// page and cursor pages read windows ([`super::window`]), about a page's worth at any depth.
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
}
