//! The callback courier: every `callbacks.poll_ms` a replica claims due status callbacks from
//! the Messenger API (leased, like messages), POSTs each to its URL signed the Standard
//! Webhooks way, and reports what happened; the API keeps the retry schedule and the dead
//! letters.
//!
//! Per destination host, shared by every replica through Redis: a send rate (the same GCRA as
//! the providers' limiter) and a pause — after `pause_after_failures` failures in a row, or as
//! long as a 429/503 `Retry-After` says. A callback whose host is paused or over its rate is
//! reported `deferred`: due again when the host is, its attempt not counted.
//!
//! Addresses are checked before any connection: an IP literal here, a name in the resolver the
//! HTTP client uses (so the addresses checked are the ones connected to — no second lookup a
//! rebinding name could answer differently). Redirects are not followed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;
use herald_core::callbacks::{
    CallbackClaimRequest, CallbackOutcome, CallbackReport, CallbackReportResults, CallbackResultKind, ClaimedCallback,
    Refused, SigningKeys, UrlPolicy, CLAIM_PATH, REPORT_PATH,
};
use herald_core::gcra::{Ask, Gcra};
use herald_core::peer::PeerClient;
use herald_core::redis_conn::RedisConn;
use herald_core::settings::CallbacksSettings;
use prometheus::IntCounterVec;
use reqwest::Method;
use tokio_util::sync::CancellationToken;

/// How a host name becomes addresses (the system's resolver, or a test's).
pub trait Lookup: Send + Sync {
    /// The addresses of `host`.
    fn lookup(&self, host: String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>>;
}

/// The system's resolver.
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, host: String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), 0)).await?.collect()) })
    }
}

/// The HTTP client's resolver: resolves, then refuses the whole name when any address is one
/// the policy does not allow — before the client connects to anything.
struct GuardedResolver {
    lookup: Arc<dyn Lookup>,
    policy: UrlPolicy,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let lookup = self.lookup.lookup(host.clone());
        let policy = self.policy.clone();
        Box::pin(async move {
            let addresses = lookup.await?;
            let ips: Vec<_> = addresses.iter().map(SocketAddr::ip).collect();
            policy
                .check_addresses(&host, &ips)
                .map_err(|refused| Box::new(refused) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The refusal somewhere in an error's chain, if it is one.
fn refusal<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return Some(refused);
        }
        current = e.source();
    }
    None
}

/// What the courier needs.
pub struct CourierParts {
    /// The Messenger API (worker key).
    pub messenger: PeerClient,
    /// Shared host rates and pauses.
    pub redis: RedisConn,
    /// Redis key prefix.
    pub key_prefix: String,
    /// This replica's worker id.
    pub worker: String,
    /// `[callbacks]`.
    pub settings: CallbacksSettings,
    /// Longest honoured `Retry-After`.
    pub max_retry_after: Duration,
    /// How names are resolved.
    pub lookup: Arc<dyn Lookup>,
    /// `herald_callbacks_sent_total{result}`.
    pub counted: IntCounterVec,
}

/// Delivers status callbacks.
pub struct Courier {
    messenger: PeerClient,
    client: reqwest::Client,
    keys: SigningKeys,
    policy: UrlPolicy,
    redis: RedisConn,
    prefix: String,
    worker: String,
    settings: CallbacksSettings,
    max_retry_after: Duration,
    counted: IntCounterVec,
}

impl Courier {
    /// Builds the courier and its HTTP client.
    pub fn new(parts: CourierParts) -> anyhow::Result<Self> {
        let policy = parts.settings.url_policy();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(parts.settings.timeout_ms))
            .connect_timeout(Duration::from_millis(parts.settings.timeout_ms.min(5000)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Herald-Callbacks/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(GuardedResolver {
                lookup: parts.lookup,
                policy: policy.clone(),
            }))
            .build()?;
        Ok(Self {
            messenger: parts.messenger,
            client,
            keys: parts.settings.signing_keys()?,
            policy,
            redis: parts.redis,
            prefix: parts.key_prefix,
            worker: parts.worker,
            settings: parts.settings,
            max_retry_after: parts.max_retry_after,
            counted: parts.counted,
        })
    }

    /// Looks for due callbacks every `poll_ms` (at once again after a full batch) until
    /// `stop`.
    pub fn spawn(self: Arc<Self>, tracker: &tokio_util::task::TaskTracker, stop: CancellationToken) {
        let every = Duration::from_millis(self.settings.poll_ms);
        tracker.spawn(async move {
            loop {
                let full = match self.run_once().await {
                    Ok(done) => done >= self.settings.batch_size as usize,
                    Err(error) => {
                        tracing::warn!(error = %telemetry::Chain(&*error), "callback round failed");
                        false
                    }
                };
                if full {
                    continue;
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(every) => {}
                }
            }
        });
    }

