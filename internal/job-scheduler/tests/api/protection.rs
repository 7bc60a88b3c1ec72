//! Protecting the provider: the rate limit shared by replicas (also with Redis gone), the
//! shared pause on Retry-After and on failure streaks, `sendAt` and `expiresAt` end to end.

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use herald_webhook_sink::{Received, ReceivedLog};
use serde_json::{json, Value};

use crate::helpers::{busiest, deliveries, eventually, most_allowed, set_behaviour, sink, PrivateRedis, Stack};

const DRAIN: [(&str, &str); 4] = [
    ("HERALD__JOB_SCHEDULER__DRAIN", "true"),
    ("HERALD__JOB_SCHEDULER__IDLE_POLL_MS", "50"),
    ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "100"),
    ("HERALD__JOB_SCHEDULER__CONCURRENCY", "8"),
];

/// Rates are checked over windows this long: long enough that jitter in when requests
/// arrive is small beside what the limit allows, short enough that a limit applied per
/// replica instead of shared (three times the rate) is plain.
const WINDOW: Duration = Duration::from_secs(5);

fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = DRAIN.to_vec();
    all.extend_from_slice(extra);
    all
}

fn accepted_times(log: &ReceivedLog) -> Vec<chrono::DateTime<Utc>> {
    log.snapshot().iter().map(|r| r.received_at).collect()
}

async fn attempts_other_than_one(stack: &Stack) -> u64 {
    stack
        .env
        .db()
        .collection::<bson::Document>("messages")
        .count_documents(bson::doc! {"attempts": {"$ne": 1}})
        .await
        .unwrap()
}

#[tokio::test]
async fn three_replicas_share_one_rate_limit_and_waiting_is_no_attempt() {
    let stack = Stack::start(&[]).await;
    stack.seed(600).await;
    let (url, log) = sink(0, 0.0).await;
    let settings = with(&[
        ("HERALD__WEBHOOK__RATE_LIMIT_PER_SECOND", "20"),
        ("HERALD__WEBHOOK__RATE_LIMIT_BURST", "5"),
    ]);
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(stack.scheduler(&url, &settings).await);
    }
    eventually(Duration::from_secs(90), "all 600 sent", || async {
        stack.count("sent").await == 600
    })
    .await;
    for replica in replicas {
        replica.shutdown().await.unwrap();
    }
    let times = accepted_times(&log);
    let most = busiest(&times, WINDOW);
    let allowed = most_allowed(20.0, 5, WINDOW);
    let span = (*times.iter().max().unwrap() - *times.iter().min().unwrap())
        .to_std()
        .unwrap();
    println!("rate limit 20/s burst 5, 3 replicas: at most {most} requests in {WINDOW:?} (allowed {allowed}), 600 in {span:?}");
    assert!(most <= allowed, "at most rate + burst, saw {most} in {WINDOW:?}");
    assert!(
        span >= Duration::from_secs(27) && span <= Duration::from_secs(40),
        "600 at 20/s take about 30 s, took {span:?}"
    );
    let seen = deliveries(&log);
    assert_eq!(seen.len(), 600);
    assert!(seen.values().all(|n| *n == 1), "no duplicates");
    assert_eq!(
        attempts_other_than_one(&stack).await,
        0,
        "waiting for the limit is not an attempt"
    );
    stack.cleanup().await;
}

