//! A webhook client that turns every provider answer into a [`DeliveryOutcome`].
//!
//! The client POSTs one message in the provider's own request shape ([`Shape`]: Herald's
//! `{"to","content"}`, or a JSON or form body rendered from a template), with the provider's
//! auth ([`Auth`]: a named header, a bearer token or basic auth), an `Idempotency-Key` and a
//! `User-Agent`; it follows no redirects and bounds both the connect and the total time. The
//! provider's id for the message is read from the answer with a JSON pointer
//! (`/messageId`, `/sid`, `/messages/0/id`…). It never decides what to do next; it classifies
//! (after hook0's output worker):
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx with an id at the pointer | [`DeliveryOutcome::Accepted`] with the id |
//! | 2xx without one | [`DeliveryOutcome::Accepted`] without an id (it *was* accepted) |
//! | timeout, connection error, 5xx, 408 | [`DeliveryOutcome::Retryable`] |
//! | 429, 503 | [`DeliveryOutcome::Retryable`] with the parsed `Retry-After`, when given |
//! | other 4xx (and 1xx/3xx) | [`DeliveryOutcome::Permanent`] with the status and a body excerpt |

#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// How much of an error body is kept.
pub const BODY_EXCERPT_BYTES: usize = 4096;

/// The placeholders a body template may use.
/// `{{to_digits}}` is `{{to}}` without its `+` (Vonage and Infobip want the number so).
pub const PLACEHOLDERS: [&str; 5] = ["to", "to_digits", "content", "id", "from"];

/// How the request body is laid out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Herald's own contract: JSON `{"to", "content"}`.
    #[default]
    Herald,
    /// A JSON body rendered from a template.
    Json,
    /// A form (`application/x-www-form-urlencoded`) body rendered from a template.
    Form,
}

/// How the provider is told who is calling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthScheme {
    /// The key as the value of a named header.
    #[default]
    Header,
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// `Authorization: Basic base64(<user>:<key>)`.
    Basic,
}

/// How one provider authenticates a request.
#[derive(Debug, Clone)]
pub enum Auth {
    /// The key in header `header`.
    Header {
        /// Header name (e.g. `x-ins-auth-key`).
        header: String,
        /// The key.
        key: SecretString,
    },
    /// `Authorization: Bearer <key>`.
    Bearer {
        /// The token.
        key: SecretString,
    },
    /// HTTP basic auth.
    Basic {
        /// User (Twilio: the account SID).
        user: String,
        /// Password (Twilio: the auth token).
        key: SecretString,
    },
}

/// The request shape: the body's format and, for `json`/`form`, its template.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// How the body is laid out.
    pub format: Format,
    /// For `json`: any JSON value whose strings may hold placeholders; for `form`: an object
    /// of strings. Unused for `herald`.
    pub template: serde_json::Value,
}

impl Shape {
    /// Herald's own `{"to","content"}`.
    pub fn herald() -> Self {
        Self {
            format: Format::Herald,
            template: serde_json::Value::Null,
        }
    }

    /// Checks the template once, at start-up: `json`/`form` need an object, a form's values
    /// must be strings, and every `{{…}}` must be one of [`PLACEHOLDERS`]. The error names
    /// what is wrong (the caller adds which key).
    pub fn check(&self) -> Result<(), String> {
        match self.format {
            Format::Herald => Ok(()),
            Format::Json | Format::Form => {
                let Some(fields) = self.template.as_object().filter(|o| !o.is_empty()) else {
                    return Err("must be a non-empty table of fields".into());
                };
                if self.format == Format::Form {
                    if let Some((key, _)) = fields.iter().find(|(_, v)| !v.is_string()) {
                        return Err(format!("field {key:?} of a form body must be a string"));
                    }
                }
                check_placeholders(&self.template)
            }
        }
    }
}

fn check_placeholders(value: &serde_json::Value) -> Result<(), String> {
    match value {
        serde_json::Value::String(text) => {
            let mut rest = text.as_str();
            while let Some(start) = rest.find("{{") {
                let after = &rest[start + 2..];
                let Some(end) = after.find("}}") else {
                    return Err(format!("{text:?} opens a placeholder it never closes"));
                };
                let name = after[..end].trim();
                if !PLACEHOLDERS.contains(&name) {
                    return Err(format!(
                        "unknown placeholder {{{{{name}}}}} (known: {{{{to}}}}, {{{{to_digits}}}}, {{{{content}}}}, {{{{id}}}}, {{{{from}}}})"
                    ));
                }
                rest = &after[end + 2..];
            }
            Ok(())
        }
        serde_json::Value::Array(items) => items.iter().try_for_each(check_placeholders),
        serde_json::Value::Object(fields) => fields.values().try_for_each(check_placeholders),
        _ => Ok(()),
    }
}

