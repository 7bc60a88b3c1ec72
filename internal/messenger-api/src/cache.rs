//! The Redis sent-message cache: `SET <prefix>sent:<id> {"messageId","sentAt"} EX <ttl>`.
//!
//! Beside it, `<prefix>stats:sent:<minute>` counts first commits per minute for the stats'
//! sent-per-minute chart (kept two hours).
//!
//! Redis is a cache, never the source of truth: every call is bounded by a timeout, and a
//! failure is reported to the caller (who logs and counts it) instead of failing a commit.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use herald_core::redis_conn::RedisConn;
use herald_core::settings::RedisSettings;
use serde::{Deserialize, Serialize};

/// How long a per-minute sent counter is kept, in seconds (the stats show the last hour).
const MINUTE_COUNTER_TTL_SECONDS: u64 = 2 * 3600;

/// Why a cache call failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Redis refused or broke the call.
    #[error("Redis call failed")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The entry could not be encoded.
    #[error("could not encode the cache entry")]
    Encode(#[from] serde_json::Error),
}

/// What is cached for a sent message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SentEntry {
    /// The provider's id (null when it accepted without one).
    pub message_id: Option<String>,
    /// RFC 3339 send time.
    pub sent_at: String,
}

/// The cache client. Connects lazily, so a service starts while Redis is down.
#[derive(Clone)]
pub struct SentCache {
    connection: RedisConn,
    prefix: String,
    ttl_seconds: u64,
    timeout: Duration,
    missed: Arc<Mutex<Missed>>,
}

/// Which sent messages may lack their cache entry: every one sent at or after `since`
/// (milliseconds), as far as this process knows. `generation` changes with every miss, so a
/// repair pass only clears what it has covered.
#[derive(Debug, Default, Clone, Copy)]
pub struct Missed {
    /// The earliest `sent_at` whose entry may be missing; `None` when nothing is.
    pub since: Option<i64>,
    /// Bumped by every miss.
    pub generation: u64,
}

impl SentCache {
    /// Builds the client without connecting.
    pub fn new(settings: &RedisSettings) -> anyhow::Result<Self> {
        let timeout = Duration::from_millis(settings.timeout_ms);
        let connection = herald_core::redis_conn::lazy_connection(settings, timeout)?;
        Ok(Self {
            connection,
            prefix: settings.key_prefix.clone(),
            ttl_seconds: settings.sent_ttl_seconds,
            timeout,
            missed: Arc::default(),
        })
    }

    /// How long an entry lives, in seconds.
    pub fn ttl_seconds(&self) -> u64 {
        self.ttl_seconds
    }

    /// Records that the entry of a message sent at `sent_at_ms` could not be written.
    pub fn note_missed(&self, sent_at_ms: i64) {
        let mut missed = self.missed.lock().unwrap_or_else(PoisonError::into_inner);
        missed.since = Some(missed.since.map_or(sent_at_ms, |since| since.min(sent_at_ms)));
        missed.generation += 1;
    }

    /// What may be missing now.
    pub fn missed(&self) -> Missed {
        *self.missed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A repair that started at `seen` has covered everything sent before `upto` (ms), or, with
    /// `None`, everything: move the mark, unless a new miss came in meanwhile.
    pub fn repaired(&self, seen: Missed, upto: Option<i64>) {
        let mut missed = self.missed.lock().unwrap_or_else(PoisonError::into_inner);
        if missed.generation == seen.generation {
            missed.since = upto;
        }
    }

    /// Writes each entry that is not there (`SET … NX`) with the time it has left to live, in
    /// one round trip; answers how many were missing.
    pub async fn put_missing(&self, entries: &[(String, SentEntry, u64)]) -> Result<u64, CacheError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for (id, entry, ttl_seconds) in entries {
            pipe.cmd("SET")
                .arg(self.key(id))
                .arg(serde_json::to_string(entry)?)
                .arg("EX")
                .arg(*ttl_seconds)
                .arg("NX");
        }
        let mut conn = self.connection.clone();
        let written: Vec<Option<String>> = self.bounded(async move { pipe.query_async(&mut conn).await }).await?;
        Ok(written.iter().filter(|w| w.is_some()).count() as u64)
    }

    /// The key of a message.
    pub fn key(&self, id: &str) -> String {
        format!("{}sent:{id}", self.prefix)
    }

    /// The key counting messages sent in the minute starting at `minute` (Unix seconds / 60).
    fn minute_key(&self, minute: i64) -> String {
        format!("{}stats:sent:{minute}", self.prefix)
    }

    /// Writes many entries with their TTL and counts each first commit in its minute (the
    /// `Option<i64>` beside it; a repeated commit has none), all in one round trip.
    pub async fn put_sent_many(&self, entries: &[(String, SentEntry, Option<i64>)]) -> Result<(), CacheError> {
        let mut pipe = redis::pipe();
        let mut minutes: std::collections::BTreeMap<i64, u64> = std::collections::BTreeMap::new();
        for (id, entry, minute) in entries {
            pipe.cmd("SET")
                .arg(self.key(id))
                .arg(serde_json::to_string(entry)?)
                .arg("EX")
                .arg(self.ttl_seconds)
                .ignore();
            if let Some(minute) = minute {
                *minutes.entry(*minute).or_default() += 1;
            }
        }
        for (minute, n) in minutes {
            let key = self.minute_key(minute);
            pipe.cmd("INCRBY").arg(&key).arg(n).ignore();
            pipe.cmd("EXPIRE").arg(&key).arg(MINUTE_COUNTER_TTL_SECONDS).ignore();
        }
        let mut conn = self.connection.clone();
        self.bounded(async move { pipe.query_async::<()>(&mut conn).await })
            .await
    }

    /// Messages sent in each of the `minutes` minutes up to and including `last_minute`,
    /// oldest first.
    pub async fn sent_per_minute(&self, last_minute: i64, minutes: i64) -> Result<Vec<u64>, CacheError> {
        let keys: Vec<String> = (last_minute - minutes + 1..=last_minute)
            .map(|m| self.minute_key(m))
            .collect();
        let mut conn = self.connection.clone();
        let values: Vec<Option<u64>> = self
            .bounded(async move { redis::cmd("MGET").arg(&keys).query_async(&mut conn).await })
            .await?;
        Ok(values.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// PING, for readiness.
    pub async fn ping(&self) -> Result<(), CacheError> {
        let mut conn = self.connection.clone();
        self.bounded(async move { redis::cmd("PING").query_async::<String>(&mut conn).await.map(drop) })
            .await
    }

    async fn bounded<T, F>(&self, call: F) -> Result<T, CacheError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        // Connect + retry + response can exceed one timeout; cap the whole call at three.
        let limit = self.timeout * 3;
        Ok(tokio::time::timeout(limit, call)
            .await
            .map_err(|_| CacheError::Timeout(limit))??)
    }
}
