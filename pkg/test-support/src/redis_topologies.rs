//! Redis deployed as production runs it, from real `redis-server` processes on loopback: a
//! master with a replica watched by three Sentinels, and a Cluster of three masters with a
//! replica each. Each test starts its own on free ports, kills a master when it wants a
//! failover, and has everything stopped and removed when the value is dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{eventually, unique_suffix};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One `redis-server` process.
struct Node {
    port: u16,
    child: Option<Child>,
}

impl Node {
    fn spawn(port: u16, args: &[String]) -> Self {
        let child = Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package)");
        Self {
            port,
            child: Some(child),
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A text answer from the server on `port` (INFO, CLUSTER INFO, SENTINEL …), or `None` when
/// it does not answer.
pub async fn ask(port: u16, args: &[&str]) -> Option<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut conn = tokio::time::timeout(Duration::from_secs(2), client.get_multiplexed_async_connection())
        .await
        .ok()?
        .ok()?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    let value: redis::Value = tokio::time::timeout(Duration::from_secs(2), cmd.query_async(&mut conn))
        .await
        .ok()?
        .ok()?;
    Some(flatten(&value))
}

/// A reply as text: bulk strings as they are, arrays and maps one item per line.
fn flatten(value: &redis::Value) -> String {
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        redis::Value::SimpleString(s) | redis::Value::VerbatimString { text: s, .. } => s.clone(),
        redis::Value::Int(n) => n.to_string(),
        redis::Value::Array(items) | redis::Value::Set(items) => {
            items.iter().map(flatten).collect::<Vec<_>>().join("\n")
        }
        redis::Value::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| format!("{}\n{}", flatten(k), flatten(v)))
            .collect::<Vec<_>>()
            .join("\n"),
        other => format!("{other:?}"),
    }
}

/// Whether a `CLUSTER NODES` slot field (`5461-10922` or `42`) holds `slot`.
fn serves(range: &str, slot: u16) -> bool {
    let bounds = match range.split_once('-') {
        Some((from, to)) => from.parse::<u16>().ok().zip(to.parse::<u16>().ok()),
        None => range.parse::<u16>().ok().map(|s| (s, s)),
    };
    bounds.is_some_and(|(from, to)| (from..=to).contains(&slot))
}

/// A data node's arguments: loopback, no persistence, and a replica's first full sync started
/// at once, not 5 s later (a replica that never synced cannot take over).
fn data_node_args(port: u16) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--repl-diskless-sync-delay",
        "0",
    ]
    .map(String::from)
    .to_vec()
}

/// `redis.url` listing `nodes`, comma-separated.
fn urls(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("redis://127.0.0.1:{}", n.port))
        .collect::<Vec<_>>()
        .join(",")
}

/// One field of the `INFO replication` answer of the server on `port`.
async fn replication(port: u16, field: &str) -> Option<String> {
    info_field(&ask(port, &["INFO", "replication"]).await?, field)
}

/// `name:value` from an INFO-style answer.
pub fn info_field(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_owned())
}

/// A master and its replica watched by three Sentinels (quorum two), failing over a second
/// after the master stops answering.
pub struct RedisSentinels {
    /// The name the Sentinels know the master by.
    pub master_name: String,
    master: Node,
    replica: Node,
    sentinels: Vec<Node>,
    dir: PathBuf,
}

