//! The Messenger API's Prometheus metrics.

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::events::FeedMetrics;

/// Every metric of the service, registered in its own registry (no globals, so tests that run
/// several services in one process do not collide).
#[derive(Clone)]
pub struct MessengerMetrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// HTTP requests by route and status.
    pub http: herald_core::http::HttpMetrics,
    /// Messages by status (refreshed on scrape).
    pub messages: IntGaugeVec,
    /// How long the most overdue pending message has been due (refreshed on scrape).
    pub oldest_pending_age: Gauge,
    /// Messages handed out by get-two.
    pub claimed: IntCounter,
    /// Commit calls by result: committed, replayed, claim_lost.
    pub commits: IntCounterVec,
    /// Failure reports by result: retry_scheduled, failed.
    pub failures: IntCounterVec,
    /// Sent-cache writes that did not reach Redis.
    pub cache_write_failures: IntCounter,
    /// Cache entries the repair wrote again.
    pub cache_repaired: IntCounter,
    /// 1 while a cache repair is pending.
    pub cache_repair_pending: IntGauge,
    /// Messages that expired unsent, by where it was found: claim, worker, retry.
    pub expired: IntCounterVec,
    /// Claims asked to be extended, by result: held (extended), lost (lapsed or reported).
    pub claims_extended: IntCounterVec,
    /// Messages re-queued by operators, one at a time or in bulk.
    pub requeued: IntCounterVec,
    /// Delivery receipts by provider and result.
    pub receipts: IntCounterVec,
    /// Messages whose delivery moved, by provider and state.
    pub deliveries: IntCounterVec,
    /// `herald_callbacks_total{result}`.
    pub callbacks: IntCounterVec,
    /// `herald_message_counts_exact`.
    pub counts_exact: IntGauge,
    /// Creates refused by admission control, by reason: backlog, key_rate.
    pub admission_rejected: IntCounterVec,
    /// Messages removed by the retention sweep, by status.
    pub removed: IntCounterVec,
    /// When the retention sweep last ran, in Unix seconds.
    pub retention_swept_at: IntGauge,
    /// The live event feed: subscribers, cut-offs, events read.
    pub feed: FeedMetrics,
}

