//! Providers and routes (SPEC §16): `[[providers]]` and `[[routes]]` as configured, resolved
//! once into the effective [`Provider`]s (`[webhook]` alone is one provider named `default`)
//! and a [`Routing`] that orders the providers a message may go to.

use std::time::Duration;

use layered_config::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};
use webhook_client::{Auth, AuthScheme, Format, Shape, WebhookConfig, HERALD_MESSAGE_ID_POINTER};

use crate::settings::{InvalidSettings, Settings, WebhookSettings};

/// The name `[webhook]` gets as a provider.
pub const DEFAULT_PROVIDER: &str = "default";
/// Most providers one configuration may name (bounds the metrics' `provider` label).
pub const MAX_PROVIDERS: usize = 32;
/// Most routes.
pub const MAX_ROUTES: usize = 1000;

pub(crate) fn redact_opt<S: Serializer>(secret: &Option<SecretString>, serializer: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => serializer.serialize_str("<redacted>"),
        None => serializer.serialize_none(),
    }
}

/// One `[[providers]]` entry. Keys left out take `[webhook]`'s value.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// `[a-z0-9-]{1,32}`, unique.
    pub name: String,
    /// Endpoint.
    pub url: String,
    /// `herald` (default), `json` or `form`.
    #[serde(default)]
    pub format: Format,
    /// For `json`/`form`: the body template (`{{to}}`, `{{content}}`, `{{id}}`, `{{from}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    /// `header` (default), `bearer` or `basic`.
    #[serde(default)]
    pub auth: AuthScheme,
    /// For `auth = "header"`: the header's name (default: `webhook.auth_header`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_header: Option<String>,
    /// The key, token or password.
    #[serde(default, serialize_with = "redact_opt", skip_serializing_if = "Option::is_none")]
    pub auth_key: Option<SecretString>,
    /// For `auth = "basic"`: the user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// Sender id (`{{from}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// JSON pointer to the provider's id in an accepted answer (default `/messageId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id_pointer: Option<String>,
    /// Total request timeout, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Connect timeout, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// Sends per second to this provider, shared by every replica (0 = no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_second: Option<f64>,
    /// Sends allowed at once on top of the steady rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_burst: Option<u32>,
    /// Retryable failures in a row that pause this provider (0 = never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_after_failures: Option<u32>,
    /// First pause after a failure streak, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_seconds: Option<u64>,
    /// Longest honoured `Retry-After` and longest pause, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retry_after_seconds: Option<u64>,
    /// How its delivery receipts are checked and read (none: it sends none Herald takes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipts: Option<crate::receipts::ReceiptSettings>,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// E.164 prefix (`+90`, `+1415`); `""` is the default route. The longest match wins.
    pub prefix: String,
    /// Provider names, primary first.
    pub providers: Vec<String>,
    /// Optional split of traffic between the first `weights.len()` providers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<u32>,
}

/// An effective provider: every value resolved.
#[derive(Debug, Clone)]
pub struct Provider {
    /// Its name.
    pub name: String,
    /// The client's configuration (without the user agent).
    pub webhook: WebhookConfig,
    /// Shared sends per second (0 = none).
    pub rate_limit_per_second: f64,
    /// Burst.
    pub rate_limit_burst: u32,
    /// Replicas assumed when Redis is away.
    pub rate_limit_fallback_replicas: u32,
    /// Retryable failures in a row that pause (0 = never).
    pub pause_after_failures: u32,
    /// First streak pause.
    pub pause: Duration,
    /// Longest pause and longest honoured `Retry-After`.
    pub max_pause: Duration,
}

/// What `herald config check` shows of a provider (no secret).
#[derive(Debug, Clone, Serialize)]
pub struct ProviderSummary {
    /// Name.
    pub name: String,
    /// Endpoint.
    pub url: String,
    /// Body format.
    pub format: Format,
    /// Auth scheme.
    pub auth: AuthScheme,
    /// Where the id is read.
    pub message_id_pointer: String,
    /// Total timeout.
    pub timeout_ms: u64,
    /// Shared rate (0 = none).
    pub rate_limit_per_second: f64,
    /// Burst.
    pub rate_limit_burst: u32,
    /// Failures that pause.
    pub pause_after_failures: u32,
}

impl Provider {
    /// Total timeout of one send.
    pub fn timeout(&self) -> Duration {
        self.webhook.timeout
    }

