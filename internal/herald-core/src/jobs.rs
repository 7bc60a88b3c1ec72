//! The sending job's state as both services speak of it.

use chrono::{DateTime, Utc};
use poem_openapi::Object;
use serde::{Deserialize, Serialize};

/// Whether the sending job is working, and when it last and next runs.
#[derive(Debug, Clone, PartialEq, Eq, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    /// True while the job sends on its schedule.
    pub working: bool,
    /// When `working` last changed.
    pub changed_at: Option<DateTime<Utc>>,
    /// Who changed it (a replica's worker id, or `startup`).
    pub changed_by: Option<String>,
    /// When the last run that was not skipped started.
    pub last_run_at: Option<DateTime<Utc>>,
    /// When this replica's scheduler fires next.
    pub next_run_at: Option<DateTime<Utc>>,
}

/// Collection of the job's state: one document per job (owned by the Job Scheduler).
pub const JOB_STATE_COLLECTION: &str = "job_state";
/// Collection of the job's run history (owned by the Job Scheduler).
pub const JOB_RUNS_COLLECTION: &str = "job_runs";
/// Id of the one job there is.
pub const JOB_ID: &str = "messenger";

/// A document of `job_state`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStateDoc {
    /// The job's name.
    #[serde(rename = "_id")]
    pub id: String,
    /// Whether it sends.
    pub working: bool,
    /// When `working` last changed.
    pub changed_at: mongodb::bson::DateTime,
    /// Who changed it.
    pub changed_by: String,
}

/// One run of the job.
#[derive(Debug, Clone, PartialEq, Eq, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct RunView {
    /// Run id.
    pub id: String,
    /// Replica that ran it.
    pub worker: String,
    /// Start.
    pub started_at: DateTime<Utc>,
    /// End (absent while in flight).
    pub finished_at: Option<DateTime<Utc>>,
    /// Messages claimed.
    pub claimed: i32,
    /// Sent and committed.
    pub sent: i32,
    /// Scheduled for retry.
    pub retried: i32,
    /// Marked failed.
    pub failed: i32,
    /// Given back unsent (shutdown).
    pub released: i32,
    /// Why the run did nothing.
    pub skipped_reason: Option<String>,
    /// What went wrong.
    pub error: Option<String>,
}
