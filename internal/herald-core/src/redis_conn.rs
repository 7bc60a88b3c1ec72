//! One way to reach Redis: a lazily connecting, reconnecting connection whose every call is
//! bounded, so a service starts and keeps serving while Redis is down.

use std::time::Duration;

use anyhow::Context;
use layered_config::ExposeSecret;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::settings::RedisSettings;

/// A connection to `settings.url` that connects on first use; connecting and each answer are
/// bounded by `timeout`.
pub fn lazy_connection(settings: &RedisSettings, timeout: Duration) -> anyhow::Result<ConnectionManager> {
    let client = redis::Client::open(settings.url.expose_secret()).context("Failed to parse redis.url")?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(200));
    ConnectionManager::new_lazy_with_config(client, config).context("Failed to set up the Redis client")
}
