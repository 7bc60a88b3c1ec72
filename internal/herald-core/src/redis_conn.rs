//! One way to reach Redis, whichever way it is deployed (`redis.mode`): a lazily connecting,
//! reconnecting connection whose every call is bounded, so a service starts and keeps serving
//! while Redis is down or failing over.
//!
//! - `standalone`: the `redis` crate's [`ConnectionManager`].
//! - `sentinel`: the master the Sentinels name, asked again whenever the connection breaks or
//!   the server answers `READONLY` (it was demoted by a failover; hibiken/asynq #959).
//! - `cluster`: the crate's cluster connection, which follows `MOVED`/`ASK`; built again from
//!   the configured nodes after an error that says a node is gone (a failover). A pipeline
//!   whose keys span slots is sent as separate commands (concurrently, on the same multiplexed
//!   connections); a script's keys share a hash tag.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use futures::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Arg, AsyncConnectionConfig, Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult,
    Value,
};

use crate::settings::{RedisMode, RedisSettings};

/// A Redis connection for any `redis.mode`; cheap to clone (clones share the connections).
#[derive(Clone)]
pub struct RedisConn(Kind);

#[derive(Clone)]
enum Kind {
    Standalone(ConnectionManager),
    Sentinel(Arc<SentinelConn>),
    Cluster(Arc<ClusterConn>),
}

impl RedisConn {
    /// Which deployment this connection speaks to.
    pub fn mode(&self) -> RedisMode {
        match self.0 {
            Kind::Standalone(_) => RedisMode::Standalone,
            Kind::Sentinel(_) => RedisMode::Sentinel,
            Kind::Cluster(_) => RedisMode::Cluster,
        }
    }
}

/// A connection to what `settings` names that connects on first use; connecting and each
/// answer are bounded by `timeout`.
pub fn lazy_connection(settings: &RedisSettings, timeout: Duration) -> anyhow::Result<RedisConn> {
    let urls = settings.urls();
    match settings.mode {
        RedisMode::Standalone => {
            let url = urls.first().context("redis.url is empty")?;
            let client = redis::Client::open(url.as_str()).context("Failed to parse redis.url")?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(200));
            let manager =
                ConnectionManager::new_lazy_with_config(client, config).context("Failed to set up the Redis client")?;
            Ok(RedisConn(Kind::Standalone(manager)))
        }
        RedisMode::Sentinel => {
            let first = urls
                .first()
                .context("redis.url names no Sentinel")?
                .as_str()
                .into_connection_info()
                .context("Failed to parse redis.url")?;
            let db = first.redis_settings().db();
            let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(first.redis_settings().clone());
            let client = SentinelClient::build(
                urls.clone(),
                settings.sentinel_master.clone(),
                Some(node),
                SentinelServerType::Master,
            )
            .context("Failed to parse redis.url as Sentinel URLs")?;
            Ok(RedisConn(Kind::Sentinel(Arc::new(SentinelConn {
                client: tokio::sync::Mutex::new(client),
                current: Mutex::new(None),
                config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout)),
                timeout,
                db,
            }))))
        }
        RedisMode::Cluster => {
            let client = ClusterClientBuilder::new(urls.iter().map(String::as_str))
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(3)
                .min_retry_wait(50)
                .max_retry_wait(500)
                .build()
                .context("Failed to parse redis.url as cluster node URLs")?;
            let config = ClusterConfig::new()
                .set_connection_timeout(timeout)
                .set_response_timeout(timeout);
            let connection = client.get_pending_async_connection_with_config(config.clone());
            Ok(RedisConn(Kind::Cluster(Arc::new(ClusterConn {
                client,
                config,
                current: Mutex::new((connection, std::time::Instant::now())),
            }))))
        }
    }
}

/// The master as the Sentinels name it, asked again after the connection broke or the server
/// turned out to be a replica.
struct SentinelConn {
    client: tokio::sync::Mutex<SentinelClient>,
    current: Mutex<Option<MultiplexedConnection>>,
    config: AsyncConnectionConfig,
    timeout: Duration,
    db: i64,
}

impl SentinelConn {
    fn cached(&self) -> Option<MultiplexedConnection> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The current master's connection, asking the Sentinels when there is none.
    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(connection) = self.cached() {
            return Ok(connection);
        }
        let mut client = self.client.lock().await;
        // Another caller may have connected while this one waited.
        if let Some(connection) = self.cached() {
            return Ok(connection);
        }
        let connecting = client.get_async_connection_with_config(&self.config);
        let connection = tokio::time::timeout(self.timeout, connecting)
            .await
            .map_err(|_| RedisError::from((ErrorKind::Io, "no master from the Sentinels in time")))??;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(connection.clone());
        Ok(connection)
    }

    /// Drops the connection after an error that says the master is gone or moved, so the next
    /// call asks the Sentinels; answers whether the call may be sent again at once (it was
    /// refused, so it did nothing).
    fn after_error(&self, error: &RedisError) -> bool {
        let read_only = error.kind() == ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
        if read_only || error.is_io_error() || error.is_connection_dropped() || error.is_timeout() {
            *self.current.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        read_only
    }

    async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let mut connection = self.connection().await?;
        match connection.req_packed_command(cmd).await {
            Err(e) if self.after_error(&e) => self.connection().await?.req_packed_command(cmd).await,
            other => other.inspect_err(|e| {
                self.after_error(e);
            }),
        }
    }

    async fn pipeline(&self, pipeline: &Pipeline, offset: usize, count: usize) -> RedisResult<Vec<Value>> {
        let mut connection = self.connection().await?;
        match connection.req_packed_commands(pipeline, offset, count).await {
            Err(e) if self.after_error(&e) => {
                self.connection()
                    .await?
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }
            Ok(values) if values.iter().any(is_read_only) => {
                // The server took the connection but refused the writes: it is a replica now.
                *self.current.lock().unwrap_or_else(PoisonError::into_inner) = None;
                self.connection()
                    .await?
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }
            other => other.inspect_err(|e| {
                self.after_error(e);
            }),
        }
    }
}

