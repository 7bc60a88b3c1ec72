//! Liveness and readiness (open, no key).

use std::sync::Arc;

use herald_core::probes::{Health, ReadyResponse};
use poem_openapi::payload::Json;
use poem_openapi::OpenApi;

use super::ApiTags;
use crate::service::Monitor;

/// Probe operations.
pub struct ProbesApi {
    /// Readiness comes from the monitor.
    pub monitor: Arc<Monitor>,
}

#[OpenApi(tag = "ApiTags::Probes")]
impl ProbesApi {
    /// Liveness
    ///
    /// 200 while the process serves requests.
    #[oai(path = "/messenger/health", method = "get", operation_id = "messengerHealth")]
    async fn health(&self) -> Json<Health> {
        Json(Health::ok("messenger-api"))
    }

    /// Readiness
    ///
    /// Pings MongoDB (critical: 503 when down) and Redis (degraded when down).
    #[oai(path = "/messenger/ready", method = "get", operation_id = "messengerReady")]
    async fn ready(&self) -> ReadyResponse {
        self.monitor.readiness().await
    }
}
