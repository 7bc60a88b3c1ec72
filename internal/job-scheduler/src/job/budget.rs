//! The lease budget: a claim lasts `lease`; a send must start early enough that its timeout
//! and the report of its outcome both fit before the lease ends, or another worker may claim
//! the message and send it again.

use std::time::Duration;

use herald_core::worker::ClaimedMessage;

use super::SendingJob;
use crate::messenger_client::CALL_TIMEOUT;

/// Least time a send leaves between its timeout and its claim's lease end, for the report.
const SEND_MARGIN: Duration = Duration::from_secs(2);

impl SendingJob {
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
    pub(super) fn claim_size(&self) -> u32 {
        let cap = self.lanes.claim_cap(self.send_budget());
        cap.map_or(self.config.batch_size, |cap| cap.min(self.config.batch_size))
    }
    /// The last moment a send of `message` may start: its lease end less a send's timeout and
    /// the report's reserve, so its outcome is reported while the claim holds.
    pub(super) fn send_deadline(&self, message: &ClaimedMessage) -> tokio::time::Instant {
        let left = (message.lease_until - chrono::Utc::now())
            .to_std()
            .unwrap_or_default()
            .saturating_sub(self.config.webhook_timeout + self.report_reserve());
        tokio::time::Instant::now() + left
    }
}
