//! The send rate shared by every replica: a GCRA (generic cell rate algorithm) kept in Redis.
//!
//! Redis holds one number, the theoretical arrival time (TAT) of the next send. One atomic
//! script reads Redis's own clock, reserves the next slot when it is at most a short wait away
//! (advancing the TAT by one emission interval) and answers how long to wait for it, so every
//! replica paces itself against the same schedule with one round trip per send. A burst of
//! `burst` sends may go at once; after that one every `1 / rate` seconds. In any window of one
//! second at most `rate + burst` sends start.
//!
//! The same script records which replicas use the limiter (a sorted set of worker ids, the last
//! ten seconds). **With Redis unreachable the limiter errs on the side of sending less:** each
//! replica falls back to an in-process GCRA of `rate / n` with `burst / n` (at least one),
//! where `n` is the number of replicas it last saw, or `webhook.rate_limit_fallback_replicas`
//! when it never saw any; the in-process limiter starts with no burst in hand. It tries Redis
//! again a second later. Back on Redis, its first reservation lifts the shared TAT past the
//! local slots it still has booked plus the tolerance: the shared schedule has not seen the
//! sends made meanwhile, so it starts after them and with no burst. For one more retry
//! interval it keeps to its share as well (each send takes a shared and a local slot): the
//! other replicas may still be on their fallback that long, each sending its share beside it.
//!
//! Waiting is not an attempt: a send that would have to wait past `deadline` (its claim could
//! lapse) is refused, and the caller gives the message back unsent.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use herald_core::gcra::{Ask, Gcra, GcraError};
use herald_core::redis_conn::RedisConn;
use tokio::time::Instant;

/// Longest wait a reservation may carry: further slots are left to later calls, so a
/// replica never books the schedule far ahead of what it will send.
const MAX_RESERVE: Duration = Duration::from_secs(1);
/// How long the limiter stays on its in-process fallback before it tries Redis again.
const FALLBACK_RETRY: Duration = Duration::from_secs(1);
/// The limit, as configured.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    /// Sends per second across all replicas (0 = off).
    pub per_second: f64,
    /// Sends allowed at once.
    pub burst: u32,
    /// Replicas assumed, without Redis, when none were ever seen.
    pub fallback_replicas: u32,
}

/// A send would have to wait past its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the rate limit leaves no slot before the deadline")]
pub struct TooLate;

/// The shared limiter of one replica (a no-op when the limit is off).
pub struct RateLimiter {
    inner: Option<Inner>,
}

struct Inner {
    redis: RedisConn,
    gcra: Gcra,
    worker: String,
    limit: RateLimit,
    timeout: Duration,
    /// Replicas seen using the limiter at the last call that reached Redis (0: never).
    replicas_seen: AtomicU32,
    fallback: Mutex<Fallback>,
    metrics: LimiterMetrics,
}

/// The limiter's metrics.
#[derive(Clone)]
pub struct LimiterMetrics {
    /// Seconds sends waited for the limit.
    pub waited: prometheus::Counter,
    /// 1 while the limiter runs on its in-process fallback.
    pub fallback: prometheus::IntGauge,
    /// Sends refused because their slot lay past the claim's deadline.
    pub too_late: prometheus::IntCounter,
}

#[derive(Default)]
struct Fallback {
    /// On the in-process limiter until then.
    until: Option<Instant>,
    /// The in-process TAT.
    tat: Option<Instant>,
    /// The latest slot this replica reserved in Redis: its fallback starts after it.
    reserved_until: Option<Instant>,
    /// Back on Redis, but still within its share until then (see the module docs).
    cooling_until: Option<Instant>,
}

/// A GCRA step on an in-process clock: the wait for the next slot, and the TAT after taking it.
fn gcra(tat: Instant, now: Instant, interval: Duration, tolerance: Duration) -> (Duration, Instant) {
    let tat = tat.max(now);
    let wait = (tat.checked_sub(tolerance).unwrap_or(now)).saturating_duration_since(now);
    (wait, tat + interval)
}

