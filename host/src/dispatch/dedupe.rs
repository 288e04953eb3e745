//! The dedupe window: event ids handled recently, forgotten after the window.
//! Per plugin and per process: with several replicas each keeps its own.
//!
//! An id is claimed when its event starts (so two workers given the same id at
//! once do not both handle it) and released if the event fails, so that its
//! retry or re-drive is not mistaken for a duplicate.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Claimed ids, and the order they were claimed in (for forgetting).
#[derive(Debug, Default)]
struct Seen {
    ids: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

/// Ids seen within `window`.
#[derive(Debug)]
pub(crate) struct DedupeWindow {
    window: Duration,
    seen: Mutex<Seen>,
}

impl DedupeWindow {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Claims `id`: false if it was claimed within the window (a duplicate).
    pub(crate) fn claim(&self, id: &str) -> bool {
        let mut guard = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let Seen { ids, order } = &mut *guard;
        while let Some((at, _)) = order.front() {
            if now.duration_since(*at) < self.window {
                break;
            }
            if let Some((at, old)) = order.pop_front()
                && ids.get(&old) == Some(&at)
            {
                ids.remove(&old);
            }
        }
        if ids
            .get(id)
            .is_some_and(|at| now.duration_since(*at) < self.window)
        {
            return false;
        }
        ids.insert(id.to_string(), now);
        order.push_back((now, id.to_string()));
        true
    }

    /// Gives up the claim on `id` (its event failed and will come back).
    pub(crate) fn release(&self, id: &str) {
        let mut guard = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        guard.ids.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_after_the_window() {
        let w = DedupeWindow::new(Duration::from_millis(50));
        assert!(w.claim("a"));
        assert!(!w.claim("a"));
        assert!(w.claim("b"));
        std::thread::sleep(Duration::from_millis(80));
        assert!(w.claim("a"));
    }

    #[test]
    fn a_released_id_can_be_claimed_again() {
        let w = DedupeWindow::new(Duration::from_secs(60));
        assert!(w.claim("a"));
        w.release("a");
        assert!(w.claim("a"));
    }
}