#[tokio::test]
async fn with_redis_gone_each_replica_sends_its_share_and_sending_goes_on() {
    let stack = Stack::start(&[]).await;
    stack.seed(400).await;
    let (url, log) = sink(0, 0.0).await;
    let mut redis = PrivateRedis::start().await;
    let settings = with(&[
        ("HERALD__WEBHOOK__RATE_LIMIT_PER_SECOND", "20"),
        ("HERALD__WEBHOOK__RATE_LIMIT_BURST", "5"),
        ("HERALD__REDIS__URL", redis.url.as_str()),
    ]);
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(stack.scheduler(&url, &settings).await);
    }
    eventually(Duration::from_secs(30), "a hundred sent through Redis", || async {
        log.snapshot().len() >= 100
    })
    .await;
    redis.kill();
    let killed_at = Utc::now();
    eventually(Duration::from_secs(90), "all 400 sent", || async {
        stack.count("sent").await == 400
    })
    .await;
    for replica in replicas {
        replica.shutdown().await.unwrap();
    }
    let times = accepted_times(&log);
    let after: Vec<_> = times.iter().copied().filter(|t| *t > killed_at).collect();
    let most = busiest(&times, WINDOW);
    // Slots reserved in Redis before the kill are still being used for up to a second.
    let settled = killed_at + chrono::Duration::milliseconds(1500);
    let without: Vec<_> = after.iter().copied().filter(|t| *t > settled).collect();
    let most_without = busiest(&without, WINDOW);
    let span = (*after.iter().max().unwrap() - killed_at).to_std().unwrap();
    println!(
        "Redis killed after {} sends: {} more in {span:?}; most in {WINDOW:?}: {most} overall, {most_without} without Redis",
        times.len() - after.len(),
        after.len()
    );
    assert!(
        most <= most_allowed(20.0, 5, WINDOW),
        "never above rate + burst, saw {most} in {WINDOW:?}"
    );
    // Three shares of 20/3 per second, each with a burst of one: together the rate, 3 at once.
    assert!(
        most_without <= most_allowed(20.0, 3, WINDOW),
        "without Redis the shares add up to the rate, saw {most_without} in {WINDOW:?}"
    );
    assert!(after.len() >= 200, "sending went on without Redis");
    let seen = deliveries(&log);
    assert_eq!(seen.len(), 400);
    assert!(seen.values().all(|n| *n == 1), "no duplicates");
    stack.cleanup().await;
}

/// The receive times of the requests the sink answered with `status`, and of all.
fn split(log: &[Received], status: u16) -> (Vec<chrono::DateTime<Utc>>, Vec<chrono::DateTime<Utc>>) {
    let failed = log
        .iter()
        .filter(|r| r.status == status)
        .map(|r| r.received_at)
        .collect();
    (failed, log.iter().map(|r| r.received_at).collect())
}

/// The longest stretch without a request after `from`, and where it ends.
fn gap_after(
    times: &[chrono::DateTime<Utc>],
    from: chrono::DateTime<Utc>,
) -> (chrono::Duration, chrono::DateTime<Utc>) {
    let mut later: Vec<_> = times.iter().copied().filter(|t| *t >= from).collect();
    later.sort();
    later
        .windows(2)
        .map(|w| (w[1] - w[0], w[1]))
        .max_by_key(|(gap, _)| *gap)
        .unwrap()
}

#[tokio::test]
async fn a_429_with_retry_after_pauses_every_replica_until_then() {
    let stack = Stack::start(&[]).await;
    stack.seed(300).await;
    let (url, log) = sink(10, 0.0).await;
    set_behaviour(
        &url,
        json!({"failRate": 0.0, "status": 429, "retryAfterSeconds": 5, "failNext": 1}),
    )
    .await;
    let settings = with(&[
        ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "20"),
        ("HERALD__JOB_SCHEDULER__CONCURRENCY", "2"),
    ]);
    let first = stack.scheduler(&url, &settings).await;
    let second = stack.scheduler(&url, &settings).await;
    let status = |sched: &str| {
        let url = format!("{sched}/job-scheduler/messenger/is-working");
        let http = stack.http.clone();
        async move { http.get_json(&url).await }
    };
    eventually(Duration::from_secs(10), "paused", || async {
        status(&second.url).await["provider"]["state"] == "paused"
    })
    .await;
    let paused = status(&first.url).await;
    assert_eq!(paused["provider"]["state"], "paused", "{paused}");
    assert!(
        paused["provider"]["reason"].as_str().unwrap().contains("Retry-After"),
        "{paused}"
    );
    eventually(Duration::from_secs(60), "all 300 sent", || async {
        stack.count("sent").await == 300
    })
    .await;
    assert_eq!(status(&first.url).await["provider"]["state"], "open");
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    let (limited, all) = split(&log.snapshot(), 429);
    assert_eq!(limited.len(), 1);
    let (gap, resumed_at) = gap_after(&all, limited[0]);
    let quiet_from = resumed_at - gap;
    println!(
        "429 Retry-After 5 at {}: last send {} ms after it, then none for {} ms",
        limited[0],
        (quiet_from - limited[0]).num_milliseconds(),
        gap.num_milliseconds()
    );
    assert!(
        quiet_from - limited[0] <= chrono::Duration::milliseconds(400),
        "replicas stop within a refresh"
    );
    assert!(
        resumed_at - limited[0] >= chrono::Duration::milliseconds(4900),
        "nothing sent for 5 s"
    );
    assert!(
        gap >= chrono::Duration::milliseconds(4500),
        "quiet for the pause, {gap}"
    );
    assert!(deliveries(&log).len() == 300);
    stack.cleanup().await;
}

