//! "At scale": what an operator's reads cost with a million messages, against a real
//! `herald messenger-api` process, each beside the raw driver's time for the same query in the
//! same run.
//!
//! Seeds N messages (default 1,000,000; mixed: 1,000 pending and due, the rest sent, failed
//! and expired) straight into a fresh database, starts the API on it (its start-up
//! reconciliation counts them once), then times p50/p99 of: the first list page, a page 90 %
//! deep by cursor, a status-filtered page, `/stats`, `/metrics`, one create, and 40 claims of
//! 500 one second apart beside the million — each beside the same request on a database
//! holding only the 1,000 due, in the same run. `SCALE_ALL_DUE=1`: every message of the
//! million pending and due (a campaign).
//! Checks itself: each page holds exactly the ids the raw driver finds for it, and the counts
//! equal a full count.
//!
//! `cargo build --release --bin herald && cargo run --release -p herald --example
//! scale_bench -- 1000000` (needs the local MongoDB and Redis: `build/local-services.sh up`).

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use herald_core::testing::stack::{machine, release_binary, ProcessStack};
use mongodb::{Collection, Database};
use serde_json::{json, Value};

const KEY: &str = "local-dev-api-key";
const DUE: usize = 1000;
const REPS: usize = 40;

/// A stack running only the Messenger API (the `local` environment, so the local key), on its
/// own fresh database; the API is started and ready when this returns.
async fn api_stack() -> ProcessStack {
    let extra = [
        ("HERALD_ENV", "local".to_owned()),
        ("HERALD__TELEMETRY__FILTER", "warn".to_owned()),
    ];
    let mut stack = ProcessStack::new(release_binary(), &extra).await;
    start_api(&mut stack).await;
    stack
}

/// (Re)starts the stack's API and waits until it is ready.
async fn start_api(stack: &mut ProcessStack) {
    stack.kill("api");
    stack.procs.clear();
    stack.start("api", &["messenger-api"], &[]);
    stack.wait_healthy(&format!("{}/messenger/ready", stack.api)).await;
}

fn percentiles(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    (at(0.5), at(0.99))
}

async fn time<F, Fut, T>(reps: usize, mut f: F) -> ((f64, f64), T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut ms = Vec::with_capacity(reps);
    let mut last = None;
    for _ in 0..reps {
        let start = Instant::now();
        last = Some(f().await);
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    (percentiles(ms), last.unwrap())
}

/// A fresh id dated `at`, as if the message had been created then (Herald dates a message's
/// first due time from its creation: never before its id's second).
fn id_at(at: DateTime) -> ObjectId {
    let mut bytes = ObjectId::new().bytes();
    bytes[..4].copy_from_slice(&((at.timestamp_millis() / 1000) as u32).to_be_bytes());
    ObjectId::from_bytes(bytes)
}

/// Inserts `n` messages, one a millisecond up to now, each created when it fell due: the first `due` pending and due, then sent/failed/expired mixed.
async fn seed(db: &Database, n: usize, due: usize) {
    let messages: Collection<Document> = db.collection("messages");
    let now = DateTime::now().timestamp_millis();
    let started = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        let at = DateTime::from_millis(now - (n - i) as i64);
        let mut doc = doc! {
            "_id": id_at(at), "to": format!("+90555{:07}", i % 100_000),
            "content": format!("scale message {i} with a body of ordinary length for a text"),
            "attempts": 1, "created_at": at, "updated_at": at, "next_attempt_at": at,
        };
        let status = match (i < due, i % 20) {
            (true, _) => "pending",
            (false, 0) => "failed",
            (false, 1) => "expired",
            _ => "sent",
        };
        doc.insert("status", status);
        if status == "pending" {
            doc.insert("attempts", 0);
        }
        if status == "sent" {
            doc.insert("sent_at", at);
            doc.insert("webhook_message_id", format!("prov-{i}"));
        }
        batch.push(doc);
        if batch.len() == 10_000 || i == n - 1 {
            messages
                .insert_many(std::mem::take(&mut batch))
                .ordered(false)
                .await
                .unwrap();
        }
    }
    eprintln!("seeded {n} in {:.1} s", started.elapsed().as_secs_f64());
}

