//! Delivering one claimed message: walk the providers its route allows (its pin alone, or the
//! route's order starting after the provider that last failed it), skip those paused, wait
//! for the chosen one's shared rate limit (never past the claim's send deadline), send in that
//! provider's shape, and tell what came of it with every request made.
//!
//! Within one claim a message moves on to the next provider at once — one attempt, however
//! many providers it tried — when the provider certainly did not take it: paused, refused
//! Herald's credentials (401/403), throttled (429, or 503 with `Retry-After`), or could not be
//! connected to. Any other retryable failure (a timeout, a 5xx) may have been delivered, so it
//! is reported, and the retry (after the schedule's delay) starts at the next provider. When
//! every provider it may go to is paused it is given back to wait, the attempt not counted,
//! due again when the first of them resumes.

use std::time::{Duration, Instant};

use herald_core::worker::{
    AttemptKind, AttemptRecord, ClaimedMessage, CommitRequest, DeliveryError, ExpiredOutcome, FailRequest,
    FailedOutcome, Outcome, ReleaseRequest, ReleasedOutcome, SentOutcome,
};
use webhook_client::{DeliveryFailure, DeliveryOutcome};

use super::{Reported, SendingJob};
use crate::lanes::Lane;
use crate::provider::{Admission, Answer};

/// Longest single sleep while waiting out a short pause or another replica's probe (shutdown
/// and expiry are checked between sleeps).
const PAUSE_STEP: Duration = Duration::from_millis(250);
/// A pause that ends sooner than this is waited out in place; a longer one gives the message
/// back to wait, so it does not hold a send slot other messages could use.
const WAIT_IN_PLACE: Duration = Duration::from_secs(1);

/// Which lane a message takes next, or why none.
enum Choice {
    /// Send through this lane (`true`: as the probe that decides whether it resumes).
    Send(usize, bool),
    /// Every lane left is paused: the earliest resumes after this long.
    AllPaused(Duration),
}

/// How one request ended, for the walk.
enum Step {
    /// Done: report this.
    Done(Reported),
    /// The provider certainly did not take it: try the next lane.
    Next(DeliveryFailure, Option<Duration>),
}

impl SendingJob {
    /// Sends `message` through the lanes its route allows and reports what came of it. A
    /// message whose claim would lapse first, or that is caught by shutdown, is given back
    /// unsent; one whose `expiresAt` passes first is reported expired.
    pub(super) async fn deliver(&self, message: &ClaimedMessage, run_id: &str) -> Reported {
        let plan = self.lanes.plan(message);
        let deadline = self.send_deadline(message);
        let mut attempts: Vec<AttemptRecord> = Vec::new();
        let mut last: Option<(DeliveryFailure, Option<Duration>)> = None;
        let mut next = 0;
        while next < plan.len() {
            let (index, probe) = match self.choose(message, &plan[next..], deadline).await {
                Ok(Choice::Send(offset, probe)) => (next + offset, probe),
                Ok(Choice::AllPaused(wait)) => {
                    return match last {
                        // Something was tried in this claim: report it, so the log keeps it.
                        Some((failure, _)) => self.failed(message, failure, true, None, attempts),
                        None => self.wait_for_provider(message, wait),
                    };
                }
                Err(outcome) => return outcome,
            };
            if index > next {
                let skipped = &self.lanes.get(plan[next]).name;
                self.metrics.failovers.with_label_values(&[skipped, "paused"]).inc();
            }
            let lane = self.lanes.get(plan[index]);
            match self.send(message, lane, probe, deadline, &mut attempts, run_id).await {
                Step::Done(outcome) => return outcome,
                Step::Next(failure, retry_after) => {
                    let reason = if matches!(failure.status, Some(401 | 403)) {
                        "misconfigured"
                    } else if failure.unsent {
                        "unreachable"
                    } else {
                        "throttled"
                    };
                    if plan.len() > index + 1 {
                        self.metrics.failovers.with_label_values(&[&lane.name, reason]).inc();
                    }
                    last = Some((failure, retry_after));
                    next = index + 1;
                }
            }
        }
        // Every lane of the plan refused it without taking it: a retryable failure; the
        // provider's Retry-After counts only when it was the one provider there is.
        let (failure, retry_after) = last.unwrap_or_else(|| {
            (
                DeliveryFailure {
                    kind: webhook_client::FailureKind::Connection,
                    status: None,
                    detail: "no provider to send to".into(),
                    unsent: true,
                },
                None,
            )
        });
        let retry_after = retry_after.filter(|_| plan.len() == 1);
        self.failed(message, failure, true, retry_after, attempts)
    }

