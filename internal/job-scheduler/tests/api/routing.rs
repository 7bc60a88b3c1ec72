//! Several providers (SPEC §16): stand-ins on their own ports speaking different request
//! shapes; routing by prefix, by pin and by weight; failover on 503, 429 and 401; each
//! provider's own rate limit with three replicas.

use std::collections::HashMap;
use std::time::Duration;

use herald_webhook_sink::{ReceivedLog, SinkFormat};
use serde_json::{json, Value};

use crate::helpers::{busiest, eventually, most_allowed, set_behaviour, shaped_sink, sink, Scheduler, Stack};

const DRAIN: [(&str, &str); 4] = [
    ("HERALD__JOB_SCHEDULER__DRAIN", "true"),
    ("HERALD__JOB_SCHEDULER__IDLE_POLL_MS", "50"),
    ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "100"),
    ("HERALD__JOB_SCHEDULER__CONCURRENCY", "8"),
];

/// A Herald-shaped provider named `name` at `url` (the sinks' key).
fn herald_provider(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[providers]]\nname = \"{name}\"\nurl = \"{url}\"\nauth_key = \"local-dev-webhook-key\"\npause_after_failures = 3\npause_seconds = 2\n{extra}\n"
    )
}

async fn create(stack: &Stack, body: Value) -> String {
    let created: Value = stack
        .http
        .post_json(&format!("{}/api/messenger/messages", stack.api_url), &body)
        .await;
    created["id"].as_str().unwrap_or_else(|| panic!("{created}")).to_owned()
}

/// Runs until `n` messages are sent (or the time is up).
async fn send_all(stack: &Stack, scheduler: &Scheduler, n: u64, within: Duration) {
    let job = scheduler.control.job();
    eventually(within, &format!("{n} sent"), || async {
        job.run_once().await;
        stack.count("sent").await >= n
    })
    .await;
}

fn per_message(log: &ReceivedLog) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for r in log.snapshot().into_iter().filter(|r| r.message_id.is_some()) {
        *seen.entry(r.idempotency_key.unwrap()).or_default() += 1;
    }
    seen
}