async fn ids_of(cursor: mongodb::Cursor<Document>) -> Vec<String> {
    cursor
        .try_collect::<Vec<Document>>()
        .await
        .unwrap()
        .iter()
        .map(|d| d.get_object_id("_id").unwrap().to_hex())
        .collect()
}

fn page_ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Times a list page through Herald (`query` added to `?limit=20`) beside the raw driver:
/// the plain sorted limit over `filter`, and the best query for the same page (its own id range).
async fn list_row(
    http: &test_support::Http,
    base: &str,
    messages: &Collection<Document>,
    what: &'static str,
    query: &str,
    filter: Document,
) -> Row {
    let url = format!("{base}/api/messenger/messages?limit=20{query}");
    let (herald, page) = time(REPS, || http.get_json(&url)).await;
    let (naive, expect) = time(3, || async {
        ids_of(
            messages
                .find(filter.clone())
                .sort(doc! {"_id": -1})
                .limit(20)
                .await
                .unwrap(),
        )
        .await
    })
    .await;
    assert_eq!(page_ids(&page), expect, "{what}");
    let first = ObjectId::parse_str(&expect[0]).unwrap();
    let last = ObjectId::parse_str(expect.last().unwrap()).unwrap();
    let mut best_filter = filter.clone();
    best_filter.insert("_id", doc! {"$gte": last, "$lte": first});
    let (best, _) = time(REPS, || async {
        ids_of(
            messages
                .find(best_filter.clone())
                .sort(doc! {"_id": -1})
                .limit(21)
                .await
                .unwrap(),
        )
        .await
    })
    .await;
    Row {
        what: what.to_owned(),
        herald,
        raw: best,
        raw_what: "the page's own id range",
        naive: Some(naive),
        small: None,
    }
}

