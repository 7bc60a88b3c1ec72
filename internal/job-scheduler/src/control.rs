//! Start, stop and status of the sending job, shared by every replica through `job_state`.

use std::sync::Arc;
use std::time::Duration;

use bson::DateTime;
use herald_core::jobs::JobStatus;
use tokio::sync::OnceCell;
use tokio_util::task::TaskTracker;

use crate::cron::Cron;
use crate::job::SendingJob;

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
    Store(#[from] mongodb::error::Error),
}

/// Spawns runs on the task tracker, so shutdown can wait for them.
#[derive(Clone)]
pub struct Trigger {
    job: Arc<SendingJob>,
    tracker: TaskTracker,
}

impl Trigger {
    /// A trigger for `job`, tracked by `tracker`.
    pub fn new(job: Arc<SendingJob>, tracker: TaskTracker) -> Self {
        Self { job, tracker }
    }

    /// Starts a run in the background (it skips itself if one is already going).
    pub fn fire(&self) {
        if self.tracker.is_closed() {
            return;
        }
        let job = self.job.clone();
        self.tracker.spawn(async move {
            job.run_once().await;
        });
    }
}

/// The job's control surface.
pub struct JobControl {
    job: Arc<SendingJob>,
    trigger: Trigger,
    cron: OnceCell<Cron>,
    run_on_start: bool,
    /// Longest a Stop waits for in-flight runs of other replicas.
    stop_wait: Duration,
}

impl JobControl {
    /// Wires the parts; the cron schedule is attached later with [`JobControl::attach_cron`].
    pub fn new(job: Arc<SendingJob>, trigger: Trigger, run_on_start: bool, stop_wait: Duration) -> Self {
        Self {
            job,
            trigger,
            cron: OnceCell::new(),
            run_on_start,
            stop_wait,
        }
    }

    /// Attaches the running schedule (for `nextRunAt` and shutdown).
    pub fn attach_cron(&self, cron: Cron) {
        if self.cron.set(cron).is_err() {
            tracing::warn!("cron attached twice; keeping the first");
        }
    }

    /// The schedule, once attached.
    pub fn cron(&self) -> Option<&Cron> {
        self.cron.get()
    }

    /// The job.
    pub fn job(&self) -> &Arc<SendingJob> {
        &self.job
    }

    /// Starts a run now.
    pub fn trigger(&self) {
        self.trigger.fire();
    }

    /// Start: persisted for every replica; runs once at once when `run_on_start`.
    pub async fn start(&self) -> Result<JobStatus, ControlError> {
        let changed = self.job.store().set_working(true, self.job.worker_id()).await?;
        if changed.is_none() {
            return Err(ControlError::AlreadyWorking);
        }
        self.job.metrics().working.set(1);
        tracing::info!(by = self.job.worker_id(), "sending job started");
        if self.run_on_start {
            self.trigger.fire();
        }
        Ok(self.status().await?)
    }

    /// Stop: persisted for every replica; answers once no run is in flight anywhere (runs of a
    /// killed replica are ignored once they expire).
    pub async fn stop(&self) -> Result<JobStatus, ControlError> {
        let changed = self.job.store().set_working(false, self.job.worker_id()).await?;
        if changed.is_none() {
            return Err(ControlError::AlreadyStopped);
        }
        self.job.metrics().working.set(0);
        tracing::info!(
            by = self.job.worker_id(),
            "sending job stopping; waiting for runs in flight"
        );
        self.job.wait_idle().await;
        let deadline = tokio::time::Instant::now() + self.stop_wait;
        while self.job.store().in_flight_runs(DateTime::now()).await? > 0 {
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
    pub async fn status(&self) -> Result<JobStatus, mongodb::error::Error> {
        let store = self.job.store();
        let state = store.state_or_default().await?;
        let last = store.last_run_at().await?;
        let next = match self.cron.get() {
            Some(cron) if state.working => cron.next_tick().await,
            _ => None,
        };
        self.job.metrics().working.set(i64::from(state.working));
        Ok(JobStatus {
            working: state.working,
            changed_at: Some(state.changed_at.to_chrono()),
            changed_by: Some(state.changed_by),
            last_run_at: last.map(|d| d.to_chrono()),
            next_run_at: next,
        })
    }
}
