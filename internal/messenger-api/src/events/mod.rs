//! Live status: every state change of every message and of the sending job, read from the
//! database's own change feed, so a change made through any replica (or by hand in the
//! database) reaches every subscriber of every replica.
//!
//! - [`model`]: the events (SPEC §11), their filter, and how a change becomes one.
//! - [`feed`]: the change stream and its fan-out to subscribers, with resume and cut-off.
//! - [`slots`]: how many subscriptions one key may hold.
//!
//! The routes only adapt a [`feed::Subscription`] to Server-Sent Events or a WebSocket.

pub mod feed;
pub mod model;
pub mod slots;

pub use feed::{EventFeed, FeedMetrics};
pub use model::{EventFilter, EventType, FeedEvent};
pub use slots::{Slot, SubscriberSlots};
