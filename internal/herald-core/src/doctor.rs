//! `herald doctor`: what a deployment needs from what it points at, checked from where Herald
//! runs — MongoDB reachable, a replica set whose change streams open (the live feed needs
//! them), majority writes (a commit survives a failover), Redis reachable, the other role
//! answering, and the providers as configured. Each check is bounded in time; the verdict is
//! one line per check.

use std::time::{Duration, Instant};

use layered_config::ExposeSecret;
use mongodb::bson::{doc, Document};
use mongodb::options::ClientOptions;

use crate::mongo::IndexSpec;
use crate::settings::{RedisMode, Settings};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// As it should be.
    Ok,
    /// Works, but not as a deployment should.
    Warn,
    /// Herald cannot work like this.
    Fail,
}

impl Level {
    /// The tag printed before the line.
    pub fn tag(self) -> &'static str {
        match self {
            Self::Ok => "ok  ",
            Self::Warn => "warn",
            Self::Fail => "FAIL",
        }
    }
}

/// One finding.
#[derive(Debug, Clone)]
pub struct Finding {
    /// How bad.
    pub level: Level,
    /// What was checked (`mongodb`, `redis`, `messenger-api`…).
    pub subject: &'static str,
    /// What was found, and what to do when it is not ok.
    pub detail: String,
}

fn finding(level: Level, subject: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        level,
        subject,
        detail: detail.into(),
    }
}

/// The longest any one check waits.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs every check against what `settings` point at; `indexes` are the names the Messenger
/// API creates on `messages`.
pub async fn examine(settings: &Settings, env: &str, indexes: &[IndexSpec]) -> Vec<Finding> {
    let mut findings = Vec::new();
    findings.extend(mongodb(settings, indexes).await);
    findings.extend(redis(settings).await);
    for (subject, url) in [
        (
            "messenger-api",
            format!("{}/messenger/health", settings.messenger_api.url),
        ),
        (
            "job-scheduler",
            format!("{}/job-scheduler/health", settings.job_scheduler.url),
        ),
    ] {
        findings.push(peer(subject, &url).await);
    }
    findings.extend(providers(settings, env).await);
    findings
}

