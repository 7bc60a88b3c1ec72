//! `sendAt`, `expiresAt`, the `expired` status and the bulk re-queue.

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};

use crate::helpers::{assert_error, spawn_app, TestApp};

fn rfc3339(at: chrono::DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

async fn create_with(app: &TestApp, body: Value) -> reqwest::Response {
    app.post("/api/messenger/messages").json(&body).send().await.unwrap()
}

#[tokio::test]
async fn send_at_and_expires_at_are_checked_with_their_own_codes() {
    let app = spawn_app().await;
    let now = Utc::now();
    let base = |extra: Value| {
        let mut body = json!({"to": "+905551111111", "content": "hi"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let far = create_with(&app, base(json!({"sendAt": rfc3339(now + chrono::Duration::days(31))}))).await;
    assert_error(far, 400, 400015).await;
    let past = create_with(
        &app,
        base(json!({"expiresAt": rfc3339(now - chrono::Duration::seconds(1))})),
    )
    .await;
    assert_error(past, 400, 400016).await;
    let before_start = create_with(
        &app,
        base(json!({"sendAt": rfc3339(now + chrono::Duration::hours(2)), "expiresAt": rfc3339(now + chrono::Duration::hours(1))})),
    )
    .await;
    assert_error(before_start, 400, 400016).await;
    let garbled = create_with(&app, base(json!({"sendAt": "tomorrow"}))).await;
    assert_eq!(garbled.status(), 400);
    let batch = app
        .post("/api/messenger/messages/batch")
        .json(&json!({"messages": [
            {"to": "+905551111111", "content": "ok"},
            {"to": "+905551111112", "content": "late", "expiresAt": rfc3339(now - chrono::Duration::seconds(5))},
        ]}))
        .send()
        .await
        .unwrap();
    let body = assert_error(batch, 400, 400007).await;
    assert!(body["message"].as_str().unwrap().contains("messages[1]"), "{body}");
    let stored = app.get_json("/api/messenger/messages?limit=1&withTotal=true").await;
    assert_eq!(stored["total"], 0, "nothing half-written");
    app.cleanup().await;
}

#[tokio::test]
async fn a_message_is_not_due_before_its_send_at() {
    let app = spawn_app().await;
    let send_at = Utc::now() + chrono::Duration::seconds(2);
    let created = create_with(
        &app,
        json!({"to": "+905551111111", "content": "later", "sendAt": rfc3339(send_at)}),
    )
    .await;
    assert_eq!(created.status(), 201);
    let message: Value = created.json().await.unwrap();
    let at = |field: &str| chrono::DateTime::parse_from_rfc3339(message[field].as_str().unwrap()).unwrap();
    assert_eq!(at("sendAt").timestamp_millis(), send_at.timestamp_millis());
    assert_eq!(
        at("nextAttemptAt").timestamp_millis(),
        send_at.timestamp_millis(),
        "due at sendAt"
    );
    assert!(app.claim("w", 10).await.is_empty(), "not before sendAt");
    tokio::time::sleep((send_at - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(50)).await;
    let claimed = app.claim("w", 10).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0]["expiresAt"], Value::Null);
    app.cleanup().await;
}

#[tokio::test]
async fn a_message_due_past_its_expiry_is_expired_not_handed_out() {
    let app = spawn_app().await;
    let expires_at = Utc::now() + chrono::Duration::milliseconds(800);
    let created: Value = create_with(
        &app,
        json!({"to": "+905551111111", "content": "otp 1234", "expiresAt": rfc3339(expires_at)}),
    )
    .await
    .json()
    .await
    .unwrap();
    let id = created["id"].as_str().unwrap();
    let fresh = app.seed(1).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let claimed = app.claim("w", 10).await;
    assert_eq!(claimed.len(), 1, "only the message without an expiry: {claimed:?}");
    assert_eq!(claimed[0]["id"], fresh[0].as_str());
    let expired = app.message(id).await;
    assert_eq!(expired["status"], "expired");
    assert_eq!(expired["attempts"], 0, "never attempted");
    let listed = app
        .get_json("/api/messenger/messages?status=expired&withTotal=true")
        .await;
    assert_eq!(listed["total"], 1);
    let stats = app.get_json("/api/messenger/stats").await;
    assert_eq!(stats["counts"]["expired"], 1, "{stats}");
    let metrics = app.open_text("/metrics").await;
    assert!(
        metrics.contains("herald_messages_expired_total{via=\"claim\"} 1"),
        "{metrics}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_worker_reports_a_claimed_message_expired_and_a_late_retry_expires_it() {
    let app = crate::helpers::spawn_app_with(&[("HERALD__DELIVERY__RETRY_SCHEDULE_SECONDS", "5,10")]).await;
    let soon = rfc3339(Utc::now() + chrono::Duration::seconds(3));
    let mut ids = Vec::new();
    for n in 0..2 {
        let created: Value = create_with(
            &app,
            json!({"to": "+905551111111", "content": format!("otp {n}"), "expiresAt": soon}),
        )
        .await
        .json()
        .await
        .unwrap();
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    let claimed = app.claim("w", 2).await;
    assert_eq!(claimed.len(), 2);
    let expires = chrono::DateTime::parse_from_rfc3339(claimed[0]["expiresAt"].as_str().unwrap()).unwrap();
    assert_eq!(
        rfc3339(expires.to_utc()),
        soon,
        "a worker learns the expiry with the claim"
    );
    let token = |i: usize| claimed[i]["claimToken"].as_str().unwrap().to_owned();
    let report = app
        .post("/api/messenger/outcomes")
        .json(&json!({"items": [
            {"outcome": "expired", "id": claimed[0]["id"], "claimToken": token(0)},
            {"outcome": "failed", "id": claimed[1]["id"], "claimToken": token(1),
             "error": {"kind": "http_status", "status": 500, "detail": "down"}, "retryable": true},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(report.status(), 200);
    let results: Value = report.json().await.unwrap();
    assert_eq!(results["items"][0]["result"], "expired");
    assert_eq!(
        results["items"][1]["result"], "expired",
        "the 5 s retry would come after expiresAt"
    );
    for id in &ids {
        let message = app.message(id).await;
        assert_eq!(message["status"], "expired", "{message}");
    }
    assert_eq!(app.message(claimed[0]["id"].as_str().unwrap()).await["attempts"], 0);
    assert_eq!(app.message(claimed[1]["id"].as_str().unwrap()).await["attempts"], 1);
    app.cleanup().await;
}

async fn fail_for_good(app: &TestApp, worker: &str, n: u32) {
    let claimed = app.claim(worker, n).await;
    let items: Vec<Value> = claimed
        .iter()
        .map(|m| {
            json!({"outcome": "failed", "id": m["id"], "claimToken": m["claimToken"],
                   "error": {"kind": "http_status", "status": 400, "detail": "bad"}, "retryable": false})
        })
        .collect();
    let report = app
        .post("/api/messenger/outcomes")
        .json(&json!({ "items": items }))
        .send()
        .await
        .unwrap();
    assert_eq!(report.status(), 200);
}

async fn requeue(app: &TestApp, body: Value) -> Value {
    let response = app
        .post("/api/messenger/messages/retry")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn a_bulk_requeue_takes_exactly_the_matching_failed_messages_once() {
    let app = spawn_app().await;
    app.seed(5).await;
    fail_for_good(&app, "w", 5).await;
    let between = Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let other: Value = create_with(&app, json!({"to": "+905559999999", "content": "x"}))
        .await
        .json()
        .await
        .unwrap();
    fail_for_good(&app, "w", 1).await;
    app.seed(2).await; // pending: never matched
    assert_eq!(
        app.get_json("/api/messenger/messages?status=failed&withTotal=true")
            .await["total"],
        6
    );

    let dry = requeue(&app, json!({"filter": {"status": "failed"}, "dryRun": true})).await;
    assert_eq!(
        dry,
        json!({"matched": 6, "requeued": 0, "remaining": 6, "dryRun": true})
    );
    assert_eq!(
        app.get_json("/api/messenger/messages?status=failed&withTotal=true")
            .await["total"],
        6,
        "a dry run changes nothing"
    );

    let by_phone = requeue(&app, json!({"filter": {"status": "failed", "to": "+905559999999"}})).await;
    assert_eq!(by_phone["requeued"], 1);
    let requeued = app.message(other["id"].as_str().unwrap()).await;
    assert_eq!(
        (requeued["status"].as_str(), requeued["attempts"].as_i64()),
        (Some("pending"), Some(0))
    );

    let older = requeue(
        &app,
        json!({"filter": {"status": "failed", "createdTo": rfc3339(between)}, "dryRun": false}),
    )
    .await;
    assert_eq!(
        older,
        json!({"matched": 5, "requeued": 5, "remaining": 0, "dryRun": false})
    );
    let again = requeue(&app, json!({"filter": {"status": "failed"}})).await;
    assert_eq!(
        again,
        json!({"matched": 0, "requeued": 0, "remaining": 0, "dryRun": false}),
        "idempotent"
    );
    assert_eq!(
        app.get_json("/api/messenger/messages?status=pending&withTotal=true")
            .await["total"],
        8
    );
    let metrics = app.open_text("/metrics").await;
    assert!(
        metrics.contains("herald_messages_requeued_total{way=\"bulk\"} 6"),
        "{metrics}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_bulk_requeue_refuses_filters_it_cannot_honour() {
    let app = spawn_app().await;
    let post = |body: Value| app.post("/api/messenger/messages/retry").json(&body).send();
    assert_error(post(json!({"filter": {"status": "sent"}})).await.unwrap(), 400, 400017).await;
    let now = Utc::now();
    let reversed = json!({"filter": {"status": "failed", "createdFrom": rfc3339(now), "createdTo": rfc3339(now - chrono::Duration::hours(1))}});
    assert_error(post(reversed).await.unwrap(), 400, 400017).await;
    assert_error(
        post(json!({"filter": {"status": "failed", "to": "12"}})).await.unwrap(),
        400,
        400017,
    )
    .await;
    assert_error(post(json!({"filter": {"status": "nope"}})).await.unwrap(), 400, 400001).await;
    assert_error(post(json!({"dryRun": true})).await.unwrap(), 400, 400001).await;
    app.cleanup().await;
}
