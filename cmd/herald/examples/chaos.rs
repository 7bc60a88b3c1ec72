//! The chaos campaign: real `herald` processes (one Messenger API, three draining Job Scheduler
//! replicas, the webhook sink as the independent provider) under faults injected from outside —
//! a provider that fails, throttles and answers too late, one of two providers killed with
//! SIGKILL, two providers failing in turn, replicas killed with SIGKILL, the
//! database server and Redis killed and restarted on their data, the master of a Redis Sentinel
//! set and of a Redis Cluster killed for a failover, the API killed alone and as one of two
//! behind HAProxy. Each scenario
//! is checked afterwards against the provider's own record and the database (through the API):
//! every message ends `sent` or `failed`, none lost, and every repeat the provider saw is
//! explained by the fault (a late answer Herald never heard, or a send in flight at a kill).
//!
//!     cargo build --release --bin herald
//!     CHAOS_SCALE=1 cargo run -p herald --example chaos
//!
//! `CHAOS_SCALE` (default 1) scales messages, kills and outage lengths; `make test` runs 0.2.
//! `CHAOS_ONLY=provider,kills,database,redis,redis-sentinel,redis-cluster,balancer,api,provider-dies,providers-flap`
//! picks scenarios.
//! Needs the local MongoDB-compatible server, `secantusd-rs` and `redis-server` on PATH.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use herald_core::testing::stack::{release_binary as herald_binary, ProcessStack as Stack};
use herald_core::testing::{seed_messages, TEST_KEY};
use serde_json::{json, Value};
use test_support::{Http, PrivateDatabase, PrivateRedis};

/// Every scenario's replicas drain: batches of 50, 16 sends at once, idle polls every 100 ms.
fn draining(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut vars = vec![
        ("HERALD__JOB_SCHEDULER__SCHEDULE", "*/1 * * * * *".to_owned()),
        ("HERALD__JOB_SCHEDULER__BATCH_SIZE", BATCH.to_string()),
        ("HERALD__JOB_SCHEDULER__CONCURRENCY", "16".to_owned()),
        ("HERALD__JOB_SCHEDULER__DRAIN", "true".to_owned()),
        ("HERALD__JOB_SCHEDULER__IDLE_POLL_MS", "100".to_owned()),
        ("HERALD__MONGO__SERVER_SELECTION_TIMEOUT_MS", "1000".to_owned()),
        ("HERALD__REDIS__TIMEOUT_MS", "200".to_owned()),
    ];
    vars.extend_from_slice(extra);
    vars
}

const BATCH: u64 = 50;
const REPLICAS: usize = 3;
/// Claimed and not yet reported, per replica at most: the batch being sent and the next one.
const IN_FLIGHT_PER_REPLICA: u64 = 2 * BATCH;

