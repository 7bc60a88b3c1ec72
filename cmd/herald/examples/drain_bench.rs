//! Throughput benchmark with real processes: the raw driver's ceiling for the database work of
//! a drain, Herald draining a stored backlog with 1, 2 and 4 scheduler replicas (and with 4 to
//! one provider against two providers splitting one route, in one sitting), one-message
//! POSTs from 64 clients → delivered (rate and accept → sent latency), and 16 contended
//! claimers. CPU ms per delivered message and peak RSS are read from /proc for every process
//! (the API, each replica, the provider stand-in and the database server). Every step checks
//! itself: each message reaches the provider exactly once, or each claim is unique.
//!
//!     cargo build --release --bin herald
//!     cargo run --release -p herald --example drain_bench -- [BACKLOG] [POSTS]
//!
//! Needs the local MongoDB-compatible server and Redis (`build/local-services.sh up`).

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use herald_core::testing::stack::{
    cpu_ms, peak_rss_mib, release_binary as herald_binary, rss_mib, ProcessStack as Stack,
};
use herald_core::testing::{seed_messages, TEST_KEY};
use serde_json::{json, Value};
use test_support::{Http, TestEnv};

const BATCH: i64 = 500;

/// Every scenario's replicas drain: a batch of 500, 64 sends at once, a 1 s schedule.
fn draining() -> Vec<(&'static str, String)> {
    vec![
        ("HERALD__JOB_SCHEDULER__SCHEDULE", "*/1 * * * * *".to_owned()),
        ("HERALD__JOB_SCHEDULER__BATCH_SIZE", BATCH.to_string()),
        ("HERALD__JOB_SCHEDULER__CONCURRENCY", "64".to_owned()),
        ("HERALD__JOB_SCHEDULER__DRAIN", "true".to_owned()),
        ("HERALD__JOB_SCHEDULER__IDLE_POLL_MS", "100".to_owned()),
    ]
}

/// The database server's operation counters (`serverStatus.opcounters`): statements, not
/// commands, for writes (an `update` of 500 counts 500).
async fn opcounters(stack: &Stack) -> Document {
    let status = stack
        .env
        .db()
        .client()
        .database("admin")
        .run_command(doc! {"serverStatus": 1})
        .await
        .unwrap();
    status.get_document("opcounters").cloned().unwrap_or_default()
}

/// CPU before/after and peak RSS per process for one measured interval, and the database
/// operations it took.
struct Usage {
    before: HashMap<u32, f64>,
    ops: Document,
}

impl Usage {
    async fn start(stack: &Stack) -> Self {
        Self {
            before: stack.pids().into_iter().map(|(_, p)| (p, cpu_ms(p))).collect(),
            ops: opcounters(stack).await,
        }
    }