fn is_read_only(value: &Value) -> bool {
    matches!(value, Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::ReadOnly))
}

/// The cluster connection, built again from the configured nodes when it fails in a way that
/// says the topology changed. The crate's connection follows `MOVED` and `ASK`, but after a
/// master is SIGKILLed it kept failing every command for the slots that moved until the
/// process restarted (measured in the chaos campaign); a fresh connection asks the live nodes
/// for the slot map.
struct ClusterConn {
    client: redis::cluster::ClusterClient,
    config: ClusterConfig,
    current: Mutex<(ClusterConnection, std::time::Instant)>,
}

/// The fastest a broken cluster connection is built again.
const CLUSTER_REBUILD_INTERVAL: Duration = Duration::from_millis(500);

impl ClusterConn {
    fn connection(&self) -> ClusterConnection {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).0.clone()
    }

    /// After an error that says a node is gone or the slots are moving, starts a new
    /// connection (at most every [`CLUSTER_REBUILD_INTERVAL`]).
    fn after_error(&self, error: &RedisError) {
        let topology = matches!(
            error.kind(),
            ErrorKind::Server(
                redis::ServerErrorKind::ClusterDown
                    | redis::ServerErrorKind::MasterDown
                    | redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::ReadOnly
            )
        );
        let broken =
            error.is_io_error() || error.is_connection_dropped() || error.is_connection_refusal() || error.is_timeout();
        if !(topology || broken) {
            return;
        }
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.1.elapsed() >= CLUSTER_REBUILD_INTERVAL {
            *current = (
                self.client
                    .get_pending_async_connection_with_config(self.config.clone()),
                std::time::Instant::now(),
            );
        }
    }

    async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        self.connection()
            .req_packed_command(cmd)
            .await
            .inspect_err(|e| self.after_error(e))
    }

    /// Sends a pipeline whose commands may live in different slots: as it is when they share
    /// one (or it is a transaction, which must), else command by command, concurrently.
    async fn pipeline(&self, pipeline: &Pipeline, offset: usize, count: usize) -> RedisResult<Vec<Value>> {
        let connection = self.connection();
        let slots: std::collections::HashSet<Option<Slot>> = pipeline.cmd_iter().map(slot_of).collect();
        if pipeline.is_transaction() || slots.len() <= 1 {
            return connection
                .clone()
                .req_packed_commands(pipeline, offset, count)
                .await
                .inspect_err(|e| self.after_error(e));
        }
        let answers = futures::future::join_all(pipeline.cmd_iter().map(|cmd| {
            let mut connection = connection.clone();
            async move { connection.req_packed_command(cmd).await }
        }))
        .await;
        let values = answers
            .into_iter()
            .collect::<RedisResult<Vec<Value>>>()
            .inspect_err(|e| self.after_error(e))?;
        Ok(values.into_iter().skip(offset).take(count).collect())
    }
}

/// The cluster slot of a command's first key (after the script and key count of `EVAL` and
/// `EVALSHA`), or of its first argument: every command Herald pipelines names a key there.
fn slot_of(cmd: &Cmd) -> Option<Slot> {
    let mut args = cmd.args_iter().map(|arg| match arg {
        Arg::Simple(bytes) => bytes,
        _ => &[],
    });
    let name = args.next()?;
    let key = if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        let _script = args.next()?;
        if args.next()? == b"0" {
            return None;
        }
        args.next()?
    } else {
        args.next()?
    };
    Some(Slot::for_key(key))
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Kind::Standalone(manager) => manager.req_packed_command(cmd),
            Kind::Sentinel(sentinel) => async move { sentinel.command(cmd).await }.boxed(),
            Kind::Cluster(cluster) => async move { cluster.command(cmd).await }.boxed(),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Kind::Standalone(manager) => manager.req_packed_commands(pipeline, offset, count),
            Kind::Sentinel(sentinel) => async move { sentinel.pipeline(pipeline, offset, count).await }.boxed(),
            Kind::Cluster(cluster) => async move { cluster.pipeline(pipeline, offset, count).await }.boxed(),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Kind::Standalone(manager) => manager.get_db(),
            Kind::Sentinel(sentinel) => sentinel.db,
            Kind::Cluster(_) => 0,
        }
    }
}
