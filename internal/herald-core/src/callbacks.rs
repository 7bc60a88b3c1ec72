//! Status callbacks out (SPEC §17): what Herald POSTs to a message's `callbackUrl`, how it signs
//! it the Standard Webhooks way, which URLs and addresses it may go to, and the worker contract
//! by which the Job Scheduler claims and reports them.
//!
//! Signing (<https://www.standardwebhooks.com>): `webhook-id` (stable across retries),
//! `webhook-timestamp` (Unix seconds of the attempt), `webhook-signature: v1,<base64 of
//! HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, one `v1,…` per configured secret separated
//! by spaces, so a receiver may rotate: configure the new secret beside the old, move the
//! receiver, drop the old. A secret is `whsec_` and the base64 of its key.
//!
//! Addresses: a callback goes to `https`, or to `http` only on a host listed in
//! `callbacks.allowed_hosts`. A loopback, private, link-local, shared (CGNAT), unspecified,
//! multicast or documentation address is refused unless its host is listed — as a literal at
//! create, and every address a name resolves to at send, before any connection is opened.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use layered_config::{ExposeSecret, SecretString};
use poem_openapi::{Enum, Object};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::message::DeliveryView;

/// Prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Longest callback URL.
pub const MAX_URL_LEN: usize = 2048;
/// Most callbacks in one claim or report.
pub const MAX_BATCH: usize = 200;
/// How far a receiver should let `webhook-timestamp` drift from its clock.
pub const TOLERANCE_SECONDS: i64 = 300;

/// What happened to a message that its creator is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Enum)]
pub enum CallbackEvent {
    /// The provider accepted it.
    #[oai(rename = "message.sent")]
    #[serde(rename = "message.sent")]
    Sent,
    /// It failed for good.
    #[oai(rename = "message.failed")]
    #[serde(rename = "message.failed")]
    Failed,
    /// It expired before it could be sent.
    #[oai(rename = "message.expired")]
    #[serde(rename = "message.expired")]
    Expired,
    /// A receipt said it reached the handset.
    #[oai(rename = "message.delivered")]
    #[serde(rename = "message.delivered")]
    Delivered,
    /// A receipt said the network could not deliver it (or the provider failed it).
    #[oai(rename = "message.undelivered")]
    #[serde(rename = "message.undelivered")]
    Undelivered,
    /// A receipt said it was read.
    #[oai(rename = "message.read")]
    #[serde(rename = "message.read")]
    Read,
}

impl CallbackEvent {
    /// The `type` of the body.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "message.sent",
            Self::Failed => "message.failed",
            Self::Expired => "message.expired",
            Self::Delivered => "message.delivered",
            Self::Undelivered => "message.undelivered",
            Self::Read => "message.read",
        }
    }

    /// The short name used in ids.
    pub fn short(self) -> &'static str {
        self.as_str().trim_start_matches("message.")
    }
}

/// Where a callback is on its way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Enum)]
#[serde(rename_all = "snake_case")]
#[oai(rename_all = "snake_case")]
pub enum CallbackStatus {
    /// Waiting for its (next) attempt.
    Pending,
    /// Held by a Job Scheduler replica until its lease ends.
    Processing,
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt of the retry schedule failed, or its address was refused: dead-lettered
    /// (an operator may send it again).
    Dead,
}

impl CallbackStatus {
    /// The stored word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
        }
    }
}

/// The body Herald POSTs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct CallbackBody {
    /// What happened.
    #[serde(rename = "type")]
    #[oai(rename = "type")]
    pub kind: CallbackEvent,
    /// Herald's message id.
    pub id: String,
    /// The provider's id of the message, once sent.
    pub message_id: Option<String>,
    /// The message's send status (`sent`, `failed`, `expired`).
    pub status: String,
    /// Its delivery, for receipt events.
    pub delivery: Option<DeliveryView>,
    /// When it happened.
    pub at: DateTime<Utc>,
}

/// A configured secret could not be read.
#[derive(Debug, thiserror::Error)]
#[error("a callback secret must be `whsec_` followed by base64 of at least 16 bytes")]
pub struct BadSecret;

/// The keys callbacks are signed with, from `whsec_…` secrets.
#[derive(Clone, Default)]
pub struct SigningKeys(Vec<Vec<u8>>);

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKeys({} keys)", self.0.len())
    }
}

