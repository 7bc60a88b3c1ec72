//! Claiming: [`MessageStore::claim_due`] hands each caller up to `limit` due messages, held
//! under a fresh claim token, and never the same message to two callers.
//!
//! One claimer per process serves concurrent claims together (a [`Coalescer`]): it reads the
//! ids of that many due messages once, gives each caller its own slice (claimed with its own
//! token, the slices concurrently), reads them back in one query and answers each. Across
//! processes the conditional update keeps claims exact; a shortfall is read again (at most
//! [`ROUNDS`] rounds). The ids come from a *window* of the claim index, `[from, from + width]`,
//! sized to hold about one request, so a claim reads about what it takes, not the backlog; a
//! full read every [`RESCAN`] finds what clock skew or hand edits made due behind the window.
//! Why the window and the filter shapes: `docs/architecture.md` ("Claiming").

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use coalesce::Coalescer;
use futures::TryStreamExt;
use herald_core::mongo::after;
use mongodb::Collection;

use super::counts::{Deltas, StatusCounts};
use super::writes::ClaimWrite;
use super::{due_among, MessageStore, StoreError};
use crate::domain::{MessageDoc, MessageStatus, Transition};

/// Most messages one serving round claims for all its callers together.
pub const MAX_ROUND: usize = 2000;
/// Most read-and-claim rounds per serving, to fill what other processes took in between.
pub const ROUNDS: usize = 4;
/// How often a claim reads the whole due range instead of the window.
pub const RESCAN: Duration = Duration::from_secs(5);
/// Narrowest and widest window, in milliseconds of `next_attempt_at`.
const WIDTH_MS: (i64, i64) = (5, 3_600_000);

/// One caller's claim.
struct Request {
    worker: String,
    limit: usize,
    lease: Duration,
}

/// Where the next windowed read starts and how wide it is.
struct Window {
    from: Option<DateTime>,
    width_ms: i64,
    last_full: Option<tokio::time::Instant>,
    /// The last read found fewer than wanted: the due range is small, read it whole.
    short: bool,
}

/// What one caller's claim took.
#[derive(Debug, Default)]
pub struct Claim {
    /// The messages now held by the caller, by id.
    pub messages: Vec<MessageDoc>,
    /// Due messages found past their `expiresAt` and ended `expired` on the way.
    pub expired: u64,
    /// Their ids.
    pub expired_ids: Vec<ObjectId>,
}

/// The process's claimer.
#[derive(Clone)]
pub(super) struct Claimer {
    claims: Coalescer<Request, Result<Claim, StoreError>>,
}

/// The database steps of a claim, over the collection the store owns.
pub(super) struct ClaimSteps {
    messages: Collection<MessageDoc>,
    raw: Collection<Document>,
    counts: StatusCounts,
}

impl ClaimSteps {
    pub(super) fn new(messages: Collection<MessageDoc>, raw: Collection<Document>, counts: StatusCounts) -> Self {
        Self { messages, raw, counts }
    }

    /// Ids and due times of up to `limit` due messages, oldest due first. With `from`, only
    /// those due at or after it (and not after `now`): the range read then follows the window,
    /// not the backlog, on servers that read a whole sorted range before limiting it.
    async fn due_ids(
        &self,
        from: Option<DateTime>,
        until: DateTime,
        limit: usize,
    ) -> Result<Vec<(ObjectId, DateTime)>, StoreError> {
        // One read per due status, each an equality on the claim index's first field and a
        // range on its second. With `status: {$in: [pending, processing]}` the SecantusDB test
        // server leaves the range unbounded (108 ms against 4 ms for 100 ids of a 20 ms window
        // at 20k due); real MongoDB bounds both. The two are merged in due order.
        let range = match from {
            Some(from) => doc! {"$gte": from, "$lte": until},
            None => doc! {"$lte": until},
        };
        let read = |status: MessageStatus| {
            let filter = doc! {"status": status.as_str(), "next_attempt_at": range.clone()};
            async move {
                self.raw
                    .find(filter)
                    .sort(doc! {"next_attempt_at": 1, "_id": 1})
                    .limit(limit as i64)
                    .projection(doc! {"_id": 1, "next_attempt_at": 1})
                    .await?
                    .try_collect::<Vec<Document>>()
                    .await
            }
        };
        let (pending, lapsed) = futures::try_join!(read(MessageStatus::Pending), read(MessageStatus::Processing))?;
        let mut found: Vec<(ObjectId, DateTime)> = pending
            .iter()
            .chain(&lapsed)
            .filter_map(|d| Some((d.get_object_id("_id").ok()?, *d.get_datetime("next_attempt_at").ok()?)))
            .collect();
        found.sort_by_key(|(id, at)| (*at, *id));
        found.truncate(limit);
        Ok(found)
    }