    /// The secret-free summary.
    pub fn summary(&self) -> ProviderSummary {
        ProviderSummary {
            name: self.name.clone(),
            url: self.webhook.url.clone(),
            format: self.webhook.shape.format.clone(),
            auth: match self.webhook.auth {
                Auth::Header { .. } => AuthScheme::Header,
                Auth::Bearer { .. } => AuthScheme::Bearer,
                Auth::Basic { .. } => AuthScheme::Basic,
            },
            message_id_pointer: self.webhook.message_id_pointer.clone(),
            timeout_ms: self.webhook.timeout.as_millis() as u64,
            rate_limit_per_second: self.rate_limit_per_second,
            rate_limit_burst: self.rate_limit_burst,
            pause_after_failures: self.pause_after_failures,
        }
    }

    fn from_webhook(webhook: &WebhookSettings, user_agent: &str) -> Self {
        Self {
            name: DEFAULT_PROVIDER.into(),
            webhook: WebhookConfig {
                url: webhook.url.clone(),
                auth: Auth::Header {
                    header: webhook.auth_header.clone(),
                    key: webhook.auth_key.clone(),
                },
                shape: Shape::herald(),
                from: String::new(),
                message_id_pointer: HERALD_MESSAGE_ID_POINTER.into(),
                timeout: webhook.timeout(),
                connect_timeout: Duration::from_millis(webhook.connect_timeout_ms),
                user_agent: user_agent.into(),
            },
            rate_limit_per_second: webhook.rate_limit_per_second,
            rate_limit_burst: webhook.rate_limit_burst,
            rate_limit_fallback_replicas: webhook.rate_limit_fallback_replicas,
            pause_after_failures: webhook.pause_after_failures,
            pause: Duration::from_secs(webhook.pause_seconds),
            max_pause: Duration::from_secs(webhook.max_retry_after_seconds),
        }
    }

    fn from_settings(
        index: usize,
        p: &ProviderSettings,
        defaults: &WebhookSettings,
        user_agent: &str,
    ) -> Result<Self, InvalidSettings> {
        let key = |field: &str| format!("providers[{index}].{field} (provider {:?})", p.name);
        let fail = |field: &str, why: String| Err(InvalidSettings(format!("{} {why}", key(field))));
        if !valid_name(&p.name) {
            return fail("name", "must be 1 to 32 of a-z, 0-9 and '-'".into());
        }
        if !(p.url.starts_with("http://") || p.url.starts_with("https://")) {
            return fail("url", format!("({:?}) must be an http:// or https:// URL", p.url));
        }
        let secret = p.auth_key.clone().unwrap_or_else(|| SecretString::from(String::new()));
        if secret.expose_secret().trim().is_empty() {
            return fail("auth_key", "must be set".into());
        }
        let auth = match p.auth {
            AuthScheme::Header => Auth::Header {
                header: p.auth_header.clone().unwrap_or_else(|| defaults.auth_header.clone()),
                key: secret,
            },
            AuthScheme::Bearer => Auth::Bearer { key: secret },
            AuthScheme::Basic => match p.auth_user.as_deref().filter(|u| !u.is_empty()) {
                Some(user) => Auth::Basic {
                    user: user.to_owned(),
                    key: secret,
                },
                None => return fail("auth_user", "must be set when auth = \"basic\"".into()),
            },
        };
        if p.auth != AuthScheme::Header && p.auth_header.is_some() {
            return fail("auth_header", "is only used with auth = \"header\"".into());
        }
        let shape = Shape {
            format: p.format.clone(),
            template: p.body.clone().unwrap_or(serde_json::Value::Null),
        };
        match (&shape.format, &p.body) {
            (Format::Herald, Some(_)) => return fail("body", "is only used with format = \"json\" or \"form\"".into()),
            (Format::Json | Format::Form, None) => {
                return fail("body", "must be set for format = \"json\" or \"form\"".into())
            }
            _ => {}
        }
        if let Err(why) = shape.check() {
            return fail("body", why);
        }
        let pointer = p
            .message_id_pointer
            .clone()
            .unwrap_or_else(|| HERALD_MESSAGE_ID_POINTER.into());
        if !(pointer.is_empty() || pointer.starts_with('/')) {
            return fail(
                "message_id_pointer",
                format!("({pointer:?}) must be a JSON pointer such as \"/sid\""),
            );
        }
        let timeout_ms = p.timeout_ms.unwrap_or(defaults.timeout_ms);
        let connect_timeout_ms = p.connect_timeout_ms.unwrap_or(defaults.connect_timeout_ms);
        if timeout_ms == 0 || connect_timeout_ms == 0 {
            return fail("timeout_ms", "and connect_timeout_ms must be positive".into());
        }
        let rate = p.rate_limit_per_second.unwrap_or(defaults.rate_limit_per_second);
        if !(0.0..=1_000_000.0).contains(&rate) {
            return fail(
                "rate_limit_per_second",
                format!("({rate}) must be 0 (off) up to 1000000"),
            );
        }
        let burst = p.rate_limit_burst.unwrap_or(defaults.rate_limit_burst);
        if !(1..=100_000).contains(&burst) {
            return fail("rate_limit_burst", "must be 1..=100000".into());
        }
        let pause_seconds = p.pause_seconds.unwrap_or(defaults.pause_seconds);
        let max = p.max_retry_after_seconds.unwrap_or(defaults.max_retry_after_seconds);
        if pause_seconds == 0 || max == 0 {
            return fail("pause_seconds", "and max_retry_after_seconds must be positive".into());
        }
        let provider = Self {
            name: p.name.clone(),
            webhook: WebhookConfig {
                url: p.url.clone(),
                auth,
                shape,
                from: p.from.clone().unwrap_or_default(),
                message_id_pointer: pointer,
                timeout: Duration::from_millis(timeout_ms),
                connect_timeout: Duration::from_millis(connect_timeout_ms),
                user_agent: user_agent.into(),
            },
            rate_limit_per_second: rate,
            rate_limit_burst: burst,
            rate_limit_fallback_replicas: defaults.rate_limit_fallback_replicas,
            pause_after_failures: p.pause_after_failures.unwrap_or(defaults.pause_after_failures),
            pause: Duration::from_secs(pause_seconds),
            max_pause: Duration::from_secs(max),
        };
        // The auth must make a header: checked here so start-up names the provider.
        if let Err(error) = webhook_client::WebhookClient::new(provider.webhook.clone()) {
            return fail("auth_key", format!("cannot be sent: {error}"));
        }
        Ok(provider)
    }
}

