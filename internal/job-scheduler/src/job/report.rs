//! Reporting outcomes: gathered as sends complete into reports of up to
//! [`OUTCOMES_PER_REPORT`], each one call to the Messenger API, retried while it is away.

use std::time::Duration;

use herald_core::worker::{Outcome, OutcomeResult};
use telemetry::Chain;
use tokio::sync::mpsc;

use super::{Reported, SendingJob};
use crate::messenger_client::MessengerError;

/// Most outcomes in one report.
const OUTCOMES_PER_REPORT: usize = 250;
/// Outcomes queued between the sends and the reporter: two reports' worth. When the Messenger
/// API falls behind, sends wait for room (and a claim that waits too long is given back unsent)
/// rather than pile up accepted messages whose reports would land after their leases.
pub(super) const OUTCOME_QUEUE: usize = 2 * OUTCOMES_PER_REPORT;
/// Longest an outcome waits for others to share its report.
const OUTCOME_LINGER: Duration = Duration::from_millis(5);
/// First wait before reporting outcomes again after the Messenger API did not take them.
const REPORT_RETRY_FIRST: Duration = Duration::from_millis(200);
/// Longest wait between two such reports.
const REPORT_RETRY_MAX: Duration = Duration::from_secs(2);

/// What the Messenger API made of a run's outcomes.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub(super) sent: i32,
    pub(super) retried: i32,
    pub(super) failed: i32,
    pub(super) released: i32,
    pub(super) expired: i32,
}

impl SendingJob {
    /// Reports outcomes as they complete, in small batches: whatever is ready, up to
    /// [`OUTCOMES_PER_REPORT`], waiting at most [`OUTCOME_LINGER`] for company, so one slow
    /// provider answer holds back no one.
    pub(super) async fn report_outcomes(&self, mut reported: mpsc::Receiver<Reported>, run_id: &str) -> Tally {
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
        // Reported (or given up on): no longer this run's to keep.
        self.held.remove(batch.iter().map(Outcome::id));
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
}

/// Whether a failed report may land later: no answer, or a server error (the API or its
/// database away). A 4xx says the report itself is wrong and would be refused again.
fn worth_retrying(error: &MessengerError) -> bool {
    match error {
        MessengerError::ClaimLost => false,
        MessengerError::Call(peer) => peer.status().is_none_or(|status| status.is_server_error()),
    }
}
