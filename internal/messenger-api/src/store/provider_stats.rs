//! The `provider_stats` collection: what each provider did with Herald's requests, per clock
//! hour — accepted and failed requests, a latency histogram and the last failure — kept for two
//! days. Every report of outcomes adds its attempts with one unordered upserting `update`
//! command; the stats read at most two documents per provider (this hour and the last).

use std::collections::BTreeMap;

use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use herald_core::worker::{AttemptKind, AttemptRecord};
use mongodb::options::IndexOptions;
use mongodb::{Collection, Database, IndexModel};

use crate::error::StoreError;

/// Name of the collection.
pub const COLLECTION: &str = "provider_stats";
/// Upper bounds of the latency buckets, in milliseconds (a last bucket takes the rest).
pub const LATENCY_BOUNDS_MS: [u64; 11] = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000];
/// Upper bounds of the receipt latency buckets (sent → final receipt), in milliseconds.
pub const RECEIPT_BOUNDS_MS: [u64; 9] = [
    1_000, 5_000, 15_000, 60_000, 300_000, 900_000, 3_600_000, 21_600_000, 86_400_000,
];
const HOUR_MS: i64 = 3_600_000;
/// How long an hour's document is kept.
const KEEP_SECONDS: u64 = 2 * 86_400;

/// One provider over a window: counts, latency quantiles and the last failure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProviderWindow {
    /// Requests it accepted.
    pub accepted: u64,
    /// Requests that failed (retryable, permanent or misconfigured).
    pub failed: u64,
    /// Median latency: the upper bound of the bucket holding it, in milliseconds.
    pub p50_ms: Option<u64>,
    /// 99th percentile latency, the same way.
    pub p99_ms: Option<u64>,
    /// The last failed request: when, its kind and status.
    pub last_failure: Option<(chrono::DateTime<chrono::Utc>, AttemptKind, Option<u16>)>,
    /// Final receipts that said delivered.
    pub delivered: u64,
    /// Final receipts that said undelivered or failed.
    pub undelivered: u64,
    /// Receipts that said read.
    pub read: u64,
    /// Median time from the send to its final receipt: a bucket's upper bound, in ms.
    pub receipt_p50_ms: Option<u64>,
    /// 99th percentile of the same.
    pub receipt_p99_ms: Option<u64>,
}

/// Counts of one provider in one hour, as they are added up before the write.
#[derive(Default)]
struct HourDelta {
    accepted: i64,
    failed: i64,
    buckets: [i64; LATENCY_BOUNDS_MS.len() + 1],
    last_failure: Option<Document>,
    last_failure_at: Option<DateTime>,
}

fn bucket(latency_ms: u64) -> usize {
    LATENCY_BOUNDS_MS
        .iter()
        .position(|bound| latency_ms <= *bound)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

/// The upper bound of the bucket where `quantile` of `buckets` falls.
fn quantile(buckets: &[u64], quantile: f64) -> Option<u64> {
    quantile_of(buckets, quantile, &LATENCY_BOUNDS_MS)
}

fn quantile_of(buckets: &[u64], quantile: f64, bounds: &[u64]) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (quantile * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(bounds.get(i).copied().unwrap_or(u64::MAX));
        }
    }
    None
}

/// The per-provider statistics.
#[derive(Clone)]
pub struct ProviderStats {
    db: Database,
    stats: Collection<Document>,
}

impl ProviderStats {
    /// Over `db.provider_stats`.
    pub fn new(db: &Database) -> Self {
        Self {
            db: db.clone(),
            stats: db.collection(COLLECTION),
        }
    }