/// `[a-z0-9-]{1,32}`.
pub fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// One resolved route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// E.164 prefix; `""` for the default.
    pub prefix: String,
    /// Indexes into the providers, primary first.
    #[serde(skip)]
    pub providers: Vec<usize>,
    /// Provider names, primary first.
    #[serde(rename = "providers")]
    pub names: Vec<String>,
    /// Split between the first `weights.len()` providers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<u32>,
}

/// The providers and routes in effect.
#[derive(Debug, Clone)]
pub struct Routing {
    providers: Vec<Provider>,
    /// Longest prefix first; always ends with the default route.
    routes: Vec<Route>,
}

impl Routing {
    /// Resolves `[[providers]]`/`[[routes]]` (or `[webhook]` as `default`), checking every
    /// rule; an error names its key.
    pub fn from_settings(settings: &Settings) -> Result<Self, InvalidSettings> {
        let agent = crate::USER_AGENT;
        let providers = if settings.providers.is_empty() {
            vec![Provider::from_webhook(&settings.webhook, agent)]
        } else {
            if settings.providers.len() > MAX_PROVIDERS {
                return Err(InvalidSettings(format!(
                    "providers: at most {MAX_PROVIDERS} may be configured"
                )));
            }
            settings
                .providers
                .iter()
                .enumerate()
                .map(|(i, p)| Provider::from_settings(i, p, &settings.webhook, agent))
                .collect::<Result<Vec<_>, _>>()?
        };
        if let Some(problem) = settings
            .receipt_providers()
            .iter()
            .find_map(|(name, r)| r.problem(name))
        {
            return Err(InvalidSettings(problem));
        }
        for (i, p) in providers.iter().enumerate() {
            if providers[..i].iter().any(|q| q.name == p.name) {
                return Err(InvalidSettings(format!(
                    "providers[{i}].name ({:?}) is used by an earlier provider; names must be unique",
                    p.name
                )));
            }
        }
        if settings.routes.len() > MAX_ROUTES {
            return Err(InvalidSettings(format!(
                "routes: at most {MAX_ROUTES} may be configured"
            )));
        }
        let mut routes = Vec::with_capacity(settings.routes.len() + 1);
        for (i, r) in settings.routes.iter().enumerate() {
            let fail = |why: String| Err(InvalidSettings(format!("routes[{i}].{why}")));
            let digits = r.prefix.strip_prefix('+').unwrap_or("");
            if !(r.prefix.is_empty() || (1..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()))
            {
                return fail(format!(
                    "prefix ({:?}) must be \"\" (the default) or '+' and 1 to 15 digits",
                    r.prefix
                ));
            }
            if settings.routes[..i].iter().any(|q| q.prefix == r.prefix) {
                return fail(format!("prefix ({:?}) is routed twice", r.prefix));
            }
            if r.providers.is_empty() {
                return fail("providers must name at least one provider".into());
            }
            let mut indexes = Vec::with_capacity(r.providers.len());
            for name in &r.providers {
                let Some(index) = providers.iter().position(|p| &p.name == name) else {
                    return fail(format!("providers names unknown provider {name:?}"));
                };
                if indexes.contains(&index) {
                    return fail(format!("providers names {name:?} twice"));
                }
                indexes.push(index);
            }
            if r.weights.len() > indexes.len() || r.weights.len() == 1 {
                return fail("weights must have 2 up to as many entries as providers".into());
            }
            if !r.weights.is_empty()
                && (r.weights.contains(&0) || r.weights.iter().map(|w| u64::from(*w)).sum::<u64>() > 1_000_000)
            {
                return fail("weights must be positive and add up to at most 1000000".into());
            }
            routes.push(Route {
                prefix: r.prefix.clone(),
                providers: indexes,
                names: r.providers.clone(),
                weights: r.weights.clone(),
            });
        }
        if !routes.iter().any(|r| r.prefix.is_empty()) {
            // No default route: every provider, in the order configured.
            routes.push(Route {
                prefix: String::new(),
                providers: (0..providers.len()).collect(),
                names: providers.iter().map(|p| p.name.clone()).collect(),
                weights: Vec::new(),
            });
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(Self { providers, routes })
    }

    /// The providers, in configuration order.
    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    /// The routes, longest prefix first (the default last).
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The provider named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.providers.iter().position(|p| p.name == name)
    }

