//! Status callbacks out (SPEC §17): written to the outbox as a message changes, claimed and
//! POSTed by the scheduler's courier signed the Standard Webhooks way, retried on their
//! schedule while the receiver is away, dead-lettered (and told on the feed) when it never
//! answers, held per host on a 429, and never sent to an address that is not allowed — checked
//! before any connection, through a resolver the test controls.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use herald_core::callbacks::SigningKeys;
use herald_job_scheduler::callbacks::{Courier, CourierParts, Lookup};
use herald_webhook_sink::callbacks::CallbackLog;
use herald_webhook_sink::{receipts::ReceiptPlan, SinkConfig, WebhookSink};
use serde_json::{json, Value};

use crate::helpers::{eventually, Stack, KEY};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const RECEIPTS_SECRET: &str = "sink-receipts-secret";

/// One provider, the sink, that sends receipts back.
const PROVIDERS: &str = r#"
[[providers]]
name = "sink"
url = "http://127.0.0.1:9/webhook"
auth_key = "local-dev-webhook-key"
[providers.receipts]
scheme = "hmac-sha256"
secret = "sink-receipts-secret"
signature_header = "X-Sink-Signature"
message_id_field = "/messageId"
status_field = "/status"
status_map = { DELIVRD = "delivered", UNDELIV = "undelivered", ENROUTE = "sent" }

[[routes]]
prefix = ""
providers = ["sink"]
"#;

fn callback_settings(schedule: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("HERALD__CALLBACKS__SECRET", SECRET),
        ("HERALD__CALLBACKS__ALLOWED_HOSTS", "127.0.0.1"),
        ("HERALD__CALLBACKS__RETRY_SCHEDULE_SECONDS", schedule),
        ("HERALD__CALLBACKS__POLL_MS", "200"),
        ("HERALD__CALLBACKS__PAUSE_SECONDS", "2"),
        ("HERALD__DELIVERY__JITTER_PERCENT", "0"),
    ]
}

/// A receiver of callbacks on `port` (0: any), checking signatures with `secret`.
async fn receiver(port: u16, secret: &str) -> (String, CallbackLog) {
    let mut config = SinkConfig::local("unused", 0, 0.0);
    config.port = port;
    config.callback_keys = SigningKeys::parse(&[secret.to_owned().into()]).unwrap();
    let sink = WebhookSink::build(config).await.unwrap();
    let url = format!("http://{}/webhook-sink/callbacks", sink.addr());
    let log = sink.callbacks();
    tokio::spawn(sink.run_until_stopped(std::future::pending()));
    (url, log)
}

/// Creates a message asking for callbacks at `callback_url` (none: it asks for none).
async fn create(stack: &Stack, callback_url: Option<&str>) -> String {
    let mut body = json!({"to": "+905551234567", "content": "hello"});
    if let Some(url) = callback_url {
        body["callbackUrl"] = json!(url);
    }
    let created: Value = stack
        .http
        .post_json(&format!("{}/api/messenger/messages", stack.api_url), &body)
        .await;
    created["id"].as_str().unwrap().to_owned()
}

async fn callbacks_of(stack: &Stack, id: &str) -> Vec<Value> {
    let found = stack
        .http
        .get_json(&format!("{}/api/messenger/messages/{id}/callbacks", stack.api_url))
        .await;
    found.as_array().unwrap().clone()
}

