//! Create, list and inspect messages.

use std::sync::Arc;

use herald_core::api_errors;
use herald_core::audit::AuditStore;
use herald_core::auth::{OperatorKey, ReadKey, WriteKey};
use herald_core::ApiError;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};

use super::views::{BatchCreated, MessageView, NewBatch, NewMessage, RequeueRequest, RequeueResult};
use super::ApiTags;
use crate::service::MessengerService;
use herald_core::pagination::{Page, PageRequest};

api_errors!(CreateErrors: 400, 401, 409, 413, 415, 429, 500, 503);
api_errors!(BatchErrors: 400, 401, 413, 415, 429, 500, 503);
api_errors!(ListErrors: 400, 401, 500, 503);
api_errors!(GetErrors: 400, 401, 404, 500, 503);
api_errors!(RetryErrors: 400, 401, 404, 409, 500, 503);
api_errors!(BulkRetryErrors: 400, 401, 413, 415, 500, 503);

/// A created message.
#[derive(ApiResponse)]
pub enum Created {
    /// Created (or, for a repeated Idempotency-Key with the same body, the original).
    #[oai(status = 201)]
    Created(
        Json<MessageView>,
        /// `true` when this answer replays an earlier request with the same key.
        #[oai(header = "Idempotent-Replayed")]
        Option<bool>,
    ),
}

/// Created messages.
#[derive(ApiResponse)]
pub enum BatchResponse {
    /// All stored.
    #[oai(status = 201)]
    Created(Json<BatchCreated>),
}

/// A page of messages.
#[derive(ApiResponse)]
pub enum PageResponse {
    /// Newest first (sent list: newest `sentAt` first).
    #[oai(status = 200)]
    Ok(Json<Page<MessageView>>),
}

/// One message.
#[derive(ApiResponse)]
pub enum MessageResponse {
    /// The message.
    #[oai(status = 200)]
    Ok(Json<MessageView>),
}

/// A re-queued message.
#[derive(ApiResponse)]
pub enum Requeued {
    /// Pending again, due now.
    #[oai(status = 202)]
    Accepted(Json<MessageView>),
}

/// A bulk re-queue's result.
#[derive(ApiResponse)]
pub enum BulkRequeued {
    /// Counted, and (unless a dry run) re-queued.
    #[oai(status = 200)]
    Ok(Json<RequeueResult>),
}

/// Message operations.
pub struct MessagesApi {
    /// Messages and their life.
    pub service: Arc<MessengerService>,
    /// Where operator actions are recorded.
    pub audit: AuditStore,
}

#[OpenApi(tag = "ApiTags::Messages")]
impl MessagesApi {
    /// Create a message
    ///
    /// Stores one pending message, due now or at its `sendAt`, never sent after its
    /// `expiresAt`. With an `Idempotency-Key`, repeating the request
    /// with the same body returns the original message; another body gets 409.
    #[oai(path = "/api/messenger/messages", method = "post", operation_id = "createMessage")]
    async fn create(
        &self,
        auth: WriteKey,
        /// Client key that makes retries of this request safe (1 to 255 visible ASCII characters).
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
        body: Json<NewMessage>,
    ) -> Result<Created, CreateErrors> {
        self.service.admit_key(&auth.0).await.map_err(ApiError::from)?;
        let (message, created) = self
            .service
            .create(body.draft(), idempotency_key.0)
            .await
            .map_err(ApiError::from)?;
        Ok(Created::Created(Json(message.into()), (!created).then_some(true)))
    }

