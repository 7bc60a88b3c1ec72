//! One run of the sending job.

use std::time::{Duration, Instant};

use bson::DateTime;
use futures::StreamExt;
use herald_core::mongo::after;
use herald_core::worker::{
    ClaimedMessage, DeliveryError, ExpiredOutcome, FailedOutcome, Outcome, OutcomeResult, ReleasedOutcome, SentOutcome,
};
use telemetry::Chain;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use webhook_client::{DeliveryFailure, DeliveryOutcome, WebhookClient, WebhookRequest};

use crate::limiter::RateLimiter;
use crate::messenger_client::{MessengerClient, MessengerError, CALL_TIMEOUT};
use crate::metrics::SchedulerMetrics;
use crate::provider::{Admission, Answer, ProviderGate};
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
    /// Go on after a full batch without waiting for the next tick.
    pub drain: bool,
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

/// What one claimed message came to, on its way to the Messenger API.
type Reported = Outcome;

/// Most outcomes in one report.
const OUTCOMES_PER_REPORT: usize = 250;
/// Outcomes queued between the sends and the reporter: two reports' worth. When the Messenger
/// API falls behind, sends wait for room (and a claim that waits too long is given back unsent)
/// rather than pile up accepted messages whose reports would land after their leases.
const OUTCOME_QUEUE: usize = 2 * OUTCOMES_PER_REPORT;
/// Longest an outcome waits for others to share its report.
const OUTCOME_LINGER: Duration = Duration::from_millis(5);
/// How often a long (drain) run refreshes its record.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// First wait before reporting outcomes again after the Messenger API did not take them.
const REPORT_RETRY_FIRST: Duration = Duration::from_millis(200);
/// Longest wait between two such reports.
const REPORT_RETRY_MAX: Duration = Duration::from_secs(2);
/// Least time a send leaves between its timeout and its claim's lease end, for the report.
const SEND_MARGIN: Duration = Duration::from_secs(2);
/// Longest single sleep while waiting out a provider pause (shutdown and expiry are checked
/// between sleeps).
const PAUSE_STEP: Duration = Duration::from_millis(250);

/// A claimed batch and how many were asked for (fewer means the due backlog is drained).
struct Claimed {
    messages: Vec<ClaimedMessage>,
    asked: u32,
}

/// Why a run was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The schedule (or a Start): always recorded.
    Tick,
    /// A drain-mode idle poll: recorded only when it claimed something.
    Poll,
}

/// What the Messenger API made of a run's outcomes.
#[derive(Debug, Default)]
struct Tally {
    sent: i32,
    retried: i32,
    failed: i32,
    released: i32,
    expired: i32,
}

/// What the sending job talks to.
pub struct JobParts {
    /// Run records and the job state.
    pub store: JobStore,
    /// The Messenger API.
    pub messenger: MessengerClient,
    /// The provider.
    pub webhook: WebhookClient,
    /// The shared provider pause.
    pub gate: std::sync::Arc<ProviderGate>,
    /// The shared send rate.
    pub limiter: RateLimiter,
}

/// The sending job of one replica.
pub struct SendingJob {
    store: JobStore,
    messenger: MessengerClient,
    webhook: WebhookClient,
    /// The provider pause shared by every replica.
    gate: std::sync::Arc<ProviderGate>,
    /// The send rate shared by every replica.
    limiter: RateLimiter,
    config: JobConfig,
    metrics: SchedulerMetrics,
    /// Held for the whole of a run: a run never overlaps the previous one on this replica.
    run_lock: Mutex<()>,
    shutdown: CancellationToken,
}

