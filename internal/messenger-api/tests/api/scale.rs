//! Issue 13's correctness side: counts maintained as messages change (and reconciled), retention,
//! and list pages read window by window with no gap or repeat.

use std::collections::BTreeMap;
use std::time::Duration;

use bson::oid::ObjectId;
use bson::{doc, DateTime};
use futures::future::join_all;
use herald_messenger_api::service::Upkeep;
use herald_messenger_api::store::MessageStore;
use herald_messenger_api::store::Reconciled;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_with, TestApp};

const STATUSES: [&str; 5] = ["pending", "processing", "sent", "failed", "expired"];

/// What the stats say, per status.
async fn stats_counts(app: &TestApp) -> BTreeMap<String, u64> {
    let stats = app.get_json("/api/messenger/stats").await;
    STATUSES
        .iter()
        .map(|s| (s.to_string(), stats["counts"][s].as_u64().unwrap()))
        .collect()
}

/// What a full count of the collection says, per status.
async fn real_counts(app: &TestApp) -> BTreeMap<String, u64> {
    let messages = app.env.db().collection::<bson::Document>("messages");
    let mut counts = BTreeMap::new();
    for status in STATUSES {
        let n = messages.count_documents(doc! {"status": status}).await.unwrap();
        counts.insert(status.to_string(), n);
    }
    counts
}

/// Reconciles, trying again while the service's own reconciler or a write is busy.
async fn reconcile(store: &MessageStore) -> Reconciled {
    for _ in 0..20 {
        match store.reconcile_counts().await.unwrap() {
            Reconciled::Busy => tokio::time::sleep(Duration::from_millis(300)).await,
            done => return done,
        }
    }
    panic!("the counts never held still");
}

async fn outcomes(app: &TestApp, items: Vec<Value>) -> Value {
    app.http
        .post_json(&app.url("/api/messenger/outcomes"), &json!({"items": items}))
        .await
}

