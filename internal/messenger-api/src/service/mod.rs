//! The Messenger API's services, one per concern:
//! - [`MessengerService`]: messages and their life — validation, the state machine, retry
//!   policy, and the commit-then-cache order.
//! - [`JobRemote`]: the sending job, steered through the Job Scheduler (start/stop, run history).
//! - [`Monitor`]: what an operator watches — stats, readiness and the gauges.
//! - [`Upkeep`]: the counts reconciliation and the retention sweep, in the background.

mod job;
mod messenger;
mod monitor;
mod upkeep;

pub use job::JobRemote;
pub use messenger::{
    BulkRequeue, Committed, FailureReport, MessengerService, RequeueFilter, Rules, MAX_BATCH, MAX_CLAIM,
    MAX_ERROR_DETAIL, MAX_REQUEUE,
};
pub use monitor::{Monitor, Stats};
pub use upkeep::{Upkeep, SWEEP_BATCH, SWEEP_MAX};
