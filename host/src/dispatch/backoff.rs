//! Retry delays: exponential, capped, with jitter so that events that failed
//! together do not all come back together. The settings are `router.toml`'s
//! `backoff` table; this is where they become a delay.

use std::time::Duration;

use rand::RngExt as _;

pub use crate::config::Backoff;

impl Backoff {
    /// The delay after failed attempt `attempt` (1-based), before jitter,
    /// rounded to the millisecond.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        if self.initial.is_zero() {
            // Not 0 × multiplier^n: that is NaN once the power overflows, and
            // NaN.min(max) would be `max`.
            return Duration::ZERO;
        }
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        millis(base.min(self.max.as_secs_f64()))
    }

    /// The distinct delays, before jitter, that `max_attempts` attempts can
    /// wait: on RabbitMQ, one retry queue each (a queue's TTL is fixed, so
    /// jitter does not apply there).
    ///
    /// With a multiplier of at least 1 (as validated) the delays only grow, up
    /// to `max`, so the tiers end where they stop growing: a `max_attempts` in
    /// the billions (retry "forever") costs what the few tiers cost.
    pub fn tiers(&self, max_attempts: u32) -> Vec<Duration> {
        let longest = millis(self.max.as_secs_f64());
        let mut tiers: Vec<Duration> = Vec::new();
        for attempt in 1..max_attempts {
            let delay = self.base_delay(attempt);
            if tiers.last() != Some(&delay) {
                tiers.push(delay);
            }
            if delay >= longest || self.multiplier <= 1.0 || self.initial.is_zero() {
                break;
            }
        }
        tiers
    }

    /// The delay after failed attempt `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let capped = self.base_delay(attempt).as_secs_f64();
        let spread = if self.jitter > 0.0 {
            rand::rng().random_range(-self.jitter..=self.jitter)
        } else {
            0.0
        };
        Duration::from_secs_f64((capped * (1.0 + spread)).max(0.0))
    }
}

/// `seconds` rounded to the millisecond (negative and NaN as 0, past `u64` ms
/// as the most).
fn millis(seconds: f64) -> Duration {
    Duration::from_millis((seconds * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn grows_then_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: 0.0,
        };
        let delays: Vec<u128> = (1..=6).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn tiers_are_the_distinct_delays() {
        let b = Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: 0.2,
        };
        let tiers: Vec<u128> = b.tiers(6).iter().map(Duration::as_millis).collect();
        assert_eq!(tiers, [500, 1000, 2000]);
        assert!(b.tiers(1).is_empty());
    }

    #[test]
    fn tiers_end_where_the_delays_stop_growing() {
        // Found by fuzzing: `max_attempts = 4294967295` made `tiers` allocate a
        // delay per attempt (64 GiB) when the appliance derived its topology,
        // which aborted the process, at start or on reload.
        let b = Backoff::default();
        let tiers: Vec<u128> = b.tiers(u32::MAX).iter().map(Duration::as_millis).collect();
        assert_eq!(
            tiers,
            [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000],
            "500ms doubling, capped at 1m"
        );
        assert_eq!(b.tiers(u32::MAX), b.tiers(100));

        let flat = Backoff {
            multiplier: 1.0,
            ..Backoff::default()
        };
        assert_eq!(flat.tiers(u32::MAX), [Duration::from_millis(500)]);
        let none = Backoff {
            initial: Duration::ZERO,
            ..Backoff::default()
        };
        assert_eq!(none.tiers(u32::MAX), [Duration::ZERO]);
    }

    #[test]
    fn no_initial_delay_stays_no_delay() {
        // 0s × 2^1024 is NaN, and NaN.min(max) is max: attempt 1026 used to
        // wait the longest delay after a thousand immediate retries.
        let b = Backoff {
            initial: Duration::ZERO,
            ..Backoff::default()
        };
        for attempt in [1, 1025, 1026, u32::MAX] {
            assert_eq!(b.base_delay(attempt), Duration::ZERO, "attempt {attempt}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The tiers are exactly the distinct delays of the attempts, for every
        /// backoff that validates.
        #[test]
        fn tiers_are_every_distinct_delay(
            initial_ms in 0_u64..5_000,
            extra_ms in 0_u64..120_000,
            multiplier in 1.0_f64..4.0,
            max_attempts in 0_u32..300,
        ) {
            let b = Backoff {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(initial_ms + extra_ms),
                multiplier,
                jitter: 0.0,
            };
            let mut every: Vec<Duration> = (1..max_attempts).map(|a| b.base_delay(a)).collect();
            every.dedup();
            prop_assert_eq!(b.tiers(max_attempts), every);
        }
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let b = Backoff {
            jitter: 0.2,
            ..Backoff::default()
        };
        for _ in 0..1000 {
            let d = b.delay(1).as_secs_f64();
            assert!((0.4..=0.6).contains(&d), "{d}");
        }
    }
}
