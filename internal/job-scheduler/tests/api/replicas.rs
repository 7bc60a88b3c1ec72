use std::collections::HashMap;
use std::time::Duration;

use crate::helpers::{eventually, sink, Stack};

#[tokio::test]
async fn several_replicas_send_every_message_exactly_once() {
    replicas_send_every_message_exactly_once("false").await;
}

#[tokio::test]
async fn several_draining_replicas_send_every_message_exactly_once() {
    replicas_send_every_message_exactly_once("true").await;
}

async fn replicas_send_every_message_exactly_once(drain: &str) {
    let stack = Stack::start(&[]).await;
    let ids = stack.seed(300).await;
    let (url, log) = sink(5, 0.0).await;
    let settings = [
        ("HERALD__JOB_SCHEDULER__SCHEDULE", "*/1 * * * * *"),
        ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "20"),
        ("HERALD__JOB_SCHEDULER__CONCURRENCY", "4"),
        ("HERALD__JOB_SCHEDULER__DRAIN", drain),
        ("HERALD__JOB_SCHEDULER__IDLE_POLL_MS", "50"),
    ];
    let mut replicas = Vec::new();
    for _ in 0..4 {
        replicas.push(stack.scheduler(&url, &settings).await);
    }
    eventually(Duration::from_secs(60), "all 300 sent", || async {
        stack.count("sent").await == 300
    })
    .await;
    for replica in replicas {
        replica.shutdown().await.unwrap();
    }
    let mut received: HashMap<String, usize> = HashMap::new();
    for r in log.snapshot() {
        *received.entry(r.idempotency_key.unwrap()).or_default() += 1;
    }
    assert_eq!(received.len(), 300, "every message reached the provider");
    let repeats: Vec<_> = received.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeats.is_empty(), "sent more than once: {repeats:?}");
    assert!(ids.iter().all(|id| received.contains_key(id)));
    stack.cleanup().await;
}
