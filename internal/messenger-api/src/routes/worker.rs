//! The worker protocol the Job Scheduler speaks: claim (`get-two`), then the outcomes — many at
//! once (`outcomes`), or one at a time (`commit`, `fail`, `release`: one-item reports) — and,
//! while reports are slow to land, `extend` to keep the claims still held.

use std::sync::Arc;

use herald_core::api_errors;
use herald_core::auth::WorkerKey;
use herald_core::ApiError;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};

use super::ApiTags;
use crate::service::MessengerService;
use herald_core::message::MessageView;
use herald_core::worker::{
    ClaimRequest, ClaimedMessage, CommitRequest, CommitView, ExtendRequest, ExtendResults, FailRequest, FailedOutcome,
    Outcome, OutcomeBatch, OutcomeResults, ReleaseRequest, ReleasedOutcome, SentOutcome,
};

api_errors!(ClaimErrors: 400, 401, 413, 415, 500, 503);
api_errors!(TransitionErrors: 400, 401, 404, 409, 413, 415, 500, 503);

/// Claimed messages.
#[derive(ApiResponse)]
pub enum ClaimResponse {
    /// Up to `limit` messages, now held by the caller until `leaseUntil` (possibly none).
    #[oai(status = 200)]
    Ok(Json<Vec<ClaimedMessage>>),
}

/// A committed message.
#[derive(ApiResponse)]
pub enum CommitResponse {
    /// Sent (also for a repeated commit of the same claim).
    #[oai(status = 200)]
    Ok(Json<CommitView>),
}

/// A message after a failure report or release.
#[derive(ApiResponse)]
pub enum TransitionResponse {
    /// The message as it is now.
    #[oai(status = 200)]
    Ok(Json<MessageView>),
}

/// Results of an outcome report.
#[derive(ApiResponse)]
pub enum OutcomesResponse {
    /// One result per outcome, in the order given.
    #[oai(status = 200)]
    Ok(Json<OutcomeResults>),
}

api_errors!(OutcomeErrors: 400, 401, 413, 415, 500, 503);

/// What an extension did.
#[derive(ApiResponse)]
pub enum ExtendResponse {
    /// How many of the claims were still held and now last longer.
    #[oai(status = 200)]
    Ok(Json<ExtendResults>),
}

/// Worker operations.
pub struct WorkerApi {
    /// Messages and their life (claims and their outcomes).
    pub service: Arc<MessengerService>,
}

#[OpenApi(tag = "ApiTags::Worker")]
impl WorkerApi {
    /// Claim due messages
    ///
    /// Atomically claims up to `limit` due messages (oldest due first) for `worker`: pending
    /// messages whose time has come and processing ones whose lease lapsed. Concurrent callers
    /// never receive the same message. A claim of any size costs a fixed number of database
    /// round trips.
    #[oai(path = "/api/messenger/get-two", method = "post", operation_id = "claimMessages")]
    async fn get_two(&self, _auth: WorkerKey, body: Json<ClaimRequest>) -> Result<ClaimResponse, ClaimErrors> {
        let claimed = self
            .service
            .claim(&body.worker, body.limit, body.lease_seconds)
            .await
            .map_err(ApiError::from)?;
        Ok(ClaimResponse::Ok(Json(claimed.into_iter().map(Into::into).collect())))
    }

    /// Commit a sent message
    ///
    /// Marks the message sent in MongoDB, then writes `<prefix>sent:<id>` with the provider's
    /// `messageId` and the send time to Redis. Idempotent for the same claim; 409 when the
    /// claim was lost (Redis is then not touched). If Redis is down the commit still stands and
    /// `cached` is false.
    #[oai(path = "/api/messenger/commit/:id", method = "put", operation_id = "commitMessage")]
    async fn commit(
        &self,
        _auth: WorkerKey,
        /// The message id.
        id: Path<String>,
        body: Json<CommitRequest>,
    ) -> Result<CommitResponse, TransitionErrors> {
        let outcome = Outcome::Sent(SentOutcome {
            id: id.0,
            commit: body.0,
        });
        let reported = self.service.report_one(outcome).await.map_err(ApiError::from)?;
        Ok(CommitResponse::Ok(Json(CommitView {
            message: reported.message.into(),
            cached: reported.cached,
        })))
    }

