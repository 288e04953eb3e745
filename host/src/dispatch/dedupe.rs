//! The dedupe window: event ids handled recently, forgotten after the window.
//! Per plugin and per process: with several replicas each keeps its own.
//!
//! An id is claimed when its event starts (so two workers given the same id at
//! once do not both handle it), completed once its settlement is carried out
//! (outputs confirmed, input acked), and released if the event fails or its
//! settlement does not go through, so that the copy that comes back is not
//! mistaken for a duplicate. Only a completed id makes a later copy a
//! duplicate: a copy that arrives while the first is still in flight waits.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Not seen within the window: this copy is handled (and now claimed).
    Fresh,
    /// Handled within the window: this copy is a duplicate.
    Duplicate,
    /// Another copy is being handled now and may still fail: this one must
    /// wait, not be dropped.
    InFlight,
}

/// Claimed ids (when, and whether their event completed), and the order they
/// were claimed or completed in (for forgetting).
#[derive(Debug, Default)]
struct Seen {
    ids: HashMap<String, (Instant, bool)>,
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

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims `id` unless a copy of it completed within the window or is in
    /// flight.
    pub(crate) fn claim(&self, id: &str) -> Claim {
        let mut guard = self.seen();
        let now = Instant::now();
        let Seen { ids, order } = &mut *guard;
        while let Some((at, _)) = order.front() {
            if now.duration_since(*at) < self.window {
                break;
            }
            if let Some((at, old)) = order.pop_front()
                && ids.get(&old).is_some_and(|(when, _)| *when == at)
            {
                ids.remove(&old);
            }
        }
        match ids.get(id) {
            Some((at, done)) if now.duration_since(*at) < self.window => {
                return if *done {
                    Claim::Duplicate
                } else {
                    Claim::InFlight
                };
            }
            _ => {}
        }
        ids.insert(id.to_string(), (now, false));
        order.push_back((now, id.to_string()));
        Claim::Fresh
    }

    /// The event of `id` was handled and settled: later copies within the
    /// window are duplicates.
    pub(crate) fn complete(&self, id: &str) {
        let mut guard = self.seen();
        let now = Instant::now();
        if let Some(entry) = guard.ids.get_mut(id) {
            *entry = (now, true);
            guard.order.push_back((now, id.to_string()));
        }
    }

    /// Gives up the claim on `id` (its event failed and will come back).
    pub(crate) fn release(&self, id: &str) {
        self.seen().ids.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_after_the_window() {
        let w = DedupeWindow::new(Duration::from_millis(50));
        assert_eq!(w.claim("a"), Claim::Fresh);
        w.complete("a");
        assert_eq!(w.claim("a"), Claim::Duplicate);
        assert_eq!(w.claim("b"), Claim::Fresh);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(w.claim("a"), Claim::Fresh);
    }

    #[test]
    fn a_released_id_can_be_claimed_again() {
        let w = DedupeWindow::new(Duration::from_secs(60));
        assert_eq!(w.claim("a"), Claim::Fresh);
        w.release("a");
        assert_eq!(w.claim("a"), Claim::Fresh);
    }

    #[test]
    fn a_copy_of_an_event_in_flight_waits_and_is_not_a_duplicate() {
        let w = DedupeWindow::new(Duration::from_secs(60));
        assert_eq!(w.claim("a"), Claim::Fresh);
        assert_eq!(
            w.claim("a"),
            Claim::InFlight,
            "the first copy may still fail"
        );
        w.release("a");
        assert_eq!(
            w.claim("a"),
            Claim::Fresh,
            "the first failed: this one runs"
        );
        w.complete("a");
        assert_eq!(w.claim("a"), Claim::Duplicate);
    }
}
