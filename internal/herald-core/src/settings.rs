//! Typed settings for every role, loaded with [`layered_config`] and validated once at start-up.

use std::path::Path;
use std::time::Duration;

use layered_config::{ExposeSecret, Layers};
pub use layered_config::{SecretString, Source};

use crate::auth::{ApiKeys, KeySecret, KeySpec, Refusal, Scope, Scopes};
use serde::{Deserialize, Serialize, Serializer};

use crate::providers::{redact_opt, ProviderSettings, RouteSettings, Routing};

/// Environment-variable prefix: `HERALD__SECTION__KEY`.
pub const ENV_PREFIX: &str = "HERALD";

/// Keys whose environment value is a comma-separated list.
pub const LIST_KEYS: &[&str] = &[
    "auth.api_keys",
    "delivery.retry_schedule_seconds",
    "callbacks.secret",
    "callbacks.allowed_hosts",
    "callbacks.retry_schedule_seconds",
];

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// MongoDB connection.
    pub mongo: MongoSettings,
    /// Redis connection and cache keys.
    pub redis: RedisSettings,
    /// The Messenger API role.
    pub messenger_api: MessengerApiSettings,
    /// The Job Scheduler role.
    pub job_scheduler: JobSchedulerSettings,
    /// The local provider stand-in role.
    pub webhook_sink: WebhookSinkSettings,
    /// The provider webhook.
    pub webhook: WebhookSettings,
    /// Retry policy.
    pub delivery: DeliverySettings,
    /// Message validation.
    pub message: MessageSettings,
    /// API keys.
    pub auth: AuthSettings,
    /// Logging.
    pub telemetry: TelemetrySettings,
    /// The live event feed (SSE and WebSocket).
    pub events: EventsSettings,
    /// How long final messages are kept.
    pub retention: RetentionSettings,
    /// Delivery receipts.
    pub receipts: ReceiptsSettings,
    /// Status callbacks out.
    pub callbacks: CallbacksSettings,
    /// Providers (`[[providers]]`); none means `[webhook]` is the one provider, `default`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderSettings>,
    /// Routes by destination prefix (`[[routes]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSettings>,
}

/// `[mongo]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSettings {
    /// Connection string; secret because it may carry a password.
    #[serde(serialize_with = "redact_url")]
    pub uri: SecretString,
    /// Database name.
    pub database: String,
    /// How long an operation waits to find a usable server, in milliseconds.
    pub server_selection_timeout_ms: u64,
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// How Redis is deployed: one node, a master watched by Sentinels, or a Cluster.
    pub mode: RedisMode,
    /// Connection URL; with `sentinel` or `cluster`, comma-separated URLs of the Sentinels or of
    /// some cluster nodes. Secret because it may carry a password.
    #[serde(serialize_with = "redact_urls")]
    pub url: SecretString,
    /// The master's name as the Sentinels know it (`sentinel monitor <name> …`).
    pub sentinel_master: String,
    /// Prefix of every key.
    pub key_prefix: String,
    /// TTL of the sent-message cache entry, in seconds.
    pub sent_ttl_seconds: u64,
    /// Connect and response timeout, in milliseconds.
    pub timeout_ms: u64,
}

/// `redis.mode`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One Redis server at `redis.url`.
    #[default]
    Standalone,
    /// The master the Sentinels at `redis.url` name `redis.sentinel_master`, followed through
    /// failovers.
    Sentinel,
    /// A Redis Cluster reached through the nodes at `redis.url`.
    Cluster,
}

impl RedisSettings {
    /// The URLs in `redis.url` (one, or comma-separated with `sentinel` and `cluster`).
    pub fn urls(&self) -> Vec<String> {
        self.url
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// `[messenger_api]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MessengerApiSettings {
    /// Bind address.
    pub host: String,
    /// Bind port (0 = any free port).
    pub port: u16,
    /// Where the scheduler reaches the API.
    pub url: String,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// How often the maintained counts by status are checked against a full count, in seconds.
    pub count_reconcile_seconds: u64,
    /// A connection with no byte read or written for this long is closed, in seconds.
    pub idle_timeout_seconds: u64,
    /// Creates are refused (429) while pending and processing messages would exceed this
    /// (0 = never).
    pub max_due_backlog: u64,
    /// The key the toggle presents to the Job Scheduler (needs `operator`); empty = the first
    /// of `auth.api_keys`.
    #[serde(serialize_with = "redact")]
    pub scheduler_key: SecretString,
}

/// `[job_scheduler]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobSchedulerSettings {
    /// Bind address.
    pub host: String,
    /// Bind port (0 = any free port).
    pub port: u16,
    /// Where the API's toggle reaches the scheduler.
    pub url: String,
    /// Cron expression with seconds, UTC.
    pub schedule: String,
    /// Messages claimed per run.
    pub batch_size: u32,
    /// Sends in flight at once within a run.
    pub concurrency: u32,
    /// Run once immediately when the job starts.
    pub run_on_start: bool,
    /// How long a claim is held, in seconds.
    pub lease_seconds: u64,
    /// Worker id of this replica; empty = generated.
    pub worker_id: String,
    /// How long run history is kept, in days.
    pub run_history_days: u64,
    /// After a full batch, keep claiming and sending without waiting for the next tick.
    pub drain: bool,
    /// In drain mode, how often an idle replica looks for due messages, in milliseconds.
    pub idle_poll_ms: u64,
    /// A connection with no byte read or written for this long is closed, in seconds.
    pub idle_timeout_seconds: u64,
    /// Largest accepted request body, in bytes (its routes take small control bodies).
    pub max_body_bytes: usize,
    /// The key the scheduler presents to the Messenger API (needs `worker`); empty = the first
    /// of `auth.api_keys`.
    #[serde(serialize_with = "redact")]
    pub api_key: SecretString,
}

/// `[webhook_sink]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSinkSettings {
    /// Bind address.
    pub host: String,
    /// Bind port (0 = any free port).
    pub port: u16,
    /// Added latency, in milliseconds.
    pub latency_ms: u64,
    /// Share of requests that fail, 0.0..=1.0.
    pub fail_rate: f64,
    /// Status of an injected failure.
    pub status: u16,
}

