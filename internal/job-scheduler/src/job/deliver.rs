//! Delivering one claimed message: wait out a provider pause and the shared rate limit (never
//! past the claim's send deadline), send it to the webhook, and tell what came of it.

use std::time::{Duration, Instant};

use herald_core::worker::{
    ClaimedMessage, CommitRequest, DeliveryError, ExpiredOutcome, FailRequest, FailedOutcome, Outcome, ReleaseRequest,
    ReleasedOutcome, SentOutcome,
};
use webhook_client::{DeliveryFailure, DeliveryOutcome, WebhookRequest};

use super::{Reported, SendingJob};
use crate::provider::{Admission, Answer};

/// Longest single sleep while waiting out a provider pause (shutdown and expiry are checked
/// between sleeps).
const PAUSE_STEP: Duration = Duration::from_millis(250);

impl SendingJob {
    /// Waits until the provider may be sent to and the rate allows it, then sends. A message
    /// whose claim would lapse first, or that is caught by shutdown, is given back unsent; one
    /// whose `expiresAt` passes first is reported expired.
    pub(super) async fn deliver(&self, message: &ClaimedMessage, run_id: &str) -> Reported {
        let released = || {
            self.metrics.deliveries.with_label_values(&["released"]).inc();
            Outcome::Released(ReleasedOutcome {
                id: message.id.clone(),
                claim: ReleaseRequest {
                    claim_token: message.claim_token.clone(),
                },
            })
        };
        let expired = || {
            self.metrics.deliveries.with_label_values(&["expired"]).inc();
            Outcome::Expired(ExpiredOutcome {
                id: message.id.clone(),
                claim: ReleaseRequest {
                    claim_token: message.claim_token.clone(),
                },
            })
        };
        let deadline = self.send_deadline(message);
        let probe = loop {
            if self.shutdown.is_cancelled() {
                // Not started: give it back rather than hold it until the lease runs out.
                return released();
            }
            if message.expired_at(chrono::Utc::now()) {
                return expired();
            }
            match self.gate.admit().await {
                Admission::Send => break false,
                Admission::Probe => break true,
                Admission::Wait(wait) => {
                    if tokio::time::Instant::now() + wait > deadline {
                        // The pause outlasts the claim: give it back, the attempt not counted.
                        return released();
                    }
                    tokio::select! {
                        () = tokio::time::sleep(wait.min(PAUSE_STEP)) => {}
                        () = self.shutdown.cancelled() => {}
                    }
                }
            }
        };
        let paced = tokio::select! {
            paced = self.limiter.acquire(deadline) => paced.is_ok(),
            () = self.shutdown.cancelled() => false,
        };
        if !paced {
            if probe {
                self.gate.abandon_probe().await;
            }
            return released();
        }
        if message.expired_at(chrono::Utc::now()) {
            return expired();
        }
        if tokio::time::Instant::now() > deadline {
            // It waited too long for a send slot or for room to report (the provider or the
            // Messenger API is slow): sent now, its outcome could land after the lease and
            // another worker send it again. Give it back unsent instead.
            if probe {
                self.gate.abandon_probe().await;
            }
            tracing::debug!(message_id = %message.id, run_id, "claim too old to send; released");
            return released();
        }
        let started = Instant::now();
        let outcome = self
            .webhook
            .send(
                &message.id,
                &WebhookRequest {
                    to: &message.to,
                    content: &message.content,
                },
            )
            .await;
        self.metrics
            .webhook_latency
            .with_label_values(&[outcome.label()])
            .observe(started.elapsed().as_secs_f64());
        self.metrics.deliveries.with_label_values(&[outcome.label()]).inc();
        let answer = match &outcome {
            DeliveryOutcome::Retryable { retry_after, .. } => Answer::Retryable(*retry_after),
            _ => Answer::Answered,
        };
        self.gate.observe(answer, probe).await;
        tracing::debug!(
            message_id = %message.id,
            to = %telemetry::mask_phone(&message.to),
            attempt = message.attempt,
            outcome = outcome.label(),
            run_id,
            "delivered"
        );
        let failed = |failure: DeliveryFailure, retryable, retry_after: Option<Duration>| {
            Outcome::Failed(FailedOutcome {
                id: message.id.clone(),
                failure: FailRequest {
                    claim_token: message.claim_token.clone(),
                    error: DeliveryError {
                        kind: failure.kind,
                        status: failure.status,
                        detail: failure.detail,
                    },
                    retryable,
                    retry_after_seconds: retry_after.map(|d| d.as_secs()),
                },
            })
        };
        match outcome {
            DeliveryOutcome::Accepted { message_id, .. } => {
                if message_id.is_none() {
                    self.metrics.accepted_without_id.inc();
                }
                Outcome::Sent(SentOutcome {
                    id: message.id.clone(),
                    commit: CommitRequest {
                        claim_token: message.claim_token.clone(),
                        webhook_message_id: message_id,
                        sent_at: Some(chrono::Utc::now()),
                    },
                })
            }
            DeliveryOutcome::Retryable { failure, retry_after } => failed(failure, true, retry_after),
            DeliveryOutcome::Permanent { failure } => failed(failure, false, None),
        }
    }
}
