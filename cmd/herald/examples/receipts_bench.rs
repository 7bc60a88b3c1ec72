//! Delivery receipts applied per second, and their latency, with 64 concurrent senders posting
//! signed receipts to a Messenger API over the real MongoDB-compatible server.
//!
//!     cargo run --release -p herald --example receipts_bench -- [MESSAGES]
//!
//! The messages are stored as already sent through the provider `acme` (each with its own
//! provider id), so the figure is the receipt path alone: signature, parse, one conditional
//! update. Every message gets one final receipt; the run checks each applied exactly once, then
//! replays them all (each must be ignored) for the cost of a replay. Fresh database, dropped at
//! the end.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::DateTime;
use herald_core::receipts::hmac_sha256_hex;
use herald_messenger_api::domain::{Draft, MessageDoc, MessageStatus};
use herald_messenger_api::store::MessageStore;
use serde_json::{json, Value};

const PROVIDERS: &str = r#"
[[providers]]
name = "acme"
url = "http://127.0.0.1:9/webhook"
auth_key = "k"
[providers.receipts]
scheme = "hmac-sha256"
secret = "bench-secret"
signature_header = "X-Acme-Signature"
message_id_field = "/id"
status_field = "/status"
status_map = { DELIVRD = "delivered" }
"#;

async fn post_all(api: &str, ids: Arc<Vec<String>>, senders: usize) -> (f64, Vec<f64>, Vec<String>) {
    let client = reqwest::Client::new();
    let t = Instant::now();
    let tasks: Vec<_> = (0..senders)
        .map(|s| {
            let (client, ids, url) = (
                client.clone(),
                ids.clone(),
                format!("{api}/api/messenger/receipts/acme"),
            );
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in (s..ids.len()).step_by(senders) {
                    let body = json!({"id": ids[i], "status": "DELIVRD"}).to_string();
                    let signature = hmac_sha256_hex(b"bench-secret", body.as_bytes());
                    let started = Instant::now();
                    let answer: Value = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("X-Acme-Signature", signature)
                        .body(body)
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    out.push((
                        started.elapsed().as_secs_f64() * 1000.0,
                        answer["result"].as_str().unwrap_or("?").to_owned(),
                    ));
                }
                out
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut results = Vec::new();
    for task in tasks {
        for (ms, result) in task.await.unwrap() {
            latencies.push(ms);
            results.push(result);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    (ids.len() as f64 / secs, latencies, results)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let env = test_support::TestEnv::new()
        .await
        .expect("run build/local-services.sh up first");
    let settings = herald_core::testing::with_providers(herald_core::testing::settings_for(&env, &[]), PROVIDERS);
    // The messages, as sent through acme.
    let store = MessageStore::new(&env.db());
    store.ensure_indexes().await.unwrap();
    let now = DateTime::now();
    let mut ids = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(1000) {
        let docs: Vec<MessageDoc> = (chunk * 1000..((chunk + 1) * 1000).min(n))
            .map(|i| {
                let valid = herald_messenger_api::domain::validate(
                    Draft {
                        to: "+905551112233",
                        content: "bench",
                        send_at: None,
                        expires_at: None,
                        provider: None,
                        callback_url: None,
                    },
                    herald_messenger_api::domain::Limits {
                        max_chars: 160,
                        max_schedule: Duration::from_secs(86_400),
                        providers: &[],
                        callbacks: &herald_core::callbacks::UrlPolicy::default(),
                        default_callback: None,
                    },
                    chrono::Utc::now(),
                )
                .unwrap();
                let mut doc = MessageDoc::new_pending(valid, None, now);
                doc.status = MessageStatus::Sent;
                doc.sent_at = Some(now);
                doc.provider = Some("acme".into());
                doc.webhook_message_id = Some(format!("acme-{i}"));
                ids.push(format!("acme-{i}"));
                doc
            })
            .collect();
        store.insert_many(&docs).await.unwrap();
    }
    let app = herald_messenger_api::Application::build(&settings).await.unwrap();
    let api = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids = Arc::new(ids);
    println!("{}\n", herald_core::testing::stack::machine());
    println!("| receipts, 64 concurrent senders ({n} messages) | per second | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    let p = |l: &[f64], q: f64| l[((l.len() - 1) as f64 * q).round() as usize];
    let (rate, latencies, results) = post_all(&api, ids.clone(), 64).await;
    assert!(results.iter().all(|r| r == "applied"), "every first receipt applied");
    println!(
        "| first receipt of each message (applied) | {rate:.0} | {:.1} | {:.1} |",
        p(&latencies, 0.5),
        p(&latencies, 0.99)
    );
    let (rate, latencies, results) = post_all(&api, ids, 64).await;
    assert!(results.iter().all(|r| r == "ignored"), "every replay ignored");
    println!(
        "| the same again (replays, ignored) | {rate:.0} | {:.1} | {:.1} |",
        p(&latencies, 0.5),
        p(&latencies, 0.99)
    );
    env.cleanup().await.unwrap();
}