#[tokio::test]
async fn ten_retryable_failures_in_a_row_pause_all_replicas_until_a_probe_goes_through() {
    let stack = Stack::start(&[]).await;
    stack.seed(100).await;
    let (url, log) = sink(0, 0.0).await;
    set_behaviour(&url, json!({"failRate": 1.0, "status": 503})).await;
    let settings = with(&[
        ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "10"),
        ("HERALD__JOB_SCHEDULER__CONCURRENCY", "1"),
        ("HERALD__WEBHOOK__PAUSE_AFTER_FAILURES", "10"),
        ("HERALD__WEBHOOK__PAUSE_SECONDS", "2"),
    ]);
    let first = stack.scheduler(&url, &settings).await;
    let second = stack.scheduler(&url, &settings).await;
    let is_working = format!("{}/job-scheduler/messenger/is-working", second.url);
    eventually(Duration::from_secs(20), "paused by the streak", || async {
        stack.http.get_json(&is_working).await["provider"]["state"] == "paused"
    })
    .await;
    let paused = stack.http.get_json(&is_working).await;
    assert!(
        paused["provider"]["reason"]
            .as_str()
            .unwrap()
            .contains("retryable failures in a row"),
        "{paused}"
    );
    let failures_at_pause = log.snapshot().len();
    set_behaviour(&url, json!({"failRate": 0.0, "status": 503})).await;
    eventually(Duration::from_secs(60), "all 100 sent", || async {
        stack.count("sent").await == 100
    })
    .await;
    assert_eq!(stack.http.get_json(&is_working).await["provider"]["state"], "open");
    let stats = stack
        .http
        .get_json(&format!("{}/api/messenger/stats", stack.api_url))
        .await;
    assert_eq!(stats["job"]["provider"]["state"], "open", "{stats}");
    let metrics = stack.http.open_text(&format!("{}/metrics", first.url)).await
        + &stack.http.open_text(&format!("{}/metrics", second.url)).await;
    assert!(
        metrics.contains("herald_provider_pauses_total{provider=\"default\",reason=\"failures\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("herald_provider_probes_total{provider=\"default\",result=\"open\"} 1"),
        "{metrics}"
    );
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    let (failed, all) = split(&log.snapshot(), 503);
    let last_failure = *failed.iter().max().unwrap();
    let (gap, _) = gap_after(&all, last_failure);
    println!(
        "{} 503s before the pause ({} requests in all by then); quiet for {} ms after the last",
        failed.len(),
        failures_at_pause,
        gap.num_milliseconds()
    );
    assert!(
        (10..=12).contains(&failed.len()),
        "paused after ten in a row (two in flight at most): {}",
        failed.len()
    );
    assert!(
        gap >= chrono::Duration::milliseconds(1800),
        "no replica sent during the 2 s pause: {gap}"
    );
    stack.cleanup().await;
}

