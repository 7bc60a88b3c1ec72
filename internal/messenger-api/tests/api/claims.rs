use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::helpers::{assert_error, spawn_app};

#[tokio::test]
async fn get_two_claims_the_oldest_due_messages_with_a_token_and_lease() {
    let app = spawn_app().await;
    let ids = app.seed(5).await;
    let claimed = app.claim_with(json!({"worker": "worker-a"})).await;
    assert_eq!(claimed.len(), 2, "default limit is two");
    let got: Vec<&str> = claimed.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(got, [ids[0].as_str(), ids[1].as_str()]);
    for m in &claimed {
        assert!(m["claimToken"].as_str().is_some_and(|t| !t.is_empty()));
        assert_eq!(m["attempt"], 1);
        assert!(m["to"].is_string() && m["content"].is_string() && m["leaseUntil"].is_string());
    }
    let stored = app.message(&ids[0]).await;
    assert_eq!(stored["status"], "processing");
    assert_eq!(stored["claimedBy"], "worker-a");
    app.cleanup().await;
}

#[tokio::test]
async fn claim_requests_are_validated() {
    let app = spawn_app().await;
    for body in [
        json!({"worker": "w", "limit": 0}),
        json!({"worker": "w", "limit": 501}),
        json!({"worker": "  "}),
        json!({"worker": "w", "leaseSeconds": 0}),
    ] {
        let response = app.post("/api/messenger/get-two").json(&body).send().await.unwrap();
        assert_error(response, 400, 400011).await;
    }
    let missing = app
        .post("/api/messenger/get-two")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_error(missing, 400, 400001).await;
    app.cleanup().await;
}

/// Claims `limit` at a time as `worker-<w>` until nothing is due; the ids it got.
async fn claim_until_empty(app: &crate::helpers::TestApp, w: usize, limit: u32) -> Vec<String> {
    let mut mine = Vec::new();
    loop {
        let batch = app.claim(&format!("worker-{w}"), limit).await;
        if batch.is_empty() {
            return mine;
        }
        mine.extend(batch.into_iter().map(|m| m["id"].as_str().unwrap().to_owned()));
    }
}

#[tokio::test]
async fn many_concurrent_claimers_never_share_a_message_and_together_take_all() {
    let app = Arc::new(spawn_app().await);
    let total = 3000;
    app.seed(total).await;
    let workers = (0..16).map(|w| {
        let app = app.clone();
        tokio::spawn(async move { claim_until_empty(&app, w, 50).await })
    });
    let mut all = Vec::new();
    for worker in futures::future::join_all(workers).await {
        all.extend(worker.unwrap());
    }
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "a message was handed to two claimers");
    assert_eq!(all.len(), total, "every message was claimed");
    let app = Arc::into_inner(app).unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn an_expired_lease_is_claimable_again_and_the_old_claim_cannot_commit() {
    let app = spawn_app().await;
    let ids = app.seed(1).await;
    let first = app
        .claim_with(json!({"worker": "slow", "limit": 1, "leaseSeconds": 1}))
        .await;
    assert_eq!(first.len(), 1);
    assert!(app.claim("other", 1).await.is_empty(), "a held claim is not handed out");
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let second = app.claim("fast", 1).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0]["id"], ids[0]);
    assert_eq!(second[0]["attempt"], 2);
    assert_ne!(second[0]["claimToken"], first[0]["claimToken"]);

    let stale = app
        .commit(&ids[0], first[0]["claimToken"].as_str().unwrap(), "late")
        .await;
    assert_error(stale, 409, 409002).await;
    assert_eq!(
        app.env.redis_get(&format!("sent:{}", ids[0])).await.unwrap(),
        None,
        "Redis untouched"
    );

    let fresh = app
        .commit(&ids[0], second[0]["claimToken"].as_str().unwrap(), "on-time")
        .await;
    assert_eq!(fresh.status(), 200);
    app.cleanup().await;
}

