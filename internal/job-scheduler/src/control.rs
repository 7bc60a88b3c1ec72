//! The Job Scheduler's service: start, stop and status of the sending job (shared by every
//! replica through `job_state`), its run history and readiness. Routes call only this.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bson::DateTime;
use herald_core::jobs::{JobStatus, ProviderStatus, RunView};
use herald_core::pagination::{Page, PageRequest};
use herald_core::probes::{self, ReadyResponse};

use crate::job::SendingJob;
use crate::lanes::Lanes;
use crate::messenger_client::MessengerClient;
use crate::metrics::SchedulerMetrics;
use crate::schedule::{Cron, Trigger};
use crate::store::{JobStore, StoreError};

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Start while working.
    #[error("the sending job is already working")]
    AlreadyWorking,
    /// Stop while stopped.
    #[error("the sending job is already stopped")]
    AlreadyStopped,
    /// MongoDB failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`JobControl`] is built from.
pub struct ControlParts {
    /// The job of this replica.
    pub job: Arc<SendingJob>,
    /// Its collections.
    pub store: JobStore,
    /// Its metrics.
    pub metrics: SchedulerMetrics,
    /// Starts tracked runs.
    pub trigger: Trigger,
    /// The schedule (ticking once the application starts it).
    pub cron: Cron,
    /// The Messenger API, for readiness.
    pub messenger: MessengerClient,
    /// The providers, for their states in the status.
    pub lanes: Arc<Lanes>,
    /// Run once at once when started.
    pub run_on_start: bool,
    /// Longest a Stop waits for in-flight runs of other replicas.
    pub stop_wait: Duration,
}

/// The job's control surface.
pub struct JobControl {
    parts: ControlParts,
}

impl JobControl {
    /// The service over its parts.
    pub fn new(parts: ControlParts) -> Self {
        Self { parts }
    }

    /// The job of this replica (tests call `run_once` on it).
    pub fn job(&self) -> &Arc<SendingJob> {
        &self.parts.job
    }

    /// The schedule.
    pub fn cron(&self) -> &Cron {
        &self.parts.cron
    }

    /// Starts a run now, in the background.
    pub fn trigger(&self) {
        self.parts.trigger.fire();
    }

    /// The trigger, for the drain-mode idle poller.
    pub fn runs_trigger(&self) -> &Trigger {
        &self.parts.trigger
    }

    /// Start: persisted for every replica; runs once at once when `run_on_start`.
    pub async fn start(&self) -> Result<JobStatus, ControlError> {
        let by = self.parts.job.worker_id();
        if self.parts.store.set_working(true, by).await?.is_none() {
            return Err(ControlError::AlreadyWorking);
        }
        self.parts.metrics.working.set(1);
        tracing::info!(by, "sending job started");
        if self.parts.run_on_start {
            self.trigger();
        }
        Ok(self.status().await?)
    }

    /// Stop: persisted for every replica; answers once no run is in flight anywhere (runs of a
    /// killed replica are ignored once they expire).
    pub async fn stop(&self) -> Result<JobStatus, ControlError> {
        let by = self.parts.job.worker_id();
        if self.parts.store.set_working(false, by).await?.is_none() {
            return Err(ControlError::AlreadyStopped);
        }
        self.parts.metrics.working.set(0);
        tracing::info!(by, "sending job stopping; waiting for runs in flight");
        // One deadline for this replica's run and everyone else's, so the whole wait stays
        // within the stop wait that the Messenger API's toggle timeout is derived from.
        let deadline = tokio::time::Instant::now() + self.parts.stop_wait;
        if tokio::time::timeout_at(deadline, self.parts.job.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!("this replica's run is still going after the stop wait; answering anyway");
        }
        while self.parts.store.in_flight_runs(DateTime::now()).await? > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("runs of other replicas still in flight after the stop wait; answering anyway");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::info!("sending job stopped");
        Ok(self.status().await?)
    }

    /// The job's state as this replica sees it.
    pub async fn status(&self) -> Result<JobStatus, StoreError> {
        let store = &self.parts.store;
        let state = store.state_or_default().await?;
        let last = store.last_run_at().await?;
        let mut providers = Vec::with_capacity(self.parts.lanes.all().len());
        for lane in self.parts.lanes.all() {
            providers.push(lane.gate.status().await?);
        }
        // The first configured provider (there is always one).
        let provider = providers.first().cloned().unwrap_or_else(ProviderStatus::open);
        let next = if state.working {
            self.parts.cron.next_tick().await
        } else {
            None
        };
        self.parts.metrics.working.set(i64::from(state.working));
        Ok(JobStatus {
            working: state.working,
            changed_at: Some(state.changed_at.to_chrono()),
            changed_by: Some(state.changed_by),
            last_run_at: last.map(|d| d.to_chrono()),
            next_run_at: next,
            provider,
            providers,
        })
    }

    /// A page of the run history of every replica, newest first.
    pub async fn runs(&self, page: &PageRequest) -> Result<Page<RunView>, StoreError> {
        Ok(self.parts.store.list_runs(page).await?.into_page(page, RunView::from))
    }

    /// Readiness: MongoDB is critical, the Messenger API only degrades.
    pub async fn readiness(&self) -> ReadyResponse {
        let deadline = Duration::from_secs(2);
        let (mongo, api) = tokio::join!(
            probes::check(true, deadline, self.parts.store.ping()),
            probes::check(false, deadline, self.parts.messenger.ping()),
        );
        probes::verdict(BTreeMap::from([
            ("mongodb".to_owned(), mongo),
            ("messengerApi".to_owned(), api),
        ]))
    }
}