impl SigningKeys {
    /// Reads every secret; one bad secret fails them all.
    pub fn parse(secrets: &[SecretString]) -> Result<Self, BadSecret> {
        secrets
            .iter()
            .map(|s| {
                let text = s.expose_secret().trim();
                let encoded = text.strip_prefix(SECRET_PREFIX).ok_or(BadSecret)?;
                let key = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|_| BadSecret)?;
                if key.len() < 16 {
                    return Err(BadSecret);
                }
                Ok(key)
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Whether there is no key (callbacks then go unsigned).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `webhook-signature` value: `v1,<sig>` per key, space-separated.
    pub fn sign(&self, id: &str, timestamp: i64, body: &str) -> String {
        self.0
            .iter()
            .map(|key| format!("v1,{}", signature(key, id, timestamp, body)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Whether `header` holds a `v1` signature of the message by any of the keys, and its
    /// timestamp lies within [`TOLERANCE_SECONDS`] of `now`. Constant-time per comparison.
    pub fn verify(&self, id: &str, timestamp: &str, header: &str, body: &str, now: i64) -> bool {
        let Ok(ts) = timestamp.trim().parse::<i64>() else {
            return false;
        };
        if (now - ts).abs() > TOLERANCE_SECONDS {
            return false;
        }
        let offered: Vec<&str> = header
            .split_whitespace()
            .filter_map(|part| part.strip_prefix("v1,"))
            .collect();
        self.0.iter().any(|key| {
            let expected = signature(key, id, ts, body);
            offered
                .iter()
                .any(|o| bool::from(o.as_bytes().ct_eq(expected.as_bytes())))
        })
    }
}

fn signature(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Whether `ip` is an address a callback may reach without its host being listed: not
/// loopback, private, link-local, shared, unspecified, broadcast, multicast or documentation.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link-local
        || first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
}

/// Why a callback URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Which callback URLs and addresses are allowed.
#[derive(Debug, Clone, Default)]
pub struct UrlPolicy {
    allowed_hosts: Vec<String>,
    only_listed: bool,
}

impl UrlPolicy {
    /// Hosts in `allowed_hosts` may use `http` and resolve to any address; with `only_listed`,
    /// no other host is allowed at all.
    pub fn new(allowed_hosts: &[String], only_listed: bool) -> Self {
        Self {
            allowed_hosts: allowed_hosts.iter().map(|h| h.trim().to_ascii_lowercase()).collect(),
            only_listed,
        }
    }

    /// Whether `host` is listed.
    pub fn is_listed(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        self.allowed_hosts.contains(&host)
    }

    /// Checks a URL at create: absolute, `https` (or `http` on a listed host), no credentials,
    /// and not an IP literal or `localhost` that is not public unless listed. Answers it
    /// normalised.
    pub fn check_url(&self, url: &str) -> Result<String, Refused> {
        let url = url.trim();
        if url.len() > MAX_URL_LEN {
            return Err(Refused(format!("callbackUrl is longer than {MAX_URL_LEN} characters")));
        }
        let parsed = reqwest::Url::parse(url).map_err(|e| Refused(format!("callbackUrl is not a URL: {e}")))?;
        let host = parsed
            .host_str()
            .ok_or_else(|| Refused("callbackUrl has no host".into()))?
            .to_owned();
        let listed = self.is_listed(&host);
        if self.only_listed && !listed {
            return Err(Refused(format!(
                "callbackUrl host {host} is not in callbacks.allowed_hosts (callbacks.restrict_to_allowed_hosts is on)"
            )));
        }
        match parsed.scheme() {
            "https" => {}
            "http" if listed => {}
            "http" => {
                return Err(Refused(format!(
                    "callbackUrl must be https (http only for a host in callbacks.allowed_hosts; {host} is not)"
                )))
            }
            other => return Err(Refused(format!("callbackUrl scheme {other:?} is not https"))),
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(Refused("callbackUrl must not carry credentials".into()));
        }
        if !listed {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = bare.parse::<IpAddr>() {
                if !is_public(ip) {
                    return Err(Refused(format!(
                        "callbackUrl points at {ip}, a private, loopback or link-local address; list its host in callbacks.allowed_hosts to allow it"
                    )));
                }
            }
            let lower = bare.to_ascii_lowercase();
            if lower == "localhost" || lower.ends_with(".localhost") {
                return Err(Refused(format!(
                    "callbackUrl points at {lower}; list it in callbacks.allowed_hosts to allow it"
                )));
            }
        }
        Ok(parsed.to_string())
    }

    /// The addresses of `host` a callback may connect to: all of them when it is listed, else
    /// only when every one is public (a name with one private address is refused whole).
    pub fn check_addresses(&self, host: &str, addresses: &[IpAddr]) -> Result<(), Refused> {
        if self.is_listed(host) {
            return Ok(());
        }
        if self.only_listed {
            return Err(Refused(format!(
                "{host} is not in callbacks.allowed_hosts (callbacks.restrict_to_allowed_hosts is on); refused before connecting"
            )));
        }
        if addresses.is_empty() {
            return Err(Refused(format!("{host} resolves to no address")));
        }
        match addresses.iter().find(|ip| !is_public(**ip)) {
            Some(ip) => Err(Refused(format!(
                "{host} resolves to {ip}, a private, loopback or link-local address; refused before connecting"
            ))),
            None => Ok(()),
        }
    }
}

/// Path of the callback claim.
pub const CLAIM_PATH: &str = "/api/messenger/callbacks/claim";
/// Path of the callback report.
pub const REPORT_PATH: &str = "/api/messenger/callbacks/report";

/// A claim of due callbacks.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct CallbackClaimRequest {
    /// The claiming worker's id.
    pub worker: String,
    /// How many, 1..=200 (default 50).
    #[oai(nullable)]
    pub limit: Option<u32>,
    /// How long the claim is held, 1..=3600 seconds (default 60).
    #[oai(nullable)]
    pub lease_seconds: Option<u64>,
}

/// A claimed callback: what a worker needs to POST it and report it.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ClaimedCallback {
    /// The `webhook-id`: the same on every attempt.
    pub id: String,
    /// Where to POST.
    pub url: String,
    /// The JSON body, exactly as signed.
    pub body: String,
    /// Which attempt this is (1 = first).
    pub attempt: i32,
    /// Proof of the claim, required by the report.
    pub claim_token: String,
    /// When the claim lapses.
    pub lease_until: DateTime<Utc>,
}

/// What became of one claimed callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Enum)]
#[serde(rename_all = "snake_case")]
#[oai(rename_all = "snake_case")]
pub enum CallbackResultKind {
    /// The receiver answered 2xx.
    Delivered,
    /// No 2xx: retried on the schedule, dead after its last step.
    Failed,
    /// Its address was refused: dead at once, nothing was sent.
    Refused,
    /// Not attempted (its host is paused or over its rate): due again at `deferUntil`, the
    /// attempt not counted.
    Deferred,
}

/// One callback's outcome.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct CallbackOutcome {
    /// The callback's id.
    pub id: String,
    /// The claim's token.
    pub claim_token: String,
    /// What happened.
    pub result: CallbackResultKind,
    /// The receiver's HTTP status, when it answered.
    #[oai(nullable)]
    #[serde(default)]
    pub status_code: Option<u16>,
    /// What went wrong.
    #[oai(nullable)]
    #[serde(default)]
    pub error: Option<String>,
    /// The receiver's `Retry-After`, in seconds (a floor for the next attempt).
    #[oai(nullable)]
    #[serde(default)]
    pub retry_after_seconds: Option<u64>,
    /// For `deferred`: when to try again.
    #[oai(nullable)]
    #[serde(default)]
    pub defer_until: Option<DateTime<Utc>>,
    /// How long the request took, in milliseconds.
    #[oai(nullable)]
    #[serde(default)]
    pub duration_ms: Option<u64>,
}

/// A report of callback outcomes.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct CallbackReport {
    /// 1..=200 outcomes, each callback once.
    pub items: Vec<CallbackOutcome>,
}

/// Where one reported callback now stands.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct CallbackReported {
    /// The callback's id.
    pub id: String,
    /// Its status now; absent when there is no such callback.
    #[oai(nullable)]
    pub status: Option<CallbackStatus>,
    /// False when the claim was no longer held (someone else has it, or it was reported).
    pub applied: bool,
}

