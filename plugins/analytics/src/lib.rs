//! `analytics`: counts every event, by kind, by day and by tenant.
//!
//! Routed on every event (`#`). The data is never parsed: any payload, JSON or
//! not, is counted.
//!
//! # State (kv)
//!
//! - `count:kind:<kind>`
//! - `count:day:<YYYY-MM-DD>:<kind>`: the day is the first 10 characters of the
//!   event's RFC 3339 `time`, or `unknown` when it does not start with a date;
//! - `count:tenant:<tenant id, or none>:<kind>`
//! - `seen:<event id>`, kept 7 days: the event was counted; its value is the
//!   `analytics.tracked` record, as JSON. While the event is being counted it
//!   is `pending` instead, for at most 30 s.
//!
//! # Delivery rules
//!
//! - Kinds starting with `analytics.` (its own outputs) are skipped.
//! - An event already `seen` is not counted again. When `forward` is on, the
//!   recorded `analytics.tracked` output is emitted again (the host gives it the
//!   same output id, so consumers dedupe): a redelivery after a crash between the
//!   handler and the publish must not lose it.
//! - Before counting, a delivery claims the event with `set-if-absent` on
//!   `seen:<id>` (`pending`, 30 s lease): of two copies of one event handled at
//!   the same moment (by two replicas sharing Redis), one counts; the other is
//!   retried and then finds the record.
//! - Counters are written before the record: a crash in between counts the event
//!   twice once the lease has run out, never zero times.
//!
//! # Config
//!
//! - `forward`: `true` to emit one `analytics.tracked` output per counted event,
//!   `{"kind", "day", "tenant", "count_kind", "count_day", "count_tenant"}` (the
//!   counters' new values; `tenant` as in the key). Anything else: no outputs.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard_plugin::{Event, Failure, Output, Plugin, config, export, kv, log};

/// How long an event id is remembered.
pub const SEEN_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// How long a delivery may take to count an event before another delivery of
/// the same event may count it instead (the first one crashed).
pub const CLAIM_LEASE: Duration = Duration::from_secs(30);

/// `seen:<id>` while the event is being counted.
const PENDING: &[u8] = b"pending";

/// Kind of the forwarded output.
pub const TRACKED: &str = "analytics.tracked";

/// The plugin. Its logic is plain Rust: call `Analytics::handle` natively to test
/// it (state and config come from `switchboard_plugin::testing`).
pub struct Analytics;

/// One counted event, and the `analytics.tracked` output's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracked {
    /// The event's kind.
    pub kind: String,
    /// `YYYY-MM-DD`, or `unknown`.
    pub day: String,
    /// The tenant id, or `none`.
    pub tenant: String,
    /// `count:kind:<kind>` after this event.
    pub count_kind: i64,
    /// `count:day:<day>:<kind>` after this event.
    pub count_day: i64,
    /// `count:tenant:<tenant>:<kind>` after this event.
    pub count_tenant: i64,
}

impl Plugin for Analytics {
    fn handle(event: Event) -> Result<Vec<Output>, Failure> {
        if event.kind.starts_with("analytics.") {
            return Ok(vec![]);
        }
        let seen_key = format!("seen:{}", event.id);
        if !kv::set_if_absent(&seen_key, PENDING, Some(CLAIM_LEASE))? {
            let Some(recorded) = kv::get(&seen_key)? else {
                return Err(Failure::retry(format!(
                    "the claim on event {} ran out while it was read; trying again",
                    event.id
                )));
            };
            if recorded == PENDING {
                return Err(Failure::retry(format!(
                    "event {} is being counted by another delivery; checking again later",
                    event.id
                )));
            }
            log::debug(format!("event {} already counted", event.id));
            // A record that does not parse (written by another version) is only
            // a lost re-emission, not a reason to fail the event.
            return match serde_json::from_slice::<Tracked>(&recorded) {
                Ok(tracked) if forward() => Ok(vec![Output::json(TRACKED, &tracked)?]),
                _ => Ok(vec![]),
            };
        }

        let day = day_of(&event.time);
        let tenant = event.tenant_id.as_deref().unwrap_or("none").to_owned();
        let kind = event.kind;
        let tracked = Tracked {
            count_kind: kv::incr(&format!("count:kind:{kind}"), 1)?,
            count_day: kv::incr(&format!("count:day:{day}:{kind}"), 1)?,
            count_tenant: kv::incr(&format!("count:tenant:{tenant}:{kind}"), 1)?,
            kind,
            day,
            tenant,
        };
        kv::set_json(&seen_key, &tracked, Some(SEEN_TTL))?;

        if forward() {
            Ok(vec![Output::json(TRACKED, &tracked)?])
        } else {
            Ok(vec![])
        }
    }
}

export!(Analytics);

