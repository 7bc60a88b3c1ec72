//! The scheduler's own collections; all their BSON lives here.
//! - this file: `job_state` (one document per job) and `job_runs` (TTL-indexed run history).
//! - `provider`: `provider_state`, the provider pause every replica shares.

mod provider;

pub use provider::ProviderStore;

use std::time::Duration;

use bson::oid::ObjectId;
use bson::{doc, DateTime};
use herald_core::jobs::RunView;
use herald_core::mongo::find_page;
pub use herald_core::mongo::StoreError;
use herald_core::pagination::{Fetched, PageRequest, PageStart};
use mongodb::options::{FindOneAndUpdateOptions, IndexOptions, ReturnDocument};
use mongodb::{Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};

pub use herald_core::jobs::{JobStateDoc, JOB_ID};
use herald_core::jobs::{JOB_RUNS_COLLECTION, JOB_STATE_COLLECTION};

/// A document of `job_runs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRunDoc {
    /// Run id.
    #[serde(rename = "_id")]
    pub id: ObjectId,
    /// Replica that ran it.
    pub worker: String,
    /// Start.
    pub started_at: DateTime,
    /// End; absent while the run is in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime>,
    /// After this an unfinished run is taken for dead (its replica was killed).
    pub expires_at: DateTime,
    /// Messages claimed.
    pub claimed: i32,
    /// Accepted by the provider and committed.
    pub sent: i32,
    /// Scheduled for retry.
    pub retried: i32,
    /// Marked failed.
    pub failed: i32,
    /// Given back unsent (shutdown, or a provider pause longer than the claim).
    #[serde(default)]
    pub released: i32,
    /// Not sent because their `expires_at` passed first.
    #[serde(default)]
    pub expired: i32,
    /// Why the run did nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_reason: Option<String>,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl JobRunDoc {
    /// A run that has started and done nothing yet.
    pub fn started(worker: &str, started_at: DateTime, expires_at: DateTime) -> Self {
        Self {
            id: ObjectId::new(),
            worker: worker.to_owned(),
            started_at,
            finished_at: None,
            expires_at,
            claimed: 0,
            sent: 0,
            retried: 0,
            failed: 0,
            released: 0,
            expired: 0,
            skipped_reason: None,
            error: None,
        }
    }
}

impl From<JobRunDoc> for RunView {
    fn from(r: JobRunDoc) -> Self {
        Self {
            id: r.id.to_hex(),
            worker: r.worker,
            started_at: r.started_at.to_chrono(),
            finished_at: r.finished_at.map(|d| d.to_chrono()),
            claimed: r.claimed,
            sent: r.sent,
            retried: r.retried,
            failed: r.failed,
            released: r.released,
            expired: r.expired,
            skipped_reason: r.skipped_reason,
            error: r.error,
        }
    }
}

/// The repository over `job_state` and `job_runs`.
#[derive(Clone)]
pub struct JobStore {
    db: Database,
    state: Collection<JobStateDoc>,
    runs: Collection<JobRunDoc>,
}

/// What the store answers with.
pub type StoreResult<T> = Result<T, StoreError>;

impl JobStore {
    /// The store over `db`.
    pub fn new(db: &Database) -> Self {
        Self {
            db: db.clone(),
            state: db.collection(JOB_STATE_COLLECTION),
            runs: db.collection(JOB_RUNS_COLLECTION),
        }
    }

    /// Indexes: TTL on `started_at` (history kept `history`), and the in-flight lookup.
    pub async fn ensure_indexes(&self, history: Duration) -> StoreResult<()> {
        self.runs
            .create_indexes(vec![
                IndexModel::builder()
                    .keys(doc! {"started_at": 1})
                    .options(
                        IndexOptions::builder()
                            .name("history_ttl".to_owned())
                            .expire_after(history)
                            .build(),
                    )
                    .build(),
                IndexModel::builder()
                    .keys(doc! {"finished_at": 1, "expires_at": 1})
                    .options(IndexOptions::builder().name("in_flight".to_owned()).build())
                    .build(),
            ])
            .await?;
        Ok(())
    }