    /// The TTL index that drops hours after two days.
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let ttl = IndexModel::builder()
            .keys(doc! {"hour": 1})
            .options(
                IndexOptions::builder()
                    .name("ttl".to_owned())
                    .expire_after(std::time::Duration::from_secs(KEEP_SECONDS))
                    .build(),
            )
            .build();
        self.stats.create_index(ttl).await?;
        Ok(())
    }

    /// Adds `attempts` to their providers' hours: one command, whatever their number.
    pub async fn record(&self, attempts: &[&AttemptRecord]) -> Result<(), StoreError> {
        let mut deltas: BTreeMap<(String, i64), HourDelta> = BTreeMap::new();
        for attempt in attempts {
            let at = attempt.at.timestamp_millis();
            let hour = at.div_euclid(HOUR_MS) * HOUR_MS;
            let delta = deltas.entry((attempt.provider.clone(), hour)).or_default();
            delta.buckets[bucket(attempt.latency_ms)] += 1;
            if attempt.kind == AttemptKind::Accepted {
                delta.accepted += 1;
            } else {
                delta.failed += 1;
                let when = DateTime::from_millis(at);
                if delta.last_failure_at.is_none_or(|seen| seen <= when) {
                    delta.last_failure_at = Some(when);
                    let mut failure = doc! {"at": when, "kind": bson::to_bson(&attempt.kind)?};
                    if let Some(status) = attempt.status {
                        failure.insert("status", i32::from(status));
                    }
                    delta.last_failure = Some(failure);
                }
            }
        }
        if deltas.is_empty() {
            return Ok(());
        }
        let updates: Vec<Document> = deltas
            .into_iter()
            .flat_map(|((provider, hour), delta)| {
                let mut inc = doc! {"accepted": delta.accepted, "failed": delta.failed};
                for (i, n) in delta.buckets.iter().enumerate().filter(|(_, n)| **n > 0) {
                    inc.insert(format!("latency.{i}"), *n);
                }
                let mut update = doc! {
                    "$inc": inc,
                    "$setOnInsert": {"provider": &provider, "hour": DateTime::from_millis(hour)},
                };
                if let (Some(failure), Some(at)) = (delta.last_failure, delta.last_failure_at) {
                    // Kept only when newer than the one stored: two reports may land out of order.
                    update.insert("$max", doc! {"last_failure_at": at});
                    return vec![
                        doc! {"q": {"_id": format!("{provider}:{hour}")}, "u": update, "upsert": true},
                        doc! {
                            "q": {"_id": format!("{provider}:{hour}"), "last_failure_at": at},
                            "u": {"$set": {"last_failure": failure}},
                        },
                    ];
                }
                vec![doc! {"q": {"_id": format!("{provider}:{hour}")}, "u": update, "upsert": true}]
            })
            .collect();
        // Ordered: each failure's `$set` follows the upsert that made its document.
        self.db
            .run_command(doc! {"update": COLLECTION, "updates": updates, "ordered": true})
            .await?;
        Ok(())
    }

    /// Adds one applied receipt of `provider` in state `state` (`delivered`, `undelivered` or
    /// `read`), `latency_ms` after its send, to this hour.
    pub async fn record_receipt(
        &self,
        provider: &str,
        state: &str,
        latency_ms: u64,
        at: DateTime,
    ) -> Result<(), StoreError> {
        let hour = at.timestamp_millis().div_euclid(HOUR_MS) * HOUR_MS;
        let slot = RECEIPT_BOUNDS_MS
            .iter()
            .position(|bound| latency_ms <= *bound)
            .unwrap_or(RECEIPT_BOUNDS_MS.len());
        let mut inc = doc! {format!("receipts.{state}"): 1_i64};
        if state != "read" {
            inc.insert(format!("receipt_latency.{slot}"), 1_i64);
        }
        self.stats
            .update_one(
                doc! {"_id": format!("{provider}:{hour}")},
                doc! {"$inc": inc, "$setOnInsert": {"provider": provider, "hour": DateTime::from_millis(hour)}},
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    /// Each provider's window: this clock hour and the last (from the start of the last).
    pub async fn window(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<BTreeMap<String, ProviderWindow>, StoreError> {
        let start = window_start(now);
        let docs: Vec<Document> = self
            .stats
            .find(doc! {"hour": {"$gte": DateTime::from_chrono(start)}})
            .await?
            .try_collect()
            .await?;
        let mut sums: BTreeMap<String, (ProviderWindow, Vec<u64>, Vec<u64>)> = BTreeMap::new();
        for d in docs {
            let Ok(provider) = d.get_str("provider") else { continue };
            let (window, buckets, receipt_buckets) = sums.entry(provider.to_owned()).or_insert_with(|| {
                (
                    ProviderWindow::default(),
                    vec![0; LATENCY_BOUNDS_MS.len() + 1],
                    vec![0; RECEIPT_BOUNDS_MS.len() + 1],
                )
            });
            window.accepted += number(d.get("accepted"));
            window.failed += number(d.get("failed"));
            if let Ok(receipts) = d.get_document("receipts") {
                window.delivered += number(receipts.get("delivered"));
                window.undelivered += number(receipts.get("undelivered"));
                window.read += number(receipts.get("read"));
            }
            if let Ok(latency) = d.get_document("receipt_latency") {
                for (key, value) in latency {
                    if let Some(slot) = key.parse::<usize>().ok().and_then(|i| receipt_buckets.get_mut(i)) {
                        *slot += number(Some(value));
                    }
                }
            }
            if let Ok(latency) = d.get_document("latency") {
                for (key, value) in latency {
                    if let Some(slot) = key.parse::<usize>().ok().and_then(|i| buckets.get_mut(i)) {
                        *slot += number(Some(value));
                    }
                }
            }
            if let Ok(failure) = d.get_document("last_failure") {
                let at = failure.get_datetime("at").ok().map(|at| at.to_chrono());
                let kind = failure
                    .get("kind")
                    .and_then(|k| bson::from_bson::<AttemptKind>(k.clone()).ok());
                if let (Some(at), Some(kind)) = (at, kind) {
                    let status = failure.get_i32("status").ok().and_then(|s| u16::try_from(s).ok());
                    if window.last_failure.as_ref().is_none_or(|(seen, ..)| *seen < at) {
                        window.last_failure = Some((at, kind, status));
                    }
                }
            }
        }
        Ok(sums
            .into_iter()
            .map(|(name, (mut window, buckets, receipt_buckets))| {
                window.p50_ms = quantile(&buckets, 0.50);
                window.p99_ms = quantile(&buckets, 0.99);
                window.receipt_p50_ms = quantile_of(&receipt_buckets, 0.50, &RECEIPT_BOUNDS_MS);
                window.receipt_p99_ms = quantile_of(&receipt_buckets, 0.99, &RECEIPT_BOUNDS_MS);
                (name, window)
            })
            .collect())
    }
}

/// The start of the window the stats report: the start of the previous clock hour.
pub fn window_start(now: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    let hour = now.timestamp_millis().div_euclid(HOUR_MS) * HOUR_MS - HOUR_MS;
    chrono::DateTime::from_timestamp_millis(hour).unwrap_or(now)
}

fn number(value: Option<&bson::Bson>) -> u64 {
    match value {
        Some(bson::Bson::Int32(n)) => u64::try_from(*n).unwrap_or_default(),
        Some(bson::Bson::Int64(n)) => u64::try_from(*n).unwrap_or_default(),
        Some(bson::Bson::Double(n)) if *n > 0.0 => *n as u64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_the_upper_bound_of_their_bucket() {
        let mut buckets = vec![0; LATENCY_BOUNDS_MS.len() + 1];
        buckets[bucket(7)] += 98;
        buckets[bucket(700)] += 1;
        buckets[bucket(90_000)] += 1;
        assert_eq!(quantile(&buckets, 0.5), Some(10));
        assert_eq!(quantile(&buckets, 0.99), Some(1000));
        assert_eq!(quantile(&buckets, 1.0), Some(u64::MAX));
        assert_eq!(quantile(&[0; 12], 0.5), None);
        assert_eq!(bucket(10), 0);
        assert_eq!(bucket(11), 1);
    }
}
