//! Admission control: with `messenger_api.max_due_backlog`, creates are refused with 429,
//! `Retry-After` and 429001 while the backlog would go over it; a batch is admitted whole or not
//! at all; what it refused shows in the stats and `/metrics`; room made by sending lets
//! creates in again.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{spawn_app_with, TestApp};

async fn create(app: &TestApp, n: usize) -> reqwest::Response {
    let messages: Vec<Value> = (0..n)
        .map(|i| json!({"to": "+905551112233", "content": format!("campaign {i}")}))
        .collect();
    app.post("/api/messenger/messages/batch")
        .json(&json!({"messages": messages}))
        .send()
        .await
        .unwrap()
}

async fn refused(response: reqwest::Response) {
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["internalCode"], 429001, "{body}");
    assert!(body["message"].as_str().unwrap().contains("max_due_backlog"), "{body}");
}

#[tokio::test]
async fn creates_are_refused_whole_while_the_backlog_is_over_its_bound() {
    let app = spawn_app_with(&[("HERALD__MESSENGER_API__MAX_DUE_BACKLOG", "5")]).await;
    assert_eq!(create(&app, 4).await.status(), 201);
    // A batch that would go over is refused whole: nothing of it is stored.
    refused(create(&app, 2).await).await;
    let stats = app.get_json("/api/messenger/stats").await;
    assert_eq!(stats["counts"]["total"], 4);
    // One more fits; then a single create is refused too, an idempotent replay is not.
    let keyed = app
        .post("/api/messenger/messages")
        .header("Idempotency-Key", "the-fifth")
        .json(&json!({"to": "+905551112233", "content": "fifth"}))
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status(), 201);
    tokio::time::sleep(Duration::from_millis(300)).await; // past the shared read
    refused(
        app.post("/api/messenger/messages")
            .json(&json!({"to": "+905551112233", "content": "sixth"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let replay = app
        .post("/api/messenger/messages")
        .header("Idempotency-Key", "the-fifth")
        .json(&json!({"to": "+905551112233", "content": "fifth"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        replay.status(),
        201,
        "a replay stores nothing, so it is answered (the original)"
    );
    // Seen in the stats and /metrics.
    let stats = app.get_json("/api/messenger/stats").await;
    assert_eq!(
        stats["admission"],
        json!({"maxDueBacklog": 5, "backlog": 5, "rejected": 2}),
        "{stats}"
    );
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("herald_admission_rejected_total{reason=\"backlog\"} 2"),
        "{metrics}"
    );
    // Sending makes room: two committed, two more admitted.
    for claimed in app.claim("w", 2).await {
        let token = claimed["claimToken"].as_str().unwrap();
        assert_eq!(
            app.commit(claimed["id"].as_str().unwrap(), token, "p").await.status(),
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(create(&app, 2).await.status(), 201);
    refused(create(&app, 1).await).await;
    app.cleanup().await;
}

#[tokio::test]
async fn without_a_bound_nothing_is_refused_and_the_backlog_still_shows() {
    let app = spawn_app_with(&[]).await;
    assert_eq!(create(&app, 50).await.status(), 201);
    let stats = app.get_json("/api/messenger/stats").await;
    assert_eq!(
        stats["admission"],
        json!({"maxDueBacklog": 0, "backlog": 50, "rejected": 0})
    );
    app.cleanup().await;
}
