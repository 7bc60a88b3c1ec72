//! Connecting to MongoDB with bounded waits, telling "unavailable" from other failures, and
//! what every repository shares: [`StoreError`], reading one page ([`find_page`]) and lease
//! arithmetic ([`after`]).

use std::time::Duration;

use futures::TryStreamExt;
use layered_config::ExposeSecret;
use mongodb::bson::{self, Document};
use mongodb::error::{Error, ErrorKind};
use mongodb::options::ClientOptions;
use mongodb::{Collection, Database};
use serde::de::DeserializeOwned;

use crate::errors::{ApiError, ErrorCode};

/// An index a collection must have: what the Messenger API creates at start and what
/// `herald doctor` checks is there, with the same keys.
#[derive(Debug, Clone)]
pub struct IndexSpec {
    /// The index name.
    pub name: &'static str,
    /// Its key pattern, in order.
    pub keys: Document,
    /// Unique index.
    pub unique: bool,
    /// Sparse index.
    pub sparse: bool,
}

impl IndexSpec {
    /// The driver's model to create it.
    pub fn model(&self) -> mongodb::IndexModel {
        let options = mongodb::options::IndexOptions::builder()
            .name(self.name.to_owned())
            .unique(self.unique.then_some(true))
            .sparse(self.sparse.then_some(true))
            .build();
        mongodb::IndexModel::builder()
            .keys(self.keys.clone())
            .options(options)
            .build()
    }

    /// Whether an index the server lists is this one: same key pattern (as numbers, in order),
    /// same uniqueness and sparseness.
    pub fn matches(&self, found: &mongodb::IndexModel) -> bool {
        let direction = |v: &bson::Bson| {
            v.as_f64()
                .or_else(|| v.as_i64().map(|n| n as f64))
                .or_else(|| v.as_i32().map(f64::from))
        };
        let same_keys = self.keys.len() == found.keys.len()
            && self
                .keys
                .iter()
                .zip(found.keys.iter())
                .all(|((k1, v1), (k2, v2))| k1 == k2 && direction(v1) == direction(v2));
        let options = found.options.as_ref();
        let unique = options.and_then(|o| o.unique).unwrap_or(false);
        let sparse = options.and_then(|o| o.sparse).unwrap_or(false);
        same_keys && unique == self.unique && sparse == self.sparse
    }
}
use crate::pagination::{Fetched, PageRequest};
use crate::settings::MongoSettings;

/// What a repository can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached.
    #[error("MongoDB is unavailable")]
    Unavailable(#[source] Error),
    /// A unique index refused the write.
    #[error("duplicate key")]
    AlreadyExists,
    /// Any other driver error (a bug or a server-side problem).
    #[error("MongoDB error")]
    Database(#[source] Error),
}

impl From<Error> for StoreError {
    fn from(error: Error) -> Self {
        if is_duplicate_key(&error) {
            Self::AlreadyExists
        } else if is_unavailable(&error) {
            Self::Unavailable(error)
        } else {
            Self::Database(error)
        }
    }
}

impl From<bson::ser::Error> for StoreError {
    fn from(error: bson::ser::Error) -> Self {
        Self::Database(error.into())
    }
}

/// A store failure as an answer: 503 when the database is away (nothing was changed), else an
/// opaque 500 whose cause goes to the log.
impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(cause) => {
                tracing::warn!(%cause, "MongoDB unavailable");
                ApiError::new(
                    ErrorCode::DatabaseUnavailable,
                    "MongoDB is unavailable; nothing was changed. Try again.",
                )
            }
            other => ApiError::internal(&telemetry::Chain(&other)),
        }
    }
}

/// One page of `collection`: `filter` in `sort` order, from `skip`, fetched with one extra
/// item so [`Fetched`] knows whether more follow.
pub async fn find_page<T>(
    collection: &Collection<T>,
    filter: Document,
    sort: Document,
    skip: u64,
    page: &PageRequest,
    total: Option<u64>,
    cursor: impl Fn(&T) -> String,
) -> Result<Fetched<T>, StoreError>
where
    T: DeserializeOwned + Send + Sync,
{
    let items = collection
        .find(filter)
        .sort(sort)
        .skip(skip)
        .limit(page.fetch_limit())
        .await?
        .try_collect()
        .await?;
    Ok(Fetched::new(items, page, total, cursor))
}

/// `at` plus `delay`: when a lease ends or a retry is due.
pub fn after(at: bson::DateTime, delay: Duration) -> bson::DateTime {
    bson::DateTime::from_millis(at.timestamp_millis().saturating_add(delay.as_millis() as i64))
}

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
pub async fn ping(db: &Database) -> Result<(), Error> {
    db.run_command(bson::doc! {"ping": 1}).await.map(drop)
}
