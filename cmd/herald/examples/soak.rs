//! Soak: 64 clients creating and listing messages for a while (5 minutes by default) while three
//! draining scheduler replicas deliver them, all real `herald` processes. Reports requests,
//! errors, messages delivered, and each process's resident memory at the start (after a warm-up)
//! and at the end, so a leak or a slow climb shows; checks every created message was delivered
//! exactly once.
//!
//!     cargo build --release --bin herald
//!     cargo run --release -p herald --example soak -- [SECONDS]
//!
//! Needs the local MongoDB-compatible server and Redis (`build/local-services.sh up`).

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::testing::stack::{release_binary as herald_binary, rss_mib, ProcessStack as Stack};
use herald_core::testing::TEST_KEY;
use serde_json::{json, Value};

#[derive(Default)]
struct Counters {
    creates: AtomicU64,
    lists: AtomicU64,
    errors: AtomicU64,
}

#[tokio::main]
async fn main() {
    assert!(herald_binary().exists(), "cargo build --release --bin herald first");
    let seconds: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(300);
    let mut stack = Stack::api_and_sink(&[
        ("HERALD__JOB_SCHEDULER__SCHEDULE", "*/1 * * * * *".to_owned()),
        ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "100".to_owned()),
        ("HERALD__JOB_SCHEDULER__CONCURRENCY", "32".to_owned()),
        ("HERALD__JOB_SCHEDULER__DRAIN", "true".to_owned()),
        ("HERALD__JOB_SCHEDULER__IDLE_POLL_MS", "100".to_owned()),
    ])
    .await;
    stack.replicas(3);
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
    let counters = Arc::new(Counters::default());
    let created_ids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let warm_up = Duration::from_secs(20.min(seconds / 4));
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..64)
        .map(|c| {
            let (client, api, counters, ids) =
                (client.clone(), stack.api.clone(), counters.clone(), created_ids.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < until {
                    i += 1;
                    let body =
                        json!({"to": format!("+9055{c:03}{:05}", i % 100_000), "content": format!("soak {c} {i}")});
                    match client
                        .post(format!("{api}/api/messenger/messages"))
                        .bearer_auth(TEST_KEY)
                        .json(&body)
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 201 => {
                            let created: Value = r.json().await.unwrap();
                            ids.lock().unwrap().push(created["id"].as_str().unwrap().to_owned());
                            counters.creates.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let status = ["pending", "sent", ""][(i % 3) as usize];
                    let url = format!("{api}/api/messenger/messages?limit=20&status={status}");
                    let url = if status.is_empty() {
                        format!("{api}/api/messenger/messages?limit=20")
                    } else {
                        url
                    };
                    match client.get(url).bearer_auth(TEST_KEY).send().await {
                        Ok(r) if r.status() == 200 => {
                            counters.lists.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(warm_up).await;
    let rss_start: HashMap<String, f64> = stack.pids().into_iter().map(|(n, p)| (n, rss_mib(p))).collect();
    let mut samples = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let total: f64 = stack
            .pids()
            .iter()
            .filter(|(n, _)| n != "database" && n != "sink")
            .map(|(_, p)| rss_mib(*p))
            .sum();
        samples.push((started.elapsed().as_secs(), total));
    }
    for w in workers {
        w.await.unwrap();
    }
    let rss_end: HashMap<String, f64> = stack.pids().into_iter().map(|(n, p)| (n, rss_mib(p))).collect();
    let ids = created_ids.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    while stack.delivered().await < ids.len() as u64 {
        assert!(Instant::now() < deadline, "delivery did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let received = stack.received_counts().await;
    let repeats = received.values().filter(|n| **n > 1).count();
    let missing = ids.iter().filter(|id| !received.contains_key(*id)).count();

    let (creates, lists, errors) = (
        counters.creates.load(Ordering::Relaxed),
        counters.lists.load(Ordering::Relaxed),
        counters.errors.load(Ordering::Relaxed),
    );
    println!("{}\n", herald_core::testing::stack::machine());
    println!(
        "soak {seconds} s, 64 clients: {creates} creates ({:.0}/s), {lists} list pages ({:.0}/s), {errors} errors; \
         {} delivered, {missing} missing, {repeats} sent more than once",
        creates as f64 / seconds as f64,
        lists as f64 / seconds as f64,
        ids.len() - missing
    );
    println!();
    println!(
        "| process | RSS after {} s warm-up, MiB | RSS at the end, MiB |",
        warm_up.as_secs()
    );
    println!("|---|---:|---:|");
    let mut names: Vec<&String> = rss_end.keys().collect();
    names.sort();
    for name in names {
        println!(
            "| {name} | {:.1} | {:.1} |",
            rss_start.get(name).copied().unwrap_or(f64::NAN),
            rss_end[name]
        );
    }
    println!();
    let shown: Vec<String> = samples.iter().map(|(t, mib)| format!("{t}s {mib:.0}")).collect();
    println!(
        "Herald's own processes (API and replicas) together, MiB, every 10 s: {}",
        shown.join(", ")
    );
    println!("(The provider stand-in keeps a record of every request it received, so it grows.)");
    stack.cleanup().await;
    assert_eq!(
        (errors, missing, repeats),
        (0, 0, 0),
        "errors, missing or repeated deliveries"
    );
}
