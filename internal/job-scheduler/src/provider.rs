//! A provider's pause, shared by every replica through MongoDB (`provider_state`, one
//! document per provider). Each provider has its own gate: one pausing never slows another.
//!
//! **Misconfigured.** A 401 or 403 says the provider refuses Herald's credentials, not the
//! message: the provider pauses for `max_retry_after_seconds` as *misconfigured* (its own state
//! and event) and its messages go on to the next provider of their route.
//!
//! **When it pauses.** A 429 or 503 that carries `Retry-After` pauses all sending until then
//! (capped by `webhook.max_retry_after_seconds`). Retryable failures without one (5xx,
//! timeouts, refused connections) are counted across replicas; `webhook.pause_after_failures`
//! of them in a row pause for `webhook.pause_seconds`, doubled for each pause in a row (same
//! cap). Any answer that is not retryable (accepted, or a permanent 4xx) ends the streak.
//!
//! **How it resumes.** When the pause is over, one replica takes the probe (a conditional
//! write, so only one does) and sends one message. Accepted (or any non-retryable answer): the
//! provider is open again for everyone. Retryable: paused again, longer. The probe lease is a
//! send's timeout and a little more, so a replica killed mid-probe does not keep it.
//!
//! **What a replica sees.** Each replica keeps the state in memory and reads it again at most
//! every [`REFRESH`] while it sends, so a pause set by one replica stops the others within
//! that time; its own pauses apply at once. Writes that fail (database away) are logged and the
//! pause still holds on this replica.

use std::sync::Mutex;
use std::time::Duration;

use bson::DateTime;
use chrono::Utc;
use herald_core::jobs::{ProviderStateDoc, ProviderStatus};
use herald_core::mongo::StoreError;
use telemetry::Chain;

use crate::store::ProviderStore;
use tokio::time::Instant;

/// Longest a replica's view of the shared state may be old while it sends.
pub const REFRESH: Duration = Duration::from_millis(100);
/// How often a sender waiting for another replica's probe looks again.
const PROBE_POLL: Duration = Duration::from_millis(100);

/// The pause rules, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct PauseRules {
    /// Retryable failures in a row that pause (0 = never).
    pub after_failures: u32,
    /// First streak pause.
    pub pause: Duration,
    /// Longest pause (and longest honoured Retry-After).
    pub max: Duration,
    /// How long a probe is held: a send's timeout and a margin.
    pub probe_hold: Duration,
}

impl PauseRules {
    /// The pause after `in_a_row` earlier pauses: `pause × 2^in_a_row`, capped.
    pub fn streak_pause(&self, in_a_row: i32) -> Duration {
        let factor = 2u32.saturating_pow(in_a_row.clamp(0, 30) as u32);
        self.pause.saturating_mul(factor).min(self.max)
    }
}

/// What a sender may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send.
    Send,
    /// Send: this is the probe that decides whether the provider is open again.
    Probe,
    /// Wait (at most this long) and ask again.
    Wait(Duration),
}

/// What the provider made of a send, as far as the pause is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Accepted, or refused for good: the provider is there.
    Answered,
    /// Retryable, with the provider's `Retry-After` when it gave one.
    Retryable(Option<Duration>),
    /// It refused Herald's credentials (401/403).
    Misconfigured(u16),
}

/// Why the provider paused (the `reason` label of `herald_provider_pauses_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PauseCause {
    RetryAfter,
    Failures,
    ProbeFailed,
    Misconfigured,
}

impl PauseCause {
    fn label(self) -> &'static str {
        match self {
            Self::RetryAfter => "retry_after",
            Self::Failures => "failures",
            Self::ProbeFailed => "probe_failed",
            Self::Misconfigured => "misconfigured",
        }
    }
}

/// The pause's metrics, labelled by provider.
#[derive(Clone)]
pub struct PauseMetrics {
    /// 1 while this replica sees the provider paused.
    pub paused: prometheus::IntGaugeVec,
    /// Pauses this replica set, by provider and reason.
    pub pauses: prometheus::IntCounterVec,
    /// Probes this replica sent, by provider and result: open, paused.
    pub probes: prometheus::IntCounterVec,
}

#[derive(Debug, Default)]
struct Known {
    paused_until: Option<chrono::DateTime<Utc>>,
    pauses_in_a_row: i32,
    failure_streak: i32,
    read_at: Option<Instant>,
    /// This replica holds the probe.
    probing: bool,
}

