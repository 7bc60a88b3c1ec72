use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::helpers::stack;

/// A scheduler process killed with SIGKILL in the middle of a run loses nothing: once its
/// lease expires another replica sends what it held. Repeats are limited to what the killed
/// run had in flight, and carry the same Idempotency-Key.
#[tokio::test]
async fn a_killed_scheduler_loses_nothing_and_repeats_only_its_in_flight_messages() {
    killed_scheduler_loses_nothing("false").await;
}

/// The same with drain mode, where a batch is claimed ahead while the current one is sent.
#[tokio::test]
async fn a_killed_draining_scheduler_loses_nothing_and_repeats_only_its_in_flight_messages() {
    killed_scheduler_loses_nothing("true").await;
}

async fn killed_scheduler_loses_nothing(drain: &str) {
    let stack = stack(&[
        ("HERALD__JOB_SCHEDULER__SCHEDULE", "*/1 * * * * *"),
        ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "4"),
        ("HERALD__JOB_SCHEDULER__CONCURRENCY", "4"),
        ("HERALD__JOB_SCHEDULER__LEASE_SECONDS", "8"),
        ("HERALD__WEBHOOK__TIMEOUT_MS", "2500"),
        ("HERALD__JOB_SCHEDULER__DRAIN", drain),
    ])
    .await;
    let _sink = stack.spawn("webhook-sink", &["webhook-sink", "--latency-ms", "1500"]);
    let _api = stack.spawn("messenger-api", &["messenger-api"]);
    stack.wait_healthy(&format!("{}/messenger/health", stack.api)).await;
    stack.wait_healthy(&format!("{}/webhook-sink/health", stack.sink)).await;
    assert!(stack
        .command(&["seed", "--count", "12"])
        .output()
        .unwrap()
        .status
        .success());

    let mut doomed = stack.spawn("job-scheduler", &["job-scheduler"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while stack.received().await.is_empty() {
        assert!(Instant::now() < deadline, "the first run never reached the provider");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The provider holds these requests for 1.5 s: the run is mid-flight.
    doomed.signal("KILL");
    doomed.wait_exit(Duration::from_secs(5)).expect("killed");
    let in_flight: HashSet<String> = stack
        .received()
        .await
        .iter()
        .map(|r| r["idempotencyKey"].as_str().unwrap().to_owned())
        .collect();
    assert!(!in_flight.is_empty() && in_flight.len() <= 4, "{in_flight:?}");

    let own_port = [(
        "HERALD__JOB_SCHEDULER__PORT".to_owned(),
        crate::helpers::free_port().to_string(),
    )];
    let _survivor = stack.spawn_with("job-scheduler-2", &["job-scheduler"], &own_port);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let page = stack
            .get_json(&format!(
                "{}/api/messenger/messages/sent?limit=1&withTotal=true",
                stack.api
            ))
            .await;
        if page["total"] == 12 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all delivered after the lease expired: {page}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in stack.received().await {
        *counts
            .entry(r["idempotencyKey"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 12, "every message reached the provider");
    let repeated: HashSet<String> = counts.iter().filter(|(_, n)| **n > 1).map(|(k, _)| k.clone()).collect();
    assert!(
        repeated.is_subset(&in_flight),
        "repeats {repeated:?} beyond the killed run's {in_flight:?}"
    );
    assert!(counts.values().all(|n| *n <= 2));
    stack.cleanup().await;
}
