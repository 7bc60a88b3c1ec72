use serde_json::{json, Value};

use crate::helpers::{assert_error, spawn_app, KEY};

#[tokio::test]
async fn creating_a_message_stores_it_pending_and_due_now() {
    let app = spawn_app().await;
    let created = app.create(" +905551111111 ", "  Hello there  ").await;
    assert_eq!(created["to"], "+905551111111");
    assert_eq!(created["content"], "Hello there");
    assert_eq!(created["status"], "pending");
    assert_eq!(created["attempts"], 0);
    let fetched = app.message(created["id"].as_str().unwrap()).await;
    assert_eq!(fetched["id"], created["id"]);
    app.cleanup().await;
}

#[tokio::test]
async fn invalid_messages_are_rejected_with_specific_codes_and_not_stored() {
    let app = spawn_app().await;
    let cases = [
        (json!({"to": "05551111111", "content": "x"}), 400003),
        (json!({"to": "+1234567", "content": "x"}), 400003),
        (json!({"to": "+905551111111", "content": "   "}), 400004),
        (json!({"to": "+905551111111", "content": "a".repeat(161)}), 400005),
        (json!({"to": "+905551111111"}), 400001),
        (json!({"to": ["+905551111111"], "content": "x"}), 400001),
    ];
    for (body, code) in cases {
        let response = app.post("/api/messenger/messages").json(&body).send().await.unwrap();
        assert_error(response, 400, code).await;
    }
    let malformed = app
        .post("/api/messenger/messages")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_error(malformed, 400, 400001).await;
    let page: Value = app.get_json("/api/messenger/messages?withTotal=true").await;
    assert_eq!(page["total"], 0);
    app.cleanup().await;
}

#[tokio::test]
async fn content_limits_count_unicode_characters_not_bytes() {
    let app = spawn_app().await;
    let turkish = "ğ".repeat(160);
    let created = app.create("+905551111111", &turkish).await;
    assert_eq!(created["content"], turkish);
    let response = app
        .post("/api/messenger/messages")
        .json(&json!({"to": "+905551111111", "content": "ğ".repeat(161)}))
        .send()
        .await
        .unwrap();
    assert_error(response, 400, 400005).await;
    app.cleanup().await;
}

#[tokio::test]
async fn an_idempotency_key_returns_the_original_for_the_same_body_and_409_for_another() {
    let app = spawn_app().await;
    let send = |body: Value| {
        app.post("/api/messenger/messages")
            .header("Idempotency-Key", "order-42")
            .json(&body)
            .send()
    };
    let first = send(json!({"to": "+905551111111", "content": "hi"})).await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let again = send(json!({"to": "+905551111111", "content": "hi"})).await.unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    let other = send(json!({"to": "+905551111111", "content": "bye"})).await.unwrap();
    assert_error(other, 409, 409001).await;
    let page: Value = app.get_json("/api/messenger/messages?withTotal=true").await;
    assert_eq!(page["total"], 1);
    app.cleanup().await;
}

