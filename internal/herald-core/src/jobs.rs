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