    /// Report a failed attempt
    ///
    /// Retryable: back to pending at the next delay of `delivery.retry_schedule_seconds`
    /// (±jitter, not before `retryAfterSeconds`); out of retries or not retryable: `failed`
    /// with the error kept.
    #[oai(path = "/api/messenger/fail/:id", method = "put", operation_id = "failMessage")]
    async fn fail(
        &self,
        _auth: WorkerKey,
        /// The message id.
        id: Path<String>,
        body: Json<FailRequest>,
    ) -> Result<TransitionResponse, TransitionErrors> {
        self.transition(Outcome::Failed(FailedOutcome {
            id: id.0,
            failure: body.0,
        }))
        .await
    }

    /// Release an unsent claim
    ///
    /// Gives a claimed message back, pending and due now, without counting the attempt (used
    /// on graceful shutdown for messages that were never sent).
    #[oai(path = "/api/messenger/release/:id", method = "put", operation_id = "releaseMessage")]
    async fn release(
        &self,
        _auth: WorkerKey,
        /// The message id.
        id: Path<String>,
        body: Json<ReleaseRequest>,
    ) -> Result<TransitionResponse, TransitionErrors> {
        self.transition(Outcome::Released(ReleasedOutcome {
            id: id.0,
            claim: body.0,
        }))
        .await
    }

    /// Report many outcomes
    ///
    /// Applies the outcomes of up to 1,000 claimed messages at once — `sent` (commit), `failed`
    /// (retry per the schedule, or fail), `released` and `expired` — with one bulk write in which each
    /// update stays conditional on its claim, and one Redis pipeline for the commits. Answers a
    /// result per outcome (`committed`, `already_committed`, `retry_scheduled`, `failed`,
    /// `released`, `expired`, `claim_lost`, `not_found`, `invalid_id`); a repeated report
    /// answers what the first one did. The single `commit`, `fail` and `release` are one-item
    /// reports on the same path.
    #[oai(path = "/api/messenger/outcomes", method = "post", operation_id = "reportOutcomes")]
    async fn outcomes(&self, _auth: WorkerKey, body: Json<OutcomeBatch>) -> Result<OutcomesResponse, OutcomeErrors> {
        let results = self
            .service
            .report_outcomes(body.0.items)
            .await
            .map_err(ApiError::from)?;
        Ok(OutcomesResponse::Ok(Json(results)))
    }

    /// Extend held claims
    ///
    /// Keeps the claims the caller still holds (claimed, not yet reported) for `leaseSeconds`
    /// more from now, each conditional on its claim token as an outcome is. A worker whose
    /// outcome reports are slow to land (the Messenger API under load) calls it while it waits,
    /// so its messages are not handed to another worker and sent twice. Claims that lapsed and
    /// moved on, or were already reported, are left alone and not counted; a lease is never
    /// shortened.
    #[oai(path = "/api/messenger/extend", method = "post", operation_id = "extendClaims")]
    async fn extend(&self, _auth: WorkerKey, body: Json<ExtendRequest>) -> Result<ExtendResponse, OutcomeErrors> {
        let body = body.0;
        let results = self
            .service
            .extend(body.items, body.lease_seconds)
            .await
            .map_err(ApiError::from)?;
        Ok(ExtendResponse::Ok(Json(results)))
    }
}

impl WorkerApi {
    /// A one-item report answered with the message as it is after it.
    async fn transition(&self, outcome: Outcome) -> Result<TransitionResponse, TransitionErrors> {
        let reported = self.service.report_one(outcome).await.map_err(ApiError::from)?;
        Ok(TransitionResponse::Ok(Json(reported.message.into())))
    }
}
