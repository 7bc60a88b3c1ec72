//! A webhook client that turns every provider answer into a [`DeliveryOutcome`].
//!
//! The client POSTs a JSON body with an auth header, an `Idempotency-Key` and a `User-Agent`,
//! follows no redirects, and bounds both the connect and the total time. It never decides what
//! to do next; it classifies (after hook0's output worker):
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx with a JSON `messageId` | [`DeliveryOutcome::Accepted`] with the id |
//! | 2xx without one | [`DeliveryOutcome::Accepted`] without an id (it *was* accepted) |
//! | timeout, connection error, 5xx, 408 | [`DeliveryOutcome::Retryable`] |
//! | 429, 503 | [`DeliveryOutcome::Retryable`] with the parsed `Retry-After`, when given |
//! | other 4xx (and 1xx/3xx) | [`DeliveryOutcome::Permanent`] with the status and a body excerpt |

#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// How much of an error body is kept.
pub const BODY_EXCERPT_BYTES: usize = 4096;

/// How to reach the provider.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Provider endpoint.
    pub url: String,
    /// Name of the auth header (e.g. `x-ins-auth-key`).
    pub auth_header: String,
    /// Value of the auth header.
    pub auth_key: SecretString,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// `User-Agent` sent with each request.
    pub user_agent: String,
}

/// The stable set of failure kinds, stored with every failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(poem_openapi::Enum))]
#[cfg_attr(feature = "openapi", oai(rename_all = "snake_case"))]
pub enum FailureKind {
    /// The request did not complete within the timeout.
    Timeout,
    /// No connection could be made, or it broke.
    Connection,
    /// The provider answered with a non-success status.
    HttpStatus,
    /// The provider's answer could not be understood.
    InvalidResponse,
}

/// One failed attempt: what kind, which status, and a short detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryFailure {
    /// The failure kind.
    pub kind: FailureKind,
    /// HTTP status, when the provider answered.
    pub status: Option<u16>,
    /// A human-readable detail, or the first 4 KiB of the provider's body.
    pub detail: String,
}

/// What happened to one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The provider accepted the message.
    Accepted {
        /// The provider's `messageId`, when its body carried a parsable one.
        message_id: Option<String>,
        /// Status code of the answer.
        status: u16,
    },
    /// Worth trying again later.
    Retryable {
        /// What went wrong.
        failure: DeliveryFailure,
        /// The provider's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// Trying again cannot help.
    Permanent {
        /// What went wrong.
        failure: DeliveryFailure,
    },
}

impl DeliveryOutcome {
    /// A short label for metrics and logs: `accepted`, `retryable` or `permanent`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Accepted { .. } => "accepted",
            Self::Retryable { .. } => "retryable",
            Self::Permanent { .. } => "permanent",
        }
    }
}

/// The body the provider receives.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookRequest<'a> {
    /// Recipient phone number.
    pub to: &'a str,
    /// Message text.
    pub content: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AcceptedBody {
    message_id: Option<serde_json::Value>,
}

/// Why a [`WebhookClient`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `auth_header` is not a valid HTTP header name.
    #[error("webhook.auth_header is not a valid header name")]
    AuthHeader(#[source] reqwest::header::InvalidHeaderName),
    /// `auth_key` is not a valid HTTP header value (the key itself is never shown).
    #[error("webhook.auth_key is not a valid header value")]
    AuthKey,
    /// The HTTP client (TLS) could not be initialised.
    #[error("cannot build the webhook HTTP client")]
    Http(#[source] reqwest::Error),
}

/// A reusable webhook client (connection pooling lives inside).
#[derive(Debug, Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    config: WebhookConfig,
    auth_header: HeaderName,
    auth_value: HeaderValue,
}

impl WebhookClient {
    /// Builds the client; fails when the header name or the key is invalid or TLS cannot
    /// initialise — at start-up, not at the first send.
    pub fn new(config: WebhookConfig) -> Result<Self, BuildError> {
        let auth_header = HeaderName::from_bytes(config.auth_header.as_bytes()).map_err(BuildError::AuthHeader)?;
        let mut auth_value = HeaderValue::from_str(config.auth_key.expose_secret()).map_err(|_| BuildError::AuthKey)?;
        auth_value.set_sensitive(true);
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .user_agent(config.user_agent.clone())
            .build()
            .map_err(BuildError::Http)?;
        Ok(Self {
            http,
            config,
            auth_header,
            auth_value,
        })
    }

