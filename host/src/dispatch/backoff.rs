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
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = base.min(self.max.as_secs_f64());
        Duration::from_millis((capped * 1000.0).round() as u64)
    }

    /// The distinct delays, before jitter, that `max_attempts` attempts can
    /// wait: on RabbitMQ, one retry queue each (a queue's TTL is fixed, so
    /// jitter does not apply there).
    pub fn tiers(&self, max_attempts: u32) -> Vec<Duration> {
        let mut tiers: Vec<Duration> = (1..max_attempts).map(|a| self.base_delay(a)).collect();
        tiers.dedup();
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

#[cfg(test)]
mod tests {
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
