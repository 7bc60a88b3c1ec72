//! The sending job as the Messenger API steers it: every command goes to the Job Scheduler,
//! which owns the job, over its control surface ([`SchedulerClient`]).

use std::time::Duration;

use herald_core::jobs::{JobStatus, RunView};
use herald_core::pagination::{Page, PageRequest, PageStart};
use herald_core::peer::PeerClient;
use herald_core::{ErrorBody, ErrorCode};
use layered_config::SecretString;
use reqwest::{Method, StatusCode};

use crate::error::ServiceError;

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

/// `start` or `stop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobCommand {
    /// Start sending.
    Start,
    /// Stop sending.
    Stop,
}

impl JobCommand {
    /// Parses the query parameter.
    pub fn parse(text: &str) -> Result<Self, ServiceError> {
        match text {
            "start" => Ok(Self::Start),
            "stop" => Ok(Self::Stop),
            _ => Err(ServiceError::invalid(
                ErrorCode::InvalidCommand,
                "command must be `start` or `stop`",
            )),
        }
    }

    fn path(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
        }
    }
}

/// HTTP client of the Job Scheduler's control surface.
#[derive(Clone)]
pub struct SchedulerClient {
    peer: PeerClient,
}

impl SchedulerClient {
    /// A client for `base_url`, presenting `key`. Stop waits for an in-flight run, which the
    /// webhook timeout bounds, so the request timeout is generous.
    pub fn new(base_url: &str, key: SecretString, timeout: Duration) -> reqwest::Result<Self> {
        Ok(Self {
            peer: PeerClient::new(base_url, key, timeout)?,
        })
    }

    /// Sends the command and returns the job's state.
    pub async fn send(&self, command: JobCommand, correlation_id: Option<&str>) -> Result<JobStatus, ServiceError> {
        let path = format!("/job-scheduler/messenger/{}", command.path());
        let result = self
            .peer
            .call::<_, JobStatus>(Method::POST, &path, &(), correlation_id)
            .await;
        match result {
            Err(error) if error.status() == Some(StatusCode::CONFLICT) => {
                let message = error
                    .body()
                    .and_then(|body| serde_json::from_str::<ErrorBody>(body).ok())
                    .map(|b| b.message)
                    .unwrap_or_else(|| "The job is already in that state.".into());
                let code = match command {
                    JobCommand::Start => ErrorCode::JobAlreadyWorking,
                    JobCommand::Stop => ErrorCode::JobAlreadyStopped,
                };
                Err(ServiceError::JobConflict { code, message })
            }
            other => Ok(other?),
        }
    }

    /// One page of the scheduler's run history.
    pub async fn runs(&self, page: PageRequest, correlation_id: Option<&str>) -> Result<Page<RunView>, ServiceError> {
        let mut query = vec![("limit", page.limit.to_string())];
        match page.start {
            PageStart::Offset(offset) => query.push(("offset", offset.to_string())),
            PageStart::After(after) => query.push(("after", after.to_hex())),
        }
        Ok(self.peer.get("/job-scheduler/jobs", &query, correlation_id).await?)
    }
}
