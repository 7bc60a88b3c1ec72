//! The other end of Herald's status callbacks: `POST /webhook-sink/callbacks` takes them,
//! checks their Standard Webhooks signature with the configured `whsec_` secrets, and keeps
//! them for `GET /webhook-sink/callbacks` — what a team's receiver would do, so the loop
//! send → receipt → callback can be watched and tested end to end.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use herald_core::callbacks::SigningKeys;
use poem::http::StatusCode;
use poem::web::{Data, Json};
use poem::{handler, IntoResponse, Request, Response};
use serde::{Deserialize, Serialize};

/// One callback the sink took.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReceivedCallback {
    /// `webhook-id`.
    pub webhook_id: String,
    /// The body's `type`.
    pub kind: String,
    /// The body's `id` (Herald's message id).
    pub message_id: String,
    /// The body's `delivery.state`, if any.
    pub delivery_state: Option<String>,
    /// Whether the signature checked out (`None`: the sink has no secret to check with).
    pub verified: Option<bool>,
    /// How many times this `webhook-id` came (a retry after a lost answer comes again).
    pub times: u32,
    /// When it first came.
    pub received_at: DateTime<Utc>,
}

/// The callbacks taken, first arrival order, one entry per `webhook-id`.
#[derive(Clone, Default)]
pub struct CallbackLog {
    keys: SigningKeys,
    entries: Arc<Mutex<Vec<ReceivedCallback>>>,
}

impl CallbackLog {
    /// A log checking signatures with `keys` (none: not checked).
    pub fn new(keys: SigningKeys) -> Self {
        Self {
            keys,
            entries: Arc::default(),
        }
    }

    /// What was taken so far.
    pub fn snapshot(&self) -> Vec<ReceivedCallback> {
        self.entries.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

fn header<'a>(req: &'a Request, name: &str) -> &'a str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// `POST /webhook-sink/callbacks`: 204 when the signature checks out (or none is configured),
/// 401 when it does not (Herald retries it), 400 for a body that is not a callback.
#[handler]
pub async fn take(req: &Request, body: String, log: Data<&CallbackLog>) -> Response {
    let id = header(req, "webhook-id").to_owned();
    let verified = (!log.keys.is_empty()).then(|| {
        log.keys.verify(
            &id,
            header(req, "webhook-timestamp"),
            header(req, "webhook-signature"),
            &body,
            Utc::now().timestamp(),
        )
    });
    let Ok(parsed) = serde_json::from_str::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if id.is_empty() {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let text = |pointer: &str| parsed.pointer(pointer).and_then(|v| v.as_str()).map(str::to_owned);
    if let Ok(mut entries) = log.entries.lock() {
        match entries.iter_mut().find(|e| e.webhook_id == id) {
            Some(entry) => {
                entry.times += 1;
                // Verified only while every arrival was.
                entry.verified = match (entry.verified, verified) {
                    (Some(before), Some(now)) => Some(before && now),
                    (before, now) => before.or(now),
                };
            }
            None => entries.push(ReceivedCallback {
                webhook_id: id,
                kind: text("/type").unwrap_or_default(),
                message_id: text("/id").unwrap_or_default(),
                delivery_state: text("/delivery/state"),
                verified,
                times: 1,
                received_at: Utc::now(),
            }),
        }
    }
    if verified == Some(false) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    StatusCode::NO_CONTENT.into_response()
}

/// `GET /webhook-sink/callbacks`: every callback taken.
#[handler]
pub fn list(log: Data<&CallbackLog>) -> Json<Vec<ReceivedCallback>> {
    Json(log.snapshot())
}
