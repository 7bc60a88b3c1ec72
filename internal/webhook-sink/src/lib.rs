//! A local stand-in for the SMS provider, for demos, tests and benchmarks.
//!
//! `POST /webhook` checks the auth header, records the request, waits `latency`, then answers
//! `202 {"message":"Accepted","messageId":"<uuid v4>"}` — or, for a `fail_rate` share of
//! requests, `status` with an error body. `GET /webhook-sink/received` lists what arrived (with
//! each `Idempotency-Key`), so tests and people can count deliveries;
//! `PUT /webhook-sink/behaviour {"failRate", "status", "retryAfterSeconds"?, "failNext"?}`
//! changes how it answers while it runs (`failNext`: fail exactly the next n requests).
//!
//! It speaks one provider's shape ([`SinkFormat`]): Herald's own contract, or the request and
//! answer of Twilio's Messages API, Vonage's Messages API, Infobip's SMS API or WhatsApp Cloud
//! API — each with that provider's auth — so several stand-ins run side by side, one per
//! configured provider.

#![forbid(unsafe_code)]

pub mod callbacks;
pub mod receipts;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use herald_core::http::{self, Bound};
use layered_config::{ExposeSecret, SecretString};
use poem::endpoint::BoxEndpoint;
use poem::http::StatusCode;
use poem::web::{Data, Json};
use poem::{get, handler, post, EndpointExt, IntoResponse, Request, Response, Route};
use rand::Rng;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// Which provider the sink pretends to be: how it checks auth, reads the body and answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkFormat {
    /// Herald's contract: `{"to","content"}`, the key in a named header, `202 {"messageId"}`.
    #[default]
    Herald,
    /// Twilio Messages API: a form with `To`/`From`/`Body`, basic auth, `201 {"sid"}`.
    Twilio,
    /// Vonage Messages API: JSON `{"to","from","text","channel":"sms"}`, basic auth,
    /// `202 {"message_uuid"}`.
    Vonage,
    /// Infobip SMS: JSON `{"messages":[{"destinations":[{"to"}],"text"}]}`,
    /// `Authorization: App <key>`, `200 {"messages":[{"messageId"}]}`.
    Infobip,
    /// WhatsApp Cloud API: JSON `{"to","type":"text","text":{"body"}}`, a bearer token,
    /// `200 {"messages":[{"id"}]}`.
    Whatsapp,
}

