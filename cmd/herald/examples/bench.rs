//! Herald benchmark: insert, claim, page and deliver against the real MongoDB-compatible
//! server and Redis, with the real services in this process. Prints a Markdown table.
//!
//!     cargo run --release -p herald --example bench -- [MESSAGES]
//!
//! Uses a fresh database and key prefix, dropped at the end.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use herald_webhook_sink::{SinkConfig, WebhookSink};
use serde_json::{json, Value};

use herald_core::testing::{seed_messages, TEST_KEY as KEY};
use test_support::Http;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

async fn start_api(env: &test_support::TestEnv) -> String {
    let settings = herald_core::testing::settings_for(env, &[]);
    let app = herald_messenger_api::Application::build(&settings).await.unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    url
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let env = test_support::TestEnv::new()
        .await
        .expect("run build/local-services.sh up first");
    let api = start_api(&env).await;
    let http = Http::new(KEY);
    let mut rows = Vec::new();

    // 1. Batch insert.
    let t = Instant::now();
    seed_messages(&http, &api, n).await;
    let secs = t.elapsed().as_secs_f64();
    rows.push(("batch create (1,000 per request)", n, secs));

    // 2. Cursor pagination over everything.
    let t = Instant::now();
    let mut url = format!("{api}/api/messenger/messages?limit=100");
    let mut seen = 0;
    loop {
        let page: Value = http.get_json(&url).await;
        seen += page["items"].as_array().unwrap().len();
        match page["nextCursor"].as_str() {
            Some(c) => url = format!("{api}/api/messenger/messages?limit=100&after={c}"),
            None => break,
        }
    }
    assert_eq!(seen, n);
    rows.push((
        "list, cursor pages of 100 (messages walked)",
        n,
        t.elapsed().as_secs_f64(),
    ));

    // 3. Concurrent claims: 16 claimers × limit 100 until empty.
    let t = Instant::now();
    let api_arc = Arc::new(api.clone());
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let api = api_arc.clone();
            let http = http.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let batch: Vec<Value> = http
                        .post_json(
                            &format!("{api}/api/messenger/get-two"),
                            &json!({"worker": format!("bench-{w}"), "limit": 100, "leaseSeconds": 600}),
                        )
                        .await;
                    if batch.is_empty() {
                        break ids;
                    }
                    ids.extend(batch.into_iter().map(|m| m["id"].as_str().unwrap().to_owned()));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!((all.len(), unique.len()), (n, n), "claims overlapped or missed");
    rows.push((
        "get-two claims, 16 concurrent claimers × 100",
        n,
        t.elapsed().as_secs_f64(),
    ));

    // 4. End to end: 4 scheduler replicas, batch 100, concurrency 16, instant provider.
    let delivered_n = n / 4;
    let env2 = test_support::TestEnv::new().await.unwrap();
    let api2 = start_api(&env2).await;
    seed_messages(&http, &api2, delivered_n).await;
    let (webhook, log) = WebhookSink::spawn(SinkConfig::local("local-dev-webhook-key", 0, 0.0))
        .await
        .unwrap();
    let settings = herald_core::testing::settings_for(
        &env2,
        &[
            ("HERALD__MESSENGER_API__URL", &api2),
            ("HERALD__WEBHOOK__URL", &webhook),
            ("HERALD__JOB_SCHEDULER__SCHEDULE", "0 0 0 1 1 * 2099"),
            ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "100"),
            ("HERALD__JOB_SCHEDULER__CONCURRENCY", "16"),
        ],
    );
    let mut replicas = Vec::new();
    for _ in 0..4 {
        let app = herald_job_scheduler::Application::build(&settings).await.unwrap();
        replicas.push(app.control());
        tokio::spawn(app.run_until_stopped(std::future::pending()));
    }
    let t = Instant::now();
    let runners: Vec<_> = replicas
        .into_iter()
        .map(|control| {
            tokio::spawn(async move {
                loop {
                    if control.job().run_once().await.claimed == 0 {
                        break;
                    }
                }
            })
        })
        .collect();
    for r in runners {
        r.await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    let received = log.snapshot();
    let keys: HashSet<_> = received.iter().filter_map(|r| r.idempotency_key.clone()).collect();
    assert_eq!(
        (received.len(), keys.len()),
        (delivered_n, delivered_n),
        "a message was sent twice or not at all"
    );
    rows.push((
        "end to end: claim → webhook → commit, 4 replicas × 100 / run",
        delivered_n,
        secs,
    ));

    println!("{}\n", herald_core::testing::stack::machine());
    println!("| operation | messages | seconds | messages/s |");
    println!("|---|---:|---:|---:|");
    for (what, count, secs) in rows {
        println!("| {what} | {count} | {secs:.2} | {:.0} |", count as f64 / secs);
    }
    println!(
        "\npeak resident memory of the benchmark process (API + 4 schedulers + sink + client): {:.0} MiB",
        peak_rss_mib()
    );
    env.cleanup().await.unwrap();
    env2.cleanup().await.unwrap();
}
