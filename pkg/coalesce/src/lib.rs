//! Group commit: concurrent callers of one operation are served together.
//!
//! A [`Coalescer`] queues each call. The first caller to find nobody serving spawns a server
//! task; it takes everything queued (up to a weight limit), serves the whole group with one
//! call of the serve function, answers each caller its own result, and then takes what queued
//! meanwhile. A lone caller is served at once — nothing waits for company — and under load a
//! group grows by itself to what arrived during the previous round, so N callers cost about one
//! round trip instead of N.
//!
//! The serve function answers one result per item, in the group's order. If it answers fewer,
//! or panics, the callers left without an answer get [`Unanswered`]; the coalescer stays
//! usable either way.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::oneshot;

/// The serving task ended without answering this call (the serve function panicked or
/// answered fewer results than it was given items).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unanswered;

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the group this call was served in ended without an answer for it")
    }
}

impl std::error::Error for Unanswered {}

type Serve<T, R> = dyn Fn(Vec<T>) -> BoxFuture<'static, Vec<R>> + Send + Sync;

/// Serves concurrent calls of one operation together; cheap to clone (clones share the queue).
pub struct Coalescer<T, R> {
    shared: Arc<Shared<T, R>>,
}

impl<T, R> Clone for Coalescer<T, R> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<T, R> {
    queue: Mutex<Queue<T, R>>,
    /// Most total weight one group takes (a heavier single item is still served, alone).
    limit: usize,
    weight: fn(&T) -> usize,
    serve: Box<Serve<T, R>>,
}

struct Queue<T, R> {
    waiting: VecDeque<(T, oneshot::Sender<R>)>,
    serving: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T: Send + 'static, R: Send + 'static> Coalescer<T, R> {
    /// Serves groups with `serve`, which answers one result per item, in order; a group takes
    /// everything queued.
    pub fn new<F, Fut>(serve: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        Self::limited(usize::MAX, |_| 1, serve)
    }

    /// Like [`Coalescer::new`], but a group takes at most `limit` in total `weight` (an item
    /// heavier than that is served alone).
    pub fn limited<F, Fut>(limit: usize, weight: fn(&T) -> usize, serve: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        Self {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    waiting: VecDeque::new(),
                    serving: false,
                }),
                limit,
                weight,
                serve: Box::new(move |group| serve(group).boxed()),
            }),
        }
    }

    /// Queues `item` and waits for its result.
    pub async fn call(&self, item: T) -> Result<R, Unanswered> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = lock(&self.shared.queue);
            queue.waiting.push_back((item, reply));
            !std::mem::replace(&mut queue.serving, true)
        };
        if start {
            // A task of its own, so a caller that goes away never strands the others.
            let shared = self.shared.clone();
            tokio::spawn(async move { shared.serve().await });
        }
        answer.await.map_err(|_| Unanswered)
    }
}

impl<T, R> Shared<T, R> {
    async fn serve(&self) {
        // Should `serve` panic, the guard hands serving back and drops what waits (those
        // callers get `Unanswered`), so the next call starts afresh instead of hanging.
        let guard = Serving(self);
        loop {
            let group = {
                let mut queue = lock(&self.queue);
                if queue.waiting.is_empty() {
                    queue.serving = false;
                    std::mem::forget(guard);
                    return;
                }
                let mut total = 0usize;
                let take = queue
                    .waiting
                    .iter()
                    .enumerate()
                    .take_while(|(index, (item, _))| {
                        total = total.saturating_add((self.weight)(item));
                        *index == 0 || total <= self.limit
                    })
                    .count();
                queue.waiting.drain(..take).collect::<Vec<_>>()
            };
            let (items, replies): (Vec<T>, Vec<_>) = group.into_iter().unzip();
            let results = (self.serve)(items).await;
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
    }
}

struct Serving<'a, T, R>(&'a Shared<T, R>);

impl<T, R> Drop for Serving<'_, T, R> {
    fn drop(&mut self) {
        let mut queue = lock(&self.0.queue);
        queue.serving = false;
        queue.waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_lone_call_is_served_at_once_with_its_own_result() {
        let coalescer = Coalescer::new(|items: Vec<u32>| async move { items.iter().map(|i| i * 2).collect() });
        assert_eq!(coalescer.call(21).await, Ok(42));
        assert_eq!(coalescer.call(4).await, Ok(8));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_rounds_and_each_gets_its_own_answer() {
        let rounds = Arc::new(AtomicUsize::new(0));
        let counted = rounds.clone();
        let coalescer = Coalescer::new(move |items: Vec<u32>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                items.iter().map(|i| i + 1000).collect::<Vec<_>>()
            }
        });
        let calls: Vec<_> = (0..200u32)
            .map(|i| {
                let coalescer = coalescer.clone();
                tokio::spawn(async move { (i, coalescer.call(i).await) })
            })
            .collect();
        for call in calls {
            let (i, answer) = call.await.unwrap();
            assert_eq!(answer, Ok(i + 1000));
        }
        let rounds = rounds.load(Ordering::SeqCst);
        assert!(rounds < 20, "200 concurrent calls took {rounds} rounds");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_never_exceeds_its_weight_limit_but_a_heavy_item_is_served_alone() {
        let largest = Arc::new(AtomicUsize::new(0));
        let seen = largest.clone();
        let coalescer = Coalescer::limited(
            100,
            |w| *w,
            move |items: Vec<usize>| {
                let total: usize = items.iter().sum();
                seen.fetch_max(total, Ordering::SeqCst);
                let multi = items.len() > 1;
                async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    assert!(!multi || total <= 100, "a group of {total} over the limit");
                    items
                }
            },
        );
        let calls: Vec<_> = (0..50usize)
            .map(|i| {
                let coalescer = coalescer.clone();
                let weight = if i == 25 { 500 } else { 30 };
                tokio::spawn(async move { coalescer.call(weight).await })
            })
            .collect();
        for call in calls {
            assert!(call.await.unwrap().is_ok());
        }
        assert_eq!(largest.load(Ordering::SeqCst), 500, "the heavy item was served");
    }

    #[tokio::test]
    async fn a_short_answer_or_a_panic_leaves_callers_unanswered_and_the_coalescer_usable() {
        let coalescer = Coalescer::new(|items: Vec<i32>| async move {
            assert!(!items.contains(&-1), "asked to panic");
            items.into_iter().filter(|i| *i != 0).collect::<Vec<_>>()
        });
        assert_eq!(coalescer.call(0).await, Err(Unanswered));
        assert_eq!(coalescer.call(-1).await, Err(Unanswered));
        assert_eq!(coalescer.call(7).await, Ok(7), "served again after the panic");
    }
}