impl SinkFormat {
    /// Every format.
    pub const ALL: [SinkFormat; 5] = [Self::Herald, Self::Twilio, Self::Vonage, Self::Infobip, Self::Whatsapp];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Herald => "herald",
            Self::Twilio => "twilio",
            Self::Vonage => "vonage",
            Self::Infobip => "infobip",
            Self::Whatsapp => "whatsapp",
        }
    }

    /// The format named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// Whether `req` carries `key` (and, for basic auth, user `user`) the way this provider
    /// expects it; compared in constant time.
    fn authorised(self, req: &Request, config: &SinkConfig) -> bool {
        let header = |name: &str| req.headers().get(name).map(|v| v.as_bytes()).unwrap_or_default();
        let key = config.auth_key.expose_secret();
        let expected = match self {
            Self::Herald => return bool::from(header(&config.auth_header).ct_eq(key.as_bytes())),
            Self::Twilio | Self::Vonage => {
                use base64::Engine as _;
                let pair = format!("{}:{key}", config.auth_user);
                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
            }
            Self::Infobip => format!("App {key}"),
            Self::Whatsapp => format!("Bearer {key}"),
        };
        bool::from(header("authorization").ct_eq(expected.as_bytes()))
    }

    /// The recipient and text of a request body in this shape.
    fn read(self, body: &[u8]) -> Option<Incoming> {
        let json = || serde_json::from_slice::<serde_json::Value>(body).ok();
        let text =
            |v: &serde_json::Value, pointer: &str| v.pointer(pointer).and_then(|s| s.as_str()).map(str::to_owned);
        match self {
            Self::Herald => serde_json::from_slice(body).ok(),
            Self::Twilio => {
                let field = |name: &str| {
                    form_urlencoded::parse(body)
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.into_owned())
                };
                Some(Incoming {
                    to: field("To")?,
                    content: field("Body")?,
                })
            }
            Self::Vonage => {
                let v = json()?;
                (text(&v, "/channel")? == "sms").then_some(())?;
                Some(Incoming {
                    to: text(&v, "/to")?,
                    content: text(&v, "/text")?,
                })
            }
            Self::Infobip => {
                let v = json()?;
                Some(Incoming {
                    to: text(&v, "/messages/0/destinations/0/to")?,
                    content: text(&v, "/messages/0/text")?,
                })
            }
            Self::Whatsapp => {
                let v = json()?;
                (text(&v, "/messaging_product")? == "whatsapp").then_some(())?;
                Some(Incoming {
                    to: text(&v, "/to")?,
                    content: text(&v, "/text/body")?,
                })
            }
        }
    }

    /// What the body should have been, for a 400.
    fn expected_body(self) -> &'static str {
        match self {
            Self::Herald => "Body must be {\"to\", \"content\"}",
            Self::Twilio => "Body must be a form with To and Body",
            Self::Vonage => "Body must be {\"channel\": \"sms\", \"to\", \"text\"}",
            Self::Infobip => "Body must be {\"messages\": [{\"destinations\": [{\"to\"}], \"text\"}]}",
            Self::Whatsapp => "Body must be {\"messaging_product\": \"whatsapp\", \"to\", \"text\": {\"body\"}}",
        }
    }

    /// A fresh id in this provider's style.
    fn new_id(self) -> String {
        let uuid = uuid::Uuid::new_v4();
        match self {
            Self::Twilio => format!("SM{}", uuid.simple()),
            Self::Whatsapp => format!("wamid.{}", uuid.simple()),
            _ => uuid.to_string(),
        }
    }

    /// The accepted answer carrying `id` for a message to `to`.
    fn accepted(self, id: &str, to: &str) -> Response {
        let (status, body) = match self {
            Self::Herald => (
                StatusCode::ACCEPTED,
                serde_json::json!({"message": "Accepted", "messageId": id}),
            ),
            Self::Twilio => (
                StatusCode::CREATED,
                serde_json::json!({"sid": id, "status": "queued", "to": to, "error_code": null}),
            ),
            Self::Vonage => (StatusCode::ACCEPTED, serde_json::json!({"message_uuid": id})),
            Self::Infobip => (
                StatusCode::OK,
                serde_json::json!({
                    "bulkId": format!("bulk-{id}"),
                    "messages": [{"messageId": id, "to": to, "status": {"groupName": "PENDING", "name": "PENDING_ACCEPTED"}}]
                }),
            ),
            Self::Whatsapp => (
                StatusCode::OK,
                serde_json::json!({
                    "messaging_product": "whatsapp",
                    "contacts": [{"input": to, "wa_id": to.trim_start_matches('+')}],
                    "messages": [{"id": id}]
                }),
            ),
        };
        Json(body).with_status(status).into_response()
    }
}

/// How the sink behaves.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Which provider it pretends to be.
    pub format: SinkFormat,
    /// For basic auth (Twilio, Vonage): the expected user.
    pub auth_user: String,
    /// Bind address.
    pub host: String,
    /// Bind port (0 = any free port).
    pub port: u16,
    /// Header that must carry the key.
    pub auth_header: String,
    /// The expected key.
    pub auth_key: SecretString,
    /// Added latency.
    pub latency: Duration,
    /// Share of requests that fail, 0.0..=1.0.
    pub fail_rate: f64,
    /// Status of an injected failure.
    pub fail_status: u16,
    /// Signed delivery receipts posted back to Herald (Herald's own format only).
    pub receipts: Option<receipts::ReceiptPlan>,
    /// The keys status callbacks to `/webhook-sink/callbacks` are checked with (none: taken
    /// unchecked).
    pub callback_keys: herald_core::callbacks::SigningKeys,
}

