//! How many live subscriptions (SSE and WebSocket together) one key may hold on this replica:
//! `events.max_subscribers_per_key`. One more is refused with 429 (`429003`) — a leaking client
//! cannot take every connection and all the feed's memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The count of live subscriptions per key name.
#[derive(Clone)]
pub struct SubscriberSlots {
    max: usize,
    held: Arc<Mutex<HashMap<Arc<str>, usize>>>,
}

/// One subscription's place; given back when dropped (the stream or socket ended).
pub struct Slot {
    slots: SubscriberSlots,
    key: Arc<str>,
}

impl SubscriberSlots {
    /// At most `max` per key.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            held: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The most one key may hold.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A place for one more subscription of `key`, unless it holds the most already.
    pub fn take(&self, key: &Arc<str>) -> Option<Slot> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(key.clone()).or_default();
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Slot {
            slots: self.clone(),
            key: key.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_share_and_gets_it_back_as_subscriptions_end() {
        let slots = SubscriberSlots::new(2);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let first = slots.take(&a).unwrap();
        let _second = slots.take(&a).unwrap();
        assert!(slots.take(&a).is_none(), "a third is refused");
        assert!(slots.take(&b).is_some(), "another key is not held back");
        drop(first);
        assert!(slots.take(&a).is_some(), "an ended subscription frees its place");
    }
}
