//! Page requests shared by every paginated list: `limit` with `offset`, or an `after` cursor.

use mongodb::bson::oid::ObjectId;

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
}
