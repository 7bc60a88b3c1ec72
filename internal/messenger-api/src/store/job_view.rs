//! The sending job as the Messenger API reads it: `job_state`, the start of the last run and
//! the provider's pause state,
//! read straight from MongoDB (the Job Scheduler owns and writes both), so the stats and the
//! console show the job even while no scheduler replica is up.

use bson::{doc, Document};
use herald_core::jobs::{
    JobStateDoc, JobStatus, ProviderStateDoc, ProviderStatus, JOB_ID, JOB_RUNS_COLLECTION, JOB_STATE_COLLECTION,
    PROVIDER_ID, PROVIDER_STATE_COLLECTION,
};
use mongodb::{Collection, Database};

use crate::error::StoreError;

/// Read-only access to the scheduler's collections.
#[derive(Clone)]
pub struct JobView {
    state: Collection<JobStateDoc>,
    runs: Collection<Document>,
    provider: Collection<ProviderStateDoc>,
}

impl JobView {
    /// The view over `db`.
    pub fn new(db: &Database) -> Self {
        Self {
            state: db.collection(JOB_STATE_COLLECTION),
            runs: db.collection(JOB_RUNS_COLLECTION),
            provider: db.collection(PROVIDER_STATE_COLLECTION),
        }
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
        let provider = self
            .provider
            .find_one(doc! {"_id": PROVIDER_ID})
            .await?
            .map_or_else(ProviderStatus::open, |p| p.status(chrono::Utc::now()));
        Ok(Some(JobStatus {
            working: state.working,
            changed_at: Some(state.changed_at.to_chrono()),
            changed_by: Some(state.changed_by),
            last_run_at: last_run
                .and_then(|run| run.get_datetime("started_at").ok().copied())
                .map(|at| at.to_chrono()),
            next_run_at: None,
            provider,
        }))
    }
}
