//! One run of the sending job.

use std::time::{Duration, Instant};

use bson::DateTime;
use futures::StreamExt;
use herald_core::message::MessageStatus;
use herald_core::mongo::after;
use herald_core::worker::ClaimedMessage;
use telemetry::Chain;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use webhook_client::{DeliveryOutcome, WebhookClient, WebhookRequest};

use crate::messenger_client::{MessengerClient, MessengerError};
use crate::metrics::SchedulerMetrics;
use crate::store::{JobRunDoc, JobStore};

/// What one run did.
pub type RunReport = JobRunDoc;

/// How the job runs.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// This replica's worker id.
    pub worker_id: String,
    /// Messages per run.
    pub batch_size: u32,
    /// Sends in flight at once.
    pub concurrency: usize,
    /// Claim lease.
    pub lease: Duration,
    /// Webhook total timeout (bounds a run's sends).
    pub webhook_timeout: Duration,
}

/// How a run ended, as counted in `herald_job_runs_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunResult {
    /// It claimed (possibly nothing) and reported every outcome it could.
    Completed,
    /// It did nothing: stopped, overlapping or shutting down.
    Skipped,
    /// It could not record itself, read the job state or claim.
    Error,
}

impl RunResult {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Skipped => "skipped",
            Self::Error => "error",
        }
    }
}

/// What happened to one claimed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Sent,
    Retried,
    Failed,
    Released,
    /// Commit or fail did not reach the Messenger API; the lease will hand it out again.
    Unrecorded,
}

/// The sending job of one replica.
pub struct SendingJob {
    store: JobStore,
    messenger: MessengerClient,
    webhook: WebhookClient,
    config: JobConfig,
    metrics: SchedulerMetrics,
    /// Held for the whole of a run: a run never overlaps the previous one on this replica.
    run_lock: Mutex<()>,
    shutdown: CancellationToken,
}