    /// Sends one message and classifies the answer. Never returns an error: every failure is an
    /// outcome.
    pub async fn send(&self, idempotency_key: &str, body: &WebhookRequest<'_>) -> DeliveryOutcome {
        let mut headers = HeaderMap::new();
        headers.insert(self.auth_header.clone(), self.auth_value.clone());
        if let Ok(value) = HeaderValue::from_str(idempotency_key) {
            headers.insert("idempotency-key", value);
        }
        let result = self
            .http
            .post(&self.config.url)
            .headers(headers)
            .json(body)
            .send()
            .await;
        let response = match result {
            Ok(response) => response,
            Err(error) => return transport_failure(&error),
        };
        let status = response.status();
        let retry_after = parse_retry_after(response.headers(), SystemTime::now());
        let bytes = match response.bytes().await {
            Ok(bytes) => bytes,
            Err(error) if status.is_success() => {
                // The provider said yes before the body broke: resending would duplicate.
                tracing::warn!(%error, "accepted response body could not be read");
                return DeliveryOutcome::Accepted {
                    message_id: None,
                    status: status.as_u16(),
                };
            }
            Err(error) => return transport_failure(&error),
        };
        classify(status, &bytes, retry_after)
    }
}

fn transport_failure(error: &reqwest::Error) -> DeliveryOutcome {
    let kind = if error.is_timeout() {
        FailureKind::Timeout
    } else {
        FailureKind::Connection
    };
    DeliveryOutcome::Retryable {
        failure: DeliveryFailure {
            kind,
            status: None,
            detail: error_chain(error),
        },
        retry_after: None,
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Classifies a complete answer. Public so the rules can be tested without a network.
pub fn classify(status: StatusCode, body: &[u8], retry_after: Option<Duration>) -> DeliveryOutcome {
    if status.is_success() {
        let message_id = serde_json::from_slice::<AcceptedBody>(body)
            .ok()
            .and_then(|b| b.message_id)
            .and_then(|id| match id {
                serde_json::Value::String(s) if !s.trim().is_empty() => Some(s),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
        if message_id.is_none() {
            tracing::warn!(
                status = status.as_u16(),
                "provider accepted without a parsable messageId"
            );
        }
        return DeliveryOutcome::Accepted {
            message_id,
            status: status.as_u16(),
        };
    }
    let failure = DeliveryFailure {
        kind: FailureKind::HttpStatus,
        status: Some(status.as_u16()),
        detail: excerpt(body),
    };
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        DeliveryOutcome::Retryable { failure, retry_after }
    } else if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        DeliveryOutcome::Retryable {
            failure,
            retry_after: None,
        }
    } else {
        DeliveryOutcome::Permanent { failure }
    }
}

/// The first [`BODY_EXCERPT_BYTES`] of a body as text, cut on a character boundary.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(BODY_EXCERPT_BYTES)]);
    let mut text = text.into_owned();
    while text.len() > BODY_EXCERPT_BYTES {
        text.pop();
    }
    text
}

/// Reads `Retry-After` as delta-seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremock::matchers::{body_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    fn client(url: String, timeout_ms: u64) -> WebhookClient {
        WebhookClient::new(WebhookConfig {
            url,
            auth_header: "x-ins-auth-key".into(),
            auth_key: SecretString::from("secret-key"),
            timeout: Duration::from_millis(timeout_ms),
            connect_timeout: Duration::from_millis(500),
            user_agent: "herald/test".into(),
        })
        .unwrap()
    }

    #[test]
    fn a_key_that_is_no_header_value_is_refused_when_the_client_is_built() {
        let config = |key: &str| WebhookConfig {
            url: "http://127.0.0.1:1/webhook".into(),
            auth_header: "x-ins-auth-key".into(),
            auth_key: SecretString::from(key.to_owned()),
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            user_agent: "herald/test".into(),
        };
        let error = WebhookClient::new(config("two\nlines")).unwrap_err();
        assert!(matches!(error, BuildError::AuthKey), "{error:?}");
        assert!(!format!("{error} {error:?}").contains("lines"), "the key was shown");
        assert!(WebhookClient::new(config("fine-key")).is_ok());
    }

    const BODY: WebhookRequest<'static> = WebhookRequest {
        to: "+905551111111",
        content: "hello",
    };

    #[tokio::test]
    async fn sends_the_contract_headers_and_body_and_reads_the_message_id() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/webhook"))
            .and(header("x-ins-auth-key", "secret-key"))
            .and(header("idempotency-key", "msg-1"))
            .and(header("user-agent", "herald/test"))
            .and(header("content-type", "application/json"))
            .and(body_json(
                serde_json::json!({"to": "+905551111111", "content": "hello"}),
            ))
            .respond_with(
                ResponseTemplate::new(202)
                    .set_body_json(serde_json::json!({"message": "Accepted", "messageId": "abc"})),
            )
            .expect(1)
            .mount(&server)
            .await;
        let outcome = client(format!("{}/webhook", server.uri()), 2000)
            .send("msg-1", &BODY)
            .await;
        assert_eq!(
            outcome,
            DeliveryOutcome::Accepted {
                message_id: Some("abc".into()),
                status: 202
            }
        );
    }

    #[tokio::test]
    async fn a_slow_provider_is_a_retryable_timeout() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(202).set_delay(Duration::from_millis(800)))
            .mount(&server)
            .await;
        let outcome = client(server.uri(), 200).send("m", &BODY).await;
        match outcome {
            DeliveryOutcome::Retryable { failure, .. } => assert_eq!(failure.kind, FailureKind::Timeout),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_retryable() {
        let outcome = client("http://127.0.0.1:9/webhook".into(), 1000).send("m", &BODY).await;
        match outcome {
            DeliveryOutcome::Retryable { failure, .. } => assert_eq!(failure.kind, FailureKind::Connection),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(302).insert_header("location", "http://127.0.0.1:9/x"))
            .mount(&server)
            .await;
        let outcome = client(server.uri(), 1000).send("m", &BODY).await;
        assert!(matches!(outcome, DeliveryOutcome::Permanent { .. }), "{outcome:?}");
    }

    #[test]
    fn classifies_statuses_per_the_contract() {
        let ok = |s: u16, body: &str| classify(StatusCode::from_u16(s).unwrap(), body.as_bytes(), None);
        assert!(matches!(
            ok(200, "not json"),
            DeliveryOutcome::Accepted { message_id: None, .. }
        ));
        assert!(
            matches!(ok(202, r#"{"messageId": 42}"#), DeliveryOutcome::Accepted { message_id: Some(ref id), .. } if id == "42")
        );
        assert!(matches!(ok(500, ""), DeliveryOutcome::Retryable { .. }));
        assert!(matches!(ok(503, ""), DeliveryOutcome::Retryable { .. }));
        assert!(matches!(ok(408, ""), DeliveryOutcome::Retryable { .. }));
        assert!(
            matches!(ok(400, "bad"), DeliveryOutcome::Permanent { ref failure } if failure.status == Some(400) && failure.detail == "bad")
        );
        assert!(matches!(ok(404, ""), DeliveryOutcome::Permanent { .. }));
        let limited = classify(StatusCode::TOO_MANY_REQUESTS, b"", Some(Duration::from_secs(7)));
        assert!(matches!(limited, DeliveryOutcome::Retryable { retry_after: Some(d), .. } if d.as_secs() == 7));
        let unavailable = classify(StatusCode::SERVICE_UNAVAILABLE, b"", Some(Duration::from_secs(3)));
        assert!(matches!(unavailable, DeliveryOutcome::Retryable { retry_after: Some(d), .. } if d.as_secs() == 3));
        let broken = classify(StatusCode::INTERNAL_SERVER_ERROR, b"", Some(Duration::from_secs(3)));
        assert!(matches!(broken, DeliveryOutcome::Retryable { retry_after: None, .. }));
    }

    #[test]
    fn keeps_at_most_four_kib_of_an_error_body() {
        let body = "é".repeat(5000);
        let text = excerpt(body.as_bytes());
        assert!(text.len() <= BODY_EXCERPT_BYTES);
        assert!(text.starts_with('é'));
    }

    #[test]
    fn parses_retry_after_as_seconds_or_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(parse_retry_after(&headers, now), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        assert_eq!(parse_retry_after(&headers, now), Some(Duration::from_secs(90)));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&headers, now), None);
    }
}
