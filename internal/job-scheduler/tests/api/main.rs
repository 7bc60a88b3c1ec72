//! Integration tests of the Job Scheduler against the real MongoDB-compatible server, real
//! Redis, the real Messenger API (in-process) and a real HTTP provider stand-in.

#![allow(clippy::unwrap_used, missing_docs)]

mod callbacks;
mod control;
mod delivery;
mod helpers;
mod protection;
mod redis_modes;
mod replicas;
mod routing;
