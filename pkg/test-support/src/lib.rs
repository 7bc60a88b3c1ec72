//! Test isolation over real servers: a fresh MongoDB database and Redis key prefix per test.
//!
//! Tests talk to the real MongoDB-compatible server and the real Redis started by
//! `build/local-services.sh`. Each test takes a [`TestEnv`] with a unique database name and key
//! prefix, so tests run in parallel without seeing each other, and calls
//! [`TestEnv::cleanup`] at the end (async work in `Drop` does not run reliably).
//!
//! Addresses come from `HERALD_TEST_MONGO_URI` / `HERALD_TEST_REDIS_URL`, defaulting to the
//! loopback servers.
//!
//! Beside it: [`Http`], a client that presents one bearer key and reads JSON answers, and
//! [`eventually`], which polls until a condition holds.

#![forbid(unsafe_code)]

pub mod lossy_proxy;
pub mod redis_topologies;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use redis::AsyncCommands;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// MongoDB URI the tests use.
pub fn mongo_uri() -> String {
    std::env::var("HERALD_TEST_MONGO_URI").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".into())
}

/// Redis URL the tests use.
pub fn redis_url() -> String {
    std::env::var("HERALD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A short unique suffix for names.
pub fn unique_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// One test's private slice of MongoDB and Redis.
pub struct TestEnv {
    /// Database name, unique to this test.
    pub database: String,
    /// Redis key prefix, unique to this test (ends with `:`).
    pub key_prefix: String,
    /// A driver handle for assertions.
    pub mongo: mongodb::Client,
    /// A Redis connection for assertions.
    pub redis: redis::aio::MultiplexedConnection,
}

impl TestEnv {
    /// Connects to both servers and picks fresh names. Fails loudly when a server is missing,
    /// pointing at the script that starts them.
    pub async fn new() -> anyhow::Result<Self> {
        let suffix = unique_suffix();
        let mongo = mongodb::Client::with_uri_str(mongo_uri())
            .await
            .context("bad HERALD_TEST_MONGO_URI")?;
        mongo
            .database("admin")
            .run_command(mongodb::bson::doc! {"ping": 1})
            .await
            .context("MongoDB is not reachable: run `build/local-services.sh up`")?;
        let redis = redis::Client::open(redis_url())
            .context("bad HERALD_TEST_REDIS_URL")?
            .get_multiplexed_async_connection()
            .await
            .context("Redis is not reachable: run `build/local-services.sh up`")?;
        Ok(Self {
            database: format!("herald_test_{suffix}"),
            key_prefix: format!("herald-test:{suffix}:"),
            mongo,
            redis,
        })
    }

    /// The test's database.
    pub fn db(&self) -> mongodb::Database {
        self.mongo.database(&self.database)
    }

    /// Reads a Redis string key (prefix added).
    pub async fn redis_get(&self, key: &str) -> anyhow::Result<Option<String>> {
        let mut conn = self.redis.clone();
        Ok(conn.get(format!("{}{key}", self.key_prefix)).await?)
    }

    /// Remaining TTL of a Redis key (prefix added), in seconds.
    pub async fn redis_ttl(&self, key: &str) -> anyhow::Result<i64> {
        let mut conn = self.redis.clone();
        Ok(conn.ttl(format!("{}{key}", self.key_prefix)).await?)
    }

    /// Drops the database and deletes every key under the prefix.
    pub async fn cleanup(self) -> anyhow::Result<()> {
        self.db().drop().await?;
        let mut conn = self.redis.clone();
        let keys: Vec<String> = {
            let mut scan = conn.scan_match::<_, String>(format!("{}*", self.key_prefix)).await?;
            let mut keys = Vec::new();
            while let Some(key) = scan.next().await {
                keys.push(key?);
            }
            keys
        };
        if !keys.is_empty() {
            let mut conn = self.redis.clone();
            let _: () = conn.del(keys).await?;
        }
        Ok(())
    }
}

/// An HTTP client for tests that presents one bearer key. Every helper panics on a transport
/// error or an unreadable body: in a test that is the failure.
#[derive(Clone)]
pub struct Http {
    /// The underlying client, for requests the helpers do not cover.
    pub client: reqwest::Client,
    key: String,
}

impl Http {
    /// A client presenting `key`.
    pub fn new(key: &str) -> Self {
        Self {
            client: reqwest::Client::new(),
            key: key.to_owned(),
        }
    }

    /// A GET of `url` with the key.
    pub fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.client.get(url).bearer_auth(&self.key)
    }

    /// A POST to `url` with the key.
    pub fn post(&self, url: &str) -> reqwest::RequestBuilder {
        self.client.post(url).bearer_auth(&self.key)
    }

    /// A PUT to `url` with the key.
    pub fn put(&self, url: &str) -> reqwest::RequestBuilder {
        self.client.put(url).bearer_auth(&self.key)
    }

    /// GET `url` with the key, answered with JSON (any status).
    pub async fn get_json(&self, url: &str) -> Value {
        read_json(self.get(url)).await
    }

    /// GET an open `url` (no key), answered with JSON (any status).
    pub async fn open_json(&self, url: &str) -> Value {
        read_json(self.client.get(url)).await
    }

    /// GET an open `url` (no key), answered with text (any status).
    pub async fn open_text(&self, url: &str) -> String {
        let response = self.client.get(url).send().await.expect("request");
        response.text().await.expect("text body")
    }

    /// POST `body` to `url` with the key; the answer must be a success with a JSON `T`.
    pub async fn post_json<T: DeserializeOwned>(&self, url: &str, body: &Value) -> T {
        let response = self.post(url).json(body).send().await.expect("request");
        let status = response.status();
        assert!(status.is_success(), "POST {url} answered {status}");
        response.json().await.expect("JSON body")
    }
}

async fn read_json(request: reqwest::RequestBuilder) -> Value {
    let response = request.send().await.expect("request");
    response.json().await.expect("JSON body")
}

/// Waits until `check` holds, polling every 100 ms; panics naming `what` after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Redis server of the test's own (a real `redis-server` process, Debian's package), so a test
/// can kill it and start it again on the same port without touching the shared one. It keeps
/// its data in an append-only file written on every command, as a Redis run with persistence
/// does, so a restart finds what was written before the kill.
pub struct PrivateRedis {
    /// `redis://127.0.0.1:<port>`.
    pub url: String,
    port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    /// Starts one on a free port and waits until it answers.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let dir = std::env::temp_dir().join(format!("herald-test-redis-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).expect("a data folder for the private redis");
        let mut redis = Self {
            url: format!("redis://127.0.0.1:{port}"),
            port,
            dir,
            child: None,
        };
        redis.restart().await;
        redis
    }

    /// (Re)starts the server on its port with its data, and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package)");
        self.child = Some(child);
        let client = redis::Client::open(self.url.as_str()).expect("redis url");
        eventually(Duration::from_secs(10), "private redis answers", || async {
            client.get_multiplexed_async_connection().await.is_ok()
        })
        .await;
    }

    /// Kills the server (SIGKILL) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// GET of a key on this server.
    pub async fn get(&self, key: &str) -> Option<String> {
        let client = redis::Client::open(self.url.as_str()).expect("redis url");
        let mut conn = client.get_multiplexed_async_connection().await.expect("private redis");
        redis::cmd("GET").arg(key).query_async(&mut conn).await.expect("GET")
    }

    /// TTL of a key on this server, in seconds (-2 when it is absent).
    pub async fn ttl(&self, key: &str) -> i64 {
        let client = redis::Client::open(self.url.as_str()).expect("redis url");
        let mut conn = client.get_multiplexed_async_connection().await.expect("private redis");
        redis::cmd("TTL").arg(key).query_async(&mut conn).await.expect("TTL")
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A MongoDB-compatible server (`secantusd-rs`) of the caller's own, on a free port with its own
/// storage, so a test or a chaos run can kill it and start it again on its data without
/// disturbing anything else.
pub struct PrivateDatabase {
    port: u16,
    storage: std::path::PathBuf,
    process: Option<std::process::Child>,
}

impl PrivateDatabase {
    /// Where `secantusd-rs` is: `~/.cargo/bin` (where `build/local-services.sh` installs it)
    /// or `PATH`.
    pub fn binary() -> std::path::PathBuf {
        let home = std::env::var("HOME").unwrap_or_default();
        let cargo_bin = std::path::Path::new(&home).join(".cargo/bin/secantusd-rs");
        if cargo_bin.exists() {
            return cargo_bin;
        }
        std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join("secantusd-rs"))
                    .find(|p| p.exists())
            })
            .expect("secantusd-rs is needed for this test: run `build/local-services.sh up`")
    }

    /// Starts one on a free port with fresh storage and waits until it accepts connections.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("private database")
            .local_addr()
            .expect("private database")
            .port();
        let storage = std::env::temp_dir().join(format!("herald-restart-{}", unique_suffix()));
        let mut db = Self {
            port,
            storage,
            process: None,
        };
        db.launch().await;
        db
    }

    /// (Re)starts the server on its port and storage and waits until it accepts connections.
    pub async fn launch(&mut self) {
        let child = std::process::Command::new(Self::binary())
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--storage-path",
            ])
            .arg(&self.storage)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("private database");
        self.process = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "the private database did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: the server gets no chance to flush.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            child.kill().expect("private database");
            child.wait().expect("private database");
        }
    }

    /// SIGTERM: a clean shutdown.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.process.take() {
            let status = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("private database");
            assert!(status.success());
            child.wait().expect("private database");
        }
    }

    /// Its connection string.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }
}

impl Drop for PrivateDatabase {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.storage);
    }
}
