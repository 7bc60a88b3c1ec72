//! The toggle's client: asks the Job Scheduler to start or stop the sending job.

use std::time::Duration;

use herald_core::jobs::{JobStatus, RunPage};
use herald_core::pagination::{PageRequest, PageStart};
use herald_core::{ErrorBody, ErrorCode};
use layered_config::{ExposeSecret, SecretString};

use crate::error::ServiceError;

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
    http: reqwest::Client,
    base_url: String,
    key: SecretString,
}

impl SchedulerClient {
    /// A client for `base_url`, presenting `key`. Stop waits for an in-flight run, which the
    /// webhook timeout bounds, so the request timeout is generous.
    pub fn new(base_url: &str, key: SecretString, timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(2))
            .user_agent(herald_core::USER_AGENT)
            .build()?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            key,
        })
    }

    /// Sends `request` with the key and the caller's correlation id.
    async fn call(
        &self,
        request: reqwest::RequestBuilder,
        correlation_id: Option<&str>,
    ) -> Result<reqwest::Response, ServiceError> {
        let mut request = request.bearer_auth(self.key.expose_secret());
        if let Some(id) = correlation_id {
            request = request.header(telemetry::CORRELATION_HEADER, id);
        }
        request
            .send()
            .await
            .map_err(|e| ServiceError::SchedulerUnreachable(e.to_string()))
    }

    /// Reads a successful answer's JSON body.
    async fn read<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> Result<T, ServiceError> {
        response
            .json::<T>()
            .await
            .map_err(|e| ServiceError::SchedulerUnreachable(format!("unreadable answer: {e}")))
    }

    /// Sends the command and returns the job's state.
    pub async fn send(&self, command: JobCommand, correlation_id: Option<&str>) -> Result<JobStatus, ServiceError> {
        let url = format!("{}/job-scheduler/messenger/{}", self.base_url, command.path());
        let response = self.call(self.http.post(&url), correlation_id).await?;
        let status = response.status();
        if status.is_success() {
            return Self::read(response).await;
        }
        if status == reqwest::StatusCode::CONFLICT {
            let body = response.json::<ErrorBody>().await.ok();
            let code = match command {
                JobCommand::Start => ErrorCode::JobAlreadyWorking,
                JobCommand::Stop => ErrorCode::JobAlreadyStopped,
            };
            let message = body
                .map(|b| b.message)
                .unwrap_or_else(|| "The job is already in that state.".into());
            return Err(ServiceError::JobConflict { code, message });
        }
        Err(ServiceError::SchedulerUnreachable(format!("{url} answered {status}")))
    }

    /// One page of the scheduler's run history.
    pub async fn runs(&self, page: PageRequest, correlation_id: Option<&str>) -> Result<RunPage, ServiceError> {
        let url = format!("{}/job-scheduler/jobs", self.base_url);
        let mut query = vec![("limit", page.limit.to_string())];
        match page.start {
            PageStart::Offset(offset) => query.push(("offset", offset.to_string())),
            PageStart::After(after) => query.push(("after", after.to_hex())),
        }
        let response = self.call(self.http.get(&url).query(&query), correlation_id).await?;
        match response.status() {
            status if status.is_success() => Self::read(response).await,
            status => Err(ServiceError::SchedulerUnreachable(format!("{url} answered {status}"))),
        }
    }
}
