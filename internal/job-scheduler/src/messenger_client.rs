//! The worker side of the Messenger API: claim, commit, fail, release.

use std::time::Duration;

use chrono::{DateTime, Utc};
use layered_config::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::json;
use webhook_client::DeliveryFailure;

/// A claimed message, as `get-two` returns it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claimed {
    /// Message id (also the webhook `Idempotency-Key`).
    pub id: String,
    /// Recipient.
    pub to: String,
    /// Text.
    pub content: String,
    /// Proof of the claim.
    pub claim_token: String,
    /// Which attempt this is.
    pub attempt: i32,
}

/// Why a call to the Messenger API did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum MessengerError {
    /// The claim was lost (409): the lease expired and someone else holds the message.
    #[error("claim lost")]
    ClaimLost,
    /// Any other answer, or no answer.
    #[error("messenger API: {0}")]
    Failed(String),
}

/// HTTP client of the Messenger API.
#[derive(Clone)]
pub struct MessengerClient {
    http: reqwest::Client,
    base: String,
    key: SecretString,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClaimBody<'a> {
    worker: &'a str,
    limit: u32,
    lease_seconds: u64,
}

impl MessengerClient {
    /// A client for `base_url`, presenting `key`.
    pub fn new(base_url: &str, key: SecretString) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(2))
            .user_agent(herald_core::USER_AGENT)
            .build()?;
        Ok(Self {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            key,
        })
    }

    /// One call, carrying the run's id as `X-Correlation-Id` so the Messenger API's request
    /// spans can be matched to the run that made them.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
        correlation_id: &str,
    ) -> Result<reqwest::Response, MessengerError> {
        let response = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.key.expose_secret())
            .header(telemetry::CORRELATION_HEADER, correlation_id)
            .json(&body)
            .send()
            .await
            .map_err(|e| MessengerError::Failed(e.to_string()))?;
        match response.status() {
            s if s.is_success() => Ok(response),
            reqwest::StatusCode::CONFLICT => Err(MessengerError::ClaimLost),
            s => {
                let text = response.text().await.unwrap_or_default();
                Err(MessengerError::Failed(format!(
                    "{path} answered {s}: {}",
                    webhook_client::excerpt(text.as_bytes())
                )))
            }
        }
    }

    /// Claims up to `limit` messages for `worker`, held for `lease`.
    pub async fn claim(
        &self,
        worker: &str,
        limit: u32,
        lease: Duration,
        correlation_id: &str,
    ) -> Result<Vec<Claimed>, MessengerError> {
        let body = serde_json::to_value(ClaimBody {
            worker,
            limit,
            lease_seconds: lease.as_secs(),
        })
        .map_err(|e| MessengerError::Failed(e.to_string()))?;
        self.call(reqwest::Method::POST, "/api/messenger/get-two", body, correlation_id)
            .await?
            .json()
            .await
            .map_err(|e| MessengerError::Failed(format!("unreadable claim: {e}")))
    }

    /// Commits an accepted send.
    pub async fn commit(
        &self,
        id: &str,
        token: &str,
        message_id: Option<&str>,
        sent_at: DateTime<Utc>,
        correlation_id: &str,
    ) -> Result<(), MessengerError> {
        let body = json!({"claimToken": token, "webhookMessageId": message_id, "sentAt": sent_at});
        self.call(
            reqwest::Method::PUT,
            &format!("/api/messenger/commit/{id}"),
            body,
            correlation_id,
        )
        .await
        .map(drop)
    }

    /// Reports a failed attempt; returns the status the Messenger API gave the message
    /// (`pending` for a scheduled retry, `failed` when permanent or out of retries).
    pub async fn fail(
        &self,
        id: &str,
        token: &str,
        failure: &DeliveryFailure,
        retryable: bool,
        retry_after: Option<Duration>,
        correlation_id: &str,
    ) -> Result<String, MessengerError> {
        let body = json!({
            "claimToken": token,
            "error": {"kind": failure.kind, "status": failure.status, "detail": failure.detail},
            "retryable": retryable,
            "retryAfterSeconds": retry_after.map(|d| d.as_secs()),
        });
        #[derive(Deserialize)]
        struct After {
            status: String,
        }
        let after: After = self
            .call(
                reqwest::Method::PUT,
                &format!("/api/messenger/fail/{id}"),
                body,
                correlation_id,
            )
            .await?
            .json()
            .await
            .map_err(|e| MessengerError::Failed(format!("unreadable fail answer: {e}")))?;
        Ok(after.status)
    }

    /// Gives an unsent claim back.
    pub async fn release(&self, id: &str, token: &str, correlation_id: &str) -> Result<(), MessengerError> {
        self.call(
            reqwest::Method::PUT,
            &format!("/api/messenger/release/{id}"),
            json!({"claimToken": token}),
            correlation_id,
        )
        .await
        .map(drop)
    }

    /// Whether the Messenger API answers its liveness probe.
    pub async fn ping(&self) -> Result<(), String> {
        let response = self
            .http
            .get(format!("{}/messenger/health", self.base))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("health answered {}", response.status()))
        }
    }
}
