//! The schedule. tokio-cron-scheduler decides *when*; what a tick does is the callback given to
//! [`Cron::new`] (in Herald: start a tracked run, which skips itself when one is going or the
//! job is stopped).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::Mutex;
use tokio_cron_scheduler::{Job, JobScheduler};
use uuid::Uuid;

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
