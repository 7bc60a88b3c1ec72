//! The start/stop toggle, forwarded to the Job Scheduler and written to the audit.

use std::sync::Arc;

use herald_core::api_errors;
use herald_core::audit::AuditStore;
use herald_core::auth::OperatorKey;
use herald_core::jobs::JobStatus;
use herald_core::ApiError;
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};

use super::ApiTags;
use crate::service::JobRemote;

api_errors!(ToggleErrors: 400, 401, 409, 502);

/// The job's state after the command.
#[derive(ApiResponse)]
pub enum ToggleResponse {
    /// The Job Scheduler carried it out.
    #[oai(status = 200)]
    Ok(Json<JobStatus>),
}

/// Job operations.
pub struct JobApi {
    /// The job, steered through the Job Scheduler.
    pub job: Arc<JobRemote>,
    /// Where each toggle is recorded.
    pub audit: AuditStore,
}

#[OpenApi(tag = "ApiTags::Job")]
impl JobApi {
    /// Start or stop the sending job
    ///
    /// Asks the Job Scheduler to `start` or `stop` sending. Stop answers once the run in flight
    /// has finished. 409 when the job is already in that state; 502 when the Job Scheduler
    /// cannot be reached.
    #[oai(
        path = "/api/messenger/messenger-job-toggle",
        method = "post",
        operation_id = "toggleJob"
    )]
    async fn toggle(
        &self,
        req: &poem::Request,
        auth: OperatorKey,
        /// `start` or `stop`.
        command: Query<String>,
    ) -> Result<ToggleResponse, ToggleErrors> {
        let outcome = self
            .job
            .toggle(&command.0, super::correlation(req).as_deref())
            .await
            .map_err(ApiError::from);
        let action = match command.0.as_str() {
            "start" => "job.start",
            "stop" => "job.stop",
            _ => "job.toggle",
        };
        let status = self
            .audit
            .entry(req, &auth.0, action)
            .target(command.0.clone())
            .finish(outcome, |_| None)
            .await?;
        Ok(ToggleResponse::Ok(Json(status)))
    }
}
