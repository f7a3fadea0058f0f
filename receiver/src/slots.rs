//! The receiver's cap on concurrent initial syncs and rescans (`--max-concurrent-syncs`).
//!
//! A disk that needs either takes a slot when its session starts, or joins a queue; a
//! queued disk is told so in `Welcome` (state QUEUED) and keeps replicating its changes
//! below its watermark. A slot is released when the disk's work is durable or its session
//! ends; the first queued disk then gets it, and its session is restarted so that the
//! agent hears the news in a new `Welcome`.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::lock;

/// (server id, disk name).
pub(crate) type DiskKey = (String, String);

#[derive(Debug, Default)]
pub(crate) struct SyncSlots {
    /// 0: unlimited.
    cap: usize,
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    active: Vec<DiskKey>,
    queue: VecDeque<DiskKey>,
}

/// What a disk got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Granted,
    /// Waiting; 1 is next.
    Queued(usize),
}

impl SyncSlots {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap,
            state: Mutex::default(),
        }
    }

    /// A slot for `key`, or its place in the queue. Asking again keeps the place.
    pub(crate) fn acquire(&self, key: &DiskKey) -> Slot {
        let mut state = lock(&self.state);
        if self.cap == 0 || state.active.contains(key) {
            return Slot::Granted;
        }
        if state.active.len() < self.cap && state.queue.front().is_none_or(|first| first == key) {
            state.queue.retain(|k| k != key);
            state.active.push(key.clone());
            return Slot::Granted;
        }
        match state.queue.iter().position(|k| k == key) {
            Some(at) => Slot::Queued(at + 1),
            None => {
                state.queue.push_back(key.clone());
                Slot::Queued(state.queue.len())
            }
        }
    }

    /// Gives back the slot of `key` (if it held one) and drops it from the queue; returns
    /// the disks that now get a slot.
    pub(crate) fn release(&self, key: &DiskKey) -> Vec<DiskKey> {
        let mut state = lock(&self.state);
        state.active.retain(|k| k != key);
        state.queue.retain(|k| k != key);
        self.promote(&mut state)
    }

    /// Releases every slot and queue place of `server`'s disks (its session ended).
    pub(crate) fn release_server(&self, server: &str) -> Vec<DiskKey> {
        let mut state = lock(&self.state);
        state.active.retain(|(s, _)| s != server);
        state.queue.retain(|(s, _)| s != server);
        self.promote(&mut state)
    }

    fn promote(&self, state: &mut SlotState) -> Vec<DiskKey> {
        let mut granted = Vec::new();
        while self.cap > 0 && state.active.len() < self.cap {
            let Some(next) = state.queue.pop_front() else {
                break;
            };
            state.active.push(next.clone());
            granted.push(next);
        }
        granted
    }

    /// The queue place of `key` (1 is next), if it waits.
    pub(crate) fn position(&self, server: &str, disk: &str) -> Option<usize> {
        lock(&self.state)
            .queue
            .iter()
            .position(|(s, d)| s == server && d == disk)
            .map(|at| at + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str, d: &str) -> DiskKey {
        (s.to_owned(), d.to_owned())
    }

    #[test]
    fn the_cap_holds_and_the_queue_is_first_come_first_served() {
        let slots = SyncSlots::new(1);
        assert_eq!(slots.acquire(&key("a", "d0")), Slot::Granted);
        assert_eq!(slots.acquire(&key("a", "d1")), Slot::Queued(1));
        assert_eq!(slots.acquire(&key("b", "d0")), Slot::Queued(2));
        // Asking again keeps the place, and a holder keeps its slot.
        assert_eq!(slots.acquire(&key("a", "d1")), Slot::Queued(1));
        assert_eq!(slots.acquire(&key("a", "d0")), Slot::Granted);
        assert_eq!(slots.release(&key("a", "d0")), vec![key("a", "d1")]);
        assert_eq!(slots.position("b", "d0"), Some(1));
        assert_eq!(slots.release_server("a"), vec![key("b", "d0")]);
        assert_eq!(slots.position("b", "d0"), None);
        assert_eq!(SyncSlots::new(0).acquire(&key("x", "y")), Slot::Granted);
    }
}
