//! The live event feed (SSE and WebSocket), the stats and the console, against real servers:
//! events come from the database's change stream, so two API replicas share them.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::helpers::{assert_error, spawn_app, spawn_app_with, TestApp, KEY};

/// One Server-Sent Event.
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    id: Option<String>,
    data: Value,
}

/// Reads Server-Sent Events off a streaming response.
struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl SseReader {
    async fn open(app: &TestApp, query: &str, last_event_id: Option<&str>) -> Self {
        let mut request = app.get(&format!("/api/messenger/events{query}"));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        Self {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event (heartbeat comments skipped), or `None` at the end or after `wait`.
    async fn next(&mut self, wait: Duration) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Sse {
                    event: "message".into(),
                    id: None,
                    data: Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        event.event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        event.id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if data.is_empty() {
                    continue; // a heartbeat comment
                }
                event.data = serde_json::from_str(&data).unwrap();
                return Some(event);
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }

    /// Events until one of `id` has type `kind`.
    async fn until(&mut self, id: &str, kind: &str) -> Vec<Sse> {
        let mut seen = Vec::new();
        while let Some(event) = self.next(Duration::from_secs(10)).await {
            let done = event.event == kind && event.data["message"]["id"] == id;
            seen.push(event);
            if done {
                return seen;
            }
        }
        panic!("no {kind} for {id}; saw {seen:?}");
    }
}

fn kinds_of(events: &[Sse], id: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.data["message"]["id"] == id)
        .map(|e| e.event.clone())
        .collect()
}

/// Creates a message and answers its id.
async fn new_message(app: &TestApp, to: &str, content: &str) -> String {
    app.create(to, content).await["id"].as_str().unwrap().to_owned()
}

async fn claim_and_commit(app: &TestApp, id: &str) {
    let claimed = app.claim("w", 1).await;
    assert_eq!(claimed[0]["id"], id);
    let response = app
        .commit(id, claimed[0]["claimToken"].as_str().unwrap(), "provider-1")
        .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_commit_through_one_replica_reaches_a_subscriber_of_another() {
    let mut a = spawn_app().await;
    let b = a.replica().await;
    let mut feed = SseReader::open(&b, "", None).await;

    let id = new_message(&a, "+905551112233", "hello").await;
    claim_and_commit(&a, &id).await;

    let events = feed.until(&id, "message.sent").await;
    assert_eq!(
        kinds_of(&events, &id),
        ["message.created", "message.claimed", "message.sent"]
    );
    let sent = &events.last().unwrap().data;
    assert_eq!(sent["type"], "message.sent");
    assert_eq!(sent["message"]["status"], "sent");
    assert_eq!(sent["message"]["to"], "+905551112233");
    assert_eq!(sent["message"]["webhookMessageId"], "provider-1");
    assert_eq!(sent["message"]["attempts"], 1);
    assert!(events.iter().all(|e| e.id.as_deref().is_some_and(|id| !id.is_empty())));
    a.cleanup().await;
}

#[tokio::test]
async fn a_subscriber_that_resumes_with_last_event_id_gets_every_missed_event_once() {
    let app = spawn_app().await;
    let mut feed = SseReader::open(&app, "", None).await;
    let first = new_message(&app, "+905551112234", "one").await;
    let created = feed.until(&first, "message.created").await;
    let position = created.last().unwrap().id.clone().unwrap();
    drop(feed);

    // While nobody listens: a second message, and the first one sent.
    let second = new_message(&app, "+905551112235", "two").await;
    claim_and_commit(&app, &first).await;

    let mut resumed = SseReader::open(&app, "", Some(&position)).await;
    let events = resumed.until(&first, "message.sent").await;
    assert_eq!(kinds_of(&events, &first), ["message.claimed", "message.sent"]);
    assert_eq!(kinds_of(&events, &second), ["message.created"]);
    let ids: Vec<_> = events.iter().map(|e| e.id.clone().unwrap()).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "no event twice");
    assert!(!ids.contains(&position), "the resumed-from event is not repeated");
    // It goes on live after the gap.
    let third = new_message(&app, "+905551112236", "three").await;
    resumed.until(&third, "message.created").await;
    app.cleanup().await;
}

#[tokio::test]
async fn an_unknown_last_event_id_answers_reset_then_goes_on_live() {
    let app = spawn_app().await;
    for junk in ["not-a-token", "0500000000"] {
        let mut feed = SseReader::open(&app, "", Some(junk)).await;
        let first = feed.next(Duration::from_secs(10)).await.unwrap();
        assert_eq!(first.event, "reset", "{junk}");
        assert_eq!(first.id, None);
        let id = new_message(&app, "+905551112237", "after reset").await;
        feed.until(&id, "message.created").await;
    }
    app.cleanup().await;
}

#[tokio::test]
async fn filters_narrow_the_stream_to_a_status_or_one_message() {
    let app = spawn_app().await;
    let mut sent_only = SseReader::open(&app, "?status=sent", None).await;
    let ids = app.seed(2).await;
    let mut one = SseReader::open(&app, &format!("?id={}", ids[1]), None).await;
    claim_and_commit(&app, &ids[0]).await;
    claim_and_commit(&app, &ids[1]).await;

    let events = sent_only.until(&ids[1], "message.sent").await;
    assert!(events.iter().all(|e| e.event == "message.sent"), "{events:?}");
    assert_eq!(events.len(), 2);
    let events = one.until(&ids[1], "message.sent").await;
    assert!(events.iter().all(|e| e.data["message"]["id"] == ids[1].as_str()));
    // The stream may still be delivering the insert when this subscriber joins.
    let kinds = kinds_of(&events, &ids[1]);
    let kinds: Vec<&str> = kinds
        .iter()
        .map(|k| k.as_ref())
        .filter(|k| *k != "message.created")
        .collect();
    assert_eq!(kinds, ["message.claimed", "message.sent"]);

    let bad = app.get("/api/messenger/events?status=bogus").send().await.unwrap();
    assert_error(bad, 400, 400012).await;
    let bad = app.get("/api/messenger/events?id=nope").send().await.unwrap();
    assert_error(bad, 400, 400006).await;
    app.cleanup().await;
}

#[tokio::test]
async fn job_state_changes_are_events_too() {
    let app = spawn_app().await;
    let mut feed = SseReader::open(&app, "", None).await;
    let jobs = app.env.db().collection::<bson::Document>("job_state");
    jobs.insert_one(
        bson::doc! {"_id": "messenger", "working": true, "changed_at": bson::DateTime::now(), "changed_by": "test"},
    )
    .await
    .unwrap();
    jobs.update_one(
        bson::doc! {"_id": "messenger"},
        bson::doc! {"$set": {"working": false, "changed_by": "operator"}},
    )
    .await
    .unwrap();
    let started = feed.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(started.event, "job.started");
    assert_eq!(started.data["job"]["working"], true);
    let stopped = feed.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(stopped.event, "job.stopped");
    assert_eq!(stopped.data["job"]["changedBy"], "operator");
    app.cleanup().await;
}

#[tokio::test]
async fn provider_pauses_and_resumes_are_events_and_shown_in_the_stats() {
    let app = spawn_app().await;
    let mut feed = SseReader::open(&app, "", None).await;
    let state = app.env.db().collection::<bson::Document>("provider_state");
    let jobs = app.env.db().collection::<bson::Document>("job_state");
    jobs.insert_one(
        bson::doc! {"_id": "messenger", "working": true, "changed_at": bson::DateTime::now(), "changed_by": "test"},
    )
    .await
    .unwrap();
    // What the scheduler writes: a failure count (no event), a pause, a resume.
    state
        .insert_one(bson::doc! {"_id": "default", "failure_streak": 1})
        .await
        .unwrap();
    let until = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + 60_000);
    state
        .update_one(
            bson::doc! {"_id": "default"},
            bson::doc! {"$set": {"paused_until": until, "reason": "provider asked to wait 60s (Retry-After)", "failure_streak": 0}},
        )
        .await
        .unwrap();
    let stats = app.get_json("/api/messenger/stats").await;
    assert_eq!(stats["job"]["provider"]["state"], "paused", "{stats}");
    state
        .update_one(
            bson::doc! {"_id": "default"},
            bson::doc! {"$set": {"paused_until": null, "reason": null}},
        )
        .await
        .unwrap();
    let mut kinds = Vec::new();
    while let Some(event) = feed.next(Duration::from_secs(5)).await {
        if event.event.starts_with("provider.") {
            kinds.push(event.clone());
        }
        if event.event == "provider.resumed" {
            break;
        }
    }
    let names: Vec<&str> = kinds.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["provider.paused", "provider.resumed"]);
    assert!(kinds[0].data["provider"]["reason"]
        .as_str()
        .unwrap()
        .contains("Retry-After"));
    assert!(kinds[0].data["provider"]["pausedUntil"].is_string());
    assert_eq!(kinds[1].data["provider"]["pausedUntil"], Value::Null);
    assert_eq!(kinds[0].data["provider"]["name"], "default");
    assert_eq!(
        app.get_json("/api/messenger/stats").await["job"]["provider"]["state"],
        "open"
    );
    // A provider that refuses Herald's credentials is paused as misconfigured: its own event.
    state
        .update_one(
            bson::doc! {"_id": "default"},
            bson::doc! {"$set": {"paused_until": until, "reason": "provider refused Herald's credentials (HTTP 401)", "misconfigured": true}},
        )
        .await
        .unwrap();
    let mut misconfigured = None;
    while let Some(event) = feed.next(Duration::from_secs(5)).await {
        if event.event.starts_with("provider.") {
            misconfigured = Some(event);
            break;
        }
    }
    let misconfigured = misconfigured.expect("a provider event");
    assert_eq!(misconfigured.event, "provider.misconfigured");
    assert_eq!(misconfigured.data["provider"]["name"], "default");
    let stats = app.get_json("/api/messenger/stats").await;
    assert_eq!(stats["providers"][0]["state"], "misconfigured", "{stats}");
    app.cleanup().await;
}