/// `[webhook]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Provider endpoint.
    pub url: String,
    /// Header carrying the auth key.
    pub auth_header: String,
    /// The auth key.
    #[serde(serialize_with = "redact")]
    pub auth_key: SecretString,
    /// Total request timeout, in milliseconds.
    pub timeout_ms: u64,
    /// Connect timeout, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Longest honoured `Retry-After`, in seconds; also the longest provider pause.
    pub max_retry_after_seconds: u64,
    /// Sends per second shared by every replica (0 = no limit).
    pub rate_limit_per_second: f64,
    /// Sends allowed at once on top of the steady rate (at least 1).
    pub rate_limit_burst: u32,
    /// With Redis unreachable, each replica sends `1/n` of the limit, `n` being the replicas it
    /// last saw using the limiter, or this many when it never saw any.
    pub rate_limit_fallback_replicas: u32,
    /// Consecutive retryable failures (across replicas) that pause sending (0 = never).
    pub pause_after_failures: u32,
    /// First pause after a failure streak, in seconds; each further one in a row doubles.
    pub pause_seconds: u64,
    /// Delivery receipts of this provider (`default`), when it sends them
    /// (`[webhook.receipts]`; with `[[providers]]`, each has its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipts: Option<crate::receipts::ReceiptSettings>,
}

/// `[delivery]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    /// Delay before retry n, in seconds.
    #[serde(deserialize_with = "layered_config::one_or_many")]
    pub retry_schedule_seconds: Vec<u64>,
    /// Random spread of each delay, in percent.
    pub jitter_percent: u32,
}

/// `[message]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MessageSettings {
    /// Content limit in Unicode characters.
    pub max_chars: usize,
    /// How far ahead `sendAt` may be, in days.
    pub max_schedule_days: u64,
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Legacy bearer keys, each with every scope; the first is presented to the other service
    /// when `job_scheduler.api_key` or `messenger_api.scheduler_key` is empty.
    #[serde(
        default,
        deserialize_with = "layered_config::one_or_many",
        serialize_with = "redact_all"
    )]
    pub api_keys: Vec<SecretString>,
    /// Named keys with scopes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeySettings>,
}

/// `[[auth.keys]]`: one named key and what it may do.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeySettings {
    /// Its name: in logs, the audit and 403 errors.
    pub name: String,
    /// Hex SHA-256 digest of the key (`herald key new` prints it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The key itself: only in the `local` and `test` environments.
    #[serde(default, serialize_with = "redact_opt", skip_serializing_if = "Option::is_none")]
    pub key: Option<SecretString>,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// Creates per second this key may make, across replicas (0 = no limit).
    #[serde(default)]
    pub rate_per_second: f64,
    /// Creates it may make at once before the rate applies.
    #[serde(default = "one")]
    pub burst: u32,
}

fn one() -> u32 {
    1
}

impl KeySettings {
    /// A key named `name` holding `scopes`, with no secret yet and no create rate.
    pub fn new(name: impl Into<String>, scopes: Vec<Scope>) -> Self {
        Self {
            name: name.into(),
            sha256: None,
            key: None,
            scopes,
            rate_per_second: 0.0,
            burst: one(),
        }
    }
}

/// The environments where `[[auth.keys]]` may hold a plaintext `key`.
pub const PLAINTEXT_KEY_ENVIRONMENTS: [&str; 2] = ["local", "test"];

/// `[telemetry]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// `pretty` or `json`.
    pub format: telemetry::LogFormat,
    /// Default log filter.
    pub filter: String,
}

/// `[events]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSettings {
    /// Events queued per subscriber before a slow consumer is cut off.
    pub subscriber_buffer: usize,
    /// Live subscriptions (SSE and WebSocket) one key may hold on one replica.
    pub max_subscribers_per_key: usize,
    /// Interval of the SSE heartbeat comment, in seconds.
    pub sse_heartbeat_seconds: u64,
    /// Interval of WebSocket pings, in seconds; two missed pongs close the socket.
    pub ws_ping_seconds: u64,
    /// How long a WebSocket client has to send its `{"auth"}` frame, in seconds.
    pub ws_auth_timeout_seconds: u64,
}

/// `[retention]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Sent messages older than this many days (by `sentAt`) are removed; 0 keeps them forever.
    pub sent_days: u64,
    /// Failed and expired messages older than this many days (since they ended) are removed;
    /// 0 keeps them forever.
    pub failed_days: u64,
    /// How often the retention sweep runs, in seconds.
    pub sweep_seconds: u64,
}

/// `[receipts]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptsSettings {
    /// A message sent through a provider that takes receipts and without a final one after this
    /// many hours gets delivery state `unknown`.
    pub timeout_hours: f64,
    /// How often that sweep runs, in seconds.
    pub sweep_seconds: u64,
    /// Receipts applied at once per Messenger API replica; one more is answered 503 with
    /// `Retry-After` (providers send it again), so a flood of receipts cannot starve the drain.
    pub max_in_flight: usize,
}

/// `[callbacks]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallbacksSettings {
    /// The callback URL of a message created without `callbackUrl` ("" = none).
    pub default_url: String,
    /// `whsec_` secrets callbacks are signed with, each one (rotation: new beside old).
    #[serde(
        default,
        deserialize_with = "layered_config::one_or_many",
        serialize_with = "redact_all"
    )]
    pub secret: Vec<SecretString>,
    /// Hosts a callback may reach over `http` and at a private or loopback address.
    #[serde(default, deserialize_with = "layered_config::one_or_many")]
    pub allowed_hosts: Vec<String>,
    /// Only hosts in `allowed_hosts` may be called back at all.
    pub restrict_to_allowed_hosts: bool,
    /// Delay before retry n, in seconds; dead-lettered after the last.
    #[serde(deserialize_with = "layered_config::one_or_many")]
    pub retry_schedule_seconds: Vec<u64>,
    /// Total time of one POST, in milliseconds.
    pub timeout_ms: u64,
    /// POSTs per second to one host, shared by every replica (0 = no limit).
    pub rate_per_second: f64,
    /// POSTs to one host at once on top of the steady rate.
    pub burst: u32,
    /// Failures in a row to one host that pause it (0 = never).
    pub pause_after_failures: u32,
    /// How long such a pause lasts, in seconds (a `Retry-After` on 429/503 pauses as long).
    pub pause_seconds: u64,
    /// How often each Job Scheduler replica looks for due callbacks, in milliseconds.
    pub poll_ms: u64,
    /// Most callbacks one look claims.
    pub batch_size: u32,
    /// POSTs in flight at once per replica.
    pub concurrency: usize,
    /// Delivered callbacks are removed this many days after delivery (dead ones are kept).
    pub keep_days: u64,
}

impl CallbacksSettings {
    /// The signing keys.
    pub fn signing_keys(&self) -> Result<crate::callbacks::SigningKeys, crate::callbacks::BadSecret> {
        crate::callbacks::SigningKeys::parse(&self.secret)
    }