impl RedisSentinels {
    /// Starts the five processes and waits until the Sentinels know the replica and each other.
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("herald-test-sentinel-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).expect("a folder for the sentinels");
        let master_port = free_port();
        let master = Node::spawn(master_port, &data_node_args(master_port));
        let replica_port = free_port();
        let mut replica_args = data_node_args(replica_port);
        replica_args.extend(["--replicaof".into(), "127.0.0.1".into(), master_port.to_string()]);
        let replica = Node::spawn(replica_port, &replica_args);
        eventually(Duration::from_secs(10), "the replica is in sync", || async {
            replication(replica_port, "master_link_status").await.as_deref() == Some("up")
        })
        .await;
        let master_name = format!("herald-{}", unique_suffix());
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let config = dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {master_name} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {master_name} 1000\n\
                     sentinel failover-timeout {master_name} 5000\n\
                     sentinel parallel-syncs {master_name} 1\n",
                    dir = dir.display()
                ),
            )
            .expect("a sentinel configuration");
            sentinels.push(Node::spawn(
                port,
                &[config.display().to_string(), "--sentinel".to_owned()],
            ));
        }
        let set = Self {
            master_name,
            master,
            replica,
            sentinels,
            dir,
        };
        eventually(
            Duration::from_secs(30),
            "the sentinels see the replica and each other",
            || async {
                for sentinel in &set.sentinels {
                    let Some(master) = ask(sentinel.port, &["SENTINEL", "MASTER", &set.master_name]).await else {
                        return false;
                    };
                    let fields: Vec<&str> = master.lines().collect();
                    let field = |name: &str| {
                        fields
                            .chunks(2)
                            .find(|pair| pair[0] == name)
                            .and_then(|pair| pair.get(1).copied())
                    };
                    if field("num-slaves") != Some("1") || field("num-other-sentinels") != Some("2") {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        set
    }

    /// `redis.url` for Herald: the Sentinels, comma-separated.
    pub fn url(&self) -> String {
        urls(&self.sentinels)
    }

    /// The port of the server the Sentinels now name master.
    pub async fn master_port(&self) -> Option<u16> {
        let answer = ask(
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.master_name],
        )
        .await?;
        answer.lines().nth(1)?.parse().ok()
    }

    /// The first master's port.
    pub fn first_master_port(&self) -> u16 {
        self.master.port
    }

    /// The replica's port.
    pub fn replica_port(&self) -> u16 {
        self.replica.port
    }

    /// SIGKILLs the first master.
    pub fn kill_master(&mut self) {
        self.master.kill();
    }

    /// Waits until the Sentinels have promoted the replica and it answers as master.
    pub async fn wait_failover(&self, limit: Duration) {
        let replica = self.replica.port;
        eventually(limit, "the sentinels promote the replica", || async {
            self.master_port().await == Some(replica) && replication(replica, "role").await.as_deref() == Some("master")
        })
        .await;
    }
}

impl Drop for RedisSentinels {
    fn drop(&mut self) {
        for node in self.sentinels.iter_mut().chain([&mut self.master, &mut self.replica]) {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster: three masters with a replica each (`redis-cli --cluster create`), a node
/// counted failed after one second.
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster and waits until every node says it is ok.
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("herald-test-cluster-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).expect("a folder for the cluster");
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = free_port();
            let mut args = data_node_args(port);
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-config-file",
                    &dir.join(format!("nodes-{port}.conf")).display().to_string(),
                    "--dir",
                    &dir.display().to_string(),
                ]
                .map(String::from),
            );
            nodes.push(Node::spawn(port, &args));
        }
        for node in &nodes {
            eventually(Duration::from_secs(10), "a cluster node answers", || async {
                ask(node.port, &["PING"]).await.is_some()
            })
            .await;
        }
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli (Debian's redis-tools)");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = Self { nodes, dir };
        cluster.wait_ok(Duration::from_secs(30)).await;
        eventually(
            Duration::from_secs(30),
            "every replica is in sync with its master",
            || async {
                for node in &cluster.nodes {
                    let Some(info) = ask(node.port, &["INFO", "replication"]).await else {
                        return false;
                    };
                    let role = info_field(&info, "role");
                    if role.as_deref() == Some("slave")
                        && info_field(&info, "master_link_status").as_deref() != Some("up")
                    {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        cluster
    }

    /// `redis.url` for Herald: every node, comma-separated.
    pub fn url(&self) -> String {
        urls(&self.nodes)
    }

    /// A node still running, to ask the cluster questions.
    fn live_port(&self) -> u16 {
        self.nodes.iter().find(|n| n.child.is_some()).expect("a live node").port
    }

    /// The port of the master serving `key`'s slot, as the cluster now says.
    pub async fn master_of(&self, key: &str) -> Option<u16> {
        let slot: u16 = ask(self.live_port(), &["CLUSTER", "KEYSLOT", key])
            .await?
            .parse()
            .ok()?;
        let nodes = ask(self.live_port(), &["CLUSTER", "NODES"]).await?;
        nodes.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let is_live_master = fields.get(2)?.contains("master") && !fields[2].contains("fail");
            let serves = fields.iter().skip(8).any(|range| serves(range, slot));
            let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
            (is_live_master && serves).then_some(port)
        })
    }

    /// The ports of the nodes now serving slots as masters.
    pub async fn master_ports(&self) -> Vec<u16> {
        let nodes = ask(self.live_port(), &["CLUSTER", "NODES"]).await.unwrap_or_default();
        nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let flags = fields.get(2)?;
                (flags.contains("master") && !flags.contains("fail") && fields.len() > 8)
                    .then(|| fields[1].split(['@', ':']).nth(1)?.parse().ok())?
            })
            .collect()
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.port == port) {
            node.kill();
        }
    }

    /// Waits until the cluster has noticed the node on `killed` failed, and every live node
    /// says the cluster is ok again (its replica took over its slots).
    pub async fn wait_failover(&self, killed: u16, limit: Duration) {
        eventually(limit, "the cluster marks the killed master failed", || async {
            let nodes = ask(self.live_port(), &["CLUSTER", "NODES"]).await.unwrap_or_default();
            nodes.lines().any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields
                    .get(1)
                    .is_some_and(|a| a.starts_with(&format!("127.0.0.1:{killed}@")))
                    && fields
                        .get(2)
                        .is_some_and(|f| f.contains("fail") && !f.contains("fail?"))
            })
        })
        .await;
        self.wait_ok(limit).await;
    }

    /// Waits until every live node says the cluster is ok.
    pub async fn wait_ok(&self, limit: Duration) {
        eventually(limit, "the cluster is ok again", || async {
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let ok = ask(node.port, &["CLUSTER", "INFO"])
                    .await
                    .and_then(|i| info_field(&i, "cluster_state"))
                    .as_deref()
                    == Some("ok");
                if !ok {
                    return false;
                }
            }
            true
        })
        .await;
    }

    /// The keys matching `pattern` on the master on `port` (a test-sized SCAN).
    pub async fn keys_on(&self, port: u16, pattern: &str) -> Vec<String> {
        ask(port, &["KEYS", pattern])
            .await
            .map(|text| text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