/// One replica's view of one provider's shared pause, and the rules that change it.
pub struct ProviderGate {
    name: String,
    store: ProviderStore,
    worker: String,
    rules: PauseRules,
    known: Mutex<Known>,
    refreshing: tokio::sync::Mutex<()>,
    metrics: PauseMetrics,
}

impl ProviderGate {
    /// The gate of provider `name` on replica `worker`.
    pub fn new(name: &str, store: ProviderStore, worker: &str, rules: PauseRules, metrics: PauseMetrics) -> Self {
        Self {
            name: name.to_owned(),
            store,
            worker: worker.to_owned(),
            rules,
            known: Mutex::new(Known::default()),
            refreshing: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn set_paused_gauge(&self, paused: bool) {
        self.metrics
            .paused
            .with_label_values(&[&self.name])
            .set(i64::from(paused));
    }

    fn count_probe(&self, result: &str) {
        self.metrics.probes.with_label_values(&[&self.name, result]).inc();
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the shared state when this replica's view is older than `max_age`.
    async fn refresh(&self, max_age: Duration) {
        if self.known().read_at.is_some_and(|at| at.elapsed() < max_age) {
            return;
        }
        let Ok(_one) = self.refreshing.try_lock() else {
            return; // another sender of this replica is reading it
        };
        match self.store.read().await {
            Ok(doc) => self.adopt(&doc),
            Err(error) => {
                tracing::warn!(error = %Chain(&error), "could not read the provider state; keeping the last one seen");
                self.known().read_at = Some(Instant::now());
            }
        }
    }

    /// Takes the shared state as read.
    fn adopt(&self, doc: &ProviderStateDoc) {
        let mut known = self.known();
        known.paused_until = doc.paused_until.map(|d| d.to_chrono());
        known.pauses_in_a_row = doc.pauses_in_a_row;
        known.failure_streak = doc.failure_streak;
        known.read_at = Some(Instant::now());
        if known.paused_until.is_none() {
            known.probing = false;
        }
        self.set_paused_gauge(known.paused_until.is_some());
    }

    /// When sending is paused until, as this replica sees it (read fresh). `None` when it may
    /// send or probe.
    pub async fn paused_until(&self) -> Option<chrono::DateTime<Utc>> {
        self.refresh(Duration::ZERO).await;
        self.known().paused_until.filter(|until| *until > Utc::now())
    }

    /// Whether the provider is paused as last seen (no read).
    pub fn is_paused(&self) -> bool {
        self.known().paused_until.is_some_and(|until| until > Utc::now())
    }

    /// The shared state, read now.
    pub async fn status(&self) -> Result<ProviderStatus, StoreError> {
        Ok(self.store.read().await?.status(Utc::now()))
    }

    /// May this replica send now?
    pub async fn admit(&self) -> Admission {
        self.refresh(REFRESH).await;
        let now = Utc::now();
        {
            let known = self.known();
            match known.paused_until {
                None => return Admission::Send,
                Some(until) if until > now => {
                    return Admission::Wait((until - now).to_std().unwrap_or(PROBE_POLL));
                }
                Some(_) if known.probing => return Admission::Wait(PROBE_POLL),
                Some(_) => {}
            }
        }
        match self
            .store
            .take_probe(&self.worker, DateTime::from_chrono(now), self.rules.probe_hold)
            .await
        {
            Ok(true) => {
                let mut known = self.known();
                if known.probing {
                    return Admission::Wait(PROBE_POLL);
                }
                known.probing = true;
                tracing::info!(provider = %self.name, worker = %self.worker, "provider pause is over: sending one probe");
                Admission::Probe
            }
            Ok(false) => {
                self.known().read_at = None; // someone else probes, or it resumed: look again
                Admission::Wait(PROBE_POLL)
            }
            Err(error) => {
                tracing::warn!(error = %Chain(&error), "could not take the provider probe");
                Admission::Wait(PROBE_POLL)
            }
        }
    }

    /// The probe this replica took was not sent after all (its message could not wait).
    pub async fn abandon_probe(&self) {
        self.known().probing = false;
        if let Err(error) = self.store.drop_probe(&self.worker).await {
            tracing::warn!(error = %Chain(&error), "could not give the provider probe back; it lapses by itself");
        }
    }

    /// Learns from one send's answer: ends a streak, counts one, pauses, or (after a probe)
    /// opens the provider again.
    pub async fn observe(&self, answer: Answer, probe: bool) {
        match answer {
            Answer::Answered if probe => {
                if let Err(error) = self.store.resume().await {
                    tracing::warn!(error = %Chain(&error), "could not record that the provider is open again");
                }
                let mut known = self.known();
                known.paused_until = None;
                known.pauses_in_a_row = 0;
                known.failure_streak = 0;
                known.probing = false;
                drop(known);
                self.set_paused_gauge(false);
                self.count_probe("open");
                tracing::info!(provider = %self.name, "provider answered the probe: sending resumes");
            }
            Answer::Answered => {
                let streak = std::mem::take(&mut self.known().failure_streak);
                if streak > 0 {
                    if let Err(error) = self.store.end_streak().await {
                        tracing::warn!(error = %Chain(&error), "could not reset the provider failure streak");
                    }
                }
            }
            Answer::Retryable(Some(wait)) => {
                let wait = wait.min(self.rules.max);
                self.pause(
                    wait,
                    PauseCause::RetryAfter,
                    format!("provider asked to wait {}s (Retry-After)", wait.as_secs()),
                )
                .await;
                if probe {
                    self.count_probe("paused");
                }
            }
            Answer::Misconfigured(status) => {
                self.pause(
                    self.rules.max,
                    PauseCause::Misconfigured,
                    format!("provider refused Herald's credentials (HTTP {status}): check its auth settings"),
                )
                .await;
                if probe {
                    self.count_probe("paused");
                }
            }
            Answer::Retryable(None) if probe => {
                let wait = self.rules.streak_pause(self.known().pauses_in_a_row);
                self.pause(wait, PauseCause::ProbeFailed, "the probe send failed".into())
                    .await;
                self.count_probe("paused");
            }
            Answer::Retryable(None) => {
                if self.rules.after_failures == 0 {
                    return;
                }
                let streak = match self.store.count_failure().await {
                    Ok(doc) => {
                        self.adopt(&doc);
                        if self.is_paused() {
                            return; // another replica paused meanwhile
                        }
                        doc.failure_streak
                    }
                    Err(error) => {
                        tracing::warn!(error = %Chain(&error), "could not count a provider failure; counting it here");
                        self.known().failure_streak + 1
                    }
                };
                self.known().failure_streak = streak;
                if streak >= self.rules.after_failures as i32 {
                    let wait = self.rules.streak_pause(self.known().pauses_in_a_row);
                    self.pause(
                        wait,
                        PauseCause::Failures,
                        format!("{streak} retryable failures in a row"),
                    )
                    .await;
                }
            }
        }
    }

    async fn pause(&self, wait: Duration, cause: PauseCause, reason: String) {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
        let misconfigured = cause == PauseCause::Misconfigured;
        let stored = self
            .store
            .pause(
                DateTime::from_chrono(until),
                &reason,
                misconfigured,
                DateTime::from_chrono(now),
            )
            .await;
        let mut known = self.known();
        match stored {
            Ok(doc) => {
                known.paused_until = doc.paused_until.map(|d| d.to_chrono()).or(Some(until));
                known.pauses_in_a_row = doc.pauses_in_a_row;
            }
            Err(error) => {
                tracing::warn!(error = %Chain(&error), "could not share the provider pause; pausing this replica only");
                known.paused_until = known.paused_until.max(Some(until));
                known.pauses_in_a_row += 1;
            }
        }
        known.failure_streak = 0;
        known.probing = false;
        known.read_at = Some(Instant::now());
        drop(known);
        self.set_paused_gauge(true);
        self.metrics
            .pauses
            .with_label_values(&[&self.name, cause.label()])
            .inc();
        tracing::warn!(provider = %self.name, until = %until.to_rfc3339(), %reason, "provider paused: no replica sends to it until then");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streak_pauses_double_up_to_the_cap() {
        let rules = PauseRules {
            after_failures: 10,
            pause: Duration::from_secs(5),
            max: Duration::from_secs(60),
            probe_hold: Duration::from_secs(12),
        };
        let pauses: Vec<u64> = (0..6).map(|n| rules.streak_pause(n).as_secs()).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 60, 60]);
        assert_eq!(rules.streak_pause(1000).as_secs(), 60);
    }
}
