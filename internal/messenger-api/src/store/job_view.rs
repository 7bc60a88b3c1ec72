//! The sending job as the Messenger API reads it: `job_state`, the start of the last run and
//! each configured provider's pause state,
//! read straight from MongoDB (the Job Scheduler owns and writes both), so the stats and the
//! console show the job even while no scheduler replica is up.

use bson::{doc, Document};
use futures::TryStreamExt;
use herald_core::jobs::{
    JobStateDoc, JobStatus, ProviderStateDoc, ProviderStatus, JOB_ID, JOB_RUNS_COLLECTION, JOB_STATE_COLLECTION,
    PROVIDER_STATE_COLLECTION,
};
use mongodb::{Collection, Database};

use crate::error::StoreError;

/// Read-only access to the scheduler's collections.
#[derive(Clone)]
pub struct JobView {
    state: Collection<JobStateDoc>,
    runs: Collection<Document>,
    provider: Collection<ProviderStateDoc>,
    /// The configured providers, in order.
    names: Vec<String>,
}

impl JobView {
    /// The view over `db` of the providers `names`.
    pub fn new(db: &Database, names: Vec<String>) -> Self {
        Self {
            state: db.collection(JOB_STATE_COLLECTION),
            runs: db.collection(JOB_RUNS_COLLECTION),
            provider: db.collection(PROVIDER_STATE_COLLECTION),
            names,
        }
    }

    /// Every configured provider's state, in configuration order (open when never paused).
    pub async fn providers(&self) -> Result<Vec<ProviderStatus>, StoreError> {
        let docs: Vec<ProviderStateDoc> = self
            .provider
            .find(doc! {"_id": {"$in": &self.names}})
            .await?
            .try_collect()
            .await?;
        let now = chrono::Utc::now();
        Ok(self
            .names
            .iter()
            .map(|name| {
                docs.iter()
                    .find(|d| &d.id == name)
                    .map_or_else(|| ProviderStatus::open_named(name), |d| d.status(now))
            })
            .collect())
    }

    /// The job's state, or `None` before any scheduler has started.
    pub async fn status(&self) -> Result<Option<JobStatus>, StoreError> {
        let Some(state) = self.state.find_one(doc! {"_id": JOB_ID}).await? else {
            return Ok(None);
        };
        let last_run = self
            .runs
            .find_one(doc! {"skipped_reason": {"$exists": false}})
            .sort(doc! {"_id": -1})
            .projection(doc! {"started_at": 1})
            .await?;
        let providers = self.providers().await?;
        let provider = providers.first().cloned().unwrap_or_else(ProviderStatus::open);
        Ok(Some(JobStatus {
            working: state.working,
            changed_at: Some(state.changed_at.to_chrono()),
            changed_by: Some(state.changed_by),
            last_run_at: last_run
                .and_then(|run| run.get_datetime("started_at").ok().copied())
                .map(|at| at.to_chrono()),
            next_run_at: None,
            provider,
            providers,
        }))
    }
}