impl SinkConfig {
    /// A sink on a free loopback port expecting `x-ins-auth-key: <key>` (tests, benchmarks).
    pub fn local(key: &str, latency_ms: u64, fail_rate: f64) -> Self {
        Self {
            format: SinkFormat::Herald,
            auth_user: String::new(),
            host: "127.0.0.1".into(),
            port: 0,
            auth_header: "x-ins-auth-key".into(),
            auth_key: SecretString::from(key.to_owned()),
            latency: Duration::from_millis(latency_ms),
            fail_rate,
            fail_status: 500,
            receipts: None,
            callback_keys: herald_core::callbacks::SigningKeys::default(),
        }
    }
}

/// One request the sink received.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Received {
    /// The `Idempotency-Key` header (the Herald message id).
    pub idempotency_key: Option<String>,
    /// Recipient.
    pub to: String,
    /// Text.
    pub content: String,
    /// Status the sink answered (or will, after its latency).
    pub status: u16,
    /// The id it gave, when it accepted.
    pub message_id: Option<String>,
    /// When it arrived.
    pub received_at: DateTime<Utc>,
    /// Answered only after `slowMs` (a caller with a shorter timeout never hears the answer).
    #[serde(default)]
    pub slow: bool,
}

#[derive(Deserialize)]
struct Incoming {
    to: String,
    content: String,
}

#[derive(Clone)]
struct State {
    receipts: Option<receipts::Sender>,
    config: Arc<SinkConfig>,
    behaviour: Arc<Mutex<Behaviour>>,
    log: Arc<Mutex<Vec<Received>>>,
}

/// How the sink answers, changeable while it runs (`PUT /webhook-sink/behaviour`), so a demo or
/// a browser test can make the provider fail and recover without a restart.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Behaviour {
    /// Share of requests that fail, 0.0..=1.0.
    pub fail_rate: f64,
    /// Status of an injected failure.
    pub status: u16,
    /// `Retry-After` (seconds) sent with each injected failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// Fail exactly the next this many requests with `status` (then go back to `failRate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_next: Option<u32>,
    /// Share of requests answered 429 with `Retry-After: 1`, 0.0..=1.0 (after `failRate`).
    #[serde(default)]
    pub throttle_rate: f64,
    /// Share of requests accepted only after `slowMs`, 0.0..=1.0 (after the two above).
    #[serde(default)]
    pub slow_rate: f64,
    /// How long a slow answer takes, in milliseconds.
    #[serde(default)]
    pub slow_ms: u64,
}

/// What the sink does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Accept,
    AcceptSlowly,
    Fail,
    Throttle,
}

impl Behaviour {
    /// As configured at start.
    fn from_config(config: &SinkConfig) -> Self {
        Self {
            fail_rate: config.fail_rate,
            status: config.fail_status,
            retry_after_seconds: None,
            fail_next: None,
            throttle_rate: 0.0,
            slow_rate: 0.0,
            slow_ms: 0,
        }
    }

    /// How the next request is answered; counts down `fail_next`. One roll decides between
    /// the shares, in order: fail, throttle, slow, accept.
    fn next_answer(&mut self) -> Answer {
        if let Some(n) = self.fail_next.filter(|n| *n > 0) {
            self.fail_next = Some(n - 1);
            return Answer::Fail;
        }
        if self.fail_rate <= 0.0 && self.throttle_rate <= 0.0 && self.slow_rate <= 0.0 {
            return Answer::Accept;
        }
        let roll: f64 = rand::rng().random();
        if roll < self.fail_rate {
            Answer::Fail
        } else if roll < self.fail_rate + self.throttle_rate {
            Answer::Throttle
        } else if roll < self.fail_rate + self.throttle_rate + self.slow_rate {
            Answer::AcceptSlowly
        } else {
            Answer::Accept
        }
    }
}

/// The record of everything received, shared with tests.
#[derive(Clone, Default)]
pub struct ReceivedLog(Arc<Mutex<Vec<Received>>>);

