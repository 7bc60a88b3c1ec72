//! Tests of the `herald` binary as operators run it: real processes, real signals, real
//! MongoDB-compatible server and Redis.

#![allow(clippy::unwrap_used, missing_docs)]

mod balancer;
mod crash;
mod doctor;
mod helpers;
mod kubernetes;
mod lifecycle;
mod receipts;
