//! Claiming: [`MessageStore::claim_due`] hands each caller up to `limit` due messages, held
//! under a fresh claim token, and never the same message to two callers.
//!
//! One claimer per process serves concurrent claims together (a [`Coalescer`]): it reads the
//! ids of that many due messages once, gives each caller its own slice (claimed with its own
//! token, the slices concurrently), reads them back in one query and answers each. Across
//! processes the conditional update keeps claims exact; a shortfall is read again (at most
//! [`ROUNDS`] rounds). The ids come from *windows* of the claim index, `[from, from + width]`,
//! sized to hold about one request and walked forward from where the earliest due message
//! was last found, so a claim reads about what it takes, not the backlog. What clock skew or
//! hand edits made due behind that point is found by a *look-behind*
//! ([`super::due::earliest_due`]: existence checks, never a read of the due range) every
//! [`LOOK_BEHIND`], on the first claim, and whenever a claim comes up short.
//! Why the windows and the filter shapes: `docs/architecture.md` ("Claiming").

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
/// How often a claim looks behind its window for messages that came due there.
pub const LOOK_BEHIND: Duration = Duration::from_secs(5);
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
    /// No due message lies before this, as far as the last claims saw.
    from: Option<DateTime>,
    width_ms: i64,
    last_look: Option<tokio::time::Instant>,
    /// The last claim found fewer due than wanted: look behind before the next one.
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

    /// Ids and due times of up to `limit` messages due in `[from, until]`, oldest due first:
    /// the range read follows the window, not the backlog, on servers that read a whole sorted
    /// range before limiting it.
    async fn due_ids(
        &self,
        from: DateTime,
        until: DateTime,
        limit: usize,
    ) -> Result<Vec<(ObjectId, DateTime)>, StoreError> {
        // One read per due status, each an equality on the claim index's first field and a
        // range on its second. With `status: {$in: [pending, processing]}` the SecantusDB test
        // server leaves the range unbounded (108 ms against 4 ms for 100 ids of a 20 ms window
        // at 20k due); real MongoDB bounds both. The two are merged in due order.
        let range = doc! {"$gte": from, "$lte": until};
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
            let n = self
                .counts
                .doubting(self.messages.update_many(filter, claim.clone()).await)?
                .modified_count;
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
                .counts
                .doubting(self.messages.update_many(filter, ClaimWrite::expired(now)).await)?
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

    /// The earliest due time at or before `now` (see [`super::due`]), searched from `hint`, or
    /// without one from the oldest message's creation.
    async fn earliest_due(&self, hint: Option<DateTime>, now: DateTime) -> Result<Option<DateTime>, StoreError> {
        let hint = match hint {
            Some(hint) => hint,
            None => super::upkeep::first_created(&self.counts).await?.unwrap_or(now),
        };
        super::due::earliest_due(&self.raw, &DUE_STATUSES, hint, now).await
    }

    /// The messages held under any of `tokens`, by id (sorted here: the SecantusDB test server
    /// sorts them in memory all the same, and that sort was 4 % of its CPU in a drain).
    async fn held_by(&self, tokens: &[String]) -> Result<Vec<MessageDoc>, StoreError> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let mut held: Vec<MessageDoc> = self
            .messages
            .find(doc! {"claim_token": {"$in": tokens}, "status": MessageStatus::Processing.as_str()})
            .await?
            .try_collect()
            .await?;
        held.sort_unstable_by_key(|m| m.id);
        Ok(held)
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
                last_look: None,
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

    /// Ids of up to `want` due messages, oldest due first, read through the window (see the
    /// module docs).
    async fn due_ids(&self, now: DateTime, want: usize) -> Result<Vec<ObjectId>, StoreError> {
        let (kept, width, look) = {
            let window = lock(&self.window);
            let stale = window.last_look.is_none_or(|at| at.elapsed() >= LOOK_BEHIND);
            (
                window.from,
                window.width_ms,
                stale || window.short || window.from.is_none(),
            )
        };
        let mut from = kept;
        if look {
            from = self.look_behind(kept, now).await?;
        }
        let Some(from) = from else {
            return Ok(Vec::new()); // nothing due at all
        };
        let (mut ids, mut oldest, width) = self.walk(from, now, width, want).await?;
        if ids.len() < want && !look {
            // Short: what is due may also lie behind the window.
            if let Some(behind) = self.look_behind(Some(from), now).await?.filter(|at| *at < from) {
                let until = DateTime::from_millis(from.timestamp_millis() - 1);
                let (more, earlier, _) = self.walk(behind, until, width, want - ids.len()).await?;
                ids.splice(0..0, more);
                oldest = earlier.or(oldest);
            }
        }
        let mut window = lock(&self.window);
        window.width_ms = width;
        window.short = ids.len() < want;
        if oldest.is_some() {
            window.from = oldest;
        }
        Ok(ids)
    }

    /// Where the earliest due message is (`None`: nothing is due), searched from `hint`; the
    /// window starts there.
    async fn look_behind(&self, hint: Option<DateTime>, now: DateTime) -> Result<Option<DateTime>, StoreError> {
        let earliest = self.steps.earliest_due(hint, now).await?;
        let mut window = lock(&self.window);
        window.last_look = Some(tokio::time::Instant::now());
        // With nothing due, the next search starts a little before now: what comes due later
        // lies after that (a replica whose clock is behind writes a little before it).
        window.from = Some(earliest.unwrap_or(DateTime::from_millis(now.timestamp_millis() - HINT_MARGIN_MS)));
        Ok(earliest)
    }

    /// Up to `want` ids due in `[from, until]`, window by window: each window that came back
    /// short is followed by one twice as wide just after it; empty ones by windows that double
    /// without bound (a gallop: the next due message may lie years ahead, after a hand edit),
    /// so an empty stretch costs a few reads of nothing and the first window that holds
    /// something is read at once. A window that filled the request is halved for the next
    /// claim. Answers the ids, the earliest due time among them and the width to start the
    /// next claim with (never a gallop's width).
    async fn walk(
        &self,
        mut from: DateTime,
        until: DateTime,
        mut width: i64,
        want: usize,
    ) -> Result<(Vec<ObjectId>, Option<DateTime>, i64), StoreError> {
        let mut ids = Vec::new();
        let mut oldest = None;
        let mut span = width;
        while from <= until {
            let to = DateTime::from_millis(
                from.timestamp_millis()
                    .saturating_add(span)
                    .min(until.timestamp_millis()),
            );
            let found = self.steps.due_ids(from, to, want - ids.len()).await?;
            let filled = ids.len() + found.len() >= want;
            let empty = found.is_empty();
            oldest = oldest.or(found.first().map(|(_, at)| *at));
            ids.extend(found.into_iter().map(|(id, _)| id));
            if filled {
                width = (width / 2).max(WIDTH_MS.0);
                break;
            }
            // Short: the rest lies after this window.
            from = DateTime::from_millis(to.timestamp_millis().saturating_add(1));
            if empty {
                span = span.saturating_mul(2);
            } else {
                width = width.saturating_mul(2).min(WIDTH_MS.1);
                span = width;
            }
        }
        Ok((ids, oldest, width))
    }
}

/// How far before now the window starts after a look found nothing due.
const HINT_MARGIN_MS: i64 = 1000;

/// The statuses a message can be due in: `pending`, and `processing` whose lease has passed.
const DUE_STATUSES: [MessageStatus; 2] = [MessageStatus::Pending, MessageStatus::Processing];
