//! The worker side of the Messenger API: claim, report outcomes in batches and keep claims
//! still held, spoken with the typed contract of [`herald_core::worker`].

use std::time::Duration;

use herald_core::peer::{PeerClient, PeerError};
use herald_core::worker::{
    self, ClaimRequest, ClaimedMessage, ExtendRequest, ExtendResults, HeldClaim, Outcome, OutcomeResults,
};
use layered_config::SecretString;
use reqwest::{Method, StatusCode};

/// How long one call to the Messenger API may take.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

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

/// [`worker::OutcomeBatch`] by reference, so a retried report need not copy its outcomes.
#[derive(serde::Serialize)]
struct OutcomeBatchRef<'a> {
    items: &'a [Outcome],
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

    /// Reports many outcomes at once; answers a result per outcome.
    pub async fn report(&self, outcomes: &[Outcome], run_id: &str) -> Result<OutcomeResults, MessengerError> {
        let body = OutcomeBatchRef { items: outcomes };
        Ok(self
            .peer
            .call(Method::POST, worker::OUTCOMES_PATH, &body, Some(run_id))
            .await?)
    }

    /// Keeps the claims in `held` (still claimed, not yet reported) for `lease` more from now;
    /// answers how many were still held.
    pub async fn extend(
        &self,
        held: Vec<HeldClaim>,
        lease: Duration,
        run_id: &str,
    ) -> Result<ExtendResults, MessengerError> {
        let body = ExtendRequest {
            items: held,
            lease_seconds: Some(lease.as_secs().max(1)),
        };
        Ok(self
            .peer
            .call(Method::POST, worker::EXTEND_PATH, &body, Some(run_id))
            .await?)
    }

    /// Whether the Messenger API answers its liveness probe.
    pub async fn ping(&self) -> Result<(), PeerError> {
        self.peer.probe("/messenger/health").await
    }
}
