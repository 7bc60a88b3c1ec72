//! The stand-in closes the loop (SPEC §17): after accepting a message it posts a signed delivery
//! receipt back to Herald, as a real provider would — `hmac-sha256` over the JSON body
//! `{"messageId", "status"}` in `X-Sink-Signature` — after `delay`, and for configurable shares
//! of messages: undelivered (`UNDELIV` instead of `DELIVRD`), sent twice, sent out of order (the
//! final one, then a late `ENROUTE`), or sent before the provider even answers (so it beats
//! Herald's commit). Like a real provider it retries a receipt Herald did not take (no answer,
//! or not 2xx) with backoff for `give_up_after`, and counts every attempt.
//!
//! Herald's side of this contract, as configuration:
//!
//! ```toml
//! [providers.receipts]
//! scheme = "hmac-sha256"
//! secret = "<the same secret>"
//! signature_header = "X-Sink-Signature"
//! message_id_field = "/messageId"
//! status_field = "/status"
//! status_map = { DELIVRD = "delivered", UNDELIV = "undelivered", ENROUTE = "sent" }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use layered_config::{ExposeSecret, SecretString};
use rand::Rng;
use serde::Serialize;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "X-Sink-Signature";
/// Receipts the stand-in has in flight at once.
pub const SENDERS: usize = 64;

/// Where and how the sink sends receipts.
#[derive(Debug, Clone)]
pub struct ReceiptPlan {
    /// Herald's `…/api/messenger/receipts/{provider}`.
    pub url: String,
    /// The HMAC secret.
    pub secret: SecretString,
    /// How long after accepting a message its receipt goes.
    pub delay: Duration,
    /// Share of messages reported undelivered.
    pub undelivered: f64,
    /// Share whose final receipt is sent twice.
    pub duplicate: f64,
    /// Share whose final receipt is followed by a late intermediate one.
    pub out_of_order: f64,
    /// Share whose receipt is sent before the sink answers the send.
    pub before_answer: f64,
    /// How long a receipt Herald does not take is retried.
    pub give_up_after: Duration,
}

/// What the sink has done with receipts so far (`GET /webhook-sink/receipts`).
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReceiptCounts {
    /// Receipts Herald took (a 2xx), duplicates and late intermediates included.
    pub taken: AtomicU64,
    /// Attempts Herald did not take (no answer or not 2xx), each retried.
    pub refused_attempts: AtomicU64,
    /// Receipts given up on after `give_up_after`.
    pub given_up: AtomicU64,
    /// Final receipts that said delivered.
    pub delivered: AtomicU64,
    /// Final receipts that said undelivered.
    pub undelivered: AtomicU64,
}

/// The receipt sender.
#[derive(Clone)]
pub struct Sender {
    plan: Arc<ReceiptPlan>,
    client: reqwest::Client,
    /// Receipts in flight at once, as a provider's callback workers are (a burst of accepted
    /// messages must not become thousands of requests at once).
    in_flight: Arc<tokio::sync::Semaphore>,
    /// The counts.
    pub counts: Arc<ReceiptCounts>,
}

/// What one accepted message gets.
pub struct Planned {
    finals: Vec<&'static str>,
    before_answer: bool,
}

impl Sender {
    /// A sender for `plan`.
    pub fn new(plan: ReceiptPlan) -> Self {
        Self {
            plan: Arc::new(plan),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(SENDERS)),
            counts: Arc::default(),
        }
    }

    /// Draws what the message gets.
    pub fn plan(&self) -> Planned {
        let mut rng = rand::rng();
        let plan = &self.plan;
        let word = if rng.random_bool(plan.undelivered.clamp(0.0, 1.0)) {
            self.counts.undelivered.fetch_add(1, Ordering::Relaxed);
            "UNDELIV"
        } else {
            self.counts.delivered.fetch_add(1, Ordering::Relaxed);
            "DELIVRD"
        };
        let mut finals = vec![word];
        if rng.random_bool(plan.duplicate.clamp(0.0, 1.0)) {
            finals.push(word);
        }
        if rng.random_bool(plan.out_of_order.clamp(0.0, 1.0)) {
            finals.push("ENROUTE");
        }
        Planned {
            finals,
            before_answer: rng.random_bool(plan.before_answer.clamp(0.0, 1.0)),
        }
    }

    /// Sends what `planned` says for message `id`: at once and awaited when it goes before the
    /// answer, else in the background after the delay.
    pub async fn send(&self, id: String, planned: Planned) {
        if planned.before_answer {
            self.post_all(&id, &planned.finals).await;
            return;
        }
        let sender = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(sender.plan.delay).await;
            sender.post_all(&id, &planned.finals).await;
        });
    }

    async fn post_all(&self, id: &str, words: &[&str]) {
        // Never closed: a permit always comes.
        let Ok(_permit) = self.in_flight.acquire().await else {
            return;
        };
        for word in words {
            self.post(id, word).await;
        }
    }

    /// One receipt, retried with backoff (0.2 s doubling to 5 s) until Herald takes it or
    /// `give_up_after` passes.
    async fn post(&self, id: &str, word: &str) {
        let body = serde_json::json!({"messageId": id, "status": word}).to_string();
        let signature =
            herald_core::receipts::hmac_sha256_hex(self.plan.secret.expose_secret().as_bytes(), body.as_bytes());
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(200);
        loop {
            let answer = self
                .client
                .post(&self.plan.url)
                .header("content-type", "application/json")
                .header(SIGNATURE_HEADER, format!("sha256={signature}"))
                .body(body.clone())
                .send()
                .await;
            if answer.as_ref().is_ok_and(|a| a.status().is_success()) {
                self.counts.taken.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.counts.refused_attempts.fetch_add(1, Ordering::Relaxed);
            if started.elapsed() > self.plan.give_up_after {
                self.counts.given_up.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(id, word, "receipt given up");
                return;
            }
            let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 4);
            tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
