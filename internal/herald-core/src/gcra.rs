//! The GCRA (generic cell rate algorithm) kept in Redis, shared by every rate Herald holds to
//! across replicas: the providers' send rate (the Job Scheduler's limiter) and each key's create
//! rate (the Messenger API's admission). Redis holds one number per limit, the theoretical
//! arrival time (TAT) of the next cell; one atomic script reads Redis's own clock, reserves the
//! next slot when it is at most `max_wait` away, and answers how long until it.

use std::time::Duration;

use crate::redis_conn::RedisConn;

/// GCRA reservation. KEYS: TAT, replicas. ARGV: interval µs, tolerance µs, longest wait to
/// reserve µs, worker id, replica window µs, least lead of the TAT over now µs (0 unless a
/// caller returns from an in-process fallback). Answers {reserved 0/1, wait µs, replicas}.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local floor = now + tonumber(ARGV[6])
if tat < floor then tat = floor end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
redis.call('ZADD', KEYS[2], now, ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[5]))
redis.call('PEXPIRE', KEYS[2], 60000)
local replicas = redis.call('ZCARD', KEYS[2])
if wait > max_wait then
  return {0, math.floor(wait), replicas}
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.floor((next_tat - now) / 1000) + 1000)
return {1, math.floor(wait), replicas}
";

/// How long a replica counts as using a limit after its last call.
pub const REPLICA_WINDOW: Duration = Duration::from_secs(10);

/// One limit's keys in Redis, in one Cluster slot (a hash tag per limit).
#[derive(Clone)]
pub struct Gcra {
    script: redis::Script,
    tat_key: String,
    replicas_key: String,
}

/// What one reservation answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// A slot was taken.
    pub reserved: bool,
    /// How long until the slot (taken or not).
    pub wait: Duration,
    /// Replicas that used this limit within [`REPLICA_WINDOW`].
    pub replicas: u32,
}

/// What a reservation asks.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// One cell every this long.
    pub interval: Duration,
    /// How far ahead of the schedule a cell may go (`(burst - 1) × interval`).
    pub tolerance: Duration,
    /// Reserve only a slot at most this far away.
    pub max_wait: Duration,
    /// Who asks (counted among the replicas).
    pub worker: &'a str,
    /// The least lead of the TAT over now (0 normally).
    pub floor: Duration,
}

/// A reservation failed.
#[derive(Debug, thiserror::Error)]
pub enum GcraError {
    /// The script failed.
    #[error("Redis call failed")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
}

impl Gcra {
    /// The limit named `name` (a hash tag: both keys in one slot) of `kind`, under `prefix`.
    pub fn new(prefix: &str, kind: &str, name: &str) -> Self {
        Self {
            script: redis::Script::new(SCRIPT),
            tat_key: format!("{prefix}{kind}:{{{name}}}:tat"),
            replicas_key: format!("{prefix}{kind}:{{{name}}}:replicas"),
        }
    }

    /// One script call, bounded by `timeout`.
    pub async fn reserve(&self, redis: &RedisConn, ask: Ask<'_>, timeout: Duration) -> Result<Reservation, GcraError> {
        let mut invocation = self.script.key(&self.tat_key);
        invocation
            .key(&self.replicas_key)
            .arg(ask.interval.as_micros() as u64)
            .arg(ask.tolerance.as_micros() as u64)
            .arg(ask.max_wait.as_micros() as u64)
            .arg(ask.worker)
            .arg(REPLICA_WINDOW.as_micros() as u64)
            .arg(ask.floor.as_micros() as u64);
        let mut connection = redis.clone();
        let (reserved, wait, replicas): (i64, i64, u32) =
            tokio::time::timeout(timeout, invocation.invoke_async(&mut connection))
                .await
                .map_err(|_| GcraError::Timeout(timeout))??;
        Ok(Reservation {
            reserved: reserved == 1,
            wait: Duration::from_micros(wait.max(0) as u64),
            replicas,
        })
    }
}