    /// The URL rules.
    pub fn url_policy(&self) -> crate::callbacks::UrlPolicy {
        crate::callbacks::UrlPolicy::new(&self.allowed_hosts, self.restrict_to_allowed_hosts)
    }
}

impl Settings {
    /// The providers that take delivery receipts, by name: each `[[providers]]` with its
    /// `[providers.receipts]`, or without `[[providers]]` the one `[webhook]` (`default`) with
    /// its `[webhook.receipts]`.
    pub fn receipt_providers(&self) -> Vec<(String, crate::receipts::ReceiptSettings)> {
        if self.providers.is_empty() {
            return self
                .webhook
                .receipts
                .clone()
                .map(|r| (crate::providers::DEFAULT_PROVIDER.to_owned(), r))
                .into_iter()
                .collect();
        }
        self.providers
            .iter()
            .filter_map(|p| p.receipts.clone().map(|r| (p.name.clone(), r)))
            .collect()
    }
}

/// The shipped configuration files, compiled in: the binary runs from any folder, and files in
/// the configuration folder override them key by key.
const BUILTIN: &[(&str, &str)] = &[
    ("default", include_str!("../../../configs/default.toml")),
    ("local", include_str!("../../../configs/local.toml")),
    ("docker", include_str!("../../../configs/docker.toml")),
    ("test", include_str!("../../../configs/test.toml")),
    ("production", include_str!("../../../configs/production.toml")),
];

/// Added to a lease and a send's timeout to bound a Stop's wait.
const STOP_MARGIN: Duration = Duration::from_secs(10);
/// Added to the stop wait for the toggle's own calls (state writes, status reads, the request).
const TOGGLE_MARGIN: Duration = Duration::from_secs(5);

/// What a secret shows when the configuration is printed.
const REDACTED: &str = "<redacted>";

fn redact<S: Serializer>(_: &SecretString, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(REDACTED)
}

fn redact_all<S: Serializer>(secrets: &[SecretString], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(secrets.iter().map(|_| REDACTED))
}

/// A connection string with any password in it replaced: the host stays readable.
fn redact_url<S: Serializer>(url: &SecretString, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redacted_url(url.expose_secret()))
}

/// `redis.url`: one URL, or several comma-separated, each redacted.
fn redact_urls<S: Serializer>(url: &SecretString, serializer: S) -> Result<S::Ok, S::Error> {
    let each: Vec<String> = url.expose_secret().split(',').map(redacted_url).collect();
    serializer.serialize_str(&each.join(","))
}

fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return REDACTED.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let tail = if tail.contains('=') { "/?<redacted>" } else { tail };
            format!("{scheme}://{user}:{REDACTED}@{hosts}{tail}")
        }
        None if tail.contains('=') => format!("{scheme}://{authority}/?{REDACTED}"),
        None => url.to_owned(),
    }
}

/// A configuration that loaded but breaks a rule. One line, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct InvalidSettings(pub String);

impl Settings {
    /// Loads `default.toml`, `<env>.toml` and `HERALD__*` variables from `dir`, then validates.
    pub fn load(dir: &Path, env: &str) -> Result<Self, anyhow::Error> {
        Self::load_with_env(dir, env, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment (for tests).
    pub fn load_with_env<I>(dir: &Path, env: &str, vars: I) -> Result<Self, anyhow::Error>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        Self::load_traced(dir, env, vars).map(|(settings, _)| settings)
    }

    /// Like [`Settings::load_with_env`], also saying which layers were read, in order: the
    /// built-in files, the files found in `dir`, the environment variables.
    pub fn load_traced<I>(dir: &Path, env: &str, vars: I) -> Result<(Self, Vec<Source>), anyhow::Error>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut layers = Layers::new(dir, env, ENV_PREFIX);
        for key in LIST_KEYS {
            layers = layers.list_key(key);
        }
        for (name, text) in BUILTIN {
            layers = layers.builtin(name, text);
        }
        let (settings, sources): (Settings, _) = layers.load_traced(vars)?;
        settings.validate()?;
        settings.reject_plaintext_keys(env)?;
        if env == "production" {
            settings.reject_development_secrets()?;
        }
        Ok((settings, sources))
    }

    /// The effective configuration as TOML, every secret redacted, followed by the effective
    /// providers and routes as comments (`[webhook]` alone shows as provider `default`).
    pub fn to_redacted_toml(&self) -> String {
        // Every field is a plain value, a list or a table: this cannot fail.
        let mut text =
            toml::to_string(self).unwrap_or_else(|error| format!("# cannot print the configuration: {error}\n"));
        if let Ok(routing) = Routing::from_settings(self) {
            text.push_str("\n# Effective providers and routes (longest prefix first):\n");
            for provider in routing.providers() {
                let line = serde_json::to_string(&provider.summary()).unwrap_or_default();
                text.push_str(&format!("# provider {line}\n"));
            }
            for route in routing.routes() {
                let line = serde_json::to_string(route).unwrap_or_default();
                text.push_str(&format!("# route {line}\n"));
            }
        }
        text
    }