fn rfc3339(at: chrono::DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

async fn create(stack: &Stack, body: Value) -> String {
    let created: Value = stack
        .http
        .post_json(&format!("{}/api/messenger/messages", stack.api_url), &body)
        .await;
    created["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_message_goes_out_at_its_send_at_not_before() {
    let stack = Stack::start(&[]).await;
    let (url, log) = sink(0, 0.0).await;
    let scheduler = stack.scheduler(&url, &with(&[])).await;
    let send_at = Utc::now() + chrono::Duration::seconds(3);
    let id = create(
        &stack,
        json!({"to": "+905551111111", "content": "at three", "sendAt": rfc3339(send_at)}),
    )
    .await;
    eventually(Duration::from_secs(10), "sent", || async {
        stack.message(&id).await["status"] == "sent"
    })
    .await;
    scheduler.shutdown().await.unwrap();
    let received = log.snapshot();
    assert_eq!(received.len(), 1);
    let late = received[0].received_at - send_at;
    println!("sendAt +3 s: delivered {} ms after it", late.num_milliseconds());
    assert!(late >= chrono::Duration::zero(), "not before sendAt");
    assert!(
        late <= chrono::Duration::milliseconds(1000),
        "within an idle poll: {late}"
    );
    stack.cleanup().await;
}

#[tokio::test]
async fn messages_whose_expiry_passes_during_a_pause_expire_and_never_reach_the_provider() {
    let stack = Stack::start(&[]).await;
    let (url, log) = sink(0, 0.0).await;
    set_behaviour(
        &url,
        json!({"failRate": 0.0, "status": 429, "retryAfterSeconds": 4, "failNext": 1}),
    )
    .await;
    let first = create(&stack, json!({"to": "+905551111111", "content": "meets the 429"})).await;
    // Claimed with the first, waits out the pause in its run, expires meanwhile.
    let held = create(
        &stack,
        json!({"to": "+905551111112", "content": "otp 1", "expiresAt": rfc3339(Utc::now() + chrono::Duration::seconds(3))}),
    )
    .await;
    let scheduler = stack
        .scheduler(
            &url,
            &with(&[
                ("HERALD__JOB_SCHEDULER__CONCURRENCY", "1"),
                ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "2"),
            ]),
        )
        .await;
    eventually(Duration::from_secs(5), "the 429", || async {
        !log.snapshot().is_empty()
    })
    .await;
    // Created during the pause: never claimed before its expiry.
    let later = create(
        &stack,
        json!({"to": "+905551111113", "content": "otp 2", "expiresAt": rfc3339(Utc::now() + chrono::Duration::seconds(1))}),
    )
    .await;
    for id in [&held, &later] {
        eventually(Duration::from_secs(15), "expired", || async {
            stack.message(id).await["status"] == "expired"
        })
        .await;
    }
    eventually(Duration::from_secs(20), "the first sent after its retry", || async {
        stack.message(&first).await["status"] == "sent"
    })
    .await;
    scheduler.shutdown().await.unwrap();
    let seen = deliveries(&log);
    assert!(
        !seen.contains_key(&held) && !seen.contains_key(&later),
        "the provider never saw them: {seen:?}"
    );
    stack.cleanup().await;
}

#[tokio::test]
async fn the_shared_pause_state_counts_pauses_probes_once_and_resumes() {
    use herald_job_scheduler::store::ProviderStore;
    let env = test_support::TestEnv::new().await.unwrap();
    let store = ProviderStore::new(&env.db(), "default");
    let counts = futures::future::join_all((0..10).map(|_| store.count_failure())).await;
    let mut counts: Vec<i32> = counts.into_iter().map(|c| c.unwrap().failure_streak).collect();
    counts.sort();
    assert_eq!(
        counts,
        (1..=10).collect::<Vec<_>>(),
        "every concurrent failure counted once"
    );
    let now = bson::DateTime::now();
    let soon = bson::DateTime::from_millis(now.timestamp_millis() + 300);
    let paused = store.pause(soon, "test", false, now).await.unwrap();
    assert_eq!((paused.failure_streak, paused.pauses_in_a_row), (0, 1));
    let earlier = bson::DateTime::from_millis(now.timestamp_millis() + 100);
    assert_eq!(
        store.pause(earlier, "shorter", false, now).await.unwrap().paused_until,
        Some(soon),
        "a pause never shortens"
    );
    assert!(
        !store.take_probe("a", now, Duration::from_secs(5)).await.unwrap(),
        "not during the pause"
    );
    let over = bson::DateTime::from_millis(now.timestamp_millis() + 400);
    let takers =
        futures::future::join_all(["a", "b", "c"].map(|w| store.take_probe(w, over, Duration::from_secs(5)))).await;
    assert_eq!(
        takers.into_iter().filter(|t| *t.as_ref().unwrap()).count(),
        1,
        "one probe"
    );
    store.resume().await.unwrap();
    let open = store.read().await.unwrap();
    assert_eq!(
        (open.paused_until, open.pauses_in_a_row, open.probe_by),
        (None, 0, None)
    );
    env.cleanup().await.unwrap();
}
