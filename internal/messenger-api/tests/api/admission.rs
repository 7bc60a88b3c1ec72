//! Admission control: with `messenger_api.max_due_backlog`, creates are refused with 429,
//! `Retry-After` and 429001 while the backlog would go over it; a batch is admitted whole or not
//! at all; what it refused shows in the stats and `/metrics`; room made by sending lets
//! creates in again. A key's create rate holds across replicas (429002); a key's live
//! subscriptions are capped (429003).

use std::time::Duration;

use futures::StreamExt;
use herald_core::auth::Scope;
use herald_core::settings::KeySettings;
use herald_core::testing::scopes::{add_scoped_keys, key_for, key_without};
use serde_json::{json, Value};
use test_support::TestEnv;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::helpers::{settings_for, spawn_app_with, spawn_with_settings, TestApp};

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
        json!({"maxDueBacklog": 5, "backlog": 5, "rejectedBacklog": 2, "rejectedKeyRate": 0}),
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
        json!({"maxDueBacklog": 0, "backlog": 50, "rejectedBacklog": 0, "rejectedKeyRate": 0})
    );
    app.cleanup().await;
}

async fn create_as(app: &TestApp, key: &str) -> reqwest::Response {
    app.client
        .post(app.url("/api/messenger/messages"))
        .bearer_auth(key)
        .json(&json!({"to": "+905551112233", "content": "rated"}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_keys_create_rate_holds_across_replicas() {
    let env = TestEnv::new().await.expect("test servers");
    let mut settings = settings_for(&env, &[]);
    settings.auth.keys.push(KeySettings {
        key: Some("rated-key".to_owned().into()),
        rate_per_second: 1.0,
        burst: 2,
        ..KeySettings::new("shop", vec![Scope::MessagesWrite])
    });
    settings.validate().unwrap();
    let mut app = spawn_with_settings(env, settings).await;
    let replica = app.replica().await;
    // The burst of two, one through each replica; the third is over the rate on either.
    assert_eq!(create_as(&app, "rated-key").await.status(), 201);
    assert_eq!(create_as(&replica, "rated-key").await.status(), 201);
    let over = create_as(&replica, "rated-key").await;
    assert_eq!(over.status(), 429);
    assert_eq!(over.headers()["retry-after"], "1");
    let body: Value = over.json().await.unwrap();
    assert_eq!(body["internalCode"], 429002, "{body}");
    assert!(body["message"].as_str().unwrap().contains("\"shop\""), "{body}");
    // Another key (the legacy one, no rate) is not held back.
    assert_eq!(create_as(&app, crate::helpers::KEY).await.status(), 201);
    // A second later the next slot is there.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(create_as(&app, "rated-key").await.status(), 201);
    let stats = replica.get_json("/api/messenger/stats").await;
    assert_eq!(stats["admission"]["rejectedKeyRate"], 1, "{stats}");
    let metrics = replica
        .client
        .get(replica.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("herald_admission_rejected_total{reason=\"key_rate\"} 1"),
        "{metrics}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_key_holds_at_most_its_live_subscriptions_sse_and_websocket_together() {
    let env = TestEnv::new().await.expect("test servers");
    let mut settings = settings_for(
        &env,
        &[
            ("HERALD__EVENTS__MAX_SUBSCRIBERS_PER_KEY", "2"),
            ("HERALD__EVENTS__SSE_HEARTBEAT_SECONDS", "1"),
        ],
    );
    add_scoped_keys(&mut settings);
    let app = spawn_with_settings(env, settings).await;
    let reader = key_for(Scope::MessagesRead);
    let sse = || {
        app.client
            .get(app.url("/api/messenger/events"))
            .bearer_auth(&reader)
            .send()
    };
    let first = sse().await.unwrap();
    assert_eq!(first.status(), 200);
    let mut request = app.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {reader}").parse().unwrap());
    let (_socket, _) = tokio_tungstenite::connect_async(request.clone()).await.unwrap();
    // The third, by SSE, by a WebSocket upgrade, or by a WebSocket's first frame: refused.
    let third = sse().await.unwrap();
    assert_eq!(third.status(), 429);
    assert_eq!(third.json::<Value>().await.unwrap()["internalCode"], 429003);
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("expected a 429, got {other:?}"),
    }
    let (mut framed, _) = tokio_tungstenite::connect_async(app.ws_url()).await.unwrap();
    futures::SinkExt::send(&mut framed, WsMessage::text(json!({"auth": reader}).to_string()))
        .await
        .unwrap();
    match framed.next().await {
        Some(Ok(WsMessage::Close(Some(frame)))) => assert!(frame.reason.contains("429003"), "{}", frame.reason),
        other => panic!("expected a policy close, got {other:?}"),
    }
    // Another key has its own places.
    let other = app
        .client
        .get(app.url("/api/messenger/events"))
        .bearer_auth(key_without(Scope::Worker))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200, "another key holding messages:read");
    // A subscription that ends gives its place back (the server notices at its next heartbeat).
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let again = sse().await.unwrap();
        if again.status() == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the place never came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.cleanup().await;
}
