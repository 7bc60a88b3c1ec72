//! Newest-first list pages that read about a page's worth of the index at any depth.
//!
//! A [`Walk`] asks for a *window* of the list's order key — `[lower, upper)` — sized to hold
//! about one page, because some servers (the SecantusDB test server among them) read a whole
//! sorted range before limiting it. A window that came back short is followed by a wider one
//! just below it, until the page is full or the window passes the *floor* (the oldest key ever
//! written, kept in [`super::counts`]); the span a full page needed is remembered per list
//! kind. The windows partition the order key, so a walk never repeats or skips an item. The
//! key is `_id` (its 12 bytes read as one number) or `sent_at` in milliseconds. More:
//! `docs/architecture.md` ("Counts and lists at scale").

use std::collections::HashMap;
use std::sync::Mutex;

use bson::oid::ObjectId;
use bson::{doc, Bson, DateTime, Document};
use futures::TryStreamExt;
use mongodb::Collection;

use crate::domain::MessageDoc;
use crate::error::StoreError;

/// Narrowest window (in key units) a walk starts with.
const MIN_WIDTH: i128 = 256;
/// Widest window: more than every `_id` and every millisecond there is.
const MAX_WIDTH: i128 = 1 << 100;

/// The key a list is ordered by, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Axis {
    /// `_id`, whose leading bytes are its creation second.
    Id,
    /// `sent_at`, then `_id` among equal times.
    SentAt,
}

impl Axis {
    fn field(self) -> &'static str {
        match self {
            Self::Id => "_id",
            Self::SentAt => "sent_at",
        }
    }

    fn sort(self) -> Document {
        match self {
            Self::Id => doc! {"_id": -1},
            Self::SentAt => doc! {"sent_at": -1, "_id": -1},
        }
    }

    /// Where `message` lies on this axis.
    pub fn position(self, message: &MessageDoc) -> i128 {
        match self {
            Self::Id => id_position(message.id),
            Self::SentAt => message.sent_at.map_or(0, |at| i128::from(at.timestamp_millis())),
        }
    }

    /// Just after every item created or sent by now (a first page's window ends there).
    fn now(self) -> i128 {
        let now = DateTime::now().timestamp_millis();
        match self {
            Self::Id => i128::from(now / 1000 + 1) << 64,
            Self::SentAt => i128::from(now) + 1,
        }
    }

    fn bound(self, position: i128) -> Bson {
        match self {
            Self::Id => {
                let clamped = position.clamp(0, (1 << 96) - 1) as u128;
                let bytes = clamped.to_be_bytes();
                let mut id = [0u8; 12];
                id.copy_from_slice(&bytes[4..]);
                Bson::ObjectId(ObjectId::from_bytes(id))
            }
            Self::SentAt => Bson::DateTime(DateTime::from_millis(
                position.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
            )),
        }
    }

    fn floor(self) -> i128 {
        match self {
            Self::Id => 0,
            Self::SentAt => i128::from(i64::MIN),
        }
    }
}

/// The 12 bytes of `id` as one number: the order MongoDB sorts ids in.
pub fn id_position(id: ObjectId) -> i128 {
    let mut bytes = [0u8; 16];
    bytes[4..].copy_from_slice(&id.bytes());
    u128::from_be_bytes(bytes) as i128
}

/// One list page to read.
#[derive(Debug, Clone)]
pub struct Walk {
    /// The list's own filter (status, recipient); never on the axis field.
    pub base: Document,
    /// The order key.
    pub axis: Axis,
    /// Only items before this position (exclusive), e.g. a cursor; `None` from the newest.
    pub before: Option<i128>,
    /// What kind of list this is, to remember the window that fits it.
    pub kind: String,
}

/// What the last full page of a kind of list looked like: the span of keys it needed, and
/// where the newest item of its first page lay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fit {
    width: i128,
    top: Option<i128>,
}

/// Window widths (and first-page tops) that fitted each kind of list last time.
#[derive(Default)]
pub struct Widths(Mutex<HashMap<String, Fit>>);

impl Widths {
    fn get(&self, kind: &str) -> Fit {
        let widths = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        widths.get(kind).copied().unwrap_or(Fit {
            width: MIN_WIDTH,
            top: None,
        })
    }

    /// Records a full page spanning `newest..=oldest`; `first` when it was a first page.
    fn set(&self, kind: &str, newest: i128, oldest: i128, first: bool) {
        let mut widths = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let fit = widths.entry(kind.to_owned()).or_insert(Fit {
            width: MIN_WIDTH,
            top: None,
        });
        // The span this page needed, with room to spare, fits the next one.
        fit.width = ((newest - oldest).saturating_mul(3) / 2).clamp(MIN_WIDTH, MAX_WIDTH);
        if first {
            fit.top = Some(newest);
        }
    }
}

