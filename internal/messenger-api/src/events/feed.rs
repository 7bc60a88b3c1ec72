//! The event feed: the database's change stream, fanned out to subscribers.
//!
//! - One **live** change stream per process, opened when the first subscriber comes and closed
//!   when the last one leaves, fans every event out to every live subscriber.
//! - A subscriber that **resumes** (`Last-Event-ID`) gets a change stream of its own that starts
//!   after its token, so it sees every event it missed, in order, none twice. When the server no
//!   longer holds the token it gets a `reset` event and joins the live stream.
//! - Each subscriber has a bounded channel. One that falls `subscriber_buffer` events behind is
//!   cut off: its queued events are still delivered, then a final `dropped` event, then the end
//!   of the stream. Nothing is buffered without bound, and nothing is lost: the subscriber may
//!   resume from the last id it saw.
//! - When the live stream breaks (the database restarts) it reopens after the last event it
//!   read; if that position is gone (the server answers that it cannot resume), every live
//!   subscriber gets `reset` and the stream goes on from now.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bson::{doc, Document};
use futures::{Stream, StreamExt};
use mongodb::change_stream::event::{ChangeStreamEvent, ResumeToken};
use mongodb::change_stream::ChangeStream;
use mongodb::options::FullDocumentType;
use mongodb::Database;
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::model::{self, EventFilter, EventType, FeedEvent};
use herald_core::jobs::JOB_STATE_COLLECTION as JOB_STATE;
use herald_core::jobs::PROVIDER_STATE_COLLECTION as PROVIDER_STATE;

/// Longest pause between attempts to reopen a broken change stream.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the live stream looks for subscribers that went away.
const SWEEP: Duration = Duration::from_secs(1);
/// How long a new subscriber waits for the live stream to open before it is answered anyway.
const OPEN_WAIT: Duration = Duration::from_secs(5);

/// The feed's metrics.
#[derive(Clone)]
pub struct FeedMetrics {
    /// Subscribers connected now.
    pub subscribers: IntGauge,
    /// Subscribers cut off, by reason (`slow`, `ping_timeout`, `write_timeout`).
    pub dropped: IntCounterVec,
    /// Events read from the database's change stream.
    pub published: IntCounter,
}

/// The feed; cheap to clone.
#[derive(Clone)]
pub struct EventFeed {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    buffer: usize,
    metrics: FeedMetrics,
    live: Mutex<Live>,
    open: watch::Sender<bool>,
    closing: CancellationToken,
}

#[derive(Default)]
struct Live {
    subscribers: Vec<Subscriber>,
    running: bool,
}

struct Subscriber {
    tx: mpsc::Sender<FeedEvent>,
    dropped: Arc<AtomicBool>,
    filter: SharedFilter,
}

/// A subscriber's filter, which its connection may change while it runs (WebSocket `subscribe`).
/// Applied before queueing, so a narrow subscriber costs a comparison per event, not a slot.
pub type SharedFilter = Arc<RwLock<EventFilter>>;

impl Subscriber {
    /// Hands over an event it wants; false when the subscriber is gone or has just been cut off.
    fn offer(&self, event: FeedEvent, metrics: &FeedMetrics) -> bool {
        let wanted = self.filter.read().map(|f| f.accepts(&event)).unwrap_or(true);
        if !wanted {
            return !self.tx.is_closed();
        }
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.store(true, Ordering::Relaxed);
                metrics.dropped.with_label_values(&["slow"]).inc();
                tracing::warn!("event subscriber fell behind and was cut off");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

impl EventFeed {
    /// A feed over `db`'s `messages` and `job_state`, queueing at most `buffer` events per
    /// subscriber. Nothing is opened until someone subscribes.
    pub fn new(db: Database, buffer: usize, metrics: FeedMetrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                buffer: buffer.max(1),
                metrics,
                live: Mutex::new(Live::default()),
                open: watch::channel(false).0,
                closing: CancellationToken::new(),
            }),
        }
    }

    /// The feed's metrics.
    pub fn metrics(&self) -> &FeedMetrics {
        &self.inner.metrics
    }

    /// Ends every subscription (server shutdown), so open streams do not hold the server up.
    pub fn close(&self) {
        self.inner.closing.cancel();
    }

    /// A token cancelled when the feed closes (for sockets that watch it themselves).
    pub fn closing(&self) -> CancellationToken {
        self.inner.closing.clone()
    }

    /// Subscribes from now, or after `resume` (an event id) when given, to the events `filter`
    /// lets through. Answers once the subscription is in place, so an event that happens
    /// afterwards is not missed.
    pub async fn subscribe(&self, resume: Option<&str>, filter: SharedFilter) -> Subscription {
        let (tx, rx) = mpsc::channel(self.inner.buffer);
        let dropped = Arc::new(AtomicBool::new(false));
        let subscriber = Subscriber {
            tx,
            dropped: dropped.clone(),
            filter,
        };
        match resume.map(|text| (text, model::decode_token(text))) {
            Some((_, Some(token))) => {
                tokio::spawn(follow_one(self.inner.clone(), token, subscriber));
            }
            Some((text, None)) => {
                tracing::info!(last_event_id = %text, "unknown Last-Event-ID; answering reset");
                subscriber.offer(FeedEvent::control(EventType::Reset), &self.inner.metrics);
                join_live(&self.inner, subscriber).await;
            }
            None => join_live(&self.inner, subscriber).await,
        }
        self.inner.metrics.subscribers.inc();
        Subscription {
            rx,
            dropped,
            ended: false,
            closing: Box::pin(self.inner.closing.clone().cancelled_owned()),
            metrics: self.inner.metrics.clone(),
        }
    }
}

