//! Cool-down: a plugin whose events keep breaking its sandbox (timeout, out of
//! memory, stack overflow, trap, panic, outputs over the limits or malformed) is
//! paused, so that it neither takes the CPU healthy plugins need (an endless
//! loop holds a worker for its whole timeout) nor burns a queue of good events
//! into the dead-letter queue while it is broken. The settings are `router.toml`'s `cooldown` table.
//!
//! Closed, the workers take events. After `after` broken events in a row, or
//! one timeout (a worker held for the plugin's whole time limit), the breaker
//! opens: no worker takes an event for the pause. Then exactly one
//! worker takes one event, the probe; if it breaks again the pause doubles (up
//! to `max`), any other outcome closes the breaker. Paused events stay in the
//! plugin's queue.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use crate::config::Cooldown;

/// Failure kinds that mean the plugin itself is broken (as opposed to its
/// verdict on an event, or a store or bus outage).
pub(crate) fn breaks_the_sandbox(kind: &str) -> bool {
    matches!(
        kind,
        "timeout" | "out_of_memory" | "stack_overflow" | "trap" | "panic" | "invalid_output"
    )
}

/// What a worker may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Take events as usual.
    Go,
    /// Take one event: the probe after a pause.
    Probe,
    /// Take nothing for (up to) this long.
    Wait(Duration),
}

/// How a taken delivery went, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The plugin ran and did not break (success, or its own retry/reject).
    Fine,
    /// The plugin ran and broke its sandbox.
    Broken,
    /// The plugin ran until its time limit: broken, and at the highest cost.
    TimedOut,
    /// The plugin did not run (undecodable, duplicate, stale delivery, or no
    /// delivery at all): says nothing about it.
    Neutral,
}

/// A pause that just began: how long, after how many broken events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Paused {
    pub(crate) pause: Duration,
    pub(crate) broken_in_a_row: u32,
}

#[derive(Debug, Default)]
struct State {
    broken_in_a_row: u32,
    paused_until: Option<Instant>,
    /// The length of the current (or last) pause.
    pause: Duration,
    probing: bool,
}

/// One plugin's breaker, shared by its workers.
#[derive(Debug, Default)]
pub(crate) struct Breaker {
    state: Mutex<State>,
}

impl Breaker {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent at every step: a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a worker may take an event now.
    pub(crate) fn admit(&self, settings: &Cooldown, now: Instant) -> Admit {
        let mut state = self.state();
        match state.paused_until {
            _ if settings.after == 0 => Admit::Go,
            None => Admit::Go,
            Some(until) if now < until => Admit::Wait(until - now),
            // Another worker is probing: wait for its verdict.
            Some(_) if state.probing => Admit::Wait(Duration::from_millis(20)),
            Some(_) => {
                state.probing = true;
                Admit::Probe
            }
        }
    }

    /// Records how an event went; `Some` when this starts a pause.
    pub(crate) fn record(
        &self,
        settings: &Cooldown,
        outcome: Outcome,
        probe: bool,
        now: Instant,
    ) -> Option<Paused> {
        let mut state = self.state();
        if probe {
            state.probing = false;
        }
        match outcome {
            Outcome::Neutral => None,
            Outcome::Fine => {
                if probe || state.paused_until.is_none() {
                    *state = State::default();
                }
                None
            }
            Outcome::Broken | Outcome::TimedOut => {
                state.broken_in_a_row = state.broken_in_a_row.saturating_add(1);
                let pause = if probe {
                    (state.pause * 2).min(settings.max)
                } else if state.paused_until.is_none()
                    && settings.after > 0
                    && (state.broken_in_a_row >= settings.after || outcome == Outcome::TimedOut)
                {
                    settings.initial
                } else {
                    // Below the threshold, or an event that started before the
                    // pause did: the pause in force stands.
                    return None;
                };
                state.pause = pause;
                state.paused_until = Some(now + pause);
                Some(Paused {
                    pause,
                    broken_in_a_row: state.broken_in_a_row,
                })
            }
        }
    }

