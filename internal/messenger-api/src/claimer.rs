//! One claimer per API process: concurrent `get-two` calls are served together, so claimers in
//! one process never race for the same documents, and a claim reads a bounded window of the
//! due index instead of the whole backlog.
//!
//! **Coalescing.** Each call queues its request in a [`Coalescer`]. The first caller to find
//! nobody serving spawns a server task that takes everything queued, reads the ids of that many
//! due messages once, hands each request its own slice (claimed with its own token, worker and
//! lease, the slices concurrently), reads them back in one query, and answers each caller; then
//! it takes what queued meanwhile. Across API replicas the conditional update keeps claims
//! exact: a message another process took in between is skipped, and the shortfall is read again
//! (at most [`ROUNDS`] rounds).
//!
//! **The window.** Some servers (the SecantusDB test server among them) read a whole sorted
//! range before applying a limit, so "the oldest N due" costs as much as the backlog is long.
//! The claimer keeps `from`, the oldest due time it has seen, and reads only
//! `[from, min(now, from + width)]`: the width halves after a read that filled the request and
//! doubles after one that did not, so a window holds about one request's worth. Herald's own
//! writes never make a message due *before* `from` (they set `next_attempt_at` to now or
//! later), so nothing is skipped; for what could be (clock skew between replicas, edits by
//! hand) a full read runs every [`RESCAN`], and whenever fewer than wanted are due up to now —
//! then the whole due range is small and a full read cheap, and the next claim reads whole too
//! until one fills its request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bson::oid::ObjectId;
use bson::DateTime;
use coalesce::Coalescer;
use herald_core::mongo::after;

use crate::domain::MessageDoc;
use crate::error::StoreError;
use crate::store::MessageStore;

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

/// The process's claimer.
#[derive(Clone)]
pub struct Claimer {
    claims: Coalescer<Request, Result<Vec<MessageDoc>, StoreError>>,
}

struct Inner {
    store: MessageStore,
    /// Counts messages found expired at claim time.
    expired: prometheus::IntCounter,
    window: Mutex<Window>,
}

impl Claimer {
    /// A claimer over `store`; `expired` counts the messages it finds past their expiry.
    pub fn new(store: MessageStore, expired: prometheus::IntCounter) -> Self {
        let inner = Arc::new(Inner {
            store,
            expired,
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

    /// Claims up to `limit` due messages for `worker`, held for `lease`.
    pub async fn claim(&self, worker: &str, limit: usize, lease: Duration) -> Result<Vec<MessageDoc>, StoreError> {
        let request = Request {
            worker: worker.to_owned(),
            limit,
            lease,
        };
        // Unanswered only if the serving round panicked: nothing was handed to this caller.
        self.claims.call(request).await.unwrap_or_else(|_| Ok(Vec::new()))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inner {
    /// Claims for every request of the group; answers their messages in the group's order.
    async fn claim_group(&self, group: &[Request]) -> Result<Vec<Vec<MessageDoc>>, StoreError> {
        let now = DateTime::now();
        let tokens: Vec<String> = group.iter().map(|_| uuid::Uuid::new_v4().to_string()).collect();
        let mut got = vec![0usize; group.len()];
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
                claims.push(self.store.claim_ids(
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
                let expired = self.store.expire_due(&ids, now).await?;
                if expired > 0 {
                    self.expired.inc_by(expired);
                }
            }
            if ids.len() < want && !lost {
                break; // took every due message there was
            }
        }
        if got.iter().all(|n| *n == 0) {
            return Ok(group.iter().map(|_| Vec::new()).collect());
        }
        let mut held = self.store.held_by(&tokens).await?;
        Ok(tokens
            .iter()
            .map(|token| {
                let (mine, others): (Vec<_>, Vec<_>) = held
                    .drain(..)
                    .partition(|m| m.claim_token.as_deref() == Some(token.as_str()));
                held = others;
                mine
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
            let found = self.store.due_ids(Some(from), until, want - ids.len()).await?;
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
        let found = self.store.due_ids(None, now, want).await?;
        let mut window = lock(&self.window);
        window.last_full = Some(tokio::time::Instant::now());
        window.short = found.len() < want;
        window.from = Some(found.first().map(|(_, at)| *at).unwrap_or(now));
        Ok(found.into_iter().map(|(id, _)| id).collect())
    }
}
