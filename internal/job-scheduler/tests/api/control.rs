use std::time::Duration;

use serde_json::Value;

use crate::helpers::{eventually, sink, Stack, KEY};

async fn post(client: &reqwest::Client, url: String) -> reqwest::Response {
    client.post(url).bearer_auth(KEY).send().await.unwrap()
}

#[tokio::test]
async fn start_and_stop_persist_and_answer_409_when_already_in_that_state() {
    let stack = Stack::start(&[]).await;
    let (url, _) = sink(0, 0.0).await;
    let scheduler = stack.scheduler(&url, &[]).await;
    let status: Value = stack
        .http
        .get_json(&format!("{}/job-scheduler/messenger/is-working", scheduler.url))
        .await;
    assert_eq!(status["working"], true, "the job starts with the service");

    let again = post(
        &stack.client,
        format!("{}/job-scheduler/messenger/start", scheduler.url),
    )
    .await;
    assert_eq!(again.status(), 409);
    assert_eq!(again.json::<Value>().await.unwrap()["internalCode"], 409004);

    // The scheduler's own body limit (64 KiB), not the API's (1 MiB).
    let oversize = stack
        .client
        .post(format!("{}/job-scheduler/messenger/stop", scheduler.url))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(vec![b' '; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(oversize.status(), 413);
    assert_eq!(oversize.json::<Value>().await.unwrap()["internalCode"], 413001);

    let stopped = post(&stack.client, format!("{}/job-scheduler/messenger/stop", scheduler.url)).await;
    assert_eq!(stopped.status(), 200);
    assert_eq!(stopped.json::<Value>().await.unwrap()["working"], false);
    let twice = post(&stack.client, format!("{}/job-scheduler/messenger/stop", scheduler.url)).await;
    assert_eq!(twice.json::<Value>().await.unwrap()["internalCode"], 409005);

    // A restarted replica keeps the persisted state.
    scheduler.shutdown().await.unwrap();
    let restarted = stack.scheduler(&url, &[]).await;
    let status = restarted.control.status().await.unwrap();
    assert!(!status.working);
    assert_eq!(
        restarted.control.job().run_once().await.skipped_reason.as_deref(),
        Some("job is stopped")
    );

    let unauthorized = stack
        .client
        .post(format!("{}/job-scheduler/messenger/start", restarted.url))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    restarted.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn stop_through_the_messenger_toggle_halts_every_replica_and_start_resumes() {
    let stack = Stack::start(&[]).await;
    let (url, log) = sink(0, 0.0).await;
    let fast = [("HERALD__JOB_SCHEDULER__SCHEDULE", "*/1 * * * * *")];
    let a = stack.scheduler(&url, &fast).await;
    let b = stack.scheduler(&url, &fast).await;
    // The API's toggle must reach a scheduler: point a second API instance at replica A.
    let toggle_api = herald_messenger_api::Application::build(&herald_core::testing::settings_for(
        &stack.env,
        &[("HERALD__JOB_SCHEDULER__URL", &a.url)],
    ))
    .await
    .unwrap();
    let toggle_url = format!("http://127.0.0.1:{}", toggle_api.port());
    tokio::spawn(toggle_api.run_until_stopped(std::future::pending()));

    let stop = post(
        &stack.client,
        format!("{toggle_url}/api/messenger/messenger-job-toggle?command=stop"),
    )
    .await;
    assert_eq!(stop.status(), 200);
    assert_eq!(stop.json::<Value>().await.unwrap()["working"], false);
    let ids = stack.seed(6).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(log.snapshot().is_empty(), "a replica sent after Stop");
    assert_eq!(stack.count("pending").await, 6, "a replica claimed after Stop");

    let start = post(
        &stack.client,
        format!("{toggle_url}/api/messenger/messenger-job-toggle?command=start"),
    )
    .await;
    assert_eq!(start.status(), 200);
    eventually(Duration::from_secs(15), "all six sent after Start", || async {
        stack.count("sent").await == 6
    })
    .await;
    let mut keys: Vec<String> = log.snapshot().into_iter().filter_map(|r| r.idempotency_key).collect();
    keys.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(keys, expected);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    stack.cleanup().await;
}

/// A Stop answers once the run in flight is done. A run may last nearly a lease (sends start
/// until the lease less a send's timeout), which is longer than the two send timeouts and 10 s
/// the toggle used to wait: it answered 502 although the stop was saved. Both waits now come
/// from one policy (`Settings::stop_wait` and `Settings::toggle_timeout`).
#[tokio::test]
async fn a_stop_that_waits_for_a_long_run_is_answered_200_by_the_toggle() {
    let timing = [
        ("HERALD__JOB_SCHEDULER__LEASE_SECONDS", "30"),
        ("HERALD__WEBHOOK__TIMEOUT_MS", "2000"),
    ];
    let stack = Stack::start(&[]).await;
    let (url, log) = sink(1500, 0.0).await;
    let mut replica = timing.to_vec();
    replica.extend([
        ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "12"),
        ("HERALD__JOB_SCHEDULER__CONCURRENCY", "1"),
    ]);
    let a = stack.scheduler(&url, &replica).await;
    let mut api = timing.to_vec();
    api.push(("HERALD__JOB_SCHEDULER__URL", &a.url));
    let toggle_api = herald_messenger_api::Application::build(&herald_core::testing::settings_for(&stack.env, &api))
        .await
        .unwrap();
    let toggle_url = format!("http://127.0.0.1:{}", toggle_api.port());
    tokio::spawn(toggle_api.run_until_stopped(std::future::pending()));

    stack.seed(12).await;
    let run = tokio::spawn({
        let control = a.control.clone();
        async move { control.job().run_once().await }
    });
    eventually(Duration::from_secs(10), "the run's first send", || async {
        !log.snapshot().is_empty()
    })
    .await;
    // Twelve sends one after another at 1.5 s each: about 18 s, past the old toggle's 14 s.
    let asked = std::time::Instant::now();
    let stop = post(
        &stack.client,
        format!("{toggle_url}/api/messenger/messenger-job-toggle?command=stop"),
    )
    .await;
    let waited = asked.elapsed();
    assert_eq!(stop.status(), 200, "after {waited:?}: {}", stop.text().await.unwrap());
    let report = run.await.unwrap();
    assert!(
        waited > Duration::from_secs(14),
        "the run was not long enough to test this: {waited:?}"
    );
    assert_eq!(report.claimed, 12);
    assert_eq!(log.snapshot().len(), 12, "the run in flight finished its batch");
    assert_eq!(stack.count("sent").await, 12);
    a.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn run_history_is_recorded_and_paginated_newest_first() {
    let stack = Stack::start(&[]).await;
    stack.seed(3).await;
    let (url, _) = sink(0, 0.0).await;
    let scheduler = stack.scheduler(&url, &[]).await;
    for _ in 0..3 {
        scheduler.control.job().run_once().await;
    }
    let page: Value = stack
        .http
        .get_json(&format!("{}/job-scheduler/jobs?limit=2", scheduler.url))
        .await;
    assert_eq!(page["total"], 3);
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(
        (items[0]["claimed"].as_i64(), items[1]["claimed"].as_i64()),
        (Some(0), Some(1))
    );
    let cursor = page["nextCursor"].as_str().unwrap();
    let rest: Value = stack
        .http
        .get_json(&format!("{}/job-scheduler/jobs?after={cursor}", scheduler.url))
        .await;
    assert_eq!(rest["items"][0]["sent"], 2);
    let bad = stack
        .client
        .get(format!("{}/job-scheduler/jobs?limit=0", scheduler.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.json::<Value>().await.unwrap()["internalCode"], 400009);

    let metrics = stack.http.open_text(&format!("{}/metrics", scheduler.url)).await;
    assert!(
        metrics.contains("herald_deliveries_total{outcome=\"accepted\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("herald_job_runs_total{result=\"completed\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("herald_webhook_latency_seconds_bucket"), "{metrics}");
    assert!(metrics.contains("herald_job_last_run_timestamp_seconds"), "{metrics}");
    let ready: Value = stack
        .http
        .open_json(&format!("{}/job-scheduler/ready", scheduler.url))
        .await;
    assert_eq!(ready["status"], "ready");
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn a_run_never_overlaps_the_previous_one_on_the_same_replica() {
    let stack = Stack::start(&[]).await;
    stack.seed(2).await;
    let (url, _) = sink(800, 0.0).await;
    let scheduler = stack.scheduler(&url, &[]).await;
    let job = scheduler.control.job().clone();
    let first = tokio::spawn(async move { job.run_once().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = scheduler.control.job().run_once().await;
    assert_eq!(
        second.skipped_reason.as_deref(),
        Some("previous run still going on this replica")
    );
    assert_eq!(first.await.unwrap().sent, 2);
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn the_openapi_document_is_served_and_matches_the_committed_file() {
    let stack = Stack::start(&[]).await;
    let (url, _) = sink(0, 0.0).await;
    let scheduler = stack.scheduler(&url, &[]).await;
    let served: Value = stack
        .http
        .open_json(&format!("{}/job-scheduler/openapi.json", scheduler.url))
        .await;
    for path in [
        "/job-scheduler/messenger/start",
        "/job-scheduler/messenger/stop",
        "/job-scheduler/messenger/is-working",
        "/job-scheduler/jobs",
    ] {
        assert!(served["paths"][path].is_object(), "{path}");
    }
    let swagger = stack
        .client
        .get(format!("{}/job-scheduler/swagger", scheduler.url))
        .send()
        .await
        .unwrap();
    assert_eq!(swagger.status(), 200);
    let settings =
        herald_core::testing::test_settings(&test_support::mongo_uri(), "x", &test_support::redis_url(), "x:", &[]);
    let generated = herald_job_scheduler::openapi_json(&settings).await.unwrap();
    let committed =
        std::fs::read_to_string(herald_core::testing::configs_dir().join("../docs/openapi/job-scheduler.json"))
            .unwrap();
    assert_eq!(
        committed,
        format!("{generated}\n"),
        "docs/openapi/job-scheduler.json is stale: run `herald openapi --out-dir docs/openapi`"
    );
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn a_scheduler_holding_only_a_worker_key_sends_and_cannot_toggle() {
    use herald_core::auth::Scope;
    use herald_core::testing::scopes::{check_every_operation, key_for, scoped_services};
    let env = test_support::TestEnv::new().await.unwrap();
    let (url, log) = sink(0, 0.0).await;
    let mut settings = herald_core::testing::settings_for(&env, &[("HERALD__WEBHOOK__URL", &url)]);
    scoped_services(&mut settings);
    let stack = Stack::start_with(env, settings.clone()).await;
    settings.messenger_api.url = stack.api_url.clone();
    settings.job_scheduler.schedule = crate::helpers::NEVER.into();
    let scheduler = stack.scheduler_with(settings.clone()).await;
    let ids = stack.seed(4).await;
    // Claims, outcomes and commits go through with the worker key alone.
    while stack.count("sent").await < 4 {
        scheduler.control.job().run_once().await;
    }
    let seen = crate::helpers::deliveries(&log);
    assert!(
        ids.iter().all(|id| seen.get(id) == Some(&1)),
        "each sent once: {seen:?}"
    );
    // The same key cannot stop the job.
    let toggle = |key: String| {
        stack
            .client
            .post(format!(
                "{}/api/messenger/messenger-job-toggle?command=stop",
                stack.api_url
            ))
            .bearer_auth(key)
            .send()
    };
    let refused = toggle(key_for(Scope::Worker)).await.unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(refused.json::<Value>().await.unwrap()["internalCode"], 403001);
    // An operator's can: the API presents its own operator-only key to the scheduler.
    let toggle_api = herald_messenger_api::Application::build(&{
        let mut s = settings.clone();
        s.job_scheduler.url = scheduler.url.clone();
        s
    })
    .await
    .unwrap();
    let toggle_url = format!("http://127.0.0.1:{}", toggle_api.port());
    tokio::spawn(toggle_api.run_until_stopped(std::future::pending()));
    let stopped = stack
        .client
        .post(format!("{toggle_url}/api/messenger/messenger-job-toggle?command=stop"))
        .bearer_auth(key_for(Scope::Operator))
        .send()
        .await
        .unwrap();
    assert_eq!(stopped.status(), 200, "{:?}", stopped.text().await);
    // Both services wrote their part of that stop to the one audit, each naming the key used.
    let audit: Value = stack
        .client
        .get(format!("{}/api/messenger/audit", stack.api_url))
        .bearer_auth(key_for(Scope::Operator))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries: Vec<(String, String, String, String)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (s("service"), s("action"), s("key"), s("result"))
        })
        .collect();
    let stop = |service: &str| {
        (
            service.to_owned(),
            "job.stop".to_owned(),
            "operator".to_owned(),
            "ok".to_owned(),
        )
    };
    assert_eq!(
        entries,
        vec![stop("messenger-api"), stop("job-scheduler")],
        "newest first"
    );
    // And every operation of the scheduler's own document enforces its scope.
    let report = check_every_operation(&scheduler.url, "/job-scheduler/openapi.json").await;
    assert_eq!(report.checked.len(), 4, "{:#?}", report.checked);
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}
