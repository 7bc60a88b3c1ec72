use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::helpers::{herald, stack};

#[test]
fn help_lists_every_subcommand() {
    let output = herald(&HashMap::new()).arg("--help").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    for sub in ["messenger-api", "job-scheduler", "webhook-sink", "seed", "openapi"] {
        assert!(text.contains(sub), "{sub} missing from --help:\n{text}");
    }
    for sub in ["messenger-api", "job-scheduler", "webhook-sink", "seed", "openapi"] {
        let help = herald(&HashMap::new()).args([sub, "--help"]).output().unwrap();
        let text = String::from_utf8(help.stdout).unwrap();
        assert!(
            text.contains("--config-dir") && text.contains("--env"),
            "{sub}:\n{text}"
        );
    }
}

#[test]
fn a_bad_configuration_value_exits_non_zero_with_one_line_naming_the_key() {
    for (key, value, named) in [
        ("HERALD__MESSENGER_API__PORT", "abc", "messenger_api.port"),
        (
            "HERALD__JOB_SCHEDULER__LEASE_SECONDS",
            "5",
            "job_scheduler.lease_seconds",
        ),
        (
            "HERALD__JOB_SCHEDULER__SCHEDULE",
            "every minute",
            "job_scheduler.schedule",
        ),
        // Found at start-up, not at the first send (where it failed every message for good).
        ("HERALD__WEBHOOK__AUTH_KEY", "two\nlines", "webhook.auth_key"),
    ] {
        let vars = HashMap::from([(key.to_owned(), value.to_owned())]);
        for sub in ["messenger-api", "job-scheduler"] {
            let output = herald(&vars).arg(sub).output().unwrap();
            assert!(!output.status.success(), "{sub} {key}={value} started");
            let stderr = String::from_utf8(output.stderr).unwrap();
            let lines: Vec<&str> = stderr.lines().collect();
            assert_eq!(lines.len(), 1, "{stderr}");
            assert!(lines[0].contains(named), "{stderr}");
        }
    }
    let missing = herald(&HashMap::new())
        .args(["--env", "staging", "messenger-api"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8(missing.stderr).unwrap().contains("staging.toml"));
}

#[test]
fn outside_the_repository_the_built_in_configuration_is_used_and_config_check_prints_it() {
    let elsewhere = std::env::temp_dir().join(format!("herald-cli-elsewhere-{}", std::process::id()));
    std::fs::create_dir_all(&elsewhere).unwrap();
    let vars = HashMap::from([
        ("HERALD__WEBHOOK__AUTH_KEY".to_owned(), "zq-hook-secret".to_owned()),
        (
            "HERALD__MONGO__URI".to_owned(),
            "mongodb://app:zq-pw@db:27017".to_owned(),
        ),
    ]);
    let output = herald(&vars)
        .current_dir(&elsewhere)
        .args(["config", "check"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("default.toml (built in)"), "{stdout}");
    assert!(stdout.contains("test.toml (built in)"), "{stdout}");
    assert!(
        stdout.contains("environment: HERALD__MONGO__URI, HERALD__WEBHOOK__AUTH_KEY"),
        "{stdout}"
    );
    assert!(!stdout.contains("zq-"), "a secret was printed:\n{stdout}");
    assert!(
        stdout.contains(r#"uri = "mongodb://app:<redacted>@db:27017""#),
        "{stdout}"
    );
    assert!(stdout.contains(r#"auth_key = "<redacted>""#), "{stdout}");

    // From the repository, the files in configs/ are read over the built-in ones.
    let output = herald(&HashMap::new()).args(["config", "check"]).output().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.contains("configs/default.toml\n") && stdout.contains("configs/test.toml\n"),
        "{stdout}"
    );

    // A bad value: non-zero, one line naming the key, nothing on stdout.
    let bad = HashMap::from([("HERALD__JOB_SCHEDULER__BATCH_SIZE".to_owned(), "0".to_owned())]);
    let output = herald(&bad)
        .current_dir(&elsewhere)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("job_scheduler.batch_size"), "{stderr}");
    std::fs::remove_dir_all(&elsewhere).unwrap();
}

#[test]
fn the_committed_openapi_documents_are_current() {
    let output = herald(&HashMap::new())
        .args(["openapi", "--out-dir", "docs/openapi", "--check"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[tokio::test]
async fn both_services_answer_their_probes_and_exit_0_on_sigterm_within_two_seconds() {
    let stack = stack(&[]).await;
    let mut api = stack.spawn("messenger-api", &["messenger-api"]);
    let mut scheduler = stack.spawn("job-scheduler", &["job-scheduler"]);
    stack.wait_healthy(&format!("{}/messenger/health", stack.api)).await;
    stack
        .wait_healthy(&format!("{}/job-scheduler/health", stack.scheduler))
        .await;
    for url in [
        format!("{}/messenger/ready", stack.api),
        format!("{}/job-scheduler/ready", stack.scheduler),
    ] {
        let response = stack.client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["checks"]["mongodb"]["status"], "up", "{url}: {body}");
    }
    for (proc, name) in [(&mut api, "messenger-api"), (&mut scheduler, "job-scheduler")] {
        proc.signal("TERM");
        let status = proc
            .wait_exit(Duration::from_secs(2))
            .unwrap_or_else(|| panic!("{name} still running 2 s after SIGTERM"));
        assert!(status.success(), "{name} exited with {status}");
    }
    stack.cleanup().await;
}

#[tokio::test]
async fn seeding_a_fresh_database_leaves_its_counts_exact() {
    // `herald seed` then `herald messenger-api`: the API must not have to recount what was
    // seeded (at a million that is a full read of the collection per status).
    let stack = stack(&[]).await;
    let seeded = stack.command(&["seed", "--count", "25"]).output().unwrap();
    assert!(seeded.status.success(), "{}", String::from_utf8_lossy(&seeded.stderr));
    let counts = stack.env.db().collection::<bson::Document>("message_counts");
    let kept = counts.find_one(bson::doc! {}).await.unwrap().expect("counts kept");
    assert_eq!(
        (kept.get_bool("exact").ok(), kept.get_i64("pending").ok()),
        (Some(true), Some(25)),
        "{kept}"
    );
    stack.cleanup().await;
}

#[tokio::test]
async fn end_to_end_ten_seeded_messages_are_all_sent_and_listed() {
    let stack = stack(&[("HERALD__JOB_SCHEDULER__SCHEDULE", "*/1 * * * * *")]).await;
    let _sink = stack.spawn("webhook-sink", &["webhook-sink"]);
    let _api = stack.spawn("messenger-api", &["messenger-api"]);
    stack.wait_healthy(&format!("{}/messenger/health", stack.api)).await;
    stack.wait_healthy(&format!("{}/webhook-sink/health", stack.sink)).await;
    let seeded = stack.command(&["seed", "--count", "10"]).output().unwrap();
    assert!(seeded.status.success(), "{}", String::from_utf8_lossy(&seeded.stderr));
    let _scheduler = stack.spawn("job-scheduler", &["job-scheduler"]);

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let sent = loop {
        let page = stack
            .get_json(&format!(
                "{}/api/messenger/messages/sent?limit=100&withTotal=true",
                stack.api
            ))
            .await;
        if page["total"] == 10 {
            break page;
        }
        assert!(std::time::Instant::now() < deadline, "not all sent: {page}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let items = sent["items"].as_array().unwrap();
    assert!(items
        .iter()
        .all(|m| m["webhookMessageId"].is_string() && m["sentAt"].is_string()));
    let received = stack.received().await;
    let keys: HashSet<&str> = received.iter().map(|r| r["idempotencyKey"].as_str().unwrap()).collect();
    assert_eq!((received.len(), keys.len()), (10, 10));
    stack.cleanup().await;
}

#[test]
fn every_service_subcommand_has_ide_run_configurations() {
    let root = crate::helpers::repo_root();
    let launch: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join(".vscode/launch.json")).unwrap()).unwrap();
    let configs = launch["configurations"].as_array().unwrap();
    for sub in ["messenger-api", "job-scheduler", "webhook-sink"] {
        assert!(
            configs
                .iter()
                .any(|c| c["args"][0] == sub && c["cwd"] == "${workspaceFolder}"),
            "no VS Code launch configuration runs `herald {sub}`"
        );
        let xml = std::fs::read_to_string(root.join(format!(".run/herald {sub}.run.xml"))).unwrap();
        assert!(
            xml.contains(&format!("run --bin herald -- {sub}")),
            "JetBrains run configuration for {sub}"
        );
        // The subcommand it names really exists.
        let help = herald(&HashMap::new()).args([sub, "--help"]).output().unwrap();
        assert!(help.status.success(), "herald {sub} --help");
    }
}

/// `herald doctor` against the test servers: MongoDB reachable with change streams, Redis, the
/// API answering once it runs; and a MongoDB that is not there fails it, within its bounds.
#[tokio::test]
async fn doctor_checks_what_the_configuration_points_at() {
    let stack = stack(&[]).await;
    let doctor = |extra: &[(&str, &str)]| {
        let mut command = stack.command(&["doctor"]);
        command.envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        command.output().unwrap()
    };
    let before = doctor(&[]);
    let text = String::from_utf8_lossy(&before.stdout).into_owned();
    assert!(before.status.success(), "{text}");
    assert!(
        text.contains("[ok  ] mongodb") && text.contains("change streams open"),
        "{text}"
    );
    assert!(text.contains("[ok  ] redis"), "{text}");
    assert!(text.contains("[warn] messenger-api"), "not started yet: {text}");
    assert!(text.contains("no messages collection yet"), "a fresh database: {text}");
    assert!(text.contains("[ok  ] routes         (default) → default"), "{text}");

    let _api = stack.spawn("messenger-api", &["messenger-api"]);
    stack.wait_healthy(&format!("{}/messenger/health", stack.api)).await;
    let text = String::from_utf8_lossy(&doctor(&[]).stdout).into_owned();
    assert!(text.contains("[ok  ] messenger-api"), "{text}");
    assert!(
        text.contains("[ok  ] mongodb        indexes of messages present and matching: claim,"),
        "the API made them: {text}"
    );
    assert!(text.contains("members: "), "{text}");
    assert!(
        text.contains("[ok  ] providers      default → http://127.0.0.1:"),
        "resolves: {text}"
    );

    // An index under Herald's name with other keys (made by hand, or by an older build) fails
    // it: the API could not create its own under that name.
    let other = format!("{}_drifted", stack.env.database);
    let model = mongodb::IndexModel::builder()
        .keys(bson::doc! {"status": 1, "next_attempt_at": 1})
        .options(
            mongodb::options::IndexOptions::builder()
                .name("claim".to_owned())
                .build(),
        )
        .build();
    stack
        .env
        .mongo
        .database(&other)
        .collection::<bson::Document>("messages")
        .create_index(model)
        .await
        .unwrap();
    let drifted = doctor(&[("HERALD__MONGO__DATABASE", other.as_str())]);
    let text = String::from_utf8_lossy(&drifted.stdout).into_owned();
    stack.env.mongo.database(&other).drop().await.unwrap();
    assert!(!drifted.status.success(), "{text}");
    assert!(
        text.contains("[FAIL] mongodb        indexes of messages differ: claim has"),
        "{text}"
    );

    let closed = format!("mongodb://127.0.0.1:{}", crate::helpers::free_port());
    let started = std::time::Instant::now();
    let broken = doctor(&[
        ("HERALD__MONGO__URI", closed.as_str()),
        ("HERALD__MONGO__SERVER_SELECTION_TIMEOUT_MS", "500"),
    ]);
    let text = String::from_utf8_lossy(&broken.stdout).into_owned();
    assert!(!broken.status.success(), "{text}");
    assert!(text.contains("[FAIL] mongodb"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(15), "bounded");
    stack.cleanup().await;
}
