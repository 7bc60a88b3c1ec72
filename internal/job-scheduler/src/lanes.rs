//! One lane per provider — its webhook client (request shape, auth, id pointer), its shared
//! pause and its shared rate limit — and the routing that orders the lanes a message may take.

use std::sync::Arc;
use std::time::Duration;

use herald_core::providers::{Provider, Routing};
use herald_core::redis_conn::RedisConn;
use herald_core::worker::ClaimedMessage;
use mongodb::Database;
use webhook_client::WebhookClient;

use crate::limiter::{RateLimit, RateLimiter};
use crate::metrics::SchedulerMetrics;
use crate::provider::{PauseRules, ProviderGate};
use crate::store::ProviderStore;

/// One provider as the job sends to it.
pub struct Lane {
    /// Its configured name.
    pub name: String,
    /// Its client.
    pub client: WebhookClient,
    /// Its pause, shared by every replica.
    pub gate: Arc<ProviderGate>,
    /// Its rate limit, shared by every replica.
    pub limiter: RateLimiter,
}

/// Every provider's lane and the routes between them.
pub struct Lanes {
    lanes: Vec<Lane>,
    routing: Routing,
}

/// What a lane needs beyond its provider.
pub struct LaneParts<'a> {
    /// The database holding `provider_state`.
    pub db: &'a Database,
    /// Redis, for the limiters.
    pub redis: RedisConn,
    /// Prefix of every Redis key.
    pub key_prefix: &'a str,
    /// This replica.
    pub worker: &'a str,
    /// How long the limiter waits for Redis.
    pub limiter_timeout: Duration,
    /// The metrics.
    pub metrics: &'a SchedulerMetrics,
}

impl Lane {
    fn new(provider: &Provider, parts: &LaneParts<'_>) -> anyhow::Result<Self> {
        let client = WebhookClient::new(provider.webhook.clone())
            .map_err(|e| anyhow::anyhow!("provider {:?}: {e}", provider.name))?;
        let gate = Arc::new(ProviderGate::new(
            &provider.name,
            ProviderStore::new(parts.db, &provider.name),
            parts.worker,
            PauseRules {
                after_failures: provider.pause_after_failures,
                pause: provider.pause,
                max: provider.max_pause,
                probe_hold: provider.timeout() + Duration::from_secs(5),
            },
            parts.metrics.pause.clone(),
        ));
        let limiter = RateLimiter::new(
            RateLimit {
                per_second: provider.rate_limit_per_second,
                burst: provider.rate_limit_burst,
                fallback_replicas: provider.rate_limit_fallback_replicas,
            },
            parts.redis.clone(),
            parts.key_prefix,
            &provider.name,
            parts.worker,
            parts.limiter_timeout,
            parts.metrics.limiter.clone(),
        );
        Ok(Self {
            name: provider.name.clone(),
            client,
            gate,
            limiter,
        })
    }
}

impl Lanes {
    /// A lane for every provider of `routing`.
    pub fn new(routing: Routing, parts: &LaneParts<'_>) -> anyhow::Result<Self> {
        let lanes = routing
            .providers()
            .iter()
            .map(|p| Lane::new(p, parts))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self { lanes, routing })
    }

    /// Every lane, in configuration order.
    pub fn all(&self) -> &[Lane] {
        &self.lanes
    }

    /// The lane at `index`.
    pub fn get(&self, index: usize) -> &Lane {
        &self.lanes[index]
    }

    /// The lanes `message` may take, in the order to try them (see [`Routing::plan`]).
    /// A pin naming a provider this replica does not know (configurations differ between
    /// replicas) is ignored: the message takes its route.
    pub fn plan(&self, message: &ClaimedMessage) -> Vec<usize> {
        self.routing.plan(
            &message.to,
            message.provider.as_deref(),
            &message.id,
            message.last_provider.as_deref(),
        )
    }

    /// The earliest time some provider may be sent to again, when every one is paused (read
    /// fresh); `None` when any is open or probing.
    pub async fn all_paused_until(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let mut earliest: Option<chrono::DateTime<chrono::Utc>> = None;
        for lane in &self.lanes {
            let until = lane.gate.paused_until().await?;
            earliest = Some(earliest.map_or(until, |e| e.min(until)));
        }
        earliest
    }

    /// Whether every provider is paused as last seen (no read).
    pub fn all_paused(&self) -> bool {
        self.lanes.iter().all(|lane| lane.gate.is_paused())
    }

    /// How many one claim should take so that, at this replica's share of every limit, two
    /// claims' worth go out within `budget`: the sum over the providers, `None` when any
    /// provider has no limit.
    pub fn claim_cap(&self, budget: Duration) -> Option<u32> {
        self.lanes
            .iter()
            .map(|lane| lane.limiter.claim_cap(budget))
            .try_fold(0u32, |sum, cap| cap.map(|c| sum.saturating_add(c)))
    }
}
