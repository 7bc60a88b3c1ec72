use std::time::Duration;

use serde_json::{json, Value};
use test_support::eventually;
use test_support::lossy_proxy::{address_of, LossyProxy};

use crate::helpers::{assert_error, spawn_app, spawn_app_with, TestApp};

#[tokio::test]
async fn readiness_reports_mongodb_and_redis_up() {
    let app = spawn_app().await;
    let response = app.client.get(app.url("/messenger/ready")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["mongodb"]["status"], "up");
    assert_eq!(body["checks"]["redis"]["status"], "up");
    let health: Value = app.open_json("/messenger/health").await;
    assert_eq!(health["status"], "ok");
    app.cleanup().await;
}

#[tokio::test]
async fn with_redis_unreachable_commits_still_mark_sent_and_readiness_is_degraded() {
    let app = spawn_app_with(&[
        ("HERALD__REDIS__URL", "redis://127.0.0.1:1"),
        ("HERALD__REDIS__TIMEOUT_MS", "200"),
    ])
    .await;
    let ids = app.seed(1).await;
    let claimed = app.claim("w", 1).await;
    let response = app
        .commit(&ids[0], claimed[0]["claimToken"].as_str().unwrap(), "prov")
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "sent");
    assert_eq!(body["cached"], false);
    assert_eq!(app.message(&ids[0]).await["status"], "sent");

    let ready = app.client.get(app.url("/messenger/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "degraded");
    assert_eq!(ready["checks"]["redis"]["status"], "down");

    let metrics = app.open_text("/metrics").await;
    assert!(
        metrics.contains("herald_redis_cache_write_failures_total 1"),
        "{metrics}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn with_mongodb_unreachable_the_api_answers_503_json_quickly() {
    let app = spawn_app_with(&[
        ("HERALD__MONGO__URI", "mongodb://127.0.0.1:1/?directConnection=true"),
        ("HERALD__MONGO__SERVER_SELECTION_TIMEOUT_MS", "300"),
    ])
    .await;
    let started = std::time::Instant::now();
    let create = app
        .post("/api/messenger/messages")
        .json(&json!({"to": "+905551111111", "content": "x"}))
        .send()
        .await
        .unwrap();
    assert_error(create, 503, 503001).await;
    assert_error(app.claim_raw().await, 503, 503001).await;
    assert_error(app.get("/api/messenger/messages").send().await.unwrap(), 503, 503001).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let ready = app.client.get(app.url("/messenger/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["checks"]["mongodb"]["status"], "down");
    assert_eq!(ready["status"], "unavailable");
    let health = app.client.get(app.url("/messenger/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    app.cleanup().await;
}

#[tokio::test]
async fn metrics_count_messages_by_status_and_requests_by_route() {
    let app = spawn_app().await;
    app.seed(3).await;
    let claimed = app.claim("w", 1).await;
    app.commit(
        claimed[0]["id"].as_str().unwrap(),
        claimed[0]["claimToken"].as_str().unwrap(),
        "p",
    )
    .await;
    let metrics = app.open_text("/metrics").await;
    assert!(metrics.contains("herald_messages{status=\"pending\"} 2"), "{metrics}");
    assert!(metrics.contains("herald_messages{status=\"sent\"} 1"), "{metrics}");
    assert!(metrics.contains("herald_messages_claimed_total 1"), "{metrics}");
    assert!(
        metrics.contains("herald_commits_total{result=\"committed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("herald_oldest_pending_age_seconds"), "{metrics}");
    assert!(metrics.contains("route=\"/api/messenger/commit/{id}\""), "{metrics}");
    // Junk paths, bad ids and unknown sub-paths add no label of their own.
    for junk in [
        "/junk/1",
        "/junk/2",
        "/api/messenger/messages/not-an-id",
        "/api/messenger/messages/0123456789abcdef01234567/nothing",
    ] {
        let _ = app
            .client
            .get(app.url(junk))
            .bearer_auth(crate::helpers::KEY)
            .send()
            .await
            .unwrap();
    }
    let metrics = app.open_text("/metrics").await;
    let routes: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("herald_http_requests_total{"))
        .filter_map(|l| l.split("route=\"").nth(1)?.split('"').next())
        .collect();
    assert!(
        routes.iter().all(|r| !r.contains("junk") && !r.contains("not-an-id")),
        "{routes:?}"
    );
    assert!(routes.contains("unmatched"), "{routes:?}");
    assert!(routes.contains("/api/messenger/messages/{id}"), "{routes:?}");
    app.cleanup().await;
}

/// What the schemathesis run (`build/fuzz.sh`) found, kept as plain assertions: absent values are
/// documented as nullable, a body without `Content-Type: application/json` is a documented 415,
/// and a 405 says in `Allow` which methods the path takes.
#[tokio::test]
async fn fuzzing_findings_stay_fixed() {
    let app = spawn_app().await;
    let spec = app.open_json("/messenger/openapi.json").await;
    let schemas = &spec["components"]["schemas"];
    for (schema, field) in [
        ("Page_MessageView", "nextCursor"),
        ("Page_MessageView", "total"),
        ("RunView", "error"),
        ("RunView", "skippedReason"),
        ("JobStatus", "nextRunAt"),
        ("ProviderStatus", "pausedUntil"),
        ("MessageView", "sentAt"),
    ] {
        let property = &schemas[schema]["properties"][field];
        assert_eq!(property["nullable"], true, "{schema}.{field}: {property}");
    }
    let page = app.get_json("/api/messenger/messages").await;
    assert!(page["nextCursor"].is_null(), "{page}");

    let untyped = app.post("/api/messenger/get-two").body("{}").send().await.unwrap();
    assert_error(untyped, 415, 415_001).await;
    for (path, method) in [
        ("/api/messenger/get-two", "post"),
        ("/api/messenger/messages", "post"),
        ("/api/messenger/outcomes", "post"),
        ("/api/messenger/commit/{id}", "put"),
    ] {
        let responses = &spec["paths"][path][method]["responses"];
        assert!(responses.get("415").is_some(), "{method} {path} does not document 415");
    }

    let delete = app
        .client
        .request(
            reqwest::Method::DELETE,
            app.url("/api/messenger/messages/0123456789abcdef01234567"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 405);
    assert_eq!(delete.headers()["allow"], "GET");
    let put = app
        .client
        .request(reqwest::Method::PUT, app.url("/api/messenger/messages"))
        .send()
        .await
        .unwrap();
    assert_eq!(put.headers()["allow"], "GET, POST");
    assert_error(put, 405, 405_001).await;
    app.cleanup().await;
}

/// Redis killed while messages are committed, one alone and two in a batch of outcomes: the
/// commits still mark them sent. Once Redis is back, the repair writes each missing
/// `sent:<id>` entry with the time it has left to live, leaves the entry written before the
/// outage alone, and counts what it wrote.
#[tokio::test]
async fn cache_entries_missed_while_redis_was_down_are_written_once_it_is_back() {
    let mut redis = test_support::PrivateRedis::start().await;
    let app = spawn_app_with(&[
        ("HERALD__REDIS__URL", redis.url.as_str()),
        ("HERALD__REDIS__TIMEOUT_MS", "200"),
        ("HERALD__REDIS__SENT_TTL_SECONDS", "3600"),
    ])
    .await;
    let prefix = app.settings.redis.key_prefix.clone();
    let ids = app.seed(4).await;
    let claimed = app.claim("w", 4).await;
    let token = |id: &str| {
        claimed.iter().find(|m| m["id"] == id).unwrap()["claimToken"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let before = app.commit(&ids[0], &token(&ids[0]), "prov-0").await;
    assert_eq!(before.json::<Value>().await.unwrap()["cached"], true);
    let written_before = redis.get(&format!("{prefix}sent:{}", ids[0])).await.unwrap();

    redis.kill();
    let alone = app.commit(&ids[1], &token(&ids[1]), "prov-1").await;
    assert_eq!(alone.json::<Value>().await.unwrap()["cached"], false);
    let batch = json!({"items": [
        {"outcome": "sent", "id": ids[2], "claimToken": token(&ids[2]), "webhookMessageId": "prov-2"},
        {"outcome": "sent", "id": ids[3], "claimToken": token(&ids[3])},
    ]});
    let results: Value = app.http.post_json(&app.url("/api/messenger/outcomes"), &batch).await;
    assert_eq!(results["cached"], false, "{results}");
    for id in &ids {
        assert_eq!(app.message(id).await["status"], "sent");
    }
    let metrics = app.open_text("/metrics").await;
    assert!(metrics.contains("herald_redis_cache_repair_pending 1"), "{metrics}");

    redis.restart().await;
    eventually(
        Duration::from_secs(20),
        "the repair wrote the three missing entries",
        || async {
            let mut all = true;
            for id in &ids[1..] {
                all &= redis.get(&format!("{prefix}sent:{id}")).await.is_some();
            }
            all
        },
    )
    .await;
    for (id, provider_id) in [
        (&ids[1], Value::from("prov-1")),
        (&ids[2], "prov-2".into()),
        (&ids[3], Value::Null),
    ] {
        let key = format!("{prefix}sent:{id}");
        let entry: Value = serde_json::from_str(&redis.get(&key).await.unwrap()).unwrap();
        assert_eq!(entry["messageId"], provider_id, "{key}");
        let at = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
        assert_eq!(at(&entry["sentAt"]), at(&app.message(id).await["sentAt"]), "{key}");
        let ttl = redis.ttl(&key).await;
        assert!((3500..=3600).contains(&ttl), "{key} ttl {ttl}");
    }
    assert_eq!(
        redis.get(&format!("{prefix}sent:{}", ids[0])).await.unwrap(),
        written_before
    );
    eventually(Duration::from_secs(10), "the repair is no longer pending", || async {
        app.open_text("/metrics")
            .await
            .contains("herald_redis_cache_repair_pending 0")
    })
    .await;
    let metrics = app.open_text("/metrics").await;
    assert!(metrics.contains("herald_redis_cache_repaired_total 3"), "{metrics}");
    assert!(
        metrics.contains("herald_redis_cache_write_failures_total 3"),
        "{metrics}"
    );
    app.cleanup().await;
}

/// A loopback proxy in front of the test database that can lose its answers.
async fn lossy_proxy() -> LossyProxy {
    LossyProxy::start(&address_of(&test_support::mongo_uri()).await).await
}

async fn stats(app: &TestApp) -> Value {
    app.get_json("/api/messenger/stats").await
}

/// Seeds and claims `n` messages, waits until the counts are exact with them processing, and
/// answers a report committing every one.
async fn claimed_and_counted(app: &TestApp, n: u32) -> Value {
    app.seed(n as usize).await;
    let claimed = app.claim("w", n).await;
    eventually(Duration::from_secs(20), "the counts are exact", || async {
        let s = stats(app).await;
        s["countsExact"] == true && s["counts"]["processing"] == n
    })
    .await;
    let items: Vec<Value> = claimed
        .iter()
        .map(|m| json!({"outcome": "sent", "id": m["id"], "claimToken": m["claimToken"], "webhookMessageId": format!("prov-{}", m["id"].as_str().unwrap())}))
        .collect();
    json!({"items": items})
}

/// Posts `report` to `app` while `proxy` loses the answer to its `update`: the database
/// applies it, the caller hears 503 503001.
async fn report_losing_the_answer(proxy: &LossyProxy, app: &TestApp, report: &Value) {
    proxy.lose_answers_to(Some("update"));
    let lost = app
        .http
        .post(&app.url("/api/messenger/outcomes"))
        .json(report)
        .send()
        .await
        .unwrap();
    proxy.lose_answers_to(None);
    assert_error(lost, 503, 503_001).await;
}

/// Reports `report` again; every commit in it answers `already_committed`.
async fn report_again(app: &TestApp, report: &Value) {
    let again: Value = app.http.post_json(&app.url("/api/messenger/outcomes"), report).await;
    for result in again["items"].as_array().unwrap() {
        assert_eq!(result["result"], "already_committed", "{again}");
    }
}

/// Waits until the counts are exact with `sent` sent and none processing.
async fn counts_corrected(app: &TestApp, sent: u32) {
    eventually(Duration::from_secs(30), "the counts are corrected", || async {
        let s = stats(app).await;
        s["countsExact"] == true && s["counts"]["sent"] == sent && s["counts"]["processing"] == 0
    })
    .await;
}

/// A report of commits the database applied but never answered (its connection dropped as
/// the answer came, as when the server is killed between writing and answering): the worker
/// hears 503 and the messages are sent, but their counts never moved. The stats say at once
/// that the counts are not known exact, a reconciliation corrects them as soon as the upkeep
/// may run one (not a period later), and the worker's repeated report answers
/// `alreadyCommitted` and counts nothing twice.
#[tokio::test]
async fn counts_are_corrected_soon_after_a_write_whose_answer_was_lost() {
    let proxy = lossy_proxy().await;
    let uri = proxy.uri();
    let app = spawn_app_with(&[
        ("HERALD__MONGO__URI", uri.as_str()),
        ("HERALD__MONGO__SERVER_SELECTION_TIMEOUT_MS", "1000"),
    ])
    .await;
    let report = claimed_and_counted(&app, 3).await;

    report_losing_the_answer(&proxy, &app, &report).await;
    assert_eq!(proxy.lost(), 1, "the answer to the commits' one update was lost");
    let doubted = stats(&app).await;
    assert_eq!(doubted["countsExact"], false, "{doubted}");
    assert_eq!(doubted["counts"]["processing"], 3, "{doubted}");
    for item in report["items"].as_array().unwrap() {
        let id = item["id"].as_str().unwrap();
        assert_eq!(app.message(id).await["status"], "sent", "the database applied it");
    }

    counts_corrected(&app, 3).await;
    let drift = "herald_message_counts_drift_total{status=\"sent\"} 3";
    let metrics = app.open_text("/metrics").await;
    assert!(metrics.contains(drift), "{metrics}");
    assert!(metrics.contains("herald_message_counts_doubts_total 1"), "{metrics}");

    report_again(&app, &report).await;
    // A repeat is a doubt of its own (next test); it finds nothing more to correct.
    counts_corrected(&app, 3).await;
    let metrics = app.open_text("/metrics").await;
    assert!(metrics.contains(drift), "{metrics}");
    app.cleanup().await;
}

/// The replica that applied a report is gone before its count was written (here its answer
/// was lost and it stopped at once; in the chaos campaign it was SIGKILLed behind a balancer
/// between the two writes). The worker reports again through another replica, which knew
/// nothing of it: the repeat says the first report's fate was never heard, so this replica
/// serves its counts as not known exact and corrects them soon, not a period later.
#[tokio::test]
async fn a_report_repeated_through_another_replica_has_that_one_correct_the_counts_soon() {
    let proxy = lossy_proxy().await;
    let app = spawn_app().await;
    let report = claimed_and_counted(&app, 2).await;

    let writer = app.replica_through(&proxy.uri()).await;
    report_losing_the_answer(&proxy, &writer, &report).await;
    writer.cleanup().await;
    let unaware = stats(&app).await;
    assert_eq!(unaware["countsExact"], true, "{unaware}");
    assert_eq!(
        unaware["counts"]["processing"], 2,
        "this replica saw nothing: {unaware}"
    );

    report_again(&app, &report).await;
    let doubted = stats(&app).await;
    assert_eq!(doubted["countsExact"], false, "{doubted}");
    counts_corrected(&app, 2).await;
    app.cleanup().await;
}

/// Clients that connect and send nothing, or stop halfway through a request head, are cut at
/// `messenger_api.idle_timeout_seconds` (real sockets); meanwhile others are answered, and a
/// live feed, quiet on the client's side, stays open on its heartbeats.
#[tokio::test]
async fn slow_clients_are_cut_at_the_idle_timeout_and_others_are_served_meanwhile() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The least the test environment allows: above the toggle's wait (27 s) and the feed's
    // heartbeat (15 s) and ping (10 s here).
    let idle = Duration::from_secs(28);
    let app = spawn_app_with(&[
        ("HERALD__MESSENGER_API__IDLE_TIMEOUT_SECONDS", "28"),
        ("HERALD__EVENTS__WS_PING_SECONDS", "10"),
    ])
    .await;
    let addr = app.address.trim_start_matches("http://").to_owned();
    let opened = std::time::Instant::now();
    let mut slow = Vec::new();
    for i in 0..20 {
        let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
        if i % 2 == 0 {
            socket
                .write_all(b"GET /messenger/health HTTP/1.1\r\nHost: herald\r\nX-Slow: ")
                .await
                .unwrap();
        }
        slow.push(socket);
    }
    let mut feed = app
        .client
        .get(app.url("/api/messenger/events"))
        .bearer_auth(herald_core::testing::TEST_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(feed.status(), 200);
    for _ in 0..5 {
        let response = app.client.get(app.url("/messenger/health")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    assert!(
        opened.elapsed() < Duration::from_secs(5),
        "answered while the slow ones wait"
    );
    for (i, mut socket) in slow.into_iter().enumerate() {
        let mut buffer = [0u8; 64];
        let read = tokio::time::timeout(idle + Duration::from_secs(10), socket.read(&mut buffer))
            .await
            .unwrap_or_else(|_| panic!("slow connection {i} still open {:?} after it opened", opened.elapsed()));
        assert!(matches!(read, Ok(0) | Err(_)), "closed without an answer: {read:?}");
    }
    let cut_after = opened.elapsed();
    println!("20 slow connections cut {cut_after:?} after they opened (idle timeout {idle:?})");
    assert!(cut_after >= idle - Duration::from_millis(500), "{cut_after:?}");
    // The feed outlived the timeout on its heartbeats (every 15 s), its client silent.
    let chunk = tokio::time::timeout(Duration::from_secs(20), feed.chunk())
        .await
        .expect("the feed still delivers");
    assert!(matches!(chunk, Ok(Some(_))), "the feed is still open: {chunk:?}");
    let response = app.client.get(app.url("/messenger/health")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    app.cleanup().await;
}