#[tokio::test]
async fn counts_follow_every_transition_from_two_replicas_and_match_a_full_count() {
    let mut app = spawn_app().await;
    let other = app.replica().await;
    // Creates: one at a time on both replicas at once, and a batch.
    let phones: Vec<String> = (0..40).map(|i| format!("+90555{i:07}")).collect();
    let singles = phones.iter().enumerate().map(|(i, phone)| {
        let target = if i % 2 == 0 { &app } else { &other };
        target.create(phone, "hello")
    });
    join_all(singles).await;
    app.seed(60).await;
    let expiring = app
        .post("/api/messenger/messages")
        .json(&json!({"to": "+905550000999", "content": "soon gone",
                      "expiresAt": (chrono::Utc::now() + chrono::Duration::milliseconds(1500)).to_rfc3339()}))
        .send()
        .await
        .unwrap();
    assert_eq!(expiring.status(), 201);
    assert_eq!(stats_counts(&app).await["pending"], 101);

    // Claims on both replicas at once.
    let (a, b) = tokio::join!(app.claim("w-a", 20), other.claim("w-b", 20));
    let claimed: Vec<Value> = a.into_iter().chain(b).collect();
    assert_eq!(claimed.len(), 40);
    let item = |i: usize| {
        (
            claimed[i]["id"].as_str().unwrap(),
            claimed[i]["claimToken"].as_str().unwrap(),
        )
    };
    let error = |status: u16| json!({"kind": "http_status", "status": status, "detail": "no"});
    // Outcomes: one at a time and in batches, on both replicas.
    let commits = (0..8).map(|i| {
        let target = if i % 2 == 0 { &app } else { &other };
        target.commit(item(i).0, item(i).1, "prov")
    });
    for response in join_all(commits).await {
        assert_eq!(response.status(), 200);
    }
    let mut batch = Vec::new();
    for i in 8..20 {
        batch.push(json!({"outcome": "sent", "id": item(i).0, "claimToken": item(i).1}));
    }
    for i in 20..26 {
        batch.push(json!({"outcome": "failed", "id": item(i).0, "claimToken": item(i).1, "error": error(503), "retryable": true}));
    }
    for i in 26..32 {
        batch.push(json!({"outcome": "failed", "id": item(i).0, "claimToken": item(i).1, "error": error(400), "retryable": false}));
    }
    for i in 32..36 {
        batch.push(json!({"outcome": "released", "id": item(i).0, "claimToken": item(i).1}));
    }
    batch.push(json!({"outcome": "expired", "id": item(36).0, "claimToken": item(36).1}));
    let first = outcomes(&other, batch.clone()).await;
    assert_eq!(first["items"].as_array().unwrap().len(), 29);
    // A replay changes nothing, and is not counted again.
    outcomes(&app, batch).await;
    // Operator re-queues: one, then in bulk.
    let failed_id = item(26).0;
    let retried = app
        .post(&format!("/api/messenger/messages/{failed_id}/retry"))
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 202);
    let bulk: Value = app
        .http
        .post_json(
            &app.url("/api/messenger/messages/retry"),
            &json!({"filter": {"status": "failed"}, "dryRun": false}),
        )
        .await;
    assert_eq!(bulk["requeued"], 5);
    // One expires at claim time.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let rest = app.claim("w-c", 100).await;
    assert!(rest.len() >= 60, "the rest were claimable: {}", rest.len());

    let maintained = stats_counts(&app).await;
    assert_eq!(maintained, real_counts(&app).await);
    assert_eq!(maintained["sent"], 20);
    assert_eq!(maintained["expired"], 2);
    assert_eq!(maintained.values().sum::<u64>(), 101);
    // The other replica reads the same document, and /metrics says the same.
    assert_eq!(stats_counts(&other).await, maintained);
    let metrics = app.open_text("/metrics").await;
    for (status, n) in &maintained {
        let line = format!("herald_messages{{status=\"{status}\"}} {n}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn reconciliation_corrects_drift_and_reports_it_but_waits_while_counts_move() {
    let app = spawn_app().await;
    app.seed(10).await;
    let store = MessageStore::new(&app.env.db());
    assert_eq!(reconcile(&store).await, Reconciled::InSync);
    // Writes behind Herald's back (a process that died between a message write and its count
    // write leaves the same): 3 more sent, 2 pending gone.
    let messages = app.env.db().collection::<bson::Document>("messages");
    for i in 0..3 {
        messages
            .insert_one(
                doc! {"_id": ObjectId::new(), "to": format!("+9055500000{i}"), "content": "x",
                "status": "sent", "attempts": 1, "sent_at": DateTime::now(),
                "next_attempt_at": DateTime::now(), "created_at": DateTime::now(),
                "updated_at": DateTime::now()},
            )
            .await
            .unwrap();
    }
    let gone: Vec<ObjectId> = messages
        .find(doc! {"status": "pending"})
        .limit(2)
        .await
        .unwrap()
        .try_collect::<Vec<bson::Document>>()
        .await
        .unwrap()
        .iter()
        .map(|d| d.get_object_id("_id").unwrap())
        .collect();
    messages.delete_many(doc! {"_id": {"$in": gone}}).await.unwrap();
    assert_eq!(
        stats_counts(&app).await["sent"],
        0,
        "maintained counts do not see hand edits"
    );

    let outcome = reconcile(&store).await;
    assert_eq!(
        outcome,
        Reconciled::Corrected(vec![
            (herald_core::message::MessageStatus::Pending, -2),
            (herald_core::message::MessageStatus::Sent, 3)
        ])
    );
    assert_eq!(stats_counts(&app).await, real_counts(&app).await);
    let metrics = app.open_text("/metrics").await;
    // The service's own reconciler ran at start-up; the drift above is this store's.
    assert!(
        metrics.contains("herald_message_counts_reconciliations_total{result="),
        "{metrics}"
    );
    assert!(
        metrics.contains("herald_message_counts_reconciled_timestamp_seconds"),
        "{metrics}"
    );
    let drift = store.counts().metrics().drift.with_label_values(&["sent"]).get();
    assert_eq!(drift, 3);

    // Counts that move while it counts are left alone (busy), never set to a stale count.
    let creating = async {
        for _ in 0..20 {
            app.create("+905551234567", "moving").await;
        }
    };
    let reconciling = async {
        let mut seen = Vec::new();
        for _ in 0..20 {
            seen.push(store.reconcile_counts().await.unwrap());
        }
        seen
    };
    let ((), seen) = tokio::join!(creating, reconciling);
    assert!(
        seen.iter().all(|r| matches!(r, Reconciled::InSync | Reconciled::Busy)),
        "{seen:?}"
    );
    assert_eq!(stats_counts(&app).await, real_counts(&app).await);
    app.cleanup().await;
}

#[tokio::test]
async fn a_new_collection_is_counted_before_its_first_reconciliation() {
    let app = spawn_app().await;
    // Counts written before any reconciliation (the start-up one may not have run yet) are
    // not trusted: the stats count instead, so they are right either way.
    app.env
        .db()
        .collection::<bson::Document>("message_counts")
        .drop()
        .await
        .unwrap();
    app.seed(7).await;
    assert_eq!(stats_counts(&app).await["pending"], 7);
    let store = MessageStore::new(&app.env.db());
    assert_eq!(reconcile(&store).await, Reconciled::InSync);
    assert_eq!(stats_counts(&app).await["pending"], 7);
    app.cleanup().await;
}

/// A collection that already holds messages but no counts (one written before counts were
/// kept) is counted by the first reconciliation of a service started on it, with no writes.
#[tokio::test]
async fn a_service_started_on_messages_without_counts_counts_them_once() {
    let mut app = spawn_app().await;
    let db = app.env.db();
    db.collection::<bson::Document>("message_counts").drop().await.unwrap();
    let now = DateTime::now();
    let raw: Vec<bson::Document> = (0..30)
        .map(|i| match i % 3 {
            0 => doc! {"_id": ObjectId::new(), "to": "+905550000001", "content": "old", "status": "pending",
            "attempts": 0, "created_at": now, "updated_at": now, "next_attempt_at": now},
            1 => doc! {"_id": ObjectId::new(), "to": "+905550000001", "content": "old", "status": "sent",
            "attempts": 1, "created_at": now, "updated_at": now, "next_attempt_at": now,
            "sent_at": now, "webhook_message_id": format!("p-{i}")},
            _ => doc! {"_id": ObjectId::new(), "to": "+905550000001", "content": "old", "status": "failed",
            "attempts": 3, "created_at": now, "updated_at": now, "next_attempt_at": now},
        })
        .collect();
    let newest = raw.iter().map(|d| d.get_object_id("_id").unwrap()).max().unwrap();
    let oldest = raw.iter().map(|d| d.get_object_id("_id").unwrap()).min().unwrap();
    db.collection::<bson::Document>("messages")
        .insert_many(raw)
        .await
        .unwrap();
    // A replica starting now reconciles at start-up, before anything else writes.
    let replica = app.replica().await;
    let counts = db.collection::<bson::Document>("message_counts");
    let mut exact = false;
    for _ in 0..100 {
        let doc = counts.find_one(doc! {}).await.unwrap();
        if doc.is_some_and(|d| d.get_bool("exact").unwrap_or(false)) {
            exact = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(exact, "the start-up reconciliation made the counts exact");
    // And found the bounds list pages start and stop at.
    let bounds = counts.find_one(doc! {}).await.unwrap().unwrap();
    assert_eq!(bounds.get_object_id("first_id").unwrap(), oldest);
    assert_eq!(bounds.get_object_id("last_id").unwrap(), newest);
    assert_eq!(stats_counts(&app).await, real_counts(&app).await);
    assert_eq!(stats_counts(&app).await["sent"], 10);
    let store = MessageStore::new(&db);
    assert_eq!(reconcile(&store).await, Reconciled::InSync);
    // The floors were set too: the first list page finds the oldest messages.
    let page = app.get_json("/api/messenger/messages?limit=50").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 30);
    drop(replica);
    app.cleanup().await;
}

use futures::TryStreamExt;

/// Claims and settles `ids`: the first `sent` of them sent at `sent_at`, the rest failed.
async fn settle(app: &TestApp, sent: usize, sent_at: &str, failed: usize) {
    let claimed = app.claim("w", (sent + failed) as u32).await;
    assert_eq!(claimed.len(), sent + failed);
    let mut items = Vec::new();
    for (i, m) in claimed.iter().enumerate() {
        let (id, token) = (m["id"].as_str().unwrap(), m["claimToken"].as_str().unwrap());
        items.push(if i < sent {
            json!({"outcome": "sent", "id": id, "claimToken": token, "sentAt": sent_at})
        } else {
            json!({"outcome": "failed", "id": id, "claimToken": token, "retryable": false,
                   "error": {"kind": "http_status", "status": 400, "detail": "bad number"}})
        });
    }
    outcomes(app, items).await;
}

#[tokio::test]
async fn retention_removes_only_final_messages_past_their_age_and_keeps_counts_exact() {
    let app = spawn_app_with(&[
        ("HERALD__RETENTION__SENT_DAYS", "2"),
        ("HERALD__RETENTION__FAILED_DAYS", "1"),
    ])
    .await;
    app.seed(4).await;
    settle(
        &app,
        4,
        &(chrono::Utc::now() - chrono::Duration::days(3)).to_rfc3339(),
        0,
    )
    .await;
    app.seed(3).await;
    settle(
        &app,
        3,
        &(chrono::Utc::now() - chrono::Duration::hours(47)).to_rfc3339(),
        0,
    )
    .await;
    app.seed(2).await;
    settle(&app, 0, "", 2).await;
    app.seed(5).await; // 5 pending
    app.claim("w", 2).await; // 2 processing, 3 pending

    let store = MessageStore::new(&app.env.db());
    let settings = app.settings.clone();
    let upkeep = Upkeep::new(
        store.clone(),
        herald_messenger_api::cache::SentCache::new(&settings.redis).unwrap(),
        settings.retention.clone(),
        Duration::from_secs(600),
        herald_messenger_api::metrics::MessengerMetrics::new().unwrap(),
    );
    let now = DateTime::now();
    let removed = upkeep.sweep(now).await.unwrap();
    let by_status: BTreeMap<&str, u64> = removed.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    assert_eq!(by_status, BTreeMap::from([("sent", 4), ("failed", 0), ("expired", 0)]));
    // A day and an hour later the failed ones and the 47-hour-old sent ones are past their age.
    let later = DateTime::from_millis(now.timestamp_millis() + 25 * 3_600_000);
    let removed = upkeep.sweep(later).await.unwrap();
    let by_status: BTreeMap<&str, u64> = removed.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    assert_eq!(by_status, BTreeMap::from([("sent", 3), ("failed", 2), ("expired", 0)]));
    assert_eq!(
        upkeep.sweep(later).await.unwrap().iter().map(|(_, n)| n).sum::<u64>(),
        0
    );
    let counts = stats_counts(&app).await;
    assert_eq!(counts, real_counts(&app).await);
    assert_eq!(
        counts,
        BTreeMap::from([
            ("pending".to_string(), 3),
            ("processing".to_string(), 2),
            ("sent".to_string(), 0),
            ("failed".to_string(), 0),
            ("expired".to_string(), 0),
        ])
    );
    app.cleanup().await;
}

#[tokio::test]
async fn the_service_sweeps_by_itself_and_counts_what_it_removed() {
    let app = spawn_app_with(&[
        ("HERALD__RETENTION__SENT_DAYS", "1"),
        ("HERALD__RETENTION__SWEEP_SECONDS", "1"),
    ])
    .await;
    app.seed(3).await;
    settle(
        &app,
        3,
        &(chrono::Utc::now() - chrono::Duration::days(2)).to_rfc3339(),
        0,
    )
    .await;
    app.seed(2).await;
    settle(&app, 2, &chrono::Utc::now().to_rfc3339(), 0).await;
    test_support::eventually(Duration::from_secs(10), "the old sent messages are removed", || async {
        real_counts(&app).await["sent"] == 2
    })
    .await;
    let metrics = app.open_text("/metrics").await;
    assert!(
        metrics.contains("herald_messages_removed_total{status=\"sent\"} 3"),
        "{metrics}"
    );
    assert_eq!(stats_counts(&app).await["sent"], 2);
    app.cleanup().await;
}

/// Inserts messages directly with ids spread over time (`seconds_ago` each), so pages cross
/// window boundaries of every width; answers their ids newest first.
async fn spread(app: &TestApp, seconds_ago: &[u32], status: &str) -> Vec<ObjectId> {
    let now = chrono::Utc::now().timestamp() as u32;
    let messages = app.env.db().collection::<bson::Document>("messages");
    let mut docs = Vec::new();
    for (i, ago) in seconds_ago.iter().enumerate() {
        let mut bytes = [0u8; 12];
        bytes[..4].copy_from_slice(&(now - ago).to_be_bytes());
        bytes[4..8].copy_from_slice(&(i as u32).to_be_bytes());
        let at = DateTime::from_millis(i64::from(now - ago) * 1000);
        docs.push(
            doc! {"_id": ObjectId::from_bytes(bytes), "to": "+905551112233", "content": "spread",
            "status": status, "attempts": 0, "next_attempt_at": at, "created_at": at,
            "updated_at": at},
        );
    }
    messages.insert_many(docs.clone()).await.unwrap();
    let mut ids: Vec<ObjectId> = docs.iter().map(|d| d.get_object_id("_id").unwrap()).collect();
    ids.sort();
    ids.reverse();
    ids
}

async fn walk(app: &TestApp, path: &str, limit: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match &after {
            None => format!("{path}{sep}limit={limit}"),
            Some(cursor) => format!("{path}{sep}limit={limit}&after={cursor}"),
        };
        let page = app.get_json(&url).await;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match page["nextCursor"].as_str() {
            Some(cursor) => after = Some(cursor.to_owned()),
            None => return seen,
        }
    }
}

#[tokio::test]
async fn cursor_walks_cross_window_boundaries_with_no_gap_or_repeat() {
    let app = spawn_app().await;
    // Dense bursts (many in one second), sparse stragglers hours and a year apart, and a
    // status of which only a few exist far apart.
    let mut ages: Vec<u32> = Vec::new();
    ages.extend(std::iter::repeat_n(5, 300));
    ages.extend(std::iter::repeat_n(6, 50));
    ages.extend([90, 3_600, 7_200, 86_400, 86_401, 31_000_000]);
    ages.extend(std::iter::repeat_n(40_000, 120));
    let pending = spread(&app, &ages, "pending").await;
    let failed = spread(&app, &[1, 100_000, 20_000_000], "failed").await;
    let created = app.seed(45).await; // newest, from the API itself
                                      // Messages written behind Herald's back are listed once a reconciliation found them.
    reconcile(&MessageStore::new(&app.env.db())).await;

    let mut all: Vec<ObjectId> = pending.iter().chain(&failed).copied().collect();
    all.extend(created.iter().map(|id| ObjectId::parse_str(id).unwrap()));
    all.sort();
    all.reverse();
    let expect = |ids: &[ObjectId]| ids.iter().map(|id| id.to_hex()).collect::<Vec<_>>();
    for limit in [1, 7, 100] {
        assert_eq!(
            walk(&app, "/api/messenger/messages", limit).await,
            expect(&all),
            "limit {limit}"
        );
    }
    assert_eq!(
        walk(&app, "/api/messenger/messages?status=failed", 2).await,
        expect(&failed)
    );
    let to_one: Vec<ObjectId> = pending.iter().chain(&failed).copied().collect::<Vec<_>>();
    let mut to_one = to_one;
    to_one.sort();
    to_one.reverse();
    assert_eq!(
        walk(&app, "/api/messenger/messages?to=%2B905551112233", 33).await,
        expect(&to_one)
    );
    // The first page by offset is the first page by cursor; deeper offsets still work.
    let first = app.get_json("/api/messenger/messages?limit=10&offset=0").await;
    let deeper = app.get_json("/api/messenger/messages?limit=10&offset=10").await;
    let ids = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&first), expect(&all[..10]));
    assert_eq!(ids(&deeper), expect(&all[10..20]));
    app.cleanup().await;
}