impl RateLimiter {
    /// A limiter of provider `provider` for `worker`, keyed under `prefix`; off when the rate
    /// is 0.
    pub fn new(
        limit: RateLimit,
        redis: RedisConn,
        prefix: &str,
        provider: &str,
        worker: &str,
        timeout: Duration,
        metrics: LimiterMetrics,
    ) -> Self {
        if limit.per_second <= 0.0 {
            return Self { inner: None };
        }
        Self {
            inner: Some(Inner {
                redis,
                gcra: Gcra::new(prefix, "ratelimit", provider),
                worker: worker.to_owned(),
                limit,
                timeout,
                replicas_seen: AtomicU32::new(0),
                fallback: Mutex::new(Fallback::default()),
                metrics,
            }),
        }
    }

    /// Whether a limit is configured.
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// How many messages one claim should take so that, at this replica's share of the rate,
    /// two claims' worth are sent within `budget` (a claim is made while the previous one is
    /// still being sent). `None` when there is no limit.
    pub fn claim_cap(&self, budget: Duration) -> Option<u32> {
        let inner = self.inner.as_ref()?;
        let share = inner.limit.per_second / f64::from(inner.replicas());
        Some(((share * budget.as_secs_f64() / 2.0).floor() as u32).max(1))
    }

    /// Waits for a slot for one send, or answers [`TooLate`] when none comes before `deadline`.
    pub async fn acquire(&self, deadline: Instant) -> Result<(), TooLate> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let started = Instant::now();
        let result = inner.acquire(deadline).await;
        inner.metrics.waited.inc_by(started.elapsed().as_secs_f64());
        if result.is_err() {
            inner.metrics.too_late.inc();
        }
        result
    }
}

