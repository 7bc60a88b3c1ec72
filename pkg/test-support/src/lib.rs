//! Test isolation over real servers: a fresh MongoDB database and Redis key prefix per test.
//!
//! Tests talk to the real MongoDB-compatible server and the real Redis started by
//! `build/local-services.sh`. Each test takes a [`TestEnv`] with a unique database name and key
//! prefix, so tests run in parallel without seeing each other, and calls
//! [`TestEnv::cleanup`] at the end (async work in `Drop` does not run reliably).
//!
//! Addresses come from `HERALD_TEST_MONGO_URI` / `HERALD_TEST_REDIS_URL`, defaulting to the
//! loopback servers.

#![forbid(unsafe_code)]

use anyhow::Context;
use futures::StreamExt;
use redis::AsyncCommands;

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
