//! Real `herald` processes over one fresh database and Redis key prefix, on free ports: what
//! the CLI tests, the chaos campaign and every benchmark that runs whole processes start.
//!
//! [`ProcessStack::new`] only lays out the environment (every process gets the same
//! `HERALD__*` variables, nothing inherited from the caller's); [`ProcessStack::spawn`] starts
//! one process and hands it back, [`ProcessStack::start`] keeps it in the stack by name so it
//! can be killed and restarted. Processes are killed when dropped. A process's stderr goes to
//! `<STACK_LOGS>/<name>.log` when `STACK_LOGS` names a directory, else nowhere.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::{Http, TestEnv};

use super::TEST_KEY;

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The release build of `herald` (`cargo build --release --bin herald` makes it).
pub fn release_binary() -> PathBuf {
    repo_root().join("target/release/herald")
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// A running HAProxy (Debian's package) in front of Messenger API processes, stopped when
/// dropped.
pub struct Balancer(Child);

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HAProxy on `127.0.0.1:port` balancing over the API processes on `backends` (loopback
/// ports), with the project's own configuration (`build/haproxy/haproxy.cfg.template`); `None`
/// when HAProxy is not installed.
pub fn haproxy(port: u16, backends: &[u16]) -> Option<Balancer> {
    let binary = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    let template = std::fs::read_to_string(repo_root().join("build/haproxy/haproxy.cfg.template")).ok()?;
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, p)| format!("    server api{} 127.0.0.1:{p} check\n", i + 1))
        .collect();
    let config = template
        .replace("@BIND@", &format!("127.0.0.1:{port}"))
        .replace("@SERVERS@", &servers);
    let path = std::env::temp_dir().join(format!("herald-haproxy-{port}.cfg"));
    std::fs::write(&path, config).ok()?;
    let child = Command::new(binary)
        .args(["-db", "-f"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some(Balancer(child))
}

/// What this machine is, for the line above a benchmark's table: cores, CPU model, kernel.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|_| "unknown kernel".to_owned());
    format!("machine: {cores} cores, {cpu}, Linux {kernel}")
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

/// The pid of the database server on this machine, if one runs.
pub fn database_pid() -> Option<u32> {
    let out = Command::new("pgrep").args(["-f", "secantusd|mongod"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()
}

fn log_to(name: &str) -> Stdio {
    std::env::var_os("STACK_LOGS")
        .and_then(|dir| std::fs::File::create(PathBuf::from(dir).join(format!("{name}.log"))).ok())
        .map_or_else(Stdio::null, Stdio::from)
}

/// A `herald` process, killed when dropped.
pub struct Proc {
    /// Its name in the stack.
    pub name: String,
    /// The arguments it was started with (the role first).
    pub args: Vec<String>,
    /// The variables it got beside the stack's.
    pub extra: Vec<(String, String)>,
    /// The process.
    pub child: Child,
}

impl Proc {
    /// Sends `signal` (`TERM`, `INT`, `KILL`…) with `kill`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {}", self.name);
    }

    /// Waits at most `limit` for it to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
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

/// One scenario's processes and environment.
pub struct ProcessStack {
    /// The database and key prefix every process shares.
    pub env: TestEnv,
    /// The `HERALD__*` variables every process gets.
    pub vars: HashMap<String, String>,
    /// The Messenger API's base URL.
    pub api: String,
    /// The Job Scheduler's base URL (the first replica's port).
    pub scheduler: String,
    /// The provider stand-in's base URL.
    pub sink: String,
    /// The processes kept by [`ProcessStack::start`].
    pub procs: Vec<Proc>,
    /// A plain HTTP client.
    pub client: reqwest::Client,
    binary: PathBuf,
}

impl ProcessStack {
    /// The environment of a stack running `binary`: a fresh database and key prefix, free
    /// ports for the API, a scheduler and the sink, the `test` environment, and `extra`.
    pub async fn new(binary: impl Into<PathBuf>, extra: &[(&str, String)]) -> Self {
        let env = TestEnv::new().await.expect("run build/local-services.sh up first");
        let (api_port, scheduler_port, sink_port) = (free_port(), free_port(), free_port());
        let api = format!("http://127.0.0.1:{api_port}");
        let scheduler = format!("http://127.0.0.1:{scheduler_port}");
        let sink = format!("http://127.0.0.1:{sink_port}");
        let mut vars: HashMap<String, String> = [
            ("HERALD_ENV", "test".to_owned()),
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
        vars.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        Self {
            env,
            vars,
            api,
            scheduler,
            sink,
            procs: Vec::new(),
            client: reqwest::Client::new(),
            binary: binary.into(),
        }
    }

    /// A free loopback port for one more process of this stack: none of the stack's own (API,
    /// scheduler, sink) and none of `also_not`. [`free_port`] alone may hand back a port the
    /// stack already chose but has not bound yet.
    pub fn extra_port(&self, also_not: &[u16]) -> u16 {
        let own: Vec<u16> = [&self.api, &self.scheduler, &self.sink]
            .iter()
            .filter_map(|url| url.rsplit(':').next()?.parse().ok())
            .collect();
        loop {
            let port = free_port();
            if !own.contains(&port) && !also_not.contains(&port) {
                return port;
            }
        }
    }

    /// The release build with the API and the sink started and answering.
    pub async fn api_and_sink(extra: &[(&str, String)]) -> Self {
        let mut vars = vec![("RUST_LOG", "warn".to_owned())];
        vars.extend(extra.iter().cloned());
        let mut stack = Self::new(release_binary(), &vars).await;
        stack.start("api", &["messenger-api"], &[]);
        stack.start("sink", &["webhook-sink"], &[]);
        stack.wait_healthy(&format!("{}/messenger/health", stack.api)).await;
        stack.wait_healthy(&format!("{}/webhook-sink/health", stack.sink)).await;
        stack
    }

    /// The release build with the API and two provider stand-ins up: `primary` (the stack's
    /// own sink) and `secondary` (a second sink process on its own port, named
    /// `sink-secondary`), on one route — primary first, or split evenly with `split`. Each
    /// provider pauses after 3 failures for 1 s, at most 2 s. Answers the secondary's base URL.
    pub async fn api_and_two_providers(extra: &[(&str, String)], split: bool) -> (Self, String) {
        let mut vars = vec![("RUST_LOG", "warn".to_owned())];
        vars.extend(extra.iter().cloned());
        let mut stack = Self::new(release_binary(), &vars).await;
        let secondary_port = free_port();
        let secondary = format!("http://127.0.0.1:{secondary_port}");
        let provider = |name: &str, base: &str| {
            format!(
                "[[providers]]\nname = \"{name}\"\nurl = \"{base}/webhook\"\nauth_key = \"local-dev-webhook-key\"\npause_after_failures = 3\npause_seconds = 1\nmax_retry_after_seconds = 2\n"
            )
        };
        let weights = if split { "weights = [1, 1]\n" } else { "" };
        let fragment = provider("primary", &stack.sink)
            + &provider("secondary", &secondary)
            + "[[routes]]\nprefix = \"\"\nproviders = [\"primary\", \"secondary\"]\n"
            + weights;
        stack.use_providers(&fragment);
        stack.start("api", &["messenger-api"], &[]);
        stack.start("sink", &["webhook-sink"], &[]);
        stack.start(
            "sink-secondary",
            &["webhook-sink"],
            &[("HERALD__WEBHOOK_SINK__PORT".to_owned(), secondary_port.to_string())],
        );
        stack.wait_healthy(&format!("{}/messenger/health", stack.api)).await;
        stack.wait_healthy(&format!("{}/webhook-sink/health", stack.sink)).await;
        stack.wait_healthy(&format!("{secondary}/webhook-sink/health")).await;
        (stack, secondary)
    }

    /// Requests the stand-in at `base` received so far (cheap to poll).
    pub async fn delivered_at(&self, base: &str) -> u64 {
        let count = Http::new(TEST_KEY)
            .open_json(&format!("{base}/webhook-sink/received/count"))
            .await;
        count["count"].as_u64().unwrap_or(0)
    }

    /// `herald args…` with the stack's variables and nothing inherited from the caller's
    /// `HERALD*`, run from the repository root.
    pub fn command(&self, args: &[&str]) -> Command {
        herald_command(&self.binary, &self.vars, args)
    }

    /// Starts `herald args…` with `extra` variables beside the stack's and hands it back.
    pub fn spawn_with(&self, name: &str, args: &[&str], extra: &[(String, String)]) -> Proc {
        let mut command = self.command(args);
        let child = command
            .envs(extra.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log_to(name))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({}): {e}", self.binary.display()));
        Proc {
            name: name.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            extra: extra.to_vec(),
            child,
        }
    }

    /// Starts `herald args…` and hands it back.
    pub fn spawn(&self, name: &str, args: &[&str]) -> Proc {
        self.spawn_with(name, args, &[])
    }

    /// Starts `herald args…` and keeps it in the stack as `name`.
    pub fn start(&mut self, name: &str, args: &[&str], extra: &[(String, String)]) {
        let proc = self.spawn_with(name, args, extra);
        self.procs.push(proc);
    }

    /// `n` scheduler replicas, `scheduler-1`…, each on its own port.
    pub fn replicas(&mut self, n: usize) {
        for i in 0..n {
            let port = [("HERALD__JOB_SCHEDULER__PORT".to_owned(), free_port().to_string())];
            self.start(&format!("scheduler-{}", i + 1), &["job-scheduler"], &port);
        }
    }

    /// SIGKILL of the process named `name`; it is gone when this returns.
    pub fn kill(&mut self, name: &str) {
        if let Some(proc) = self.procs.iter_mut().find(|p| p.name == name) {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
    }

    /// Starts the process named `name` again, with the same arguments and settings.
    pub fn restart(&mut self, name: &str) {
        let Some(index) = self.procs.iter().position(|p| p.name == name) else {
            return;
        };
        let old = self.procs.remove(index);
        let (args, extra) = (old.args.clone(), old.extra.clone());
        drop(old);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start(name, &args, &extra);
    }

    /// Waits (at most 20 s) until `url` answers 2xx.
    pub async fn wait_healthy(&self, url: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.client.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(Instant::now() < deadline, "{url} never became healthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A GET with the test key, as JSON.
    pub async fn get_json(&self, url: &str) -> Value {
        Http::new(TEST_KEY).get_json(url).await
    }

    /// Every request the provider stand-in received, oldest first.
    pub async fn received(&self) -> Vec<Value> {
        self.received_at(&self.sink).await
    }

    /// Every idempotency key the provider received, with how often.
    pub async fn received_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for r in self.received().await {
            *counts
                .entry(r["idempotencyKey"].as_str().unwrap_or("").to_owned())
                .or_insert(0) += 1;
        }
        counts
    }

    /// Requests the provider received so far (polled without loading the database).
    pub async fn delivered(&self) -> u64 {
        self.delivered_at(&self.sink).await
    }

    /// Messages the API counts sent.
    pub async fn sent_count(&self) -> u64 {
        let stats = self.get_json(&format!("{}/api/messenger/stats", self.api)).await;
        stats["counts"]["sent"].as_u64().unwrap_or(0)
    }

    /// The pids of the stack's processes and of the database server.
    pub fn pids(&self) -> Vec<(String, u32)> {
        let mut pids: Vec<(String, u32)> = self.procs.iter().map(|p| (p.name.clone(), p.child.id())).collect();
        if let Some(db) = database_pid() {
            pids.push(("database".to_owned(), db));
        }
        pids
    }

    /// Points every process started from now on at the `[[providers]]` and `[[routes]]` of
    /// the TOML `fragment` (a `test.toml` in a folder of this stack's own, laid over the
    /// built-in files: environment variables cannot carry arrays of tables).
    pub fn use_providers(&mut self, fragment: &str) {
        let dir = self.config_dir();
        std::fs::create_dir_all(&dir).expect("stack config folder");
        std::fs::write(dir.join("test.toml"), fragment).expect("stack test.toml");
        self.vars
            .insert("HERALD_CONFIG_DIR".to_owned(), dir.to_string_lossy().into_owned());
    }

    fn config_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("herald-stack-{}", self.env.database))
    }

    /// Requests the stand-in at `base` (`http://127.0.0.1:port`) received, oldest first.
    pub async fn received_at(&self, base: &str) -> Vec<Value> {
        let list = Http::new(TEST_KEY)
            .open_json(&format!("{base}/webhook-sink/received"))
            .await;
        list.as_array().cloned().unwrap_or_default()
    }

    /// Stops every process and drops the database and key prefix.
    pub async fn cleanup(self) {
        self.try_cleanup().await.expect("test database dropped");
    }

    /// As [`Self::cleanup`], answering a failure instead of panicking: a benchmark's
    /// million-message database can take longer to drop than the driver waits (the server
    /// goes on dropping it).
    pub async fn try_cleanup(mut self) -> anyhow::Result<()> {
        self.procs.clear();
        let _ = std::fs::remove_dir_all(self.config_dir());
        self.env.cleanup().await
    }
}

/// `binary args…` with `vars` and nothing inherited from the caller's `HERALD*`, run from the
/// repository root.
pub fn herald_command(binary: &Path, vars: &HashMap<String, String>, args: &[&str]) -> Command {
    let mut command = Command::new(binary);
    command.current_dir(repo_root()).args(args);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("HERALD")) {
        command.env_remove(key);
    }
    command.env("HERALD_ENV", "test").envs(vars);
    command
}
