//! Finding the earliest due time without reading the due range: the search behind the stats'
//! oldest-due age ([`super::upkeep`]) and the claimer's look-behind ([`super::claim`]).
//!
//! Some servers (the SecantusDB test server among them) read every index key in a query's
//! range before answering, whether sorted or not, `limit 1` or not: a read over a million due
//! messages costs seconds, one over an empty range a fraction of a millisecond. So every read
//! here is over a range that is empty or small, and [`earliest_due`] starts at a *hint* — where
//! the caller found the earliest last time, so that almost nothing lies between:
//! - behind the hint (a clock behind another replica's, a due time edited by hand) lie at most
//!   those few: one check over everything before it and, only when it finds one, a bisection;
//! - from the hint forward, windows that double while empty (a gallop) and are halved down to
//!   [`FINE_WINDOW_MS`] once one holds a due message; only that fine window is read sorted.
//!
//! What a search reads is about what lies between the hint and twice the distance to the
//! earliest due message: a few empty reads when the hint is right.

use bson::{doc, DateTime, Document};
use mongodb::Collection;

use super::StoreError;
use crate::domain::MessageStatus;

/// The narrowest window the search reads sorted, in milliseconds.
pub const FINE_WINDOW_MS: i64 = 16;

/// Messages in `status` with `from <= next_attempt_at <= to` (milliseconds): an equality on the
/// claim index's first field and a range on its second.
fn due_between(status: MessageStatus, from: i64, to: i64) -> Document {
    doc! {"status": status.as_str(), "next_attempt_at": {
    "$gte": DateTime::from_millis(from), "$lte": DateTime::from_millis(to)}}
}

/// Whether any message in one of `statuses` is due with `from <= next_attempt_at <= to`.
/// One read per status (an equality on the claim index's first field and a range on its
/// second; an `$in` of statuses leaves the range unbounded on the SecantusDB test server).
async fn any_due(
    raw: &Collection<Document>,
    statuses: &[MessageStatus],
    from: i64,
    to: i64,
) -> Result<bool, StoreError> {
    let checks = statuses.iter().map(|status| {
        let filter = due_between(*status, from, to);
        async move { Ok::<_, StoreError>(raw.find_one(filter).projection(doc! {"_id": 1}).await?.is_some()) }
    });
    Ok(futures::future::try_join_all(checks)
        .await?
        .into_iter()
        .any(|found| found))
}

/// The earliest `next_attempt_at` of a message in one of `statuses` at or before `until`, or
/// `None` when there is none. `hint` is where to start looking (see the module docs); any
/// value is correct, a close one is cheap.
pub async fn earliest_due(
    raw: &Collection<Document>,
    statuses: &[MessageStatus],
    hint: DateTime,
    until: DateTime,
) -> Result<Option<DateTime>, StoreError> {
    let hint = hint.timestamp_millis().min(until.timestamp_millis());
    if hint > i64::MIN && any_due(raw, statuses, i64::MIN, hint - 1).await? {
        // Behind the hint: rare, so a plain bisection of everything before it.
        return finest(raw, statuses, i64::MIN, hint - 1).await;
    }
    next_due(raw, statuses, DateTime::from_millis(hint), until).await
}

/// The earliest `next_attempt_at` in `[from, until]` of a message in one of `statuses`: what
/// lies before `from` is not looked at.
async fn next_due(
    raw: &Collection<Document>,
    statuses: &[MessageStatus],
    from: DateTime,
    until: DateTime,
) -> Result<Option<DateTime>, StoreError> {
    // Gallop: the first window from `from` that holds one. Never one read of all of
    // `[from, until]`: that range may hold the whole backlog.
    let (mut from, end) = (from.timestamp_millis(), until.timestamp_millis());
    let mut width = FINE_WINDOW_MS;
    while from <= end {
        let to = from.saturating_add(width - 1).min(end);
        if any_due(raw, statuses, from, to).await? {
            return finest(raw, statuses, from, to).await;
        }
        from = to.saturating_add(1);
        width = width.saturating_mul(2);
    }
    Ok(None)
}

/// The earliest due time in `[from, to]`, which holds one: halved down to a fine window whose
/// earlier half is empty, and only that read sorted. Midpoints in i128: the range may span all
/// of i64.
async fn finest(
    raw: &Collection<Document>,
    statuses: &[MessageStatus],
    mut from: i64,
    mut to: i64,
) -> Result<Option<DateTime>, StoreError> {
    while i128::from(to) - i128::from(from) + 1 > i128::from(FINE_WINDOW_MS) {
        let mid = ((i128::from(from) + i128::from(to)) / 2) as i64;
        if any_due(raw, statuses, from, mid).await? {
            to = mid;
        } else {
            from = mid + 1;
        }
    }
    let mut earliest: Option<DateTime> = None;
    for status in statuses {
        let first = raw
            .find_one(due_between(*status, from, to))
            .sort(doc! {"next_attempt_at": 1})
            .projection(doc! {"next_attempt_at": 1})
            .await?
            .and_then(|d| d.get_datetime("next_attempt_at").ok().copied());
        earliest = match (earliest, first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    Ok(earliest)
}
