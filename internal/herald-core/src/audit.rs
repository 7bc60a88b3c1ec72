//! The audit trail: every operator action of either service (start, stop, the toggle, retry
//! one, bulk re-queue) is written to the `audit` collection — who (the key's name), what, when,
//! from which address, with what result — before the action answers, whether it succeeded or
//! not. Entries are listed by `GET /api/messenger/audit`, reach the live feed as
//! `audit.recorded`, show in the console, and are kept as long as the run history.

use std::time::Duration;

use mongodb::bson::oid::ObjectId;
use mongodb::bson::{self, doc, DateTime, Document};
use mongodb::options::IndexOptions;
use mongodb::{Collection, Database, IndexModel};
use poem::Request;
use poem_openapi::Object;
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::errors::ApiError;
use crate::mongo::{find_page, StoreError};
use crate::pagination::{Fetched, PageRequest, PageStart};

/// The collection's name.
pub const AUDIT_COLLECTION: &str = "audit";

/// One stored entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditDoc {
    /// Its id (time-ordered).
    #[serde(rename = "_id")]
    pub id: ObjectId,
    /// When the action was answered.
    pub at: DateTime,
    /// The key's name.
    pub key: String,
    /// What was done: `job.start`, `job.stop`, `job.toggle`, `message.retry`, `messages.requeue`.
    pub action: String,
    /// Which service it was asked of.
    pub service: String,
    /// The message, command or filter it was about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// How many messages it changed, when it changes messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
    /// The client's address as the service saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// `X-Forwarded-For`, when a balancer set one (as sent: not proof of anything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded_for: Option<String>,
    /// `ok` or `failed`.
    pub result: String,
    /// The internal code it failed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u32>,
    /// The request's correlation id, to find its log lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

/// An entry as the API shows it.
#[derive(Debug, Clone, PartialEq, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Its id (a `nextCursor` when last on a page).
    pub id: String,
    /// When the action was answered.
    pub at: chrono::DateTime<chrono::Utc>,
    /// The name of the key that asked.
    pub key: String,
    /// `job.start`, `job.stop`, `job.toggle`, `message.retry` or `messages.requeue`.
    pub action: String,
    /// `messenger-api` or `job-scheduler`.
    pub service: String,
    /// The message, command or filter it was about.
    #[oai(nullable)]
    pub target: Option<String>,
    /// How many messages it changed.
    #[oai(nullable)]
    pub count: Option<i64>,
    /// The client's address.
    #[oai(nullable)]
    pub from: Option<String>,
    /// `X-Forwarded-For` as a balancer sent it.
    #[oai(nullable)]
    pub forwarded_for: Option<String>,
    /// `ok` or `failed`.
    pub result: String,
    /// The internal code of a failure.
    #[oai(nullable)]
    pub code: Option<u32>,
    /// The request's correlation id.
    #[oai(nullable)]
    pub correlation_id: Option<String>,
}

impl From<AuditDoc> for AuditEntry {
    fn from(d: AuditDoc) -> Self {
        Self {
            id: d.id.to_hex(),
            at: chrono::DateTime::from_timestamp_millis(d.at.timestamp_millis()).unwrap_or_default(),
            key: d.key,
            action: d.action,
            service: d.service,
            target: d.target,
            count: d.count,
            from: d.from,
            forwarded_for: d.forwarded_for,
            result: d.result,
            code: d.code,
            correlation_id: d.correlation_id,
        }
    }
}

impl AuditDoc {
    /// The entry of `change`'s document (the live feed reads inserted entries back).
    pub fn from_document(document: Document) -> Option<Self> {
        bson::from_document(document).ok()
    }
}

/// The `audit` collection of one service.
#[derive(Clone)]
pub struct AuditStore {
    entries: Collection<AuditDoc>,
    service: &'static str,
}

impl AuditStore {
    /// The store over `db.audit`, writing as `service`.
    pub fn new(db: &Database, service: &'static str) -> Self {
        Self {
            entries: db.collection(AUDIT_COLLECTION),
            service,
        }
    }

    /// The retention index: entries go after `keep` (like the run history).
    pub async fn ensure_indexes(&self, keep: Duration) -> Result<(), StoreError> {
        self.entries
            .create_index(
                IndexModel::builder()
                    .keys(doc! {"at": 1})
                    .options(
                        IndexOptions::builder()
                            .name("audit_retention".to_owned())
                            .expire_after(keep)
                            .build(),
                    )
                    .build(),
            )
            .await?;
        Ok(())
    }

    /// An entry for the action `action` asked by `caller` through `req`, to finish with the
    /// action's outcome.
    pub fn entry(&self, req: &Request, caller: &Caller, action: &'static str) -> PendingEntry<'_> {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        PendingEntry {
            store: self,
            doc: AuditDoc {
                id: ObjectId::new(),
                at: DateTime::now(),
                key: caller.name.to_string(),
                action: action.to_owned(),
                service: self.service.to_owned(),
                target: None,
                count: None,
                from: req.remote_addr().as_socket_addr().map(|a| a.ip().to_string()),
                forwarded_for: header("x-forwarded-for"),
                result: String::new(),
                code: None,
                correlation_id: req
                    .extensions()
                    .get::<telemetry::CorrelationIdValue>()
                    .map(|c| c.0.clone())
                    .or_else(|| header(telemetry::CORRELATION_HEADER)),
            },
        }
    }

    /// Entries newest first.
    pub async fn list(&self, page: &PageRequest) -> Result<Fetched<AuditDoc>, StoreError> {
        let (filter, total, skip) = match page.start {
            PageStart::After(after) => (doc! {"_id": {"$lt": after}}, None, 0),
            PageStart::Offset(offset) => (doc! {}, Some(self.entries.count_documents(doc! {}).await?), offset),
        };
        find_page(&self.entries, filter, doc! {"_id": -1}, skip, page, total, |e| {
            e.id.to_hex()
        })
        .await
    }
}

/// An entry waiting for its action's outcome.
pub struct PendingEntry<'a> {
    store: &'a AuditStore,
    doc: AuditDoc,
}

impl PendingEntry<'_> {
    /// What the action was about.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.doc.target = Some(target.into());
        self
    }

    /// Writes the entry with `outcome`, then hands the outcome back to be answered. A failed
    /// write is logged at error level with everything the entry held; the answer is not held
    /// back (the action itself already happened).
    pub async fn finish<T>(
        mut self,
        outcome: Result<T, ApiError>,
        count: impl Fn(&T) -> Option<i64>,
    ) -> Result<T, ApiError> {
        self.doc.at = DateTime::now();
        match &outcome {
            Ok(value) => {
                self.doc.result = "ok".into();
                self.doc.count = count(value);
            }
            Err(error) => {
                self.doc.result = "failed".into();
                self.doc.code = Some(error.code.code());
            }
        }
        if let Err(error) = self.store.entries.insert_one(&self.doc).await {
            tracing::error!(error = %error, entry = ?self.doc, "audit entry not written");
        } else {
            tracing::info!(key = %self.doc.key, action = %self.doc.action, result = %self.doc.result, "audit");
        }
        outcome
    }
}
