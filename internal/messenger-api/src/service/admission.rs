//! Admission: whether a create may come in. With `messenger_api.max_due_backlog` set, creates
//! are refused (429 with `Retry-After`, `429001`) while the backlog — pending and processing
//! messages, from the maintained counts: one document read, never a count — would go over it.
//! A batch is admitted whole or not at all. The backlog read is shared for [`FRESH`], so a
//! burst of creates costs one read, not one each; what this replica admits meanwhile is added to
//! it at once.
//!
//! Scheduled messages (a `sendAt` ahead) are pending too and count toward the backlog: the
//! bound is on what Herald holds to send, which is what a runaway client fills.
//!
//! A key with `rate_per_second` (`[[auth.keys]]`) may make that many creates per second across
//! every replica, `burst` at once: the same GCRA in Redis the providers' send rate uses
//! ([`herald_core::gcra`]). A create past it is refused (429, `429002`, `Retry-After` until its
//! slot). A batch is one create. With Redis unreachable the rate is not checked (logged): the
//! API keeps taking messages, as it does for everything else Redis holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use herald_core::auth::Caller;
use herald_core::gcra::{Ask, Gcra};
use herald_core::redis_conn::RedisConn;
use herald_core::settings::Settings;
use poem_openapi::Object;
use tokio::sync::Mutex;

use crate::domain::MessageStatus;
use crate::error::ServiceError;
use crate::store::MessageStore;

/// How long one backlog read serves every create.
pub const FRESH: Duration = Duration::from_millis(250);

/// What a refused create is told to wait, in seconds.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// The backlog bound and what it refused.
pub struct Admission {
    store: MessageStore,
    max_backlog: u64,
    seen: Mutex<Option<(Instant, u64)>>,
    rejected: AtomicU64,
    key_rates: KeyRates,
    rejected_key_rate: AtomicU64,
    metric: prometheus::IntCounterVec,
}

/// The keys' create rates, by key name.
pub struct KeyRates {
    redis: Option<RedisConn>,
    timeout: Duration,
    limits: HashMap<String, KeyRate>,
}

struct KeyRate {
    gcra: Gcra,
    interval: Duration,
    tolerance: Duration,
}

impl KeyRates {
    /// No key has a rate.
    pub fn none() -> Self {
        Self {
            redis: None,
            timeout: Duration::ZERO,
            limits: HashMap::new(),
        }
    }

    /// The rates of `settings`' `[[auth.keys]]`, kept in its Redis under its key prefix.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        let limits: HashMap<String, KeyRate> = settings
            .auth
            .keys
            .iter()
            .filter(|k| k.rate_per_second > 0.0)
            .map(|k| {
                let interval = Duration::from_secs_f64(1.0 / k.rate_per_second);
                let rate = KeyRate {
                    gcra: Gcra::new(&settings.redis.key_prefix, "keyrate", &k.name),
                    interval,
                    tolerance: interval * (k.burst.max(1) - 1),
                };
                (k.name.clone(), rate)
            })
            .collect();
        if limits.is_empty() {
            return Ok(Self::none());
        }
        let timeout = Duration::from_millis(settings.redis.timeout_ms);
        Ok(Self {
            redis: Some(herald_core::redis_conn::lazy_connection(&settings.redis, timeout)?),
            timeout,
            limits,
        })
    }

    /// `None` when `key` may create now; else how long until it may.
    async fn wait(&self, key: &str) -> Option<Duration> {
        let (Some(redis), Some(rate)) = (&self.redis, self.limits.get(key)) else {
            return None;
        };
        let ask = Ask {
            interval: rate.interval,
            tolerance: rate.tolerance,
            max_wait: Duration::ZERO,
            worker: "messenger-api",
            floor: Duration::ZERO,
        };
        match rate.gcra.reserve(redis, ask, self.timeout).await {
            Ok(answer) if answer.reserved => None,
            Ok(answer) => Some(answer.wait),
            Err(error) => {
                tracing::warn!(error = %telemetry::Chain(&error), key, "create rate not checked: Redis did not answer");
                None
            }
        }
    }
}