async fn mongodb(settings: &Settings, indexes: &[IndexSpec]) -> Vec<Finding> {
    let mut out = Vec::new();
    let options = match ClientOptions::parse(settings.mongo.uri.expose_secret()).await {
        Ok(options) => options,
        Err(error) => {
            return vec![finding(
                Level::Fail,
                "mongodb",
                format!("mongo.uri cannot be read: {error}"),
            )]
        }
    };
    let majority = options
        .write_concern
        .as_ref()
        .and_then(|w| w.w.as_ref())
        .is_some_and(|w| matches!(w, mongodb::options::Acknowledgment::Majority));
    let db = match crate::mongo::connect(&settings.mongo, "herald-doctor").await {
        Ok(db) => db,
        Err(error) => return vec![finding(Level::Fail, "mongodb", format!("cannot connect: {error:#}"))],
    };
    let started = Instant::now();
    let hello = tokio::time::timeout(CHECK_TIMEOUT, db.run_command(doc! {"hello": 1})).await;
    let hello: Document = match hello {
        Ok(Ok(answer)) => answer,
        Ok(Err(error)) => {
            return vec![finding(Level::Fail, "mongodb", format!("not reachable: {error}"))];
        }
        Err(_) => return vec![finding(Level::Fail, "mongodb", "no answer within 3 s")],
    };
    let latency = started.elapsed().as_millis();
    let version = match tokio::time::timeout(CHECK_TIMEOUT, db.run_command(doc! {"buildInfo": 1})).await {
        Ok(Ok(info)) => info.get_str("version").unwrap_or("?").to_owned(),
        _ => "?".to_owned(),
    };
    out.push(finding(
        Level::Ok,
        "mongodb",
        format!(
            "reachable, server {version}, database {:?} ({latency} ms)",
            settings.mongo.database
        ),
    ));
    if older_than_minimum(&version) {
        out.push(finding(
            Level::Fail,
            "mongodb",
            format!(
                "server {version} is older than {MIN_MONGODB}: commits are pipeline updates with \
                 constants (`c`), which MongoDB has from 5.0"
            ),
        ));
    }
    let set = hello.get_str("setName").ok().map(str::to_owned);
    if let Some(name) = &set {
        let hosts: Vec<String> = hello
            .get_array("hosts")
            .map(|h| h.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        out.push(finding(
            Level::Ok,
            "mongodb",
            format!("replica set {name:?}, members: {}", hosts.join(", ")),
        ));
    }
    out.push(index_check(&db, indexes).await);
    let messages = db.collection::<Document>("messages");
    let stream = tokio::time::timeout(CHECK_TIMEOUT, messages.watch()).await;
    match stream {
        Ok(Ok(_)) => out.push(finding(
            Level::Ok,
            "mongodb",
            match &set {
                Some(name) => format!("replica set {name:?}: change streams open (the live feed works)"),
                None => "change streams open (the live feed works)".to_owned(),
            },
        )),
        Ok(Err(error)) => out.push(finding(
            Level::Fail,
            "mongodb",
            format!(
                "change streams cannot open ({}): the live feed (SSE, WebSocket, console) needs a replica set; run mongod with --replSet (a one-member set will do) and add replicaSet=… to mongo.uri",
                server_said(&error)
            ),
        )),
        Err(_) => out.push(finding(Level::Fail, "mongodb", "opening a change stream took over 3 s")),
    }
    let members = hello.get_array("hosts").map(|h| h.len()).unwrap_or(0);
    if set.is_some() && members > 1 && !majority {
        out.push(finding(
            Level::Warn,
            "mongodb",
            format!("{members} members but writes are not w=majority: a commit acknowledged by one member can be lost in a failover; add w=majority to mongo.uri"),
        ));
    } else if majority {
        out.push(finding(Level::Ok, "mongodb", "writes are w=majority"));
    }
    out
}

/// What the server answered to a failed command (`Location40573: The $changeStream stage is
/// only supported on replica sets`), else the driver's error.
fn server_said(error: &mongodb::error::Error) -> String {
    match &*error.kind {
        mongodb::error::ErrorKind::Command(command) => format!("{}: {}", command.code_name, command.message),
        _ => error.to_string(),
    }
}

/// Whether `messages` holds every index the Messenger API creates, with the same keys.
async fn index_check(db: &mongodb::Database, expected: &[IndexSpec]) -> Finding {
    let listed = tokio::time::timeout(CHECK_TIMEOUT, async {
        use futures::TryStreamExt;
        db.collection::<Document>("messages")
            .list_indexes()
            .await?
            .try_collect::<Vec<mongodb::IndexModel>>()
            .await
    })
    .await;
    match listed {
        Ok(Ok(found)) => {
            let named = |name: &str| {
                found
                    .iter()
                    .find(|f| f.options.as_ref().and_then(|o| o.name.as_deref()) == Some(name))
            };
            let missing: Vec<&str> = expected
                .iter()
                .filter(|e| named(e.name).is_none())
                .map(|e| e.name)
                .collect();
            let different: Vec<String> = expected
                .iter()
                .filter_map(|e| {
                    let found = named(e.name)?;
                    (!e.matches(found)).then(|| format!("{} has {} (expected {})", e.name, found.keys, e.keys))
                })
                .collect();
            let names: Vec<&str> = expected.iter().map(|e| e.name).collect();
            if !different.is_empty() {
                finding(
                    Level::Fail,
                    "mongodb",
                    format!(
                        "indexes of messages differ: {}; the Messenger API cannot create its own under these names: drop them and start the API to rebuild them",
                        different.join("; ")
                    ),
                )
            } else if missing.is_empty() {
                finding(
                    Level::Ok,
                    "mongodb",
                    format!("indexes of messages present and matching: {}", names.join(", ")),
                )
            } else {
                finding(
                    Level::Warn,
                    "mongodb",
                    format!(
                        "indexes of messages missing: {} (the Messenger API creates them at start; claims and lists read whole ranges without them)",
                        missing.join(", ")
                    ),
                )
            }
        }
        // A fresh database has no collection yet: nothing to read, nothing wrong.
        Ok(Err(error))
            if error.to_string().contains("NamespaceNotFound") || error.to_string().contains("ns does not exist") =>
        {
            finding(
                Level::Warn,
                "mongodb",
                "no messages collection yet: the Messenger API creates it and its indexes at start",
            )
        }
        Ok(Err(error)) => finding(
            Level::Warn,
            "mongodb",
            format!("cannot list the indexes of messages: {error}"),
        ),
        Err(_) => finding(Level::Warn, "mongodb", "listing the indexes took over 3 s"),
    }
}

async fn redis(settings: &Settings) -> Vec<Finding> {
    let mode = settings.redis.mode;
    let mut connection = match crate::redis_conn::lazy_connection(&settings.redis, CHECK_TIMEOUT) {
        Ok(connection) => connection,
        Err(error) => {
            return vec![finding(
                Level::Fail,
                "redis",
                format!("redis.url cannot be read: {error:#}"),
            )]
        }
    };
    let started = Instant::now();
    let info = match ask(&mut connection, redis::cmd("INFO").arg("server").arg("replication")).await {
        Ok(info) => info,
        // Redis degrades Herald (the cache, the shared rate limit), it does not stop it.
        Err(error) => {
            return vec![finding(
                Level::Warn,
                "redis",
                format!("not reachable in mode {mode:?} ({error}): sending goes on, but the sent cache and the shared rate limit fall back"),
            )]
        }
    };
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| "?".into())
    };
    let server_mode = field(&info, "redis_mode");
    let reached = format!(
        "reachable, version {}, server mode {server_mode} ({} ms)",
        field(&info, "redis_version"),
        started.elapsed().as_millis()
    );
    match mode {
        RedisMode::Standalone if server_mode == "cluster" => vec![finding(
            Level::Fail,
            "redis",
            format!("{reached}: the server is a cluster node, set redis.mode = \"cluster\""),
        )],
        RedisMode::Standalone => vec![finding(
            Level::Ok,
            "redis",
            format!("{reached}, role {}", field(&info, "role")),
        )],
        RedisMode::Sentinel => {
            let level = if field(&info, "role") == "master" {
                Level::Ok
            } else {
                Level::Fail
            };
            vec![finding(
                level,
                "redis",
                format!(
                    "{reached}; the Sentinels name master \"{}\" with role {} and {} connected replica(s)",
                    settings.redis.sentinel_master,
                    field(&info, "role"),
                    field(&info, "connected_slaves")
                ),
            )]
        }
        RedisMode::Cluster => match ask(&mut connection, redis::cmd("CLUSTER").arg("INFO")).await {
            Ok(cluster) => {
                let state = field(&cluster, "cluster_state");
                let level = if state == "ok" { Level::Ok } else { Level::Fail };
                vec![finding(
                    level,
                    "redis",
                    format!(
                        "{reached}; cluster state {state}, {} master(s) serving slots, {} of 16384 slots assigned",
                        field(&cluster, "cluster_size"),
                        field(&cluster, "cluster_slots_assigned")
                    ),
                )]
            }
            Err(error) => vec![finding(
                Level::Fail,
                "redis",
                format!("{reached}, but CLUSTER INFO failed ({error}): is redis.url a cluster?"),
            )],
        },
    }
}

