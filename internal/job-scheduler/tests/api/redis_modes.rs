//! Redis beyond one node, with real processes: a master + replica + three Sentinels, and a
//! three-master Cluster with a replica each. Three scheduler replicas drain through the shared
//! rate limit while the Messenger API writes the sent cache; the master holding the limiter's
//! key is SIGKILLed mid-drain. Sending goes on, the limit holds through the failover, the
//! cache is repaired, nothing is lost and nothing is sent twice.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use herald_core::doctor::Level;
use test_support::redis_topologies::{RedisCluster, RedisSentinels};

use crate::helpers::{busiest, eventually, most_allowed, sink, Stack};

const MESSAGES: usize = 400;
const RATE: f64 = 20.0;
const BURST: u32 = 5;
const WINDOW: Duration = Duration::from_secs(5);

/// The drain settings of every process, on the Redis `redis` describes.
fn drain(redis: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut all: Vec<(&'static str, String)> = [
        ("HERALD__JOB_SCHEDULER__DRAIN", "true"),
        ("HERALD__JOB_SCHEDULER__IDLE_POLL_MS", "50"),
        ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "50"),
        ("HERALD__JOB_SCHEDULER__CONCURRENCY", "8"),
        ("HERALD__WEBHOOK__RATE_LIMIT_PER_SECOND", "20"),
        ("HERALD__WEBHOOK__RATE_LIMIT_BURST", "5"),
    ]
    .map(|(k, v)| (k, v.to_owned()))
    .to_vec();
    all.extend_from_slice(redis);
    all
}