/// Claims every due message through the API and commits it as sent (no provider involved).
async fn commit_all(stack: &Stack, n: u32) -> Vec<String> {
    let claimed: Vec<Value> = stack
        .http
        .post_json(
            &format!("{}/api/messenger/get-two", stack.api_url),
            &json!({"worker": "t", "limit": n}),
        )
        .await;
    let mut ids = Vec::new();
    for m in &claimed {
        let id = m["id"].as_str().unwrap();
        let response = stack
            .http
            .put(&format!("{}/api/messenger/commit/{id}", stack.api_url))
            .json(&json!({"claimToken": m["claimToken"], "webhookMessageId": format!("p-{id}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        ids.push(id.to_owned());
    }
    ids
}

#[tokio::test]
async fn a_sent_then_delivered_message_is_told_at_its_callback_url_signed_once_per_event() {
    let stack = Stack::start_routed(PROVIDERS, &callback_settings("1,2")).await;
    let (callback_url, received) = receiver(0, SECRET).await;
    // The provider stand-in sends every receipt twice and a late intermediate after the final.
    let mut config = SinkConfig::local("local-dev-webhook-key", 0, 0.0);
    config.receipts = Some(ReceiptPlan {
        url: format!("{}/api/messenger/receipts/sink", stack.api_url),
        secret: RECEIPTS_SECRET.to_owned().into(),
        delay: Duration::from_millis(100),
        undelivered: 0.0,
        duplicate: 1.0,
        out_of_order: 1.0,
        before_answer: 0.0,
        give_up_after: Duration::from_secs(30),
    });
    let (webhook, _) = WebhookSink::spawn(config).await.unwrap();
    let extra = callback_settings("1,2");
    let providers = PROVIDERS.replace("http://127.0.0.1:9/webhook", &webhook);
    let scheduler = stack.routed_scheduler(&providers, &extra).await;

    let mut asked = Vec::new();
    for _ in 0..4 {
        asked.push(create(&stack, Some(&callback_url)).await);
    }
    let silent = create(&stack, None).await;
    // Two a run (the card's pair): three runs send all five.
    for _ in 0..3 {
        scheduler.control.job().run_once().await;
    }
    assert_eq!(stack.count("sent").await, 5);

    eventually(
        Duration::from_secs(20),
        "a sent and a delivered callback per message",
        || async { received.snapshot().len() >= 8 },
    )
    .await;
    // Let any duplicate arrive before counting.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = received.snapshot();
    assert_eq!(got.len(), 8, "{got:?}");
    for id in &asked {
        let mine: Vec<_> = got.iter().filter(|c| &c.message_id == id).collect();
        let kinds: Vec<&str> = mine.iter().map(|c| c.kind.as_str()).collect();
        assert!(
            kinds.contains(&"message.sent") && kinds.contains(&"message.delivered"),
            "{kinds:?}"
        );
        for c in &mine {
            assert_eq!(c.verified, Some(true), "{c:?}");
            assert_eq!(c.times, 1, "each event told once: {c:?}");
            assert!(c.webhook_id.starts_with("msg_"));
        }
        let delivered = mine.iter().find(|c| c.kind == "message.delivered").unwrap();
        assert_eq!(delivered.delivery_state.as_deref(), Some("delivered"));
        // Visible per message, delivered at the first attempt.
        let outbox = callbacks_of(&stack, id).await;
        assert_eq!(outbox.len(), 2, "{outbox:?}");
        for c in &outbox {
            assert_eq!(c["status"], "delivered", "{c}");
            assert_eq!(c["attempts"], 1);
            assert_eq!(c["history"][0]["statusCode"], 204);
        }
    }
    assert!(got.iter().all(|c| c.message_id != silent));
    assert!(callbacks_of(&stack, &silent).await.is_empty());
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn a_receiver_down_for_30_seconds_gets_every_callback_afterwards_none_lost() {
    let extra = callback_settings("1,2,4,8,16,32");
    let stack = Stack::start(&extra).await;
    // A port with nothing listening yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let callback_url = format!("http://127.0.0.1:{port}/webhook-sink/callbacks");
    for _ in 0..6 {
        create(&stack, Some(&callback_url)).await;
    }
    let ids = commit_all(&stack, 6).await;
    let mut all = extra.clone();
    all.push(("HERALD__MESSENGER_API__URL", &stack.api_url));
    let scheduler = stack.scheduler("http://127.0.0.1:9/webhook", &all).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    // Down the whole time: retried, none delivered, none dead.
    for id in &ids {
        let outbox = callbacks_of(&stack, id).await;
        assert_eq!(outbox.len(), 1);
        assert_ne!(outbox[0]["status"], "delivered");
        assert_ne!(outbox[0]["status"], "dead", "{}", outbox[0]);
        assert!(outbox[0]["attempts"].as_i64().unwrap() >= 2, "retried: {}", outbox[0]);
    }
    let (_, received) = receiver(port, SECRET).await;
    eventually(
        Duration::from_secs(60),
        "every callback delivered once the receiver is up",
        || async { received.snapshot().len() == ids.len() },
    )
    .await;
    for id in &ids {
        let outbox = callbacks_of(&stack, id).await;
        assert_eq!(outbox[0]["status"], "delivered", "{}", outbox[0]);
        let history = outbox[0]["history"].as_array().unwrap();
        assert!(history.len() >= 2, "the failures are visible: {history:?}");
        assert!(history.iter().any(|h| h["result"] == "failed"));
    }
    assert!(received
        .snapshot()
        .iter()
        .all(|c| c.verified == Some(true) && c.times == 1));
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn a_callback_never_taken_is_dead_lettered_told_on_the_feed_and_can_be_sent_again() {
    let extra = callback_settings("1,1");
    let stack = Stack::start(&extra).await;
    // The receiver checks with another secret: it refuses every attempt (401).
    let (callback_url, received) = receiver(0, "whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVg==").await;
    let mut events = stack
        .http
        .get(&format!("{}/api/messenger/events", stack.api_url))
        .send()
        .await
        .unwrap();
    create(&stack, Some(&callback_url)).await;
    let id = commit_all(&stack, 1).await.remove(0);
    let mut all = extra.clone();
    all.push(("HERALD__MESSENGER_API__URL", &stack.api_url));
    let scheduler = stack.scheduler("http://127.0.0.1:9/webhook", &all).await;

    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(chunk)) = events.chunk().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains("event: callback.failed") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "callback.failed on the feed: {seen}");
    let outbox = callbacks_of(&stack, &id).await;
    assert_eq!(outbox[0]["status"], "dead");
    assert_eq!(
        outbox[0]["attempts"], 3,
        "the first attempt and two retries: {}",
        outbox[0]
    );
    assert_eq!(received.snapshot()[0].times, 3);
    let dead = stack
        .http
        .get_json(&format!("{}/api/messenger/callbacks?status=dead", stack.api_url))
        .await;
    assert_eq!(dead[0]["id"], outbox[0]["id"]);

    // An operator sends it again: pending, attempts from zero, audited.
    let cb = outbox[0]["id"].as_str().unwrap();
    let resent = stack
        .http
        .post(&format!("{}/api/messenger/callbacks/{cb}/resend", stack.api_url))
        .send()
        .await
        .unwrap();
    assert_eq!(resent.status(), 202);
    let again = stack
        .http
        .post(&format!("{}/api/messenger/callbacks/{cb}/resend", stack.api_url))
        .send()
        .await
        .unwrap();
    // Still on its way (or dead again only after three more attempts, seconds away).
    assert_eq!(again.status(), 409);
    let audit = stack
        .http
        .get_json(&format!("{}/api/messenger/audit", stack.api_url))
        .await;
    assert!(audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "callback.resend" && e["target"] == cb));
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn callback_urls_that_are_not_https_or_point_at_private_addresses_are_refused_at_create() {
    let stack = Stack::start(&[
        ("HERALD__CALLBACKS__ALLOWED_HOSTS", "hooks.internal"),
        ("HERALD__CALLBACKS__RESTRICT_TO_ALLOWED_HOSTS", "false"),
    ])
    .await;
    for url in [
        "http://example.com/hook",
        "https://10.0.0.1/hook",
        "https://192.168.1.20/hook",
        "https://169.254.169.254/latest",
        "https://[::1]/hook",
        "https://localhost/hook",
        "ftp://example.com/",
        "not a url",
    ] {
        let response = stack
            .http
            .post(&format!("{}/api/messenger/messages", stack.api_url))
            .json(&json!({"to": "+905551234567", "content": "x", "callbackUrl": url}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{url}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["internalCode"], 400020, "{url}: {body}");
    }
    // Nothing was stored.
    assert_eq!(stack.count("pending").await, 0);
    // Restricted (the test environment's own setting), only a listed host goes at all.
    let restricted = Stack::start(&[]).await;
    let refused = restricted
        .http
        .post(&format!("{}/api/messenger/messages", restricted.api_url))
        .json(&json!({"to": "+905551234567", "content": "x", "callbackUrl": "https://example.com/hook"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    restricted.cleanup().await;
    // https to a public name, and http to a listed host, are taken.
    for url in ["https://example.com/hook", "http://hooks.internal/cb"] {
        let id = create(&stack, Some(url)).await;
        assert_eq!(stack.message(&id).await["callbackUrl"], url);
    }
    stack.cleanup().await;
}

/// A resolver the test controls: names map to fixed addresses, and every lookup is recorded.
struct FixedLookup {
    names: Vec<(&'static str, SocketAddr)>,
    asked: Mutex<Vec<String>>,
}

impl Lookup for FixedLookup {
    fn lookup(&self, host: String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        self.asked.lock().unwrap().push(host.clone());
        let found: Vec<SocketAddr> = self.names.iter().filter(|(n, _)| *n == host).map(|(_, a)| *a).collect();
        Box::pin(async move { Ok(found) })
    }
}

fn courier(stack: &Stack, lookup: Arc<FixedLookup>, allowed: &[&str], concurrency: usize) -> Courier {
    let mut settings = herald_core::testing::settings_for(&stack.env, &callback_settings("5,5"));
    settings.callbacks.allowed_hosts = allowed.iter().map(|h| (*h).to_owned()).collect();
    settings.callbacks.restrict_to_allowed_hosts = false;
    settings.callbacks.concurrency = concurrency;
    Courier::new(CourierParts {
        messenger: herald_core::peer::PeerClient::new(&stack.api_url, KEY.to_owned().into(), Duration::from_secs(10))
            .unwrap(),
        redis: herald_core::redis_conn::lazy_connection(&settings.redis, Duration::from_millis(250)).unwrap(),
        key_prefix: settings.redis.key_prefix.clone(),
        worker: "courier-test".into(),
        settings: settings.callbacks.clone(),
        max_retry_after: Duration::from_secs(60),
        lookup,
        counted: prometheus::IntCounterVec::new(prometheus::Opts::new("t", "t"), &["result"]).unwrap(),
    })
    .unwrap()
}

#[tokio::test]
async fn a_name_resolving_to_a_private_address_is_refused_before_any_connection() {
    // Any https host is allowed at create here: the names resolve only through the test's own
    // resolver, never the system's.
    let stack = Stack::start(&[
        ("HERALD__CALLBACKS__ALLOWED_HOSTS", "listed.example.test"),
        ("HERALD__CALLBACKS__RESTRICT_TO_ALLOWED_HOSTS", "false"),
    ])
    .await;
    let (receiver_url, received) = receiver(0, SECRET).await;
    let port = reqwest::Url::parse(&receiver_url).unwrap().port().unwrap();
    let lookup = Arc::new(FixedLookup {
        names: vec![
            ("hooks.example.test", "10.0.0.7:0".parse().unwrap()),
            ("mixed.example.test", "93.184.215.14:0".parse().unwrap()),
            ("mixed.example.test", "192.168.3.4:0".parse().unwrap()),
            ("listed.example.test", "127.0.0.1:0".parse().unwrap()),
        ],
        asked: Mutex::new(Vec::new()),
    });
    // Both names pass the create-time checks (https, not an address).
    let private = create(&stack, Some("https://hooks.example.test/cb")).await;
    let mixed = create(&stack, Some("https://mixed.example.test/cb")).await;
    // A listed name resolving to loopback proves the client connects through this resolver.
    let listed = create(
        &stack,
        Some(&format!("http://listed.example.test:{port}/webhook-sink/callbacks")),
    )
    .await;
    commit_all(&stack, 3).await;
    let courier = courier(&stack, lookup.clone(), &["listed.example.test"], 8);
    assert_eq!(courier.run_once().await.unwrap(), 3);

    for id in [&private, &mixed] {
        let outbox = callbacks_of(&stack, id).await;
        assert_eq!(outbox[0]["status"], "dead", "refused at once: {}", outbox[0]);
        assert_eq!(outbox[0]["history"][0]["result"], "refused");
        let error = outbox[0]["lastError"].as_str().unwrap();
        assert!(error.contains("refused before connecting"), "{error}");
        // Nothing answered: the refusal came before a connection.
        assert!(outbox[0]["history"][0]["statusCode"].is_null());
    }
    let asked = lookup.asked.lock().unwrap().clone();
    assert!(asked.contains(&"hooks.example.test".to_owned()) && asked.contains(&"mixed.example.test".to_owned()));
    assert_eq!(callbacks_of(&stack, &listed).await[0]["status"], "delivered");
    assert_eq!(received.snapshot().len(), 1);
    assert_eq!(received.snapshot()[0].message_id, listed);
    stack.cleanup().await;
}

#[tokio::test]
async fn a_429_pauses_its_host_and_holds_its_other_callbacks_without_counting_attempts() {
    let stack = Stack::start(&callback_settings("5,5")).await;
    // A receiver that answers every request 429, Retry-After 30.
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    let app = poem::Route::new().at(
        "/cb",
        poem::post(poem::endpoint::make(move |_| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                poem::Response::builder()
                    .status(poem::http::StatusCode::TOO_MANY_REQUESTS)
                    .header("retry-after", "30")
                    .finish()
            }
        })),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    tokio::spawn(poem::Server::new(poem::listener::TcpListener::bind(format!("127.0.0.1:{port}"))).run(app));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        create(&stack, Some(&format!("http://127.0.0.1:{port}/cb"))).await;
    }
    let ids = commit_all(&stack, 3).await;
    let lookup = Arc::new(FixedLookup {
        names: Vec::new(),
        asked: Mutex::new(Vec::new()),
    });
    // One at a time: the first is answered 429, the two after it find the host paused.
    let courier = courier(&stack, lookup, &["127.0.0.1"], 1);
    assert_eq!(courier.run_once().await.unwrap(), 3);
    let reached = hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(reached, 1, "only the first reached the host");
    let mut failed = 0;
    let mut deferred = 0;
    for id in &ids {
        let c = callbacks_of(&stack, id).await.remove(0);
        assert_eq!(c["status"], "pending", "{c}");
        let due = chrono::DateTime::parse_from_rfc3339(c["nextAttemptAt"].as_str().unwrap()).unwrap();
        let wait = due.signed_duration_since(chrono::Utc::now()).num_seconds();
        assert!((20..=31).contains(&wait), "due again when the host is: {wait} s: {c}");
        match c["attempts"].as_i64().unwrap() {
            1 => failed += 1,
            0 => deferred += 1,
            other => panic!("{other} attempts"),
        }
    }
    assert_eq!(failed, reached);
    assert_eq!(deferred, 3 - reached);
    // Another round finds nothing due: the held ones wait for the host.
    assert_eq!(courier.run_once().await.unwrap(), 0);
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), reached);
    stack.cleanup().await;
}

#[tokio::test]
async fn failed_expired_and_retried_messages_write_their_callbacks_once() {
    let stack = Stack::start(&callback_settings("5")).await;
    let url = "http://127.0.0.1:9/never-called";
    for _ in 0..3 {
        create(&stack, Some(url)).await;
    }
    let claimed: Vec<Value> = stack
        .http
        .post_json(
            &format!("{}/api/messenger/get-two", stack.api_url),
            &json!({"worker": "t", "limit": 3}),
        )
        .await;
    let (fails, expires, retries) = (&claimed[0], &claimed[1], &claimed[2]);
    let fail = json!({"claimToken": fails["claimToken"], "error": {"kind": "http_status", "status": 400, "detail": "bad number"}, "retryable": false});
    let retry = json!({"claimToken": retries["claimToken"], "error": {"kind": "http_status", "status": 503, "detail": "busy"}, "retryable": true});
    let batch = json!({"items": [
        {"outcome": "failed", "id": fails["id"], "claimToken": fails["claimToken"], "error": fail["error"], "retryable": false},
        {"outcome": "expired", "id": expires["id"], "claimToken": expires["claimToken"]},
        {"outcome": "failed", "id": retries["id"], "claimToken": retries["claimToken"], "error": retry["error"], "retryable": true},
    ]});
    // Reported twice (a worker whose first report got no answer): the second writes nothing new.
    for _ in 0..2 {
        let _: Value = stack
            .http
            .post_json(&format!("{}/api/messenger/outcomes", stack.api_url), &batch)
            .await;
    }
    let of = |m: &Value| m["id"].as_str().unwrap().to_owned();
    let failed = callbacks_of(&stack, &of(fails)).await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["event"], "message.failed");
    assert_eq!(failed[0]["status"], "pending", "no courier runs here");
    let expired = callbacks_of(&stack, &of(expires)).await;
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["event"], "message.expired");
    // A retry scheduled is not an outcome the creator is told about.
    assert!(callbacks_of(&stack, &of(retries)).await.is_empty());
    let pending = stack
        .http
        .get_json(&format!("{}/api/messenger/callbacks?status=pending", stack.api_url))
        .await;
    assert_eq!(pending.as_array().unwrap().len(), 2);
    stack.cleanup().await;
}