    /// Checks every cross-field and range rule.
    pub fn validate(&self) -> Result<(), InvalidSettings> {
        let fail = |msg: String| Err(InvalidSettings(msg));
        let js = &self.job_scheduler;
        let routing = Routing::from_settings(self)?;
        let longest = routing.longest_timeout().as_millis() as u64;
        if js.lease_seconds * 1000 <= longest + 5000 {
            return fail(format!(
                "job_scheduler.lease_seconds must exceed webhook.timeout_ms + 5 s ({} s is not more than {} ms)",
                js.lease_seconds,
                longest + 5000
            ));
        }
        if !(1..=500).contains(&js.batch_size) {
            return fail(format!("job_scheduler.batch_size ({}) must be 1..=500", js.batch_size));
        }
        if !(1..=64).contains(&js.concurrency) {
            return fail(format!("job_scheduler.concurrency ({}) must be 1..=64", js.concurrency));
        }
        if js.lease_seconds > 3600 {
            return fail("job_scheduler.lease_seconds must be at most 3600".into());
        }
        let ev = &self.events;
        if !(1..=65_536).contains(&ev.subscriber_buffer) {
            return fail(format!(
                "events.subscriber_buffer ({}) must be 1..=65536",
                ev.subscriber_buffer
            ));
        }
        let cb = &self.callbacks;
        if cb.signing_keys().is_err() {
            return fail("callbacks.secret: each must be `whsec_` followed by base64 of at least 16 bytes".into());
        }
        if !cb.default_url.trim().is_empty() {
            if let Err(refused) = cb.url_policy().check_url(&cb.default_url) {
                return fail(format!("callbacks.default_url: {refused}"));
            }
        }
        if cb.retry_schedule_seconds.is_empty()
            || cb.timeout_ms == 0
            || cb.poll_ms == 0
            || !(1..=crate::callbacks::MAX_BATCH as u32).contains(&cb.batch_size)
            || !(1..=64).contains(&cb.concurrency)
            || cb.rate_per_second < 0.0
            || cb.burst == 0
        {
            return fail(
                "callbacks: retry_schedule_seconds needs a step, timeout_ms and poll_ms must be positive, batch_size 1..=200, concurrency 1..=64, rate_per_second >= 0, burst >= 1".into(),
            );
        }
        if self.receipts.max_in_flight == 0 {
            return fail("receipts.max_in_flight must be at least 1".into());
        }
        if !(0.0001..=8760.0).contains(&self.receipts.timeout_hours) || self.receipts.sweep_seconds == 0 {
            return fail(
                "receipts.timeout_hours must be more than 0 up to 8760 and receipts.sweep_seconds positive".into(),
            );
        }
        if !(1..=100_000).contains(&ev.max_subscribers_per_key) {
            return fail("events.max_subscribers_per_key must be 1..=100000".into());
        }
        if ev.sse_heartbeat_seconds == 0 || ev.ws_ping_seconds == 0 || ev.ws_auth_timeout_seconds == 0 {
            return fail(
                "events.sse_heartbeat_seconds, events.ws_ping_seconds and events.ws_auth_timeout_seconds must be positive"
                    .into(),
            );
        }
        if !(10..=60_000).contains(&js.idle_poll_ms) {
            return fail(format!(
                "job_scheduler.idle_poll_ms ({}) must be 10..=60000",
                js.idle_poll_ms
            ));
        }
        if js.run_history_days == 0 {
            return fail("job_scheduler.run_history_days must be at least 1".into());
        }
        if js.schedule.split_whitespace().count() < 6 {
            return fail(format!(
                "job_scheduler.schedule ({:?}) must be a cron expression with seconds (6 or 7 fields)",
                js.schedule
            ));
        }
        for (key, url) in [
            ("messenger_api.url", &self.messenger_api.url),
            ("job_scheduler.url", &self.job_scheduler.url),
            ("webhook.url", &self.webhook.url),
        ] {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return fail(format!("{key} ({url:?}) must be an http:// or https:// URL"));
            }
        }
        if self.webhook.timeout_ms == 0 || self.webhook.connect_timeout_ms == 0 {
            return fail("webhook.timeout_ms and webhook.connect_timeout_ms must be positive".into());
        }
        if poem::http::HeaderName::from_bytes(self.webhook.auth_header.as_bytes()).is_err() {
            return fail(format!(
                "webhook.auth_header ({:?}) must be a valid HTTP header name",
                self.webhook.auth_header
            ));
        }
        if poem::http::HeaderValue::from_str(self.webhook.auth_key.expose_secret()).is_err() {
            // The value is a secret: named, never shown.
            return fail(
                "webhook.auth_key must be a valid HTTP header value (no control characters such as line breaks)".into(),
            );
        }
        if self.delivery.retry_schedule_seconds.is_empty() {
            return fail("delivery.retry_schedule_seconds must list at least one delay".into());
        }
        if self.delivery.jitter_percent > 100 {
            return fail("delivery.jitter_percent must be 0..=100".into());
        }
        if self.message.max_chars == 0 {
            return fail("message.max_chars must be at least 1".into());
        }
        if !(1..=3650).contains(&self.message.max_schedule_days) {
            return fail("message.max_schedule_days must be 1..=3650".into());
        }
        let rt = &self.retention;
        if rt.sent_days > 36_500 || rt.failed_days > 36_500 {
            return fail("retention.sent_days and retention.failed_days must be 0 (keep forever) up to 36500".into());
        }
        if !(1..=86_400).contains(&rt.sweep_seconds) {
            return fail(format!(
                "retention.sweep_seconds ({}) must be 1..=86400",
                rt.sweep_seconds
            ));
        }
        if !(1..=604_800).contains(&self.messenger_api.count_reconcile_seconds) {
            return fail(format!(
                "messenger_api.count_reconcile_seconds ({}) must be 1..=604800",
                self.messenger_api.count_reconcile_seconds
            ));
        }
        let wh = &self.webhook;
        if !(0.0..=1_000_000.0).contains(&wh.rate_limit_per_second) {
            return fail(format!(
                "webhook.rate_limit_per_second ({}) must be 0 (off) up to 1000000",
                wh.rate_limit_per_second
            ));
        }
        if !(1..=100_000).contains(&wh.rate_limit_burst) {
            return fail("webhook.rate_limit_burst must be 1..=100000".into());
        }
        if !(1..=1000).contains(&wh.rate_limit_fallback_replicas) {
            return fail("webhook.rate_limit_fallback_replicas must be 1..=1000".into());
        }
        if wh.pause_seconds == 0 || wh.max_retry_after_seconds == 0 {
            return fail("webhook.pause_seconds and webhook.max_retry_after_seconds must be positive".into());
        }
        self.check_keys()?;
        if !(0.0..=1.0).contains(&self.webhook_sink.fail_rate) {
            return fail("webhook_sink.fail_rate must be 0.0..=1.0".into());
        }
        if !(100..=599).contains(&self.webhook_sink.status) {
            return fail("webhook_sink.status must be an HTTP status (100..=599)".into());
        }
        if self.redis.sent_ttl_seconds == 0 {
            return fail("redis.sent_ttl_seconds must be positive".into());
        }
        let urls = self.redis.urls();
        if urls.is_empty() {
            return fail("redis.url must name at least one server".into());
        }
        if self.redis.mode == RedisMode::Standalone && urls.len() > 1 {
            return fail("redis.url lists several servers: set redis.mode to \"sentinel\" or \"cluster\"".into());
        }
        if self.redis.key_prefix.contains(['{', '}']) {
            return fail(
                "redis.key_prefix must not contain { or }: Herald's own hash tags place keys in Redis Cluster slots"
                    .into(),
            );
        }
        if self.redis.mode == RedisMode::Sentinel && self.redis.sentinel_master.trim().is_empty() {
            return fail("redis.sentinel_master must name the master the Sentinels watch".into());
        }
        // A handler may run silently up to the toggle's wait (the API) or the stop wait (the
        // scheduler's stop); the live feed writes at its heartbeat and ping intervals.
        let api_silent = self
            .toggle_timeout()
            .as_secs()
            .max(self.events.sse_heartbeat_seconds)
            .max(self.events.ws_ping_seconds);
        if self.messenger_api.idle_timeout_seconds <= api_silent {
            return fail(format!(
                "messenger_api.idle_timeout_seconds must exceed the toggle's wait and the live feed's heartbeat and ping ({} s is not more than {api_silent} s)",
                self.messenger_api.idle_timeout_seconds
            ));
        }
        let scheduler_silent = self.stop_wait().as_secs();
        if self.job_scheduler.idle_timeout_seconds <= scheduler_silent {
            return fail(format!(
                "job_scheduler.idle_timeout_seconds must exceed the stop wait ({} s is not more than {scheduler_silent} s)",
                self.job_scheduler.idle_timeout_seconds
            ));
        }
        if self.messenger_api.max_body_bytes < 1024 {
            return fail("messenger_api.max_body_bytes must be at least 1024".into());
        }
        if self.job_scheduler.max_body_bytes < 1024 {
            return fail("job_scheduler.max_body_bytes must be at least 1024".into());
        }
        Ok(())
    }

    /// Outside `local` and `test`, a key is configured by its digest only.
    fn reject_plaintext_keys(&self, env: &str) -> Result<(), InvalidSettings> {
        match self.auth.keys.iter().find(|k| k.key.is_some()) {
            Some(plain) if !PLAINTEXT_KEY_ENVIRONMENTS.contains(&env) => Err(InvalidSettings(format!(
                "auth.keys {:?} holds a plaintext key, accepted only in {PLAINTEXT_KEY_ENVIRONMENTS:?}: give its sha256 (herald key new)",
                plain.name
            ))),
            _ => Ok(()),
        }
    }

    /// In production the development secrets shipped in `default.toml` must be overridden.
    fn reject_development_secrets(&self) -> Result<(), InvalidSettings> {
        if self
            .auth
            .api_keys
            .iter()
            .chain([&self.job_scheduler.api_key, &self.messenger_api.scheduler_key])
            .any(|k| k.expose_secret().starts_with("local-dev-"))
        {
            return Err(InvalidSettings(
                "auth.api_keys still holds the development key; set HERALD__AUTH__API_KEYS".into(),
            ));
        }
        if self.providers.is_empty() && self.webhook.auth_key.expose_secret().starts_with("local-dev-") {
            return Err(InvalidSettings(
                "webhook.auth_key still holds the development key; set HERALD__WEBHOOK__AUTH_KEY".into(),
            ));
        }
        if let Some((i, p)) = self.providers.iter().enumerate().find(|(_, p)| {
            p.auth_key
                .as_ref()
                .is_some_and(|k| k.expose_secret().starts_with("local-dev-"))
        }) {
            return Err(InvalidSettings(format!(
                "providers[{i}].auth_key (provider {:?}) still holds a development key",
                p.name
            )));
        }
        Ok(())
    }

    /// The longest a Stop waits for runs in flight on every replica, this one's included: a
    /// claim's lease, one send's timeout and a margin. By then every claim such a run holds has
    /// lapsed, so waiting longer would protect nothing.
    pub fn stop_wait(&self) -> Duration {
        Duration::from_secs(self.job_scheduler.lease_seconds) + self.longest_send() + STOP_MARGIN
    }

    /// The longest one send may take: the largest timeout of any provider.
    pub fn longest_send(&self) -> Duration {
        Routing::from_settings(self).map_or_else(|_| self.webhook.timeout(), |r| r.longest_timeout())
    }

    /// The providers and routes in effect (validated at load: this only fails on settings
    /// built by hand).
    pub fn routing(&self) -> Result<Routing, InvalidSettings> {
        Routing::from_settings(self)
    }

    /// How long the Messenger API's toggle waits for the Job Scheduler: the whole stop wait and
    /// a margin for the calls around it, so a Stop that was saved is never answered 502 because
    /// the caller gave up first. Derived from [`Settings::stop_wait`], never set apart from it.
    pub fn toggle_timeout(&self) -> Duration {
        self.stop_wait() + TOGGLE_MARGIN
    }

    /// The accepted keys: every `[[auth.keys]]` with its scopes, every legacy `auth.api_keys`
    /// entry with all of them.
    pub fn api_keys(&self) -> Result<ApiKeys, InvalidSettings> {
        let mut specs = Vec::new();
        for (i, key) in self.auth.api_keys.iter().enumerate() {
            specs.push(KeySpec {
                name: format!("api_keys[{i}]"),
                secret: KeySecret::Plain(key),
                scopes: Scopes::all(),
            });
        }
        for key in &self.auth.keys {
            let secret = match (&key.sha256, &key.key) {
                (Some(digest), None) => KeySecret::Sha256(digest),
                (None, Some(plain)) => KeySecret::Plain(plain),
                _ => {
                    return Err(InvalidSettings(format!(
                        "auth.keys {:?} needs exactly one of sha256 and key",
                        key.name
                    )))
                }
            };
            specs.push(KeySpec {
                name: key.name.clone(),
                secret,
                scopes: key.scopes.iter().copied().collect(),
            });
        }
        ApiKeys::from_specs(specs).map_err(InvalidSettings)
    }

    /// What a service logs at start about its keys: the legacy list's deprecation, plaintext keys.
    pub fn key_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if !self.auth.api_keys.is_empty() {
            warnings.push(format!(
                "auth.api_keys is deprecated: its {} key(s) hold every scope; give each client a [[auth.keys]] entry with only its scopes (herald key new)",
                self.auth.api_keys.len()
            ));
        }
        for key in self.auth.keys.iter().filter(|k| k.key.is_some()) {
            warnings.push(format!(
                "auth.keys {:?} is configured in plaintext (accepted in local and test only): use its sha256",
                key.name
            ));
        }
        warnings
    }

    /// The key the Job Scheduler presents to the Messenger API.
    pub fn worker_key(&self) -> &SecretString {
        self.presented(&self.job_scheduler.api_key)
    }

    /// The key the Messenger API's toggle presents to the Job Scheduler.
    pub fn toggle_key(&self) -> &SecretString {
        self.presented(&self.messenger_api.scheduler_key)
    }

    fn presented<'a>(&'a self, set: &'a SecretString) -> &'a SecretString {
        match self.auth.api_keys.first() {
            Some(legacy) if set.expose_secret().is_empty() => legacy,
            _ => set,
        }
    }

    /// Every key well formed, unique in name and digest, and each service's own key accepted
    /// with the scope its calls need.
    fn check_keys(&self) -> Result<(), InvalidSettings> {
        let fail = |m: String| Err(InvalidSettings(m));
        if self.auth.api_keys.iter().any(|k| k.expose_secret().trim().is_empty()) {
            return fail("auth.api_keys must not hold an empty key".into());
        }
        if self.auth.api_keys.is_empty() && self.auth.keys.is_empty() {
            return fail("no key is configured: add [[auth.keys]] (herald key new) or auth.api_keys".into());
        }
        let mut names = std::collections::HashSet::new();
        for key in &self.auth.keys {
            if key.name.trim().is_empty() || !names.insert(key.name.as_str()) {
                return fail(format!(
                    "auth.keys: every key needs its own non-empty name ({:?})",
                    key.name
                ));
            }
            if key.scopes.is_empty() {
                return fail(format!("auth.keys {:?} holds no scope", key.name));
            }
            if key.key.as_ref().is_some_and(|k| k.expose_secret().trim().is_empty()) {
                return fail(format!("auth.keys {:?}: key must not be empty", key.name));
            }
            if !(0.0..=1_000_000.0).contains(&key.rate_per_second) || !(1..=100_000).contains(&key.burst) {
                return fail(format!(
                    "auth.keys {:?}: rate_per_second must be 0 (off) up to 1000000 and burst 1..=100000",
                    key.name
                ));
            }
        }
        let keys = self.api_keys()?;
        for (setting, presented, scope) in [
            ("job_scheduler.api_key", self.worker_key(), Scope::Worker),
            ("messenger_api.scheduler_key", self.toggle_key(), Scope::Operator),
        ] {
            if presented.expose_secret().is_empty() {
                return fail(format!(
                    "{setting} is empty and auth.api_keys holds no key to use instead"
                ));
            }
            if let Err(refusal) = keys.authorize(presented.expose_secret(), scope) {
                let why = match refusal {
                    Refusal::Unknown => "is not one of the accepted keys".to_owned(),
                    Refusal::MissingScope { key, .. } => format!("is the key {key:?}, which lacks {scope}"),
                };
                return fail(format!("{setting} {why}: it needs the {scope} scope"));
            }
        }
        Ok(())
    }
}

