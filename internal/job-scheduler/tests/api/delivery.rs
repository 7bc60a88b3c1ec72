use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use wiremock::matchers::{body_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{eventually, sink, Stack};

async fn provider(response: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/webhook"))
        .respond_with(response)
        .mount(&server)
        .await;
    server
}

fn next_attempt(message: &Value) -> DateTime<Utc> {
    message["nextAttemptAt"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn an_accepted_message_is_committed_with_the_provider_id_in_mongodb_and_redis() {
    let stack = Stack::start(&[]).await;
    let ids = stack.seed(1).await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/webhook"))
        .and(header("x-ins-auth-key", "local-dev-webhook-key"))
        .and(header("idempotency-key", ids[0].as_str()))
        .and(header("user-agent", herald_core::USER_AGENT))
        .and(body_json(json!({"to": "+905550000000", "content": "message 0"})))
        .respond_with(ResponseTemplate::new(202).set_body_json(json!({"message": "Accepted", "messageId": "prov-77"})))
        .expect(1)
        .mount(&server)
        .await;
    let scheduler = stack.scheduler(&format!("{}/webhook", server.uri()), &[]).await;

    let report = scheduler.control.job().run_once().await;
    assert_eq!(
        (report.claimed, report.sent, report.retried, report.failed),
        (1, 1, 0, 0)
    );

    let message = stack.message(&ids[0]).await;
    assert_eq!(message["status"], "sent");
    assert_eq!(message["webhookMessageId"], "prov-77");
    let cached: Value =
        serde_json::from_str(&stack.env.redis_get(&format!("sent:{}", ids[0])).await.unwrap().unwrap()).unwrap();
    assert_eq!(cached["messageId"], "prov-77");
    let cached_at: DateTime<Utc> = cached["sentAt"].as_str().unwrap().parse().unwrap();
    let stored_at: DateTime<Utc> = message["sentAt"].as_str().unwrap().parse().unwrap();
    assert_eq!(cached_at, stored_at);
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn a_2xx_without_a_message_id_is_still_sent_and_never_resent() {
    let stack = Stack::start(&[]).await;
    let ids = stack.seed(1).await;
    let server = provider(ResponseTemplate::new(200).set_body_string("ok")).await;
    let scheduler = stack.scheduler(&format!("{}/webhook", server.uri()), &[]).await;
    let report = scheduler.control.job().run_once().await;
    assert_eq!(report.sent, 1);
    let message = stack.message(&ids[0]).await;
    assert_eq!(message["status"], "sent");
    assert!(message["webhookMessageId"].is_null());
    assert_eq!(scheduler.control.job().run_once().await.claimed, 0);
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn server_errors_408_timeouts_and_refused_connections_schedule_a_retry() {
    // The mock servers stay alive for the whole test: wiremock hands a dropped server's port
    // to the next one.
    let servers = [
        provider(ResponseTemplate::new(500)).await,
        provider(ResponseTemplate::new(503)).await,
        provider(ResponseTemplate::new(408)).await,
        provider(ResponseTemplate::new(202).set_delay(Duration::from_millis(3000))).await,
    ];
    let cases = [
        (format!("{}/webhook", servers[0].uri()), "http_status", Some(500)),
        (format!("{}/webhook", servers[1].uri()), "http_status", Some(503)),
        (format!("{}/webhook", servers[2].uri()), "http_status", Some(408)),
        (format!("{}/webhook", servers[3].uri()), "timeout", None),
        ("http://127.0.0.1:9/webhook".to_owned(), "connection", None),
    ];
    for (url, kind, status) in cases {
        let stack = Stack::start(&[]).await;
        let ids = stack.seed(1).await;
        let scheduler = stack.scheduler(&url, &[]).await;
        let before = Utc::now();
        let report = scheduler.control.job().run_once().await;
        assert_eq!((report.claimed, report.retried), (1, 1), "{kind} {status:?}");
        let message = stack.message(&ids[0]).await;
        assert_eq!(message["status"], "pending", "{kind}");
        assert_eq!(message["attempts"], 1);
        assert_eq!(message["lastError"]["kind"], kind);
        assert_eq!(message["lastError"]["status"], json!(status));
        // Test schedule: first retry after 1 s ± 20 %.
        let wait = (next_attempt(&message) - before).num_milliseconds();
        assert!((700..=5000).contains(&wait), "{kind}: retry in {wait} ms");
        scheduler.shutdown().await.unwrap();
        stack.cleanup().await;
    }
}

#[tokio::test]
async fn a_429_is_not_retried_before_its_retry_after() {
    let stack = Stack::start(&[]).await;
    let ids = stack.seed(1).await;
    let server = provider(ResponseTemplate::new(429).insert_header("retry-after", "120")).await;
    let scheduler = stack.scheduler(&format!("{}/webhook", server.uri()), &[]).await;
    let report = scheduler.control.job().run_once().await;
    assert_eq!(report.retried, 1);
    let message = stack.message(&ids[0]).await;
    assert!((next_attempt(&message) - Utc::now()).num_seconds() >= 118, "{message}");
    assert_eq!(scheduler.control.job().run_once().await.claimed, 0, "not due yet");
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn other_4xx_answers_fail_the_message_with_status_and_body_excerpt() {
    let stack = Stack::start(&[]).await;
    let ids = stack.seed(1).await;
    let body = format!("invalid recipient {}", "x".repeat(6000));
    let server = provider(ResponseTemplate::new(422).set_body_string(body)).await;
    let scheduler = stack.scheduler(&format!("{}/webhook", server.uri()), &[]).await;
    let report = scheduler.control.job().run_once().await;
    assert_eq!(report.failed, 1);
    let message = stack.message(&ids[0]).await;
    assert_eq!(message["status"], "failed");
    assert_eq!(message["lastError"]["kind"], "http_status");
    assert_eq!(message["lastError"]["status"], 422);
    let detail = message["lastError"]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("invalid recipient") && detail.len() <= 4096,
        "{}",
        detail.len()
    );
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn exhausted_retries_fail_the_message() {
    let stack = Stack::start(&[("HERALD__DELIVERY__RETRY_SCHEDULE_SECONDS", "1")]).await;
    let ids = stack.seed(1).await;
    let server = provider(ResponseTemplate::new(500)).await;
    let scheduler = stack
        .scheduler(
            &format!("{}/webhook", server.uri()),
            &[("HERALD__DELIVERY__RETRY_SCHEDULE_SECONDS", "1")],
        )
        .await;
    assert_eq!(scheduler.control.job().run_once().await.retried, 1);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let report = scheduler.control.job().run_once().await;
    assert_eq!(report.failed, 1, "{report:?} {}", stack.message(&ids[0]).await);
    let message = stack.message(&ids[0]).await;
    assert_eq!(message["status"], "failed");
    assert_eq!(message["attempts"], 2);
    assert!(message["lastError"]["detail"]
        .as_str()
        .unwrap()
        .contains("retries exhausted"));
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn the_default_policy_sends_two_two_one_then_nothing() {
    let stack = Stack::start(&[]).await;
    stack.seed(5).await;
    let (url, log) = sink(0, 0.0).await;
    let scheduler = stack.scheduler(&url, &[]).await;
    let mut sent = Vec::new();
    for _ in 0..4 {
        sent.push(scheduler.control.job().run_once().await.sent);
    }
    assert_eq!(sent, [2, 2, 1, 0]);
    assert_eq!(log.snapshot().len(), 5);
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_started_sends_and_releases_the_rest() {
    graceful_shutdown_case("false").await;
}

#[tokio::test]
async fn graceful_shutdown_of_a_draining_run_finishes_started_sends_and_releases_the_rest() {
    graceful_shutdown_case("true").await;
}

async fn graceful_shutdown_case(drain: &str) {
    let stack = Stack::start(&[]).await;
    let ids = stack.seed(4).await;
    let (url, log) = sink(1500, 0.0).await;
    let scheduler = stack
        .scheduler(
            &url,
            &[
                ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "4"),
                ("HERALD__JOB_SCHEDULER__CONCURRENCY", "1"),
                ("HERALD__JOB_SCHEDULER__DRAIN", drain),
            ],
        )
        .await;
    let job = scheduler.control.job().clone();
    let run = tokio::spawn(async move { job.run_once().await });
    crate::helpers::eventually(Duration::from_secs(5), "the first send to start", || {
        let log = log.clone();
        async move { !log.snapshot().is_empty() }
    })
    .await;
    let started = std::time::Instant::now();
    scheduler.shutdown().await.unwrap();
    let report = run.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!((report.claimed, report.sent, report.released), (4, 1, 3), "{report:?}");
    assert_eq!(log.snapshot().len(), 1, "nothing new was sent after the signal");
    let mut statuses = Vec::new();
    for id in &ids {
        let m = stack.message(id).await;
        statuses.push((
            m["status"].as_str().unwrap().to_owned(),
            m["attempts"].as_i64().unwrap(),
        ));
    }
    assert_eq!(statuses.iter().filter(|(s, _)| s == "sent").count(), 1);
    assert!(
        statuses.iter().filter(|(s, _)| s == "pending").all(|(_, a)| *a == 0),
        "{statuses:?}"
    );
    stack.cleanup().await;
}

#[tokio::test]
async fn a_claim_too_old_to_report_in_time_is_given_back_unsent() {
    // Lease 10 s and webhook timeout 2 s (configs/test.toml) keep 4 s for the report, so a send
    // may start at most 4 s after the claim. One send at a time to a provider answering in
    // 1.5 s: the sends starting at about 0, 1.5 and 3 s go out; those due at 4.5 and 6 s would
    // be accepted with their outcome possibly landing after the lease, when another replica
    // may already have claimed them and sent them again. They are given back instead.
    let stack = Stack::start(&[]).await;
    let ids = stack.seed(5).await;
    let (url, log) = sink(1500, 0.0).await;
    let scheduler = stack
        .scheduler(
            &url,
            &[
                ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "5"),
                ("HERALD__JOB_SCHEDULER__CONCURRENCY", "1"),
            ],
        )
        .await;
    let report = scheduler.control.job().run_once().await;
    assert_eq!(report.claimed, 5, "{report:?}");
    assert!((2..=3).contains(&report.sent), "{report:?}");
    assert_eq!(report.released, 5 - report.sent, "{report:?}");
    assert_eq!(
        log.snapshot().len(),
        report.sent as usize,
        "only what was reported sent reached the provider"
    );
    let mut pending = 0;
    for id in &ids {
        let m = stack.message(id).await;
        match m["status"].as_str().unwrap() {
            "sent" => {}
            "pending" => {
                assert_eq!(m["attempts"], 0, "a give-back is not an attempt: {m}");
                pending += 1;
            }
            other => panic!("unexpected status {other}: {m}"),
        }
    }
    assert_eq!(pending, report.released);
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn a_run_sends_its_id_as_the_correlation_id_of_its_messenger_calls() {
    let stack = Stack::start(&[]).await;
    let messenger = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/messenger/get-two"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .expect(1)
        .mount(&messenger)
        .await;
    let scheduler = stack
        .scheduler(
            "http://127.0.0.1:9/webhook",
            &[("HERALD__MESSENGER_API__URL", &messenger.uri())],
        )
        .await;
    let report = scheduler.control.job().run_once().await;
    assert_eq!(report.claimed, 0);
    let requests = messenger.received_requests().await.unwrap();
    // The claim (the callback courier may have called the API too).
    let claim = requests
        .iter()
        .find(|r| r.url.path() == "/api/messenger/get-two")
        .unwrap();
    let correlation = claim
        .headers
        .get("x-correlation-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(correlation, report.id.to_hex());
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn a_draining_run_goes_on_after_full_batches_and_a_plain_run_does_not() {
    let stack = Stack::start(&[]).await;
    stack.seed(25).await;
    let (url, log) = sink(0, 0.0).await;
    let batch = [("HERALD__JOB_SCHEDULER__BATCH_SIZE", "10")];
    let plain = stack.scheduler(&url, &batch).await;
    assert_eq!(plain.control.job().run_once().await.claimed, 10, "one batch per tick");
    plain.shutdown().await.unwrap();

    let draining = stack
        .scheduler(&url, &[batch[0], ("HERALD__JOB_SCHEDULER__DRAIN", "true")])
        .await;
    let report = draining.control.job().run_once().await;
    assert_eq!((report.claimed, report.sent), (15, 15), "{report:?}");
    assert_eq!(stack.count("sent").await, 25);
    assert_eq!(log.snapshot().len(), 25, "each message once");
    draining.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn an_idle_draining_replica_sends_a_new_message_well_under_a_second() {
    let stack = Stack::start(&[]).await;
    let (url, log) = sink(0, 0.0).await;
    let scheduler = stack
        .scheduler(
            &url,
            &[
                ("HERALD__JOB_SCHEDULER__DRAIN", "true"),
                ("HERALD__JOB_SCHEDULER__IDLE_POLL_MS", "50"),
            ],
        )
        .await;
    // Idle polls that find nothing leave no run behind (one may be in flight right now).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs = stack
        .http
        .get_json(&format!("{}/job-scheduler/jobs", scheduler.url))
        .await;
    let finished = runs["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["finishedAt"].is_string())
        .count();
    assert_eq!(finished, 0, "{runs}");

    let created = std::time::Instant::now();
    let id = stack.seed(1).await.remove(0);
    eventually(Duration::from_secs(1), "the new message to be sent", || async {
        stack.message(&id).await["status"] == "sent"
    })
    .await;
    let latency = created.elapsed();
    assert!(latency < Duration::from_millis(1000), "{latency:?}");
    assert_eq!(log.snapshot().len(), 1);
    // The poll that found it is the one run on record (once it has finished).
    eventually(Duration::from_secs(2), "the poll's run to be recorded", || async {
        let runs = stack
            .http
            .get_json(&format!("{}/job-scheduler/jobs", scheduler.url))
            .await;
        let finished: Vec<&Value> = runs["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["finishedAt"].is_string())
            .collect();
        finished.len() == 1 && finished[0]["sent"] == 1
    })
    .await;
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

/// A TCP forwarder to `api` that holds every chunk carrying an outcome report for `delay`
/// before passing it on: the Messenger API as a worker sees it under load.
async fn slow_reports(api: &str, delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const OUTCOMES: &[u8] = b"/api/messenger/outcomes";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let upstream = api.trim_start_matches("http://").to_owned();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let up = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = from_client.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if buf[..n].windows(OUTCOMES.len()).any(|w| w == OUTCOMES) {
                            tokio::time::sleep(delay).await;
                        }
                        if to_server.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let down = tokio::io::copy(&mut from_server, &mut to_client);
                let _ = tokio::join!(up, down);
            });
        }
    });
    format!("http://{address}")
}

#[tokio::test]
async fn a_claim_whose_report_is_slow_to_land_is_kept_and_the_message_sent_once() {
    let stack = Stack::start(&[]).await;
    let ids = stack.seed(1).await;
    let (webhook, log) = sink(0, 0.0).await;
    // Reports take 9 s to reach the API; the lease is 6 s (the least a 500 ms timeout allows).
    let proxy = slow_reports(&stack.api_url, Duration::from_secs(9)).await;
    let settings = herald_core::testing::settings_for(
        &stack.env,
        &[
            ("HERALD__MESSENGER_API__URL", proxy.as_str()),
            ("HERALD__WEBHOOK__URL", webhook.as_str()),
            ("HERALD__WEBHOOK__TIMEOUT_MS", "500"),
            ("HERALD__JOB_SCHEDULER__SCHEDULE", crate::helpers::NEVER),
            ("HERALD__JOB_SCHEDULER__LEASE_SECONDS", "6"),
        ],
    );
    let scheduler = stack.scheduler_with(settings).await;
    let control = scheduler.control.clone();
    let run = tokio::spawn(async move { control.job().run_once().await });

    // Past the first lease, while the report is still on its way: another worker finds
    // nothing to take, because the run kept its claim.
    tokio::time::sleep(Duration::from_millis(7500)).await;
    let taken: Vec<Value> = stack
        .http
        .post_json(
            &format!("{}/api/messenger/get-two", stack.api_url),
            &json!({"worker": "other", "limit": 10}),
        )
        .await;
    assert!(taken.is_empty(), "the claim lapsed and moved on: {taken:?}");

    let report = run.await.unwrap();
    assert_eq!((report.claimed, report.sent), (1, 1));
    assert_eq!(stack.message(&ids[0]).await["status"], "sent");
    assert_eq!(log.snapshot().len(), 1, "the provider got it once");
    let metrics = stack
        .client
        .get(format!("{}/metrics", scheduler.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("herald_claims_extended_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}