    /// The first lane of `plan` that may be sent to now (the offset into `plan`), waiting out
    /// a pause that is about to end; `Err` with the outcome when the message cannot wait.
    async fn choose(
        &self,
        message: &ClaimedMessage,
        plan: &[usize],
        deadline: tokio::time::Instant,
    ) -> Result<Choice, Reported> {
        loop {
            if self.shutdown.is_cancelled() {
                // Not started: give it back rather than hold it until the lease runs out.
                return Err(self.released(message, None));
            }
            if message.expired_at(chrono::Utc::now()) {
                return Err(self.expired(message));
            }
            let mut shortest: Option<Duration> = None;
            for (offset, index) in plan.iter().enumerate() {
                match self.lanes.get(*index).gate.admit().await {
                    Admission::Send => return Ok(Choice::Send(offset, false)),
                    Admission::Probe => return Ok(Choice::Send(offset, true)),
                    Admission::Wait(wait) => shortest = Some(shortest.map_or(wait, |s| s.min(wait))),
                }
            }
            let wait = shortest.unwrap_or(PAUSE_STEP);
            if wait > WAIT_IN_PLACE || tokio::time::Instant::now() + wait > deadline {
                return Ok(Choice::AllPaused(wait));
            }
            tokio::select! {
                () = tokio::time::sleep(wait.min(PAUSE_STEP)) => {}
                () = self.shutdown.cancelled() => {}
            }
        }
    }

