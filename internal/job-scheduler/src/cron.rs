//! The schedule. tokio-cron-scheduler decides *when*; [`crate::control::Trigger`] decides
//! what a tick does (a tracked run that skips itself when one is going or the job is stopped).

use chrono::{DateTime, Utc};
use tokio::sync::Mutex;
use tokio_cron_scheduler::{Job, JobScheduler};
use uuid::Uuid;

use crate::control::Trigger;

/// A started schedule.
pub struct Cron {
    scheduler: Mutex<JobScheduler>,
    job_id: Uuid,
}

impl Cron {
    /// Starts firing `trigger` on `schedule` (cron with seconds, UTC).
    pub async fn start(schedule: &str, trigger: Trigger) -> anyhow::Result<Self> {
        let job = Job::new_async(schedule, move |_id, _scheduler| {
            let trigger = trigger.clone();
            Box::pin(async move { trigger.fire() })
        })
        .map_err(|e| anyhow::anyhow!("job_scheduler.schedule ({schedule:?}) is not a valid cron expression: {e}"))?;
        let scheduler = JobScheduler::new().await?;
        let job_id = scheduler.add(job).await?;
        scheduler.start().await?;
        Ok(Self {
            scheduler: Mutex::new(scheduler),
            job_id,
        })
    }

    /// When the schedule fires next.
    pub async fn next_tick(&self) -> Option<DateTime<Utc>> {
        let mut scheduler = self.scheduler.lock().await;
        scheduler.next_tick_for_job(self.job_id).await.ok().flatten()
    }

    /// Stops firing.
    pub async fn shutdown(&self) {
        if let Err(error) = self.scheduler.lock().await.shutdown().await {
            tracing::warn!(%error, "cron scheduler did not shut down cleanly");
        }
    }
}