#[tokio::test]
async fn the_sent_list_walks_by_sent_time_across_windows_and_ties() {
    let app = spawn_app().await;
    app.seed(60).await;
    let claimed = app.claim("w", 60).await;
    let base = chrono::Utc::now() - chrono::Duration::days(200);
    // Sent times spread over 200 days, with groups sharing one millisecond.
    let mut expected: Vec<(i64, String)> = Vec::new();
    let mut items = Vec::new();
    for (i, m) in claimed.iter().enumerate() {
        let offset_ms: i64 = match i % 6 {
            0 => 1_000 * i as i64,
            1 => 86_400_000 * (i as i64 % 150),
            2 => 777,
            3 => 777,
            4 => 3_600_000 * i as i64,
            _ => 17_000_000_000 + i as i64,
        };
        let at = base + chrono::Duration::milliseconds(offset_ms);
        let id = m["id"].as_str().unwrap();
        expected.push((at.timestamp_millis(), id.to_owned()));
        items.push(json!({"outcome": "sent", "id": id, "claimToken": m["claimToken"],
                          "sentAt": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)}));
    }
    outcomes(&app, items).await;
    expected.sort();
    expected.reverse();
    let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
    for limit in [1, 4, 100] {
        assert_eq!(
            walk(&app, "/api/messenger/messages/sent", limit).await,
            expected,
            "limit {limit}"
        );
    }
    app.cleanup().await;
}
