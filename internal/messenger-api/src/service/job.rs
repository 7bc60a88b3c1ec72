//! The sending job as the Messenger API steers it: every command goes to the Job Scheduler,
//! which owns the job.

use herald_core::jobs::{JobStatus, RunView};
use herald_core::pagination::{Page, PageRequest};

use crate::error::ServiceError;
use crate::scheduler_client::{JobCommand, SchedulerClient};

/// Start/stop and run history, asked of the Job Scheduler.
pub struct JobRemote {
    scheduler: SchedulerClient,
}

impl JobRemote {
    /// Steers the job through `scheduler`.
    pub fn new(scheduler: SchedulerClient) -> Self {
        Self { scheduler }
    }

    /// Asks the Job Scheduler to `start` or `stop`.
    pub async fn toggle(&self, command: &str, correlation_id: Option<&str>) -> Result<JobStatus, ServiceError> {
        let command = JobCommand::parse(command)?;
        self.scheduler.send(command, correlation_id).await
    }

    /// One page of the scheduler's run history.
    pub async fn runs(&self, page: PageRequest, correlation_id: Option<&str>) -> Result<Page<RunView>, ServiceError> {
        self.scheduler.runs(page, correlation_id).await
    }
}
