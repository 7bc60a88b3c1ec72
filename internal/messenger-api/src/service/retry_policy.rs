//! The retry policy: where a failed attempt leaves a message (pending again after the next
//! delay of the schedule, with jitter and the provider's `Retry-After` as a floor; failed when
//! permanent or out of retries; expired when the retry would come after `expiresAt`).

use std::time::Duration;

use bson::DateTime;
use herald_core::mongo::after;
use herald_core::settings::Settings;
use rand::Rng;

use herald_core::worker::FailRequest;

use crate::domain::{self, LastError, MessageDoc, MessageStatus};

/// Longest kept error detail, in bytes.
pub const MAX_ERROR_DETAIL: usize = 4096;

/// The knobs the rules need, taken from the settings once.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Content limit in characters.
    pub max_chars: usize,
    /// Lease used when a claimer names none.
    pub default_lease: Duration,
    /// Delay before retry n, in seconds.
    pub retry_schedule: Vec<u64>,
    /// Jitter in percent.
    pub jitter_percent: u32,
    /// Cap on a provider's Retry-After, in seconds.
    pub max_retry_after: u64,
    /// Furthest `sendAt`, from now.
    pub max_schedule: Duration,
    /// The configured provider names (a message may pin one).
    pub providers: Vec<String>,
    /// Which callback URLs are allowed.
    pub callbacks: herald_core::callbacks::UrlPolicy,
    /// The callback URL of a message created without one.
    pub default_callback: Option<String>,
}

impl RetryPolicy {
    /// Takes the rules out of the settings.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            max_chars: settings.message.max_chars,
            default_lease: Duration::from_secs(settings.job_scheduler.lease_seconds),
            retry_schedule: settings.delivery.retry_schedule_seconds.clone(),
            jitter_percent: settings.delivery.jitter_percent,
            max_retry_after: settings.webhook.max_retry_after_seconds,
            max_schedule: Duration::from_secs(settings.message.max_schedule_days * 86_400),
            providers: settings
                .routing()
                .map(|r| r.providers().iter().map(|p| p.name.clone()).collect())
                .unwrap_or_default(),
            callbacks: settings.callbacks.url_policy(),
            default_callback: Some(settings.callbacks.default_url.trim())
                .filter(|u| !u.is_empty())
                .map(str::to_owned),
        }
    }

    /// The limits a new message is checked against.
    pub fn limits(&self) -> domain::Limits<'_> {
        domain::Limits {
            max_chars: self.max_chars,
            max_schedule: self.max_schedule,
            providers: &self.providers,
            callbacks: &self.callbacks,
            default_callback: self.default_callback.as_deref(),
        }
    }

    /// Where a failed attempt leaves `current`: pending at the next retry time, or failed
    /// (permanent, or out of retries), and the error to keep.
    pub fn after_failure(
        &self,
        current: &MessageDoc,
        report: &FailRequest,
        stamp: DateTime,
    ) -> (MessageStatus, DateTime, LastError) {
        let delay = if report.retryable {
            self.retry_delay(current.attempts, report.retry_after_seconds)
        } else {
            None
        };
        let (mut status, mut next_attempt_at) = match delay {
            Some(delay) => (MessageStatus::Pending, after(stamp, delay)),
            None => (MessageStatus::Failed, stamp),
        };
        let mut detail = truncate(report.error.detail.clone(), MAX_ERROR_DETAIL);
        if report.retryable && delay.is_none() {
            detail = format!("retries exhausted after {} attempts: {detail}", current.attempts);
        }
        if status == MessageStatus::Pending && current.expires_at.is_some_and(|end| next_attempt_at >= end) {
            // The retry would come too late: the message expires now instead.
            status = MessageStatus::Expired;
            next_attempt_at = stamp;
        }
        let error = LastError {
            kind: report.error.kind,
            status: report.error.status.map(i32::from),
            detail,
            at: stamp,
        };
        (status, next_attempt_at, error)
    }

    /// The delay before the next attempt after `attempts` attempts, or `None` when retries are
    /// exhausted. A provider's `retry_after` (capped) is a floor.
    pub fn retry_delay(&self, attempts: i32, retry_after: Option<u64>) -> Option<Duration> {
        let index = usize::try_from(attempts.max(1) - 1).ok()?;
        let base = *self.retry_schedule.get(index)? as f64;
        let spread = f64::from(self.jitter_percent) / 100.0;
        let factor = if spread > 0.0 {
            rand::rng().random_range(1.0 - spread..=1.0 + spread)
        } else {
            1.0
        };
        let mut seconds = base * factor;
        if let Some(after) = retry_after {
            seconds = seconds.max(after.min(self.max_retry_after) as f64);
        }
        Some(Duration::from_secs_f64(seconds))
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(jitter: u32) -> RetryPolicy {
        RetryPolicy {
            max_chars: 160,
            default_lease: Duration::from_secs(30),
            retry_schedule: vec![5, 300, 1800],
            jitter_percent: jitter,
            max_retry_after: 3600,
            max_schedule: Duration::from_secs(30 * 86_400),
            providers: vec!["default".into()],
            callbacks: herald_core::callbacks::UrlPolicy::default(),
            default_callback: None,
        }
    }

    #[test]
    fn retry_delays_follow_the_schedule_and_run_out() {
        let r = rules(0);
        assert_eq!(r.retry_delay(1, None), Some(Duration::from_secs(5)));
        assert_eq!(r.retry_delay(3, None), Some(Duration::from_secs(1800)));
        assert_eq!(r.retry_delay(4, None), None);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let r = rules(20);
        for _ in 0..200 {
            let d = r.retry_delay(2, None).unwrap().as_secs_f64();
            assert!((240.0..=360.0).contains(&d), "{d}");
        }
    }

    #[test]
    fn retry_after_is_a_capped_floor() {
        let r = rules(0);
        assert_eq!(r.retry_delay(1, Some(60)), Some(Duration::from_secs(60)));
        assert_eq!(r.retry_delay(1, Some(1)), Some(Duration::from_secs(5)));
        assert_eq!(r.retry_delay(1, Some(999_999)), Some(Duration::from_secs(3600)));
    }
}