/// Admission as the stats show it.
#[derive(Debug, Clone, PartialEq, Eq, Object)]
#[oai(rename_all = "camelCase")]
pub struct AdmissionReport {
    /// `messenger_api.max_due_backlog` (0: creates are never refused for the backlog).
    pub max_due_backlog: u64,
    /// Pending and processing messages as last read (within 250 ms).
    pub backlog: u64,
    /// Creates refused for the backlog since this replica started (a batch counts once).
    pub rejected_backlog: u64,
    /// Creates refused for their key's rate since this replica started.
    pub rejected_key_rate: u64,
}

impl Admission {
    /// The bound `max_backlog` (0 = off) over `store`'s counts; refusals counted in `metric`
    /// (label `reason`).
    pub fn new(store: MessageStore, max_backlog: u64, key_rates: KeyRates, metric: prometheus::IntCounterVec) -> Self {
        Self {
            store,
            max_backlog,
            seen: Mutex::new(None),
            rejected: AtomicU64::new(0),
            key_rates,
            rejected_key_rate: AtomicU64::new(0),
            metric,
        }
    }

    /// Admits one create by `caller`, or refuses it for the key's rate.
    pub async fn admit_key(&self, caller: &Caller) -> Result<(), ServiceError> {
        let Some(wait) = self.key_rates.wait(&caller.name).await else {
            return Ok(());
        };
        self.rejected_key_rate.fetch_add(1, Ordering::Relaxed);
        self.metric.with_label_values(&["key_rate"]).inc();
        Err(ServiceError::KeyRateLimited {
            key: caller.name.to_string(),
            retry_after_seconds: wait.as_secs_f64().ceil().max(1.0) as u64,
        })
    }

    /// Admits `n` new messages, or refuses them all.
    pub async fn admit(&self, n: u64) -> Result<(), ServiceError> {
        if self.max_backlog == 0 {
            return Ok(());
        }
        let mut seen = self.seen.lock().await;
        let backlog = self.fresh(&mut seen).await?;
        if backlog.saturating_add(n) <= self.max_backlog {
            // What this replica admits counts at once; other replicas' creates show at the
            // next read, so together they may pass the bound by what they admit in one FRESH.
            *seen = Some((seen.map_or_else(Instant::now, |(at, _)| at), backlog + n));
            return Ok(());
        }
        drop(seen);
        self.rejected.fetch_add(1, Ordering::Relaxed);
        self.metric.with_label_values(&["backlog"]).inc();
        Err(ServiceError::Overloaded {
            backlog,
            limit: self.max_backlog,
            retry_after_seconds: RETRY_AFTER_SECONDS,
        })
    }

    /// The report for the stats (reads the backlog when the bound is on).
    pub async fn report(&self) -> Result<AdmissionReport, ServiceError> {
        let backlog = if self.max_backlog == 0 {
            self.read().await?
        } else {
            self.backlog().await?
        };
        Ok(AdmissionReport {
            max_due_backlog: self.max_backlog,
            backlog,
            rejected_backlog: self.rejected.load(Ordering::Relaxed),
            rejected_key_rate: self.rejected_key_rate.load(Ordering::Relaxed),
        })
    }

    async fn backlog(&self) -> Result<u64, ServiceError> {
        let mut seen = self.seen.lock().await;
        self.fresh(&mut seen).await
    }

    async fn fresh(&self, seen: &mut Option<(Instant, u64)>) -> Result<u64, ServiceError> {
        if let Some((at, backlog)) = *seen {
            if at.elapsed() < FRESH {
                return Ok(backlog);
            }
        }
        let backlog = self.read().await?;
        *seen = Some((Instant::now(), backlog));
        Ok(backlog)
    }

    async fn read(&self) -> Result<u64, ServiceError> {
        let snapshot = self.store.counts().snapshot().await?;
        Ok(snapshot.map_or(0, |s| {
            s.by_status()
                .into_iter()
                .filter(|(status, _)| matches!(status, MessageStatus::Pending | MessageStatus::Processing))
                .map(|(_, n)| n)
                .sum()
        }))
    }
}