fn borrowed<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// What the doctor says of Redis under these settings.
async fn doctor_on_redis(stack: &Stack, redis: &[(&'static str, String)]) -> (Level, String) {
    let settings = herald_core::testing::settings_for(&stack.env, &borrowed(redis));
    let findings = herald_core::doctor::examine(&settings, "test", &[]).await;
    let redis = findings
        .into_iter()
        .find(|f| f.subject == "redis")
        .expect("a redis finding");
    (redis.level, redis.detail)
}

/// What a drain through a killed master showed.
struct Outcome {
    delivered: HashMap<String, usize>,
    busiest: usize,
    after_kill: usize,
}

/// Seeds, starts three replicas, calls `kill` once 120 are delivered, waits for every message
/// to be sent.
async fn drain_through<F, Fut>(stack: &Stack, settings: &[(&'static str, String)], kill: F) -> Outcome
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    stack.seed(MESSAGES).await;
    let (url, log) = sink(0, 0.0).await;
    let settings = borrowed(settings);
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(stack.scheduler(&url, &settings).await);
    }
    eventually(Duration::from_secs(60), "120 delivered through Redis", || async {
        log.snapshot().len() >= 120
    })
    .await;
    kill().await;
    let killed_at = Utc::now();
    eventually(Duration::from_secs(120), "every message sent", || async {
        stack.count("sent").await == MESSAGES as u64
    })
    .await;
    for replica in replicas {
        replica.shutdown().await.unwrap();
    }
    let times: Vec<_> = log.snapshot().iter().map(|r| r.received_at).collect();
    let mut delivered: HashMap<String, usize> = HashMap::new();
    for request in log.snapshot() {
        *delivered
            .entry(request.idempotency_key.unwrap_or_default())
            .or_default() += 1;
    }
    Outcome {
        delivered,
        busiest: busiest(&times, WINDOW),
        after_kill: times.iter().filter(|t| **t > killed_at).count(),
    }
}

fn assert_drained(outcome: &Outcome, what: &str) {
    let allowed = most_allowed(RATE, BURST, WINDOW);
    let repeats: usize = outcome.delivered.values().map(|n| n - 1).sum();
    println!(
        "{what}: {} delivered ({} after the kill), {repeats} repeats; at most {} in {WINDOW:?} (allowed {allowed})",
        outcome.delivered.len(),
        outcome.after_kill,
        outcome.busiest
    );
    assert_eq!(outcome.delivered.len(), MESSAGES, "every message reached the provider");
    assert_eq!(repeats, 0, "none sent twice");
    assert!(outcome.after_kill > 100, "sending went on after the kill");
    assert!(
        outcome.busiest <= allowed,
        "the shared limit held through the failover: {} in {WINDOW:?}, allowed {allowed}",
        outcome.busiest
    );
}

#[tokio::test]
async fn on_sentinel_a_master_killed_mid_drain_fails_over_with_the_limit_held_and_nothing_lost() {
    let mut sentinels = RedisSentinels::start().await;
    let redis = vec![
        ("HERALD__REDIS__MODE", "sentinel".to_owned()),
        ("HERALD__REDIS__URL", sentinels.url()),
        ("HERALD__REDIS__SENTINEL_MASTER", sentinels.master_name.clone()),
    ];
    let stack = Stack::start(&borrowed(&redis)).await;
    let (level, detail) = doctor_on_redis(&stack, &redis).await;
    println!("doctor: {detail}");
    assert_eq!(level, Level::Ok, "{detail}");
    assert!(
        detail.contains("role master") && detail.contains("1 connected replica"),
        "{detail}"
    );

    let first = sentinels.first_master_port();
    let outcome = drain_through(&stack, &drain(&redis), || async {
        sentinels.kill_master();
        sentinels.wait_failover(Duration::from_secs(30)).await;
    })
    .await;
    assert_drained(&outcome, "sentinel, master SIGKILLed");
    let now = sentinels.master_port().await.unwrap();
    assert_ne!(now, first, "the replica was promoted");

    // The replicas went back to the limiter in Redis on the new master, and the API's cache
    // entries missed during the failover were written again there.
    let prefix = stack.env.key_prefix.clone();
    let ask = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        test_support::redis_topologies::ask(now, &args)
            .await
            .unwrap_or_default()
    };
    let tat = ask(vec!["EXISTS".into(), format!("{prefix}ratelimit:{{default}}:tat")]).await;
    assert_eq!(tat, "1", "the limiter's schedule lives on the new master");
    eventually(
        Duration::from_secs(60),
        "every sent message cached on the new master",
        || async {
            let keys = ask(vec!["KEYS".into(), format!("{prefix}sent:*")]).await;
            keys.lines().count() == MESSAGES
        },
    )
    .await;
    let (level, detail) = doctor_on_redis(&stack, &redis).await;
    println!("doctor after the failover: {detail}");
    assert_eq!(level, Level::Ok, "{detail}");
    assert!(detail.contains("0 connected replica"), "{detail}");
    stack.cleanup().await;
}

#[tokio::test]
async fn on_a_cluster_keys_spread_over_the_masters_and_a_master_killed_mid_drain_loses_nothing() {
    let mut cluster = RedisCluster::start().await;
    let redis = vec![
        ("HERALD__REDIS__MODE", "cluster".to_owned()),
        ("HERALD__REDIS__URL", cluster.url()),
    ];
    let stack = Stack::start(&borrowed(&redis)).await;
    let (level, detail) = doctor_on_redis(&stack, &redis).await;
    println!("doctor: {detail}");
    assert_eq!(level, Level::Ok, "{detail}");
    assert!(detail.contains("cluster state ok, 3 master(s)"), "{detail}");

    let prefix = stack.env.key_prefix.clone();
    let limiter_key = format!("{prefix}ratelimit:{{default}}:tat");
    let doomed = cluster.master_of(&limiter_key).await.expect("a master for the limiter");
    let outcome = drain_through(&stack, &drain(&redis), || async {
        cluster.kill(doomed);
        cluster.wait_failover(doomed, Duration::from_secs(30)).await;
    })
    .await;
    assert_drained(&outcome, "cluster, the limiter's master SIGKILLed");
    let now = cluster.master_of(&limiter_key).await.expect("a master for the limiter");
    assert_ne!(now, doomed, "its replica took over the limiter's slot");

    // Every sent message is cached, spread over all three masters (the API's pipelines span
    // slots), the missed ones written again after the failover.
    let masters = cluster.master_ports().await;
    assert_eq!(masters.len(), 3, "{masters:?}");
    eventually(
        Duration::from_secs(60),
        "every sent message cached in the cluster",
        || async {
            let mut total = 0;
            for port in &masters {
                total += cluster.keys_on(*port, &format!("{prefix}sent:*")).await.len();
            }
            total == MESSAGES
        },
    )
    .await;
    let mut per_master = Vec::new();
    for port in &masters {
        per_master.push(cluster.keys_on(*port, &format!("{prefix}sent:*")).await.len());
    }
    println!("sent cache entries per master: {per_master:?}");
    assert!(per_master.iter().all(|n| *n > 0), "{per_master:?}");
    let tat = cluster.keys_on(now, &limiter_key).await;
    assert_eq!(tat.len(), 1, "the limiter's schedule lives on the promoted master");
    stack.cleanup().await;
}
