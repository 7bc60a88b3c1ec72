//! Scoped keys at the Messenger API: every operation declares and enforces its scope, the live
//! feed's WebSocket too, a key configured by its digest works, and the pages carry their
//! security headers.

use futures::{SinkExt, StreamExt};
use herald_core::auth::{digest_hex, Scope};
use herald_core::settings::KeySettings;
use herald_core::testing::scopes::{add_scoped_keys, check_every_operation, key_for, key_without};
use serde_json::{json, Value};
use test_support::TestEnv;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::helpers::{settings_for, spawn_with_settings, TestApp};

async fn scoped_app() -> TestApp {
    let env = TestEnv::new().await.expect("test servers");
    let mut settings = settings_for(&env, &[]);
    add_scoped_keys(&mut settings);
    spawn_with_settings(env, settings).await
}

#[tokio::test]
async fn every_operation_declares_its_scope_and_a_key_without_it_gets_403() {
    let app = scoped_app().await;
    let report = check_every_operation(&app.address, "/messenger/openapi.json").await;
    // The operations of SPEC §19's table, each with the scope it names.
    for expected in [
        "POST /api/messenger/messages messages:write",
        "POST /api/messenger/messages/batch messages:write",
        "GET /api/messenger/messages messages:read",
        "GET /api/messenger/messages/{id} messages:read",
        "GET /api/messenger/events messages:read",
        "POST /api/messenger/get-two worker",
        "PUT /api/messenger/commit/{id} worker",
        "POST /api/messenger/outcomes worker",
        "POST /api/messenger/extend worker",
        "POST /api/messenger/messenger-job-toggle operator",
        "POST /api/messenger/messages/{id}/retry operator",
        "GET /api/messenger/stats metrics",
    ] {
        assert!(
            report.checked.iter().any(|c| c == expected),
            "{expected} in {:#?}",
            report.checked
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn the_websocket_feed_needs_messages_read_on_the_upgrade_and_in_the_first_frame() {
    let app = scoped_app().await;
    let with_header = |key: String| {
        let mut request = app.ws_url().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        request
    };
    // On the upgrade: refused before any socket, with the code.
    match tokio_tungstenite::connect_async(with_header(key_without(Scope::MessagesRead))).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["internalCode"], 403001, "{body}");
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(with_header(key_for(Scope::MessagesRead)))
        .await
        .unwrap();
    assert_eq!(next_json(&mut socket).await["type"], "ready");
    // In the first frame (browsers): closed with the code in the reason.
    let (mut socket, _) = tokio_tungstenite::connect_async(app.ws_url()).await.unwrap();
    let auth = json!({"auth": key_for(Scope::Operator)}).to_string();
    socket.send(WsMessage::text(auth)).await.unwrap();
    match socket.next().await {
        Some(Ok(WsMessage::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1008);
            assert!(
                frame.reason.contains("403001") && frame.reason.contains("messages:read"),
                "{}",
                frame.reason
            );
        }
        other => panic!("expected a policy close, got {other:?}"),
    }
    app.cleanup().await;
}

async fn next_json(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
) -> Value {
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(WsMessage::Text(text)))) => return serde_json::from_str(&text).unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_key_configured_by_its_digest_creates_and_nothing_else() {
    let env = TestEnv::new().await.expect("test servers");
    let mut settings = settings_for(&env, &[]);
    let key = herald_core::auth::new_key();
    settings.auth.keys.push(KeySettings {
        sha256: Some(digest_hex(&key)),
        ..KeySettings::new("shop", vec![Scope::MessagesWrite])
    });
    let app = spawn_with_settings(env, settings).await;
    let created = app
        .client
        .post(app.url("/api/messenger/messages"))
        .bearer_auth(&key)
        .json(&json!({"to": "+905551112233", "content": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let listed = app
        .client
        .get(app.url("/api/messenger/messages"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 403);
    let body: Value = listed.json().await.unwrap();
    assert_eq!(body["internalCode"], 403001);
    assert!(body["message"].as_str().unwrap().contains("\"shop\""), "{body}");
    // The digest's own neighbour is not the key.
    let wrong = app
        .client
        .post(app.url("/api/messenger/messages"))
        .bearer_auth(format!("{key}x"))
        .json(&json!({"to": "+905551112233", "content": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    app.cleanup().await;
}

#[tokio::test]
async fn swagger_ui_and_every_answer_carry_security_headers() {
    let app = scoped_app().await;
    let page = app.client.get(app.url("/messenger/swagger/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let html = page.text().await.unwrap();
    assert!(
        html.contains("x-herald-scope") && !html.contains("\"WriteKey\""),
        "the page shows the scoped document"
    );
    for path in ["/api/messenger/stats", "/messenger/health", "/nowhere"] {
        let answer = app.client.get(app.url(path)).send().await.unwrap();
        for header in [
            "x-content-type-options",
            "x-frame-options",
            "referrer-policy",
            "content-security-policy",
        ] {
            assert!(answer.headers().contains_key(header), "{path} lacks {header}");
        }
    }
    app.cleanup().await;
}