impl MessengerMetrics {
    /// Creates and registers everything.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("herald".into()), None)?;
        let http = herald_core::http::HttpMetrics::new(&registry)?;
        let messages = IntGaugeVec::new(Opts::new("messages", "Messages by status."), &["status"])?;
        let oldest_pending_age = Gauge::new(
            "oldest_pending_age_seconds",
            "How long the most overdue pending message has been due (delivery lag).",
        )?;
        let claimed = IntCounter::new("messages_claimed_total", "Messages handed out by get-two.")?;
        let commits = IntCounterVec::new(Opts::new("commits_total", "Commit calls by result."), &["result"])?;
        let failures = IntCounterVec::new(
            Opts::new("failure_reports_total", "Failure reports by result."),
            &["result"],
        )?;
        let cache_write_failures = IntCounter::new(
            "redis_cache_write_failures_total",
            "Sent-message cache entries that could not be written to Redis.",
        )?;
        let cache_repaired = IntCounter::new(
            "redis_cache_repaired_total",
            "Missing sent-message cache entries written again once Redis answered.",
        )?;
        let cache_repair_pending = IntGauge::new(
            "redis_cache_repair_pending",
            "1 while sent messages whose cache entries could not be written wait to be repaired.",
        )?;
        let expired = IntCounterVec::new(
            Opts::new(
                "messages_expired_total",
                "Messages that expired unsent, by where: claim (due past expiresAt), worker (past it before the send), retry (the retry would come after it).",
            ),
            &["via"],
        )?;
        let claims_extended = IntCounterVec::new(
            Opts::new(
                "claims_extended_total",
                "Claims a worker asked to keep for longer, by result: held (extended), lost (the lease had lapsed and the message moved on, or it was reported).",
            ),
            &["result"],
        )?;
        let requeued = IntCounterVec::new(
            Opts::new(
                "messages_requeued_total",
                "Failed messages re-queued by an operator, by way: one, bulk.",
            ),
            &["way"],
        )?;
        let receipts = IntCounterVec::new(
            Opts::new(
                "receipts_total",
                "Delivery receipts by provider and result: applied, ignored (a replay or late intermediate), pending (no message yet), matched_late (applied once the commit came), unauthorized, unreadable, busy (over receipts.max_in_flight, answered 503); provider \"-\" timed_out: messages given state unknown for want of a final receipt.",
            ),
            &["provider", "result"],
        )?;
        let deliveries = IntCounterVec::new(
            Opts::new(
                "deliveries_total",
                "Messages whose delivery state a receipt moved, by provider and state (delivered, undelivered, failed, read, sent; unknown from the timeout sweep).",
            ),
            &["provider", "state"],
        )?;
        let callbacks = IntCounterVec::new(
            Opts::new(
                "callbacks_total",
                "Status callbacks by result: written (to the outbox), delivered, retry_scheduled, deferred (host paused or over its rate), dead (dead-lettered), claim_lost (reported without its claim), resent (an operator revived a dead one).",
            ),
            &["result"],
        )?;
        let counts_exact = IntGauge::new(
            "message_counts_exact",
            "1 when herald_messages{status} are known exact, 0 while they are served as kept before a reconciliation checked them.",
        )?;
        let admission_rejected = IntCounterVec::new(
            Opts::new(
                "admission_rejected_total",
                "Creates refused with 429 by admission control, by reason: backlog (messenger_api.max_due_backlog), key_rate (a key's rate_per_second).",
            ),
            &["reason"],
        )?;
        let removed = IntCounterVec::new(
            Opts::new(
                "messages_removed_total",
                "Final messages removed by the retention sweep, by status.",
            ),
            &["status"],
        )?;
        let retention_swept_at = IntGauge::new(
            "retention_last_sweep_timestamp_seconds",
            "When the retention sweep last ran (Unix seconds); absent work means it never ran.",
        )?;
        registry.register(Box::new(removed.clone()))?;
        registry.register(Box::new(retention_swept_at.clone()))?;
        registry.register(Box::new(expired.clone()))?;
        registry.register(Box::new(claims_extended.clone()))?;
        registry.register(Box::new(requeued.clone()))?;
        registry.register(Box::new(admission_rejected.clone()))?;
        registry.register(Box::new(receipts.clone()))?;
        registry.register(Box::new(deliveries.clone()))?;
        registry.register(Box::new(callbacks.clone()))?;
        registry.register(Box::new(counts_exact.clone()))?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(oldest_pending_age.clone()))?;
        registry.register(Box::new(claimed.clone()))?;
        registry.register(Box::new(commits.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(cache_write_failures.clone()))?;
        registry.register(Box::new(cache_repaired.clone()))?;
        registry.register(Box::new(cache_repair_pending.clone()))?;
        let feed = FeedMetrics {
            subscribers: IntGauge::new(
                "event_subscribers",
                "Subscribers of the live event feed (SSE and WebSocket).",
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "event_subscribers_dropped_total",
                    "Event subscribers cut off, by reason: slow, ping_timeout, write_timeout.",
                ),
                &["reason"],
            )?,
            published: IntCounter::new(
                "events_published_total",
                "Events read from the database's change stream.",
            )?,
        };
        registry.register(Box::new(feed.subscribers.clone()))?;
        registry.register(Box::new(feed.dropped.clone()))?;
        registry.register(Box::new(feed.published.clone()))?;
        Ok(Self {
            registry,
            http,
            messages,
            oldest_pending_age,
            claimed,
            commits,
            failures,
            cache_write_failures,
            cache_repaired,
            cache_repair_pending,
            expired,
            claims_extended,
            requeued,
            admission_rejected,
            receipts,
            deliveries,
            callbacks,
            counts_exact,
            removed,
            retention_swept_at,
            feed,
        })
    }
}
