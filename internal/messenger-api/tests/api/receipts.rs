//! Delivery receipts in (SPEC §17): signed by the provider's scheme, applied by rank whatever
//! their order, kept when they beat Herald's commit, refused without a valid signature, and
//! seen on the message and the live feed.

use std::time::Duration;

use futures::StreamExt;
use herald_core::receipts::{hmac_sha256_hex, twilio_signature};
use serde_json::{json, Value};
use test_support::TestEnv;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::helpers::{settings_for, spawn_with_settings, TestApp, KEY};

const PROVIDERS: &str = r#"
[[providers]]
name = "acme"
url = "http://127.0.0.1:9/webhook"
auth_key = "k"
[providers.receipts]
scheme = "hmac-sha256"
secret = "acme-secret"
signature_header = "X-Acme-Signature"
message_id_field = "/result/id"
status_field = "/result/status"
error_code_field = "/result/error"
status_map = { DELIVRD = "delivered", UNDELIV = "undelivered", READ = "read", ENROUTE = "sent" }

[[providers]]
name = "tw"
url = "http://127.0.0.1:9/twilio"
auth_key = "k"
[providers.receipts]
scheme = "twilio"
secret = "twilio-token"
message_id_field = "MessageSid"
status_field = "MessageStatus"
error_code_field = "ErrorCode"
status_map = { delivered = "delivered", undelivered = "undelivered", failed = "failed", read = "read", sent = "sent", queued = "sent" }

[[routes]]
prefix = ""
providers = ["acme", "tw"]
"#;

async fn app() -> TestApp {
    let env = TestEnv::new().await.expect("test servers");
    let settings = herald_core::testing::with_providers(settings_for(&env, &[]), PROVIDERS);
    spawn_with_settings(env, settings).await
}

/// A message `provider` accepted as `webhook_message_id`: created, claimed and committed.
async fn sent(app: &TestApp, provider: &str, webhook_message_id: &str) -> String {
    let id = app.seed(1).await.remove(0);
    let claimed = app.claim("w", 1).await;
    let committed = app
        .put(&format!("/api/messenger/commit/{id}"))
        .json(&json!({"claimToken": claimed[0]["claimToken"], "webhookMessageId": webhook_message_id, "provider": provider}))
        .send()
        .await
        .unwrap();
    assert_eq!(committed.status(), 200, "{:?}", committed.text().await);
    id
}

async fn acme(app: &TestApp, body: Value, secret: &str) -> reqwest::Response {
    let raw = body.to_string();
    app.client
        .post(app.url("/api/messenger/receipts/acme"))
        .header("content-type", "application/json")
        .header(
            "X-Acme-Signature",
            format!("sha256={}", hmac_sha256_hex(secret.as_bytes(), raw.as_bytes())),
        )
        .body(raw)
        .send()
        .await
        .unwrap()
}

fn receipt(id: &str, status: &str) -> Value {
    json!({"result": {"id": id, "status": status, "error": null}})
}

