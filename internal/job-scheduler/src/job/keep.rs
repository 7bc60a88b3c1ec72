//! Keeping claims: a message that went to a provider is its run's until its outcome is
//! reported. When the report is slow to land (the Messenger API under load, a report retried
//! while it is away) the claim's lease could lapse with the provider already holding the
//! message; another worker would claim it and the provider get it twice. So the run keeps
//! those claims: one with less than a third of a lease left is extended by a lease, each
//! conditional on its token. What is left is counted from the claim's own `leaseUntil`, then
//! from the moment each extension was asked for. Messages not yet sent need no keeping: a send
//! starts only while its claim leaves room for the timeout and the report (`budget`), and one
//! that cannot is given back unsent. A report that lands in time — every one in a healthy
//! run — extends nothing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::Duration;

use herald_core::worker::{ClaimedMessage, HeldClaim, MAX_OUTCOMES};
use telemetry::Chain;
use tokio::time::Instant;

use super::SendingJob;

/// A run's sent messages not yet reported: id → (claim token, when its lease ends at the latest).
#[derive(Default)]
pub(super) struct Held(Mutex<HashMap<String, (String, Instant)>>);

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sent just now (or tried), held for at most `lease` from its claim.
    pub(super) fn add(&self, message: &ClaimedMessage, lease: Duration) {
        let left = (message.lease_until - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(lease);
        self.lock()
            .insert(message.id.clone(), (message.claim_token.clone(), Instant::now() + left));
    }

    /// Reported (or given up on).
    pub(super) fn remove<'a>(&self, ids: impl Iterator<Item = &'a str>) {
        let mut held = self.lock();
        for id in ids {
            held.remove(id);
        }
    }

    /// The run is over.
    pub(super) fn clear(&self) {
        self.lock().clear();
    }

    /// The claims whose lease ends within `within`.
    fn ending_within(&self, within: Duration) -> Vec<HeldClaim> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, (_, ends))| ends.saturating_duration_since(now) < within)
            .map(|(id, (token, _))| HeldClaim {
                id: id.clone(),
                claim_token: token.clone(),
            })
            .collect()
    }

    /// `claims` were extended to at least `until`.
    fn extended(&self, claims: &[HeldClaim], until: Instant) {
        let mut held = self.lock();
        for claim in claims {
            if let Some((_, ends)) = held.get_mut(&claim.id) {
                *ends = (*ends).max(until);
            }
        }
    }
}

impl SendingJob {
    /// For as long as the run lasts (it drops this when done): every tenth of a lease, extends
    /// the kept claims with less than a third of one left.
    pub(super) async fn keep_claims(&self, run_id: &str) -> Infallible {
        let lease = self.config.lease;
        let tick = (lease / 10).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(tick).await;
            let ending = self.held.ending_within(lease / 3);
            for chunk in ending.chunks(MAX_OUTCOMES) {
                let asked = Instant::now();
                match self.messenger.extend(chunk.to_vec(), lease, run_id).await {
                    Ok(answer) => {
                        // The API counted the new lease from its own now, after `asked`.
                        self.held.extended(chunk, asked + lease);
                        self.metrics.claims_extended.inc_by(answer.extended);
                        tracing::info!(
                            asked = chunk.len(),
                            extended = answer.extended,
                            "claims of sent messages with under a third of their lease left extended: outcome reports are slow to land"
                        );
                    }
                    Err(error) => {
                        // Left as they were: asked again at the next tick.
                        self.metrics.messenger_errors.with_label_values(&["extend"]).inc();
                        tracing::warn!(claims = chunk.len(), error = %Chain(&error), "could not extend held claims");
                    }
                }
            }
        }
    }
}
