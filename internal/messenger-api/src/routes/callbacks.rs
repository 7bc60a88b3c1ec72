//! Status callbacks: the worker side (claim and report, as the Job Scheduler speaks it), what a
//! message's callbacks did, the dead letters, and sending a dead one again.

use std::sync::Arc;

use herald_core::api_errors;
use herald_core::audit::AuditStore;
use herald_core::auth::{OperatorKey, ReadKey, WorkerKey};
use herald_core::callbacks::{
    CallbackClaimRequest, CallbackReport, CallbackReportResults, CallbackStatus, CallbackView, ClaimedCallback,
};
use herald_core::ApiError;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};

use super::ApiTags;
use crate::domain;
use crate::service::Callbacks;

api_errors!(CallbackWorkerErrors: 400, 401, 413, 415, 500, 503);
api_errors!(CallbackReadErrors: 400, 401, 404, 500, 503);
api_errors!(CallbackResendErrors: 400, 401, 404, 409, 500, 503);

/// Claimed callbacks.
#[derive(ApiResponse)]
pub enum CallbackClaimResponse {
    /// Up to `limit` callbacks, held by the caller until `leaseUntil` (possibly none).
    #[oai(status = 200)]
    Ok(Json<Vec<ClaimedCallback>>),
}

/// What a report did.
#[derive(ApiResponse)]
pub enum CallbackReportResponse {
    /// One result per outcome, in order.
    #[oai(status = 200)]
    Ok(Json<CallbackReportResults>),
}

/// Callbacks.
#[derive(ApiResponse)]
pub enum CallbackListResponse {
    /// In the order they were written (per message) or oldest due first (by status).
    #[oai(status = 200)]
    Ok(Json<Vec<CallbackView>>),
}

/// A callback sent again.
#[derive(ApiResponse)]
pub enum CallbackResendResponse {
    /// Pending again, due now, its attempts from zero.
    #[oai(status = 202)]
    Accepted(Json<CallbackView>),
}

/// The callback outbox.
pub struct CallbacksApi {
    /// The outbox and its rules.
    pub callbacks: Arc<Callbacks>,
    /// Where operator actions are recorded.
    pub audit: AuditStore,
}

#[OpenApi(tag = "ApiTags::Worker")]
impl CallbacksApi {
    /// Claim due status callbacks
    ///
    /// Claims up to `limit` due callbacks (oldest due first) for `worker`, each held until
    /// `leaseUntil` under a fresh `claimToken` — pending ones whose time has come and processing
    /// ones whose lease lapsed; concurrent callers never get the same one. The worker POSTs each
    /// `body` to `url`, signed, and reports what happened.
    #[oai(
        path = "/api/messenger/callbacks/claim",
        method = "post",
        operation_id = "claimCallbacks"
    )]
    async fn claim(
        &self,
        _auth: WorkerKey,
        body: Json<CallbackClaimRequest>,
    ) -> Result<CallbackClaimResponse, CallbackWorkerErrors> {
        let claimed = self
            .callbacks
            .claim(&body.worker, body.limit, body.lease_seconds)
            .await
            .map_err(ApiError::from)?;
        Ok(CallbackClaimResponse::Ok(Json(claimed)))
    }

    /// Report status callbacks
    ///
    /// Settles claimed callbacks, each only while its claim is held: `delivered` (2xx);
    /// `failed` — pending again after the next delay of `callbacks.retry_schedule_seconds`
    /// (±jitter, not before the receiver's `Retry-After`), dead-lettered after the last;
    /// `refused` (its address is not allowed) — dead at once; `deferred` (its host is paused or
    /// over its rate) — pending at `deferUntil`, the attempt not counted.
    #[oai(
        path = "/api/messenger/callbacks/report",
        method = "post",
        operation_id = "reportCallbacks"
    )]
    async fn report(
        &self,
        _auth: WorkerKey,
        body: Json<CallbackReport>,
    ) -> Result<CallbackReportResponse, CallbackWorkerErrors> {
        let results = self.callbacks.report(body.0.items).await.map_err(ApiError::from)?;
        Ok(CallbackReportResponse::Ok(Json(results)))
    }

    /// A message's status callbacks
    ///
    /// Every callback written for the message — `message.sent`, `.failed`, `.expired`,
    /// `.delivered`, `.undelivered`, `.read` — with where it stands, its attempts and their
    /// answers.
    #[oai(
        path = "/api/messenger/messages/:id/callbacks",
        method = "get",
        operation_id = "listMessageCallbacks",
        tag = "ApiTags::Messages"
    )]
    async fn for_message(
        &self,
        _auth: ReadKey,
        /// The message id (24 hex characters).
        id: Path<String>,
    ) -> Result<CallbackListResponse, CallbackReadErrors> {
        let id = domain::parse_id(&id.0).map_err(ApiError::from)?;
        let found = self.callbacks.for_message(id).await.map_err(ApiError::from)?;
        Ok(CallbackListResponse::Ok(Json(found)))
    }

    /// Status callbacks by status
    ///
    /// Up to `limit` callbacks in `status` (default `dead`: the dead letters), oldest due
    /// first.
    #[oai(
        path = "/api/messenger/callbacks",
        method = "get",
        operation_id = "listCallbacks",
        tag = "ApiTags::Live"
    )]
    async fn list(
        &self,
        _auth: ReadKey,
        /// `pending`, `processing`, `delivered` or `dead` (default).
        status: Query<Option<CallbackStatus>>,
        /// 1..=100 (default 20).
        limit: Query<Option<u32>>,
    ) -> Result<CallbackListResponse, CallbackReadErrors> {
        let limit = limit.0.unwrap_or(20);
        if !(1..=100).contains(&limit) {
            return Err(ApiError::new(herald_core::ErrorCode::InvalidParameter, "limit must be 1..=100").into());
        }
        let found = self
            .callbacks
            .in_status(status.0.unwrap_or(CallbackStatus::Dead), limit as usize)
            .await
            .map_err(ApiError::from)?;
        Ok(CallbackListResponse::Ok(Json(found)))
    }

    /// Send a dead callback again
    ///
    /// Operator action (audited): a dead-lettered callback becomes pending, due now, with its
    /// attempts from zero and its history kept. Any other status gets 409.
    #[oai(
        path = "/api/messenger/callbacks/:id/resend",
        method = "post",
        operation_id = "resendCallback",
        tag = "ApiTags::Live"
    )]
    async fn resend(
        &self,
        req: &poem::Request,
        auth: OperatorKey,
        /// The callback id (`msg_<message id>_<event>`).
        id: Path<String>,
    ) -> Result<CallbackResendResponse, CallbackResendErrors> {
        let outcome = self.callbacks.resend(&id.0).await.map_err(ApiError::from);
        let view = self
            .audit
            .entry(req, &auth.0, "callback.resend")
            .target(id.0.clone())
            .finish(outcome, |_| Some(1))
            .await?;
        Ok(CallbackResendResponse::Accepted(Json(view)))
    }
}
