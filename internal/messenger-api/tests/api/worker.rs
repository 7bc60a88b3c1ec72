use serde_json::{json, Value};

use crate::helpers::{assert_error, spawn_app, spawn_app_with};

#[tokio::test]
async fn commit_marks_sent_then_caches_the_provider_id_and_time_in_redis() {
    let app = spawn_app().await;
    let ids = app.seed(1).await;
    let claimed = app.claim("w", 1).await;
    let token = claimed[0]["claimToken"].as_str().unwrap();
    let response = app
        .put(&format!("/api/messenger/commit/{}", ids[0]))
        .json(&json!({"claimToken": token, "webhookMessageId": "prov-1", "sentAt": "2026-11-21T10:00:00Z"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "sent");
    assert_eq!(body["webhookMessageId"], "prov-1");
    assert_eq!(body["cached"], true);

    let cached: Value =
        serde_json::from_str(&app.env.redis_get(&format!("sent:{}", ids[0])).await.unwrap().unwrap()).unwrap();
    assert_eq!(
        cached,
        json!({"messageId": "prov-1", "sentAt": "2026-11-21T10:00:00.000Z"})
    );
    let ttl = app.env.redis_ttl(&format!("sent:{}", ids[0])).await.unwrap();
    assert!((604_700..=604_800).contains(&ttl), "{ttl}");

    // The same commit again is answered the same way.
    let again = app.commit(&ids[0], token, "prov-1").await;
    assert_eq!(again.status(), 200);
    app.cleanup().await;
}

#[tokio::test]
async fn commit_needs_the_current_claim_and_a_known_id() {
    let app = spawn_app().await;
    let ids = app.seed(1).await;
    app.claim("w", 1).await;
    assert_error(app.commit(&ids[0], "not-the-token", "x").await, 409, 409002).await;
    assert_error(app.commit("0123456789abcdef01234567", "t", "x").await, 404, 404001).await;
    assert_error(app.commit("bad-id", "t", "x").await, 400, 400006).await;
    app.cleanup().await;
}

async fn fail(app: &crate::helpers::TestApp, id: &str, token: &str, body: Value) -> reqwest::Response {
    let mut body = body;
    body["claimToken"] = json!(token);
    app.put(&format!("/api/messenger/fail/{id}"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_retryable_failure_schedules_the_next_attempt_and_exhaustion_fails_it() {
    // Test schedule: [1, 2, 4] seconds, ±20 %.
    let app = spawn_app_with(&[("HERALD__DELIVERY__JITTER_PERCENT", "0")]).await;
    let ids = app.seed(1).await;
    let error = json!({"kind": "http_status", "status": 503, "detail": "busy"});
    for (attempt, delay) in [(1, 1u64), (2, 2), (3, 4)] {
        let claimed = loop {
            let c = app.claim("w", 1).await;
            if !c.is_empty() {
                break c;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        assert_eq!(claimed[0]["attempt"], attempt);
        let before = chrono::Utc::now();
        let response = fail(
            &app,
            &ids[0],
            claimed[0]["claimToken"].as_str().unwrap(),
            json!({"error": error, "retryable": true}),
        )
        .await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], "pending");
        assert_eq!(body["lastError"]["status"], 503);
        let next: chrono::DateTime<chrono::Utc> = body["nextAttemptAt"].as_str().unwrap().parse().unwrap();
        let wait = (next - before).num_milliseconds();
        assert!(
            (delay as i64 * 1000 - 200..=delay as i64 * 1000 + 1500).contains(&wait),
            "attempt {attempt}: {wait} ms"
        );
        assert!(app.claim("w", 1).await.is_empty(), "not due before its time");
    }
    tokio::time::sleep(std::time::Duration::from_millis(4200)).await;
    let last = app.claim("w", 1).await;
    assert_eq!(last[0]["attempt"], 4);
    let response = fail(
        &app,
        &ids[0],
        last[0]["claimToken"].as_str().unwrap(),
        json!({"error": error, "retryable": true}),
    )
    .await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "failed");
    assert!(body["lastError"]["detail"]
        .as_str()
        .unwrap()
        .contains("retries exhausted"));
    app.cleanup().await;
}

#[tokio::test]
async fn retry_after_delays_the_next_attempt_and_permanent_failures_fail_at_once() {
    let app = spawn_app().await;
    let ids = app.seed(2).await;
    let claimed = app.claim("w", 2).await;
    let limited = fail(
        &app,
        &ids[0],
        claimed[0]["claimToken"].as_str().unwrap(),
        json!({"error": {"kind": "http_status", "status": 429, "detail": "slow down"}, "retryable": true, "retryAfterSeconds": 120}),
    )
    .await;
    let body: Value = limited.json().await.unwrap();
    let next: chrono::DateTime<chrono::Utc> = body["nextAttemptAt"].as_str().unwrap().parse().unwrap();
    assert!((next - chrono::Utc::now()).num_seconds() >= 118);

    let permanent = fail(
        &app,
        &ids[1],
        claimed[1]["claimToken"].as_str().unwrap(),
        json!({"error": {"kind": "http_status", "status": 400, "detail": "bad number"}, "retryable": false}),
    )
    .await;
    let body: Value = permanent.json().await.unwrap();
    assert_eq!(body["status"], "failed");
    assert_eq!(
        body["lastError"],
        json!({"kind": "http_status", "status": 400, "detail": "bad number", "at": body["lastError"]["at"]})
    );
    app.cleanup().await;
}

#[tokio::test]
async fn an_operator_can_requeue_only_failed_messages() {
    let app = spawn_app().await;
    let ids = app.seed(2).await;
    let claimed = app.claim("w", 1).await;
    fail(
        &app,
        &ids[0],
        claimed[0]["claimToken"].as_str().unwrap(),
        json!({"error": {"kind": "http_status", "status": 400, "detail": "x"}, "retryable": false}),
    )
    .await;
    let retried = app
        .post(&format!("/api/messenger/messages/{}/retry", ids[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 202);
    let body: Value = retried.json().await.unwrap();
    assert_eq!(body["status"], "pending");
    assert_eq!(body["attempts"], 0);
    let not_failed = app
        .post(&format!("/api/messenger/messages/{}/retry", ids[1]))
        .send()
        .await
        .unwrap();
    assert_error(not_failed, 409, 409003).await;
    let unknown = app
        .post("/api/messenger/messages/0123456789abcdef01234567/retry")
        .send()
        .await
        .unwrap();
    assert_error(unknown, 404, 404001).await;
    app.cleanup().await;
}

#[tokio::test]
async fn release_gives_an_unsent_claim_back_without_counting_the_attempt() {
    let app = spawn_app().await;
    let ids = app.seed(1).await;
    let claimed = app.claim("w", 1).await;
    let token = claimed[0]["claimToken"].as_str().unwrap();
    let response = app
        .put(&format!("/api/messenger/release/{}", ids[0]))
        .json(&json!({"claimToken": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let again = app.claim("other", 1).await;
    assert_eq!(again[0]["attempt"], 1);
    let stale = app
        .put(&format!("/api/messenger/release/{}", ids[0]))
        .json(&json!({"claimToken": token}))
        .send()
        .await
        .unwrap();
    assert_error(stale, 409, 409002).await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_toggle_forwards_to_the_job_scheduler_and_maps_its_answers() {
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let scheduler = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/job-scheduler/messenger/stop"))
        .and(header("authorization", "Bearer test-api-key"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "working": false, "changedAt": "2026-11-21T10:00:00Z", "changedBy": "w1", "lastRunAt": null, "nextRunAt": null
        })))
        .mount(&scheduler)
        .await;
    Mock::given(method("POST"))
        .and(path("/job-scheduler/messenger/start"))
        .respond_with(ResponseTemplate::new(409).set_body_json(json!({
            "status": 409, "internalCode": 409004, "message": "The sending job is already working."
        })))
        .mount(&scheduler)
        .await;
    let app = spawn_app_with(&[("HERALD__JOB_SCHEDULER__URL", &scheduler.uri())]).await;
    let stopped = app
        .post("/api/messenger/messenger-job-toggle?command=stop")
        .send()
        .await
        .unwrap();
    assert_eq!(stopped.status(), 200);
    let body: Value = stopped.json().await.unwrap();
    assert_eq!(body["working"], false);
    let conflict = app
        .post("/api/messenger/messenger-job-toggle?command=start")
        .send()
        .await
        .unwrap();
    assert_error(conflict, 409, 409004).await;
    let bad = app
        .post("/api/messenger/messenger-job-toggle?command=pause")
        .send()
        .await
        .unwrap();
    assert_error(bad, 400, 400010).await;
    let missing = app.post("/api/messenger/messenger-job-toggle").send().await.unwrap();
    assert_error(missing, 400, 400002).await;
    app.cleanup().await;

    let unreachable = spawn_app_with(&[("HERALD__JOB_SCHEDULER__URL", "http://127.0.0.1:9")]).await;
    let response = unreachable
        .post("/api/messenger/messenger-job-toggle?command=start")
        .send()
        .await
        .unwrap();
    assert_error(response, 502, 502001).await;
    unreachable.cleanup().await;
}

#[tokio::test]
async fn a_batch_of_outcomes_is_applied_with_a_result_for_each_and_a_replay_answers_the_same() {
    let app = spawn_app().await;
    app.seed(5).await;
    let claimed = app.claim("w", 5).await;
    let id = |i: usize| {
        (
            claimed[i]["id"].as_str().unwrap(),
            claimed[i]["claimToken"].as_str().unwrap(),
        )
    };
    let error = |status: u16| json!({"kind": "http_status", "status": status, "detail": "no"});
    let batch = json!({"items": [
        {"outcome": "sent", "id": id(0).0, "claimToken": id(0).1, "webhookMessageId": "prov-0"},
        {"outcome": "failed", "id": id(1).0, "claimToken": id(1).1, "error": error(503), "retryable": true, "retryAfterSeconds": 60},
        {"outcome": "failed", "id": id(2).0, "claimToken": id(2).1, "error": error(400), "retryable": false},
        {"outcome": "released", "id": id(3).0, "claimToken": id(3).1},
        {"outcome": "sent", "id": id(4).0, "claimToken": "not-the-token"},
        {"outcome": "sent", "id": "0123456789abcdef01234567", "claimToken": "t"},
        {"outcome": "sent", "id": "bad", "claimToken": "t"},
    ]});
    let results: Value = app.http.post_json(&app.url("/api/messenger/outcomes"), &batch).await;
    let got: Vec<(&str, &str)> = results["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["result"].as_str().unwrap(), r["status"].as_str().unwrap_or("-")))
        .collect();
    let expected = vec![
        ("committed", "sent"),
        ("retry_scheduled", "pending"),
        ("failed", "failed"),
        ("released", "pending"),
        ("claim_lost", "processing"),
        ("not_found", "-"),
        ("invalid_id", "-"),
    ];
    assert_eq!(got, expected, "{results}");
    assert_eq!(results["cached"], true);

    // What the store now holds, message by message.
    let sent = app.message(id(0).0).await;
    assert_eq!(
        (sent["status"].as_str(), sent["webhookMessageId"].as_str()),
        (Some("sent"), Some("prov-0"))
    );
    let cached: Value =
        serde_json::from_str(&app.env.redis_get(&format!("sent:{}", id(0).0)).await.unwrap().unwrap()).unwrap();
    assert_eq!(cached["messageId"], "prov-0");
    let retried = app.message(id(1).0).await;
    assert_eq!(retried["lastError"]["status"], 503);
    let due = chrono::DateTime::parse_from_rfc3339(retried["nextAttemptAt"].as_str().unwrap()).unwrap();
    assert!(
        due > chrono::Utc::now() + chrono::Duration::seconds(55),
        "Retry-After is a floor: {due}"
    );
    assert_eq!(app.message(id(2).0).await["lastError"]["kind"], "http_status");
    let released = app.message(id(3).0).await;
    assert_eq!(
        (released["status"].as_str(), released["attempts"].as_i64()),
        (Some("pending"), Some(0))
    );
    assert_eq!(app.message(id(4).0).await["status"], "processing");

    // The same report again changes nothing and answers what the first one did.
    let replay: Value = app.http.post_json(&app.url("/api/messenger/outcomes"), &batch).await;
    let again: Vec<&str> = replay["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(
        again,
        vec![
            "already_committed",
            "retry_scheduled",
            "failed",
            "released",
            "claim_lost",
            "not_found",
            "invalid_id"
        ]
    );
    let stats = app.get_json("/api/messenger/stats").await;
    assert_eq!(stats["sentLastHour"], 1, "a replayed commit is counted once: {stats}");
    app.cleanup().await;
}

#[tokio::test]
async fn commits_reported_together_each_keep_their_own_values_under_their_own_claim() {
    // More commits than one statement takes, under two claims, from two providers, with and
    // without a provider id: the grouped statements must still give each its own values.
    let app = spawn_app().await;
    app.seed(75).await;
    let mut claimed = app.claim("a", 40).await;
    claimed.extend(app.claim("b", 35).await);
    assert_eq!(claimed.len(), 75);
    let base = chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z").unwrap();
    let mid = |i: usize| match i {
        1 => Some("$notAFieldPath".to_owned()),
        _ if i.is_multiple_of(5) => None,
        _ => Some(format!("prov-{i}")),
    };
    let provider = |i: usize| if i.is_multiple_of(2) { "primary" } else { "secondary" };
    let attempts = |i: usize| -> Vec<Value> {
        // Message 2 reports more attempts than the log keeps.
        let n = if i == 2 { 12 } else { 1 };
        (0..n)
            .map(|k| json!({"at": base.to_rfc3339(), "provider": provider(i), "kind": "accepted", "status": 202, "latencyMs": i * 100 + k}))
            .collect()
    };
    let items: Vec<Value> = claimed
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let token = if i == 3 {
                "not-the-token"
            } else {
                m["claimToken"].as_str().unwrap()
            };
            json!({"outcome": "sent", "id": m["id"], "claimToken": token, "webhookMessageId": mid(i),
                "sentAt": (base + chrono::Duration::seconds(i as i64)).to_rfc3339(),
                "provider": provider(i), "attempts": attempts(i)})
        })
        .collect();
    let results: Value = app
        .http
        .post_json(&app.url("/api/messenger/outcomes"), &json!({"items": items}))
        .await;
    let got: Vec<&str> = results["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    let mut expected = vec!["committed"; 75];
    expected[3] = "claim_lost";
    assert_eq!(got, expected, "{results}");

    let raw = app.env.db().collection::<bson::Document>("messages");
    for (i, m) in claimed.iter().enumerate() {
        let id = m["id"].as_str().unwrap();
        let view = app.message(id).await;
        if i == 3 {
            assert_eq!(
                view["status"], "processing",
                "a commit under another claim changes nothing"
            );
            continue;
        }
        assert_eq!(view["status"], "sent", "{view}");
        assert_eq!(
            view["webhookMessageId"].as_str(),
            mid(i).as_deref(),
            "message {i}: {view}"
        );
        assert_eq!(view["provider"], provider(i), "message {i}");
        let sent_at = chrono::DateTime::parse_from_rfc3339(view["sentAt"].as_str().unwrap()).unwrap();
        assert_eq!(sent_at, base + chrono::Duration::seconds(i as i64), "message {i}");
        let latencies: Vec<u64> = view["attemptsLog"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["latencyMs"].as_u64().unwrap())
            .collect();
        let wanted: Vec<u64> = match i {
            2 => (202..212).collect(), // the last ten of twelve
            _ => vec![i as u64 * 100],
        };
        assert_eq!(latencies, wanted, "message {i}");
        // Nothing of the statement's own machinery is left on the document.
        let oid = bson::oid::ObjectId::parse_str(id).unwrap();
        let doc = raw.find_one(bson::doc! {"_id": oid}).await.unwrap().unwrap();
        assert!(!doc.contains_key("_o") && !doc.contains_key("lease_until"), "{doc}");
    }
    let stats = app.get_json("/api/messenger/stats").await;
    assert_eq!(
        (stats["counts"]["sent"].as_u64(), stats["counts"]["processing"].as_u64()),
        (Some(74), Some(1)),
        "{stats}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn an_outcome_report_must_be_one_to_a_thousand_distinct_messages() {
    let app = spawn_app().await;
    let outcomes = |items: Value| {
        app.post("/api/messenger/outcomes")
            .json(&json!({"items": items}))
            .send()
    };
    assert_error(outcomes(json!([])).await.unwrap(), 400, 400014).await;
    let twice = json!({"outcome": "released", "id": "0123456789abcdef01234567", "claimToken": "t"});
    assert_error(outcomes(json!([twice, twice])).await.unwrap(), 400, 400014).await;
    let unknown = json!([{"outcome": "teleported", "id": "0123456789abcdef01234567", "claimToken": "t"}]);
    assert_error(outcomes(unknown).await.unwrap(), 400, 400001).await;
    app.cleanup().await;
}
