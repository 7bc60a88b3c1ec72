//! The audit trail of operator actions, newest first (both services write it).

use herald_core::api_errors;
use herald_core::audit::{AuditEntry, AuditStore};
use herald_core::auth::OperatorKey;
use herald_core::pagination::{Page, PageRequest};
use herald_core::ApiError;
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};

use super::ApiTags;

api_errors!(AuditErrors: 400, 401, 500, 503);

/// A page of the audit.
#[derive(ApiResponse)]
pub enum AuditResponse {
    /// Newest first.
    #[oai(status = 200)]
    Ok(Json<Page<AuditEntry>>),
}

/// The audit trail.
pub struct AuditApi {
    /// Where both services record operator actions.
    pub audit: AuditStore,
}

#[OpenApi(tag = "ApiTags::Live")]
impl AuditApi {
    /// The audit trail
    ///
    /// Every operator action of either service — start, stop, retry one, bulk re-queue — with
    /// the key that asked, from where, when and with what result (failures included), newest
    /// first. Kept as long as the run history (`job_scheduler.run_history_days`).
    #[oai(path = "/api/messenger/audit", method = "get", operation_id = "listAudit")]
    async fn list(
        &self,
        _auth: OperatorKey,
        /// Page size, 1..=100 (default 20).
        limit: Query<Option<i64>>,
        /// Entries to skip (not with `after`).
        offset: Query<Option<i64>>,
        /// Continue after this entry id (a `nextCursor`).
        after: Query<Option<String>>,
    ) -> Result<AuditResponse, AuditErrors> {
        let page = PageRequest::parse(limit.0, offset.0, after.0.as_deref())?;
        let fetched = self.audit.list(&page).await.map_err(ApiError::from)?;
        Ok(AuditResponse::Ok(Json(fetched.into_page(&page, AuditEntry::from))))
    }
}