fn scale() -> f64 {
    std::env::var("CHAOS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn scaled(n: f64) -> usize {
    (n * scale()).round().max(1.0) as usize
}

/// One row of the report.
struct Row {
    scenario: &'static str,
    messages: usize,
    faults: String,
    lost: usize,
    duplicates: usize,
    recovery: String,
}

/// What the provider stand-in recorded, per idempotency key.
#[derive(Default)]
struct Seen {
    accepted: usize,
    slow_accepted: usize,
    last_received: Option<chrono::DateTime<chrono::Utc>>,
}

async fn provider_record(stack: &Stack) -> (HashMap<String, Seen>, HashMap<u64, usize>, usize) {
    let list = stack.received().await;
    let mut by_key: HashMap<String, Seen> = HashMap::new();
    let mut by_status: HashMap<u64, usize> = HashMap::new();
    let mut slow = 0;
    for r in &list {
        let key = r["idempotencyKey"].as_str().unwrap_or("").to_owned();
        let status = r["status"].as_u64().unwrap();
        let at: chrono::DateTime<chrono::Utc> = r["receivedAt"].as_str().unwrap().parse().unwrap();
        let is_slow = r["slow"].as_bool().unwrap_or(false);
        *by_status.entry(status).or_default() += 1;
        slow += usize::from(is_slow);
        let seen = by_key.entry(key).or_default();
        if status == 202 {
            seen.accepted += 1;
            seen.slow_accepted += usize::from(is_slow);
        }
        seen.last_received = seen.last_received.max(Some(at));
    }
    (by_key, by_status, slow)
}

/// Every message, through the API's cursor pages.
async fn all_messages(stack: &Stack) -> Vec<Value> {
    let http = Http::new(TEST_KEY);
    let mut all = Vec::new();
    let mut after = String::new();
    loop {
        let page = http
            .get_json(&format!("{}/api/messenger/messages?limit=100{after}", stack.api))
            .await;
        all.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["nextCursor"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => return all,
        }
    }
}

/// How many messages needed a second attempt, asserting that they and the provider's
/// `repeats` stay within what the replicas could hold claimed and unreported at one kill.
async fn second_attempts_within_in_flight(stack: &Stack, repeats: usize) -> usize {
    let messages = all_messages(stack).await;
    let retried = messages.iter().filter(|m| m["attempts"].as_i64().unwrap() > 1).count();
    let bound = REPLICAS as u64 * IN_FLIGHT_PER_REPLICA;
    assert!(
        retried as u64 <= bound && repeats as u64 <= bound,
        "{retried} retried, {repeats} repeats"
    );
    retried
}

/// Polls until every message is `sent` or `failed`; answers (sent, failed).
async fn settled(stack: &Stack, n: usize, limit: Duration) -> (usize, usize) {
    let http = Http::new(TEST_KEY);
    let deadline = Instant::now() + limit;
    loop {
        let stats = http.get_json(&format!("{}/api/messenger/stats", stack.api)).await;
        let count = |s: &str| stats["counts"][s].as_u64().unwrap_or(0) as usize;
        let (sent, failed) = (count("sent"), count("failed"));
        if sent + failed >= n || Instant::now() > deadline {
            return (sent, failed);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn wait_delivered(stack: &Stack, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while stack.delivered().await < at_least {
        assert!(Instant::now() < deadline, "delivery never reached {at_least}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long after `since` the provider saw its next request.
async fn delivery_resumed(stack: &Stack, since: Instant) -> Duration {
    let before = stack.delivered().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while stack.delivered().await <= before {
        assert!(Instant::now() < deadline, "delivery never resumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    since.elapsed()
}

/// A call's status and internal code.
async fn answer(url: &str) -> (u16, u64) {
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth(TEST_KEY)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    match response {
        Ok(r) => {
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or_default();
            (status, body["internalCode"].as_u64().unwrap_or(0))
        }
        Err(_) => (0, 0),
    }
}

/// Lost messages, and repeats at the provider (accepted more than once), after a run.
async fn tally(stack: &Stack, n: usize, sent: usize, failed: usize) -> (usize, usize, HashMap<String, Seen>) {
    let (by_key, _, _) = provider_record(stack).await;
    let repeats = by_key.values().map(|s| s.accepted.saturating_sub(1)).sum();
    (n - (sent + failed).min(n), repeats, by_key)
}

async fn provider_chaos() -> Row {
    let n = scaled(3000.0);
    // The provider's own protection stays on (each 429 pauses every replica for its
    // Retry-After, then a probe decides), but no pause lasts over 2 s and a failure streak alone
    // pauses nothing: with 45 % of answers failing, the breaker would rightly hold sending for
    // many minutes. It has its own tests (protection.rs).
    let mut stack = Stack::api_and_sink(&draining(&[
        ("HERALD__WEBHOOK__PAUSE_AFTER_FAILURES", "0".to_owned()),
        ("HERALD__WEBHOOK__MAX_RETRY_AFTER_SECONDS", "2".to_owned()),
    ]))
    .await;
    let behaviour = json!({"failRate": 0.30, "status": 500, "throttleRate": 0.05, "slowRate": 0.10, "slowMs": 2500});
    let put = reqwest::Client::new()
        .put(format!("{}/webhook-sink/behaviour", stack.sink))
        .json(&behaviour)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    seed_messages(&Http::new(TEST_KEY), &stack.api, n).await;
    let t = Instant::now();
    stack.replicas(REPLICAS);
    let (sent, failed) = settled(&stack, n, Duration::from_secs(900)).await;
    let took = t.elapsed();
    let (lost, repeats, by_key) = tally(&stack, n, sent, failed).await;
    let (_, by_status, slow) = provider_record(&stack).await;

    // Every repeat the provider accepted is one it answered too late for Herald to hear.
    let unexplained: usize = by_key
        .values()
        .map(|s| s.accepted.saturating_sub(1).saturating_sub(s.slow_accepted))
        .sum();
    assert_eq!(unexplained, 0, "repeats not caused by a late answer");
    // Nothing was sent after its commit: the provider's last request for a message came
    // before the send time Herald recorded for it.
    let messages = all_messages(&stack).await;
    let mut after_commit = 0;
    for m in &messages {
        let status = m["status"].as_str().unwrap();
        assert!(m["attempts"].as_i64().unwrap() >= 1, "{m}");
        if status == "failed" {
            assert!(!m["lastError"].is_null(), "a failed message without its error: {m}");
        }
        if status == "sent" {
            let sent_at: chrono::DateTime<chrono::Utc> = m["sentAt"].as_str().unwrap().parse().unwrap();
            let last = by_key[m["id"].as_str().unwrap()].last_received.unwrap();
            after_commit += usize::from(last > sent_at + chrono::Duration::milliseconds(50));
        }
    }
    assert_eq!(after_commit, 0, "requests after a commit");
    assert_eq!(lost, 0, "lost messages");
    let count = |s: u64| by_status.get(&s).copied().unwrap_or(0);
    stack.cleanup().await;
    Row {
        scenario: "provider chaos: 30 % 500, 5 % 429 + Retry-After, 10 % answered after the timeout",
        messages: n,
        faults: format!(
            "{} × 500, {} × 429, {slow} late answers; ended {sent} sent, {failed} failed",
            count(500),
            count(429)
        ),
        lost,
        duplicates: repeats,
        recovery: format!("drained in {:.0} s", took.as_secs_f64()),
    }
}

async fn replica_kills() -> Row {
    let n = scaled(5000.0);
    let kills = scaled(20.0).max(3);
    // A provider answering in 150 ms keeps the drain going long enough (about 300 messages a
    // second) for every kill to land mid-drain.
    let mut stack = Stack::api_and_sink(&draining(&[("HERALD__WEBHOOK_SINK__LATENCY_MS", "150".to_owned())])).await;
    seed_messages(&Http::new(TEST_KEY), &stack.api, n).await;
    stack.replicas(REPLICAS);
    wait_delivered(&stack, 1).await;
    let mut done_kills = 0;
    for k in 0..kills {
        if stack.delivered().await >= n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300 + (k as u64 * 137) % 500)).await;
        let name = format!("scheduler-{}", k % REPLICAS + 1);
        stack.kill(&name);
        done_kills += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
        stack.restart(&name);
    }
    let last_restart = Instant::now();
    let (sent, failed) = settled(&stack, n, Duration::from_secs(300)).await;
    let (lost, repeats, _) = tally(&stack, n, sent, failed).await;
    assert_eq!((lost, failed), (0, 0), "lost or failed messages");
    let bound = done_kills as u64 * IN_FLIGHT_PER_REPLICA;
    assert!(
        repeats as u64 <= bound,
        "{repeats} repeats, more than in flight at {done_kills} kills"
    );
    stack.cleanup().await;
    Row {
        scenario: "SIGKILL of a scheduler replica (restarted at once), 3 replicas draining",
        messages: n,
        faults: format!("{done_kills} SIGKILLs, each replica restarted 0.2 s later"),
        lost,
        duplicates: repeats,
        recovery: format!(
            "all sent {:.0} s after the last restart (claims of a killed replica come back when their lease ends)",
            last_restart.elapsed().as_secs_f64()
        ),
    }
}

async fn database_restart() -> Row {
    let n = scaled(3000.0);
    let down = Duration::from_secs_f64((10.0 * scale()).max(3.0));
    let mut db = PrivateDatabase::start().await;
    let mut stack = Stack::api_and_sink(&draining(&[("HERALD__MONGO__URI", db.uri())])).await;
    seed_messages(&Http::new(TEST_KEY), &stack.api, n).await;
    stack.replicas(REPLICAS);
    wait_delivered(&stack, n as u64 / 3).await;
    db.kill();
    let killed = Instant::now();
    let (mut api_503, mut scheduler_503) = (false, false);
    while killed.elapsed() < down {
        let api = answer(&format!("{}/api/messenger/stats", stack.api)).await;
        api_503 |= api == (503, 503_001);
        // Each replica on its own port.
        for proc in stack.procs.iter().filter(|p| p.name.starts_with("scheduler")) {
            let port = &proc
                .extra
                .iter()
                .find(|(k, _)| k == "HERALD__JOB_SCHEDULER__PORT")
                .unwrap()
                .1;
            let status = answer(&format!("http://127.0.0.1:{port}/job-scheduler/messenger/is-working")).await;
            scheduler_503 |= status == (503, 503_001);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    db.launch().await;
    let recovery = delivery_resumed(&stack, Instant::now()).await;
    let (sent, failed) = settled(&stack, n, Duration::from_secs(300)).await;
    let (lost, repeats, _) = tally(&stack, n, sent, failed).await;
    assert!(
        api_503 && scheduler_503,
        "503 503001 while the database was down: API {api_503}, scheduler {scheduler_503}"
    );
    assert_eq!((lost, failed), (0, 0), "lost or failed messages");
    assert!(
        repeats as u64 <= REPLICAS as u64 * IN_FLIGHT_PER_REPLICA,
        "{repeats} repeats"
    );
    stack.cleanup().await;
    Row {
        scenario: "database server SIGKILLed mid-drain, restarted on its data",
        messages: n,
        faults: format!(
            "down {:.0} s; API and scheduler answered 503 (503001) meanwhile",
            down.as_secs_f64()
        ),
        lost,
        duplicates: repeats,
        recovery: format!("delivery resumed {:.1} s after the restart", recovery.as_secs_f64()),
    }
}

async fn redis_outage() -> Row {
    let n = scaled(3000.0);
    let down = Duration::from_secs_f64((30.0 * scale()).max(5.0));
    let mut redis = PrivateRedis::start().await;
    let mut stack = Stack::api_and_sink(&draining(&[("HERALD__REDIS__URL", redis.url.clone())])).await;
    let prefix = stack.env.key_prefix.clone();
    let ids = seed_messages(&Http::new(TEST_KEY), &stack.api, n).await;
    stack.replicas(REPLICAS);
    wait_delivered(&stack, n as u64 / 4).await;
    redis.kill();
    let before = stack.delivered().await;
    tokio::time::sleep(down).await;
    let during = stack.delivered().await - before;
    redis.restart().await;
    let back = Instant::now();
    let (sent, failed) = settled(&stack, n, Duration::from_secs(300)).await;
    let (lost, repeats, _) = tally(&stack, n, sent, failed).await;
    assert_eq!((lost, failed), (0, 0), "lost or failed messages");
    assert!(during > 0, "sending stopped while Redis was down");
    // Every sent message has its cache entry again (the repair writes what the outage missed).
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let mut missing = 0;
        for chunk in ids.chunks(500) {
            let keys: Vec<String> = chunk.iter().map(|id| format!("{prefix}sent:{id}")).collect();
            let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut conn).await.unwrap();
            missing += values.iter().filter(|v| v.is_none()).count();
        }
        if missing == 0 || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let repaired = back.elapsed();
    assert_eq!(missing, 0, "sent messages without their cache entry");
    stack.cleanup().await;
    Row {
        scenario: "Redis SIGKILLed mid-drain, restarted on its data after the outage",
        messages: n,
        faults: format!("down {:.0} s; {during} sends went on meanwhile", down.as_secs_f64()),
        lost,
        duplicates: repeats,
        recovery: format!(
            "every sent:<id> entry present {:.1} s after Redis returned",
            repaired.as_secs_f64()
        ),
    }
}

/// Every message's `sent:<id>` entry, read through Herald's own connection in `redis`'s mode;
/// answers how many are still missing after up to a minute of repair.
async fn missing_cache_entries(stack: &Stack, redis: &[(&'static str, String)], ids: &[String]) -> usize {
    let vars: Vec<(&str, &str)> = redis.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let settings = herald_core::testing::settings_for(&stack.env, &vars);
    let mut conn = herald_core::redis_conn::lazy_connection(&settings.redis, Duration::from_secs(2)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut missing = 0;
        for id in ids {
            let key = format!("{}sent:{id}", stack.env.key_prefix);
            let value: Option<String> = match redis::cmd("GET").arg(&key).query_async(&mut conn).await {
                Ok(value) => value,
                Err(error) => {
                    eprintln!("[chaos] GET {key}: {error}");
                    None
                }
            };
            missing += usize::from(value.is_none());
        }
        if missing == 0 || Instant::now() > deadline {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Redis deployed for failover (`sentinel` or `cluster`); the master holding the limiter's key
/// SIGKILLed mid-drain, three replicas sending through a shared limit of 300/s.
async fn redis_failover(mode: &'static str) -> Row {
    use test_support::redis_topologies::{RedisCluster, RedisSentinels};
    let n = scaled(3000.0);
    let mut sentinels = None;
    let mut cluster = None;
    let redis: Vec<(&'static str, String)> = if mode == "sentinel" {
        let set = RedisSentinels::start().await;
        let vars = vec![
            ("HERALD__REDIS__MODE", "sentinel".to_owned()),
            ("HERALD__REDIS__URL", set.url()),
            ("HERALD__REDIS__SENTINEL_MASTER", set.master_name.clone()),
        ];
        sentinels = Some(set);
        vars
    } else {
        let nodes = RedisCluster::start().await;
        let vars = vec![
            ("HERALD__REDIS__MODE", "cluster".to_owned()),
            ("HERALD__REDIS__URL", nodes.url()),
        ];
        cluster = Some(nodes);
        vars
    };
    let mut vars = redis.clone();
    vars.push(("HERALD__WEBHOOK__RATE_LIMIT_PER_SECOND", "300".to_owned()));
    vars.push(("HERALD__WEBHOOK__RATE_LIMIT_BURST", "30".to_owned()));
    let mut stack = Stack::api_and_sink(&draining(&vars)).await;
    let ids = seed_messages(&Http::new(TEST_KEY), &stack.api, n).await;
    stack.replicas(REPLICAS);
    wait_delivered(&stack, n as u64 / 4).await;
    let killed = Instant::now();
    let before = stack.delivered().await;
    if let Some(set) = sentinels.as_mut() {
        set.kill_master();
        set.wait_failover(Duration::from_secs(60)).await;
    }
    if let Some(nodes) = cluster.as_mut() {
        let key = format!("{}ratelimit:{{default}}:tat", stack.env.key_prefix);
        let doomed = nodes.master_of(&key).await.expect("the limiter's master");
        nodes.kill(doomed);
        nodes.wait_failover(doomed, Duration::from_secs(60)).await;
    }
    let failover = killed.elapsed();
    let during = stack.delivered().await - before;
    let (sent, failed) = settled(&stack, n, Duration::from_secs(300)).await;
    let (lost, repeats, _) = tally(&stack, n, sent, failed).await;
    assert_eq!((lost, failed), (0, 0), "lost or failed messages");
    assert!(during > 0, "sending stopped during the failover");
    let settled_at = killed.elapsed();
    let missing = missing_cache_entries(&stack, &redis, &ids).await;
    if missing > 0 {
        let metrics = Http::new(TEST_KEY).open_text(&format!("{}/metrics", stack.api)).await;
        for line in metrics.lines().filter(|l| l.contains("redis") && !l.starts_with('#')) {
            eprintln!("[chaos] {line}");
        }
    }
    assert_eq!(missing, 0, "sent messages without their cache entry");
    let repaired = killed.elapsed();
    stack.cleanup().await;
    Row {
        scenario: if mode == "sentinel" {
            "Redis Sentinel: the master SIGKILLed mid-drain (1 replica, 3 Sentinels), limit 300/s shared"
        } else {
            "Redis Cluster: the limiter's master SIGKILLed mid-drain (3 masters + 3 replicas), limit 300/s shared"
        },
        messages: n,
        faults: format!(
            "replica promoted {:.1} s after the kill; {during} sends went on meanwhile",
            failover.as_secs_f64()
        ),
        lost,
        duplicates: repeats,
        recovery: format!(
            "all sent {:.1} s after the kill; every sent:<id> entry present at {:.1} s",
            settled_at.as_secs_f64(),
            repaired.as_secs_f64()
        ),
    }
}

/// Two API processes behind HAProxy, the three replicas reaching the API through it; the
/// second API process SIGKILLed mid-drain and left dead.
async fn balancer_kill() -> Row {
    use herald_core::testing::stack::{free_port, haproxy};
    let n = scaled(3000.0);
    let balancer_port = free_port();
    let balanced = format!("http://127.0.0.1:{balancer_port}");
    let mut stack = Stack::api_and_sink(&draining(&[("HERALD__MESSENGER_API__URL", balanced.clone())])).await;
    let first_port: u16 = stack.api.rsplit(':').next().unwrap().parse().unwrap();
    let second_port = free_port();
    stack.start(
        "api-2",
        &["messenger-api"],
        &[("HERALD__MESSENGER_API__PORT".to_owned(), second_port.to_string())],
    );
    let second = format!("http://127.0.0.1:{second_port}");
    stack.wait_healthy(&format!("{second}/messenger/health")).await;
    let _balancer =
        haproxy(balancer_port, &[first_port, second_port]).expect("haproxy (build/local-services.sh up installs it)");
    stack.wait_healthy(&format!("{balanced}/messenger/health")).await;
    seed_messages(&Http::new(TEST_KEY), &balanced, n).await;
    stack.replicas(REPLICAS);
    wait_delivered(&stack, n as u64 / 4).await;
    stack.kill("api-2");
    let killed = Instant::now();
    let recovery = delivery_resumed(&stack, killed).await;
    // Stats through the surviving replica (the stack's own API URL is the first process).
    let (sent, failed) = settled(&stack, n, Duration::from_secs(300)).await;
    let (lost, repeats, _) = tally(&stack, n, sent, failed).await;
    assert_eq!((lost, failed), (0, 0), "lost or failed messages");
    let retried = second_attempts_within_in_flight(&stack, repeats).await;
    let all_sent = killed.elapsed();
    stack.cleanup().await;
    Row {
        scenario: "one of two API replicas behind HAProxy SIGKILLed mid-drain (schedulers go through the balancer)",
        messages: n,
        faults: format!("1 SIGKILL, the replica left dead; {retried} messages needed a second attempt"),
        lost,
        duplicates: repeats,
        recovery: format!(
            "delivery went on {:.2} s after the kill; all sent {:.1} s after it",
            recovery.as_secs_f64(),
            all_sent.as_secs_f64()
        ),
    }
}

async fn api_kill() -> Row {
    let n = scaled(3000.0);
    let down = Duration::from_secs_f64((10.0 * scale()).max(3.0));
    let mut stack = Stack::api_and_sink(&draining(&[])).await;
    seed_messages(&Http::new(TEST_KEY), &stack.api, n).await;
    stack.replicas(REPLICAS);
    wait_delivered(&stack, n as u64 / 3).await;
    stack.kill("api");
    tokio::time::sleep(down).await;
    stack.restart("api");
    stack.wait_healthy(&format!("{}/messenger/health", stack.api)).await;
    let recovery = delivery_resumed(&stack, Instant::now()).await;
    let (sent, failed) = settled(&stack, n, Duration::from_secs(300)).await;
    let (lost, repeats, _) = tally(&stack, n, sent, failed).await;
    assert_eq!((lost, failed), (0, 0), "lost or failed messages");
    // No attempt was burnt by the outage beyond the sends in flight at the kill.
    let retried = second_attempts_within_in_flight(&stack, repeats).await;
    stack.cleanup().await;
    Row {
        scenario: "Messenger API SIGKILLed mid-drain, restarted",
        messages: n,
        faults: format!(
            "down {:.0} s; {retried} messages needed a second attempt",
            down.as_secs_f64()
        ),
        lost,
        duplicates: repeats,
        recovery: format!("delivery resumed {:.1} s after the restart", recovery.as_secs_f64()),
    }
}

/// Two providers on one route, primary first: the stack's own stand-in and a second one.
async fn two_providers(extra: &[(&'static str, String)]) -> (Stack, String) {
    Stack::api_and_two_providers(&draining(extra), false).await
}

/// Accepted requests per idempotency key in one stand-in's record.
fn accepted_keys(list: &[Value]) -> HashMap<String, usize> {
    let mut keys = HashMap::new();
    for r in list.iter().filter(|r| r["messageId"].is_string()) {
        *keys
            .entry(r["idempotencyKey"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    keys
}

/// The primary provider's process is SIGKILLed mid-drain and stays dead: everything goes on
/// through the secondary.
async fn provider_dies() -> Row {
    let n = scaled(4000.0);
    let (mut stack, secondary) = two_providers(&[]).await;
    seed_messages(&Http::new(TEST_KEY), &stack.api, n).await;
    stack.replicas(REPLICAS);
    wait_delivered(&stack, (n / 4) as u64).await;
    // What the primary accepted (and answered) before it dies: none of it may be sent again.
    let before = accepted_keys(&stack.received().await);
    stack.kill("sink");
    let killed = Instant::now();
    let resumed = {
        let deadline = Instant::now() + Duration::from_secs(60);
        let start = stack.received_at(&secondary).await.len();
        while stack.received_at(&secondary).await.len() <= start {
            assert!(Instant::now() < deadline, "the secondary never took over");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        killed.elapsed()
    };
    let (sent, failed) = settled(&stack, n, Duration::from_secs(300)).await;
    let lost = n - (sent + failed).min(n);
    let after = accepted_keys(&stack.received_at(&secondary).await);
    let twice_on_secondary: usize = after.values().map(|c| c - 1).sum();
    let resent_after_accepted = before.keys().filter(|k| after.contains_key(*k)).count();
    let moved = all_messages(&stack)
        .await
        .iter()
        .filter(|m| {
            m["provider"] == "secondary"
                && m["attemptsLog"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|a| a["provider"] == "primary"))
        })
        .count();
    assert_eq!((lost, failed), (0, 0), "lost or failed messages");
    assert_eq!(twice_on_secondary, 0, "the secondary took a message twice");
    assert_eq!(
        resent_after_accepted, 0,
        "a message the primary had accepted was sent again"
    );
    stack.cleanup().await;
    Row {
        scenario: "one provider dies: SIGKILL of the primary's process mid-drain, 2 providers on one route",
        messages: n,
        faults: format!(
            "1 SIGKILL after {} accepted by the primary; {moved} messages moved after a failed request to it",
            before.len()
        ),
        lost,
        duplicates: twice_on_secondary + resent_after_accepted,
        recovery: format!(
            "the secondary took over {:.2} s after the kill; all sent",
            resumed.as_secs_f64()
        ),
    }
}

/// Two providers fail in turn (all 503, or 429 with Retry-After), never both at once.
async fn providers_flap() -> Row {
    let n = scaled(4000.0);
    let flips = scaled(20.0).max(4);
    let (mut stack, secondary) = two_providers(&[("HERALD__WEBHOOK_SINK__LATENCY_MS", "20".to_owned())]).await;
    seed_messages(&Http::new(TEST_KEY), &stack.api, n).await;
    let primary = stack.sink.clone();
    let client = reqwest::Client::new();
    let behave = |base: String, body: Value| {
        let client = client.clone();
        async move {
            let put = client
                .put(format!("{base}/webhook-sink/behaviour"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(put.status().is_success());
        }
    };
    let healthy = json!({"failRate": 0.0, "status": 500});
    let t = Instant::now();
    stack.replicas(REPLICAS);
    wait_delivered(&stack, 1).await;
    for flip in 0..flips {
        let (down, up) = if flip % 2 == 0 {
            (&primary, &secondary)
        } else {
            (&secondary, &primary)
        };
        behave(up.clone(), healthy.clone()).await;
        let fault = if flip % 4 < 2 {
            json!({"failRate": 1.0, "status": 503})
        } else {
            json!({"failRate": 1.0, "status": 429, "retryAfterSeconds": 1})
        };
        behave(down.clone(), fault).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    behave(primary.clone(), healthy.clone()).await;
    behave(secondary.clone(), healthy).await;
    let (sent, failed) = settled(&stack, n, Duration::from_secs(300)).await;
    let took = t.elapsed();
    let lost = n - (sent + failed).min(n);
    let mut accepted = accepted_keys(&stack.received().await);
    for (key, count) in accepted_keys(&stack.received_at(&secondary).await) {
        *accepted.entry(key).or_default() += count;
    }
    let repeats: usize = accepted.values().map(|c| c - 1).sum();
    let refused =
        stack.received().await.len() + stack.received_at(&secondary).await.len() - accepted.values().sum::<usize>();
    assert_eq!(lost, 0, "lost messages");
    assert_eq!(repeats, 0, "a message accepted twice");
    assert_eq!(accepted.len(), sent, "every sent message accepted once by one provider");
    stack.cleanup().await;
    Row {
        scenario: "providers flap: two providers on one route fail in turn (503, then 429 + Retry-After), 0.7 s each",
        messages: n,
        faults: format!("{flips} flips, {refused} refused requests; ended {sent} sent, {failed} failed"),
        lost,
        duplicates: repeats,
        recovery: format!("drained in {:.0} s", took.as_secs_f64()),
    }
}

#[tokio::main]
async fn main() {
    assert!(herald_binary().exists(), "cargo build --release --bin herald first");
    let started = Instant::now();
    let mut rows = Vec::new();
    for (name, scenario) in [
        ("provider", 0),
        ("provider-dies", 5),
        ("providers-flap", 6),
        ("kills", 1),
        ("database", 2),
        ("redis", 3),
        ("redis-sentinel", 7),
        ("redis-cluster", 8),
        ("balancer", 9),
        ("api", 4),
    ] {
        let only = std::env::var("CHAOS_ONLY").unwrap_or_default();
        if !only.is_empty() && !only.split(',').any(|o| o == name) {
            continue;
        }
        let t = Instant::now();
        eprintln!("[chaos] {name}…");
        let row = match scenario {
            0 => provider_chaos().await,
            1 => replica_kills().await,
            2 => database_restart().await,
            3 => redis_outage().await,
            5 => provider_dies().await,
            6 => providers_flap().await,
            7 => redis_failover("sentinel").await,
            8 => redis_failover("cluster").await,
            9 => balancer_kill().await,
            _ => api_kill().await,
        };
        eprintln!("[chaos] {name}: green in {:.0} s", t.elapsed().as_secs_f64());
        rows.push(row);
    }
    println!("{}\n", herald_core::testing::stack::machine());
    println!("| scenario | messages | faults injected | lost | duplicates | recovery |");
    println!("|---|---:|---|---:|---:|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.scenario, r.messages, r.faults, r.lost, r.duplicates, r.recovery
        );
    }
    println!();
    println!(
        "CHAOS_SCALE={}, {} scenarios green in {:.0} s",
        scale(),
        rows.len(),
        started.elapsed().as_secs_f64()
    );
}
