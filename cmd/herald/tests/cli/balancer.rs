//! Two Messenger API processes behind a real HAProxy: the scheduler and two live-feed
//! subscribers (SSE and WebSocket) go through the balancer; the API process they are on is
//! SIGKILLed mid-drain. Sending goes on through the other, each subscriber reconnects through
//! the balancer with its last event id and misses no event, nothing is lost and nothing is
//! sent twice.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use herald_core::testing::stack::haproxy;

use crate::helpers::{free_port, stack};

/// The replica that answered (HAProxy's `X-Herald-Backend`).
fn backend_of(headers: &reqwest::header::HeaderMap) -> String {
    headers
        .get("x-herald-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned()
}

/// What the subscriber saw: the messages it saw sent, the replica of each connection.
#[derive(Default)]
struct Seen {
    sent: HashSet<String>,
    backends: Vec<String>,
}

/// Reads the live feed through `url`, reconnecting with `Last-Event-ID` whenever it breaks,
/// and collects the ids of the messages it saw sent into `seen`, until `stop`.
async fn subscribe(url: String, key: String, seen: Arc<Mutex<Seen>>, stop: tokio_util::sync::CancellationToken) {
    let client = reqwest::Client::new();
    let mut last_id: Option<String> = None;
    while !stop.is_cancelled() {
        let mut request = client.get(&url).bearer_auth(&key).header("accept", "text/event-stream");
        if let Some(id) = &last_id {
            request = request.header("Last-Event-ID", id);
        }
        let Ok(response) = request.send().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if !response.status().is_success() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let backend = backend_of(response.headers());
        seen.lock().unwrap().backends.push(backend);
        let mut body = response.bytes_stream();
        let mut buffer = String::new();
        let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
        loop {
            let chunk = tokio::select! {
                chunk = body.next() => chunk,
                () = stop.cancelled() => return,
            };
            let Some(Ok(chunk)) = chunk else { break };
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find('\n') {
                let line = buffer[..end].trim_end_matches('\r').to_owned();
                buffer.drain(..=end);
                if line.is_empty() {
                    if event == "message.sent" {
                        let value: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
                        if let Some(message) = value["message"]["id"].as_str() {
                            seen.lock().unwrap().sent.insert(message.to_owned());
                        }
                    }
                    if !id.is_empty() {
                        last_id = Some(id.clone());
                    }
                    (id, event, data) = (String::new(), String::new(), String::new());
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
        }
    }
}

/// The same over the WebSocket: `{"auth", "lastEventId"}` first, then a `subscribe` to sent
/// messages; reconnects after a break. The first connection is made to the replica `on`
/// (HAProxy alternates, so a connection on the other one is closed and made again).
async fn subscribe_ws(
    url: String,
    key: String,
    on: String,
    seen: Arc<Mutex<Seen>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut last_id: Option<String> = None;
    while !stop.is_cancelled() {
        let Ok((mut socket, response)) = tokio_tungstenite::connect_async(url.as_str()).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let backend = backend_of(response.headers());
        if seen.lock().unwrap().backends.is_empty() && backend != on {
            let _ = socket.close(None).await;
            continue;
        }
        seen.lock().unwrap().backends.push(backend);
        let mut login = serde_json::json!({"auth": key});
        if let Some(id) = &last_id {
            login["lastEventId"] = serde_json::Value::String(id.clone());
        }
        let subscribe = serde_json::json!({"subscribe": {"status": ["sent"]}});
        if socket.send(WsMessage::text(login.to_string())).await.is_err()
            || socket.send(WsMessage::text(subscribe.to_string())).await.is_err()
        {
            continue;
        }
        loop {
            let frame = tokio::select! {
                frame = socket.next() => frame,
                () = stop.cancelled() => return,
            };
            match frame {
                Some(Ok(WsMessage::Text(text))) => {
                    let event: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                    if event["type"] == "message.sent" {
                        if let Some(message) = event["message"]["id"].as_str() {
                            seen.lock().unwrap().sent.insert(message.to_owned());
                        }
                    }
                    if let Some(id) = event["id"].as_str().filter(|id| !id.is_empty()) {
                        last_id = Some(id.to_owned());
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
    }
}

#[tokio::test]
async fn an_api_replica_killed_behind_haproxy_mid_drain_loses_nothing_and_the_feed_misses_no_event() {
    let balancer_port = free_port();
    let balanced = format!("http://127.0.0.1:{balancer_port}");
    let stack = stack(&[
        ("HERALD__MESSENGER_API__URL", balanced.as_str()),
        ("HERALD__JOB_SCHEDULER__DRAIN", "true"),
        ("HERALD__JOB_SCHEDULER__IDLE_POLL_MS", "50"),
        ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "100"),
        ("HERALD__JOB_SCHEDULER__CONCURRENCY", "8"),
        ("HERALD__WEBHOOK_SINK__LATENCY_MS", "5"),
    ])
    .await;
    let first_port: u16 = stack.api.rsplit(':').next().unwrap().parse().unwrap();
    let second_port = stack.extra_port(&[balancer_port]);
    let first = stack.spawn("messenger-api-1", &["messenger-api"]);
    let second = stack.spawn_with(
        "messenger-api-2",
        &["messenger-api"],
        &[("HERALD__MESSENGER_API__PORT".to_owned(), second_port.to_string())],
    );
    let _sink = stack.spawn("webhook-sink", &["webhook-sink"]);
    stack.wait_healthy(&format!("{}/messenger/health", stack.api)).await;
    stack
        .wait_healthy(&format!("http://127.0.0.1:{second_port}/messenger/health"))
        .await;
    stack.wait_healthy(&format!("{}/webhook-sink/health", stack.sink)).await;
    let Some(_balancer) = haproxy(balancer_port, &[first_port, second_port]) else {
        panic!("haproxy is needed (Debian package haproxy; build/local-services.sh up installs it)");
    };
    stack.wait_healthy(&format!("{balanced}/messenger/health")).await;

    let stop = tokio_util::sync::CancellationToken::new();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let subscriber = tokio::spawn(subscribe(
        format!("{balanced}/api/messenger/events?status=sent"),
        herald_core::testing::TEST_KEY.to_owned(),
        seen.clone(),
        stop.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().backends.is_empty() {
        assert!(Instant::now() < deadline, "the subscriber never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Kill the replica the subscriber is on: it must reconnect through the balancer. The
    // WebSocket subscriber is made to connect to the same one.
    let on = seen.lock().unwrap().backends[0].clone();
    let ws_seen = Arc::new(Mutex::new(Seen::default()));
    let ws_subscriber = tokio::spawn(subscribe_ws(
        format!("ws://127.0.0.1:{balancer_port}/api/messenger/ws"),
        herald_core::testing::TEST_KEY.to_owned(),
        on.clone(),
        ws_seen.clone(),
        stop.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while ws_seen.lock().unwrap().backends.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the WebSocket subscriber never connected to {on}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let its login and subscription land before the first event.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut doomed = if on == "api1" { first } else { second };
    let n = 3000;
    let http = test_support::Http::new(herald_core::testing::TEST_KEY);
    let ids: HashSet<String> = herald_core::testing::seed_messages(&http, &balanced, n)
        .await
        .into_iter()
        .collect();
    let _scheduler = stack.spawn("job-scheduler", &["job-scheduler"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.delivered().await < 600 {
        assert!(Instant::now() < deadline, "the drain never reached 600");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.signal("KILL");
    doomed.wait_exit(Duration::from_secs(5)).expect("killed");
    let killed_at = stack.delivered().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stats = http.get_json(&format!("{balanced}/api/messenger/stats")).await;
        if stats["counts"]["sent"].as_u64() == Some(n as u64) {
            break;
        }
        assert!(Instant::now() < deadline, "not all sent: {}", stats["counts"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The feed catches up through the surviving replica.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (seen.lock().unwrap().sent.len() < n || ws_seen.lock().unwrap().sent.len() < n) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    subscriber.await.unwrap();
    ws_subscriber.await.unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let ws_seen = std::mem::take(&mut *ws_seen.lock().unwrap());
    let received = stack.received_counts().await;
    let repeats: usize = received.values().map(|c| c - 1).sum();
    println!(
        "API replica {on} (the subscriber's) killed after {killed_at} delivered: {} delivered, {repeats} repeats; the subscriber saw {} of {n} sent events over connections to {:?}",
        received.len(),
        seen.sent.len(),
        seen.backends
    );
    assert_eq!(received.len(), n, "every message reached the provider");
    assert_eq!(repeats, 0, "none sent twice");
    let missed: Vec<&String> = ids.iter().filter(|id| !seen.sent.contains(*id)).take(5).collect();
    assert!(missed.is_empty(), "the feed missed sent events, e.g. {missed:?}");
    assert!(
        seen.backends.len() >= 2,
        "the subscriber reconnected: {:?}",
        seen.backends
    );
    assert_ne!(
        seen.backends.last(),
        Some(&on),
        "and now reads from the surviving replica"
    );
    println!(
        "the WebSocket subscriber saw {} of {n} sent events over connections to {:?}",
        ws_seen.sent.len(),
        ws_seen.backends
    );
    let ws_missed: Vec<&String> = ids.iter().filter(|id| !ws_seen.sent.contains(*id)).take(5).collect();
    assert!(
        ws_missed.is_empty(),
        "the WebSocket feed missed sent events, e.g. {ws_missed:?}"
    );
    assert!(
        ws_seen.backends.len() >= 2 && ws_seen.backends[0] == on,
        "{:?}",
        ws_seen.backends
    );
    assert_ne!(ws_seen.backends.last(), Some(&on));
    stack.cleanup().await;
}
