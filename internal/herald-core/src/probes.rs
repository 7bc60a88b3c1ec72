//! Liveness and readiness bodies shared by both services.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};

/// Liveness: the process is up and serving.
#[derive(Debug, Clone, Object)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// Which service answered.
    pub service: String,
    /// Herald version.
    pub version: String,
}

impl Health {
    /// The liveness body of `service`.
    pub fn ok(service: &str) -> Self {
        Self {
            status: "ok".into(),
            service: service.into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// One dependency's state.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct DependencyCheck {
    /// `up` or `down`.
    pub status: String,
    /// Whether the service is unavailable without it (503) or only degraded.
    pub critical: bool,
    /// How long the check took, in milliseconds.
    pub latency_ms: u64,
    /// Why it is down.
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<String>,
}

/// Readiness: each dependency, and the verdict.
#[derive(Debug, Clone, Object)]
pub struct Readiness {
    /// `ready`, `degraded` (a non-critical dependency is down) or `unavailable`.
    pub status: String,
    /// Each dependency by name.
    pub checks: BTreeMap<String, DependencyCheck>,
}

/// Readiness answers 200 unless a critical dependency is down.
#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// Ready or degraded.
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// A critical dependency (MongoDB) is down.
    #[oai(status = 503)]
    Unavailable(Json<Readiness>),
}

/// Runs one check with a deadline.
pub async fn check<F, E>(critical: bool, deadline: Duration, probe: F) -> DependencyCheck
where
    F: Future<Output = Result<(), E>>,
    E: std::error::Error,
{
    let started = Instant::now();
    let result = match tokio::time::timeout(deadline, probe).await {
        Ok(result) => result.map_err(|e| telemetry::Chain(&e).to_string()),
        Err(_) => Err(format!("no answer within {} ms", deadline.as_millis())),
    };
    DependencyCheck {
        status: if result.is_ok() { "up" } else { "down" }.into(),
        critical,
        latency_ms: started.elapsed().as_millis() as u64,
        error: result.err(),
    }
}

/// Combines checks into the readiness answer.
pub fn verdict(checks: BTreeMap<String, DependencyCheck>) -> ReadyResponse {
    let critical_down = checks.values().any(|c| c.critical && c.status == "down");
    let any_down = checks.values().any(|c| c.status == "down");
    let status = if critical_down {
        "unavailable"
    } else if any_down {
        "degraded"
    } else {
        "ready"
    };
    let body = Json(Readiness {
        status: status.into(),
        checks,
    });
    if critical_down {
        ReadyResponse::Unavailable(body)
    } else {
        ReadyResponse::Ready(body)
    }
}