#[tokio::test]
async fn a_sent_message_is_never_claimed_again() {
    let app = spawn_app().await;
    let ids = app.seed(1).await;
    let claimed = app
        .claim_with(json!({"worker": "w", "limit": 1, "leaseSeconds": 1}))
        .await;
    let committed = app
        .commit(&ids[0], claimed[0]["claimToken"].as_str().unwrap(), "p-1")
        .await;
    assert_eq!(committed.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    assert!(app.claim("w", 10).await.is_empty());
    let message: Value = app.message(&ids[0]).await;
    assert_eq!(message["status"], "sent");
    app.cleanup().await;
}

#[tokio::test]
async fn successive_claims_walk_a_backlog_oldest_first() {
    let app = spawn_app().await;
    let ids = app.seed(60).await;
    let mut claimed = Vec::new();
    for _ in 0..6 {
        let batch = app.claim("w", 10).await;
        assert_eq!(batch.len(), 10);
        claimed.extend(batch.into_iter().map(|m| m["id"].as_str().unwrap().to_owned()));
    }
    assert_eq!(claimed, ids, "in the order they fell due");
    assert!(app.claim("w", 10).await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn a_message_due_behind_the_claim_window_is_still_claimed() {
    let app = spawn_app().await;
    app.seed(10).await;
    assert_eq!(
        app.claim("w", 5).await.len(),
        5,
        "the claimer now reads from the oldest due"
    );
    // A message due an hour before anything the claimer has seen (a skewed clock, an edit).
    let late = app.create("+905551234567", "behind the window").await;
    let hour_ago = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 3_600_000);
    app.set_due(late["id"].as_str().unwrap(), hour_ago).await;
    let batch = app.claim("w", 10).await;
    assert_eq!(batch.len(), 6);
    assert!(
        batch.iter().any(|m| m["id"] == late["id"]),
        "the late message was found"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_message_made_due_long_before_everything_is_claimed_first_by_the_look_behind() {
    let app = spawn_app().await;
    let ids = app.seed(30).await;
    // The claimer's window now starts at the oldest due message, and claims do not come up
    // short, so only the periodic look-behind can find what lands behind it.
    assert_eq!(app.claim("w", 5).await.len(), 5);
    let long_ago = bson::DateTime::parse_rfc3339_str("1999-12-31T23:59:59Z").unwrap();
    app.set_due(&ids[29], long_ago).await;
    tokio::time::sleep(std::time::Duration::from_millis(5200)).await;
    let batch = app.claim("w", 5).await;
    let got: HashSet<&str> = batch.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        got,
        HashSet::from([&ids[29], &ids[5], &ids[6], &ids[7], &ids[8]].map(String::as_str)),
        "the edited message (due first), then the window's oldest"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn claimers_on_two_api_replicas_never_share_a_message() {
    let mut app = spawn_app().await;
    let total = 1000;
    app.seed(total).await;
    let replica = Arc::new(app.replica().await);
    let app = Arc::new(app);
    let workers = (0..8).map(|w| {
        let api = if w % 2 == 0 { app.clone() } else { replica.clone() };
        tokio::spawn(async move { claim_until_empty(&api, w, 40).await })
    });
    let mut all = Vec::new();
    for worker in futures::future::join_all(workers).await {
        all.extend(worker.unwrap());
    }
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(
        (unique.len(), all.len()),
        (total, total),
        "each message claimed exactly once"
    );
    drop(replica);
    let app = Arc::into_inner(app).unwrap();
    app.cleanup().await;
}

#[tokio::test]
async fn a_held_claim_is_extended_and_a_lapsed_or_foreign_one_is_not() {
    let app = spawn_app().await;
    app.seed(2).await;
    let held = app
        .claim_with(json!({"worker": "w", "limit": 2, "leaseSeconds": 1}))
        .await;
    assert_eq!(held.len(), 2);
    let (kept, lapsing) = (&held[0], &held[1]);
    let extend = |body: Value| app.post("/api/messenger/extend").json(&body).send();
    let claim_of = |m: &Value| json!({"id": m["id"], "claimToken": m["claimToken"]});

    let answer: Value = extend(json!({"items": [claim_of(kept)], "leaseSeconds": 60}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["extended"], 1, "{answer}");
    let lease = app.message(kept["id"].as_str().unwrap()).await["leaseUntil"].clone();
    // A shorter extension never shortens a lease (still counted: the claim is held).
    let answer: Value = extend(json!({"items": [claim_of(kept)], "leaseSeconds": 1}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["extended"], 1, "{answer}");
    assert_eq!(app.message(kept["id"].as_str().unwrap()).await["leaseUntil"], lease);

    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let taken = app.claim("other", 10).await;
    assert_eq!(taken.len(), 1, "only the lapsed claim moved on");
    assert_eq!(taken[0]["id"], lapsing["id"]);
    // The lapsed claim is no longer its first worker's to extend.
    let answer: Value = extend(json!({"items": [claim_of(lapsing)]}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["extended"], 0, "{answer}");
    assert_eq!(app.message(lapsing["id"].as_str().unwrap()).await["claimedBy"], "other");
    // The kept one commits under its first token.
    let id = kept["id"].as_str().unwrap();
    let committed = app.commit(id, kept["claimToken"].as_str().unwrap(), "prov-1").await;
    assert_eq!(committed.status(), 200);

    for bad in [
        json!({"items": []}),
        json!({"items": [{"id": "nope", "claimToken": "t"}]}),
        json!({"items": [claim_of(kept), claim_of(kept)]}),
        json!({"items": [claim_of(kept)], "leaseSeconds": 0}),
    ] {
        assert_error(extend(bad).await.unwrap(), 400, 400022).await;
    }
    app.cleanup().await;
}
