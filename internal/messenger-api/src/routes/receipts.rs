//! `POST /api/messenger/receipts/{provider}`: delivery receipts from providers. No bearer key
//! (a provider cannot send one): each provider's `[providers.receipts]` scheme proves the
//! receipt is its own.

use std::sync::Arc;

use herald_core::api_errors;
use herald_core::auth::ReadKey;
use herald_core::receipts::DeliveryState;
use herald_core::ApiError;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::{Binary, Json};
use poem_openapi::{ApiRequest, ApiResponse, Object, OpenApi};

use super::ApiTags;
use crate::service::{Inbound, Receipts, Taken};

api_errors!(ReceiptErrors: 400, 401, 404, 415, 500, 503);
api_errors!(WaitingErrors: 400, 401, 500, 503);

/// A receipt that found no message (yet).
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct WaitingReceipt {
    /// The provider it came from.
    pub provider: String,
    /// The provider's message id it names.
    pub webhook_message_id: String,
    /// What it reports.
    pub state: DeliveryState,
    /// The provider's own word.
    pub provider_status: String,
    /// When it came; it is kept a day from then.
    pub received_at: chrono::DateTime<chrono::Utc>,
}

/// Receipts waiting for their message.
#[derive(ApiResponse)]
pub enum WaitingAnswer {
    /// Oldest first.
    #[oai(status = 200)]
    Ok(Json<Vec<WaitingReceipt>>),
}

/// A receipt's body, as the provider sends it (kept raw: its signature covers the bytes).
#[derive(ApiRequest)]
pub enum ReceiptBody {
    /// A JSON object, e.g. `{"messageId": "…", "status": "DELIVERED"}` (hmac-sha256 or basic).
    #[oai(content_type = "application/json")]
    Json(Binary<Vec<u8>>),
    /// A form, e.g. Twilio's `MessageSid=…&MessageStatus=delivered`.
    #[oai(content_type = "application/x-www-form-urlencoded")]
    Form(Binary<Vec<u8>>),
    /// Either, with parameters on its content type (`; charset=utf-8`).
    Other(Binary<Vec<u8>>),
}

/// What Herald did with it.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct ReceiptResult {
    /// `applied` (the message's delivery moved), `ignored` (it was there or past it already:
    /// a replay or a late intermediate) or `pending` (no message yet: kept a day and applied
    /// when Herald's commit lands).
    pub result: String,
    /// The delivery state it reported.
    #[oai(nullable)]
    pub state: Option<DeliveryState>,
}

/// The answer to a receipt.
#[derive(ApiResponse)]
pub enum ReceiptAnswer {
    /// Applied or ignored.
    #[oai(status = 200)]
    Ok(Json<ReceiptResult>),
    /// No such message yet: kept.
    #[oai(status = 202)]
    Accepted(Json<ReceiptResult>),
}

/// Receipts from providers.
pub struct ReceiptsApi {
    /// Receipts, per provider.
    pub receipts: Arc<Receipts>,
}

#[OpenApi(tag = "ApiTags::Live")]
impl ReceiptsApi {
    /// Take a delivery receipt
    ///
    /// A provider reports what became of a message it accepted. The provider's
    /// `[providers.receipts]` says how it signs (`hmac-sha256` over the raw body in a header,
    /// Twilio's `X-Twilio-Signature`, or `basic`), where its message id and status are, and what
    /// its words mean. A missing or wrong signature is 401 with nothing changed; a body without
    /// those fields 400. Receipts may come in any order and more than once: a final state is
    /// never replaced by an intermediate one, `read` outranks `delivered`. A receipt for a
    /// message Herald has not committed yet is 202 and applied when it is. More than
    /// `receipts.max_in_flight` at once: 503 with `Retry-After`, nothing changed.
    #[oai(
        path = "/api/messenger/receipts/:provider",
        method = "post",
        operation_id = "takeReceipt"
    )]
    async fn take(
        &self,
        req: &poem::Request,
        /// The provider's name (`[[providers]] name`).
        provider: Path<String>,
        body: ReceiptBody,
    ) -> Result<ReceiptAnswer, ReceiptErrors> {
        let body = match body {
            ReceiptBody::Json(b) | ReceiptBody::Form(b) | ReceiptBody::Other(b) => b.0,
        };
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let taken = self
            .receipts
            .take(Inbound {
                provider: &provider.0,
                content_type: req.content_type(),
                header: &header,
                body: &body,
                url: &request_url(req),
            })
            .await
            .map_err(ApiError::from)?;
        let result = |result: &str, state| {
            Json(ReceiptResult {
                result: result.to_owned(),
                state,
            })
        };
        Ok(match taken {
            Taken::Applied(state) => ReceiptAnswer::Ok(result("applied", Some(state))),
            Taken::Ignored => ReceiptAnswer::Ok(result("ignored", None)),
            Taken::Pending => ReceiptAnswer::Accepted(result("pending", None)),
        })
    }

    /// Receipts waiting for their message
    ///
    /// Receipts that found no message Herald sent: most are applied within a second, when
    /// Herald's commit lands; what stays names an id Herald never sent (a provider's mistake, or
    /// another system's traffic on the same account). Kept a day, oldest first, up to `limit`
    /// (1..=100, default 20).
    #[oai(
        path = "/api/messenger/pending-receipts",
        method = "get",
        operation_id = "listPendingReceipts"
    )]
    async fn waiting(&self, _auth: ReadKey, limit: Query<Option<u32>>) -> Result<WaitingAnswer, WaitingErrors> {
        let limit = limit.0.unwrap_or(20);
        if !(1..=100).contains(&limit) {
            return Err(ApiError::new(herald_core::ErrorCode::InvalidParameter, "limit must be 1..=100").into());
        }
        let found = self.receipts.waiting(limit).await.map_err(ApiError::from)?;
        Ok(WaitingAnswer::Ok(Json(
            found
                .into_iter()
                .map(|r| WaitingReceipt {
                    provider: r.provider,
                    webhook_message_id: r.webhook_message_id,
                    state: r.delivery.state,
                    provider_status: r.delivery.provider_status,
                    received_at: r.received_at.to_chrono(),
                })
                .collect(),
        )))
    }
}

/// The URL as the provider wrote it: its scheme from `X-Forwarded-Proto` (behind a balancer),
/// the `Host` it named, the path and query it posted to.
fn request_url(req: &poem::Request) -> String {
    let scheme = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("http");
    let host = req
        .headers()
        .get(poem::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    format!("{scheme}://{host}{path}")
}
