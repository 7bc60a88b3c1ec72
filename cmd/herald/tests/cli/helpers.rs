use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use herald_core::testing::TEST_KEY as KEY;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `herald` with the test environment and nothing inherited from the caller's `HERALD__*`.
pub fn herald(vars: &HashMap<String, String>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command.current_dir(repo_root());
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("HERALD")) {
        command.env_remove(key);
    }
    command.env("HERALD_ENV", "test").envs(vars);
    command
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Proc {
    pub fn spawn(name: &'static str, mut command: Command) -> Self {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self { child, name }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.name);
    }

    /// Waits for exit at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's database, prefix and ports, as environment variables for every process.
pub struct Stack {
    pub env: test_support::TestEnv,
    pub vars: HashMap<String, String>,
    pub api: String,
    pub scheduler: String,
    pub sink: String,
    pub client: reqwest::Client,
}

impl Stack {
    pub async fn new(extra: &[(&str, &str)]) -> Self {
        let env = test_support::TestEnv::new().await.unwrap();
        let (api_port, scheduler_port, sink_port) = (free_port(), free_port(), free_port());
        let api = format!("http://127.0.0.1:{api_port}");
        let scheduler = format!("http://127.0.0.1:{scheduler_port}");
        let sink = format!("http://127.0.0.1:{sink_port}");
        let mut vars: HashMap<String, String> = [
            ("HERALD__MONGO__URI", test_support::mongo_uri()),
            ("HERALD__MONGO__DATABASE", env.database.clone()),
            ("HERALD__REDIS__URL", test_support::redis_url()),
            ("HERALD__REDIS__KEY_PREFIX", env.key_prefix.clone()),
            ("HERALD__MESSENGER_API__PORT", api_port.to_string()),
            ("HERALD__MESSENGER_API__URL", api.clone()),
            ("HERALD__JOB_SCHEDULER__PORT", scheduler_port.to_string()),
            ("HERALD__JOB_SCHEDULER__URL", scheduler.clone()),
            ("HERALD__WEBHOOK_SINK__PORT", sink_port.to_string()),
            ("HERALD__WEBHOOK__URL", format!("{sink}/webhook")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            vars.insert((*k).to_owned(), (*v).to_owned());
        }
        Self {
            env,
            vars,
            api,
            scheduler,
            sink,
            client: reqwest::Client::new(),
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = herald(&self.vars);
        command.args(args);
        command
    }

    pub fn spawn(&self, name: &'static str, args: &[&str]) -> Proc {
        Proc::spawn(name, self.command(args))
    }

    pub async fn wait_healthy(&self, url: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(response) = self.client.get(url).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "{url} never became healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn get_json(&self, url: &str) -> Value {
        test_support::Http::new(KEY).get_json(url).await
    }

    pub async fn received(&self) -> Vec<Value> {
        let list: Value = self.get_json(&format!("{}/webhook-sink/received", self.sink)).await;
        list.as_array().cloned().unwrap_or_default()
    }

    pub async fn cleanup(self) {
        self.env.cleanup().await.unwrap();
    }
}
