//! The audit: every operator route of the Messenger API writes exactly one entry — who (the
//! key's name), what, from where, with what result, failures included — before it answers;
//! entries are listed newest first and reach the live feed as `audit.recorded`.

use std::time::Duration;

use futures::StreamExt;
use herald_core::auth::Scope;
use herald_core::testing::scopes::{add_scoped_keys, key_for};
use serde_json::{json, Value};
use test_support::TestEnv;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::helpers::{settings_for, spawn_with_settings, TestApp};

async fn audit(app: &TestApp) -> Vec<Value> {
    let page: Value = app
        .client
        .get(app.url("/api/messenger/audit?limit=100"))
        .bearer_auth(key_for(Scope::Operator))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    page["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn every_operator_route_writes_exactly_one_entry_failures_included() {
    let env = TestEnv::new().await.expect("test servers");
    let mut settings = settings_for(&env, &[("HERALD__JOB_SCHEDULER__URL", "http://127.0.0.1:9")]);
    add_scoped_keys(&mut settings);
    let app = spawn_with_settings(env, settings).await;
    let operator = key_for(Scope::Operator);
    let ids = app.seed(2).await;
    // Fail one for good, so a retry has something to re-queue.
    let claimed = app.claim("w", 2).await;
    let failing = claimed.iter().find(|c| c["id"] == ids[0].as_str()).unwrap();
    let failed = app
        .put(&format!("/api/messenger/fail/{}", ids[0]))
        .json(&json!({"claimToken": failing["claimToken"], "error": {"kind": "http_status", "status": 400, "detail": "bad number"}, "retryable": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 200);
    let post = |path: String, body: Option<Value>| {
        let mut request = app.client.post(app.url(&path)).bearer_auth(&operator);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send()
    };
    // Each operator route, once succeeding and once failing.
    let calls = [
        (format!("/api/messenger/messages/{}/retry", ids[0]), None, 202, None),
        (
            format!("/api/messenger/messages/{}/retry", ids[1]),
            None,
            409,
            Some(409003),
        ),
        (
            "/api/messenger/messages/retry".to_owned(),
            Some(json!({"filter": {"status": "failed"}, "dryRun": true})),
            200,
            None,
        ),
        (
            "/api/messenger/messages/retry".to_owned(),
            Some(json!({"filter": {"status": "sent"}})),
            400,
            Some(400017),
        ),
        (
            "/api/messenger/messenger-job-toggle?command=stop".to_owned(),
            None,
            502,
            Some(502001),
        ),
    ];
    for (path, body, status, _) in &calls {
        let answer = post(path.clone(), body.clone()).await.unwrap();
        assert_eq!(answer.status().as_u16(), *status, "{path}");
    }
    // Reads and a refused key write nothing.
    let refused = app
        .client
        .post(app.url(&format!("/api/messenger/messages/{}/retry", ids[0])))
        .bearer_auth(key_for(Scope::MessagesRead))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let entries = audit(&app).await;
    assert_eq!(entries.len(), calls.len(), "one entry per call: {entries:#?}");
    // Newest first, each as it was asked.
    let expected = [
        ("job.stop", "failed", Some(502001u64), None),
        ("messages.requeue", "failed", Some(400017), None),
        ("messages.requeue", "ok", None, Some(0)),
        ("message.retry", "failed", Some(409003), None),
        ("message.retry", "ok", None, Some(1)),
    ];
    for (entry, (action, result, code, count)) in entries.iter().zip(expected) {
        assert_eq!(entry["action"], action, "{entry}");
        assert_eq!(entry["result"], result, "{entry}");
        assert_eq!(entry["code"].as_u64(), code, "{entry}");
        if let Some(count) = count {
            assert_eq!(entry["count"], count, "{entry}");
        }
        assert_eq!(entry["key"], "operator", "{entry}");
        assert_eq!(entry["service"], "messenger-api");
        assert_eq!(entry["from"], "127.0.0.1");
        assert!(
            entry["correlationId"].as_str().is_some_and(|c| !c.is_empty()),
            "{entry}"
        );
    }
    // The dry run's entry holds its filter; the single retry its message.
    assert!(
        entries[2]["target"].as_str().unwrap().contains("\"dryRun\":true"),
        "{}",
        entries[2]
    );
    assert_eq!(entries[4]["target"], ids[0].as_str());
    // Pages walk by cursor like every list.
    let first: Value = app
        .client
        .get(app.url("/api/messenger/audit?limit=2"))
        .bearer_auth(&operator)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cursor = first["nextCursor"].as_str().unwrap();
    let next: Value = app
        .client
        .get(app.url(&format!("/api/messenger/audit?limit=2&after={cursor}")))
        .bearer_auth(&operator)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(next["items"][0]["id"], entries[2]["id"]);
    app.cleanup().await;
}

#[tokio::test]
async fn an_entry_reaches_the_live_feed_as_audit_recorded() {
    let env = TestEnv::new().await.expect("test servers");
    let mut settings = settings_for(&env, &[]);
    add_scoped_keys(&mut settings);
    let app = spawn_with_settings(env, settings).await;
    let mut request = app.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", key_for(Scope::MessagesRead)).parse().unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let retried = app
        .client
        .post(app.url("/api/messenger/messages/0123456789abcdef01234567/retry"))
        .bearer_auth(key_for(Scope::Operator))
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 404);
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(frame)) = socket.next().await {
            if let WsMessage::Text(text) = frame {
                let event: Value = serde_json::from_str(&text).unwrap();
                if event["type"] == "audit.recorded" {
                    return event;
                }
            }
        }
        panic!("the socket ended");
    })
    .await
    .expect("an audit.recorded event within 10 s");
    assert_eq!(event["audit"]["action"], "message.retry");
    assert_eq!(event["audit"]["result"], "failed");
    assert_eq!(event["audit"]["code"], 404001);
    assert_eq!(event["audit"]["key"], "operator");
    app.cleanup().await;
}