async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn receipts_apply_by_rank_in_any_order_and_replays_change_nothing() {
    let app = app().await;
    let id = sent(&app, "acme", "m-1").await;
    let (status, body) = answer(acme(&app, receipt("m-1", "ENROUTE"), "acme-secret").await).await;
    assert_eq!((status, body["result"].as_str()), (200, Some("applied")), "{body}");
    let (status, body) = answer(acme(&app, receipt("m-1", "DELIVRD"), "acme-secret").await).await;
    assert_eq!(
        (status, body["result"].as_str(), body["state"].as_str()),
        (200, Some("applied"), Some("delivered"))
    );
    // The same again, and a late intermediate: nothing moves.
    for late in ["DELIVRD", "ENROUTE"] {
        let (status, body) = answer(acme(&app, receipt("m-1", late), "acme-secret").await).await;
        assert_eq!((status, body["result"].as_str()), (200, Some("ignored")), "{late}");
    }
    // Read outranks delivered; a final that comes after it does not.
    assert_eq!(
        answer(acme(&app, receipt("m-1", "READ"), "acme-secret").await).await.1["result"],
        "applied"
    );
    assert_eq!(
        answer(acme(&app, receipt("m-1", "UNDELIV"), "acme-secret").await)
            .await
            .1["result"],
        "ignored"
    );
    let message = app.get_json(&format!("/api/messenger/messages/{id}")).await;
    assert_eq!(message["status"], "sent", "the send status stays");
    assert_eq!(message["delivery"]["state"], "read");
    assert_eq!(message["delivery"]["providerStatus"], "READ");
    let states: Vec<&str> = message["receipts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["sent", "delivered", "read"]);
    // A receipt for another message with an error code keeps it.
    let other = sent(&app, "acme", "m-2").await;
    let failed = json!({"result": {"id": "m-2", "status": "UNDELIV", "error": 34}});
    assert_eq!(
        answer(acme(&app, failed, "acme-secret").await).await.1["state"],
        "undelivered"
    );
    let message = app.get_json(&format!("/api/messenger/messages/{other}")).await;
    assert_eq!(message["delivery"]["errorCode"], "34");
    // The provider's window in the stats: one delivered, one undelivered, one read.
    let stats = app.get_json("/api/messenger/stats").await;
    let acme = stats["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "acme")
        .unwrap()
        .clone();
    assert_eq!(
        (
            acme["delivered"].clone(),
            acme["undelivered"].clone(),
            acme["read"].clone(),
            acme["deliveredRate"].clone()
        ),
        (json!(1), json!(1), json!(1), json!(0.5)),
        "{acme}"
    );
    assert_eq!(acme["receiptP50Ms"], 1000, "sent and reported within a second: {acme}");
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
        metrics.contains(r#"herald_deliveries_total{provider="acme",state="read"} 1"#),
        "{metrics}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_receipt_without_the_providers_signature_changes_nothing() {
    let app = app().await;
    let id = sent(&app, "acme", "m-1").await;
    let (status, body) = answer(acme(&app, receipt("m-1", "DELIVRD"), "not-the-secret").await).await;
    assert_eq!((status, body["internalCode"].as_u64()), (401, Some(401002)), "{body}");
    let unsigned = app
        .client
        .post(app.url("/api/messenger/receipts/acme"))
        .json(&receipt("m-1", "DELIVRD"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer(unsigned).await.1["internalCode"], 401002);
    // A bearer key is no signature either.
    let keyed = app
        .post("/api/messenger/receipts/acme")
        .json(&receipt("m-1", "DELIVRD"))
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status(), 401);
    let message = app.get_json(&format!("/api/messenger/messages/{id}")).await;
    assert!(message["delivery"].is_null(), "{message}");
    // A provider that takes no receipts, and a body without the fields.
    let (status, body) = answer(
        app.client
            .post(app.url("/api/messenger/receipts/nobody"))
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body["internalCode"].as_u64()), (404, Some(404003)));
    let (status, body) = answer(acme(&app, json!({"something": "else"}), "acme-secret").await).await;
    assert_eq!((status, body["internalCode"].as_u64()), (400, Some(400019)));
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"herald_receipts_total{provider="acme",result="unauthorized"} 3"#,
        r#"herald_receipts_total{provider="acme",result="unreadable"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_receipt_before_the_commit_is_kept_and_applied_when_it_lands_and_an_unknown_id_is_counted() {
    let app = app().await;
    let id = app.seed(1).await.remove(0);
    let claimed = app.claim("w", 1).await;
    // The provider answered and called back before the worker's commit.
    let (status, body) = answer(acme(&app, receipt("m-early", "DELIVRD"), "acme-secret").await).await;
    assert_eq!((status, body["result"].as_str()), (202, Some("pending")));
    let (status, _) = answer(acme(&app, receipt("never-ours", "DELIVRD"), "acme-secret").await).await;
    assert_eq!(
        status, 202,
        "an id Herald never sent is answered 2xx: providers retry anything else"
    );
    let committed = app
        .put(&format!("/api/messenger/commit/{id}"))
        .json(&json!({"claimToken": claimed[0]["claimToken"], "webhookMessageId": "m-early", "provider": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(committed.status(), 200);
    // Applied by the commit itself, before it answered.
    let message = app.get_json(&format!("/api/messenger/messages/{id}")).await;
    assert_eq!(message["delivery"]["state"], "delivered", "{message}");
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"herald_receipts_total{provider="acme",result="pending"} 2"#,
        r#"herald_receipts_total{provider="acme",result="matched_late"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    // The unknown one still waits, for an operator to see.
    let waiting = app.get_json("/api/messenger/pending-receipts").await;
    let waiting = waiting.as_array().unwrap();
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0]["webhookMessageId"], "never-ours");
    assert_eq!(waiting[0]["provider"], "acme");
    app.cleanup().await;
}

#[tokio::test]
async fn receipts_for_ids_never_sent_do_not_hold_back_the_ones_whose_commit_comes() {
    let app = app().await;
    // More unknown ids than one matching round takes, waiting ahead of the one that matters.
    let unknown: Vec<_> = (0..250)
        .map(|i| acme(&app, receipt(&format!("stranger-{i}"), "DELIVRD"), "acme-secret"))
        .collect();
    for response in futures::future::join_all(unknown).await {
        assert_eq!(response.status(), 202);
    }
    let id = app.seed(1).await.remove(0);
    let claimed = app.claim("w", 1).await;
    let (status, _) = answer(acme(&app, receipt("m-late-commit", "DELIVRD"), "acme-secret").await).await;
    assert_eq!(status, 202);
    // The periodic round has looked at the early receipt and moved on before the commit comes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let committed = app
        .put(&format!("/api/messenger/commit/{id}"))
        .json(&json!({"claimToken": claimed[0]["claimToken"], "webhookMessageId": "m-late-commit", "provider": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(committed.status(), 200);
    let message = app.get_json(&format!("/api/messenger/messages/{id}")).await;
    assert_eq!(message["delivery"]["state"], "delivered", "{message}");
    let waiting = app.get_json("/api/messenger/pending-receipts?limit=100").await;
    assert!(waiting
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["webhookMessageId"] != "m-late-commit"));
    app.cleanup().await;
}

#[tokio::test]
async fn a_twilio_style_form_receipt_checks_the_url_and_sorted_parameters() {
    let app = app().await;
    let id = sent(&app, "tw", "SM123").await;
    let url = app.url("/api/messenger/receipts/tw");
    let form = [
        ("MessageStatus", "delivered"),
        ("MessageSid", "SM123"),
        ("AccountSid", "AC1"),
    ];
    let pairs: Vec<(String, String)> = form.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    let signature = twilio_signature(b"twilio-token", &url, &pairs);
    let post = |signature: String| {
        app.client
            .post(&url)
            .header("X-Twilio-Signature", signature)
            .form(&form)
            .send()
    };
    assert_eq!(answer(post("AAAA".into()).await.unwrap()).await.0, 401);
    let (status, body) = answer(post(signature).await.unwrap()).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("delivered")), "{body}");
    let message = app.get_json(&format!("/api/messenger/messages/{id}")).await;
    assert_eq!(message["delivery"]["state"], "delivered");
    app.cleanup().await;
}

#[tokio::test]
async fn a_delivery_reaches_the_live_feed() {
    let app = app().await;
    let id = sent(&app, "acme", "m-live").await;
    let mut request = app.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    acme(&app, receipt("m-live", "DELIVRD"), "acme-secret").await;
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(frame)) = socket.next().await {
            if let WsMessage::Text(text) = frame {
                let event: Value = serde_json::from_str(&text).unwrap();
                if event["type"] == "message.delivered" {
                    return event;
                }
            }
        }
        panic!("the socket ended");
    })
    .await
    .expect("message.delivered within 10 s");
    assert_eq!(event["message"]["id"], id.as_str());
    assert_eq!(event["message"]["delivery"]["state"], "delivered");
    app.cleanup().await;
}