/// One bounded text-answering command. A cluster answers `INFO` from every master, keyed by
/// node: the first node's answer stands for them all (they share a version and a mode).
async fn ask(connection: &mut crate::redis_conn::RedisConn, cmd: &redis::Cmd) -> Result<String, String> {
    let value: redis::Value = tokio::time::timeout(CHECK_TIMEOUT, cmd.query_async(connection))
        .await
        .map_err(|_| "no answer within 3 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let value = match value {
        redis::Value::Map(mut by_node) if !by_node.is_empty() => by_node.swap_remove(0).1,
        other => other,
    };
    redis::from_redis_value::<String>(value).map_err(|e| e.to_string())
}

async fn peer(subject: &'static str, url: &str) -> Finding {
    let client = match reqwest::Client::builder().timeout(CHECK_TIMEOUT).build() {
        Ok(client) => client,
        Err(error) => return finding(Level::Warn, subject, format!("cannot build an HTTP client: {error}")),
    };
    match client.get(url).send().await {
        Ok(response) if response.status().is_success() => finding(Level::Ok, subject, format!("answers at {url}")),
        Ok(response) => finding(Level::Warn, subject, format!("{url} answered {}", response.status())),
        Err(_) => finding(
            Level::Warn,
            subject,
            format!("no answer at {url} (not started yet, or the URL this role is given is wrong)"),
        ),
    }
}

