use herald_job_scheduler::control::JobControl;
use herald_webhook_sink::{ReceivedLog, SinkConfig, WebhookSink};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use test_support::{Http, TestEnv};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use herald_core::testing::TEST_KEY as KEY;
pub use test_support::eventually;
/// A schedule that never fires during a test: runs are driven with `run_once`.
pub const NEVER: &str = "0 0 0 1 1 * 2099";

/// The Messenger API running in-process on one test's database, plus a client for it.
pub struct Stack {
    pub env: TestEnv,
    pub api_url: String,
    pub client: reqwest::Client,
    pub http: Http,
    stops: Vec<oneshot::Sender<()>>,
}

pub struct Scheduler {
    pub control: Arc<JobControl>,
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<std::io::Result<()>>,
}

use herald_core::testing::settings_for as settings;

impl Stack {
    pub async fn start(extra: &[(&str, &str)]) -> Self {
        let env = TestEnv::new().await.expect("test servers");
        let settings = settings(&env, extra);
        Self::start_with(env, settings).await
    }

    /// The API knowing the `[[providers]]` and `[[routes]]` of `providers` (TOML), so messages
    /// may pin one and the stats show each.
    pub async fn start_routed(providers: &str, extra: &[(&str, &str)]) -> Self {
        let env = TestEnv::new().await.expect("test servers");
        let settings = herald_core::testing::with_providers(settings(&env, extra), providers);
        Self::start_with(env, settings).await
    }

    pub async fn start_with(env: TestEnv, settings: herald_core::Settings) -> Self {
        let api = herald_messenger_api::Application::build(&settings)
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
            http: Http::new(KEY),
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
        self.scheduler_with(settings(&self.env, &all)).await
    }

    /// A scheduler replica wired to this stack's API, sending to the `[[providers]]` and
    /// `[[routes]]` of `providers` (TOML).
    pub async fn routed_scheduler(&self, providers: &str, extra: &[(&str, &str)]) -> Scheduler {
        let mut all = vec![
            ("HERALD__MESSENGER_API__URL", self.api_url.as_str()),
            ("HERALD__JOB_SCHEDULER__SCHEDULE", NEVER),
        ];
        all.extend_from_slice(extra);
        let settings = herald_core::testing::with_providers(settings(&self.env, &all), providers);
        self.scheduler_with(settings).await
    }

    pub async fn scheduler_with(&self, settings: herald_core::Settings) -> Scheduler {
        let app = herald_job_scheduler::Application::build(&settings)
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
        herald_core::testing::seed_messages(&self.http, &self.api_url, n).await
    }

    pub async fn message(&self, id: &str) -> Value {
        self.http
            .get_json(&format!("{}/api/messenger/messages/{id}", self.api_url))
            .await
    }

    pub async fn count(&self, status: &str) -> u64 {
        let page = self
            .http
            .get_json(&format!(
                "{}/api/messenger/messages?status={status}&limit=1&withTotal=true",
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

/// A stand-in speaking `format` with key `key` (user `herald` for basic auth) on a free port.
pub async fn shaped_sink(format: herald_webhook_sink::SinkFormat, key: &str) -> (String, ReceivedLog) {
    let mut config = SinkConfig::local(key, 0, 0.0);
    config.format = format;
    config.auth_user = "herald".into();
    WebhookSink::spawn(config).await.unwrap()
}

/// Changes how a sink at `webhook_url` answers (`PUT /webhook-sink/behaviour`).
pub async fn set_behaviour(webhook_url: &str, behaviour: Value) {
    let response = reqwest::Client::new()
        .put(webhook_url.replace("/webhook", "/webhook-sink/behaviour"))
        .json(&behaviour)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

pub use test_support::PrivateRedis;

/// The most requests that arrived within any `window`, from their receive times.
pub fn busiest(times: &[chrono::DateTime<chrono::Utc>], window: Duration) -> usize {
    let window = chrono::Duration::from_std(window).unwrap();
    let mut sorted = times.to_vec();
    sorted.sort();
    let mut most = 0;
    let mut start = 0;
    for end in 0..sorted.len() {
        while sorted[end] - sorted[start] >= window {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    most
}

/// The most a limit of `per_second` with `burst` lets arrive within `window`, measured where
/// the requests arrive: a send leaves on its slot but reaches the provider up to `ARRIVAL_JITTER`
/// later (a loaded two-core machine delays wake-ups and requests), so a window of arrivals can
/// hold the slots of a window that much wider.
pub fn most_allowed(per_second: f64, burst: u32, window: Duration) -> usize {
    (per_second * (window + ARRIVAL_JITTER).as_secs_f64()).floor() as usize + burst as usize
}

/// How late a send may reach the provider after its slot in these tests.
pub const ARRIVAL_JITTER: Duration = Duration::from_millis(500);

/// Each message the provider saw, with how often.
pub fn deliveries(log: &ReceivedLog) -> std::collections::HashMap<String, usize> {
    let mut seen = std::collections::HashMap::new();
    for r in log.snapshot() {
        *seen.entry(r.idempotency_key.unwrap_or_default()).or_default() += 1;
    }
    seen
}