impl ReceivedLog {
    /// A copy of what arrived so far.
    pub fn snapshot(&self) -> Vec<Received> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// A bound sink, ready to run.
pub struct WebhookSink {
    bound: Bound,
    app: BoxEndpoint<'static, Response>,
    log: ReceivedLog,
    callbacks: callbacks::CallbackLog,
}

fn message(status: StatusCode, text: &str) -> Response {
    Json(serde_json::json!({"message": text}))
        .with_status(status)
        .into_response()
}

#[handler]
async fn receive(req: &Request, body: poem::Body, state: Data<&State>) -> Response {
    let config = &state.config;
    let format = config.format;
    if !format.authorised(req, config) {
        return message(StatusCode::UNAUTHORIZED, "Missing or wrong auth key");
    }
    let Ok(bytes) = body.into_bytes_limit(64 * 1024).await else {
        return message(StatusCode::PAYLOAD_TOO_LARGE, "Body too large");
    };
    let Some(incoming) = format.read(&bytes) else {
        return message(StatusCode::BAD_REQUEST, format.expected_body());
    };
    let (answer, behaviour) = match state.behaviour.lock() {
        Ok(mut behaviour) => (behaviour.next_answer(), *behaviour),
        Err(_) => (Answer::Accept, Behaviour::from_config(config)),
    };
    let status = match answer {
        Answer::Accept | Answer::AcceptSlowly => 202,
        Answer::Fail => behaviour.status,
        Answer::Throttle => 429,
    };
    let accepted = matches!(answer, Answer::Accept | Answer::AcceptSlowly);
    let message_id = accepted.then(|| format.new_id());
    let to = incoming.to.clone();
    let idempotency_key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Ok(mut log) = state.log.lock() {
        log.push(Received {
            idempotency_key: idempotency_key.clone(),
            to: incoming.to,
            content: incoming.content,
            status,
            message_id: message_id.clone(),
            received_at: Utc::now(),
            slow: answer == Answer::AcceptSlowly,
        });
    }
    tracing::info!(
        idempotency_key = idempotency_key.as_deref().unwrap_or("-"),
        status,
        "webhook received"
    );
    if !config.latency.is_zero() {
        tokio::time::sleep(config.latency).await;
    }
    if answer == Answer::AcceptSlowly {
        tokio::time::sleep(std::time::Duration::from_millis(behaviour.slow_ms)).await;
    }
    if let (Some(sender), Some(id)) = (&state.receipts, &message_id) {
        sender.send(id.clone(), sender.plan()).await;
    }
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match message_id {
        Some(id) => format.accepted(&id, &to),
        None if answer == Answer::Throttle => {
            let mut response = message(StatusCode::TOO_MANY_REQUESTS, "Injected throttle");
            response
                .headers_mut()
                .insert(poem::http::header::RETRY_AFTER, poem::http::HeaderValue::from(1));
            response
        }
        None => {
            let mut response = message(status, "Injected failure");
            if let Some(seconds) = behaviour.retry_after_seconds {
                response
                    .headers_mut()
                    .insert(poem::http::header::RETRY_AFTER, poem::http::HeaderValue::from(seconds));
            }
            response
        }
    }
}

/// `GET /webhook-sink/receipts`: what the receipt sender did (all zero when it sends none).
#[handler]
fn receipt_counts(state: Data<&State>) -> Json<serde_json::Value> {
    Json(match &state.receipts {
        Some(sender) => serde_json::to_value(&*sender.counts).unwrap_or_default(),
        None => serde_json::json!({}),
    })
}

#[handler]
fn received(state: Data<&State>) -> Json<Vec<Received>> {
    Json(state.log.lock().map(|l| l.clone()).unwrap_or_default())
}

/// How many requests were received (cheap to poll while thousands arrive).
#[handler]
fn received_count(state: Data<&State>) -> Json<serde_json::Value> {
    let count = state.log.lock().map(|l| l.len()).unwrap_or_default();
    Json(serde_json::json!({ "count": count }))
}

#[handler]
fn change_behaviour(state: Data<&State>, body: Json<Behaviour>) -> Response {
    let wanted = body.0;
    let shares = [wanted.fail_rate, wanted.throttle_rate, wanted.slow_rate];
    if shares.iter().any(|r| !(0.0..=1.0).contains(r))
        || shares.iter().sum::<f64>() > 1.0
        || StatusCode::from_u16(wanted.status).is_err()
    {
        return message(
            StatusCode::BAD_REQUEST,
            "failRate, throttleRate and slowRate must be 0..=1 and add up to at most 1; status an HTTP status",
        );
    }
    if let Ok(mut behaviour) = state.behaviour.lock() {
        *behaviour = wanted;
    }
    tracing::info!(
        fail_rate = wanted.fail_rate,
        status = wanted.status,
        retry_after_seconds = wanted.retry_after_seconds,
        fail_next = wanted.fail_next,
        "sink behaviour changed"
    );
    Json(wanted).into_response()
}

#[handler]
fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "service": "webhook-sink"}))
}