/// Whether the host of `url` resolves (a name the resolver cannot find fails every send).
async fn resolves(url: &str) -> Result<(), String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else if url.starts_with("https://") {
        format!("{authority}:443")
    } else {
        format!("{authority}:80")
    };
    match tokio::time::timeout(CHECK_TIMEOUT, tokio::net::lookup_host(with_port)).await {
        Ok(Ok(mut addresses)) => match addresses.next() {
            Some(_) => Ok(()),
            None => Err("resolves to no address".into()),
        },
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer from the resolver within 3 s".into()),
    }
}

async fn providers(settings: &Settings, env: &str) -> Vec<Finding> {
    let routing = match settings.routing() {
        Ok(routing) => routing,
        Err(error) => return vec![finding(Level::Fail, "providers", error.to_string())],
    };
    let mut out = Vec::new();
    for provider in routing.providers() {
        let url = &provider.webhook.url;
        let (level, note) = match resolves(url).await {
            Err(why) => (
                Level::Fail,
                format!(" — its host does not resolve ({why}): every send would fail"),
            ),
            Ok(()) if env == "production" && url.starts_with("http://") => (
                Level::Warn,
                " — plain http in production: the key travels unencrypted".to_owned(),
            ),
            Ok(()) => (Level::Ok, String::new()),
        };
        out.push(finding(
            level,
            "providers",
            format!("{} → {url} ({:?}){note}", provider.name, provider.webhook.shape.format),
        ));
    }
    for route in routing.routes() {
        let prefix = if route.prefix.is_empty() {
            "(default)"
        } else {
            &route.prefix
        };
        out.push(finding(
            Level::Ok,
            "routes",
            format!("{prefix} → {}", route.names.join(", ")),
        ));
    }
    out
}

/// The oldest MongoDB Herald runs on.
const MIN_MONGODB: &str = "5.0";

/// Whether a server's `version` is older than [`MIN_MONGODB`] (an unreadable one is not
/// called old: the checks that follow find a server that cannot do the work).
fn older_than_minimum(version: &str) -> bool {
    version
        .split('.')
        .next()
        .and_then(|major| major.parse::<u32>().ok())
        .is_some_and(|major| major < 5)
}

#[cfg(test)]
mod tests {
    use super::older_than_minimum;

    #[test]
    fn a_server_before_mongodb_5_is_too_old_for_herald() {
        for old in ["4.4.29", "4.2.0", "3.6.23"] {
            assert!(older_than_minimum(old), "{old}");
        }
        for fine in ["5.0.0", "7.0.14", "8.2.11", "?", ""] {
            assert!(!older_than_minimum(fine), "{fine}");
        }
    }
}