impl Inner {
    fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.limit.per_second)
    }

    fn replicas(&self) -> u32 {
        match self.replicas_seen.load(Ordering::Relaxed) {
            0 => self.limit.fallback_replicas.max(1),
            n => n,
        }
    }

    fn on_fallback(&self, now: Instant) -> bool {
        let fallback = self.fallback.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        fallback.until.is_some_and(|until| now < until)
    }

    async fn acquire(&self, deadline: Instant) -> Result<(), TooLate> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(TooLate);
            }
            if self.on_fallback(now) {
                return self.acquire_locally(deadline).await;
            }
            let max_wait = (deadline - now).min(MAX_RESERVE);
            match self.reserve(max_wait).await {
                Ok((true, wait)) => {
                    let wait = {
                        let mut fallback = self.fallback.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        fallback.reserved_until = fallback.reserved_until.max(Some(now + wait));
                        match self.cooling_slot(&mut fallback, now) {
                            Some(local) => wait.max(local),
                            None => wait,
                        }
                    };
                    if now + wait > deadline {
                        return Err(TooLate);
                    }
                    tokio::time::sleep(wait).await;
                    return Ok(());
                }
                Ok((false, wait)) => {
                    if now + wait > deadline {
                        return Err(TooLate);
                    }
                    // Past what may be booked now: come back when the slot is within reach.
                    tokio::time::sleep(wait.saturating_sub(MAX_RESERVE).max(Duration::from_millis(5))).await;
                }
                Err(error) => {
                    tracing::warn!(
                        error = %telemetry::Chain(&error),
                        replicas = self.replicas(),
                        "rate limiter cannot reach Redis; each replica sends its share in-process"
                    );
                    self.enter_fallback(now);
                }
            }
        }
    }

    fn enter_fallback(&self, now: Instant) {
        let mut fallback = self.fallback.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if fallback.tat.is_none() {
            // Start after the slots this replica still holds in Redis, with no burst in hand:
            // the shared limiter may just have spent it.
            let (interval, tolerance) = self.local_limits();
            let base = fallback.reserved_until.map_or(now, |at| at.max(now));
            fallback.tat = Some(base + interval + tolerance);
        }
        fallback.until = Some(now + FALLBACK_RETRY);
        fallback.cooling_until = None;
        self.metrics.fallback.set(1);
    }

    /// While cooling down after the fallback, books this replica's local slot too and answers
    /// its wait; afterwards forgets the local schedule and answers `None`.
    fn cooling_slot(&self, fallback: &mut Fallback, now: Instant) -> Option<Duration> {
        let until = fallback.cooling_until?;
        if now >= until {
            fallback.cooling_until = None;
            fallback.tat = None;
            return None;
        }
        let (interval, tolerance) = self.local_limits();
        let (wait, next) = gcra(fallback.tat.unwrap_or(now), now, interval, tolerance);
        fallback.tat = Some(next);
        Some(wait)
    }

    /// This replica's share: `rate / n` with `burst / n` (at least one).
    fn local_limits(&self) -> (Duration, Duration) {
        let n = self.replicas();
        let interval = self.interval() * n;
        let burst = (self.limit.burst / n).max(1);
        (interval, interval * (burst - 1))
    }

    async fn acquire_locally(&self, deadline: Instant) -> Result<(), TooLate> {
        let now = Instant::now();
        let wait = {
            let mut fallback = self.fallback.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (interval, tolerance) = self.local_limits();
            let (wait, next) = gcra(fallback.tat.unwrap_or(now), now, interval, tolerance);
            if now + wait > deadline {
                return Err(TooLate);
            }
            fallback.tat = Some(next);
            wait
        };
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// One script call: (reserved, wait).
    async fn reserve(&self, max_wait: Duration) -> Result<(bool, Duration), GcraError> {
        let interval = self.interval();
        let tolerance = interval * (self.limit.burst.max(1) - 1);
        // Back from the fallback, the shared schedule has not seen what the replicas sent on
        // their own meanwhile (and a promoted Redis replica may hold an older copy), while
        // this replica's local slots booked ahead are still to be used: shared slots start
        // after them, and with no burst, as the fallback took none from Redis.
        let returning_tat = {
            let fallback = self.fallback.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            fallback.until.and(fallback.tat)
        };
        let floor = returning_tat.map_or(Duration::ZERO, |tat| {
            tat.saturating_duration_since(Instant::now()) + tolerance
        });
        let ask = Ask {
            interval,
            tolerance,
            max_wait,
            worker: &self.worker,
            floor,
        };
        let answer = self.gcra.reserve(&self.redis, ask, self.timeout).await?;
        self.replicas_seen.store(answer.replicas.max(1), Ordering::Relaxed);
        let was_fallback = {
            let mut fallback = self.fallback.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let was = fallback.until.take().is_some();
            if was && fallback.tat.is_some() {
                fallback.cooling_until = Some(Instant::now() + FALLBACK_RETRY);
            }
            was
        };
        if was_fallback {
            self.metrics.fallback.set(0);
            tracing::info!("rate limiter reaches Redis again");
        }
        Ok((answer.reserved, answer.wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_lets_a_burst_through_then_paces() {
        let start = Instant::now();
        let interval = Duration::from_millis(50);
        let tolerance = interval * 4; // burst 5
        let mut tat = start;
        let mut waits = Vec::new();
        for _ in 0..8 {
            let (wait, next) = gcra(tat, start, interval, tolerance);
            waits.push(wait.as_millis());
            tat = next;
        }
        assert_eq!(waits, [0, 0, 0, 0, 0, 50, 100, 150]);
    }

    #[test]
    fn after_a_quiet_spell_the_burst_is_back_but_no_more() {
        let start = Instant::now();
        let interval = Duration::from_millis(50);
        let (_, tat) = gcra(start, start, interval, interval * 4);
        let later = start + Duration::from_secs(10);
        let (wait, next) = gcra(tat, later, interval, interval * 4);
        assert_eq!(wait, Duration::ZERO);
        assert_eq!(next, later + interval);
    }
}