    /// Claims those of `ids` that are still due at `now` for `worker` under `token` until
    /// `lease_until`. Each document's update is atomic, so a message another caller took in
    /// between is skipped, never shared. Returns how many it claimed.
    async fn claim_ids(
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
        let claim = doc! {
            "$set": {
                "status": MessageStatus::Processing.as_str(),
                "claim_token": token,
                "claimed_by": worker,
                "lease_until": lease_until,
                "next_attempt_at": lease_until,
                "updated_at": now,
                "last_transition": Transition::Claimed.as_str(),
            },
            "$unset": {"waiting_for_provider": ""},
            "$inc": {"attempts": 1},
        };
        // Pending ones first, then (only when some are left) those whose lease ran out: the
        // counts need to know which status each claimed message left.
        let mut claimed = 0;
        for from in [MessageStatus::Pending, MessageStatus::Processing] {
            let mut filter = due_among(ids, from, now);
            // Never hand out a message past its expiry ([`ClaimSteps::expire_due`] ends those).
            // `$not` rather than an `$or` of "absent" and "later": with a top-level `$or` the
            // SecantusDB test server stops using an index for the whole filter (340 ms instead
            // of 8 ms beside a million messages).
            filter.insert("expires_at", doc! {"$not": {"$lte": now}});
            let n = self.messages.update_many(filter, claim.clone()).await?.modified_count;
            self.counts.add(Deltas::moved(from, MessageStatus::Processing, n)).await;
            claimed += n;
            if claimed as usize >= ids.len() {
                break;
            }
        }
        Ok(claimed)
    }

    /// Ends those of `ids` that are due at `now` but past their `expires_at`: `expired`, final,
    /// never sent (again). Returns which (read back only when some were).
    async fn expire_due(&self, ids: &[ObjectId], now: DateTime) -> Result<Vec<ObjectId>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut expired = 0;
        for from in [MessageStatus::Pending, MessageStatus::Processing] {
            let mut filter = due_among(ids, from, now);
            filter.insert("expires_at", doc! {"$lte": now});
            let n = self
                .messages
                .update_many(filter, ClaimWrite::expired(now))
                .await?
                .modified_count;
            self.counts.add(Deltas::moved(from, MessageStatus::Expired, n)).await;
            expired += n;
        }
        if expired == 0 {
            return Ok(Vec::new());
        }
        let filter = doc! {"_id": {"$in": ids}, "status": MessageStatus::Expired.as_str(), "updated_at": now};
        let ended: Vec<Document> = self
            .raw
            .find(filter)
            .projection(doc! {"_id": 1})
            .await?
            .try_collect()
            .await?;
        Ok(ended.iter().filter_map(|d| d.get_object_id("_id").ok()).collect())
    }

    /// The messages held under any of `tokens`, by id.
    async fn held_by(&self, tokens: &[String]) -> Result<Vec<MessageDoc>, StoreError> {
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
}

struct Inner {
    steps: ClaimSteps,
    window: Mutex<Window>,
}

impl Claimer {
    /// A claimer serving claims with `steps`.
    pub(super) fn new(steps: ClaimSteps) -> Self {
        let inner = Arc::new(Inner {
            steps,
            window: Mutex::new(Window {
                from: None,
                width_ms: 1000,
                last_full: None,
                short: true,
            }),
        });
        let claims = Coalescer::limited(
            MAX_ROUND,
            |r: &Request| r.limit,
            move |group: Vec<Request>| {
                let inner = inner.clone();
                async move {
                    match inner.claim_group(&group).await {
                        Ok(held) => held.into_iter().map(Ok).collect(),
                        Err(error) => group.iter().map(|_| Err(error.clone())).collect(),
                    }
                }
            },
        );
        Self { claims }
    }
}