impl SendingJob {
    /// Wires the parts.
    pub fn new(
        store: JobStore,
        messenger: MessengerClient,
        webhook: WebhookClient,
        config: JobConfig,
        metrics: SchedulerMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            messenger,
            webhook,
            config,
            metrics,
            run_lock: Mutex::new(()),
            shutdown,
        }
    }

    /// This replica's worker id.
    pub fn worker_id(&self) -> &str {
        &self.config.worker_id
    }

    /// Waits until this replica has no run in flight.
    pub async fn wait_idle(&self) {
        drop(self.run_lock.lock().await);
    }

    /// One run: skip when stopped or overlapping; else claim, send, commit/fail, record.
    pub async fn run_once(&self) -> RunReport {
        let started_at = DateTime::now();
        let Ok(_guard) = self.run_lock.try_lock() else {
            return self
                .skipped(started_at, "previous run still going on this replica")
                .await;
        };
        if self.shutdown.is_cancelled() {
            return self.skipped(started_at, "shutting down").await;
        }
        let span = tracing::info_span!("run", worker = %self.config.worker_id, run_id = tracing::field::Empty);
        self.run_locked(started_at, span.clone()).instrument(span).await
    }

    async fn run_locked(&self, started_at: DateTime, span: tracing::Span) -> RunReport {
        // The run is recorded as in flight *before* the working flag is read, so a Stop that
        // clears the flag and then waits for in-flight runs cannot miss this one.
        let expires = self.config.lease + self.config.webhook_timeout + Duration::from_secs(10);
        let expires_at = after(started_at, expires);
        let mut report = JobRunDoc::started(&self.config.worker_id, started_at, expires_at);
        if let Err(error) = self.store.begin_run(&report).await {
            // Without the in-flight record a Stop could miss this run: do not claim.
            report.error = Some(format!("could not record the run: {}", Chain(&error)));
            return self.finish(report, RunResult::Error).await;
        }
        span.record("run_id", tracing::field::display(report.id));
        let run_id = report.id.to_hex();
        match self.store.state_or_default().await {
            Ok(state) if !state.working => {
                report.skipped_reason = Some("job is stopped".into());
                return self.finish(report, RunResult::Skipped).await;
            }
            Ok(_) => {}
            Err(error) => {
                report.error = Some(format!("could not read the job state: {}", Chain(&error)));
                return self.finish(report, RunResult::Error).await;
            }
        }
        let claimed = match self
            .messenger
            .claim(
                &self.config.worker_id,
                self.config.batch_size,
                self.config.lease,
                &run_id,
            )
            .await
        {
            Ok(claimed) => claimed,
            Err(error) => {
                self.metrics.messenger_errors.with_label_values(&["claim"]).inc();
                report.error = Some(format!("claim failed: {}", Chain(&error)));
                return self.finish(report, RunResult::Error).await;
            }
        };
        report.claimed = claimed.len() as i32;
        let outcomes: Vec<Delivery> = futures::stream::iter(claimed)
            .map(|message| self.deliver(message, &run_id))
            .buffer_unordered(self.config.concurrency.max(1))
            .collect()
            .await;
        for outcome in outcomes {
            match outcome {
                Delivery::Sent => report.sent += 1,
                Delivery::Retried => report.retried += 1,
                Delivery::Failed => report.failed += 1,
                Delivery::Released => report.released += 1,
                Delivery::Unrecorded => {}
            }
        }
        if report.claimed > 0 {
            tracing::info!(
                claimed = report.claimed,
                sent = report.sent,
                retried = report.retried,
                failed = report.failed,
                "run finished"
            );
        }
        self.finish(report, RunResult::Completed).await
    }

    async fn deliver(&self, message: ClaimedMessage, run_id: &str) -> Delivery {
        let masked = telemetry::mask_phone(&message.to);
        if self.shutdown.is_cancelled() {
            // Not started: give it back rather than hold it until the lease runs out.
            return match self.messenger.release(&message, run_id).await {
                Ok(()) => {
                    self.metrics.deliveries.with_label_values(&["released"]).inc();
                    Delivery::Released
                }
                Err(error) => {
                    self.metrics.messenger_errors.with_label_values(&["release"]).inc();
                    tracing::warn!(message_id = %message.id, error = %Chain(&error), "could not release; the lease will expire");
                    Delivery::Unrecorded
                }
            };
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
        let label = outcome.label();
        let (result, operation) = match outcome {
            DeliveryOutcome::Accepted { message_id, .. } => {
                if message_id.is_none() {
                    self.metrics.accepted_without_id.inc();
                }
                let result = self
                    .messenger
                    .commit(&message, message_id, chrono::Utc::now(), run_id)
                    .await
                    .map(|()| Delivery::Sent);
                (result, "commit")
            }
            DeliveryOutcome::Retryable { failure, retry_after } => {
                let result = self
                    .messenger
                    .fail(&message, &failure, true, retry_after, run_id)
                    .await
                    .map(after_failure);
                (result, "fail")
            }
            DeliveryOutcome::Permanent { failure } => {
                let result = self
                    .messenger
                    .fail(&message, &failure, false, None, run_id)
                    .await
                    .map(after_failure);
                (result, "fail")
            }
        };
        tracing::debug!(message_id = %message.id, to = %masked, attempt = message.attempt, outcome = label, "delivered");
        match result {
            Ok(delivery) => delivery,
            Err(MessengerError::ClaimLost) => {
                tracing::warn!(message_id = %message.id, "claim lost before {operation}: another worker took over");
                Delivery::Unrecorded
            }
            Err(error) => {
                self.metrics.messenger_errors.with_label_values(&[operation]).inc();
                tracing::error!(message_id = %message.id, error = %Chain(&error), "{operation} failed; the lease will hand the message out again");
                Delivery::Unrecorded
            }
        }
    }

    async fn skipped(&self, started_at: DateTime, reason: &str) -> RunReport {
        let mut report = JobRunDoc::started(&self.config.worker_id, started_at, started_at);
        report.skipped_reason = Some(reason.to_owned());
        self.metrics
            .runs
            .with_label_values(&[RunResult::Skipped.as_str()])
            .inc();
        report.finished_at = Some(DateTime::now());
        if let Err(error) = self.store.finish_run(&report).await {
            tracing::warn!(error = %Chain(&error), "could not record a skipped run");
        }
        report
    }

    async fn finish(&self, mut report: RunReport, result: RunResult) -> RunReport {
        report.finished_at = Some(DateTime::now());
        self.metrics.runs.with_label_values(&[result.as_str()]).inc();
        if report.skipped_reason.is_none() {
            self.metrics
                .last_run
                .set(report.started_at.timestamp_millis() as f64 / 1000.0);
        }
        if let Some(error) = &report.error {
            tracing::warn!(%error, "run ended with an error");
        }
        if let Err(error) = self.store.finish_run(&report).await {
            tracing::warn!(error = %Chain(&error), "could not record the run");
        }
        report
    }
}

/// What the Messenger API made of a failure report: out of retries counts as failed.
fn after_failure(status: MessageStatus) -> Delivery {
    if status == MessageStatus::Failed {
        Delivery::Failed
    } else {
        Delivery::Retried
    }
}
