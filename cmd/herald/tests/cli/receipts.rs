use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::stack;

/// The loop closed with real processes: the stand-in accepts each message and posts a signed
/// receipt back — some undelivered, some twice, some followed by a late intermediate one, some
/// before it even answers (beating Herald's commit). Meanwhile the Messenger API is SIGKILLed
/// and restarted: the stand-in retries what it refused, as providers do. In the end every
/// message's delivery state is the one the provider reported, none is lost, and the refused
/// attempts are counted.
#[tokio::test]
async fn receipts_from_a_real_stand_in_reach_every_message_through_an_api_crash() {
    let mut stack = stack(&[
        ("HERALD__JOB_SCHEDULER__SCHEDULE", "*/1 * * * * *"),
        ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "10"),
        ("HERALD__JOB_SCHEDULER__CONCURRENCY", "10"),
    ])
    .await;
    let secret = "receipts-test-secret";
    stack.use_providers(&format!(
        r#"
[[providers]]
name = "sink"
url = "{}/webhook"
auth_key = "local-dev-webhook-key"
[providers.receipts]
scheme = "hmac-sha256"
secret = "{secret}"
signature_header = "X-Sink-Signature"
message_id_field = "/messageId"
status_field = "/status"
status_map = {{ DELIVRD = "delivered", UNDELIV = "undelivered", ENROUTE = "sent" }}

[[routes]]
prefix = ""
providers = ["sink"]
"#,
        stack.sink
    ));
    let receipts_url = format!("{}/api/messenger/receipts/sink", stack.api);
    let _sink = stack.spawn(
        "webhook-sink",
        &[
            "webhook-sink",
            "--receipts-url",
            &receipts_url,
            "--receipts-secret",
            secret,
            // Long enough that the receipts of the sends just before the crash arrive while the
            // API is down.
            "--receipts-delay-ms",
            "1500",
            "--receipts-undelivered",
            "0.25",
            "--receipts-duplicate",
            "0.3",
            "--receipts-out-of-order",
            "0.3",
            "--receipts-before-answer",
            "0.3",
        ],
    );
    let mut api = stack.spawn("messenger-api", &["messenger-api"]);
    stack.wait_healthy(&format!("{}/messenger/health", stack.api)).await;
    stack.wait_healthy(&format!("{}/webhook-sink/health", stack.sink)).await;
    assert!(stack
        .command(&["seed", "--count", "60"])
        .output()
        .unwrap()
        .status
        .success());
    let _scheduler = stack.spawn("job-scheduler", &["job-scheduler"]);

    // Receipts are streaming in: kill the API, keep it down a moment, start it again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink_counts(&stack).await["taken"].as_u64().unwrap_or(0) < 5 {
        assert!(Instant::now() < deadline, "no receipt was taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    api.signal("KILL");
    api.wait_exit(Duration::from_secs(5)).expect("killed");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _api = stack.spawn("messenger-api-again", &["messenger-api"]);
    stack.wait_healthy(&format!("{}/messenger/health", stack.api)).await;

    // Every message ends with the state the provider reported.
    let deadline = Instant::now() + Duration::from_secs(90);
    let states = loop {
        let states = delivery_states(&stack).await;
        let finals = states
            .values()
            .filter(|s| *s == "delivered" || *s == "undelivered")
            .count();
        if finals == 60 {
            break states;
        }
        assert!(
            Instant::now() < deadline,
            "{finals} of 60 final after 90 s: {states:?}; sink {}",
            sink_counts(&stack).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let counts = sink_counts(&stack).await;
    let tally = |state: &str| states.values().filter(|s| *s == state).count() as u64;
    let reported = |state: &str| counts[state].as_u64().unwrap();
    // A send whose commit the crash cut off is sent again after its lease (at least once, with
    // the same Idempotency-Key): the provider then reported on an id Herald never kept, a
    // receipt that waits unmatched. Those are the only difference between the two tallies.
    let repeats: u64 = stack.received_counts().await.values().map(|n| *n as u64 - 1).sum();
    assert!(repeats <= 10, "repeats limited to one batch in flight: {repeats}");
    assert_eq!(
        reported("delivered") + reported("undelivered"),
        60 + repeats,
        "{counts}"
    );
    assert!(tally("delivered") <= reported("delivered") && tally("undelivered") <= reported("undelivered"));
    assert_eq!(
        reported("delivered") - tally("delivered") + reported("undelivered") - tally("undelivered"),
        repeats,
        "every receipt of a kept id applied: {counts}"
    );
    assert_eq!(counts["givenUp"], 0, "{counts}");
    assert!(
        counts["refusedAttempts"].as_u64().unwrap() > 0,
        "the crash refused some attempts, retried and counted: {counts}"
    );
    stack.cleanup().await;
}

async fn sink_counts(stack: &herald_core::testing::ProcessStack) -> Value {
    stack.get_json(&format!("{}/webhook-sink/receipts", stack.sink)).await
}

/// Every sent message's delivery state, by id.
async fn delivery_states(stack: &herald_core::testing::ProcessStack) -> HashMap<String, String> {
    let mut states = HashMap::new();
    let mut url = format!("{}/api/messenger/messages/sent?limit=100", stack.api);
    loop {
        let Ok(page) = reqwest::Client::new()
            .get(&url)
            .bearer_auth(herald_core::testing::TEST_KEY)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
        else {
            return states;
        };
        let page: Value = page.json().await.unwrap_or_default();
        for m in page["items"].as_array().into_iter().flatten() {
            states.insert(
                m["id"].as_str().unwrap_or_default().to_owned(),
                m["delivery"]["state"].as_str().unwrap_or("none").to_owned(),
            );
        }
        match page["nextCursor"].as_str() {
            Some(c) => url = format!("{}/api/messenger/messages/sent?limit=100&after={c}", stack.api),
            None => return states,
        }
    }
}