impl WebhookSink {
    /// Binds the sink.
    pub async fn build(config: SinkConfig) -> anyhow::Result<Self> {
        let bound = http::bind(&config.host, config.port).await?;
        tracing::info!(
            address = %bound.addr,
            format = config.format.as_str(),
            latency_ms = config.latency.as_millis() as u64,
            fail_rate = config.fail_rate,
            fail_status = config.fail_status,
            "webhook sink listening on POST /webhook"
        );
        let log = ReceivedLog::default();
        let callback_log = callbacks::CallbackLog::new(config.callback_keys.clone());
        let state = State {
            receipts: config.receipts.clone().map(receipts::Sender::new),
            behaviour: Arc::new(Mutex::new(Behaviour::from_config(&config))),
            config: Arc::new(config),
            log: log.0.clone(),
        };
        let app = Route::new()
            .at("/webhook", post(receive))
            .at("/webhook-sink/received", get(received))
            .at("/webhook-sink/received/count", get(received_count))
            .at("/webhook-sink/behaviour", poem::put(change_behaviour))
            .at("/webhook-sink/health", get(health))
            .at("/webhook-sink/receipts", get(receipt_counts))
            .at("/webhook-sink/callbacks", post(callbacks::take).get(callbacks::list))
            .data(state)
            .data(callback_log.clone())
            .with(telemetry::CorrelationId)
            .boxed();
        Ok(Self {
            bound,
            app,
            log,
            callbacks: callback_log,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.bound.addr
    }

    /// The webhook URL.
    pub fn webhook_url(&self) -> String {
        format!("http://{}/webhook", self.bound.addr)
    }

    /// What arrived (shared; keeps filling while the sink runs).
    pub fn log(&self) -> ReceivedLog {
        self.log.clone()
    }

    /// The status callbacks taken at `/webhook-sink/callbacks`.
    pub fn callbacks(&self) -> callbacks::CallbackLog {
        self.callbacks.clone()
    }

    /// Binds and serves in the background for the life of the process; returns the webhook URL
    /// and the log of what arrives.
    pub async fn spawn(config: SinkConfig) -> anyhow::Result<(String, ReceivedLog)> {
        let sink = Self::build(config).await?;
        let url = sink.webhook_url();
        let log = sink.log();
        tokio::spawn(sink.run_until_stopped(std::future::pending()));
        Ok((url, log))
    }

    /// Serves until `signal` completes.
    pub async fn run_until_stopped<S>(self, signal: S) -> std::io::Result<()>
    where
        S: std::future::Future<Output = ()> + Send,
    {
        http::serve(self.bound, self.app, signal, Duration::from_secs(5)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sink(fail_rate: f64, latency_ms: u64) -> (String, ReceivedLog) {
        let mut config = SinkConfig::local("k", latency_ms, fail_rate);
        config.fail_status = 503;
        WebhookSink::spawn(config).await.unwrap()
    }

    #[tokio::test]
    async fn accepts_with_a_fresh_uuid_and_records_the_idempotency_key() {
        let (url, log) = sink(0.0, 0).await;
        let client = reqwest::Client::new();
        let response = client
            .post(&url)
            .header("x-ins-auth-key", "k")
            .header("idempotency-key", "m-1")
            .json(&serde_json::json!({"to": "+905551111111", "content": "hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["message"], "Accepted");
        let id = body["messageId"].as_str().unwrap();
        assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
        let seen = log.snapshot();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].idempotency_key.as_deref(), Some("m-1"));
    }

    #[tokio::test]
    async fn rejects_a_missing_or_wrong_key_and_a_bad_body() {
        let (url, log) = sink(0.0, 0).await;
        let client = reqwest::Client::new();
        let body = serde_json::json!({"to": "+905551111111", "content": "hi"});
        assert_eq!(client.post(&url).json(&body).send().await.unwrap().status(), 401);
        assert_eq!(
            client
                .post(&url)
                .header("x-ins-auth-key", "no")
                .json(&body)
                .send()
                .await
                .unwrap()
                .status(),
            401
        );
        assert_eq!(
            client
                .post(&url)
                .header("x-ins-auth-key", "k")
                .body("nope")
                .send()
                .await
                .unwrap()
                .status(),
            400
        );
        assert!(log.snapshot().is_empty());
    }

    #[tokio::test]
    async fn injects_failures_and_latency() {
        let (url, _) = sink(1.0, 150).await;
        let started = std::time::Instant::now();
        let response = reqwest::Client::new()
            .post(&url)
            .header("x-ins-auth-key", "k")
            .json(&serde_json::json!({"to": "+905551111111", "content": "hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    fn post_message<'a>(
        client: &'a reqwest::Client,
        url: &'a str,
    ) -> impl std::future::Future<Output = reqwest::Result<reqwest::Response>> + 'a {
        client
            .post(url)
            .header("x-ins-auth-key", "k")
            .json(&serde_json::json!({"to": "+905551111111", "content": "hi"}))
            .send()
    }

    #[tokio::test]
    async fn throttles_with_retry_after_and_accepts_slowly_when_told_to() {
        let (url, log) = sink(0.0, 0).await;
        let client = reqwest::Client::new();
        let behaviour = url.replace("/webhook", "/webhook-sink/behaviour");
        let set = |body: serde_json::Value| client.put(&behaviour).json(&body).send();
        let mix = serde_json::json!({"failRate": 0.0, "status": 500, "throttleRate": 1.0});
        assert_eq!(set(mix).await.unwrap().status(), 200);
        let throttled = post_message(&client, &url).await.unwrap();
        assert_eq!(throttled.status(), 429);
        assert_eq!(throttled.headers()["retry-after"], "1");

        let slow = serde_json::json!({"failRate": 0.0, "status": 500, "slowRate": 1.0, "slowMs": 200});
        assert_eq!(set(slow).await.unwrap().status(), 200);
        let started = std::time::Instant::now();
        assert_eq!(post_message(&client, &url).await.unwrap().status(), 202);
        assert!(started.elapsed() >= Duration::from_millis(200));
        let seen = log.snapshot();
        assert_eq!(
            seen.iter().map(|r| (r.status, r.slow)).collect::<Vec<_>>(),
            [(429, false), (202, true)]
        );

        let too_much = serde_json::json!({"failRate": 0.6, "status": 500, "slowRate": 0.6});
        assert_eq!(set(too_much).await.unwrap().status(), 400);
    }

    #[tokio::test]
    async fn its_behaviour_changes_while_it_runs() {
        let (url, _) = sink(0.0, 0).await;
        let client = reqwest::Client::new();
        let behaviour = url.replace("/webhook", "/webhook-sink/behaviour");
        let send = || post_message(&client, &url);
        let change = |fail_rate: f64| {
            client
                .put(&behaviour)
                .json(&serde_json::json!({"failRate": fail_rate, "status": 400}))
                .send()
        };
        assert_eq!(send().await.unwrap().status(), 202);
        assert_eq!(change(1.0).await.unwrap().status(), 200);
        assert_eq!(send().await.unwrap().status(), 400);
        assert_eq!(change(2.0).await.unwrap().status(), 400);
        assert_eq!(send().await.unwrap().status(), 400, "a refused change changes nothing");
    }

    #[tokio::test]
    async fn it_fails_exactly_the_next_n_requests_with_a_retry_after() {
        let (url, _) = sink(0.0, 0).await;
        let client = reqwest::Client::new();
        let send = || post_message(&client, &url);
        client
            .put(url.replace("/webhook", "/webhook-sink/behaviour"))
            .json(&serde_json::json!({"failRate": 0.0, "status": 429, "retryAfterSeconds": 5, "failNext": 2}))
            .send()
            .await
            .unwrap();
        for _ in 0..2 {
            let refused = send().await.unwrap();
            assert_eq!(refused.status(), 429);
            assert_eq!(refused.headers()["retry-after"], "5");
        }
        assert_eq!(send().await.unwrap().status(), 202, "then back to the fail rate");
    }
}