#[tokio::test]
async fn neither_events_nor_console_data_are_given_without_a_key() {
    let app = spawn_app().await;
    for path in [
        "/api/messenger/events",
        "/api/messenger/stats",
        "/api/messenger/job/runs",
    ] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_error(response, 401, 401001).await;
    }
    let wrong = app
        .client
        .get(app.url("/api/messenger/events"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_error(wrong, 401, 401001).await;

    // A WebSocket whose first frame carries a wrong key is closed, with no event.
    let (mut socket, _) = tokio_tungstenite::connect_async(app.ws_url()).await.unwrap();
    socket
        .send(WsMessage::text(json!({"auth": "wrong"}).to_string()))
        .await
        .unwrap();
    match socket.next().await {
        Some(Ok(WsMessage::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1008),
        other => panic!("expected a policy close, got {other:?}"),
    }
    // The console page itself is open (it asks for the key), with a strict CSP.
    let page = app.client.get(app.url("/messenger/console")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(page.text().await.unwrap().contains("app.js"));
    app.cleanup().await;
}

async fn ws_next_json(socket: &mut WsStream) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(WsMessage::Text(text)))) => return serde_json::from_str(&text).unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[tokio::test]
async fn the_websocket_takes_the_key_in_its_first_frame_and_narrows_with_subscribe() {
    let app = spawn_app().await;
    let (mut socket, _) = tokio_tungstenite::connect_async(app.ws_url()).await.unwrap();
    socket
        .send(WsMessage::text(json!({"auth": KEY}).to_string()))
        .await
        .unwrap();
    assert_eq!(ws_next_json(&mut socket).await["type"], "ready");
    let id = new_message(&app, "+905551112238", "ws").await;
    let created = ws_next_json(&mut socket).await;
    assert_eq!(created["type"], "message.created");
    assert_eq!(created["message"]["id"], id.as_str());

    let other = new_message(&app, "+905551112239", "other").await;
    assert_eq!(ws_next_json(&mut socket).await["message"]["id"], other.as_str());
    socket
        .send(WsMessage::text(
            json!({"subscribe": {"ids": [&id], "status": ["sent"]}}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(ws_next_json(&mut socket).await["type"], "subscribed");
    // Claimed together, `other` committed first: only `id`'s sent event comes through.
    let claimed = app.claim("w", 2).await;
    for message in claimed.iter().rev() {
        let (mid, token) = (message["id"].as_str().unwrap(), message["claimToken"].as_str().unwrap());
        assert_eq!(app.commit(mid, token, "p").await.status(), 200);
    }
    let sent = ws_next_json(&mut socket).await;
    assert_eq!(sent["type"], "message.sent");
    assert_eq!(
        sent["message"]["id"],
        id.as_str(),
        "the other message's events are filtered out"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_websocket_client_that_stops_answering_pings_is_dropped() {
    let app = spawn_app_with(&[("HERALD__EVENTS__WS_PING_SECONDS", "1")]).await;
    let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(app.ws_url())
        .map(|mut r| {
            r.headers_mut()
                .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
            r
        })
        .unwrap();
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(ws_next_json(&mut socket).await["type"], "ready");
    // Stop reading, so no pong goes back.
    tokio::time::sleep(Duration::from_millis(3600)).await;
    // Reading again, the client finds the queued pings and then the server's close (or, as
    // it answers a ping on a socket the server already shut, a broken pipe).
    let mut closed = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
            Ok(Some(Ok(WsMessage::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => {
                closed = true;
                break;
            }
            Ok(Some(Ok(_))) => continue,
            Err(_) => break,
        }
    }
    assert!(closed, "the server closed the socket after two missed pongs");
    let metrics = app.open_text("/metrics").await;
    assert!(
        metrics.contains(r#"herald_event_subscribers_dropped_total{reason="ping_timeout"} 1"#),
        "{metrics}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_subscriber_that_never_reads_is_cut_off_with_a_final_event_and_memory_stays_bounded() {
    let app = spawn_app_with(&[("HERALD__EVENTS__SUBSCRIBER_BUFFER", "16")]).await;
    // A raw connection with a small receive window that sends the request and then reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket
        .connect(app.address.trim_start_matches("http://").parse().unwrap())
        .await
        .unwrap();
    stream
        .write_all(
            format!("GET /api/messenger/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let gauge = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("herald_event_subscribers "))
            .map(|l| l.trim_start_matches("herald_event_subscribers ").to_owned())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while gauge(&app.open_text("/metrics").await).as_deref() != Some("1") {
        assert!(Instant::now() < deadline, "the subscriber never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Far more events than the buffer, the socket and the server's write buffer hold.
    let mut dropped = false;
    for _ in 0..12 {
        app.seed(1000).await;
        let metrics = app.open_text("/metrics").await;
        if metrics.contains(r#"herald_event_subscribers_dropped_total{reason="slow"} 1"#) {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "the slow subscriber was cut off");

    // Reading now: what was queued, then the final `dropped` event, then the end of the stream.
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "the server ended the stream");
    let text = String::from_utf8_lossy(&received);
    let created = text.matches("event: message.created").count();
    let tail = &text[text.rfind("event: ").unwrap()..];
    assert!(
        tail.starts_with("event: dropped"),
        "the last event is `dropped`: {tail}"
    );
    assert!(created < 12_000, "not every event was queued for it ({created})");
    let deadline = Instant::now() + Duration::from_secs(5);
    while gauge(&app.open_text("/metrics").await).as_deref() != Some("0") {
        assert!(Instant::now() < deadline, "the subscriber gauge went back to 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.cleanup().await;
}

#[tokio::test]
async fn stats_count_by_status_and_sends_per_minute() {
    let app = spawn_app_with(&[("HERALD__JOB_SCHEDULER__URL", "http://127.0.0.1:1")]).await;
    let ids = app.seed(3).await;
    let claimed = app.claim("w", 1).await;
    let token = claimed[0]["claimToken"].as_str().unwrap();
    for _ in 0..2 {
        // The second commit replays the first: counted once.
        assert_eq!(app.commit(&ids[0], token, "p").await.status(), 200);
    }
    let stats: Value = app.get_json("/api/messenger/stats").await;
    assert_eq!(stats["counts"]["pending"], 2);
    assert_eq!(stats["counts"]["sent"], 1);
    assert_eq!(stats["counts"]["total"], 3);
    assert_eq!(stats["sentLastHour"], 1);
    let minutes = stats["sentPerMinute"].as_array().unwrap();
    assert_eq!(minutes.len(), 60);
    assert_eq!(minutes[59]["sent"], 1, "{stats}");
    assert!(stats["oldestDueAgeSeconds"].as_f64().unwrap() >= 0.0);
    assert!(stats["job"].is_null(), "no scheduler has started in this database");

    // No scheduler is listening: the run history is a clear 502.
    let runs = app.get("/api/messenger/job/runs").send().await.unwrap();
    assert_error(runs, 502, 502001).await;
    app.cleanup().await;
}

/// Creates a message, retrying while the API answers 503 (the database is coming back).
async fn create_when_back(app: &TestApp, to: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = app
            .post("/api/messenger/messages")
            .json(&json!({"to": to, "content": "after the restart"}))
            .send()
            .await
            .unwrap();
        if response.status() == 201 {
            return response.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned();
        }
        assert!(Instant::now() < deadline, "the API did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_feed_goes_on_by_itself_after_the_database_is_restarted_or_killed() {
    let mut db = test_support::PrivateDatabase::start().await;
    let uri = db.uri();
    let app = spawn_app_with(&[
        ("HERALD__MONGO__URI", uri.as_str()),
        ("HERALD__MONGO__SERVER_SELECTION_TIMEOUT_MS", "1000"),
    ])
    .await;
    let mut feed = SseReader::open(&app, "", None).await;
    let first = new_message(&app, "+905551112240", "before").await;
    feed.until(&first, "message.created").await;

    // A clean restart: the feed resumes after its last event, with no gap and no reset.
    db.stop();
    let down = app
        .post("/api/messenger/messages")
        .json(&json!({"to": "+905551112241", "content": "while down"}))
        .send()
        .await
        .unwrap();
    assert_error(down, 503, 503001).await;
    db.launch().await;
    let second = create_when_back(&app, "+905551112242").await;
    let events = feed.until(&second, "message.created").await;
    assert!(events.iter().all(|e| e.event != "reset"), "{events:?}");
    assert!(kinds_of(&events, &first).is_empty(), "nothing repeated: {events:?}");

    // A SIGKILL: SecantusDB loses the tail of its change history, so the feed cannot resume
    // from its position. Subscribers are told (`reset`: re-read a snapshot) and the feed goes
    // on live; what a client creates after the reset arrives as usual.
    db.kill();
    db.launch().await;
    let third = create_when_back(&app, "+905551112243").await;
    let mut seen = Vec::new();
    while let Some(event) = feed.next(Duration::from_secs(10)).await {
        let done = event.event == "reset" || event.data["message"]["id"] == third.as_str();
        seen.push(event);
        if done {
            break;
        }
    }
    let last = seen.last().expect("the feed said something after the crash");
    if last.event == "reset" {
        let fourth = create_when_back(&app, "+905551112244").await;
        let after = feed.until(&fourth, "message.created").await;
        assert!(after.iter().all(|e| e.event != "reset"), "one reset: {after:?}");
    }
    assert!(kinds_of(&seen, &second).is_empty(), "nothing repeated: {seen:?}");
    app.cleanup().await;
}

/// How long the message `id` has been due at `at` (RFC 3339), in seconds.
async fn due_for(app: &TestApp, id: &str, at: &str) -> f64 {
    let message = app.message(id).await;
    let due = chrono::DateTime::parse_from_rfc3339(message["nextAttemptAt"].as_str().unwrap()).unwrap();
    let at = chrono::DateTime::parse_from_rfc3339(at).unwrap();
    (at - due).num_milliseconds() as f64 / 1000.0
}

/// Asserts the stats' oldest-due age is the age of `oldest` (or 0 for none).
async fn assert_oldest(app: &TestApp, oldest: Option<&str>, step: &str) {
    let stats = app.get_json("/api/messenger/stats").await;
    let age = stats["oldestDueAgeSeconds"].as_f64().unwrap();
    let expected = match oldest {
        Some(id) => due_for(app, id, stats["generatedAt"].as_str().unwrap()).await,
        None => 0.0,
    };
    assert!((age - expected).abs() < 0.5, "{step}: age {age}, expected {expected}");
}

#[tokio::test]
async fn the_oldest_due_age_follows_claims_retries_requeues_and_schedules() {
    let app = spawn_app_with(&[("HERALD__DELIVERY__JITTER_PERCENT", "0")]).await;
    let a = new_message(&app, "+905550000001", "a").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let b = new_message(&app, "+905550000002", "b").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let c = new_message(&app, "+905550000003", "c").await;
    let later = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc3339();
    let scheduled: Value = app
        .post("/api/messenger/messages")
        .json(&json!({"to": "+905550000004", "content": "later", "sendAt": later}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_oldest(&app, Some(&a), "three due, one scheduled").await;

    // Claimed: the next one is the oldest.
    let held = app.claim("w", 1).await;
    assert_eq!(held[0]["id"], a.as_str());
    assert_oldest(&app, Some(&b), "a claimed").await;
    // A retry puts it back a second from now: b stays the oldest.
    let failed = app
        .put(&format!("/api/messenger/fail/{a}"))
        .json(&json!({"claimToken": held[0]["claimToken"], "error": {"kind": "http_status", "status": 503, "detail": "busy"}, "retryable": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 200);
    assert_oldest(&app, Some(&b), "a retried").await;
    // b and c sent; a due again after its retry delay.
    for expected in [&b, &c] {
        let held = app.claim("w", 1).await;
        let id = held[0]["id"].as_str().unwrap();
        assert_eq!(id, expected.as_str(), "oldest due first");
        assert_eq!(
            app.commit(id, held[0]["claimToken"].as_str().unwrap(), id)
                .await
                .status(),
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_oldest(&app, Some(&a), "a due again").await;
    // a fails for good: nothing due but the scheduled one, which is not due yet.
    let held = app.claim("w", 1).await;
    assert_eq!(held[0]["id"], a.as_str());
    let failed = app
        .put(&format!("/api/messenger/fail/{a}"))
        .json(&json!({"claimToken": held[0]["claimToken"], "error": {"kind": "http_status", "status": 400, "detail": "bad"}, "retryable": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 200);
    assert_oldest(&app, None, "only a scheduled message left").await;
    // Re-queued by an operator: due from now.
    let requeued = app
        .post(&format!("/api/messenger/messages/{a}/retry"))
        .send()
        .await
        .unwrap();
    assert_eq!(requeued.status(), 202);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_oldest(&app, Some(&a), "a re-queued").await;
    assert!(scheduled["id"].is_string());
    app.cleanup().await;
}

#[tokio::test]
async fn the_oldest_due_age_finds_a_due_time_edited_to_before_every_message() {
    let app = spawn_app().await;
    let ids = app.seed(3).await;
    assert_oldest(&app, Some(&ids[0]), "as seeded").await;
    // By hand, to before the oldest message was even created.
    let long_ago = bson::DateTime::parse_rfc3339_str("1999-12-31T23:59:59Z").unwrap();
    app.set_due(&ids[2], long_ago).await;
    assert_oldest(&app, Some(&ids[2]), "edited back").await;
    let held = app.claim("w", 1).await;
    assert_eq!(held[0]["id"], ids[2].as_str(), "claimed first too");
    assert_oldest(&app, Some(&ids[0]), "the edited one claimed").await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_counts_of_a_fresh_database_are_exact_from_its_first_create() {
    // A campaign imported right after the first start needs no recount: the counts start
    // exact before the API listens, and every create keeps them so.
    let app = spawn_app_with(&[("HERALD__MESSENGER_API__COUNT_RECONCILE_SECONDS", "600")]).await;
    app.seed(40).await;
    let stats = app.get_json("/api/messenger/stats").await;
    assert_eq!(
        (stats["countsExact"].as_bool(), stats["counts"]["pending"].as_u64()),
        (Some(true), Some(40)),
        "{stats}"
    );
    let counts = app.env.db().collection::<bson::Document>("message_counts");
    let kept = counts.find_one(bson::doc! {}).await.unwrap().unwrap();
    assert!(kept.get_datetime("reconciled_at").is_ok(), "started by the API: {kept}");
    app.cleanup().await;
}

#[tokio::test]
async fn counts_not_yet_checked_are_served_as_kept_and_marked_until_reconciled() {
    // The period is long: only a reader's finding can bring the correction this soon.
    let app = spawn_app_with(&[("HERALD__MESSENGER_API__COUNT_RECONCILE_SECONDS", "600")]).await;
    app.seed(3).await;
    // As after a start on a collection written without its counts, or a database that lost
    // its latest count writes: kept, not known exact.
    let counts = app.env.db().collection::<bson::Document>("message_counts");
    counts
        .update_one(
            bson::doc! {"_id": "messages"},
            bson::doc! {"$set": {"exact": false, "pending": 999_i64}},
        )
        .await
        .unwrap();
    let stats = app.get_json("/api/messenger/stats").await;
    assert_eq!(stats["countsExact"], false, "{stats}");
    assert_eq!(
        stats["counts"]["pending"], 999,
        "served as kept, not recounted per reader"
    );
    let metrics = app.open_text("/metrics").await;
    assert!(metrics.contains("herald_message_counts_exact 0"), "{metrics}");
    // The reconciliation the readers asked for corrects and marks them.
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let stats = app.get_json("/api/messenger/stats").await;
        if stats["countsExact"] == true {
            assert_eq!(stats["counts"]["pending"], 3);
            break;
        }
        assert!(Instant::now() < deadline, "never reconciled: {stats}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    app.cleanup().await;
}