impl MessageStore {
    /// Claims up to `limit` due messages (oldest due first) for `worker`, held for `lease`.
    pub async fn claim_due(&self, worker: &str, limit: usize, lease: Duration) -> Result<Claim, StoreError> {
        let request = Request {
            worker: worker.to_owned(),
            limit,
            lease,
        };
        // Unanswered only if the serving round panicked: nothing was handed to this caller.
        self.claimer
            .claims
            .call(request)
            .await
            .unwrap_or_else(|_| Ok(Claim::default()))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inner {
    /// Claims for every request of the group; answers their messages in the group's order.
    async fn claim_group(&self, group: &[Request]) -> Result<Vec<Claim>, StoreError> {
        let now = DateTime::now();
        let tokens: Vec<String> = group.iter().map(|_| uuid::Uuid::new_v4().to_string()).collect();
        let mut got = vec![0usize; group.len()];
        let mut expired: Vec<ObjectId> = Vec::new();
        for _ in 0..ROUNDS {
            let wanted: Vec<usize> = group.iter().zip(&got).map(|(r, g)| r.limit - g).collect();
            let want: usize = wanted.iter().sum();
            if want == 0 {
                break;
            }
            let ids = self.due_ids(now, want).await?;
            if ids.is_empty() {
                break;
            }
            let mut rest = ids.as_slice();
            let mut claims = Vec::new();
            for (index, request) in group.iter().enumerate() {
                let slice = &rest[..wanted[index].min(rest.len())];
                rest = &rest[slice.len()..];
                claims.push(self.steps.claim_ids(
                    slice,
                    &request.worker,
                    &tokens[index],
                    after(now, request.lease),
                    now,
                ));
            }
            let claimed = futures::future::try_join_all(claims).await?;
            let mut lost = false;
            let mut taken = 0;
            for (index, n) in claimed.into_iter().enumerate() {
                got[index] += n as usize;
                taken += n as usize;
                lost |= (n as usize) < wanted[index].min(ids.len());
            }
            if taken < ids.len() {
                // Some were not claimable: taken by another process, or past their expiry.
                expired.extend(self.steps.expire_due(&ids, now).await?);
            }
            if ids.len() < want && !lost {
                break; // took every due message there was
            }
        }
        let mut held = match got.iter().all(|n| *n == 0) {
            true => Vec::new(),
            false => self.steps.held_by(&tokens).await?,
        };
        // The expiries found on the way are told once, to the group's first caller.
        Ok(tokens
            .iter()
            .enumerate()
            .map(|(index, token)| {
                let (mine, others): (Vec<_>, Vec<_>) = held
                    .drain(..)
                    .partition(|m| m.claim_token.as_deref() == Some(token.as_str()));
                held = others;
                Claim {
                    messages: mine,
                    expired: if index == 0 { expired.len() as u64 } else { 0 },
                    expired_ids: if index == 0 {
                        std::mem::take(&mut expired)
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect())
    }

    /// Ids of up to `want` due messages, read through the window (see the module docs).
    async fn due_ids(&self, now: DateTime, want: usize) -> Result<Vec<ObjectId>, StoreError> {
        let (from, width_ms, full) = {
            let window = lock(&self.window);
            let stale = window.last_full.is_none_or(|at| at.elapsed() >= RESCAN);
            (
                window.from,
                window.width_ms,
                stale || window.short || window.from.is_none(),
            )
        };
        if full {
            return self.full_read(now, want).await;
        }
        let mut from = from.unwrap_or(now);
        let mut width = width_ms;
        let mut ids = Vec::new();
        let mut oldest = None;
        loop {
            let until = DateTime::from_millis((from.timestamp_millis() + width).min(now.timestamp_millis()));
            let found = self.steps.due_ids(Some(from), until, want - ids.len()).await?;
            let filled = ids.len() + found.len() >= want;
            oldest = oldest.or(found.first().map(|(_, at)| *at));
            ids.extend(found.into_iter().map(|(id, _)| id));
            if filled {
                width = (width / 2).max(WIDTH_MS.0);
                break;
            }
            if until >= now {
                break;
            }
            // Short and not yet at the present: the rest of the due range lies after it.
            from = until;
            width = (width * 2).min(WIDTH_MS.1);
        }
        {
            let mut window = lock(&self.window);
            window.width_ms = width;
            if oldest.is_some() {
                window.from = oldest;
            }
        }
        if ids.len() < want {
            // Fewer due than wanted up to now: the whole due range is small, so read all of it,
            // which also finds anything due behind the window.
            return self.full_read(now, want).await;
        }
        Ok(ids)
    }

    async fn full_read(&self, now: DateTime, want: usize) -> Result<Vec<ObjectId>, StoreError> {
        let found = self.steps.due_ids(None, now, want).await?;
        let mut window = lock(&self.window);
        window.last_full = Some(tokio::time::Instant::now());
        window.short = found.len() < want;
        window.from = Some(found.first().map(|(_, at)| *at).unwrap_or(now));
        Ok(found.into_iter().map(|(id, _)| id).collect())
    }
}
