//! When runs start. tokio-cron-scheduler decides *when* a tick comes ([`Cron`]); a tick, a
//! Start, or in drain mode an idle poll fires a run through the [`Trigger`], which tracks it
//! so shutdown waits for it. A run skips itself when one is going or the job is stopped.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Mutex;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::job::SendingJob;

/// A schedule: built (and its expression checked) by [`Cron::new`], ticking after
/// [`Cron::start`].
pub struct Cron {
    scheduler: Mutex<JobScheduler>,
    job_id: Uuid,
}

impl Cron {
    /// A schedule that calls `tick` on `schedule` (cron with seconds, UTC) once started.
    pub async fn new<F>(schedule: &str, tick: F) -> anyhow::Result<Self>
    where
        F: Fn() + Send + Sync + 'static,
    {
        let tick = Arc::new(tick);
        let job = Job::new_async(schedule, move |_id, _scheduler| {
            let tick = tick.clone();
            Box::pin(async move { tick() })
        })
        .map_err(|e| anyhow::anyhow!("job_scheduler.schedule ({schedule:?}) is not a valid cron expression: {e}"))?;
        let scheduler = JobScheduler::new().await?;
        let job_id = scheduler.add(job).await?;
        Ok(Self {
            scheduler: Mutex::new(scheduler),
            job_id,
        })
    }

    /// Starts ticking.
    pub async fn start(&self) -> anyhow::Result<()> {
        self.scheduler.lock().await.start().await?;
        Ok(())
    }

    /// When the schedule fires next.
    pub async fn next_tick(&self) -> Option<DateTime<Utc>> {
        let mut scheduler = self.scheduler.lock().await;
        scheduler.next_tick_for_job(self.job_id).await.ok().flatten()
    }

    /// Stops ticking.
    pub async fn shutdown(&self) {
        if let Err(error) = self.scheduler.lock().await.shutdown().await {
            tracing::warn!(%error, "cron scheduler did not shut down cleanly");
        }
    }
}

/// Starts runs of the job on the task tracker, so shutdown can wait for them.
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

    /// Drain mode: looks for due messages every `every` while idle (a poll that finds some
    /// drains them), until `shutdown`.
    pub fn poll_while_idle(&self, every: Duration, shutdown: CancellationToken) {
        let job = self.job.clone();
        self.tracker.spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(every) => {
                        job.poll_once().await;
                    }
                }
            }
        });
    }
}