    /// One round: claim a batch, POST each, report. Answers how many it claimed.
    pub async fn run_once(&self) -> anyhow::Result<usize> {
        // One correlation id ties a round's claim and report together in the API's logs.
        let round = bson::oid::ObjectId::new().to_hex();
        let claimed: Vec<ClaimedCallback> = self
            .messenger
            .call(
                Method::POST,
                CLAIM_PATH,
                &CallbackClaimRequest {
                    worker: self.worker.clone(),
                    limit: Some(self.settings.batch_size),
                    lease_seconds: Some((self.settings.timeout_ms / 1000 + 30).min(3600)),
                },
                Some(&round),
            )
            .await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let count = claimed.len();
        let outcomes: Vec<CallbackOutcome> = futures::stream::iter(claimed)
            .map(|c| self.deliver(c))
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;
        self.report(outcomes, &round).await?;
        Ok(count)
    }

    /// Reports, retrying a few times while the API is away (unreported callbacks are claimed
    /// again when their lease ends, and sent again: receivers deduplicate by `webhook-id`).
    async fn report(&self, outcomes: Vec<CallbackOutcome>, round: &str) -> anyhow::Result<()> {
        let body = CallbackReport { items: outcomes };
        let mut wait = Duration::from_millis(200);
        for attempt in 1..=5 {
            match self
                .messenger
                .call::<_, CallbackReportResults>(Method::POST, REPORT_PATH, &body, Some(round))
                .await
            {
                Ok(_) => return Ok(()),
                Err(error) if attempt == 5 => return Err(error.into()),
                Err(error) => {
                    tracing::warn!(error = %telemetry::Chain(&error), attempt, "could not report callbacks; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
        Ok(())
    }

    fn outcome(&self, c: &ClaimedCallback, result: CallbackResultKind) -> CallbackOutcome {
        self.counted
            .with_label_values(&[match result {
                CallbackResultKind::Delivered => "delivered",
                CallbackResultKind::Failed => "failed",
                CallbackResultKind::Refused => "refused",
                CallbackResultKind::Deferred => "deferred",
            }])
            .inc();
        CallbackOutcome {
            id: c.id.clone(),
            claim_token: c.claim_token.clone(),
            result,
            status_code: None,
            error: None,
            retry_after_seconds: None,
            defer_until: None,
            duration_ms: None,
        }
    }

    /// One callback: the address check, the host's pause and rate, the POST.
    pub async fn deliver(&self, c: ClaimedCallback) -> CallbackOutcome {
        let url = match reqwest::Url::parse(&c.url) {
            Ok(url) => url,
            Err(e) => {
                return CallbackOutcome {
                    error: Some(format!("not a URL: {e}")),
                    ..self.outcome(&c, CallbackResultKind::Refused)
                }
            }
        };
        if let Err(refused) = self.check_literal(&url) {
            return CallbackOutcome {
                error: Some(refused.0),
                ..self.outcome(&c, CallbackResultKind::Refused)
            };
        }
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        if let Some(until) = self.held(&host).await {
            return CallbackOutcome {
                defer_until: Some(until),
                ..self.outcome(&c, CallbackResultKind::Deferred)
            };
        }
        let timestamp = chrono::Utc::now().timestamp();
        let mut request = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &c.id)
            .header("webhook-timestamp", timestamp.to_string())
            .body(c.body.clone());
        if !self.keys.is_empty() {
            request = request.header("webhook-signature", self.keys.sign(&c.id, timestamp, &c.body));
        }
        let started = Instant::now();
        let answer = request.send().await;
        let duration_ms = Some(started.elapsed().as_millis() as u64);
        match answer {
            Ok(response) if response.status().is_success() => {
                self.host_succeeded(&host).await;
                CallbackOutcome {
                    status_code: Some(response.status().as_u16()),
                    duration_ms,
                    ..self.outcome(&c, CallbackResultKind::Delivered)
                }
            }
            Ok(response) => {
                let status = response.status();
                let retry_after = webhook_client::parse_retry_after(response.headers(), std::time::SystemTime::now())
                    .map(|d| d.as_secs().max(1));
                let text = response.text().await.unwrap_or_default();
                let pause = match status.as_u16() {
                    429 | 503 => retry_after.map(Duration::from_secs),
                    _ => None,
                };
                self.host_failed(&host, pause).await;
                CallbackOutcome {
                    status_code: Some(status.as_u16()),
                    error: Some(format!("HTTP {status}: {}", text.chars().take(200).collect::<String>())),
                    retry_after_seconds: retry_after,
                    duration_ms,
                    ..self.outcome(&c, CallbackResultKind::Failed)
                }
            }
            Err(error) => {
                if let Some(refused) = refusal(&error) {
                    return CallbackOutcome {
                        error: Some(refused.0.clone()),
                        ..self.outcome(&c, CallbackResultKind::Refused)
                    };
                }
                self.host_failed(&host, None).await;
                CallbackOutcome {
                    error: Some(telemetry::Chain(&error).to_string()),
                    duration_ms,
                    ..self.outcome(&c, CallbackResultKind::Failed)
                }
            }
        }
    }

    /// An IP-literal host is checked here (the client does not resolve it).
    fn check_literal(&self, url: &reqwest::Url) -> Result<(), Refused> {
        let host = url.host_str().ok_or_else(|| Refused("the URL has no host".into()))?;
        match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
        {
            Ok(ip) => self.policy.check_addresses(host, &[ip]),
            Err(_) => Ok(()),
        }
    }

    fn key(&self, kind: &str, host: &str) -> String {
        format!("{}callback_{kind}:{{{host}}}", self.prefix)
    }

    /// Until when `host` is not sent to: its pause, or its next slot of the rate when that is
    /// more than a second away. A Redis failure holds nothing back.
    async fn held(&self, host: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        let mut redis = self.redis.clone();
        let paused: Result<Option<i64>, _> = redis::cmd("GET")
            .arg(self.key("pause", host))
            .query_async(&mut redis)
            .await;
        match paused {
            Ok(Some(until_ms)) if until_ms > chrono::Utc::now().timestamp_millis() => {
                return chrono::DateTime::from_timestamp_millis(until_ms);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(error = %error, host, "could not read a callback host's pause; sending"),
        }
        if self.settings.rate_per_second <= 0.0 {
            return None;
        }
        let interval = Duration::from_secs_f64(1.0 / self.settings.rate_per_second);
        let ask = Ask {
            interval,
            tolerance: interval * self.settings.burst.saturating_sub(1),
            max_wait: Duration::from_secs(1),
            worker: &self.worker,
            floor: Duration::ZERO,
        };
        let gcra = Gcra::new(&self.prefix, "callback_rate", host);
        match gcra.reserve(&self.redis, ask, Duration::from_millis(250)).await {
            Ok(r) if r.reserved => {
                tokio::time::sleep(r.wait).await;
                None
            }
            Ok(r) => Some(chrono::Utc::now() + chrono::Duration::from_std(r.wait).unwrap_or_default()),
            Err(error) => {
                tracing::warn!(error = %telemetry::Chain(&error), host, "callback rate limit unavailable; sending");
                None
            }
        }
    }

    async fn host_succeeded(&self, host: &str) {
        let mut redis = self.redis.clone();
        let _: Result<(), _> = redis::cmd("DEL")
            .arg(self.key("fails", host))
            .query_async(&mut redis)
            .await;
    }

    /// Counts a failure in the host's streak; pauses it for `pause` (a `Retry-After`), or for
    /// `pause_seconds` when the streak reaches `pause_after_failures`.
    async fn host_failed(&self, host: &str, pause: Option<Duration>) {
        let mut redis = self.redis.clone();
        let fails_key = self.key("fails", host);
        let streak: Result<(i64,), _> = redis::pipe()
            .cmd("INCR")
            .arg(&fails_key)
            .cmd("PEXPIRE")
            .arg(&fails_key)
            .arg(600_000)
            .ignore()
            .query_async(&mut redis)
            .await;
        let threshold = self.settings.pause_after_failures;
        let pause = match (pause, streak) {
            (Some(wait), _) => Some(wait.min(self.max_retry_after)),
            (None, Ok((n,))) if threshold > 0 && n >= i64::from(threshold) => {
                Some(Duration::from_secs(self.settings.pause_seconds))
            }
            _ => None,
        };
        let Some(pause) = pause.filter(|p| !p.is_zero()) else {
            return;
        };
        let until = chrono::Utc::now().timestamp_millis() + pause.as_millis() as i64;
        let set: Result<(), _> = redis::cmd("SET")
            .arg(self.key("pause", host))
            .arg(until)
            .arg("PX")
            .arg(pause.as_millis() as u64)
            .query_async(&mut redis)
            .await;
        match set {
            Ok(()) => {
                self.counted.with_label_values(&["host_paused"]).inc();
                tracing::warn!(host, seconds = pause.as_secs(), "callbacks to this host paused");
            }
            Err(error) => tracing::warn!(error = %error, host, "could not pause a callback host"),
        }
    }
}