impl WebhookSettings {
    /// Total timeout as a [`Duration`].
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn configs() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_shipped_environment_loads_and_validates() {
        let secrets = vars(&[
            ("HERALD__AUTH__API_KEYS", "prod-key"),
            ("HERALD__WEBHOOK__AUTH_KEY", "prod-hook"),
        ]);
        for env in ["local", "test", "docker", "production"] {
            Settings::load_with_env(&configs(), env, secrets.clone()).unwrap_or_else(|e| panic!("{env}: {e}"));
        }
    }

    #[test]
    fn production_refuses_the_development_secrets() {
        let err = Settings::load_with_env(&configs(), "production", vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth.api_keys"), "{err}");
    }

    #[test]
    fn the_defaults_match_the_specification() {
        let s = Settings::load_with_env(&configs(), "local", vec![]).unwrap();
        assert_eq!(s.mongo.uri.expose_secret(), "mongodb://127.0.0.1:27017");
        assert_eq!(s.mongo.database, "herald");
        assert_eq!(s.redis.key_prefix, "herald:");
        assert_eq!(s.redis.sent_ttl_seconds, 604_800);
        assert_eq!(
            (s.messenger_api.port, s.job_scheduler.port, s.webhook_sink.port),
            (3000, 3001, 8090)
        );
        assert_eq!(s.job_scheduler.schedule, "0 */2 * * * *");
        assert_eq!((s.job_scheduler.batch_size, s.job_scheduler.concurrency), (2, 2));
        assert!(s.job_scheduler.run_on_start);
        assert_eq!(s.job_scheduler.lease_seconds, 30);
        assert_eq!(s.webhook.auth_header, "x-ins-auth-key");
        assert_eq!(s.webhook.timeout_ms, 10_000);
        assert_eq!(
            s.delivery.retry_schedule_seconds,
            [5, 300, 1800, 7200, 18000, 36000, 36000]
        );
        assert_eq!(s.message.max_chars, 160);
    }

    fn scoped(name: &str, plain: Option<&str>, sha256: Option<String>, scopes: &[Scope]) -> KeySettings {
        KeySettings {
            sha256,
            key: plain.map(SecretString::from),
            ..KeySettings::new(name, scopes.to_vec())
        }
    }

    #[test]
    fn scoped_keys_are_checked_for_shape_and_for_what_each_service_presents() {
        let base = Settings::load_with_env(&configs(), "test", vars(&[])).unwrap();
        let err = |s: &Settings| s.validate().unwrap_err().0;
        // Only scoped keys: each service must be told its own, with the scope its calls need.
        let mut s = base.clone();
        s.auth.api_keys.clear();
        s.auth
            .keys
            .push(scoped("worker", Some("w-key"), None, &[Scope::Worker]));
        s.auth.keys.push(scoped(
            "ops",
            None,
            Some(crate::auth::digest_hex("o-key")),
            &[Scope::Operator],
        ));
        assert!(err(&s).contains("job_scheduler.api_key is empty"), "{}", err(&s));
        s.job_scheduler.api_key = "o-key".into();
        s.messenger_api.scheduler_key = "o-key".into();
        assert!(
            err(&s).contains("job_scheduler.api_key is the key \"ops\", which lacks worker"),
            "{}",
            err(&s)
        );
        s.job_scheduler.api_key = "w-key".into();
        s.validate().unwrap();
        assert_eq!(s.worker_key().expose_secret(), "w-key");
        assert!(s
            .key_warnings()
            .iter()
            .any(|w| w.contains("\"worker\" is configured in plaintext")));
        s.messenger_api.scheduler_key = "nobody".into();
        assert!(err(&s).contains("messenger_api.scheduler_key is not one of the accepted keys"));
        // Shapes: a digest that is not one, both or neither secret, a name twice, no scope.
        let mut bad = base.clone();
        bad.auth
            .keys
            .push(scoped("d", None, Some("abc".into()), &[Scope::Metrics]));
        assert!(err(&bad).contains("sha256 must be 64 hex"), "{}", err(&bad));
        let mut bad = base.clone();
        bad.auth.keys.push(scoped(
            "both",
            Some("k"),
            Some(crate::auth::digest_hex("k")),
            &[Scope::Metrics],
        ));
        assert!(err(&bad).contains("exactly one of sha256 and key"), "{}", err(&bad));
        let mut bad = base.clone();
        bad.auth.keys.push(scoped("twice", Some("a"), None, &[Scope::Metrics]));
        bad.auth.keys.push(scoped("twice", Some("b"), None, &[Scope::Metrics]));
        assert!(err(&bad).contains("its own non-empty name"), "{}", err(&bad));
        let mut bad = base.clone();
        bad.auth.keys.push(scoped("none", Some("a"), None, &[]));
        assert!(err(&bad).contains("holds no scope"), "{}", err(&bad));
        let mut none = base;
        none.auth.api_keys.clear();
        assert!(err(&none).contains("no key is configured"), "{}", err(&none));
    }

    #[test]
    fn a_plaintext_key_is_refused_outside_local_and_test() {
        let mut s = Settings::load_with_env(&configs(), "test", vars(&[])).unwrap();
        s.auth
            .keys
            .push(scoped("shop", Some("k"), None, &[Scope::MessagesWrite]));
        s.reject_plaintext_keys("test").unwrap();
        s.reject_plaintext_keys("local").unwrap();
        for env in ["docker", "production", "staging"] {
            let e = s.reject_plaintext_keys(env).unwrap_err().0;
            assert!(e.contains("\"shop\" holds a plaintext key"), "{e}");
        }
        s.auth.keys[0] = scoped(
            "shop",
            None,
            Some(crate::auth::digest_hex("k")),
            &[Scope::MessagesWrite],
        );
        s.reject_plaintext_keys("production").unwrap();
        // The redacted print shows the digest (not a secret) and never the plaintext.
        s.auth
            .keys
            .push(scoped("dev", Some("plain-secret"), None, &[Scope::Metrics]));
        let text = s.to_redacted_toml();
        assert!(
            !text.contains("plain-secret") && text.contains("[[auth.keys]]"),
            "{text}"
        );
    }

    #[test]
    fn environment_variables_override_files_and_split_lists() {
        let s = Settings::load_with_env(
            &configs(),
            "local",
            vars(&[
                ("HERALD__MONGO__URI", "mongodb://db.example:27017"),
                ("HERALD__WEBHOOK__URL", "https://provider.example/hook"),
                ("HERALD__AUTH__API_KEYS", "key-one,key-two"),
                ("HERALD__DELIVERY__RETRY_SCHEDULE_SECONDS", "1,2,3"),
                ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "7"),
            ]),
        )
        .unwrap();
        let single = Settings::load_with_env(
            &configs(),
            "local",
            vars(&[("HERALD__DELIVERY__RETRY_SCHEDULE_SECONDS", "9")]),
        )
        .unwrap();
        assert_eq!(single.delivery.retry_schedule_seconds, [9]);
        assert_eq!(s.mongo.uri.expose_secret(), "mongodb://db.example:27017");
        assert_eq!(s.webhook.url, "https://provider.example/hook");
        let keys: Vec<&str> = s.auth.api_keys.iter().map(|k| k.expose_secret()).collect();
        assert_eq!(keys, ["key-one", "key-two"]);
        assert_eq!(s.delivery.retry_schedule_seconds, [1, 2, 3]);
        assert_eq!(s.job_scheduler.batch_size, 7);
    }