#[tokio::test]
async fn a_message_with_no_final_receipt_in_time_becomes_unknown_and_a_late_receipt_still_applies() {
    let env = TestEnv::new().await.expect("test servers");
    let settings = herald_core::testing::with_providers(
        settings_for(
            &env,
            &[
                ("HERALD__RECEIPTS__TIMEOUT_HOURS", "1"),
                ("HERALD__RECEIPTS__SWEEP_SECONDS", "1"),
            ],
        ),
        PROVIDERS,
    );
    let app = spawn_with_settings(env, settings).await;
    let two_hours_ago = (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
    let ids = app.seed(3).await;
    let claimed = app.claim("w", 3).await;
    for (claim, (mid, sent_at)) in claimed.iter().zip([
        ("m-silent", Some(two_hours_ago.clone())),
        ("m-delivered", Some(two_hours_ago)),
        ("m-recent", None),
    ]) {
        let committed = app
            .put(&format!("/api/messenger/commit/{}", claim["id"].as_str().unwrap()))
            .json(&json!({"claimToken": claim["claimToken"], "webhookMessageId": mid, "provider": "acme", "sentAt": sent_at}))
            .send()
            .await
            .unwrap();
        assert_eq!(committed.status(), 200);
    }
    assert_eq!(
        answer(acme(&app, receipt("m-delivered", "DELIVRD"), "acme-secret").await)
            .await
            .0,
        200
    );
    let id_of: std::collections::HashMap<&str, String> = claimed
        .iter()
        .zip(["m-silent", "m-delivered", "m-recent"])
        .map(|(c, m)| (m, c["id"].as_str().unwrap().to_owned()))
        .collect();
    let shared = &app;
    let by_mid = |mid: &str| {
        let path = format!("/api/messenger/messages/{}", id_of[mid]);
        async move { shared.get_json(&path).await }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if by_mid("m-silent").await["delivery"]["state"] == "unknown" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the silent message never became unknown"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        by_mid("m-delivered").await["delivery"]["state"],
        "delivered",
        "a final receipt stands"
    );
    assert!(
        by_mid("m-recent").await["delivery"].is_null(),
        "not yet past the timeout"
    );
    // The receipt that comes late still tells the truth.
    let (_, body) = answer(acme(&app, receipt("m-silent", "DELIVRD"), "acme-secret").await).await;
    assert_eq!(body["result"], "applied");
    assert_eq!(by_mid("m-silent").await["delivery"]["state"], "delivered");
    assert_eq!(ids.len(), 3);
    app.cleanup().await;
}

#[tokio::test]
async fn a_provider_with_its_own_receipt_timeout_is_swept_on_it_and_the_others_on_the_default() {
    let env = TestEnv::new().await.expect("test servers");
    // acme waits 3 hours for a final receipt, tw the default 1 hour.
    let providers = PROVIDERS.replace(
        "error_code_field = \"/result/error\"",
        "error_code_field = \"/result/error\"\ntimeout_hours = 3",
    );
    let settings = herald_core::testing::with_providers(
        settings_for(
            &env,
            &[
                ("HERALD__RECEIPTS__TIMEOUT_HOURS", "1"),
                ("HERALD__RECEIPTS__SWEEP_SECONDS", "1"),
            ],
        ),
        &providers,
    );
    let app = spawn_with_settings(env, settings).await;
    let ago = |hours: i64| (chrono::Utc::now() - chrono::Duration::hours(hours)).to_rfc3339();
    app.seed(4).await;
    let claimed = app.claim("w", 4).await;
    let sends = [
        ("acme", "a-2h", ago(2)),
        ("acme", "a-4h", ago(4)),
        ("tw", "t-2h", ago(2)),
        ("tw", "t-now", ago(0)),
    ];
    let mut id_of = std::collections::HashMap::new();
    for (claim, (provider, mid, sent_at)) in claimed.iter().zip(&sends) {
        let committed = app
            .put(&format!("/api/messenger/commit/{}", claim["id"].as_str().unwrap()))
            .json(&json!({"claimToken": claim["claimToken"], "webhookMessageId": mid, "provider": provider, "sentAt": sent_at}))
            .send()
            .await
            .unwrap();
        assert_eq!(committed.status(), 200);
        id_of.insert(*mid, claim["id"].as_str().unwrap().to_owned());
    }
    let state = |mid: &str| {
        let path = format!("/api/messenger/messages/{}", id_of[mid]);
        let app = &app;
        async move { app.get_json(&path).await["delivery"]["state"].clone() }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while state("a-4h").await != "unknown" || state("t-2h").await != "unknown" {
        assert!(
            std::time::Instant::now() < deadline,
            "past their timeouts, never unknown"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Two more sweeps: the ones within their own provider's timeout stay as they were.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(state("a-2h").await.is_null(), "2 h is within acme's 3 h");
    assert!(state("t-now").await.is_null());
    app.cleanup().await;
}

#[tokio::test]
async fn the_one_webhook_provider_takes_receipts_under_its_own_name() {
    use herald_core::receipts::{ReceiptScheme, ReceiptSettings};
    let env = TestEnv::new().await.expect("test servers");
    let mut settings = settings_for(&env, &[]);
    // No [[providers]]: `[webhook.receipts]` gives the `default` provider its receipts.
    settings.webhook.receipts = Some(ReceiptSettings {
        scheme: ReceiptScheme::HmacSha256,
        secret: "sink-secret".to_owned().into(),
        signature_header: "X-Sink-Signature".into(),
        user: None,
        public_url: None,
        message_id_field: "/messageId".into(),
        status_field: "/status".into(),
        error_code_field: None,
        status_map: [("DELIVRD".to_owned(), herald_core::receipts::DeliveryState::Delivered)].into(),
        timeout_hours: None,
    });
    let app = spawn_with_settings(env, settings).await;
    let id = sent(&app, "default", "wh-1").await;
    let raw = json!({"messageId": "wh-1", "status": "DELIVRD"}).to_string();
    let post = |secret: &'static str| {
        let raw = raw.clone();
        let app = &app;
        async move {
            app.client
                .post(app.url("/api/messenger/receipts/default"))
                .header("content-type", "application/json")
                .header("X-Sink-Signature", hmac_sha256_hex(secret.as_bytes(), raw.as_bytes()))
                .body(raw)
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(post("wrong").await.status(), 401);
    let (status, body) = answer(post("sink-secret").await).await;
    assert_eq!((status, body["result"].as_str()), (200, Some("applied")));
    assert_eq!(app.message(&id).await["delivery"]["state"], "delivered");
    app.cleanup().await;
}

#[tokio::test]
async fn a_flood_of_receipts_over_the_in_flight_bound_is_answered_503_and_taken_when_sent_again() {
    let env = TestEnv::new().await.expect("test servers");
    let settings = herald_core::testing::with_providers(
        settings_for(&env, &[("HERALD__RECEIPTS__MAX_IN_FLIGHT", "1")]),
        PROVIDERS,
    );
    let app = spawn_with_settings(env, settings).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(sent(&app, "acme", &format!("flood-{i}")).await);
    }
    let post_all = |mids: Vec<String>| {
        let app = &app;
        async move {
            let posts = mids.iter().map(|mid| acme(app, receipt(mid, "DELIVRD"), "acme-secret"));
            let answers = futures::future::join_all(posts).await;
            let mut refused = Vec::new();
            for (mid, response) in mids.iter().zip(answers) {
                match response.status().as_u16() {
                    200 => {}
                    503 => {
                        assert_eq!(response.headers()["retry-after"], "1");
                        let body: Value = response.json().await.unwrap();
                        assert_eq!(body["internalCode"], 503002);
                        refused.push(mid.clone());
                    }
                    other => panic!("{mid}: {other}"),
                }
            }
            refused
        }
    };
    let mut waiting: Vec<String> = (0..40).map(|i| format!("flood-{i}")).collect();
    let first = post_all(waiting.clone()).await;
    assert!(!first.is_empty(), "40 at once over a bound of 1: some must be refused");
    waiting = first;
    // Sent again, as a provider does, until every one is taken.
    for _ in 0..200 {
        if waiting.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiting = post_all(waiting).await;
    }
    assert!(waiting.is_empty(), "{} never taken", waiting.len());
    for id in &ids {
        assert_eq!(app.message(id).await["delivery"]["state"], "delivered");
    }
    app.cleanup().await;
}