    /// Whether the plugin is paused now.
    pub(crate) fn is_paused(&self, now: Instant) -> bool {
        self.state().paused_until.is_some_and(|until| now < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Cooldown {
        Cooldown {
            after: 3,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(4),
        }
    }

    #[test]
    fn trips_after_broken_events_in_a_row_only() {
        let (b, s, t) = (Breaker::default(), settings(), Instant::now());
        assert_eq!(b.record(&s, Outcome::Broken, false, t), None);
        assert_eq!(b.record(&s, Outcome::Broken, false, t), None);
        // A good event in between starts the count again.
        assert_eq!(b.record(&s, Outcome::Fine, false, t), None);
        assert_eq!(b.record(&s, Outcome::Broken, false, t), None);
        assert_eq!(b.record(&s, Outcome::Neutral, false, t), None);
        assert_eq!(b.record(&s, Outcome::Broken, false, t), None);
        assert_eq!(b.admit(&s, t), Admit::Go);
        let paused = b.record(&s, Outcome::Broken, false, t).unwrap();
        assert_eq!(paused.pause, Duration::from_secs(1));
        assert_eq!(paused.broken_in_a_row, 3);
        assert_eq!(b.admit(&s, t), Admit::Wait(Duration::from_secs(1)));
        assert!(b.is_paused(t));
    }

    #[test]
    fn one_probe_after_the_pause_then_doubling_up_to_max_or_closing() {
        let (b, s, t) = (Breaker::default(), settings(), Instant::now());
        for _ in 0..3 {
            b.record(&s, Outcome::Broken, false, t);
        }
        let later = t + Duration::from_secs(1);
        assert_eq!(b.admit(&s, later), Admit::Probe);
        // Only one probe at a time.
        assert!(matches!(b.admit(&s, later), Admit::Wait(_)));
        let paused = b.record(&s, Outcome::Broken, true, later).unwrap();
        assert_eq!(paused.pause, Duration::from_secs(2));
        let later = later + Duration::from_secs(2);
        assert_eq!(b.admit(&s, later), Admit::Probe);
        let paused = b.record(&s, Outcome::Broken, true, later).unwrap();
        assert_eq!(paused.pause, Duration::from_secs(4));
        let later = later + Duration::from_secs(4);
        assert_eq!(b.admit(&s, later), Admit::Probe);
        assert_eq!(
            b.record(&s, Outcome::Broken, true, later).unwrap().pause,
            Duration::from_secs(4),
            "capped at max"
        );
        let later = later + Duration::from_secs(4);
        assert_eq!(b.admit(&s, later), Admit::Probe);
        assert_eq!(b.record(&s, Outcome::Fine, true, later), None);
        assert_eq!(b.admit(&s, later), Admit::Go);
        assert!(!b.is_paused(later));
        // Closed again: the count starts from zero and the pause from `initial`.
        b.record(&s, Outcome::Broken, false, later);
        b.record(&s, Outcome::Broken, false, later);
        let paused = b.record(&s, Outcome::Broken, false, later).unwrap();
        assert_eq!(paused.pause, Duration::from_secs(1));
    }

    #[test]
    fn a_probe_that_did_not_run_the_plugin_lets_another_probe() {
        let (b, s, t) = (Breaker::default(), settings(), Instant::now());
        for _ in 0..3 {
            b.record(&s, Outcome::Broken, false, t);
        }
        let later = t + Duration::from_secs(1);
        assert_eq!(b.admit(&s, later), Admit::Probe);
        assert_eq!(b.record(&s, Outcome::Neutral, true, later), None);
        assert_eq!(b.admit(&s, later), Admit::Probe);
    }

    #[test]
    fn events_finishing_during_a_pause_do_not_extend_or_end_it() {
        let (b, s, t) = (Breaker::default(), settings(), Instant::now());
        for _ in 0..3 {
            b.record(&s, Outcome::Broken, false, t);
        }
        assert_eq!(b.record(&s, Outcome::Broken, false, t), None);
        assert_eq!(b.record(&s, Outcome::Fine, false, t), None);
        assert!(b.is_paused(t));
    }

    #[test]
    fn one_timeout_is_enough() {
        let (b, s, t) = (Breaker::default(), settings(), Instant::now());
        let paused = b.record(&s, Outcome::TimedOut, false, t).unwrap();
        assert_eq!(paused.pause, Duration::from_secs(1));
        assert!(b.is_paused(t));
    }

    #[test]
    fn after_0_never_pauses() {
        let b = Breaker::default();
        let s = Cooldown {
            after: 0,
            ..settings()
        };
        let t = Instant::now();
        for _ in 0..10 {
            assert_eq!(b.record(&s, Outcome::Broken, false, t), None);
            assert_eq!(b.record(&s, Outcome::TimedOut, false, t), None);
        }
        assert_eq!(b.admit(&s, t), Admit::Go);
    }

    #[test]
    fn only_sandbox_failures_count() {
        for kind in [
            "timeout",
            "out_of_memory",
            "stack_overflow",
            "trap",
            "panic",
            "invalid_output",
        ] {
            assert!(breaks_the_sandbox(kind), "{kind}");
        }
        for kind in [
            "retry",
            "reject",
            "kv_unavailable",
            "publish",
            "undecodable",
        ] {
            assert!(!breaks_the_sandbox(kind), "{kind}");
        }
    }
}