    /// Create messages in a batch
    ///
    /// Stores 1 to 1,000 messages, all or none: a 400 names every bad item by index.
    #[oai(
        path = "/api/messenger/messages/batch",
        method = "post",
        operation_id = "createMessageBatch"
    )]
    async fn create_batch(&self, auth: WriteKey, body: Json<NewBatch>) -> Result<BatchResponse, BatchErrors> {
        self.service.admit_key(&auth.0).await.map_err(ApiError::from)?;
        let drafts: Vec<_> = body.messages.iter().map(NewMessage::draft).collect();
        let created = self.service.create_batch(&drafts).await.map_err(ApiError::from)?;
        Ok(BatchResponse::Created(Json(BatchCreated {
            items: created.into_iter().map(Into::into).collect(),
        })))
    }

    /// List messages
    ///
    /// Newest first. Page with `limit` and `offset`, or with `after` (the previous page's
    /// `nextCursor`), which stays fast however deep the page. `total` is given only with
    /// `withTotal=true`: counting the matching messages reads all of them, which costs as much
    /// as the collection is large (use `/api/messenger/stats` for counts by status).
    #[oai(path = "/api/messenger/messages", method = "get", operation_id = "listMessages")]
    #[allow(clippy::too_many_arguments)] // poem-openapi takes each query parameter as an argument
    async fn list(
        &self,
        _auth: ReadKey,
        /// Only messages in this status: pending, processing, sent, failed or expired.
        status: Query<Option<String>>,
        /// Only messages to this phone number (E.164).
        to: Query<Option<String>>,
        /// Page size, 1..=100 (default 20).
        limit: Query<Option<i64>>,
        /// Messages to skip (not with `after`).
        offset: Query<Option<i64>>,
        /// Continue after this id (a `nextCursor`).
        after: Query<Option<String>>,
        /// Also count every matching message into `total` (expensive on a large collection).
        #[oai(name = "withTotal")]
        with_total: Query<Option<bool>>,
    ) -> Result<PageResponse, ListErrors> {
        let page = PageRequest::parse(limit.0, offset.0, after.0.as_deref())?;
        let fetched = self
            .service
            .list(
                status.0.as_deref(),
                to.0.as_deref(),
                &page,
                with_total.0.unwrap_or(false),
            )
            .await
            .map_err(ApiError::from)?;
        Ok(PageResponse::Ok(Json(fetched.into_page(&page, MessageView::from))))
    }

    /// List sent messages
    ///
    /// Sent messages, newest `sentAt` first, each with the provider's `webhookMessageId`.
    /// Same pagination as the message list, `withTotal` included.
    #[oai(
        path = "/api/messenger/messages/sent",
        method = "get",
        operation_id = "listSentMessages"
    )]
    async fn list_sent(
        &self,
        _auth: ReadKey,
        /// Page size, 1..=100 (default 20).
        limit: Query<Option<i64>>,
        /// Messages to skip (not with `after`).
        offset: Query<Option<i64>>,
        /// Continue after this id (a `nextCursor`).
        after: Query<Option<String>>,
        /// Also count every sent message into `total` (expensive on a large collection).
        #[oai(name = "withTotal")]
        with_total: Query<Option<bool>>,
    ) -> Result<PageResponse, ListErrors> {
        let page = PageRequest::parse(limit.0, offset.0, after.0.as_deref())?;
        let fetched = self
            .service
            .list_sent(&page, with_total.0.unwrap_or(false))
            .await
            .map_err(ApiError::from)?;
        Ok(PageResponse::Ok(Json(fetched.into_page(&page, MessageView::from))))
    }

    /// Get a message
    ///
    /// One message with its delivery state.
    #[oai(path = "/api/messenger/messages/:id", method = "get", operation_id = "getMessage")]
    async fn get(
        &self,
        _auth: ReadKey,
        /// The message id (24 hex characters).
        id: Path<String>,
    ) -> Result<MessageResponse, GetErrors> {
        let message = self.service.get(&id.0).await.map_err(ApiError::from)?;
        Ok(MessageResponse::Ok(Json(message.into())))
    }

    /// Re-queue failed messages in bulk
    ///
    /// Operator action: failed messages matching the filter (created between `createdFrom`
    /// and `createdTo`, to one number) become `pending`, due now, with a fresh retry budget.
    /// `matched` counts them; one call re-queues at most 1,000, oldest first, and `remaining`
    /// says how many still match (call again). `dryRun` only counts. Idempotent: a re-queued
    /// message is no longer failed. Every call is written to the audit (`GET /api/messenger/audit`).
    #[oai(
        path = "/api/messenger/messages/retry",
        method = "post",
        operation_id = "retryMessages"
    )]
    async fn retry_many(
        &self,
        req: &poem::Request,
        auth: OperatorKey,
        body: Json<RequeueRequest>,
    ) -> Result<BulkRequeued, BulkRetryErrors> {
        let target = poem_openapi::types::ToJSON::to_json_string(&body.0);
        let RequeueRequest { filter, dry_run } = body.0;
        let outcome = self
            .service
            .requeue_many(&filter.into(), dry_run)
            .await
            .map_err(ApiError::from);
        let done = self
            .audit
            .entry(req, &auth.0, "messages.requeue")
            .target(target)
            .finish(outcome, |done| Some(i64::try_from(done.requeued).unwrap_or(i64::MAX)))
            .await?;
        Ok(BulkRequeued::Ok(Json(RequeueResult {
            matched: done.matched,
            requeued: done.requeued,
            remaining: done.remaining,
            dry_run,
        })))
    }

    /// Retry a failed message
    ///
    /// Operator action: a `failed` message becomes `pending`, due now, with a fresh retry
    /// budget. Any other status gets 409.
    #[oai(
        path = "/api/messenger/messages/:id/retry",
        method = "post",
        operation_id = "retryMessage"
    )]
    async fn retry(
        &self,
        req: &poem::Request,
        auth: OperatorKey,
        /// The message id (24 hex characters).
        id: Path<String>,
    ) -> Result<Requeued, RetryErrors> {
        let outcome = self.service.retry(&id.0).await.map_err(ApiError::from);
        let message = self
            .audit
            .entry(req, &auth.0, "message.retry")
            .target(id.0.clone())
            .finish(outcome, |_| Some(1))
            .await?;
        Ok(Requeued::Accepted(Json(message.into())))
    }
}
