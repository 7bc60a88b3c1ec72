//! The Job Scheduler's HTTP surface: start, stop (each written to the audit), is-working, run
//! history, probes.

use std::sync::Arc;

use herald_core::api_errors;
use herald_core::audit::AuditStore;
use herald_core::auth::{MetricsKey, OperatorKey};
use herald_core::jobs::{JobStatus, RunView};
use herald_core::pagination::{Page, PageRequest};
use herald_core::probes::{Health, ReadyResponse};
use herald_core::{ApiError, ErrorCode};
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, Tags};

use crate::control::{ControlError, JobControl};

/// Operation groups.
#[derive(Tags)]
pub enum SchedulerTags {
    /// Start, stop and inspect the sending job.
    Job,
    /// Liveness and readiness.
    Probes,
}

api_errors!(StartErrors: 401, 409, 500, 503);
api_errors!(StatusErrors: 401, 500, 503);
api_errors!(HistoryErrors: 400, 401, 500, 503);

/// The job's state.
#[derive(ApiResponse)]
pub enum StatusResponse {
    /// The state after the call.
    #[oai(status = 200)]
    Ok(Json<JobStatus>),
}

/// Run history.
#[derive(ApiResponse)]
pub enum HistoryResponse {
    /// Newest first.
    #[oai(status = 200)]
    Ok(Json<Page<RunView>>),
}

impl From<ControlError> for ApiError {
    fn from(error: ControlError) -> Self {
        match error {
            ControlError::AlreadyWorking => {
                ApiError::new(ErrorCode::JobAlreadyWorking, "The sending job is already working.")
            }
            ControlError::AlreadyStopped => {
                ApiError::new(ErrorCode::JobAlreadyStopped, "The sending job is already stopped.")
            }
            ControlError::Store(e) => e.into(),
        }
    }
}

/// Job operations.
pub struct JobApi {
    /// Start, stop, status and run history of the job.
    pub control: Arc<JobControl>,
    /// Where start and stop are recorded.
    pub audit: AuditStore,
}

#[OpenApi(tag = "SchedulerTags::Job")]
impl JobApi {
    /// Start the sending job
    ///
    /// Persists `working: true` for every replica and, with `run_on_start`, runs once at once.
    #[oai(path = "/job-scheduler/messenger/start", method = "post", operation_id = "startJob")]
    async fn start(&self, req: &poem::Request, auth: OperatorKey) -> Result<StatusResponse, StartErrors> {
        let outcome = self.control.start().await.map_err(ApiError::from);
        let status = self
            .audit
            .entry(req, &auth.0, "job.start")
            .finish(outcome, |_| None)
            .await?;
        Ok(StatusResponse::Ok(Json(status)))
    }

    /// Stop the sending job
    ///
    /// Persists `working: false` for every replica and answers once no run is in flight: after
    /// it, no replica claims a message until the job is started again.
    #[oai(path = "/job-scheduler/messenger/stop", method = "post", operation_id = "stopJob")]
    async fn stop(&self, req: &poem::Request, auth: OperatorKey) -> Result<StatusResponse, StartErrors> {
        let outcome = self.control.stop().await.map_err(ApiError::from);
        let status = self
            .audit
            .entry(req, &auth.0, "job.stop")
            .finish(outcome, |_| None)
            .await?;
        Ok(StatusResponse::Ok(Json(status)))
    }

    /// Is the job working?
    ///
    /// `working`, when it last changed, the last run, this replica's next scheduled run, and
    /// the provider: `open`, `paused` until `pausedUntil` (a Retry-After or a failure streak),
    /// or `probing` (one send decides whether sending resumes).
    #[oai(
        path = "/job-scheduler/messenger/is-working",
        method = "get",
        operation_id = "isWorking"
    )]
    async fn is_working(&self, _auth: MetricsKey) -> Result<StatusResponse, StatusErrors> {
        Ok(StatusResponse::Ok(Json(
            self.control.status().await.map_err(ApiError::from)?,
        )))
    }

    /// Run history
    ///
    /// Runs of every replica, newest first (skipped runs say why). Page with `limit` and
    /// `offset`, or `after` (a `nextCursor`).
    #[oai(path = "/job-scheduler/jobs", method = "get", operation_id = "listRuns")]
    async fn jobs(
        &self,
        _auth: MetricsKey,
        /// Page size, 1..=100 (default 20).
        limit: Query<Option<i64>>,
        /// Runs to skip (not with `after`).
        offset: Query<Option<i64>>,
        /// Continue after this run id (a `nextCursor`).
        after: Query<Option<String>>,
    ) -> Result<HistoryResponse, HistoryErrors> {
        let page = PageRequest::parse(limit.0, offset.0, after.0.as_deref())?;
        Ok(HistoryResponse::Ok(Json(
            self.control.runs(&page).await.map_err(ApiError::from)?,
        )))
    }
}

/// Probe operations.
pub struct ProbesApi {
    /// Readiness comes from the control service.
    pub control: Arc<JobControl>,
}

#[OpenApi(tag = "SchedulerTags::Probes")]
impl ProbesApi {
    /// Liveness
    ///
    /// 200 while the process serves requests.
    #[oai(path = "/job-scheduler/health", method = "get", operation_id = "schedulerHealth")]
    async fn health(&self) -> Json<Health> {
        Json(Health::ok("job-scheduler"))
    }

    /// Readiness
    ///
    /// Pings MongoDB (critical: 503 when down) and the Messenger API (degraded when down).
    #[oai(path = "/job-scheduler/ready", method = "get", operation_id = "schedulerReady")]
    async fn ready(&self) -> ReadyResponse {
        self.control.readiness().await
    }
}
