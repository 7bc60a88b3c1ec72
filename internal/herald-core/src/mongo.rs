//! Connecting to MongoDB with bounded waits, and telling "unavailable" from other failures.

use std::time::Duration;

use layered_config::ExposeSecret;
use mongodb::error::{Error, ErrorKind};
use mongodb::options::ClientOptions;
use mongodb::Database;

use crate::settings::MongoSettings;

/// Builds a client without waiting for the server: operations wait at most
/// `server_selection_timeout_ms`, so a down database answers 503 instead of hanging.
pub async fn connect(settings: &MongoSettings, app_name: &str) -> anyhow::Result<Database> {
    use anyhow::Context;
    let mut options = ClientOptions::parse(settings.uri.expose_secret())
        .await
        .context("Failed to parse mongo.uri")?;
    let wait = Duration::from_millis(settings.server_selection_timeout_ms);
    options.app_name = Some(app_name.to_owned());
    options.server_selection_timeout = Some(wait);
    options.connect_timeout = Some(wait);
    let client = mongodb::Client::with_options(options).context("Failed to build the MongoDB client")?;
    Ok(client.database(&settings.database))
}

/// True when the error means "the database cannot be reached right now" (→ 503), not a bad
/// request or a bug.
pub fn is_unavailable(error: &Error) -> bool {
    matches!(
        *error.kind,
        ErrorKind::ServerSelection { .. } | ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. }
    ) || error.contains_label("RetryableWriteError")
        || error.contains_label("TransientTransactionError")
}

/// True when the error is a duplicate-key violation (code 11000).
pub fn is_duplicate_key(error: &Error) -> bool {
    use mongodb::error::WriteFailure;
    match &*error.kind {
        ErrorKind::Write(WriteFailure::WriteError(e)) => e.code == 11000,
        ErrorKind::Command(e) => e.code == 11000,
        ErrorKind::InsertMany(e) => e
            .write_errors
            .as_ref()
            .is_some_and(|errors| errors.iter().any(|w| w.code == 11000)),
        _ => false,
    }
}

/// Pings the database.
pub async fn ping(db: &Database) -> Result<(), String> {
    db.run_command(mongodb::bson::doc! {"ping": 1})
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