    /// Creates the job's state as working unless it exists (a stopped job stays stopped across
    /// restarts). Returns the state.
    pub async fn init_state(&self, by: &str) -> StoreResult<JobStateDoc> {
        let now = DateTime::now();
        let state = self
            .state
            .find_one_and_update(
                doc! {"_id": JOB_ID},
                doc! {"$setOnInsert": {"working": true, "changed_at": now, "changed_by": by}},
            )
            .with_options(
                FindOneAndUpdateOptions::builder()
                    .upsert(true)
                    .return_document(ReturnDocument::After)
                    .build(),
            )
            .await?;
        match state {
            Some(state) => Ok(state),
            None => self.state_or_default().await,
        }
    }

    /// The current state (working when never set).
    pub async fn state_or_default(&self) -> StoreResult<JobStateDoc> {
        Ok(self.state.find_one(doc! {"_id": JOB_ID}).await?.unwrap_or(JobStateDoc {
            id: JOB_ID.into(),
            working: true,
            changed_at: DateTime::now(),
            changed_by: "default".into(),
        }))
    }

    /// Sets `working` if it is not already so. `None` when it already was.
    pub async fn set_working(&self, working: bool, by: &str) -> StoreResult<Option<JobStateDoc>> {
        let now = DateTime::now();
        Ok(self
            .state
            .find_one_and_update(
                doc! {"_id": JOB_ID, "working": !working},
                doc! {"$set": {"working": working, "changed_at": now, "changed_by": by}},
            )
            .with_options(
                FindOneAndUpdateOptions::builder()
                    .return_document(ReturnDocument::After)
                    .build(),
            )
            .await?)
    }

    /// Records a run as started (in flight until [`JobStore::finish_run`]).
    pub async fn begin_run(&self, run: &JobRunDoc) -> StoreResult<()> {
        self.runs.insert_one(run).await?;
        Ok(())
    }

    /// Stores the run as it is now — its progress while in flight, or its result (inserting it
    /// if `begin_run` never did).
    pub async fn finish_run(&self, run: &JobRunDoc) -> StoreResult<()> {
        self.runs.replace_one(doc! {"_id": run.id}, run).upsert(true).await?;
        Ok(())
    }

    /// Removes a run that turned out to be an empty idle poll.
    pub async fn discard_run(&self, id: ObjectId) -> StoreResult<()> {
        self.runs.delete_one(doc! {"_id": id}).await?;
        Ok(())
    }

    /// Runs in flight on any replica (unfinished and not expired).
    pub async fn in_flight_runs(&self, now: DateTime) -> StoreResult<u64> {
        Ok(self
            .runs
            .count_documents(doc! {"finished_at": {"$exists": false}, "expires_at": {"$gt": now}})
            .await?)
    }

    /// Start of the last run that was not skipped.
    pub async fn last_run_at(&self) -> StoreResult<Option<DateTime>> {
        Ok(self
            .runs
            .find_one(doc! {"skipped_reason": {"$exists": false}})
            .sort(doc! {"_id": -1})
            .await?
            .map(|r| r.started_at))
    }

    /// Run history, newest first.
    pub async fn list_runs(&self, page: &PageRequest) -> StoreResult<Fetched<JobRunDoc>> {
        let (filter, total, skip) = match page.start {
            PageStart::After(after) => (doc! {"_id": {"$lt": after}}, None, 0),
            PageStart::Offset(offset) => (doc! {}, Some(self.runs.count_documents(doc! {}).await?), offset),
        };
        find_page(&self.runs, filter, doc! {"_id": -1}, skip, page, total, |r| {
            r.id.to_hex()
        })
        .await
    }

    /// Pings the database (readiness).
    pub async fn ping(&self) -> Result<(), mongodb::error::Error> {
        herald_core::mongo::ping(&self.db).await
    }
}