    /// One request through `lane`: its rate limit, the deadline, the send, and what the pause
    /// learns from the answer.
    async fn send(
        &self,
        message: &ClaimedMessage,
        lane: &Lane,
        probe: bool,
        deadline: tokio::time::Instant,
        attempts: &mut Vec<AttemptRecord>,
        run_id: &str,
    ) -> Step {
        let paced = tokio::select! {
            paced = lane.limiter.acquire(deadline) => paced.is_ok(),
            () = self.shutdown.cancelled() => false,
        };
        let too_late = tokio::time::Instant::now() > deadline;
        if !paced || too_late || message.expired_at(chrono::Utc::now()) {
            if probe {
                lane.gate.abandon_probe().await;
            }
            if message.expired_at(chrono::Utc::now()) {
                return Step::Done(self.expired(message));
            }
            // It waited too long for a send slot or for room to report (the provider or the
            // Messenger API is slow): sent now, its outcome could land after the lease and
            // another worker send it again. Give it back unsent instead.
            tracing::debug!(message_id = %message.id, run_id, "claim too old to send; released");
            return Step::Done(self.released(message, None));
        }
        let at = chrono::Utc::now();
        let started = Instant::now();
        let outcome = lane.client.send(&message.id, &message.to, &message.content).await;
        let latency = started.elapsed();
        let misconfigured = match &outcome {
            DeliveryOutcome::Permanent { failure } => matches!(failure.status, Some(401 | 403)),
            _ => false,
        };
        let kind = match &outcome {
            DeliveryOutcome::Accepted { .. } => AttemptKind::Accepted,
            _ if misconfigured => AttemptKind::Misconfigured,
            DeliveryOutcome::Retryable { .. } => AttemptKind::Retryable,
            DeliveryOutcome::Permanent { .. } => AttemptKind::Permanent,
        };
        let label = match kind {
            AttemptKind::Accepted => "accepted",
            AttemptKind::Retryable => "retryable",
            AttemptKind::Permanent => "permanent",
            AttemptKind::Misconfigured => "misconfigured",
        };
        self.metrics
            .webhook_latency
            .with_label_values(&[&lane.name, outcome.label()])
            .observe(latency.as_secs_f64());
        self.metrics
            .provider_requests
            .with_label_values(&[&lane.name, label])
            .inc();
        let status = match &outcome {
            DeliveryOutcome::Accepted { status, .. } => Some(*status),
            DeliveryOutcome::Retryable { failure, .. } | DeliveryOutcome::Permanent { failure } => failure.status,
        };
        attempts.push(AttemptRecord {
            at,
            provider: lane.name.clone(),
            kind,
            status,
            latency_ms: latency.as_millis() as u64,
        });
        let answer = match &outcome {
            _ if misconfigured => Answer::Misconfigured(status.unwrap_or(401)),
            DeliveryOutcome::Retryable { retry_after, .. } => Answer::Retryable(*retry_after),
            _ => Answer::Answered,
        };
        lane.gate.observe(answer, probe).await;
        tracing::debug!(
            message_id = %message.id,
            to = %telemetry::mask_phone(&message.to),
            provider = %lane.name,
            attempt = message.attempt,
            outcome = label,
            run_id,
            "delivered"
        );
        match outcome {
            DeliveryOutcome::Accepted { message_id, .. } => {
                self.metrics.deliveries.with_label_values(&["accepted"]).inc();
                if message_id.is_none() {
                    self.metrics.accepted_without_id.inc();
                }
                Step::Done(Outcome::Sent(SentOutcome {
                    id: message.id.clone(),
                    commit: CommitRequest {
                        claim_token: message.claim_token.clone(),
                        webhook_message_id: message_id,
                        sent_at: Some(chrono::Utc::now()),
                        provider: Some(lane.name.clone()),
                        attempts: std::mem::take(attempts),
                    },
                }))
            }
            DeliveryOutcome::Permanent { failure } if misconfigured => Step::Next(failure, None),
            DeliveryOutcome::Retryable { failure, retry_after } => {
                let throttled =
                    matches!(failure.status, Some(429)) || (failure.status == Some(503) && retry_after.is_some());
                if failure.unsent || throttled {
                    Step::Next(failure, retry_after)
                } else {
                    Step::Done(self.failed(message, failure, true, retry_after, std::mem::take(attempts)))
                }
            }
            DeliveryOutcome::Permanent { failure } => {
                Step::Done(self.failed(message, failure, false, None, std::mem::take(attempts)))
            }
        }
    }

    /// A failed attempt, with every request this claim made.
    fn failed(
        &self,
        message: &ClaimedMessage,
        failure: DeliveryFailure,
        retryable: bool,
        retry_after: Option<Duration>,
        attempts: Vec<AttemptRecord>,
    ) -> Reported {
        let label = if retryable { "retryable" } else { "permanent" };
        self.metrics.deliveries.with_label_values(&[label]).inc();
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
                attempts,
            },
        })
    }

    /// Given back unsent (the attempt not counted); with `wait`, not due again until then.
    fn released(&self, message: &ClaimedMessage, wait: Option<Duration>) -> Reported {
        self.metrics.deliveries.with_label_values(&["released"]).inc();
        Outcome::Released(ReleasedOutcome {
            id: message.id.clone(),
            claim: ReleaseRequest {
                claim_token: message.claim_token.clone(),
                wait_seconds: wait.map(|w| w.as_secs_f64().ceil().clamp(1.0, 3600.0) as u64),
            },
        })
    }

    /// Every provider it may go to is paused: given back to wait until the first resumes.
    fn wait_for_provider(&self, message: &ClaimedMessage, wait: Duration) -> Reported {
        self.metrics.waiting_for_provider.inc();
        tracing::debug!(message_id = %message.id, wait_ms = wait.as_millis() as u64, "every provider of its route is paused; it waits");
        self.released(message, Some(wait))
    }

    /// Its `expiresAt` passed before it could be sent.
    fn expired(&self, message: &ClaimedMessage) -> Reported {
        self.metrics.deliveries.with_label_values(&["expired"]).inc();
        Outcome::Expired(ExpiredOutcome {
            id: message.id.clone(),
            claim: ReleaseRequest {
                claim_token: message.claim_token.clone(),
                wait_seconds: None,
            },
        })
    }
}
