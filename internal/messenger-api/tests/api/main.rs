//! Integration tests of the Messenger API against the real MongoDB-compatible server and real
//! Redis, one fresh database and key prefix per test.

#![allow(clippy::unwrap_used, missing_docs)]

mod admission;
mod audit;
mod claims;
mod helpers;
mod keys;
mod live;
mod messages;
mod receipts;
mod resilience;
mod scale;
mod schedule;
mod worker;