impl SendingJob {
    /// Wires the parts.
    pub fn new(parts: JobParts, config: JobConfig, metrics: SchedulerMetrics, shutdown: CancellationToken) -> Self {
        let JobParts {
            store,
            messenger,
            webhook,
            gate,
            limiter,
        } = parts;
        Self {
            store,
            messenger,
            webhook,
            gate,
            limiter,
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

    /// One run: skip when stopped or overlapping; else claim, send, report the outcomes,
    /// record. In drain mode a run that claimed a full batch goes on with the next one (claimed
    /// while the current one is being sent) until fewer than a batch are due, the job is
    /// stopped, or shutdown.
    pub async fn run_once(&self) -> RunReport {
        self.run(Mode::Tick).await
    }

    /// A drain-mode look for due messages by an idle replica: like [`SendingJob::run_once`], but
    /// quiet — no record at all when the job is stopped, a run is going, or nothing was due.
    /// Returns the run when it claimed something.
    pub async fn poll_once(&self) -> Option<RunReport> {
        let report = self.run(Mode::Poll).await;
        (report.claimed > 0).then_some(report)
    }

    async fn run(&self, mode: Mode) -> RunReport {
        let started_at = DateTime::now();
        let Ok(_guard) = self.run_lock.try_lock() else {
            return self
                .skipped(started_at, "previous run still going on this replica", mode)
                .await;
        };
        if self.shutdown.is_cancelled() {
            return self.skipped(started_at, "shutting down", mode).await;
        }
        if mode == Mode::Poll && !self.still_working().await {
            return self.skipped(started_at, "job is stopped", mode).await;
        }
        if let Some(until) = self.gate.paused_until().await {
            let reason = format!("provider paused until {}", until.to_rfc3339());
            return self.skipped(started_at, &reason, mode).await;
        }
        let span = tracing::info_span!("run", worker = %self.config.worker_id, run_id = tracing::field::Empty);
        self.run_locked(started_at, mode, span.clone()).instrument(span).await
    }

    fn expires_at(&self, from: DateTime) -> DateTime {
        after(
            from,
            self.config.lease + self.config.webhook_timeout + Duration::from_secs(10),
        )
    }

    async fn run_locked(&self, started_at: DateTime, mode: Mode, span: tracing::Span) -> RunReport {
        // The run is recorded as in flight *before* the working flag is read, so a Stop that
        // clears the flag and then waits for in-flight runs cannot miss this one.
        let mut report = JobRunDoc::started(&self.config.worker_id, started_at, self.expires_at(started_at));
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
        let batch = match self.claim(&run_id).await {
            Ok(claimed) => claimed,
            Err(error) => {
                report.error = Some(format!("claim failed: {}", Chain(&error)));
                return self.finish(report, RunResult::Error).await;
            }
        };
        if batch.messages.is_empty() && mode == Mode::Poll {
            if let Err(error) = self.store.discard_run(report.id).await {
                tracing::warn!(error = %Chain(&error), "could not discard an empty poll run");
            }
            return report;
        }
        let (outcomes, reported) = mpsc::channel::<Reported>(OUTCOME_QUEUE);
        let sending = self.send_batches(batch, outcomes, &mut report, &run_id);
        let reporting = self.report_outcomes(reported, &run_id);
        let ((), tally) = tokio::join!(sending, reporting);
        report.sent += tally.sent;
        report.retried += tally.retried;
        report.failed += tally.failed;
        report.released += tally.released;
        report.expired += tally.expired;
        if report.claimed > 0 {
            tracing::info!(
                claimed = report.claimed,
                sent = report.sent,
                retried = report.retried,
                failed = report.failed,
                "run finished"
            );
        }
        let result = if report.error.is_some() {
            RunResult::Error
        } else {
            RunResult::Completed
        };
        self.finish(report, result).await
    }

    /// How long after its claim a message may still start its send.
    fn send_budget(&self) -> Duration {
        self.config
            .lease
            .saturating_sub(self.config.webhook_timeout + self.report_reserve())
    }

    /// Room kept between a send's timeout and its claim's lease end for the outcome to reach
    /// the Messenger API: queued behind other outcomes, then one report call. Half of what the
    /// lease leaves beside the webhook timeout, at least [`SEND_MARGIN`] and at most one call's
    /// timeout. A report that lands after the lease is refused (`claim_lost`), and by then
    /// another worker may have claimed the message and sent it again.
    fn report_reserve(&self) -> Duration {
        let spare = self.config.lease.saturating_sub(self.config.webhook_timeout) / 2;
        spare.clamp(SEND_MARGIN, CALL_TIMEOUT)
    }

    /// How many to claim: a batch, or under a rate limit what this replica's share sends in
    /// time (so waiting for the limit never outlasts a claim).
    fn claim_size(&self) -> u32 {
        let cap = self.limiter.claim_cap(self.send_budget());
        cap.map_or(self.config.batch_size, |cap| cap.min(self.config.batch_size))
    }

    async fn claim(&self, run_id: &str) -> Result<Claimed, MessengerError> {
        let asked = self.claim_size();
        let claimed = self
            .messenger
            .claim(&self.config.worker_id, asked, self.config.lease, run_id)
            .await;
        if claimed.is_err() {
            self.metrics.messenger_errors.with_label_values(&["claim"]).inc();
        }
        Ok(Claimed {
            messages: claimed?,
            asked,
        })
    }

    /// Sends `first`, and in drain mode the batches after it: the next batch is claimed while
    /// the current one is being sent, so at most two batches are claimed and unsent at once and
    /// the provider connection never idles between batches.
    async fn send_batches(
        &self,
        first: Claimed,
        outcomes: mpsc::Sender<Reported>,
        report: &mut RunReport,
        run_id: &str,
    ) {
        let mut current = first;
        let mut heartbeat = tokio::time::Instant::now() + HEARTBEAT;
        loop {
            report.claimed += current.messages.len() as i32;
            let full = current.messages.len() == current.asked as usize;
            let go_on = self.config.drain && full && !self.shutdown.is_cancelled() && !self.gate.is_paused();
            let go_on = go_on && self.still_working().await;
            let send = self.send_batch(current.messages, &outcomes, run_id);
            let next = async {
                if go_on {
                    Some(self.claim(run_id).await)
                } else {
                    None
                }
            };
            let ((), next) = tokio::join!(send, next);
            match next {
                None => break,
                Some(Ok(batch)) if batch.messages.is_empty() => break,
                Some(Ok(batch)) => current = batch,
                Some(Err(error)) => {
                    report.error = Some(format!("claim failed: {}", Chain(&error)));
                    break;
                }
            }
            if tokio::time::Instant::now() >= heartbeat {
                // A long drain stays visibly in flight (Stop waits for it) and shows progress.
                heartbeat = tokio::time::Instant::now() + HEARTBEAT;
                report.expires_at = self.expires_at(DateTime::now());
                if let Err(error) = self.store.finish_run(report).await {
                    tracing::warn!(error = %Chain(&error), "could not refresh the run record");
                }
            }
        }
    }

    /// The last moment a send of `message` may start: its lease end less a send's timeout and
    /// the report's reserve, so its outcome is reported while the claim holds.
    fn send_deadline(&self, message: &ClaimedMessage) -> tokio::time::Instant {
        let left = (message.lease_until - chrono::Utc::now())
            .to_std()
            .unwrap_or_default()
            .saturating_sub(self.config.webhook_timeout + self.report_reserve());
        tokio::time::Instant::now() + left
    }

    async fn still_working(&self) -> bool {
        matches!(self.store.state_or_default().await, Ok(state) if state.working)
    }

    async fn send_batch(&self, batch: Vec<ClaimedMessage>, outcomes: &mpsc::Sender<Reported>, run_id: &str) {
        futures::stream::iter(batch)
            .for_each_concurrent(self.config.concurrency.max(1), |message| async move {
                let outcome = self.deliver(&message, run_id).await;
                // The reporter outlives every send, so this only fails if it panicked.
                let _ = outcomes.send(outcome).await;
            })
            .await;
    }

    /// Waits until the provider may be sent to and the rate allows it, then sends. A message
    /// whose claim would lapse first, or that is caught by shutdown, is given back unsent; one
    /// whose `expiresAt` passes first is reported expired.
    async fn deliver(&self, message: &ClaimedMessage, run_id: &str) -> Reported {
        let released = || {
            self.metrics.deliveries.with_label_values(&["released"]).inc();
            Outcome::Released(ReleasedOutcome {
                id: message.id.clone(),
                claim_token: message.claim_token.clone(),
            })
        };
        let expired = || {
            self.metrics.deliveries.with_label_values(&["expired"]).inc();
            Outcome::Expired(ExpiredOutcome {
                id: message.id.clone(),
                claim_token: message.claim_token.clone(),
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
                claim_token: message.claim_token.clone(),
                error: DeliveryError {
                    kind: failure.kind,
                    status: failure.status,
                    detail: failure.detail,
                },
                retryable,
                retry_after_seconds: retry_after.map(|d| d.as_secs()),
            })
        };
        match outcome {
            DeliveryOutcome::Accepted { message_id, .. } => {
                if message_id.is_none() {
                    self.metrics.accepted_without_id.inc();
                }
                Outcome::Sent(SentOutcome {
                    id: message.id.clone(),
                    claim_token: message.claim_token.clone(),
                    webhook_message_id: message_id,
                    sent_at: Some(chrono::Utc::now()),
                })
            }
            DeliveryOutcome::Retryable { failure, retry_after } => failed(failure, true, retry_after),
            DeliveryOutcome::Permanent { failure } => failed(failure, false, None),
        }
    }

    /// Reports outcomes as they complete, in small batches: whatever is ready, up to
    /// [`OUTCOMES_PER_REPORT`], waiting at most [`OUTCOME_LINGER`] for company, so one slow
    /// provider answer holds back no one.
    async fn report_outcomes(&self, mut reported: mpsc::Receiver<Reported>, run_id: &str) -> Tally {
        let mut tally = Tally::default();
        let mut batch = Vec::with_capacity(OUTCOMES_PER_REPORT);
        while let Some(first) = reported.recv().await {
            batch.push(first);
            let linger = tokio::time::sleep(OUTCOME_LINGER);
            tokio::pin!(linger);
            while batch.len() < OUTCOMES_PER_REPORT {
                tokio::select! {
                    next = reported.recv() => match next {
                        Some(outcome) => batch.push(outcome),
                        None => break,
                    },
                    () = &mut linger => break,
                }
            }
            self.flush(std::mem::take(&mut batch), run_id, &mut tally).await;
        }
        tally
    }

    async fn flush(&self, batch: Vec<Reported>, run_id: &str, tally: &mut Tally) {
        let count = batch.len();
        // A report that never lands means messages the provider accepted are handed out again
        // when their lease ends, and sent twice. So while the Messenger API or its database is
        // away, keep trying for as long as a lease lasts: a late report is always safe (the API
        // applies it only if the claim still holds), and meanwhile this run sends no more.
        let give_up = tokio::time::Instant::now() + self.config.lease;
        let mut wait = REPORT_RETRY_FIRST;
        let mut answer = self.messenger.report(&batch, run_id).await;
        while answer.as_ref().is_err_and(worth_retrying)
            && !self.shutdown.is_cancelled()
            && tokio::time::Instant::now() + wait < give_up
        {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.shutdown.cancelled() => {}
            }
            answer = self.messenger.report(&batch, run_id).await;
            wait = (wait * 2).min(REPORT_RETRY_MAX);
        }
        match answer {
            Ok(results) => {
                for item in results.items {
                    match item.result {
                        OutcomeResult::Committed | OutcomeResult::AlreadyCommitted => tally.sent += 1,
                        OutcomeResult::RetryScheduled => tally.retried += 1,
                        OutcomeResult::Failed => tally.failed += 1,
                        OutcomeResult::Released => tally.released += 1,
                        OutcomeResult::Expired => tally.expired += 1,
                        OutcomeResult::ClaimLost | OutcomeResult::NotFound | OutcomeResult::InvalidId => {
                            tracing::warn!(message_id = %item.id, result = ?item.result, "outcome not applied: another worker took over");
                        }
                    }
                }
            }
            Err(error) => {
                self.metrics.messenger_errors.with_label_values(&["outcomes"]).inc();
                tracing::error!(
                    messages = count,
                    error = %Chain(&error),
                    "could not report outcomes; their leases will hand the messages out again"
                );
            }
        }
    }

    async fn skipped(&self, started_at: DateTime, reason: &str, mode: Mode) -> RunReport {
        let mut report = JobRunDoc::started(&self.config.worker_id, started_at, started_at);
        report.skipped_reason = Some(reason.to_owned());
        report.finished_at = Some(DateTime::now());
        if mode == Mode::Poll {
            // An idle poll that found nothing to do leaves no trace.
            return report;
        }
        self.metrics
            .runs
            .with_label_values(&[RunResult::Skipped.as_str()])
            .inc();
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

/// Whether a failed report may land later: no answer, or a server error (the API or its
/// database away). A 4xx says the report itself is wrong and would be refused again.
fn worth_retrying(error: &MessengerError) -> bool {
    match error {
        MessengerError::ClaimLost => false,
        MessengerError::Call(peer) => peer.status().is_none_or(|status| status.is_server_error()),
    }
}