/// One subscriber's events, ending with `dropped` when it was cut off for being slow.
pub struct Subscription {
    rx: mpsc::Receiver<FeedEvent>,
    dropped: Arc<AtomicBool>,
    ended: bool,
    closing: Pin<Box<WaitForCancellationFutureOwned>>,
    metrics: FeedMetrics,
}

impl Stream for Subscription {
    type Item = FeedEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FeedEvent>> {
        if self.ended || self.closing.as_mut().poll(cx).is_ready() {
            self.ended = true;
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => Poll::Ready(Some(event)),
            Poll::Ready(None) => {
                self.ended = true;
                if self.dropped.load(Ordering::Relaxed) {
                    Poll::Ready(Some(FeedEvent::control(EventType::Dropped)))
                } else {
                    Poll::Ready(None)
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.metrics.subscribers.dec();
    }
}

type Changes = ChangeStream<ChangeStreamEvent<Document>>;

/// Doubling pauses between attempts to reopen a change stream, from 100 ms to [`MAX_BACKOFF`].
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);

    fn new() -> Self {
        Self(Self::FIRST)
    }

    fn reset(&mut self) {
        self.0 = Self::FIRST;
    }

    /// Waits the next pause; false when `interrupt` came first.
    async fn wait(&mut self, interrupt: impl Future<Output = ()>) -> bool {
        let pause = self.0;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        tokio::select! {
            () = tokio::time::sleep(pause) => true,
            () = interrupt => false,
        }
    }
}

async fn open(db: &Database, after: Option<ResumeToken>) -> mongodb::error::Result<Changes> {
    db.watch()
        .pipeline([doc! {"$match": {"ns.coll": {"$in": [crate::store::COLLECTION, JOB_STATE, PROVIDER_STATE, herald_core::audit::AUDIT_COLLECTION, crate::store::callbacks::COLLECTION]}}}])
        .full_document(FullDocumentType::UpdateLookup)
        .resume_after(after)
        .await
}

/// True when the server answered but will not go on from a position (it no longer holds it, or
/// never did) — at `aggregate` (MongoDB 286, SecantusDB 40647) or at the first `getMore`
/// (280, as SecantusDB answers after a crash lost the tail of its history) — rather than
/// could not be reached. The driver has already retried what it can resume by itself.
fn token_refused(error: &mongodb::error::Error) -> bool {
    !herald_core::mongo::is_unavailable(error)
}

async fn join_live(inner: &Arc<Inner>, subscriber: Subscriber) {
    let start = {
        let mut live = inner.live.lock().unwrap_or_else(|p| p.into_inner());
        live.subscribers.push(subscriber);
        !std::mem::replace(&mut live.running, true)
    };
    if start {
        inner.open.send_replace(false);
        tokio::spawn(follow_live(inner.clone()));
    }
    let mut open = inner.open.subscribe();
    let _ = tokio::time::timeout(OPEN_WAIT, open.wait_for(|open| *open)).await;
}

/// Fans out to every live subscriber; false when none is left (the live stream then ends).
fn fan_out(inner: &Inner, event: Option<FeedEvent>) -> bool {
    let mut live = inner.live.lock().unwrap_or_else(|p| p.into_inner());
    match event {
        Some(event) => live.subscribers.retain(|s| s.offer(event.clone(), &inner.metrics)),
        None => live.subscribers.retain(|s| !s.tx.is_closed()),
    }
    if live.subscribers.is_empty() {
        live.running = false;
        return false;
    }
    true
}

/// The live stream: runs while anyone listens, reopening after the last event it read. It ends
/// when [`fan_out`] finds no subscriber left (which hands the `running` flag back, so the next
/// subscriber starts a new one) or when the feed closes; on either it touches no shared state
/// again, since a successor may already own it.
async fn follow_live(inner: Arc<Inner>) {
    let mut position: Option<ResumeToken> = None;
    let mut backoff = Backoff::new();
    let mut sweep = tokio::time::interval(SWEEP);
    loop {
        let mut changes = match open(&inner.db, position.clone()).await {
            Ok(changes) => changes,
            Err(error) if position.is_some() && token_refused(&error) => {
                tracing::warn!(%error, "the change stream lost its position; live subscribers get reset");
                position = None;
                if !fan_out(&inner, Some(FeedEvent::control(EventType::Reset))) {
                    return;
                }
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "could not open the change stream; retrying");
                if !backoff.wait(inner.closing.cancelled()).await || !fan_out(&inner, None) {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        inner.open.send_replace(true);
        loop {
            tokio::select! {
                next = changes.next() => match next {
                    Some(Ok(change)) => {
                        position = Some(change.id.clone());
                        if let Some(event) = model::from_change(&change) {
                            inner.metrics.published.inc();
                            if !fan_out(&inner, Some(event)) {
                                return;
                            }
                        }
                    }
                    Some(Err(error)) if position.is_some() && token_refused(&error) => {
                        // The server answered but cannot go on from here (its history lost
                        // the position, e.g. after a crash): subscribers may have missed events.
                        tracing::warn!(%error, "the change stream cannot resume; live subscribers get reset");
                        position = None;
                        if !fan_out(&inner, Some(FeedEvent::control(EventType::Reset))) {
                            return;
                        }
                        break;
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "the change stream broke; reopening after the last event");
                        // The last event's own token: a server's post-batch token may not survive
                        // its restart (SecantusDB), an event's does. Before any event, the
                        // driver's token still marks where this stream started.
                        position = position.or_else(|| changes.resume_token());
                        break;
                    }
                    None => break,
                },
                _ = sweep.tick() => {
                    if !fan_out(&inner, None) {
                        return;
                    }
                }
                () = inner.closing.cancelled() => return,
            }
        }
        inner.open.send_replace(false);
    }
}

/// A resuming subscriber's own stream, from its token on.
async fn follow_one(inner: Arc<Inner>, mut position: ResumeToken, subscriber: Subscriber) {
    let mut backoff = Backoff::new();
    loop {
        let mut changes = match open(&inner.db, Some(position.clone())).await {
            Ok(changes) => changes,
            Err(error) if token_refused(&error) => {
                tracing::info!(%error, "the feed no longer holds this Last-Event-ID; answering reset");
                if subscriber.offer(FeedEvent::control(EventType::Reset), &inner.metrics) {
                    join_live(&inner, subscriber).await;
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "could not open a resumed change stream; retrying");
                let interrupt = async {
                    tokio::select! {
                        () = subscriber.tx.closed() => {}
                        () = inner.closing.cancelled() => {}
                    }
                };
                if !backoff.wait(interrupt).await {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        loop {
            tokio::select! {
                next = changes.next() => match next {
                    Some(Ok(change)) => {
                        position = change.id.clone();
                        if let Some(event) = model::from_change(&change) {
                            inner.metrics.published.inc();
                            if !subscriber.offer(event, &inner.metrics) {
                                return;
                            }
                        }
                    }
                    Some(Err(error)) if token_refused(&error) => {
                        tracing::info!(%error, "a resumed change stream cannot go on; answering reset");
                        if subscriber.offer(FeedEvent::control(EventType::Reset), &inner.metrics) {
                            join_live(&inner, subscriber).await;
                        }
                        return;
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "a resumed change stream broke; reopening after its last event");
                        break;
                    }
                    None => break,
                },
                () = subscriber.tx.closed() => return,
                () = inner.closing.cancelled() => return,
            }
        }
    }
}