    /// Database operations per 1,000 messages since the start, by kind.
    async fn ops_per_thousand(&self, stack: &Stack, messages: usize) -> String {
        let now = opcounters(stack).await;
        let kinds = ["query", "getmore", "insert", "update", "delete", "command"];
        let per = |kind: &str| {
            let count = |d: &Document| {
                d.get(kind)
                    .and_then(bson::Bson::as_i64)
                    .or_else(|| d.get(kind).and_then(bson::Bson::as_i32).map(i64::from))
                    .unwrap_or(0)
            };
            (count(&now) - count(&self.ops)) as f64 * 1000.0 / messages as f64
        };
        kinds
            .iter()
            .map(|k| format!("{k} {:.0}", per(k)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// (Herald's CPU ms per message, the database's, a per-process summary), over every process
    /// of `stack`, those started during the interval included.
    fn finish(self, stack: &Stack, messages: usize) -> (f64, f64, String) {
        let mut herald = 0.0;
        let mut database = 0.0;
        let mut parts = Vec::new();
        for (name, pid) in stack.pids() {
            let used = cpu_ms(pid) - self.before.get(&pid).copied().unwrap_or(0.0);
            if name == "database" {
                database += used;
            } else if name != "sink" {
                herald += used;
            }
            parts.push(format!(
                "{name} {:.2} ms/msg, {:.0} MiB",
                used / messages as f64,
                peak_rss_mib(pid)
            ));
        }
        (herald / messages as f64, database / messages as f64, parts.join("; "))
    }
}

/// `messages` on a fresh database, with the indexes Herald's store makes.
async fn raw_collection(env: &TestEnv) -> mongodb::Collection<Document> {
    let messages = env.db().collection::<Document>("messages");
    // (keys, unique, sparse)
    for (keys, unique, sparse) in [
        (doc! {"status": 1, "next_attempt_at": 1, "_id": 1}, false, false),
        (doc! {"status": 1, "sent_at": -1}, false, false),
        (doc! {"status": 1, "_id": -1}, false, false),
        (doc! {"idempotency_key": 1}, true, true),
        (doc! {"to": 1, "_id": -1}, false, false),
        (doc! {"claim_token": 1}, false, true),
    ] {
        let options = mongodb::options::IndexOptions::builder()
            .unique(unique.then_some(true))
            .sparse(sparse.then_some(true))
            .build();
        messages
            .create_index(mongodb::IndexModel::builder().keys(keys).options(options).build())
            .await
            .unwrap();
    }
    messages
}

/// `n` pending messages, due now, 1,000 per `insert_many`.
async fn raw_insert(messages: &mongodb::Collection<Document>, n: usize) {
    for chunk in 0..n.div_ceil(1000) {
        let now = DateTime::now();
        let docs: Vec<Document> = (0..1000.min(n - chunk * 1000))
            .map(|i| {
                doc! {"to": format!("+90555{i:07}"), "content": "raw", "status": "pending",
                "attempts": 0, "next_attempt_at": now, "created_at": now, "updated_at": now}
            })
            .collect();
        messages.insert_many(docs).await.unwrap();
    }
}

/// Claims `ids` under a fresh token with one `update_many` and reads them back by it. The
/// filter leads with `_id` and holds an equality on the status (every message here is
/// pending), as Herald's claim filter does: the test server plans by the filter's first field.
async fn raw_claim(messages: &mongodb::Collection<Document>, ids: &[ObjectId], now: DateTime) -> Vec<Document> {
    let token = uuid::Uuid::new_v4().to_string();
    let lease = DateTime::from_millis(now.timestamp_millis() + 600_000);
    messages
        .update_many(
            doc! {"_id": {"$in": ids}, "status": "pending", "next_attempt_at": {"$lte": now}},
            doc! {"$set": {"status": "processing", "claim_token": &token, "next_attempt_at": lease}, "$inc": {"attempts": 1}},
        )
        .await
        .unwrap();
    messages
        .find(doc! {"claim_token": &token})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// The raw driver claiming `per_round` at a time until none is due: find the due ids, claim
/// them with one `update_many`, read them back by token. What 16 claimers of 100 coalesced in
/// one API process cost the database at best; claims/s.
async fn raw_claims(n: usize, per_round: i64) -> f64 {
    let env = TestEnv::new().await.unwrap();
    let messages = raw_collection(&env).await;
    raw_insert(&messages, n).await;
    let t = Instant::now();
    let mut done = 0;
    loop {
        let now = DateTime::now();
        let ids = herald_core::testing::raw_due_ids(&messages, now, per_round)
            .await
            .unwrap();
        if ids.is_empty() {
            break;
        }
        let held = raw_claim(&messages, &ids, now).await;
        done += held.len();
    }
    assert_eq!(done, n, "the raw claims took every message once");
    env.cleanup().await.unwrap();
    n as f64 / t.elapsed().as_secs_f64()
}

/// The raw driver doing a drain's database work: insert, then claim 500 (find due ids sorted,
/// update them, read them back) and commit 500 (one unordered update command) until empty.
async fn raw_ceiling(n: usize) -> (f64, f64) {
    let env = TestEnv::new().await.unwrap();
    let db = env.db();
    let messages = raw_collection(&env).await;
    let t = Instant::now();
    raw_insert(&messages, n).await;
    let insert_rate = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut done = 0;
    loop {
        let now = DateTime::now();
        let ids: Vec<ObjectId> = herald_core::testing::raw_due_ids(&messages, now, BATCH).await.unwrap();
        if ids.is_empty() {
            break;
        }
        let held = raw_claim(&messages, &ids, now).await;
        let updates: Vec<Document> = held
            .iter()
            .map(|m| {
                doc! {"q": {"_id": m.get_object_id("_id").unwrap(), "status": "processing", "claim_token": m.get_str("claim_token").unwrap()},
                "u": {"$set": {"status": "sent", "sent_at": DateTime::now()}}}
            })
            .collect();
        db.run_command(doc! {"update": "messages", "updates": updates, "ordered": false})
            .await
            .unwrap();
        done += held.len();
    }
    assert_eq!(done, n, "the raw drain took every message once");
    let drain_rate = n as f64 / t.elapsed().as_secs_f64();
    env.cleanup().await.unwrap();
    (insert_rate, drain_rate)
}

/// Herald draining a stored backlog of `n` with `replicas` scheduler processes.
async fn herald_drain(n: usize, replicas: usize) -> (f64, f64, f64, String) {
    let http = Http::new(TEST_KEY);
    let mut stack = Stack::api_and_sink(&draining()).await;
    seed_messages(&http, &stack.api, n).await;
    let usage = Usage::start(&stack).await;
    let t = Instant::now();
    stack.replicas(replicas);
    while stack.delivered().await < n as u64 {
        assert!(t.elapsed() < Duration::from_secs(600), "the drain stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    // Delivered is not yet committed: wait for the last reports before checking the store.
    while stack.sent_count().await < n as u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ops = usage.ops_per_thousand(&stack, n).await;
    let (herald_cpu, db_cpu, detail) = usage.finish(&stack, n);
    let detail = format!("{detail}; database ops per 1k messages: {ops}");
    let received = stack.received_counts().await;
    assert_eq!(received.len(), n, "every message reached the provider");
    assert!(received.values().all(|c| *c == 1), "a message was sent twice");
    stack.cleanup().await;
    (n as f64 / secs, herald_cpu, db_cpu, detail)
}

/// What a campaign's drain looked like: the rate over its first, middle and last 100k, and
/// over every 100k in turn.
struct Campaign {
    first: f64,
    middle: f64,
    last: f64,
    whole: f64,
    every: Vec<f64>,
    db_cpu: f64,
    db_rss: (f64, f64),
}

/// A campaign: `n` messages created (batch creates of 1,000) and all due at once, then drained
/// by 4 replicas in drain mode. Times when the provider had received each 100k, and checks
/// every message reached it exactly once. Answers the stack too: dropping a million-message
/// database may outlast the cleanup's timeout, so the caller prints first.
async fn herald_campaign(n: usize) -> (Campaign, Stack) {
    const SEGMENT: u64 = 100_000;
    let http = Http::new(TEST_KEY);
    let mut stack = Stack::api_and_sink(&draining()).await;
    let t = Instant::now();
    seed_messages(&http, &stack.api, n).await;
    eprintln!("campaign: {n} created in {:.0} s", t.elapsed().as_secs_f64());
    let usage = Usage::start(&stack).await;
    let n64 = n as u64;
    let mut marks: Vec<u64> = (1..=n64 / SEGMENT).map(|k| k * SEGMENT).collect();
    marks.extend([n64 / 2 - SEGMENT / 2, n64 / 2 + SEGMENT / 2, n64 - SEGMENT, n64]);
    marks.sort_unstable();
    marks.dedup();
    let mut at = std::collections::BTreeMap::new();
    let t = Instant::now();
    stack.replicas(4);
    let mut next = 0;
    while next < marks.len() {
        assert!(t.elapsed() < Duration::from_secs(7200), "the campaign stalled");
        let delivered = stack.delivered().await;
        while next < marks.len() && delivered >= marks[next] {
            at.insert(marks[next], t.elapsed().as_secs_f64());
            eprintln!("campaign: {} delivered at {:.0} s", marks[next], at[&marks[next]]);
            next += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while stack.sent_count().await < n64 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let db_rss = stack
        .pids()
        .into_iter()
        .find(|(name, _)| name == "database")
        .map_or((f64::NAN, f64::NAN), |(_, pid)| (rss_mib(pid), peak_rss_mib(pid)));
    let (_, db_cpu, _) = usage.finish(&stack, n);
    let received = stack.received_counts().await;
    assert_eq!(received.len(), n, "every message reached the provider");
    assert!(received.values().all(|c| *c == 1), "a message was sent twice");
    let when = |mark: u64| if mark == 0 { 0.0 } else { at[&mark] };
    let rate = |from: u64, to: u64| (to - from) as f64 / (when(to) - when(from));
    let every = (1..=n64 / SEGMENT)
        .map(|k| rate((k - 1) * SEGMENT, k * SEGMENT))
        .collect();
    let campaign = Campaign {
        first: rate(0, SEGMENT),
        middle: rate(n64 / 2 - SEGMENT / 2, n64 / 2 + SEGMENT / 2),
        last: rate(n64 - SEGMENT, n64),
        whole: n as f64 / when(n64),
        every,
        db_cpu,
        db_rss,
    };
    (campaign, stack)
}

/// Herald draining a stored backlog of `n` with 4 scheduler replicas while the provider
/// stand-in posts a signed delivery receipt back for every message it accepts (`delay_ms`
/// later), as a provider closing the loop would. Answers the drain's rate,
/// Herald's and the database's CPU ms per message, how long after the drain the last receipt was
/// applied, and the detail.
async fn herald_drain_with_receipts(n: usize, delay_ms: u64) -> (f64, f64, f64, f64, String) {
    let http = Http::new(TEST_KEY);
    // BENCH_RUST_LOG: the processes' log filter (with STACK_LOGS, to see what happened).
    let log = std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "warn".to_owned());
    let mut vars = vec![("RUST_LOG", log)];
    vars.extend(draining());
    // BENCH_VARS: more settings for every process, `HERALD__A=1,HERALD__B=2`.
    let extra = std::env::var("BENCH_VARS").unwrap_or_default();
    let extra: Vec<(String, String)> = extra
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    vars.extend(extra.iter().map(|(k, v)| (k.as_str(), v.clone())));
    let mut stack = Stack::new(herald_binary(), &vars).await;
    stack.use_providers(&format!(
        "[[providers]]\nname = \"sink\"\nurl = \"{}/webhook\"\nauth_key = \"local-dev-webhook-key\"\n\
         [providers.receipts]\nscheme = \"hmac-sha256\"\nsecret = \"bench-receipts\"\n\
         signature_header = \"X-Sink-Signature\"\nmessage_id_field = \"/messageId\"\n\
         status_field = \"/status\"\nstatus_map = {{ DELIVRD = \"delivered\" }}\n",
        stack.sink
    ));
    let receipts_url = format!("{}/api/messenger/receipts/sink", stack.api);
    stack.start("api", &["messenger-api"], &[]);
    stack.start(
        "sink",
        &[
            "webhook-sink",
            "--receipts-url",
            &receipts_url,
            "--receipts-secret",
            "bench-receipts",
            "--receipts-delay-ms",
            &delay_ms.to_string(),
        ],
        &[],
    );
    stack.wait_healthy(&format!("{}/messenger/health", stack.api)).await;
    stack.wait_healthy(&format!("{}/webhook-sink/health", stack.sink)).await;
    seed_messages(&http, &stack.api, n).await;
    let usage = Usage::start(&stack).await;
    let t = Instant::now();
    stack.replicas(4);
    while stack.delivered().await < n as u64 {
        assert!(t.elapsed() < Duration::from_secs(600), "the drain stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    let drained = Instant::now();
    let messages = stack.env.db().collection::<Document>("messages");
    let delivered = || async {
        messages
            .count_documents(doc! {"delivery.state": "delivered"})
            .await
            .unwrap()
    };
    while delivered().await < n as u64 {
        if drained.elapsed() > Duration::from_secs(300) {
            let sink: Value = stack
                .client
                .get(format!("{}/webhook-sink/receipts", stack.sink))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let waiting = stack
                .env
                .db()
                .collection::<Document>("receipts_pending")
                .count_documents(doc! {})
                .await
                .unwrap();
            let received = stack.received_counts().await;
            let twice = received.values().filter(|c| **c > 1).count();
            panic!(
                "receipts stalled: {} of {n} delivered; the sink's receipts {sink}; {waiting} waiting; {twice} messages sent twice",
                delivered().await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tail = drained.elapsed().as_secs_f64();
    let ops = usage.ops_per_thousand(&stack, n).await;
    let (herald_cpu, db_cpu, detail) = usage.finish(&stack, n);
    let received = stack.received_counts().await;
    assert!(received.values().all(|c| *c == 1), "a message was sent twice");
    stack.cleanup().await;
    let detail = format!("{detail}; database ops per 1k messages: {ops}");
    (n as f64 / secs, herald_cpu, db_cpu, tail, detail)
}

/// Herald draining a stored backlog of `n` with 4 scheduler processes to two providers that
/// split the route evenly (each a stand-in process of its own).
async fn herald_drain_two_providers(n: usize) -> f64 {
    let http = Http::new(TEST_KEY);
    let (mut stack, secondary) = Stack::api_and_two_providers(&draining(), true).await;
    seed_messages(&http, &stack.api, n).await;
    let t = Instant::now();
    stack.replicas(4);
    while stack.delivered().await + stack.delivered_at(&secondary).await < n as u64 {
        assert!(t.elapsed() < Duration::from_secs(600), "the drain stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    while stack.sent_count().await < n as u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut received = stack.received_counts().await;
    let to_primary = received.len();
    for r in stack.received_at(&secondary).await {
        *received
            .entry(r["idempotencyKey"].as_str().unwrap_or("").to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(received.len(), n, "every message reached a provider");
    assert!(received.values().all(|c| *c == 1), "a message was sent twice");
    assert!(
        to_primary > n / 3 && to_primary < 2 * n / 3,
        "an even split, got {to_primary} of {n}"
    );
    stack.cleanup().await;
    n as f64 / secs
}

/// 64 clients POSTing one message at a time while 4 draining replicas deliver: as fast as they
/// can (`pace` `None`: the accept rate is whatever the API takes, so on a machine where that
/// outruns delivery a backlog builds and the latency measures it), or paced to `pace` messages
/// a second in all (an open loop: message `i` is posted at `i / pace` s, or at once when late).
async fn herald_posts(n: usize, pace: Option<f64>) -> (f64, f64, f64, f64, String) {
    let (rate, p50, p99, cpu, detail, _) = posts_to(n, pace, None).await;
    (rate, p50, p99, cpu, detail)
}

/// [`herald_posts`] against an API started with `max_due_backlog` (when given): a client whose
/// create is refused (429) waits its `Retry-After` and posts the same message again. Also
/// answers how many 429s the clients got.
async fn posts_to(n: usize, pace: Option<f64>, max_due_backlog: Option<u64>) -> (f64, f64, f64, f64, String, u64) {
    let http = Http::new(TEST_KEY);
    let mut vars = draining();
    if let Some(bound) = max_due_backlog {
        vars.push(("HERALD__MESSENGER_API__MAX_DUE_BACKLOG", bound.to_string()));
    }
    let mut stack = Stack::api_and_sink(&vars).await;
    stack.replicas(4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let usage = Usage::start(&stack).await;
    let t = Instant::now();
    let api = Arc::new(stack.api.clone());
    let clients: Vec<_> = (0..64)
        .map(|c| {
            let (http, api) = (http.clone(), api.clone());
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                let mut refused = 0u64;
                let start = tokio::time::Instant::now();
                for i in (c..n).step_by(64) {
                    if let Some(rate) = pace {
                        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
                    }
                    let body = json!({"to": format!("+90555{i:07}"), "content": "post"});
                    loop {
                        let answer = http
                            .post(&format!("{api}/api/messenger/messages"))
                            .json(&body)
                            .send()
                            .await
                            .unwrap();
                        if answer.status() == 429 {
                            refused += 1;
                            let wait = answer.headers()["retry-after"]
                                .to_str()
                                .unwrap()
                                .parse::<u64>()
                                .unwrap();
                            tokio::time::sleep(Duration::from_secs(wait)).await;
                            continue;
                        }
                        assert_eq!(answer.status(), 201, "create");
                        let m: Value = answer.json().await.unwrap();
                        accepted.push((m["id"].as_str().unwrap().to_owned(), chrono::Utc::now()));
                        break;
                    }
                }
                (accepted, refused)
            })
        })
        .collect();
    let mut accepted_at = HashMap::new();
    let mut refused = 0;
    for client in clients {
        let (accepted, client_refused) = client.await.unwrap();
        accepted_at.extend(accepted);
        refused += client_refused;
    }
    while stack.delivered().await < n as u64 {
        assert!(t.elapsed() < Duration::from_secs(600), "delivery stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    while stack.sent_count().await < n as u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ops = usage.ops_per_thousand(&stack, n).await;
    let (herald_cpu, _, detail) = usage.finish(&stack, n);
    let detail = format!("{detail}; database ops per 1k messages: {ops}");
    let mut latencies = Vec::new();
    let mut url = format!("{}/api/messenger/messages/sent?limit=100", stack.api);
    loop {
        let page = http.get_json(&url).await;
        for m in page["items"].as_array().unwrap() {
            let sent: chrono::DateTime<chrono::Utc> = m["sentAt"].as_str().unwrap().parse().unwrap();
            if let Some(at) = accepted_at.get(m["id"].as_str().unwrap()) {
                latencies.push((sent - *at).num_milliseconds().max(0) as f64);
            }
        }
        match page["nextCursor"].as_str() {
            Some(c) => url = format!("{}/api/messenger/messages/sent?limit=100&after={c}", stack.api),
            None => break,
        }
    }
    latencies.sort_by(f64::total_cmp);
    assert_eq!(latencies.len(), n, "every posted message was sent");
    let received = stack.received_counts().await;
    let repeated: Vec<(&String, &usize)> = received.iter().filter(|(_, c)| **c > 1).collect();
    if !repeated.is_empty() {
        let log = Http::new(TEST_KEY)
            .open_json(&format!("{}/webhook-sink/received", stack.sink))
            .await;
        for r in log.as_array().unwrap() {
            if repeated
                .iter()
                .any(|(k, _)| r["idempotencyKey"].as_str() == Some(k.as_str()))
            {
                eprintln!("repeat: {} received at {}", r["idempotencyKey"], r["receivedAt"]);
            }
        }
        eprintln!(
            "accepted at: {:?}",
            repeated.iter().map(|(k, _)| accepted_at.get(*k)).collect::<Vec<_>>()
        );
    }
    assert!(
        received.len() == n && repeated.is_empty(),
        "exactly once: {} of {n} received, repeated {repeated:?}",
        received.len()
    );
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    stack.cleanup().await;
    (n as f64 / secs, p(0.5), p(0.99), herald_cpu, detail, refused)
}

/// 16 claimers racing through a backlog of `n` on one API process.
async fn contended_claims(n: usize) -> f64 {
    let http = Http::new(TEST_KEY);
    let stack = Stack::api_and_sink(&draining()).await;
    seed_messages(&http, &stack.api, n).await;
    let t = Instant::now();
    let api = Arc::new(stack.api.clone());
    let claimers: Vec<_> = (0..16)
        .map(|w| {
            let (http, api) = (http.clone(), api.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let body = json!({"worker": format!("bench-{w}"), "limit": 100, "leaseSeconds": 600});
                    let batch: Vec<Value> = http.post_json(&format!("{api}/api/messenger/get-two"), &body).await;
                    if batch.is_empty() {
                        break ids;
                    }
                    ids.extend(batch.into_iter().map(|m| m["id"].as_str().unwrap().to_owned()));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for c in claimers {
        all.extend(c.await.unwrap());
    }
    let secs = t.elapsed().as_secs_f64();
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!((all.len(), unique.len()), (n, n), "claims overlapped or missed");
    stack.cleanup().await;
    n as f64 / secs
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let backlog = args.first().copied().unwrap_or(50_000);
    let posts = args.get(1).copied().unwrap_or(20_000);
    assert!(herald_binary().exists(), "cargo build --release --bin herald first");

    // BENCH_ONLY=drain,routes,receipts,posts,claims picks scenarios (the ceilings always run: ratios need them).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only.split(',').any(|o| o.trim() == name);
    let (insert_rate, ceiling) = raw_ceiling(backlog).await;
    let (small_insert, small_ceiling) = raw_ceiling(1000).await;
    println!("{}\n", herald_core::testing::stack::machine());
    println!("| figure | Herald | raw-driver ceiling | Herald / ceiling |");
    println!("|---|---:|---:|---:|");
    println!("| raw insert, msgs/s ({backlog}) | | {insert_rate:.0} | |");
    println!("| raw insert, msgs/s (1000) | | {small_insert:.0} | |");
    println!("| raw drain (claim 500 + commit 500), msgs/s ({backlog}) | | {ceiling:.0} | |");
    println!("| raw drain (claim 500 + commit 500), msgs/s (1000) | | {small_ceiling:.0} | |");
    let mut details = Vec::new();
    for (n, ceiling) in [(1000, small_ceiling), (backlog, ceiling)]
        .into_iter()
        .filter(|_| wanted("drain"))
    {
        for replicas in [1, 2, 4] {
            let (rate, cpu, db_cpu, detail) = herald_drain(n, replicas).await;
            println!(
                "| drain of a stored {n} backlog, R={replicas}, msgs/s | {rate:.0} | {ceiling:.0} | {:.0} % |",
                100.0 * rate / ceiling
            );
            details.push(format!(
                "drain {n} R={replicas}: Herald {cpu:.3} CPU ms/msg, database {db_cpu:.3}; {detail}"
            ));
        }
    }
    if wanted("routes") {
        // One sitting: the same backlog to one provider, then split over two.
        let (one, ..) = herald_drain(backlog, 4).await;
        let two = herald_drain_two_providers(backlog).await;
        println!(
            "| drain of a stored {backlog} backlog, R=4, one provider, msgs/s | {one:.0} | {ceiling:.0} | {:.0} % |",
            100.0 * one / ceiling
        );
        println!(
            "| the same, two providers on one route (weights 1:1), msgs/s | {two:.0} | {ceiling:.0} | {:.0} % |",
            100.0 * two / ceiling
        );
    }
    if wanted("receipts") {
        // One sitting: the drain alone, then the same drain with a receipt for every message.
        let (alone, cpu, db_cpu, _) = herald_drain(backlog, 4).await;
        // BENCH_RECEIPT_DELAY_MS: how long after accepting a message the stand-in reports it
        // (100 by default: nearly every receipt then beats its commit in a drain).
        let delay: u64 = std::env::var("BENCH_RECEIPT_DELAY_MS")
            .ok()
            .and_then(|d| d.parse().ok())
            .unwrap_or(100);
        let (with, r_cpu, r_db_cpu, tail, detail) = herald_drain_with_receipts(backlog, delay).await;
        println!(
            "| drain of a stored {backlog} backlog, R=4, msgs/s; Herald / database CPU ms per msg | {alone:.0}; {cpu:.3} / {db_cpu:.3} | {ceiling:.0} | {:.0} % |",
            100.0 * alone / ceiling
        );
        println!(
            "| the same with a signed receipt back for each ({delay} ms after), msgs/s; Herald / database CPU ms per msg | {with:.0}; {r_cpu:.3} / {r_db_cpu:.3} | {ceiling:.0} | {:.0} % |",
            100.0 * with / ceiling
        );
        println!("| last receipt applied after the drain ended, s | {tail:.1} | | |");
        details.push(format!("drain with receipts: {detail}"));
    }
    if wanted("posts") {
        let (rate, p50, p99, cpu, detail) = herald_posts(posts, None).await;
        println!(
            "| one-message POSTs from 64 clients → delivered, R=4, msgs/s ({posts}) | {rate:.0} | {ceiling:.0} | {:.0} % |",
            100.0 * rate / ceiling
        );
        println!("| accept → delivered p50 / p99, ms | {p50:.0} / {p99:.0} | | |");
        details.push(format!("posts: Herald {cpu:.3} CPU ms/msg; {detail}"));
        // The same at a load the machine carries: 60 % of the rate just measured.
        let pace = (rate * 0.6).round();
        let (paced, p50, p99, cpu, detail) = herald_posts(posts, Some(pace)).await;
        println!("| the same POSTs paced to {pace:.0}/s (60 % of the above) → delivered, msgs/s | {paced:.0} | | |");
        println!("| paced: accept → delivered p50 / p99, ms | {p50:.0} / {p99:.0} | | |");
        details.push(format!("paced posts: Herald {cpu:.3} CPU ms/msg; {detail}"));
    }
    if wanted("admission") {
        // One sitting: the closed loop without a bound, then with one (SPEC §19).
        let bound = std::env::var("BENCH_MAX_DUE_BACKLOG")
            .ok()
            .and_then(|b| b.parse().ok())
            .unwrap_or(500);
        let (rate, p50, p99, _, _, refused) = posts_to(posts, None, None).await;
        println!(
            "| admission off: one-message POSTs from 64 clients → delivered, R=4, msgs/s ({posts}) | {rate:.0} | | |"
        );
        println!("| admission off: accept → delivered p50 / p99, ms; 429s | {p50:.0} / {p99:.0}; {refused} | | |");
        let (rate, p50, p99, _, _, refused) = posts_to(posts, None, Some(bound)).await;
        println!(
            "| max_due_backlog = {bound}: the same POSTs (a 429 waits Retry-After and posts again), msgs/s | {rate:.0} | | |"
        );
        println!("| max_due_backlog = {bound}: accept → delivered p50 / p99, ms; 429s | {p50:.0} / {p99:.0}; {refused} | | |");
    }
    if std::env::var("BENCH_ONLY").is_ok_and(|o| o.split(',').any(|o| o.trim() == "campaign")) {
        // Only when asked for by name (it takes about half an hour): BENCH_CAMPAIGN messages
        // (1,000,000 by default) due at once, beside the drain of the stored backlog in the
        // same sitting.
        let n = std::env::var("BENCH_CAMPAIGN")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(1_000_000);
        let (base, _, base_db_cpu, _) = herald_drain(backlog, 4).await;
        let (c, stack) = herald_campaign(n).await;
        println!(
            "| drain of a stored {backlog} backlog, R=4, msgs/s; database CPU ms per msg | {base:.0}; {base_db_cpu:.3} | {ceiling:.0} | {:.0} % |",
            100.0 * base / ceiling
        );
        for (what, rate) in [("first", c.first), ("middle", c.middle), ("last", c.last)] {
            println!(
                "| campaign of {n} due at once, R=4: the {what} 100k, msgs/s (of the {backlog} drain) | {rate:.0} | | {:.0} % |",
                100.0 * rate / base
            );
        }
        println!(
            "| campaign: whole drain, msgs/s; database CPU ms per msg; database RSS after / peak, MiB | {:.0}; {:.3}; {:.0} / {:.0} | | |",
            c.whole, c.db_cpu, c.db_rss.0, c.db_rss.1
        );
        let every: Vec<String> = c.every.iter().map(|r| format!("{r:.0}")).collect();
        println!("\ncampaign, msgs/s over each 100k in turn: {}", every.join(", "));
        if let Err(error) = stack.try_cleanup().await {
            eprintln!("the campaign's database is still being dropped by the server: {error:#}");
        }
    }
    if wanted("claims") {
        let claims = contended_claims(20_000).await;
        let raw = raw_claims(20_000, 1600).await;
        println!(
            "| 16 contended claimers × 100, claims/s (20000); ceiling: raw claims of 1600 | {claims:.0} | {raw:.0} | {:.0} % |",
            100.0 * claims / raw
        );
    }
    println!();
    for d in details {
        println!("- {d}");
    }
}