    #[test]
    fn a_lease_shorter_than_the_webhook_timeout_is_rejected_by_name() {
        let err = Settings::load_with_env(
            &configs(),
            "local",
            vars(&[("HERALD__JOB_SCHEDULER__LEASE_SECONDS", "12")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("job_scheduler.lease_seconds must exceed webhook.timeout_ms + 5 s"),
            "{err}"
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key() {
        let err = Settings::load_with_env(&configs(), "local", vars(&[("HERALD__MESSENGER_API__PORT", "eighty")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("messenger_api.port"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn out_of_range_values_are_rejected_by_name() {
        for (key, value, named) in [
            ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "0", "job_scheduler.batch_size"),
            ("HERALD__WEBHOOK_SINK__FAIL_RATE", "1.5", "webhook_sink.fail_rate"),
            ("HERALD__TELEMETRY__FORMAT", "xml", "telemetry.format"),
            ("HERALD__WEBHOOK__URL", "ftp://x", "webhook.url"),
            ("HERALD__JOB_SCHEDULER__SCHEDULE", "* * *", "job_scheduler.schedule"),
            ("HERALD__WEBHOOK__AUTH_HEADER", "x auth", "webhook.auth_header"),
            ("HERALD__WEBHOOK__AUTH_HEADER", "", "webhook.auth_header"),
            ("HERALD__WEBHOOK__AUTH_KEY", "zq-secret\nzq", "webhook.auth_key"),
            ("HERALD__WEBHOOK__AUTH_KEY", "zq-secret\u{1}zq", "webhook.auth_key"),
        ] {
            let err = Settings::load_with_env(&configs(), "local", vars(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{key}={value}: {err}");
            assert!(!err.contains("zq-secret"), "a secret was echoed: {err}");
        }
    }

    #[test]
    fn without_a_configuration_folder_the_built_in_files_give_the_same_settings() {
        let nowhere = Path::new("/nonexistent/herald-configs");
        for env in ["local", "docker", "test"] {
            let (built_in, sources) = Settings::load_traced(nowhere, env, vec![]).unwrap();
            let from_files = Settings::load_with_env(&configs(), env, vec![]).unwrap();
            assert_eq!(built_in.to_redacted_toml(), from_files.to_redacted_toml(), "{env}");
            assert!(sources.iter().all(|s| matches!(s, Source::Builtin(_))), "{sources:?}");
        }
        let err = Settings::load_with_env(nowhere, "staging", vec![]).unwrap_err();
        assert!(err.to_string().contains("staging.toml"), "{err}");
    }

    #[test]
    fn the_printed_configuration_redacts_every_secret_and_keeps_hosts() {
        let s = Settings::load_with_env(
            &configs(),
            "local",
            vars(&[
                ("HERALD__WEBHOOK__AUTH_KEY", "zq-hook"),
                ("HERALD__AUTH__API_KEYS", "zq-one,zq-two"),
                (
                    "HERALD__MONGO__URI",
                    "mongodb://app:zq-pw@db1:27017,db2:27017/?replicaSet=rs0",
                ),
                ("HERALD__REDIS__URL", "redis://:zq-redis@cache:6379/0"),
            ]),
        )
        .unwrap();
        let text = s.to_redacted_toml();
        assert!(!text.contains("zq-"), "{text}");
        assert!(
            text.contains("mongodb://app:<redacted>@db1:27017,db2:27017/?<redacted>"),
            "{text}"
        );
        assert!(text.contains("redis://:<redacted>@cache:6379/0"), "{text}");
        assert!(text.contains(r#"api_keys = ["<redacted>", "<redacted>"]"#), "{text}");
        assert!(
            text.contains("[job_scheduler]") && text.contains("batch_size = 2"),
            "{text}"
        );
        // Printed, it loads again as a configuration file.
        assert!(text.parse::<toml::Table>().is_ok());
    }

    #[test]
    fn redis_modes_name_their_servers_and_each_url_is_redacted() {
        let sentinel = Settings::load_with_env(
            &configs(),
            "local",
            vars(&[
                ("HERALD__REDIS__MODE", "sentinel"),
                (
                    "HERALD__REDIS__URL",
                    "redis://:zq-a@s1:26379, redis://:zq-a@s2:26379,redis://:zq-a@s3:26379",
                ),
                ("HERALD__REDIS__SENTINEL_MASTER", "herald-main"),
            ]),
        )
        .unwrap();
        assert_eq!(sentinel.redis.mode, RedisMode::Sentinel);
        assert_eq!(sentinel.redis.urls().len(), 3);
        let text = sentinel.to_redacted_toml();
        assert!(!text.contains("zq-"), "{text}");
        assert!(
            text.contains("redis://:<redacted>@s1:26379, redis://:<redacted>@s2:26379,redis://:<redacted>@s3:26379"),
            "{text}"
        );
        for (vars_given, named) in [
            (
                vec![("HERALD__REDIS__URL", "redis://a:6379,redis://b:6379")],
                "set redis.mode",
            ),
            (vec![("HERALD__REDIS__MODE", "replicated")], "redis.mode"),
            (vec![("HERALD__REDIS__URL", " , ")], "redis.url must name"),
            (vec![("HERALD__REDIS__KEY_PREFIX", "herald:{a}:")], "redis.key_prefix"),
            (
                vec![
                    ("HERALD__REDIS__MODE", "sentinel"),
                    ("HERALD__REDIS__SENTINEL_MASTER", " "),
                ],
                "redis.sentinel_master",
            ),
        ] {
            let err = Settings::load_with_env(&configs(), "local", vars(&vars_given))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{vars_given:?}: {err}");
        }
        let cluster = Settings::load_with_env(
            &configs(),
            "local",
            vars(&[
                ("HERALD__REDIS__MODE", "cluster"),
                ("HERALD__REDIS__URL", "redis://a:7000,redis://b:7001"),
            ]),
        )
        .unwrap();
        assert_eq!(cluster.redis.mode, RedisMode::Cluster);
    }

    #[test]
    fn the_toggle_outwaits_the_longest_stop_in_every_shipped_environment() {
        let secrets = vars(&[
            ("HERALD__AUTH__API_KEYS", "prod-key"),
            ("HERALD__WEBHOOK__AUTH_KEY", "prod-hook"),
        ]);
        for env in ["local", "test", "docker", "production"] {
            let s = Settings::load_with_env(&configs(), env, secrets.clone()).unwrap();
            let lease = Duration::from_secs(s.job_scheduler.lease_seconds);
            assert!(s.stop_wait() >= lease + s.webhook.timeout(), "{env}");
            assert!(s.toggle_timeout() > s.stop_wait(), "{env}");
            // Idle connections are cut only after the longest silent handler.
            assert!(
                Duration::from_secs(s.messenger_api.idle_timeout_seconds) > s.toggle_timeout(),
                "{env}"
            );
            assert!(
                Duration::from_secs(s.job_scheduler.idle_timeout_seconds) > s.stop_wait(),
                "{env}"
            );
        }
        let err = Settings::load_with_env(
            &configs(),
            "local",
            vars(&[("HERALD__JOB_SCHEDULER__LEASE_SECONDS", "120")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("idle_timeout_seconds must exceed"), "{err}");
    }

    #[test]
    fn urls_without_credentials_are_shown_whole() {
        assert_eq!(redacted_url("mongodb://127.0.0.1:27017"), "mongodb://127.0.0.1:27017");
        assert_eq!(redacted_url("redis://cache:6379/2"), "redis://cache:6379/2");
        assert_eq!(redacted_url("not a url"), REDACTED);
        assert_eq!(
            redacted_url("mongodb://h:1/?authSource=admin"),
            format!("mongodb://h:1/?{REDACTED}")
        );
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let s = Settings::load_with_env(
            &configs(),
            "local",
            vars(&[
                ("HERALD__WEBHOOK__AUTH_KEY", "super-secret-webhook"),
                ("HERALD__AUTH__API_KEYS", "super-secret-api"),
                ("HERALD__MONGO__URI", "mongodb://user:super-secret-pw@h:1"),
            ]),
        )
        .unwrap();
        let debug = format!("{s:?}");
        assert!(!debug.contains("super-secret"), "{debug}");
    }
}

#[cfg(test)]
mod reference_tests {
    use std::path::Path;

    /// docs/configuration.md lists every key of configs/default.toml with its default and
    /// environment variable, and no key that does not exist.
    #[test]
    fn the_configuration_reference_matches_default_toml() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let defaults: toml::Table = std::fs::read_to_string(root.join("configs/default.toml"))
            .unwrap()
            .parse()
            .unwrap();
        let doc = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
        let mut documented: Vec<String> = doc
            .lines()
            .filter(|l| l.starts_with("| `") && !l.starts_with("| `configs/"))
            .map(|l| l.split('`').nth(1).unwrap().to_owned())
            .collect();
        let mut expected = Vec::new();
        for (section, keys) in &defaults {
            for (key, value) in keys.as_table().unwrap() {
                let name = format!("{section}.{key}");
                let row = doc
                    .lines()
                    .find(|l| l.starts_with(&format!("| `{name}`")))
                    .unwrap_or_else(|| panic!("docs/configuration.md lacks {name}"));
                let env = format!("`HERALD__{}__{}`", section.to_uppercase(), key.to_uppercase());
                assert!(row.contains(&env), "{name}: {env} missing");
                let shown = match value {
                    toml::Value::String(s) => format!("`\"{s}\"`"),
                    toml::Value::Array(items) => format!(
                        "`[{}]`",
                        items
                            .iter()
                            .map(|v| v.as_str().map(|s| format!("\"{s}\"")).unwrap_or_else(|| v.to_string()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    other => format!("`{other}`"),
                };
                assert!(row.contains(&shown), "{name}: default {shown} not in {row}");
                expected.push(name);
            }
        }
        documented.sort();
        expected.sort();
        assert_eq!(documented, expected, "documented keys differ from configs/default.toml");
    }
}