/// What a template's placeholders stand for, for one message.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// Recipient (`{{to}}`).
    pub to: &'a str,
    /// Text (`{{content}}`).
    pub content: &'a str,
    /// Herald's message id (`{{id}}`).
    pub id: &'a str,
    /// The provider's sender id (`{{from}}`).
    pub from: &'a str,
}

impl Fields<'_> {
    fn value(&self, name: &str) -> &str {
        match name {
            "to" => self.to,
            "to_digits" => self.to.trim_start_matches('+'),
            "content" => self.content,
            "id" => self.id,
            "from" => self.from,
            _ => "",
        }
    }

    /// `text` with every known placeholder replaced (unknown ones were refused by
    /// [`Shape::check`]; left as they are should one slip through).
    fn render_text(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len() + self.content.len());
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else { break };
            let name = after[..end].trim();
            out.push_str(&rest[..start]);
            if PLACEHOLDERS.contains(&name) {
                out.push_str(self.value(name));
            } else {
                out.push_str(&rest[start..start + 2 + end + 2]);
            }
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        out
    }

    /// The template with every string rendered (values go in as JSON strings: a message
    /// cannot break out of its field).
    pub fn render(&self, template: &serde_json::Value) -> serde_json::Value {
        match template {
            serde_json::Value::String(text) => serde_json::Value::String(self.render_text(text)),
            serde_json::Value::Array(items) => items.iter().map(|v| self.render(v)).collect(),
            serde_json::Value::Object(fields) => fields
                .iter()
                .map(|(k, v)| (k.clone(), self.render(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
            other => other.clone(),
        }
    }
}

/// The pointer Herald's own contract answers at.
pub const HERALD_MESSAGE_ID_POINTER: &str = "/messageId";

/// How to reach the provider.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Provider endpoint.
    pub url: String,
    /// How the provider authenticates a request.
    pub auth: Auth,
    /// The request body's shape.
    pub shape: Shape,
    /// The sender id (`{{from}}`).
    pub from: String,
    /// JSON pointer to the provider's id for the message in an accepted answer.
    pub message_id_pointer: String,
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
    /// True when the request certainly never reached the provider (the connection was
    /// refused): sending elsewhere at once cannot make a duplicate.
    #[serde(default, skip)]
    pub unsent: bool,
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

/// Herald's own body.
#[derive(Debug, Clone, Serialize)]
struct HeraldBody<'a> {
    to: &'a str,
    content: &'a str,
}

/// Why a [`WebhookClient`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `auth_header` is not a valid HTTP header name.
    #[error("auth_header is not a valid header name")]
    AuthHeader(#[source] reqwest::header::InvalidHeaderName),
    /// `auth_key` is not a valid HTTP header value (the key itself is never shown).
    #[error("auth_key is not a valid header value")]
    AuthKey,
    /// The body template is not usable.
    #[error("body: {0}")]
    Template(String),
    /// `message_id_pointer` is not a JSON pointer.
    #[error("message_id_pointer must be empty or start with '/'")]
    Pointer,
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

/// The header and value that carry `auth`.
fn auth_header(auth: &Auth) -> Result<(HeaderName, HeaderValue), BuildError> {
    let (name, text) = match auth {
        Auth::Header { header, key } => (
            HeaderName::from_bytes(header.as_bytes()).map_err(BuildError::AuthHeader)?,
            key.expose_secret().to_owned(),
        ),
        Auth::Bearer { key } => (
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", key.expose_secret()),
        ),
        Auth::Basic { user, key } => (
            reqwest::header::AUTHORIZATION,
            format!("Basic {}", BASE64.encode(format!("{user}:{}", key.expose_secret()))),
        ),
    };
    let mut value = HeaderValue::from_str(&text).map_err(|_| BuildError::AuthKey)?;
    value.set_sensitive(true);
    Ok((name, value))
}

impl WebhookClient {
    /// Builds the client; fails when the auth, the template or the pointer is invalid or TLS
    /// cannot initialise — at start-up, not at the first send.
    pub fn new(config: WebhookConfig) -> Result<Self, BuildError> {
        let (auth_header, auth_value) = auth_header(&config.auth)?;
        config.shape.check().map_err(BuildError::Template)?;
        if !(config.message_id_pointer.is_empty() || config.message_id_pointer.starts_with('/')) {
            return Err(BuildError::Pointer);
        }
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

    /// The provider's endpoint.
    pub fn url(&self) -> &str {
        &self.config.url
    }

    /// The request `send` makes for `message` (idempotency key: Herald's message id).
    fn request(&self, to: &str, content: &str, id: &str) -> reqwest::RequestBuilder {
        let mut headers = HeaderMap::new();
        headers.insert(self.auth_header.clone(), self.auth_value.clone());
        if let Ok(value) = HeaderValue::from_str(id) {
            headers.insert("idempotency-key", value);
        }
        let request = self.http.post(&self.config.url).headers(headers);
        let fields = Fields {
            to,
            content,
            id,
            from: &self.config.from,
        };
        match self.config.shape.format {
            Format::Herald => request.json(&HeraldBody { to, content }),
            Format::Json => request.json(&fields.render(&self.config.shape.template)),
            Format::Form => {
                let rendered = fields.render(&self.config.shape.template);
                let pairs: Vec<(String, String)> = rendered
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                request.form(&pairs)
            }
        }
    }

    /// Sends one message (`id` is Herald's id: the `Idempotency-Key` and `{{id}}`) and
    /// classifies the answer. Never returns an error: every failure is an outcome.
    pub async fn send(&self, id: &str, to: &str, content: &str) -> DeliveryOutcome {
        let result = self.request(to, content, id).send().await;
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
        classify(status, &bytes, retry_after, &self.config.message_id_pointer)
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
            unsent: error.is_connect(),
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

/// The id at `pointer` in an accepted answer: a non-blank string or a number.
pub fn message_id_at(body: &[u8], pointer: &str) -> Option<String> {
    let answer = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    match answer.pointer(pointer)? {
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Classifies a complete answer, reading an accepted one's id at `pointer`. Public so the
/// rules can be tested without a network.
pub fn classify(status: StatusCode, body: &[u8], retry_after: Option<Duration>, pointer: &str) -> DeliveryOutcome {
    if status.is_success() {
        let message_id = message_id_at(body, pointer);
        if message_id.is_none() {
            tracing::warn!(
                status = status.as_u16(),
                pointer,
                "provider accepted without a parsable message id"
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
        unsent: false,
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

    fn config(url: String, timeout_ms: u64) -> WebhookConfig {
        WebhookConfig {
            url,
            auth: Auth::Header {
                header: "x-ins-auth-key".into(),
                key: SecretString::from("secret-key"),
            },
            shape: Shape::herald(),
            from: String::new(),
            message_id_pointer: HERALD_MESSAGE_ID_POINTER.into(),
            timeout: Duration::from_millis(timeout_ms),
            connect_timeout: Duration::from_millis(500),
            user_agent: "herald/test".into(),
        }
    }

    fn client(url: String, timeout_ms: u64) -> WebhookClient {
        WebhookClient::new(config(url, timeout_ms)).unwrap()
    }

    async fn send(client: &WebhookClient, id: &str) -> DeliveryOutcome {
        client.send(id, "+905551111111", "hello").await
    }

    #[test]
    fn a_key_that_is_no_header_value_is_refused_when_the_client_is_built() {
        let config = |key: &str| WebhookConfig {
            auth: Auth::Header {
                header: "x-ins-auth-key".into(),
                key: SecretString::from(key.to_owned()),
            },
            ..config("http://127.0.0.1:1/webhook".into(), 1000)
        };
        let error = WebhookClient::new(config("two\nlines")).unwrap_err();
        assert!(matches!(error, BuildError::AuthKey), "{error:?}");
        assert!(!format!("{error} {error:?}").contains("lines"), "the key was shown");
        assert!(WebhookClient::new(config("fine-key")).is_ok());
    }

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
        let outcome = send(&client(format!("{}/webhook", server.uri()), 2000), "msg-1").await;
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
        let outcome = send(&client(server.uri(), 200), "m").await;
        match outcome {
            DeliveryOutcome::Retryable { failure, .. } => assert_eq!(failure.kind, FailureKind::Timeout),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_retryable() {
        let outcome = send(&client("http://127.0.0.1:9/webhook".into(), 1000), "m").await;
        match outcome {
            DeliveryOutcome::Retryable { failure, .. } => {
                assert_eq!(failure.kind, FailureKind::Connection);
                assert!(failure.unsent, "a refused connection never reached the provider");
            }
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
        let outcome = send(&client(server.uri(), 1000), "m").await;
        assert!(matches!(outcome, DeliveryOutcome::Permanent { .. }), "{outcome:?}");
    }

    #[test]
    fn classifies_statuses_per_the_contract() {
        let ok = |s: u16, body: &str| classify(StatusCode::from_u16(s).unwrap(), body.as_bytes(), None, "/messageId");
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
        let limited = classify(StatusCode::TOO_MANY_REQUESTS, b"", Some(Duration::from_secs(7)), "");
        assert!(matches!(limited, DeliveryOutcome::Retryable { retry_after: Some(d), .. } if d.as_secs() == 7));
        let unavailable = classify(StatusCode::SERVICE_UNAVAILABLE, b"", Some(Duration::from_secs(3)), "");
        assert!(matches!(unavailable, DeliveryOutcome::Retryable { retry_after: Some(d), .. } if d.as_secs() == 3));
        let broken = classify(StatusCode::INTERNAL_SERVER_ERROR, b"", Some(Duration::from_secs(3)), "");
        assert!(matches!(broken, DeliveryOutcome::Retryable { retry_after: None, .. }));
    }

    #[test]
    fn reads_the_message_id_at_the_configured_pointer() {
        let body = br#"{"sid": "SM1", "messages": [{"id": "wamid.X", "messageId": 77}]}"#;
        assert_eq!(message_id_at(body, "/sid").as_deref(), Some("SM1"));
        assert_eq!(message_id_at(body, "/messages/0/id").as_deref(), Some("wamid.X"));
        assert_eq!(message_id_at(body, "/messages/0/messageId").as_deref(), Some("77"));
        assert_eq!(message_id_at(body, "/messages/1/id"), None);
        assert_eq!(message_id_at(b"not json", "/sid"), None);
    }

    #[test]
    fn templates_render_every_placeholder_inside_json_strings_only() {
        let fields = Fields {
            to: "+14155550100",
            content: "say \"hi\" {{to}}",
            id: "65f0",
            from: "HERALD",
        };
        let template = serde_json::json!({
            "messages": [{"from": "{{from}}", "destinations": [{"to": "{{ to }}"}], "text": "{{content}}"}],
            "ref": "herald-{{id}}",
            "n": 1
        });
        let body = fields.render(&template);
        assert_eq!(body["messages"][0]["destinations"][0]["to"], "+14155550100");
        assert_eq!(
            body["messages"][0]["text"], "say \"hi\" {{to}}",
            "content is not rendered again"
        );
        assert_eq!(body["ref"], "herald-65f0");
        assert_eq!(body["n"], 1);
        let shape = |format, template| Shape { format, template };
        assert!(shape(Format::Json, template).check().is_ok());
        let unknown = shape(Format::Json, serde_json::json!({"x": "{{phone}}"})).check();
        assert!(unknown.unwrap_err().contains("phone"));
        let nested = shape(Format::Form, serde_json::json!({"x": {"y": "{{to}}"}})).check();
        assert!(nested.unwrap_err().contains("must be a string"));
        assert!(shape(Format::Form, serde_json::json!({})).check().is_err());
        assert!(shape(Format::Json, serde_json::json!({"x": "{{to"})).check().is_err());
    }

    #[tokio::test]
    async fn a_form_provider_gets_a_form_body_with_basic_auth() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(header("authorization", "Basic QUMxOnRva2Vu"))
            .and(header("content-type", "application/x-www-form-urlencoded"))
            .and(wiremock::matchers::body_string_contains("To=%2B905551111111"))
            .and(wiremock::matchers::body_string_contains("From=HERALD"))
            .and(wiremock::matchers::body_string_contains("Body=hello"))
            .respond_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({"sid": "SM42"})))
            .expect(1)
            .mount(&server)
            .await;
        let twilio = WebhookClient::new(WebhookConfig {
            auth: Auth::Basic {
                user: "AC1".into(),
                key: SecretString::from("token"),
            },
            shape: Shape {
                format: Format::Form,
                template: serde_json::json!({"To": "{{to}}", "From": "{{from}}", "Body": "{{content}}"}),
            },
            from: "HERALD".into(),
            message_id_pointer: "/sid".into(),
            ..config(server.uri(), 2000)
        })
        .unwrap();
        let outcome = send(&twilio, "m1").await;
        assert_eq!(
            outcome,
            DeliveryOutcome::Accepted {
                message_id: Some("SM42".into()),
                status: 201
            }
        );
    }

    #[tokio::test]
    async fn a_bearer_provider_gets_its_token() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(header("authorization", "Bearer wa-token"))
            .and(body_json(
                serde_json::json!({"to": "+905551111111", "text": {"body": "hello"}}),
            ))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(serde_json::json!({"messages": [{"id": "wamid.1"}]})),
            )
            .expect(1)
            .mount(&server)
            .await;
        let whatsapp = WebhookClient::new(WebhookConfig {
            auth: Auth::Bearer {
                key: SecretString::from("wa-token"),
            },
            shape: Shape {
                format: Format::Json,
                template: serde_json::json!({"to": "{{to}}", "text": {"body": "{{content}}"}}),
            },
            message_id_pointer: "/messages/0/id".into(),
            ..config(server.uri(), 2000)
        })
        .unwrap();
        let outcome = send(&whatsapp, "m1").await;
        assert!(
            matches!(outcome, DeliveryOutcome::Accepted { message_id: Some(ref id), .. } if id == "wamid.1"),
            "{outcome:?}"
        );
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
