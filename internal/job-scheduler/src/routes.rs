//! The Job Scheduler's HTTP surface: start, stop, is-working, run history, probes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use herald_core::api_errors;
use herald_core::auth::BearerAuth;
use herald_core::jobs::{JobStatus, RunPage, RunView};
use herald_core::pagination::PageRequest;
use herald_core::probes::{self, Health, ReadyResponse};
use herald_core::{ApiError, ErrorCode};
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, Tags};

use crate::control::{ControlError, JobControl};
use crate::messenger_client::MessengerClient;
use crate::store::JobRunDoc;

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

fn run_view(r: JobRunDoc) -> RunView {
    RunView {
        id: r.id.to_hex(),
        worker: r.worker,
        started_at: r.started_at.to_chrono(),
        finished_at: r.finished_at.map(|d| d.to_chrono()),
        claimed: r.claimed,
        sent: r.sent,
        retried: r.retried,
        failed: r.failed,
        released: r.released,
        skipped_reason: r.skipped_reason,
        error: r.error,
    }
}

/// Run history.
#[derive(ApiResponse)]
pub enum HistoryResponse {
    /// The page.
    #[oai(status = 200)]
    Ok(Json<RunPage>),
}

fn store_error(error: mongodb::error::Error) -> ApiError {
    if herald_core::mongo::is_unavailable(&error) {
        tracing::warn!(%error, "MongoDB unavailable");
        ApiError::new(
            ErrorCode::DatabaseUnavailable,
            "MongoDB is unavailable; nothing was changed. Try again.",
        )
    } else {
        ApiError::internal(&error)
    }
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
            ControlError::Store(e) => store_error(e),
        }
    }
}

/// Job operations.
pub struct JobApi {
    /// The control surface.
    pub control: Arc<JobControl>,
}

#[OpenApi(tag = "SchedulerTags::Job")]
impl JobApi {
    /// Start the sending job
    ///
    /// Persists `working: true` for every replica and, with `run_on_start`, runs once at once.
    #[oai(path = "/job-scheduler/messenger/start", method = "post", operation_id = "startJob")]
    async fn start(&self, _auth: BearerAuth) -> Result<StatusResponse, StartErrors> {
        Ok(StatusResponse::Ok(Json(
            self.control.start().await.map_err(ApiError::from)?,
        )))
    }

    /// Stop the sending job
    ///
    /// Persists `working: false` for every replica and answers once no run is in flight: after
    /// it, no replica claims a message until the job is started again.
    #[oai(path = "/job-scheduler/messenger/stop", method = "post", operation_id = "stopJob")]
    async fn stop(&self, _auth: BearerAuth) -> Result<StatusResponse, StartErrors> {
        Ok(StatusResponse::Ok(Json(
            self.control.stop().await.map_err(ApiError::from)?,
        )))
    }

    /// Is the job working?
    ///
    /// `working`, when it last changed, the last run and this replica's next scheduled run.
    #[oai(
        path = "/job-scheduler/messenger/is-working",
        method = "get",
        operation_id = "isWorking"
    )]
    async fn is_working(&self, _auth: BearerAuth) -> Result<StatusResponse, StatusErrors> {
        Ok(StatusResponse::Ok(Json(
            self.control.status().await.map_err(store_error)?,
        )))
    }

    /// Run history
    ///
    /// Runs of every replica, newest first (skipped runs say why). Page with `limit` and
    /// `offset`, or `after` (a `nextCursor`).
    #[oai(path = "/job-scheduler/jobs", method = "get", operation_id = "listRuns")]
    async fn jobs(
        &self,
        _auth: BearerAuth,
        /// Page size, 1..=100 (default 20).
        limit: Query<Option<i64>>,
        /// Runs to skip (not with `after`).
        offset: Query<Option<i64>>,
        /// Continue after this run id (a `nextCursor`).
        after: Query<Option<String>>,
    ) -> Result<HistoryResponse, HistoryErrors> {
        let page = PageRequest::parse(limit.0, offset.0, after.0.as_deref())?;
        let (runs, more, total) = self
            .control
            .job()
            .store()
            .list_runs(page.start, page.limit)
            .await
            .map_err(store_error)?;
        let next_cursor = if more { runs.last().map(|r| r.id.to_hex()) } else { None };
        Ok(HistoryResponse::Ok(Json(RunPage {
            items: runs.into_iter().map(run_view).collect(),
            limit: page.limit,
            offset: page.offset(),
            next_cursor,
            total,
        })))
    }
}

/// Probe operations.
pub struct ProbesApi {
    /// MongoDB, for the ping.
    pub db: mongodb::Database,
    /// The Messenger API, for the ping.
    pub messenger: MessengerClient,
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
        let deadline = Duration::from_secs(2);
        let (mongo, api) = tokio::join!(
            probes::check(true, deadline, herald_core::mongo::ping(&self.db)),
            probes::check(false, deadline, self.messenger.ping()),
        );
        probes::verdict(BTreeMap::from([
            ("mongodb".to_owned(), mongo),
            ("messengerApi".to_owned(), api),
        ]))
    }
}
