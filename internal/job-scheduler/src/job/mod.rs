//! The sending job of one replica: a run claims through the Messenger API, delivers each
//! message, and reports the outcomes back.
//!
//! - this file: the run itself — skip or record it, claim, and in drain mode go on batch after
//!   batch ([`SendingJob::run_once`], which tests call directly).
//! - `budget`: how long after its claim a message may still be sent, and how many to claim.
//! - `deliver`: one message through the provider pause, the rate limit and the webhook.
//! - `report`: outcomes gathered into reports to the Messenger API, retried while it is away.
//! - `keep`: the claims of sent messages, extended while their reports are slow to land.

mod budget;
mod deliver;
mod keep;
mod report;

use std::time::Duration;

use bson::DateTime;
use futures::StreamExt;
use herald_core::mongo::after;
use herald_core::worker::{ClaimedMessage, Outcome};
use telemetry::Chain;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::lanes::Lanes;
use crate::messenger_client::{MessengerClient, MessengerError};
use crate::metrics::SchedulerMetrics;
use crate::store::{JobRunDoc, JobStore};
use report::OUTCOME_QUEUE;

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
    /// The longest provider's total timeout (bounds a run's sends).
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

/// How often a long (drain) run refreshes its record.
const HEARTBEAT: Duration = Duration::from_secs(5);

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

/// What the sending job talks to.
pub struct JobParts {
    /// Run records and the job state.
    pub store: JobStore,
    /// The Messenger API.
    pub messenger: MessengerClient,
    /// The providers, each with its shared pause and rate limit, and the routes.
    pub lanes: std::sync::Arc<Lanes>,
}

/// The sending job of one replica.
pub struct SendingJob {
    store: JobStore,
    messenger: MessengerClient,
    /// The providers, each with its pause and send rate shared by every replica.
    lanes: std::sync::Arc<Lanes>,
    config: JobConfig,
    metrics: SchedulerMetrics,
    /// Held for the whole of a run: a run never overlaps the previous one on this replica.
    run_lock: Mutex<()>,
    /// The run's claims not yet reported.
    held: keep::Held,
    shutdown: CancellationToken,
}

impl SendingJob {
    /// Wires the parts.
    pub fn new(parts: JobParts, config: JobConfig, metrics: SchedulerMetrics, shutdown: CancellationToken) -> Self {
        let JobParts {
            store,
            messenger,
            lanes,
        } = parts;
        Self {
            store,
            messenger,
            lanes,
            config,
            metrics,
            run_lock: Mutex::new(()),
            held: keep::Held::default(),
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
        if let Some(until) = self.lanes.all_paused_until().await {
            let reason = format!("every provider paused, the first until {}", until.to_rfc3339());
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
        let ((), tally) = tokio::select! {
            biased;
            done = async { tokio::join!(sending, reporting) } => done,
            never = self.keep_claims(&run_id) => match never {},
        };
        self.held.clear();
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
            let go_on = self.config.drain && full && !self.shutdown.is_cancelled() && !self.lanes.all_paused();
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

    async fn still_working(&self) -> bool {
        matches!(self.store.state_or_default().await, Ok(state) if state.working)
    }

    async fn send_batch(&self, batch: Vec<ClaimedMessage>, outcomes: &mpsc::Sender<Reported>, run_id: &str) {
        futures::stream::iter(batch)
            .for_each_concurrent(self.config.concurrency.max(1), |message| async move {
                let outcome = self.deliver(&message, run_id).await;
                if matches!(outcome, Outcome::Sent(_) | Outcome::Failed(_)) {
                    // It went to a provider: its claim must outlive its report ([`keep`]).
                    self.held.add(&message, self.config.lease);
                }
                // The reporter outlives every send, so this only fails if it panicked.
                let _ = outcomes.send(outcome).await;
            })
            .await;
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
