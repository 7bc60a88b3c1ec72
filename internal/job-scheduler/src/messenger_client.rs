//! The worker side of the Messenger API: claim, commit, fail, release, spoken with the typed
//! contract of [`herald_core::worker`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use herald_core::message::{MessageStatus, MessageView};
use herald_core::peer::{PeerClient, PeerError};
use herald_core::worker::{
    self, ClaimRequest, ClaimedMessage, CommitRequest, DeliveryError, FailRequest, ReleaseRequest,
};
use layered_config::SecretString;
use reqwest::{Method, StatusCode};
use webhook_client::DeliveryFailure;

/// How long one call to the Messenger API may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call to the Messenger API did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum MessengerError {
    /// The claim was lost (409): the lease expired and someone else holds the message.
    #[error("claim lost")]
    ClaimLost,
    /// Any other answer, or no answer.
    #[error(transparent)]
    Call(PeerError),
}

impl From<PeerError> for MessengerError {
    fn from(error: PeerError) -> Self {
        if error.status() == Some(StatusCode::CONFLICT) {
            Self::ClaimLost
        } else {
            Self::Call(error)
        }
    }
}

/// HTTP client of the Messenger API. Every call carries the run's id as `X-Correlation-Id`, so
/// the Messenger API's request spans can be matched to the run that made them.
#[derive(Clone)]
pub struct MessengerClient {
    peer: PeerClient,
}

impl MessengerClient {
    /// A client for `base_url`, presenting `key`.
    pub fn new(base_url: &str, key: SecretString) -> reqwest::Result<Self> {
        Ok(Self {
            peer: PeerClient::new(base_url, key, CALL_TIMEOUT)?,
        })
    }

    /// Claims up to `limit` messages for `worker`, held for `lease`.
    pub async fn claim(
        &self,
        worker: &str,
        limit: u32,
        lease: Duration,
        run_id: &str,
    ) -> Result<Vec<ClaimedMessage>, MessengerError> {
        let body = ClaimRequest {
            worker: worker.to_owned(),
            limit: Some(limit),
            lease_seconds: Some(lease.as_secs()),
        };
        Ok(self
            .peer
            .call(Method::POST, worker::CLAIM_PATH, &body, Some(run_id))
            .await?)
    }

    /// Commits an accepted send.
    pub async fn commit(
        &self,
        message: &ClaimedMessage,
        webhook_message_id: Option<String>,
        sent_at: DateTime<Utc>,
        run_id: &str,
    ) -> Result<(), MessengerError> {
        let body = CommitRequest {
            claim_token: message.claim_token.clone(),
            webhook_message_id,
            sent_at: Some(sent_at),
        };
        let path = worker::commit_path(&message.id);
        self.peer
            .call::<_, serde::de::IgnoredAny>(Method::PUT, &path, &body, Some(run_id))
            .await?;
        Ok(())
    }

    /// Reports a failed attempt; returns the status the Messenger API gave the message
    /// (`pending` for a scheduled retry, `failed` when permanent or out of retries).
    pub async fn fail(
        &self,
        message: &ClaimedMessage,
        failure: &DeliveryFailure,
        retryable: bool,
        retry_after: Option<Duration>,
        run_id: &str,
    ) -> Result<MessageStatus, MessengerError> {
        let body = FailRequest {
            claim_token: message.claim_token.clone(),
            error: DeliveryError {
                kind: failure.kind,
                status: failure.status,
                detail: failure.detail.clone(),
            },
            retryable,
            retry_after_seconds: retry_after.map(|d| d.as_secs()),
        };
        let path = worker::fail_path(&message.id);
        let after: MessageView = self.peer.call(Method::PUT, &path, &body, Some(run_id)).await?;
        Ok(after.status)
    }

    /// Gives an unsent claim back.
    pub async fn release(&self, message: &ClaimedMessage, run_id: &str) -> Result<(), MessengerError> {
        let body = ReleaseRequest {
            claim_token: message.claim_token.clone(),
        };
        let path = worker::release_path(&message.id);
        self.peer
            .call::<_, serde::de::IgnoredAny>(Method::PUT, &path, &body, Some(run_id))
            .await?;
        Ok(())
    }

    /// Whether the Messenger API answers its liveness probe.
    pub async fn ping(&self) -> Result<(), PeerError> {
        self.peer.probe("/messenger/health").await
    }
}