    /// The longest send timeout of any provider (bounds a claim's lease).
    pub fn longest_timeout(&self) -> Duration {
        self.providers.iter().map(Provider::timeout).max().unwrap_or_default()
    }

    /// The route `to` takes: the longest matching prefix.
    pub fn route_for(&self, to: &str) -> &Route {
        self.routes
            .iter()
            .find(|r| to.starts_with(&r.prefix))
            .unwrap_or_else(|| &self.routes[self.routes.len() - 1])
    }

    /// The providers message `id` to `to` may go to, in the order to try them: its pin alone;
    /// else its route, starting after `last_failed` (the provider of its last failed attempt:
    /// a retry goes to the next one), or at the weighted choice, or at the primary.
    pub fn plan(&self, to: &str, pin: Option<&str>, id: &str, last_failed: Option<&str>) -> Vec<usize> {
        if let Some(index) = pin.and_then(|name| self.index_of(name)) {
            return vec![index];
        }
        let route = self.route_for(to);
        let order = &route.providers;
        let start = match last_failed.and_then(|name| self.index_of(name)) {
            Some(last) if order.len() > 1 => order
                .iter()
                .position(|i| *i == last)
                .map_or(0, |p| (p + 1) % order.len()),
            _ if !route.weights.is_empty() => weighted(&route.weights, id),
            _ => 0,
        };
        order[start..].iter().chain(&order[..start]).copied().collect()
    }
}

/// Which of `weights` message `id` falls to: a fixed hash of the id, so the split holds
/// across replicas and a message's choice never changes.
fn weighted(weights: &[u32], id: &str) -> usize {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return 0;
    }
    let mut roll = mix(id) % total;
    for (i, w) in weights.iter().enumerate() {
        if roll < u64::from(*w) {
            return i;
        }
        roll -= u64::from(*w);
    }
    0
}

