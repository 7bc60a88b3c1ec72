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
    #[oai(nullable)]
    pub changed_at: Option<DateTime<Utc>>,
    /// Who changed it (a replica's worker id, or `startup`).
    #[oai(nullable)]
    pub changed_by: Option<String>,
    /// When the last run that was not skipped started.
    #[oai(nullable)]
    pub last_run_at: Option<DateTime<Utc>>,
    /// When this replica's scheduler fires next.
    #[oai(nullable)]
    pub next_run_at: Option<DateTime<Utc>>,
    /// Whether the first configured provider may be sent to: open, paused until a time,
    /// misconfigured, or waiting for a probe (open when a scheduler of an earlier version
    /// leaves it out). Every provider is in `providers`.
    #[serde(default = "ProviderStatus::open")]
    #[oai(default = "ProviderStatus::open")]
    pub provider: ProviderStatus,
    /// Every configured provider's state, in configuration order.
    #[serde(default)]
    #[oai(default)]
    pub providers: Vec<ProviderStatus>,
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
    #[oai(nullable)]
    pub finished_at: Option<DateTime<Utc>>,
    /// Messages claimed.
    pub claimed: i32,
    /// Sent and committed.
    pub sent: i32,
    /// Scheduled for retry.
    pub retried: i32,
    /// Marked failed.
    pub failed: i32,
    /// Given back unsent (shutdown, or the provider paused for longer than the claim).
    pub released: i32,
    /// Not sent because their `expiresAt` passed before the send.
    #[serde(default)]
    pub expired: i32,
    /// Why the run did nothing.
    #[oai(nullable)]
    pub skipped_reason: Option<String>,
    /// What went wrong.
    #[oai(nullable)]
    pub error: Option<String>,
}

/// Collection of the provider's pause state: one document (owned by the Job Scheduler).
pub const PROVIDER_STATE_COLLECTION: &str = "provider_state";

/// The provider's pause state as stored: shared by every scheduler replica.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProviderStateDoc {
    /// The provider's name.
    #[serde(rename = "_id")]
    pub id: String,
    /// No sends before this time; after it, one probe send decides. Absent (or null): open.
    #[serde(default)]
    pub paused_until: Option<mongodb::bson::DateTime>,
    /// When the pause was last set or extended.
    #[serde(default)]
    pub paused_at: Option<mongodb::bson::DateTime>,
    /// Why it is paused.
    #[serde(default)]
    pub reason: Option<String>,
    /// Pauses since the provider last accepted a probe (the streak pause doubles with each).
    #[serde(default)]
    pub pauses_in_a_row: i32,
    /// Retryable failures in a row, across replicas.
    #[serde(default)]
    pub failure_streak: i32,
    /// The replica sending the probe.
    #[serde(default)]
    pub probe_by: Option<String>,
    /// Until when that replica holds the probe.
    #[serde(default)]
    pub probe_until: Option<mongodb::bson::DateTime>,
    /// The pause is because the provider refused Herald's credentials (401/403).
    #[serde(default)]
    pub misconfigured: bool,
}

/// Whether Herald may send to the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, poem_openapi::Enum, Serialize, Deserialize)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum ProviderState {
    /// Sending.
    Open,
    /// Nobody sends until `pausedUntil`.
    Paused,
    /// The pause is over; one probe send decides whether sending resumes.
    Probing,
    /// Paused because it refused Herald's credentials (401/403): fix its key; a probe after
    /// the pause tries again.
    Misconfigured,
}

/// The provider's pause state as the services answer it.
#[derive(Debug, Clone, PartialEq, Eq, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ProviderStatus {
    /// The provider's name (`default` for `[webhook]`).
    #[serde(default = "default_name")]
    #[oai(default = "default_name")]
    pub name: String,
    /// open, paused, misconfigured or probing.
    pub state: ProviderState,
    /// No sends before this time.
    #[oai(nullable)]
    pub paused_until: Option<DateTime<Utc>>,
    /// When the pause was set or last extended.
    #[oai(nullable)]
    pub paused_at: Option<DateTime<Utc>>,
    /// Why it paused (a Retry-After, a failure streak, refused credentials, a failed probe).
    #[oai(nullable)]
    pub reason: Option<String>,
    /// Retryable failures in a row, across replicas.
    pub failure_streak: i32,
}

impl ProviderStatus {
    /// Open, as before any pause.
    pub fn open() -> Self {
        Self::open_named(&default_name())
    }

    /// Provider `name`, open.
    pub fn open_named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            state: ProviderState::Open,
            paused_until: None,
            paused_at: None,
            reason: None,
            failure_streak: 0,
        }
    }
}

fn default_name() -> String {
    "default".to_owned()
}

fn utc(at: mongodb::bson::DateTime) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or_default()
}

impl ProviderStateDoc {
    /// The state at `now`.
    pub fn status(&self, now: DateTime<Utc>) -> ProviderStatus {
        let until = self.paused_until.map(utc);
        ProviderStatus {
            name: self.id.clone(),
            state: match until {
                None => ProviderState::Open,
                Some(at) if at > now && self.misconfigured => ProviderState::Misconfigured,
                Some(at) if at > now => ProviderState::Paused,
                Some(_) => ProviderState::Probing,
            },
            paused_until: until,
            paused_at: self.paused_at.map(utc),
            reason: self.reason.clone().filter(|_| until.is_some()),
            failure_streak: self.failure_streak,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_reads_paused_then_probing_and_no_pause_open() {
        let now = Utc::now();
        let mut doc = ProviderStateDoc {
            id: "default".into(),
            ..Default::default()
        };
        assert_eq!(doc.status(now).state, ProviderState::Open);
        let later = now + chrono::Duration::seconds(5);
        doc.paused_until = Some(mongodb::bson::DateTime::from_millis(later.timestamp_millis()));
        doc.reason = Some("Retry-After".into());
        assert_eq!(doc.status(now).state, ProviderState::Paused);
        assert_eq!(
            doc.status(now + chrono::Duration::seconds(6)).state,
            ProviderState::Probing
        );
        doc.paused_until = None;
        assert_eq!(doc.status(now).reason, None);
    }
}
