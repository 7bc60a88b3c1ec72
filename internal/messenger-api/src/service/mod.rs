//! The Messenger API's services, one per concern:
//! - [`MessengerService`]: messages and their life — validation, the state machine, retry
//!   policy, and the commit-then-cache order.
//! - [`JobRemote`]: the sending job, steered through the Job Scheduler (start/stop, run history).
//! - [`Monitor`]: what an operator watches — stats, readiness and the gauges.

mod job;
mod messenger;
mod monitor;

pub use job::JobRemote;
pub use messenger::{
    BulkRequeue, Committed, FailureReport, MessengerService, RequeueFilter, Rules, MAX_BATCH, MAX_CLAIM,
    MAX_ERROR_DETAIL, MAX_REQUEUE,
};
pub use monitor::{Monitor, Stats};
