//! What the examples that run real `herald` processes share: a stack of processes on free
//! ports over a fresh database and Redis prefix, and reading CPU and memory from /proc.
//! Included with `#[path = "common/stack.rs"] mod stack;`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use herald_core::testing::TEST_KEY;
use test_support::{Http, TestEnv};

pub fn herald_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.join("target/release/herald")
}

/// Where a process's stderr goes: `<STACK_LOGS>/<name>.log` when `STACK_LOGS` names a
/// directory (to read what the processes said), else nowhere.
fn log_to(name: &str) -> Stdio {
    std::env::var_os("STACK_LOGS")
        .and_then(|dir| std::fs::File::create(PathBuf::from(dir).join(format!("{name}.log"))).ok())
        .map_or_else(Stdio::null, Stdio::from)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// CPU time (user + system) of a process, in milliseconds.
pub fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks * 10.0 // 100 ticks per second
}

/// Peak resident memory of a process, in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// Resident memory of a process now, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// A kB field of `/proc/<pid>/status`, in MiB (NaN when the process is gone).
fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

pub fn database_pid() -> Option<u32> {
    let out = Command::new("pgrep").args(["-f", "secantusd|mongod"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()
}

/// A `herald` process, killed when dropped.
pub struct Proc {
    pub name: String,
    pub role: String,
    pub extra: Vec<(String, String)>,
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One scenario's processes and environment.
pub struct Stack {
    pub env: TestEnv,
    pub vars: Vec<(String, String)>,
    pub api: String,
    pub sink: String,
    pub procs: Vec<Proc>,
}

impl Stack {
    pub async fn start(extra: &[(&str, String)]) -> Self {
        let env = TestEnv::new().await.expect("run build/local-services.sh up first");
        let (api_port, sched_port, sink_port) = (free_port(), free_port(), free_port());
        let api = format!("http://127.0.0.1:{api_port}");
        let sink = format!("http://127.0.0.1:{sink_port}");
        let mut vars: Vec<(String, String)> = [
            ("HERALD_ENV", "test".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
            ("HERALD__MONGO__URI", test_support::mongo_uri()),
            ("HERALD__MONGO__DATABASE", env.database.clone()),
            ("HERALD__REDIS__URL", test_support::redis_url()),
            ("HERALD__REDIS__KEY_PREFIX", env.key_prefix.clone()),
            ("HERALD__MESSENGER_API__PORT", api_port.to_string()),
            ("HERALD__MESSENGER_API__URL", api.clone()),
            ("HERALD__JOB_SCHEDULER__PORT", sched_port.to_string()),
            ("HERALD__JOB_SCHEDULER__URL", format!("http://127.0.0.1:{sched_port}")),
            ("HERALD__WEBHOOK_SINK__PORT", sink_port.to_string()),
            ("HERALD__WEBHOOK__URL", format!("{sink}/webhook")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        vars.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let mut stack = Self {
            env,
            vars,
            api,
            sink,
            procs: Vec::new(),
        };
        stack.spawn("api", "messenger-api", &[]);
        stack.spawn("sink", "webhook-sink", &[]);
        stack.wait(&format!("{}/messenger/health", stack.api)).await;
        stack.wait(&format!("{}/webhook-sink/health", stack.sink)).await;
        stack
    }

    pub fn spawn(&mut self, name: &str, role: &str, extra: &[(String, String)]) {
        let child = Command::new(herald_binary())
            .arg(role)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.vars.iter().cloned())
            .envs(extra.iter().cloned())
            .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
            .stdout(Stdio::null())
            .stderr(log_to(name))
            .spawn()
            .expect("cargo build --release --bin herald first");
        self.procs.push(Proc {
            name: name.to_owned(),
            role: role.to_owned(),
            extra: extra.to_vec(),
            child,
        });
    }

    /// SIGKILL of the process named `name`; it is gone when this returns.
    pub fn kill(&mut self, name: &str) {
        if let Some(proc) = self.procs.iter_mut().find(|p| p.name == name) {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
    }

    /// Starts the process named `name` again, with the same role and settings.
    pub fn restart(&mut self, name: &str) {
        let Some(index) = self.procs.iter().position(|p| p.name == name) else {
            return;
        };
        let old = self.procs.remove(index);
        let (role, extra) = (old.role.clone(), old.extra.clone());
        drop(old);
        self.spawn(name, &role, &extra);
    }

    pub fn replicas(&mut self, n: usize) {
        for i in 0..n {
            let port = [("HERALD__JOB_SCHEDULER__PORT".to_owned(), free_port().to_string())];
            self.spawn(&format!("scheduler-{}", i + 1), "job-scheduler", &port);
        }
    }

    pub async fn wait(&self, url: &str) {
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if client.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{url} never answered");
    }

    /// Requests the provider received so far (polled without loading the database).
    pub async fn delivered(&self, http: &Http) -> u64 {
        let count = http
            .open_json(&format!("{}/webhook-sink/received/count", self.sink))
            .await;
        count["count"].as_u64().unwrap_or(0)
    }

    pub async fn sent_count(&self, http: &Http) -> u64 {
        let stats = http.get_json(&format!("{}/api/messenger/stats", self.api)).await;
        stats["counts"]["sent"].as_u64().unwrap_or(0)
    }

    /// Every idempotency key the provider received, with how often.
    pub async fn received(&self) -> HashMap<String, usize> {
        let list = Http::new(TEST_KEY)
            .open_json(&format!("{}/webhook-sink/received", self.sink))
            .await;
        let mut counts = HashMap::new();
        for r in list.as_array().unwrap() {
            *counts
                .entry(r["idempotencyKey"].as_str().unwrap_or("").to_owned())
                .or_insert(0) += 1;
        }
        counts
    }

    pub fn pids(&self) -> Vec<(String, u32)> {
        let mut pids: Vec<(String, u32)> = self.procs.iter().map(|p| (p.name.clone(), p.child.id())).collect();
        if let Some(db) = database_pid() {
            pids.push(("database".to_owned(), db));
        }
        pids
    }

    pub async fn cleanup(mut self) {
        self.procs.clear();
        self.env.cleanup().await.unwrap();
    }
}