/// The answer to a report.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct CallbackReportResults {
    /// One per outcome, in order.
    pub items: Vec<CallbackReported>,
}

/// One attempt of a callback, as kept on it.
#[derive(Debug, Clone, PartialEq, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct CallbackAttemptView {
    /// When it was reported.
    pub at: DateTime<Utc>,
    /// What happened.
    pub result: CallbackResultKind,
    /// The receiver's HTTP status.
    #[oai(nullable)]
    pub status_code: Option<u16>,
    /// What went wrong.
    #[oai(nullable)]
    pub error: Option<String>,
    /// How long it took, in milliseconds.
    #[oai(nullable)]
    pub duration_ms: Option<u64>,
}

/// A callback as the API shows it.
#[derive(Debug, Clone, PartialEq, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct CallbackView {
    /// The `webhook-id`.
    pub id: String,
    /// The message it tells about.
    pub message_id: String,
    /// What it tells.
    pub event: CallbackEvent,
    /// Where it goes.
    pub url: String,
    /// Where it stands.
    pub status: CallbackStatus,
    /// Attempts made (a claim counts as one; a deferral gives it back).
    pub attempts: i32,
    /// When it is (next) due; while processing, its lease end.
    pub next_attempt_at: DateTime<Utc>,
    /// When the receiver took it.
    #[oai(nullable)]
    pub delivered_at: Option<DateTime<Utc>>,
    /// The last error.
    #[oai(nullable)]
    pub last_error: Option<String>,
    /// Its last attempts, oldest first.
    pub history: Vec<CallbackAttemptView>,
    /// When it was written.
    pub created_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secrets: &[&str]) -> SigningKeys {
        SigningKeys::parse(
            &secrets
                .iter()
                .map(|s| SecretString::from(s.to_string()))
                .collect::<Vec<_>>(),
        )
        .expect("valid secrets")
    }

    /// The example of the Standard Webhooks reference libraries (`webhook_test` in
    /// standard-webhooks/libraries): this secret, id, timestamp and body sign to this value.
    #[test]
    fn signs_the_standard_webhooks_reference_vector() {
        let keys = keys(&["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            keys.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(keys.verify(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            body,
            1_614_265_330 + 10
        ));
    }

    #[test]
    fn rotation_signs_with_every_key_and_either_verifies() {
        let old = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let new = "whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVg==";
        let both = keys(&[new, old]);
        let header = both.sign("msg_1", 100, "{}");
        assert_eq!(header.split(' ').count(), 2);
        assert!(keys(&[old]).verify("msg_1", "100", &header, "{}", 100));
        assert!(keys(&[new]).verify("msg_1", "100", &header, "{}", 100));
        // A changed body, id, or a stale timestamp fails.
        assert!(!keys(&[old]).verify("msg_1", "100", &header, "{ }", 100));
        assert!(!keys(&[old]).verify("msg_2", "100", &header, "{}", 100));
        assert!(!keys(&[old]).verify("msg_1", "100", &header, "{}", 100 + TOLERANCE_SECONDS + 1));
        assert!(!keys(&[old]).verify("msg_1", "x", &header, "{}", 100));
    }

    #[test]
    fn bad_secrets_are_refused() {
        for bad in ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_!!!", "whsec_c2hvcnQ="] {
            assert!(
                SigningKeys::parse(&[SecretString::from(bad.to_string())]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn urls_are_checked_at_create() {
        let policy = UrlPolicy::new(&["127.0.0.1".into(), "hooks.internal".into()], false);
        assert!(policy.check_url("https://example.com/hook").is_ok());
        assert!(policy.check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(policy.check_url("http://hooks.internal/x").is_ok());
        for refused in [
            "http://example.com/hook",
            "ftp://example.com/",
            "https://10.1.2.3/hook",
            "https://192.168.1.1/",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/",
            "https://[fe80::1]/",
            "https://[::ffff:10.0.0.1]/",
            "https://100.64.0.1/",
            "https://localhost/",
            "https://127.0.0.2/",
            "https://user:pw@example.com/",
            "not a url",
        ] {
            assert!(policy.check_url(refused).is_err(), "{refused} should be refused");
        }
    }

    #[test]
    fn addresses_are_checked_at_send() {
        let policy = UrlPolicy::new(&["hooks.internal".into()], false);
        let private: IpAddr = "10.0.0.7".parse().unwrap();
        let public: IpAddr = "93.184.215.14".parse().unwrap();
        assert!(policy.check_addresses("example.com", &[public]).is_ok());
        assert!(policy.check_addresses("example.com", &[public, private]).is_err());
        assert!(policy.check_addresses("example.com", &[]).is_err());
        assert!(policy.check_addresses("hooks.internal", &[private]).is_ok());
    }

    #[test]
    fn restricted_to_the_listed_hosts_nothing_else_goes() {
        let policy = UrlPolicy::new(&["hooks.internal".into(), "127.0.0.1".into()], true);
        assert!(policy.check_url("https://hooks.internal/cb").is_ok());
        assert!(policy.check_url("http://127.0.0.1:8090/cb").is_ok());
        let refused = policy.check_url("https://example.com/hook").unwrap_err();
        assert!(refused.0.contains("restrict_to_allowed_hosts"), "{refused}");
        let public: IpAddr = "93.184.215.14".parse().unwrap();
        assert!(policy.check_addresses("example.com", &[public]).is_err());
    }
}
