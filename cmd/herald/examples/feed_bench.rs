//! Benchmark of the live event feed against a real `herald messenger-api` process:
//! the memory of N idle subscribers, and the delay from a commit to its `message.sent` event at
//! a subscriber (p50/p99 over M messages). Checks itself: every commit's event arrives, once.
//!
//! `cargo build --release --bin herald && cargo run --release -p herald --example
//! feed_bench -- 1000 500` (needs the local MongoDB and Redis: `build/local-services.sh up`).

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use herald_core::testing::stack::{machine, release_binary, rss_mib, ProcessStack};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "local-dev-api-key";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let messages: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let idle: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(500);
    let extra = [
        ("HERALD_ENV", "local".to_owned()),
        ("HERALD__TELEMETRY__FILTER", "warn".to_owned()),
    ];
    let mut stack = ProcessStack::new(release_binary(), &extra).await;
    stack.start("api", &["messenger-api"], &[]);
    stack.wait_healthy(&format!("{}/messenger/health", stack.api)).await;
    let base = stack.api.clone();
    let port: u16 = stack.vars["HERALD__MESSENGER_API__PORT"].parse().unwrap();
    let keyed = test_support::Http::new(KEY);
    let http = keyed.client.clone();
    let pid = stack.procs[0].child.id();
    // Warm up: one subscriber, one message, so lazily built state is not counted as per-subscriber.
    let warm: Value = keyed
        .post_json(
            &format!("{base}/api/messenger/messages"),
            &json!({"to": "+905550000000", "content": "warm"}),
        )
        .await;
    let never = warm["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_mib(pid);

    // Idle subscribers: raw connections following a message that never changes again.
    let mut sockets = Vec::with_capacity(idle);
    for _ in 0..idle {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        socket
            .write_all(
                format!(
                    "GET /api/messenger/events?id={never} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let mut head = [0u8; 256];
        let n = socket.read(&mut head).await.unwrap();
        assert!(
            head[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head[..n])
        );
        sockets.push(socket);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with_idle = rss_mib(pid);

    // The measuring subscriber.
    let response = http
        .get(format!("{base}/api/messenger/events?status=sent"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    tokio::spawn(async move {
        let mut body = response.bytes_stream();
        let mut buffer = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            let now = Instant::now();
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                    let event: Value = serde_json::from_str(data).unwrap();
                    let id = event["message"]["id"].as_str().unwrap_or_default().to_owned();
                    if tx.send((id, now)).is_err() {
                        return;
                    }
                }
            }
        }
    });

    let mut ids = Vec::new();
    while ids.len() < messages {
        let batch: Vec<Value> = (0..(messages - ids.len()).min(1000))
            .map(|i| json!({"to": format!("+90555{:07}", i), "content": "feed bench"}))
            .collect();
        let created: Value = keyed
            .post_json(
                &format!("{base}/api/messenger/messages/batch"),
                &json!({"messages": batch}),
            )
            .await;
        ids.extend(
            created["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned()),
        );
    }
    let mut claimed = Vec::new();
    while claimed.len() < messages {
        let page: Vec<Value> = keyed
            .post_json(
                &format!("{base}/api/messenger/get-two"),
                &json!({"worker": "bench", "limit": 500, "leaseSeconds": 600}),
            )
            .await;
        assert!(!page.is_empty(), "claimed everything there was");
        claimed.extend(page.into_iter().filter(|m| m["id"] != never.as_str()));
    }
    // Let the created and claimed events pass first: measure commits, not the burst before them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut committed_at = HashMap::new();
    for message in &claimed {
        let id = message["id"].as_str().unwrap().to_owned();
        committed_at.insert(id.clone(), Instant::now());
        let status = http
            .put(format!("{base}/api/messenger/commit/{id}"))
            .bearer_auth(KEY)
            .json(&json!({"claimToken": message["claimToken"], "webhookMessageId": "bench"}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }
    let mut delays = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while delays.len() < claimed.len() && Instant::now() < deadline {
        let Ok(Some((id, at))) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await else {
            break;
        };
        let start = committed_at
            .remove(&id)
            .unwrap_or_else(|| panic!("event for {id} twice or unknown"));
        delays.push(at.duration_since(start).as_secs_f64() * 1000.0);
    }
    assert_eq!(delays.len(), claimed.len(), "every commit's event arrived");
    delays.sort_by(|a, b| a.total_cmp(b));
    let after = rss_mib(pid);

    println!("{}\n", machine());
    println!("| measure | value |");
    println!("|---|---|");
    println!("| commits measured | {} |", delays.len());
    println!(
        "| commit → `message.sent` at the subscriber, p50 | {:.1} ms |",
        percentile(&delays, 0.5)
    );
    println!(
        "| commit → `message.sent` at the subscriber, p99 | {:.1} ms |",
        percentile(&delays, 0.99)
    );
    println!(
        "| commit → `message.sent` at the subscriber, max | {:.1} ms |",
        delays[delays.len() - 1]
    );
    println!("| API RSS before subscribers | {:.1} MiB |", before);
    println!("| API RSS with {idle} idle subscribers | {:.1} MiB |", with_idle);
    println!(
        "| per idle subscriber | {:.1} KiB |",
        (with_idle - before).max(0.0) * 1024.0 / idle.max(1) as f64
    );
    println!(
        "| API RSS after the run (all subscribers still open) | {:.1} MiB |",
        after
    );
    drop(sockets);
    stack.cleanup().await;
}