/// Reads up to `want` items of `walk`, newest first, window by window, down to `floor` (no
/// item lies before it; `None` when unknown). `ceiling`, when known, is where the newest item
/// there ever was lies: a first page of a kind not read before starts there.
pub async fn read(
    messages: &Collection<MessageDoc>,
    widths: &Widths,
    walk: Walk,
    want: usize,
    floor: Option<i128>,
    ceiling: Option<i128>,
) -> Result<Vec<MessageDoc>, StoreError> {
    let axis = walk.axis;
    let fit = widths.get(&walk.kind);
    // A first page's window has no upper end. It reaches one page-width below where the
    // newest item was last time, so it holds what arrived since plus about a page; the first
    // time, it starts just above the newest item ever written, or at the present.
    let mut edge = walk
        .before
        .or(fit.top)
        .or(ceiling.map(|c| c + 1))
        .unwrap_or_else(|| axis.now());
    let mut upper = walk.before;
    let mut width = fit.width;
    let mut items: Vec<MessageDoc> = Vec::with_capacity(want);
    loop {
        let lower = edge.saturating_sub(width).max(axis.floor());
        let mut range = doc! {"$gte": axis.bound(lower)};
        if let Some(upper) = upper {
            range.insert("$lt", axis.bound(upper));
        }
        let mut filter = walk.base.clone();
        filter.insert(axis.field(), range);
        let need = want - items.len();
        let found: Vec<MessageDoc> = messages
            .find(filter)
            .sort(axis.sort())
            .limit(need as i64)
            .await?
            .try_collect()
            .await?;
        let got = found.len();
        items.extend(found);
        if items.len() >= want {
            if let (Some(newest), Some(oldest)) = (items.first(), items.last()) {
                // A cursor page's window began at the cursor, a first page's at its newest item.
                let top = walk.before.unwrap_or_else(|| axis.position(newest));
                widths.set(&walk.kind, top, axis.position(oldest), walk.before.is_none());
            }
            break;
        }
        if lower <= floor.unwrap_or(axis.floor()).max(axis.floor()) {
            break;
        }
        if floor.is_none() {
            let mut older = walk.base.clone();
            older.insert(axis.field(), doc! {"$lt": axis.bound(lower)});
            let any_older = messages.find_one(older).projection(doc! {"_id": 1}).await?.is_some();
            if !any_older {
                break;
            }
        }
        width = if got == 0 {
            width.saturating_mul(16)
        } else {
            (width.saturating_mul(need as i128) / got as i128 * 2).clamp(width * 2, width.saturating_mul(1024))
        }
        .min(MAX_WIDTH);
        upper = Some(lower);
        edge = lower;
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_positions_follow_the_order_of_ids_and_round_trip() {
        let older = ObjectId::parse_str("65a0000000000000000000ff").unwrap_or_else(|_| ObjectId::new());
        let newer = ObjectId::parse_str("65a000000100000000000000").unwrap_or_else(|_| ObjectId::new());
        assert!(id_position(older) < id_position(newer));
        assert_eq!(Axis::Id.bound(id_position(newer)), Bson::ObjectId(newer));
        assert_eq!(Axis::Id.bound(-5), Bson::ObjectId(ObjectId::from_bytes([0; 12])));
        assert_eq!(
            Axis::Id.bound(1 << 120),
            Bson::ObjectId(ObjectId::from_bytes([0xff; 12]))
        );
    }

    #[test]
    fn widths_are_remembered_per_kind_within_bounds_and_tops_only_from_first_pages() {
        let widths = Widths::default();
        assert_eq!(widths.get("id||").width, MIN_WIDTH);
        widths.set("id||", 1010, 1000, false);
        assert_eq!(
            widths.get("id||"),
            Fit {
                width: MIN_WIDTH,
                top: None
            }
        );
        widths.set("id|failed|", 3 << 70, 1 << 70, true);
        assert_eq!(
            widths.get("id|failed|"),
            Fit {
                width: 3 << 70,
                top: Some(3 << 70)
            }
        );
        widths.set("id|failed|", 1 << 70, 0, false);
        assert_eq!(
            widths.get("id|failed|"),
            Fit {
                width: 3 << 69,
                top: Some(3 << 70)
            }
        );
        assert_eq!(widths.get("id||").width, MIN_WIDTH);
    }
}