#[tokio::test]
async fn concurrent_requests_with_one_idempotency_key_store_one_message() {
    let app = spawn_app().await;
    let requests = (0..8).map(|_| {
        app.post("/api/messenger/messages")
            .header("Idempotency-Key", "same")
            .json(&json!({"to": "+905551111111", "content": "hi"}))
            .send()
    });
    let responses = futures::future::join_all(requests).await;
    let mut ids = std::collections::HashSet::new();
    for response in responses {
        let response = response.unwrap();
        assert_eq!(response.status(), 201);
        ids.insert(
            response.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(ids.len(), 1);
    app.cleanup().await;
}

/// Creates that arrive together each succeed or fail on their own: a taken key refuses only its
/// own request, the rest are stored and counted.
#[tokio::test]
async fn concurrent_creates_each_get_their_own_answer() {
    let app = spawn_app().await;
    let taken = app
        .post("/api/messenger/messages")
        .header("Idempotency-Key", "taken")
        .json(&json!({"to": "+905551111111", "content": "first"}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let requests = (0..96).map(|i| {
        let request = app.post("/api/messenger/messages");
        let (request, content) = match i % 3 {
            // A fresh key each: stored.
            0 => (request.header("Idempotency-Key", format!("k-{i}")), "hi".to_owned()),
            // The taken key with another body: 409, nothing stored.
            1 => (request.header("Idempotency-Key", "taken"), format!("other {i}")),
            // No key: stored.
            _ => (request, format!("plain {i}")),
        };
        request
            .json(&json!({"to": format!("+9055520{i:05}"), "content": content}))
            .send()
    });
    let responses = futures::future::join_all(requests).await;
    let mut created = std::collections::HashSet::new();
    for (i, response) in responses.into_iter().enumerate() {
        let response = response.unwrap();
        if i % 3 == 1 {
            assert_error(response, 409, 409001).await;
        } else {
            assert_eq!(response.status(), 201, "request {i}");
            let body: Value = response.json().await.unwrap();
            assert!(
                created.insert(body["id"].as_str().unwrap().to_owned()),
                "an id answered twice"
            );
            let stored = app.message(body["id"].as_str().unwrap()).await;
            assert_eq!(stored["to"], format!("+9055520{i:05}"));
        }
    }
    assert_eq!(created.len(), 64);
    let page: Value = app.get_json("/api/messenger/messages?withTotal=true").await;
    assert_eq!(page["total"], 65, "64 new ones and the first");
    let stats = app.get_json("/api/messenger/stats").await;
    assert_eq!(stats["counts"]["pending"], 65, "{stats}");
    assert_eq!(app.message(taken["id"].as_str().unwrap()).await["content"], "first");
    app.cleanup().await;
}

#[tokio::test]
async fn a_batch_is_stored_whole_or_not_at_all() {
    let app = spawn_app().await;
    let bad = json!({"messages": [
        {"to": "+905551111111", "content": "ok"},
        {"to": "nope", "content": "ok"},
        {"to": "+905551111112", "content": ""},
    ]});
    let response = app
        .post("/api/messenger/messages/batch")
        .json(&bad)
        .send()
        .await
        .unwrap();
    let body = assert_error(response, 400, 400007).await;
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("messages[1]") && message.contains("messages[2]"),
        "{message}"
    );
    assert!(!message.contains("messages[0]"), "{message}");
    let page: Value = app.get_json("/api/messenger/messages?withTotal=true").await;
    assert_eq!(page["total"], 0);

    let ids = app.seed(1000).await;
    assert_eq!(ids.len(), 1000);
    let too_many: Vec<Value> = (0..1001)
        .map(|_| json!({"to": "+905551111111", "content": "x"}))
        .collect();
    let response = app
        .post("/api/messenger/messages/batch")
        .json(&json!({"messages": too_many}))
        .send()
        .await
        .unwrap();
    assert_error(response, 400, 400008).await;
    let empty = app
        .post("/api/messenger/messages/batch")
        .json(&json!({"messages": []}))
        .send()
        .await
        .unwrap();
    assert_error(empty, 400, 400008).await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_list_is_newest_first_filters_by_status_and_pages_by_offset() {
    let app = spawn_app().await;
    let ids = app.seed(25).await;
    let page: Value = app
        .get_json("/api/messenger/messages?limit=10&offset=5&withTotal=true")
        .await;
    assert_eq!(page["total"], 25);
    let uncounted: Value = app.get_json("/api/messenger/messages?limit=10&offset=5").await;
    assert!(uncounted["total"].is_null(), "counted only when asked: {uncounted}");
    assert_eq!(uncounted["items"], page["items"]);
    assert_eq!(page["limit"], 10);
    assert_eq!(page["offset"], 5);
    let got: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let newest_first: Vec<&str> = ids.iter().rev().skip(5).take(10).map(String::as_str).collect();
    assert_eq!(got, newest_first);
    assert!(page["nextCursor"].is_string());

    let sent: Value = app.get_json("/api/messenger/messages?status=sent&withTotal=true").await;
    assert_eq!(sent["total"], 0);
    let pending: Value = app.get_json("/api/messenger/messages?status=pending&limit=100").await;
    assert_eq!(pending["items"].as_array().unwrap().len(), 25);
    assert!(pending["nextCursor"].is_null());
    app.cleanup().await;
}

#[tokio::test]
async fn cursor_pagination_walks_a_large_collection_with_no_gap_and_no_repeat() {
    let app = spawn_app().await;
    let ids = app.seed(2500).await;
    let mut seen = Vec::new();
    let mut url = "/api/messenger/messages?limit=100".to_owned();
    loop {
        let page: Value = app.get_json(&url).await;
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned()),
        );
        match page["nextCursor"].as_str() {
            Some(cursor) => url = format!("/api/messenger/messages?limit=100&after={cursor}"),
            None => break,
        }
    }
    let expected: Vec<String> = ids.into_iter().rev().collect();
    assert_eq!(seen.len(), 2500);
    assert_eq!(seen, expected);
    app.cleanup().await;
}

#[tokio::test]
async fn bad_query_parameters_get_specific_codes() {
    let app = spawn_app().await;
    for (query, code) in [
        ("limit=0", 400009),
        ("limit=101", 400009),
        ("offset=-1", 400009),
        ("offset=1&after=0123456789abcdef01234567", 400009),
        ("after=zzz", 400009),
        ("status=lost", 400012),
        ("limit=ten", 400002),
    ] {
        let response = app
            .get(&format!("/api/messenger/messages?{query}"))
            .send()
            .await
            .unwrap();
        assert_error(response, 400, code).await;
    }
    app.cleanup().await;
}

#[tokio::test]
async fn getting_a_message_by_a_bad_or_unknown_id_is_400_or_404() {
    let app = spawn_app().await;
    assert_error(
        app.get("/api/messenger/messages/xyz").send().await.unwrap(),
        400,
        400006,
    )
    .await;
    assert_error(
        app.get("/api/messenger/messages/0123456789abcdef01234567")
            .send()
            .await
            .unwrap(),
        404,
        404001,
    )
    .await;
    app.cleanup().await;
}

#[tokio::test]
async fn every_api_route_requires_a_valid_bearer_key() {
    let app = spawn_app().await;
    let routes = [
        ("POST", "/api/messenger/messages"),
        ("POST", "/api/messenger/messages/batch"),
        ("GET", "/api/messenger/messages"),
        ("GET", "/api/messenger/messages/sent"),
        ("GET", "/api/messenger/messages/0123456789abcdef01234567"),
        ("POST", "/api/messenger/messages/0123456789abcdef01234567/retry"),
        ("POST", "/api/messenger/get-two"),
        ("PUT", "/api/messenger/commit/0123456789abcdef01234567"),
        ("PUT", "/api/messenger/fail/0123456789abcdef01234567"),
        ("PUT", "/api/messenger/release/0123456789abcdef01234567"),
        ("POST", "/api/messenger/messenger-job-toggle?command=start"),
    ];
    for (method, path) in routes {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let none = app.client.request(method.clone(), app.url(path)).send().await.unwrap();
        assert_error(none, 401, 401001).await;
        let wrong = app
            .client
            .request(method, app.url(path))
            .bearer_auth("wrong-key")
            .send()
            .await
            .unwrap();
        assert_error(wrong, 401, 401001).await;
    }
    for open in [
        "/messenger/health",
        "/messenger/ready",
        "/messenger/openapi.json",
        "/messenger/swagger",
        "/metrics",
    ] {
        let response = app.client.get(app.url(open)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{open}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn unknown_routes_wrong_methods_and_oversized_bodies_answer_json_errors() {
    let app = spawn_app().await;
    assert_error(
        app.get("/api/messenger/nothing-here").send().await.unwrap(),
        404,
        404002,
    )
    .await;
    assert_error(app.client.get(app.url("/nope")).send().await.unwrap(), 404, 404002).await;
    assert_error(
        app.client
            .delete(app.url("/api/messenger/messages"))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap(),
        405,
        405001,
    )
    .await;
    let huge = format!(
        r#"{{"to":"+905551111111","content":"{}"}}"#,
        "a".repeat(2 * 1024 * 1024)
    );
    let response = app
        .post("/api/messenger/messages")
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_error(response, 413, 413001).await;
    let text = app
        .post("/api/messenger/messages")
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert!(text.status() == 415 || text.status() == 400, "{}", text.status());
    let body: Value = text.json().await.unwrap();
    assert!(body["internalCode"].as_u64().is_some());
    app.cleanup().await;
}

#[tokio::test]
async fn every_response_carries_a_correlation_id() {
    let app = spawn_app().await;
    let echoed = app
        .get("/api/messenger/messages")
        .header("x-correlation-id", "trace-me")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-correlation-id"], "trace-me");
    let error = app.client.get(app.url("/api/messenger/messages")).send().await.unwrap();
    assert!(error.headers().contains_key("x-correlation-id"));
    app.cleanup().await;
}

#[tokio::test]
async fn the_sent_list_is_newest_sent_first_with_provider_ids() {
    let app = spawn_app().await;
    app.seed(5).await;
    let claimed = app.claim("w", 5).await;
    for (i, m) in claimed.iter().enumerate() {
        let response = app
            .put(&format!("/api/messenger/commit/{}", m["id"].as_str().unwrap()))
            .json(&json!({
                "claimToken": m["claimToken"],
                "webhookMessageId": format!("provider-{i}"),
                "sentAt": format!("2026-01-01T00:00:0{i}Z"),
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let page: Value = app
        .get_json("/api/messenger/messages/sent?limit=2&withTotal=true")
        .await;
    let provider_ids: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["webhookMessageId"].as_str().unwrap())
        .collect();
    assert_eq!(provider_ids, ["provider-4", "provider-3"]);
    let sent_at: chrono::DateTime<chrono::Utc> = page["items"][0]["sentAt"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        sent_at,
        "2026-01-01T00:00:04Z".parse::<chrono::DateTime<chrono::Utc>>().unwrap()
    );
    assert_eq!(page["total"], 5);
    let cursor = page["nextCursor"].as_str().unwrap();
    let next: Value = app
        .get_json(&format!("/api/messenger/messages/sent?limit=10&after={cursor}"))
        .await;
    let rest: Vec<&str> = next["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["webhookMessageId"].as_str().unwrap())
        .collect();
    assert_eq!(rest, ["provider-2", "provider-1", "provider-0"]);
    app.cleanup().await;
}

#[tokio::test]
async fn the_openapi_document_lists_every_operation_with_the_bearer_scheme() {
    let app = spawn_app().await;
    let doc: Value = app.open_json("/messenger/openapi.json").await;
    assert!(
        doc["components"]["securitySchemes"]["BearerAuth"].is_object(),
        "{}",
        doc["components"]
    );
    for path in [
        "/api/messenger/messages",
        "/api/messenger/messages/batch",
        "/api/messenger/messages/sent",
        "/api/messenger/messages/{id}",
        "/api/messenger/messages/{id}/retry",
        "/api/messenger/get-two",
        "/api/messenger/commit/{id}",
        "/api/messenger/fail/{id}",
        "/api/messenger/release/{id}",
        "/api/messenger/messenger-job-toggle",
        "/messenger/health",
        "/messenger/ready",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    let create = &doc["paths"]["/api/messenger/messages"]["post"];
    let statuses: Vec<&String> = create["responses"].as_object().unwrap().keys().collect();
    assert!(
        statuses.contains(&&"409".to_owned()) && !statuses.contains(&&"404".to_owned()),
        "{statuses:?}"
    );
    let swagger = app.open_text("/messenger/swagger").await;
    assert!(swagger.to_lowercase().contains("swagger"));
    app.cleanup().await;
}

#[tokio::test]
async fn the_committed_openapi_document_is_current() {
    let env = test_support::TestEnv::new().await.unwrap();
    let settings = crate::helpers::settings_for(&env, &[]);
    let generated = herald_messenger_api::openapi_json(&settings).await.unwrap();
    let committed =
        std::fs::read_to_string(herald_core::testing::configs_dir().join("../docs/openapi/messenger-api.json"))
            .unwrap();
    assert_eq!(
        committed,
        format!("{generated}\n"),
        "docs/openapi/messenger-api.json is stale: run `herald openapi --out-dir docs/openapi`"
    );
    env.cleanup().await.unwrap();
}