/// FNV-1a over the bytes, then splitmix64's finaliser (every input bit reaches the low bits).
fn mix(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(toml_text: &str) -> Result<Routing, String> {
        let dir = std::env::temp_dir().join(format!("herald-providers-{}", uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("local.toml"), toml_text).unwrap();
        let configs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        for entry in std::fs::read_dir(&configs).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() == "default.toml" {
                std::fs::copy(entry.path(), dir.join("default.toml")).unwrap();
            }
        }
        let loaded = Settings::load_with_env(&dir, "local", vec![]).map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        loaded.and_then(|s| Routing::from_settings(&s).map_err(|e| e.to_string()))
    }

    fn uuid_like() -> String {
        format!("{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], "")
    }

    const THREE: &str = r#"
[[providers]]
name = "alpha"
url = "http://127.0.0.1:1/a"
auth_key = "ka"

[[providers]]
name = "beta"
url = "http://127.0.0.1:1/b"
format = "form"
auth = "basic"
auth_user = "AC1"
auth_key = "kb"
from = "HERALD"
message_id_pointer = "/sid"
body = { To = "{{to}}", From = "{{from}}", Body = "{{content}}" }

[[providers]]
name = "gamma"
url = "http://127.0.0.1:1/c"
auth = "bearer"
auth_key = "kc"

[[routes]]
prefix = "+90"
providers = ["beta", "alpha"]

[[routes]]
prefix = "+9055"
providers = ["gamma"]

[[routes]]
prefix = ""
providers = ["alpha", "gamma"]
weights = [3, 1]
"#;

    #[test]
    fn the_longest_prefix_wins_and_a_pin_goes_alone() {
        let r = routing(THREE).unwrap();
        let names = |plan: Vec<usize>| plan.iter().map(|i| r.providers()[*i].name.clone()).collect::<Vec<_>>();
        assert_eq!(names(r.plan("+905551111111", None, "x", None)), ["gamma"]);
        assert_eq!(names(r.plan("+905321111111", None, "x", None)), ["beta", "alpha"]);
        assert_eq!(
            names(r.plan("+905321111111", None, "x", Some("beta"))),
            ["alpha", "beta"]
        );
        assert_eq!(names(r.plan("+905321111111", Some("gamma"), "x", None)), ["gamma"]);
        let beta = &r.providers()[1];
        assert_eq!(beta.webhook.message_id_pointer, "/sid");
        assert_eq!(beta.webhook.shape.template["To"], "{{to}}", "keys keep their case");
    }

    #[test]
    fn weights_split_the_default_route_by_a_fixed_hash() {
        let r = routing(THREE).unwrap();
        let mut alpha = 0;
        for n in 0..4000 {
            let id = format!("65f0c0de{n:016x}");
            if r.plan("+14155550100", None, &id, None)[0] == 0 {
                alpha += 1;
            }
        }
        assert!((2850..=3150).contains(&alpha), "3:1 of 4000 gave {alpha} to alpha");
    }

    #[test]
    fn webhook_alone_is_one_provider_named_default() {
        let r = routing("").unwrap();
        assert_eq!(r.providers().len(), 1);
        assert_eq!(r.providers()[0].name, DEFAULT_PROVIDER);
        assert_eq!(r.plan("+905551111111", None, "x", None), [0]);
    }

    #[test]
    fn broken_providers_and_routes_are_refused_naming_the_key() {
        let cases = [
            (
                THREE.replace("name = \"gamma\"", "name = \"Gamma!\""),
                "providers[2].name",
            ),
            (
                THREE.replace("name = \"gamma\"", "name = \"alpha\""),
                "providers[2].name",
            ),
            (
                THREE.replace("[\"gamma\"]", "[\"delta\"]"),
                "routes[1].providers names unknown provider \"delta\"",
            ),
            (THREE.replace("{{from}}", "{{sender}}"), "providers[1].body"),
            (THREE.replace("auth_user = \"AC1\"", ""), "providers[1].auth_user"),
            (
                THREE.replace("prefix = \"+9055\"", "prefix = \"90\""),
                "routes[1].prefix",
            ),
            (
                THREE.replace("weights = [3, 1]", "weights = [3, 0]"),
                "routes[2].weights",
            ),
            (THREE.replace("auth_key = \"kc\"", "auth_keys = \"kc\""), "auth_keys"),
        ];
        for (text, named) in cases {
            let error = routing(&text).unwrap_err();
            assert!(error.contains(named), "wanted {named:?} in {error}");
            assert!(!error.contains('\n'), "{error}");
        }
    }
}
