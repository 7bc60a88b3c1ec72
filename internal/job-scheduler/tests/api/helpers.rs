use std::sync::Arc;
use std::time::Duration;

use herald_core::Settings;
use herald_job_scheduler::control::JobControl;
use herald_webhook_sink::{ReceivedLog, SinkConfig, WebhookSink};
use serde_json::{json, Value};
use test_support::TestEnv;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const KEY: &str = "test-api-key";
/// A schedule that never fires during a test: runs are driven with `run_once`.
pub const NEVER: &str = "0 0 0 1 1 * 2099";

/// The Messenger API running in-process on one test's database, plus a client for it.
pub struct Stack {
    pub env: TestEnv,
    pub api_url: String,
    pub client: reqwest::Client,
    stops: Vec<oneshot::Sender<()>>,
}

pub struct Scheduler {
    pub control: Arc<JobControl>,
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<std::io::Result<()>>,
}

fn settings(env: &TestEnv, extra: &[(&str, &str)]) -> Settings {
    herald_core::testing::test_settings(
        &test_support::mongo_uri(),
        &env.database,
        &test_support::redis_url(),
        &env.key_prefix,
        extra,
    )
}

impl Stack {
    pub async fn start(extra: &[(&str, &str)]) -> Self {
        let env = TestEnv::new().await.expect("test servers");
        let api = herald_messenger_api::Application::build(&settings(&env, extra))
            .await
            .expect("messenger api");
        let api_url = format!("http://127.0.0.1:{}", api.port());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(api.run_until_stopped(async move {
            let _ = rx.await;
        }));
        Self {
            env,
            api_url,
            client: reqwest::Client::new(),
            stops: vec![tx],
        }
    }

    /// A scheduler replica wired to this stack's API and to `webhook_url`.
    pub async fn scheduler(&self, webhook_url: &str, extra: &[(&str, &str)]) -> Scheduler {
        let mut all = vec![
            ("HERALD__MESSENGER_API__URL", self.api_url.as_str()),
            ("HERALD__WEBHOOK__URL", webhook_url),
            ("HERALD__JOB_SCHEDULER__SCHEDULE", NEVER),
        ];
        all.extend_from_slice(extra);
        let app = herald_job_scheduler::Application::build(&settings(&self.env, &all))
            .await
            .expect("scheduler");
        let url = format!("http://127.0.0.1:{}", app.port());
        let control = app.control();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        Scheduler {
            control,
            url,
            stop: Some(tx),
            handle,
        }
    }

    pub async fn seed(&self, n: usize) -> Vec<String> {
        let messages: Vec<Value> = (0..n)
            .map(|i| json!({"to": format!("+90555{:07}", i), "content": format!("message {i}")}))
            .collect();
        let response = self
            .client
            .post(format!("{}/api/messenger/messages/batch", self.api_url))
            .bearer_auth(KEY)
            .json(&json!({"messages": messages}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// GET an open `url` (no key), answered with text.
    pub async fn open_text(&self, url: &str) -> String {
        self.client.get(url).send().await.unwrap().text().await.unwrap()
    }

    /// GET an open `url` (no key), answered with JSON.
    pub async fn open_json(&self, url: &str) -> Value {
        self.client.get(url).send().await.unwrap().json().await.unwrap()
    }

    /// GET `url` with the key, answered with JSON.
    pub async fn get_json(&self, url: &str) -> Value {
        self.client
            .get(url)
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn message(&self, id: &str) -> Value {
        self.get_json(&format!("{}/api/messenger/messages/{id}", self.api_url))
            .await
    }

    pub async fn count(&self, status: &str) -> u64 {
        let page = self
            .get_json(&format!(
                "{}/api/messenger/messages?status={status}&limit=1",
                self.api_url
            ))
            .await;
        page["total"].as_u64().unwrap()
    }

    pub async fn cleanup(self) {
        for stop in self.stops {
            let _ = stop.send(());
        }
        self.env.cleanup().await.expect("cleanup");
    }
}

impl Scheduler {
    /// Signals shutdown and waits for the drain.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.handle.await.expect("scheduler task")
    }
}

/// A provider stand-in (the project's own sink) on a free port.
pub async fn sink(latency_ms: u64, fail_rate: f64) -> (String, ReceivedLog) {
    WebhookSink::spawn(SinkConfig::local("local-dev-webhook-key", latency_ms, fail_rate))
        .await
        .unwrap()
}

/// Waits until `check` holds, polling; panics with `what` after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