/// Whether config `forward` is `true`.
fn forward() -> bool {
    config::get("forward").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// The `YYYY-MM-DD` an RFC 3339 `time` starts with, or `unknown`.
pub fn day_of(time: &str) -> String {
    let b = time.as_bytes();
    let digits = |range: std::ops::Range<usize>| b[range].iter().all(u8::is_ascii_digit);
    let number = |range: std::ops::Range<usize>| {
        b[range]
            .iter()
            .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
    };
    let valid = b.len() >= 10
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (1..=12).contains(&number(5..7))
        && (1..=31).contains(&number(8..10))
        && b.get(10).is_none_or(|c| matches!(c, b'T' | b't' | b' '));
    if valid {
        time[..10].to_owned()
    } else {
        "unknown".to_owned()
    }
}

// Native only: the tests run on the SDK's in-memory host.
#[cfg(test)]
#[cfg(not(target_arch = "wasm32"))]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use switchboard_plugin::testing;

    fn count(key: &str) -> Option<String> {
        kv::get(key).unwrap().map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn counts_by_kind_day_and_tenant() {
        testing::reset();
        let mut a = testing::event("order.created", &json!({}));
        a.tenant_id = Some("acme".into());
        a.time = "2025-03-04T10:00:00+01:00".into();
        let mut b = testing::event("order.created", &json!({}));
        b.time = "2025-03-05T00:00:00Z".into();
        for e in [a, b] {
            assert_eq!(
                Analytics::handle(e).unwrap(),
                vec![],
                "forward is off by default"
            );
        }
        assert_eq!(count("count:kind:order.created").as_deref(), Some("2"));
        assert_eq!(
            count("count:day:2025-03-04:order.created").as_deref(),
            Some("1")
        );
        assert_eq!(
            count("count:day:2025-03-05:order.created").as_deref(),
            Some("1")
        );
        assert_eq!(
            count("count:tenant:acme:order.created").as_deref(),
            Some("1")
        );
        assert_eq!(
            count("count:tenant:none:order.created").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn a_redelivery_is_not_counted_twice() {
        testing::reset();
        let event = testing::event("user.created", &json!({}));
        Analytics::handle(event.clone()).unwrap();
        Analytics::handle(event.clone()).unwrap();
        assert_eq!(count("count:kind:user.created").as_deref(), Some("1"));

        // After the seen window, the id is forgotten.
        testing::advance(SEEN_TTL);
        assert_eq!(kv::get(&format!("seen:{}", event.id)).unwrap(), None);
        Analytics::handle(event).unwrap();
        assert_eq!(count("count:kind:user.created").as_deref(), Some("2"));
    }

    #[test]
    fn a_copy_being_counted_elsewhere_is_retried_not_counted() {
        testing::reset();
        let event = testing::event("user.created", &json!({}));
        // Another replica has claimed this event and is counting it.
        kv::set(&format!("seen:{}", event.id), b"pending", Some(CLAIM_LEASE)).unwrap();
        let failure = Analytics::handle(event.clone()).unwrap_err();
        assert!(!failure.is_reject(), "{failure}");
        assert!(
            failure
                .message()
                .contains("being counted by another delivery")
        );
        assert_eq!(count("count:kind:user.created"), None);

        // The other replica crashed: once its lease runs out, this copy counts.
        testing::advance(CLAIM_LEASE);
        Analytics::handle(event.clone()).unwrap();
        assert_eq!(count("count:kind:user.created").as_deref(), Some("1"));
        let recorded: Tracked = kv::get_json(&format!("seen:{}", event.id))
            .unwrap()
            .unwrap();
        assert_eq!(recorded.count_kind, 1);
    }

    #[test]
    fn forward_emits_the_counts_and_repeats_them_on_redelivery() {
        testing::reset();
        testing::set_config("forward", "true");
        let mut event = testing::event("payment.success", &json!({"amount": 1}));
        event.tenant_id = Some("t1".into());
        let outputs = Analytics::handle(event.clone()).unwrap();
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].kind, TRACKED);
        assert_eq!(
            outputs[0].data_json::<Value>().unwrap(),
            json!({"kind": "payment.success", "day": "2025-01-01", "tenant": "t1",
                   "count_kind": 1, "count_day": 1, "count_tenant": 1})
        );

        let second = testing::event("payment.success", &json!({}));
        let tracked: Tracked = Analytics::handle(second).unwrap()[0].data_json().unwrap();
        assert_eq!(
            (tracked.count_kind, tracked.count_day, tracked.count_tenant),
            (2, 2, 1)
        );
        assert_eq!(tracked.tenant, "none");

        let again = Analytics::handle(event).unwrap();
        assert_eq!(again, outputs, "same output, counters untouched");
        assert_eq!(count("count:kind:payment.success").as_deref(), Some("2"));
    }

    #[test]
    fn own_outputs_are_skipped_and_data_is_never_parsed() {
        testing::reset();
        testing::set_config("forward", "TRUE");
        let tracked = testing::event(TRACKED, &json!({}));
        assert!(Analytics::handle(tracked).unwrap().is_empty());
        assert!(testing::kv_dump().is_empty());

        let mut raw = testing::event("blob.uploaded", &json!(null));
        raw.data = vec![0xff, 0x00, 0xfe];
        raw.content_type = "application/octet-stream".into();
        raw.time = "yesterday".into();
        let outputs = Analytics::handle(raw).unwrap();
        assert_eq!(outputs[0].data_json::<Tracked>().unwrap().day, "unknown");
        assert_eq!(
            count("count:day:unknown:blob.uploaded").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn days_come_from_rfc3339_times() {
        for (time, day) in [
            ("2025-01-31T23:59:59Z", "2025-01-31"),
            ("2025-12-01t00:00:00.123+05:30", "2025-12-01"),
            ("2025-06-15 08:00:00Z", "2025-06-15"),
            ("2025-06-15", "2025-06-15"),
            ("2025-13-01T00:00:00Z", "unknown"),
            ("2025-06-00T00:00:00Z", "unknown"),
            ("2025/06/15T00:00:00Z", "unknown"),
            ("2025-06-15X", "unknown"),
            ("1718000000", "unknown"),
            ("", "unknown"),
            ("2025-06-1é", "unknown"),
        ] {
            assert_eq!(day_of(time), day, "{time:?}");
        }
    }
}