#[tokio::test]
async fn three_shapes_side_by_side_route_by_longest_prefix_and_by_pin() {
    let (tw_url, tw) = shaped_sink(SinkFormat::Twilio, "k-tw").await;
    let (ib_url, ib) = shaped_sink(SinkFormat::Infobip, "k-ib").await;
    let (wa_url, wa) = shaped_sink(SinkFormat::Whatsapp, "k-wa").await;
    let providers = format!(
        r#"
[[providers]]
name = "tw"
url = "{tw_url}"
format = "form"
auth = "basic"
auth_user = "herald"
auth_key = "k-tw"
from = "HERALD"
message_id_pointer = "/sid"
body = {{ To = "{{{{to}}}}", From = "{{{{from}}}}", Body = "{{{{content}}}}" }}

[[providers]]
name = "ib"
url = "{ib_url}"
format = "json"
auth_header = "Authorization"
auth_key = "App k-ib"
from = "InfoSMS"
message_id_pointer = "/messages/0/messageId"
body = {{ messages = [{{ destinations = [{{ to = "{{{{to_digits}}}}" }}], from = "{{{{from}}}}", text = "{{{{content}}}}" }}] }}

[[providers]]
name = "wa"
url = "{wa_url}"
format = "json"
auth = "bearer"
auth_key = "k-wa"
message_id_pointer = "/messages/0/id"
body = {{ messaging_product = "whatsapp", to = "{{{{to}}}}", type = "text", text = {{ body = "{{{{content}}}}" }} }}

[[routes]]
prefix = "+9055"
providers = ["tw"]

[[routes]]
prefix = "+90"
providers = ["ib"]

[[routes]]
prefix = ""
providers = ["wa"]
"#
    );
    let stack = Stack::start_routed(&providers, &[]).await;
    let mut expected: HashMap<String, (&str, String)> = HashMap::new();
    for (i, to) in [
        "+905551110001",
        "+905551110002",
        "+905321110001",
        "+905321110002",
        "+14155550101",
        "+14155550102",
    ]
    .iter()
    .enumerate()
    {
        let id = create(&stack, json!({"to": to, "content": format!("hello {i}")})).await;
        let provider = match &to[..5] {
            "+9055" => "tw",
            "+9053" => "ib",
            _ => "wa",
        };
        expected.insert(id, (provider, to.to_string()));
    }
    let pinned = create(
        &stack,
        json!({"to": "+14155550103", "content": "pinned", "provider": "tw"}),
    )
    .await;
    expected.insert(pinned.clone(), ("tw", "+14155550103".into()));
    let unknown = stack
        .client
        .post(format!("{}/api/messenger/messages", stack.api_url))
        .bearer_auth(crate::helpers::KEY)
        .json(&json!({"to": "+14155550104", "content": "x", "provider": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["internalCode"], 400018, "{body}");

    let scheduler = stack
        .routed_scheduler(&providers, &[("HERALD__JOB_SCHEDULER__BATCH_SIZE", "50")])
        .await;
    send_all(&stack, &scheduler, 7, Duration::from_secs(30)).await;

    let received = |log: &ReceivedLog| -> Vec<(String, String)> {
        log.snapshot()
            .into_iter()
            .map(|r| (r.idempotency_key.unwrap(), r.to))
            .collect()
    };
    let (tw_seen, ib_seen, wa_seen) = (received(&tw), received(&ib), received(&wa));
    assert_eq!((tw_seen.len(), ib_seen.len(), wa_seen.len()), (3, 2, 2));
    for (id, (provider, to)) in &expected {
        let message = stack.message(id).await;
        assert_eq!(message["status"], "sent", "{message}");
        assert_eq!(message["provider"], *provider, "{message}");
        let log = message["attemptsLog"].as_array().unwrap();
        assert_eq!(log.len(), 1, "{message}");
        assert_eq!(log[0]["provider"], *provider);
        assert_eq!(log[0]["kind"], "accepted");
        let mid = message["webhookMessageId"].as_str().unwrap();
        let (seen, shown_to) = match *provider {
            "tw" => {
                assert!(mid.starts_with("SM"), "{mid}");
                (&tw_seen, to.clone())
            }
            "ib" => {
                assert!(uuid::Uuid::parse_str(mid).is_ok(), "{mid}");
                (&ib_seen, to.trim_start_matches('+').to_owned())
            }
            _ => {
                assert!(mid.starts_with("wamid."), "{mid}");
                (&wa_seen, to.clone())
            }
        };
        assert!(
            seen.contains(&(id.clone(), shown_to)),
            "{provider} should have {id} to {to}: {seen:?}"
        );
    }
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn weights_split_a_route_within_five_points_over_two_thousand_messages() {
    let (a_url, a) = sink(0, 0.0).await;
    let (b_url, b) = sink(0, 0.0).await;
    let providers = herald_provider("a", &a_url, "")
        + &herald_provider("b", &b_url, "")
        + "[[routes]]\nprefix = \"\"\nproviders = [\"a\", \"b\"]\nweights = [70, 30]\n";
    let stack = Stack::start_routed(&providers, &[]).await;
    stack.seed(2000).await;
    let scheduler = stack.routed_scheduler(&providers, &DRAIN).await;
    send_all(&stack, &scheduler, 2000, Duration::from_secs(120)).await;
    let (to_a, to_b) = (per_message(&a), per_message(&b));
    println!("weights 70/30 over 2000: a {} b {}", to_a.len(), to_b.len());
    assert_eq!(to_a.len() + to_b.len(), 2000);
    assert!((1300..=1500).contains(&to_a.len()), "a got {} of 2000", to_a.len());
    assert!(to_a.values().chain(to_b.values()).all(|n| *n == 1));
    assert!(to_a.keys().all(|id| !to_b.contains_key(id)), "a message went to both");
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn a_primary_answering_503_fails_over_and_every_message_is_delivered_once() {
    let (p_url, p) = sink(0, 0.0).await;
    let (s_url, s) = sink(0, 0.0).await;
    set_behaviour(&p_url, json!({"failRate": 1.0, "status": 503})).await;
    let providers = herald_provider("primary", &p_url, "")
        + &herald_provider("secondary", &s_url, "")
        + "[[routes]]\nprefix = \"\"\nproviders = [\"primary\", \"secondary\"]\n";
    let stack = Stack::start_routed(&providers, &[]).await;
    let ids = stack.seed(40).await;
    let scheduler = stack.routed_scheduler(&providers, &DRAIN).await;
    send_all(&stack, &scheduler, 40, Duration::from_secs(60)).await;
    let delivered = per_message(&s);
    assert_eq!(delivered.len(), 40, "every message reached the secondary");
    assert!(delivered.values().all(|n| *n == 1), "none twice");
    assert!(per_message(&p).is_empty(), "the primary accepted nothing");
    let failed_on_primary = p.snapshot().len();
    assert!(failed_on_primary >= 1, "the primary was tried");
    let mut moved = 0;
    for id in &ids {
        let message = stack.message(id).await;
        assert_eq!(message["provider"], "secondary", "{message}");
        let log = message["attemptsLog"].as_array().unwrap();
        if log.len() == 2 {
            moved += 1;
            assert_eq!(
                (
                    log[0]["provider"].as_str(),
                    log[0]["kind"].as_str(),
                    log[0]["status"].as_u64()
                ),
                (Some("primary"), Some("retryable"), Some(503))
            );
            assert_eq!(log[1]["provider"], "secondary");
            assert_eq!(
                message["attempts"], 2,
                "a 503 may have been delivered: it is an attempt"
            );
        }
    }
    assert!(
        moved >= 1 && moved <= failed_on_primary,
        "{moved} retried on the secondary"
    );
    let stats = stack
        .http
        .get_json(&format!("{}/api/messenger/stats", stack.api_url))
        .await;
    let by_name = |name: &str| {
        stats["providers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_name("secondary")["sent"], 40, "{stats}");
    assert_eq!(
        by_name("primary")["failed"].as_u64(),
        Some(failed_on_primary as u64),
        "{stats}"
    );
    assert_eq!(by_name("primary")["lastFailure"]["status"], 503, "{stats}");
    assert!(by_name("secondary")["p99Ms"].as_u64().is_some(), "{stats}");
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn a_429_moves_traffic_at_once_without_an_attempt_and_it_comes_back_after_the_probe() {
    let (p_url, p) = sink(0, 0.0).await;
    let (s_url, s) = sink(0, 0.0).await;
    set_behaviour(
        &p_url,
        json!({"failRate": 0.0, "status": 429, "retryAfterSeconds": 2, "failNext": 1}),
    )
    .await;
    let providers = herald_provider("primary", &p_url, "")
        + &herald_provider("secondary", &s_url, "")
        + "[[routes]]\nprefix = \"\"\nproviders = [\"primary\", \"secondary\"]\n";
    let stack = Stack::start_routed(&providers, &[]).await;
    let first = stack.seed(10).await;
    let scheduler = stack
        .routed_scheduler(
            &providers,
            &[
                ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "10"),
                ("HERALD__JOB_SCHEDULER__CONCURRENCY", "1"),
            ],
        )
        .await;
    send_all(&stack, &scheduler, 10, Duration::from_secs(20)).await;
    let throttled = stack.message(&first[0]).await;
    let log = throttled["attemptsLog"].as_array().unwrap();
    assert_eq!(log.len(), 2, "{throttled}");
    assert_eq!(
        (log[0]["provider"].as_str(), log[0]["status"].as_u64()),
        (Some("primary"), Some(429))
    );
    assert_eq!(log[1]["provider"], "secondary");
    assert_eq!(throttled["attempts"], 1, "moving on from a 429 is no new attempt");
    assert_eq!(
        per_message(&s).len(),
        10,
        "the rest went to the secondary while the primary was paused"
    );
    let status = stack
        .http
        .get_json(&format!("{}/job-scheduler/messenger/is-working", scheduler.url))
        .await;
    assert_eq!(status["providers"][0]["state"], "paused", "{status}");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    stack.seed(10).await;
    send_all(&stack, &scheduler, 20, Duration::from_secs(20)).await;
    assert_eq!(
        per_message(&p).len(),
        10,
        "after the probe the primary takes its traffic back"
    );
    let status = stack
        .http
        .get_json(&format!("{}/job-scheduler/messenger/is-working", scheduler.url))
        .await;
    assert_eq!(status["providers"][0]["state"], "open", "{status}");
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn a_401_pauses_the_provider_as_misconfigured_and_its_messages_go_on() {
    let (p_url, p) = sink(0, 0.0).await;
    let (s_url, s) = sink(0, 0.0).await;
    let providers = format!("[[providers]]\nname = \"primary\"\nurl = \"{p_url}\"\nauth_key = \"a-wrong-key\"\n")
        + &herald_provider("secondary", &s_url, "")
        + "[[routes]]\nprefix = \"\"\nproviders = [\"primary\", \"secondary\"]\n";
    let stack = Stack::start_routed(&providers, &[]).await;
    let ids = stack.seed(5).await;
    let scheduler = stack
        .routed_scheduler(
            &providers,
            &[
                ("HERALD__JOB_SCHEDULER__BATCH_SIZE", "5"),
                ("HERALD__JOB_SCHEDULER__CONCURRENCY", "1"),
            ],
        )
        .await;
    send_all(&stack, &scheduler, 5, Duration::from_secs(20)).await;
    assert_eq!(p.snapshot().len(), 0, "the sink answers 401 before it records");
    assert_eq!(per_message(&s).len(), 5);
    let first = stack.message(&ids[0]).await;
    let kinds: Vec<&str> = first["attemptsLog"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["misconfigured", "accepted"], "{first}");
    assert_eq!(first["attempts"], 1);
    let stats = stack
        .http
        .get_json(&format!("{}/api/messenger/stats", stack.api_url))
        .await;
    let primary = &stats["providers"][0];
    assert_eq!(primary["name"], "primary");
    assert_eq!(primary["state"], "misconfigured", "{stats}");
    assert!(primary["reason"].as_str().unwrap().contains("401"), "{stats}");
    assert_eq!(primary["lastFailure"]["kind"], "misconfigured", "{stats}");
    let metrics = stack.http.open_text(&format!("{}/metrics", scheduler.url)).await;
    assert!(
        metrics.contains("herald_provider_pauses_total{provider=\"primary\",reason=\"misconfigured\"} 1"),
        "{metrics}"
    );
    scheduler.shutdown().await.unwrap();
    stack.cleanup().await;
}

#[tokio::test]
async fn each_provider_keeps_its_own_rate_limit_across_three_replicas() {
    let (a_url, a) = sink(0, 0.0).await;
    let (b_url, b) = sink(0, 0.0).await;
    let providers = herald_provider("a", &a_url, "rate_limit_per_second = 30\nrate_limit_burst = 3")
        + &herald_provider("b", &b_url, "rate_limit_per_second = 15\nrate_limit_burst = 2")
        + "[[routes]]\nprefix = \"\"\nproviders = [\"a\", \"b\"]\nweights = [1, 1]\n";
    let stack = Stack::start_routed(&providers, &[]).await;
    stack.seed(300).await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(stack.routed_scheduler(&providers, &DRAIN).await);
    }
    eventually(Duration::from_secs(90), "all 300 sent", || async {
        stack.count("sent").await == 300
    })
    .await;
    for replica in replicas {
        replica.shutdown().await.unwrap();
    }
    let window = Duration::from_secs(5);
    for (name, log, rate, burst) in [("a", &a, 30.0, 3), ("b", &b, 15.0, 2)] {
        let times: Vec<_> = log.snapshot().iter().map(|r| r.received_at).collect();
        let most = busiest(&times, window);
        let allowed = most_allowed(rate, burst, window);
        println!(
            "provider {name}: {} requests, at most {most} in {window:?} (allowed {allowed})",
            times.len()
        );
        assert!(most <= allowed, "{name}: saw {most} in {window:?}, allowed {allowed}");
    }
    let (to_a, to_b) = (per_message(&a), per_message(&b));
    assert_eq!(to_a.len() + to_b.len(), 300);
    assert!(to_a.values().chain(to_b.values()).all(|n| *n == 1));
    stack.cleanup().await;
}

/// Each preset of `configs/providers/` loads as it ships and, pointed at a stand-in speaking its
/// provider's shape with its credentials, gets its message accepted and its id read.
#[tokio::test]
async fn every_shipped_provider_preset_speaks_its_providers_shape() {
    let dir = herald_core::testing::configs_dir().join("providers");
    for (file, format, user, key, id_prefix) in [
        (
            "twilio.toml",
            SinkFormat::Twilio,
            "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
            "your-twilio-auth-token",
            "SM",
        ),
        (
            "vonage.toml",
            SinkFormat::Vonage,
            "your-vonage-api-key",
            "your-vonage-api-secret",
            "",
        ),
        ("infobip.toml", SinkFormat::Infobip, "", "your-infobip-api-key", ""),
        (
            "whatsapp.toml",
            SinkFormat::Whatsapp,
            "",
            "your-whatsapp-access-token",
            "wamid.",
        ),
    ] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let mut config = herald_webhook_sink::SinkConfig::local(key, 0, 0.0);
        config.format = format;
        config.auth_user = user.into();
        let (url, log) = herald_webhook_sink::WebhookSink::spawn(config).await.unwrap();
        let local: String = text
            .lines()
            .map(|line| {
                if line.starts_with("url = ") {
                    format!("url = \"{url}\"")
                } else {
                    line.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let env = test_support::TestEnv::new().await.unwrap();
        let settings = herald_core::testing::with_providers(
            herald_core::testing::settings_for(&env, &[("HERALD__JOB_SCHEDULER__LEASE_SECONDS", "30")]),
            &local,
        );
        let routing = settings.routing().unwrap();
        let provider = &routing.providers()[0];
        let client = webhook_client::WebhookClient::new(provider.webhook.clone()).unwrap();
        let outcome = client
            .send("65f0c0de0000000000000001", "+905551234567", "hello from a preset")
            .await;
        let webhook_client::DeliveryOutcome::Accepted {
            message_id: Some(id), ..
        } = outcome
        else {
            panic!("{file}: {outcome:?}");
        };
        assert!(id.starts_with(id_prefix), "{file}: {id}");
        let seen = log.snapshot();
        assert_eq!(seen.len(), 1, "{file}");
        assert_eq!(seen[0].content, "hello from a preset", "{file}");
        assert!(seen[0].to.ends_with("905551234567"), "{file}: {}", seen[0].to);
        assert_eq!(seen[0].message_id.as_deref(), Some(id.as_str()), "{file}");
        env.cleanup().await.unwrap();
    }
}