struct Row {
    what: String,
    herald: (f64, f64),
    raw: (f64, f64),
    raw_what: &'static str,
    /// The plain query (sorted limit, or a count) when it differs from the best one.
    naive: Option<(f64, f64)>,
    /// The same request on the database holding only the 1,000 due, in the same run.
    small: Option<(f64, f64)>,
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    // SCALE_ALL_DUE=1: every message of the big database pending and due (a campaign), not 1,000.
    let big_due = if std::env::var("SCALE_ALL_DUE").is_ok_and(|v| v == "1") {
        n
    } else {
        DUE
    };
    let due_label = if big_due == DUE {
        "1k due".to_owned()
    } else {
        format!("{n} due")
    };
    // Indexes first (an API start on the empty database), then the data behind its back, then
    // the API again: its start-up reconciliation counts what is there.
    let mut big_stack = api_stack().await;
    big_stack.kill("api");
    let mut small_stack = api_stack().await;
    small_stack.kill("api");
    let (big, small) = (big_stack.env.db(), small_stack.env.db());
    seed(&big, n, big_due).await;
    seed(&small, DUE, DUE).await;
    let started = Instant::now();
    start_api(&mut big_stack).await;
    start_api(&mut small_stack).await;
    let counts: Collection<Document> = big.collection("message_counts");
    loop {
        let doc = counts.find_one(doc! {}).await.unwrap();
        if doc.is_some_and(|d| d.get_bool("exact").unwrap_or(false)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "start-up reconciliation of {n} messages: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let http = test_support::Http::new(KEY);
    let base = big_stack.api.as_str();
    let messages: Collection<Document> = big.collection("messages");
    let mut rows = Vec::new();

    // Counts are exact.
    let stats = http.get_json(&format!("{base}/api/messenger/stats")).await;
    for status in ["pending", "processing", "sent", "failed", "expired"] {
        let real = messages.count_documents(doc! {"status": status}).await.unwrap();
        assert_eq!(stats["counts"][status].as_u64().unwrap(), real, "{status}");
    }

    // The first page, a page 90 % deep by cursor, a status-filtered page.
    let small_base = small_stack.api.clone();
    let small_get = |path: String| {
        let http = &http;
        let url = format!("{small_base}{path}");
        async move { time(REPS, || http.get_json(&url)).await.0 }
    };
    rows.push(list_row(&http, base, &messages, "first list page (20)", "", doc! {}).await);
    rows.last_mut().unwrap().small = Some(small_get("/api/messenger/messages?limit=20".to_owned()).await);
    let depth = n * 9 / 10;
    let anchor = messages
        .find(doc! {})
        .sort(doc! {"_id": 1})
        .skip((n - depth) as u64)
        .limit(1)
        .projection(doc! {"_id": 1})
        .await
        .unwrap();
    let cursor = ids_of(anchor).await.remove(0);
    let cursor_id = ObjectId::parse_str(&cursor).unwrap();
    rows.push(
        list_row(
            &http,
            base,
            &messages,
            "page 90 % deep by cursor",
            &format!("&after={cursor}"),
            doc! {"_id": {"$lt": cursor_id}},
        )
        .await,
    );
    let small_messages: Collection<Document> = small.collection("messages");
    let small_anchor = small_messages
        .find(doc! {})
        .sort(doc! {"_id": 1})
        .skip((DUE / 10) as u64)
        .limit(1)
        .projection(doc! {"_id": 1})
        .await
        .unwrap();
    let small_cursor = ids_of(small_anchor).await.remove(0);
    rows.last_mut().unwrap().small =
        Some(small_get(format!("/api/messenger/messages?limit=20&after={small_cursor}")).await);
    // A status-filtered page: failed ones, or (every message due) pending ones.
    let (label, status) = if big_due == n {
        ("status=pending page (20)", "pending")
    } else {
        ("status=failed page (20)", "failed")
    };
    rows.push(
        list_row(
            &http,
            base,
            &messages,
            label,
            &format!("&status={status}"),
            doc! {"status": status},
        )
        .await,
    );

    // Stats and metrics, beside what they used to do: count every status.
    let url = format!("{base}/api/messenger/stats");
    let (herald, _) = time(REPS, || http.get_json(&url)).await;
    let (raw, _) = time(3, || async {
        for status in ["pending", "processing", "sent", "failed", "expired"] {
            messages.count_documents(doc! {"status": status}).await.unwrap();
        }
    })
    .await;
    rows.push(Row {
        what: "/api/messenger/stats".to_owned(),
        herald,
        raw: (0.0, 0.0),
        raw_what: "count_documents per status",
        naive: Some(raw),
        small: Some(small_get("/api/messenger/stats".to_owned()).await),
    });
    let url = format!("{base}/metrics");
    let (herald, _) = time(REPS, || http.open_text(&url)).await;
    let small_url = format!("{small_base}/metrics");
    let (small_metrics, _) = time(REPS, || http.open_text(&small_url)).await;
    rows.push(Row {
        what: "/metrics".to_owned(),
        herald,
        raw: (0.0, 0.0),
        raw_what: "count_documents per status",
        naive: Some(raw),
        small: Some(small_metrics),
    });

    // One create.
    let create = |base: String| {
        let http = &http;
        let mut i = 0;
        async move {
            time(REPS, || {
                i += 1;
                let body = json!({"to": format!("+90556{i:07}"), "content": "one more"});
                let url = format!("{base}/api/messenger/messages");
                async move { http.post_json::<Value>(&url, &body).await }
            })
            .await
            .0
        }
    };
    let herald = create(base.to_owned()).await;
    let small_create = create(small_base.clone()).await;
    let (raw, _) = time(REPS, || async {
        messages
            .insert_one(
                doc! {"_id": ObjectId::new(), "to": "+905560000000", "content": "raw", "status": "expired",
                "attempts": 0, "next_attempt_at": DateTime::now()},
            )
            .await
            .unwrap()
    })
    .await;
    // The raw inserts went behind the counts' back: take them out again.
    messages.delete_many(doc! {"content": "raw"}).await.unwrap();
    rows.push(Row {
        what: "create one message".to_owned(),
        herald,
        raw,
        raw_what: "insert_one",
        naive: None,
        small: Some(small_create),
    });

    // A claim of 500 beside the million, and on a database holding only the 1,000 due.
    let claim = |base: String| {
        let http = &http;
        async move {
            let claimed: Vec<Value> = http
                .post_json(
                    &format!("{base}/api/messenger/get-two"),
                    &json!({"worker": "bench", "limit": 500}),
                )
                .await;
            assert_eq!(claimed.len(), 500);
            let items: Vec<Value> = claimed
                .iter()
                .map(|m| json!({"outcome": "released", "id": m["id"], "claimToken": m["claimToken"]}))
                .collect();
            let start = Instant::now();
            let _: Value = http
                .post_json(&format!("{base}/api/messenger/outcomes"), &json!({"items": items}))
                .await;
            start.elapsed()
        }
    };
    // One second apart, so the claimer's periodic look-behind falls inside what is timed; each
    // against the same claim on the small database.
    let mut claim_ms = Vec::new();
    let mut small_ms = Vec::new();
    for _ in 0..REPS {
        let tick = Instant::now();
        let start = Instant::now();
        let release = claim(big_stack.api.clone()).await;
        claim_ms.push((start.elapsed() - release).as_secs_f64() * 1000.0);
        let start = Instant::now();
        let release = claim(small_stack.api.clone()).await;
        small_ms.push((start.elapsed() - release).as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed())).await;
    }
    let within = claim_ms
        .iter()
        .zip(&small_ms)
        .filter(|(big, small)| **big <= (*small * 1.5).max(*small + 20.0))
        .count();
    let worst = claim_ms.iter().copied().fold(0.0, f64::max);
    let (herald, small_claim) = (percentiles(claim_ms), percentiles(small_ms));
    let raw_claim = |db: Database| async move {
        let messages: Collection<Document> = db.collection("messages");
        let now = DateTime::now();
        let ids: Vec<ObjectId> = herald_core::testing::raw_due_ids(&messages, now, 500).await.unwrap();
        let token = uuid::Uuid::new_v4().to_string();
        messages
            .update_many(
                doc! {"_id": {"$in": &ids}},
                doc! {"$set": {"status": "processing", "claim_token": &token}},
            )
            .await
            .unwrap();
        let held = messages
            .find(doc! {"claim_token": &token})
            .await
            .unwrap()
            .try_collect::<Vec<Document>>()
            .await
            .unwrap();
        assert_eq!(held.len(), 500);
        messages
            .update_many(
                doc! {"claim_token": &token},
                doc! {"$set": {"status": "pending"}, "$unset": {"claim_token": ""}},
            )
            .await
            .unwrap();
    };
    let mut raw_ms = Vec::new();
    let mut raw_small_ms = Vec::new();
    // With every message due the raw sorted read takes seconds: a few are enough to show it.
    let raw_reps = if big_due == n { 5 } else { REPS };
    for _ in 0..raw_reps {
        let start = Instant::now();
        raw_claim(big.clone()).await;
        raw_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        let start = Instant::now();
        raw_claim(small.clone()).await;
        raw_small_ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    rows.push(Row {
        what: format!("claim 500 beside {n} ({due_label})"),
        herald,
        raw: percentiles(raw_ms),
        raw_what: "find due sorted + update_many + read back",
        naive: None,
        small: Some(small_claim),
    });
    rows.push(Row {
        what: "claim 500, only the 1k due".to_owned(),
        herald: small_claim,
        raw: percentiles(raw_small_ms),
        raw_what: "the same on the small database",
        naive: None,
        small: None,
    });

    // Counts still exact after all that.
    let stats = http.get_json(&format!("{base}/api/messenger/stats")).await;
    for status in ["pending", "processing", "sent", "failed", "expired"] {
        let real = messages.count_documents(doc! {"status": status}).await.unwrap();
        assert_eq!(
            stats["counts"][status].as_u64().unwrap(),
            real,
            "{status} after the run"
        );
    }

    println!("\n{}", machine());
    println!("\nAt scale: {n} messages, {due_label} (release build; p50 / p99 over {REPS} requests, ms)\n");
    println!(
        "| operation | Herald p50 / p99 | same with 1k due p50 / p99 | raw best query p50 / p99 | raw plain query p50 | raw query |"
    );
    println!("|---|---:|---:|---:|---:|---|");
    let pair = |(p50, p99): (f64, f64)| {
        if p50 == 0.0 {
            "–".to_owned()
        } else {
            format!("{p50:.1} / {p99:.1}")
        }
    };
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            row.what,
            pair(row.herald),
            row.small.map_or("–".to_owned(), pair),
            pair(row.raw),
            row.naive.map_or("–".to_owned(), |(p50, _)| format!("{p50:.1}")),
            row.raw_what
        );
    }
    println!(
        "\nClaims of 500 one second apart: {within} of {REPS} within 1.5x (or +20 ms) of the same claim with 1k due; slowest {worst:.1} ms."
    );
    big_stack.cleanup().await;
    small_stack.cleanup().await;
}
