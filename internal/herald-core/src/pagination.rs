//! Every paginated list: the request (`limit` with `offset`, or an `after` cursor) and the
//! [`Page`] it answers with.
//!
//! A store fetches `limit + 1` items; [`Page::from_fetched`] keeps `limit` and turns the extra
//! one into `nextCursor`, so "is there more?" costs no count.

use mongodb::bson::oid::ObjectId;
use poem_openapi::types::{ParseFromJSON, ToJSON};
use poem_openapi::Object;
use serde::{Deserialize, Serialize};

use crate::errors::{ApiError, ErrorCode};

/// Default page size.
pub const DEFAULT_LIMIT: i64 = 20;
/// Largest page size.
pub const MAX_LIMIT: i64 = 100;

/// Where a page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageStart {
    /// Skip this many.
    Offset(u64),
    /// Continue after this id (a previous page's `nextCursor`).
    After(ObjectId),
}

/// A validated page request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// Page size, 1..=100.
    pub limit: i64,
    /// Where it starts.
    pub start: PageStart,
}

impl PageRequest {
    /// Validates `limit`, `offset` and `after` (400009 on any problem).
    pub fn parse(limit: Option<i64>, offset: Option<i64>, after: Option<&str>) -> Result<Self, ApiError> {
        let bad = |msg: &str| ApiError::new(ErrorCode::InvalidPagination, msg);
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(bad("limit must be 1..=100"));
        }
        let start = match (offset, after) {
            (Some(_), Some(_)) => return Err(bad("give offset or after, not both")),
            (Some(offset), None) if offset < 0 => return Err(bad("offset must not be negative")),
            (Some(offset), None) => PageStart::Offset(offset as u64),
            (None, Some(after)) => {
                PageStart::After(ObjectId::parse_str(after).map_err(|_| bad("after must be an id (a nextCursor)"))?)
            }
            (None, None) => PageStart::Offset(0),
        };
        Ok(Self { limit, start })
    }

    /// The offset, in offset mode.
    pub fn offset(&self) -> Option<i64> {
        match self.start {
            PageStart::Offset(o) => Some(o as i64),
            PageStart::After(_) => None,
        }
    }

    /// How many to fetch: one more than the page, to learn whether more follow.
    pub fn fetch_limit(&self) -> i64 {
        self.limit + 1
    }
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq, Eq, Object, Serialize, Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct Page<T: ParseFromJSON + ToJSON> {
    /// The items, in the list's order.
    pub items: Vec<T>,
    /// Page size asked for.
    pub limit: i64,
    /// Offset of this page (offset pagination only).
    #[oai(nullable)]
    pub offset: Option<i64>,
    /// Pass as `after` for the next page; absent on the last page.
    #[oai(nullable)]
    pub next_cursor: Option<String>,
    /// Matching items in all (offset pagination only).
    #[oai(nullable)]
    pub total: Option<u64>,
}

/// Items fetched for a page, before they become its body: at most `limit` of them, and
/// whether more follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched<T> {
    /// The page's items.
    pub items: Vec<T>,
    /// The cursor of the next page, when more follow.
    pub next_cursor: Option<String>,
    /// Matching items in all, when counted.
    pub total: Option<u64>,
}

impl<T> Fetched<T> {
    /// Keeps `request.limit` of up to [`PageRequest::fetch_limit`] items; `cursor` names the
    /// last kept one when more follow.
    pub fn new(mut items: Vec<T>, request: &PageRequest, total: Option<u64>, cursor: impl Fn(&T) -> String) -> Self {
        let limit = usize::try_from(request.limit).unwrap_or(0);
        let more = items.len() > limit;
        items.truncate(limit);
        let next_cursor = if more { items.last().map(cursor) } else { None };
        Self {
            items,
            next_cursor,
            total,
        }
    }

    /// The page body, each item converted.
    pub fn into_page<V: ParseFromJSON + ToJSON>(self, request: &PageRequest, view: impl FnMut(T) -> V) -> Page<V> {
        Page {
            items: self.items.into_iter().map(view).collect(),
            limit: request.limit,
            offset: request.offset(),
            next_cursor: self.next_cursor,
            total: self.total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagination_parameters_are_checked() {
        assert_eq!(
            PageRequest::parse(None, None, None).unwrap(),
            PageRequest {
                limit: 20,
                start: PageStart::Offset(0)
            }
        );
        assert!(PageRequest::parse(Some(0), None, None).is_err());
        assert!(PageRequest::parse(Some(101), None, None).is_err());
        assert!(PageRequest::parse(None, Some(-1), None).is_err());
        assert!(PageRequest::parse(None, Some(1), Some("0123456789abcdef01234567")).is_err());
        assert!(PageRequest::parse(None, None, Some("zzz")).is_err());
    }

    #[test]
    fn the_extra_fetched_item_becomes_the_next_cursor() {
        let request = PageRequest::parse(Some(2), None, None).unwrap();
        let more = Fetched::new(vec![1, 2, 3], &request, Some(3), |n| n.to_string());
        assert_eq!(more.items, vec![1, 2]);
        assert_eq!(more.next_cursor.as_deref(), Some("2"));
        let page = more.into_page(&request, |n| n * 10);
        assert_eq!((page.items, page.offset, page.total), (vec![10, 20], Some(0), Some(3)));
        let last = Fetched::new(vec![1, 2], &request, None, |n| n.to_string());
        assert_eq!(last.next_cursor, None);
    }
}
