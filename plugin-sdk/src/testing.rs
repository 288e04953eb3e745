//! An in-memory stand-in for the Switchboard host, for running plugin logic
//! natively: `cargo test -p my-plugin`, benchmarks, examples.
//!
//! Only on non-wasm targets. There, [`kv`](crate::kv), [`config`](crate::config) and
//! [`log`](crate::log) talk to this host instead of WIT imports. Its state is
//! thread-local, and the test harness runs each test on its own thread, so tests
//! are isolated from each other without any setup; [`reset`] empties it for tests
//! that handle several scenarios in one function.
//!
//! It applies the real host's rules: keys of 1 to 512 bytes, values up to 1 MiB,
//! expiry on read, `incr` on decimal text keeping the expiry, a zero ttl deleting.
//! Time is virtual: it only moves when a test calls [`advance`], so ttl tests
//! neither sleep nor flake.
//!
//! ```
//! use switchboard_plugin::{kv, config, log, testing};
//! use std::time::Duration;
//!
//! testing::reset();
//! testing::set_config("greeting", "hello");
//! assert_eq!(config::get("greeting").as_deref(), Some("hello"));
//!
//! kv::set("session", b"s1", Some(Duration::from_secs(60))).unwrap();
//! testing::advance(Duration::from_secs(61));
//! assert_eq!(kv::get("session").unwrap(), None);
//!
//! log::info("done");
//! assert_eq!(testing::logs(), vec![(log::Level::Info, "done".to_string())]);
//! ```

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::Duration;

use crate::Event;
use crate::log::Level;

/// Longest key the host accepts, in bytes.
pub const MAX_KEY: usize = 512;
/// Largest value the host accepts, in bytes.
pub const MAX_VALUE: usize = 1 << 20;

/// The time every event made by [`event`] says it happened at.
pub const EVENT_TIME: &str = "2025-01-01T12:00:00Z";

#[derive(Default)]
struct TestHost {
    /// Virtual time since the host was last reset.
    now: Duration,
    /// Value and, for expiring keys, the virtual time it expires at.
    kv: BTreeMap<String, (Vec<u8>, Option<Duration>)>,
    config: BTreeMap<String, String>,
    logs: Vec<(Level, String)>,
}

impl TestHost {
    fn live(&mut self, key: &str) -> Option<&mut (Vec<u8>, Option<Duration>)> {
        let now = self.now;
        if self
            .kv
            .get(key)
            .is_some_and(|(_, exp)| exp.is_some_and(|at| at <= now))
        {
            self.kv.remove(key);
        }
        self.kv.get_mut(key)
    }

    fn purge_expired(&mut self) {
        let now = self.now;
        self.kv.retain(|_, (_, exp)| exp.is_none_or(|at| at > now));
    }
}

thread_local! {
    static HOST: RefCell<TestHost> = RefCell::new(TestHost::default());
    static NEXT_EVENT: Cell<u64> = const { Cell::new(1) };
}

fn with_host<R>(f: impl FnOnce(&mut TestHost) -> R) -> R {
    HOST.with(|host| f(&mut host.borrow_mut()))
}

/// Empties this thread's host: kv, config, captured logs, virtual time and the
/// [`event`] id counter.
pub fn reset() {
    with_host(|h| *h = TestHost::default());
    NEXT_EVENT.with(|n| n.set(1));
}

/// Sets configuration value `key` (what `router.toml` would give the plugin).
pub fn set_config(key: impl Into<String>, value: impl Into<String>) {
    with_host(|h| {
        h.config.insert(key.into(), value.into());
    });
}

/// Removes configuration value `key`.
pub fn remove_config(key: &str) {
    with_host(|h| {
        h.config.remove(key);
    });
}

/// Every line logged since the last [`reset`] (or [`take_logs`]), oldest first.
pub fn logs() -> Vec<(Level, String)> {
    with_host(|h| h.logs.clone())
}

/// Like [`logs`], and forgets them.
pub fn take_logs() -> Vec<(Level, String)> {
    with_host(|h| std::mem::take(&mut h.logs))
}

/// Every live (not expired) key and its value.
pub fn kv_dump() -> BTreeMap<String, Vec<u8>> {
    with_host(|h| {
        h.purge_expired();
        h.kv.iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    })
}

/// Moves this thread's virtual clock forward: keys whose ttl has run out are gone.
pub fn advance(by: Duration) {
    with_host(|h| h.now = h.now.saturating_add(by));
}

/// An event of `kind` whose data is `data` as JSON, as a producer would publish
/// it: ids `evt-1`, `evt-2`... in order of creation on this thread, attempt 1,
/// time [`EVENT_TIME`], exchange and source `test`. Adjust fields with struct
/// update syntax or assignment.
pub fn event(kind: &str, data: &serde_json::Value) -> Event {
    let n = NEXT_EVENT.with(|n| n.replace(n.get() + 1));
    Event {
        id: format!("evt-{n}"),
        kind: kind.to_owned(),
        exchange: "test".to_owned(),
        attempt: 1,
        source: "test".to_owned(),
        time: EVENT_TIME.to_owned(),
        content_type: crate::output::JSON.to_owned(),
        data: data.to_string().into_bytes(),
        ..Event::default()
    }
}

/// The calls `crate::host` routes here on native targets.
pub(crate) mod host {
    use super::{MAX_KEY, MAX_VALUE, with_host};
    use crate::kv::KvError;
    use crate::log::Level;
    use std::time::Duration;

    pub(crate) fn log(level: Level, message: &str) {
        with_host(|h| h.logs.push((level, message.to_owned())));
    }

    pub(crate) fn config_get(key: &str) -> Option<String> {
        with_host(|h| h.config.get(key).cloned())
    }

    fn check_key(key: &str) -> Result<(), KvError> {
        if key.is_empty() {
            return Err(KvError::InvalidKey("keys cannot be empty".into()));
        }
        if key.len() > MAX_KEY {
            return Err(KvError::InvalidKey(format!(
                "key of {} bytes is over the {MAX_KEY}-byte limit",
                key.len()
            )));
        }
        Ok(())
    }

    pub(crate) fn kv_get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
        check_key(key)?;
        Ok(with_host(|h| h.live(key).map(|(v, _)| v.clone())))
    }

    fn check_value(value: &[u8]) -> Result<(), KvError> {
        if value.len() > MAX_VALUE {
            return Err(KvError::TooLarge(format!(
                "value of {} bytes is over the {MAX_VALUE}-byte limit",
                value.len()
            )));
        }
        Ok(())
    }

    pub(crate) fn kv_set(key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), KvError> {
        check_key(key)?;
        check_value(value)?;
        with_host(|h| match ttl_ms {
            Some(0) => {
                h.kv.remove(key);
            }
            ttl => {
                let expires = ttl.map(|ms| h.now.saturating_add(Duration::from_millis(ms)));
                h.kv.insert(key.to_owned(), (value.to_vec(), expires));
            }
        });
        Ok(())
    }

    pub(crate) fn kv_delete(key: &str) -> Result<bool, KvError> {
        check_key(key)?;
        Ok(with_host(|h| {
            h.live(key).is_some() && h.kv.remove(key).is_some()
        }))
    }

    pub(crate) fn kv_incr(key: &str, delta: i64) -> Result<i64, KvError> {
        check_key(key)?;
        with_host(|h| {
            let (current, expires) = match h.live(key) {
                None => (0, None),
                Some((raw, expires)) => {
                    let n = std::str::from_utf8(raw)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                        .ok_or_else(|| {
                            KvError::NotANumber(format!(
                                "value under {key:?} is not a decimal integer"
                            ))
                        })?;
                    (n, *expires)
                }
            };
            let next = current
                .checked_add(delta)
                .ok_or_else(|| KvError::NotANumber(format!("counter {key:?} would overflow")))?;
            h.kv.insert(key.to_owned(), (next.to_string().into_bytes(), expires));
            Ok(next)
        })
    }

    pub(crate) fn kv_set_if_absent(
        key: &str,
        value: &[u8],
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        kv_compare_and_set(key, None, value, ttl_ms)
    }

    pub(crate) fn kv_compare_and_set(
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        check_key(key)?;
        check_value(value)?;
        Ok(with_host(|h| {
            if h.live(key).map(|(v, _)| v.as_slice()) != expected {
                return false;
            }
            // As the host: a zero ttl is "expires at once", after the swap.
            match ttl_ms {
                Some(0) => {
                    h.kv.remove(key);
                }
                ttl => {
                    let expires = ttl.map(|ms| h.now.saturating_add(Duration::from_millis(ms)));
                    h.kv.insert(key.to_owned(), (value.to_vec(), expires));
                }
            }
            true
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{self, KvError};
    use crate::{config, log};

    #[test]
    fn set_get_delete() {
        reset();
        assert_eq!(kv::get("k").unwrap(), None);
        kv::set("k", b"v1", None).unwrap();
        kv::set("k", b"v2", None).unwrap();
        assert_eq!(kv::get("k").unwrap().as_deref(), Some(&b"v2"[..]));
        assert!(kv::delete("k").unwrap());
        assert!(!kv::delete("k").unwrap());
        assert!(kv_dump().is_empty());
    }

    #[test]
    fn ttl_expires_on_the_virtual_clock() {
        reset();
        kv::set("short", b"x", Some(Duration::from_millis(50))).unwrap();
        kv::set("long", b"y", Some(Duration::from_secs(3600))).unwrap();
        advance(Duration::from_millis(49));
        assert!(kv::get("short").unwrap().is_some());
        advance(Duration::from_millis(1));
        assert_eq!(kv::get("short").unwrap(), None);
        assert!(!kv::delete("short").unwrap(), "an expired key is not live");
        assert_eq!(kv_dump().keys().collect::<Vec<_>>(), vec!["long"]);
        kv::set("long", b"z", None).unwrap();
        advance(Duration::from_secs(7200));
        assert_eq!(
            kv::get("long").unwrap().as_deref(),
            Some(&b"z"[..]),
            "set clears expiry"
        );
        kv::set("long", b"z", Some(Duration::ZERO)).unwrap();
        assert_eq!(kv::get("long").unwrap(), None, "a zero ttl deletes");
    }

    #[test]
    fn incr_counts_keeps_expiry_and_refuses_non_numbers() {
        reset();
        assert_eq!(kv::incr("n", 1).unwrap(), 1);
        assert_eq!(kv::incr("n", 41).unwrap(), 42);
        assert_eq!(kv::incr("n", -50).unwrap(), -8);
        assert_eq!(kv::get("n").unwrap().as_deref(), Some(&b"-8"[..]));

        kv::set("ttl", b"10", Some(Duration::from_millis(80))).unwrap();
        assert_eq!(kv::incr("ttl", 5).unwrap(), 15);
        advance(Duration::from_millis(80));
        assert_eq!(kv::get("ttl").unwrap(), None, "incr keeps the expiry");
        assert_eq!(kv::incr("ttl", 1).unwrap(), 1, "expired counts as absent");

        kv::set("text", b"hello", None).unwrap();
        assert!(matches!(kv::incr("text", 1), Err(KvError::NotANumber(_))));
        kv::set("max", i64::MAX.to_string().as_bytes(), None).unwrap();
        assert!(matches!(kv::incr("max", 1), Err(KvError::NotANumber(_))));
        assert_eq!(
            kv::get("max").unwrap(),
            Some(i64::MAX.to_string().into_bytes())
        );
    }

    #[test]
    fn limits_match_the_host() {
        reset();
        assert!(matches!(kv::get(""), Err(KvError::InvalidKey(_))));
        let long = "k".repeat(MAX_KEY + 1);
        assert!(matches!(
            kv::set(&long, b"v", None),
            Err(KvError::InvalidKey(_))
        ));
        assert!(kv::set(&"k".repeat(MAX_KEY), b"v", None).is_ok());
        let big = vec![0; MAX_VALUE + 1];
        assert!(matches!(
            kv::set("big", &big, None),
            Err(KvError::TooLarge(_))
        ));
    }

    #[test]
    fn config_and_logs() {
        reset();
        assert_eq!(config::get("k"), None);
        assert_eq!(config::get_or("k", "fallback"), "fallback");
        set_config("k", "v");
        assert_eq!(config::get_or("k", "fallback"), "v");
        remove_config("k");
        assert_eq!(config::get("k"), None);

        log::warn("careful");
        log::error(String::from("broken"));
        assert_eq!(
            take_logs(),
            vec![
                (log::Level::Warn, "careful".into()),
                (log::Level::Error, "broken".into())
            ]
        );
        assert!(logs().is_empty());
    }

    #[test]
    fn events_get_fresh_ids() {
        reset();
        let a = event("a.b", &serde_json::json!({"x": 1}));
        let b = event("a.b", &serde_json::json!(null));
        assert_eq!((a.id.as_str(), b.id.as_str()), ("evt-1", "evt-2"));
        assert_eq!(a.json_value().unwrap(), serde_json::json!({"x": 1}));
        assert_eq!(a.attempt, 1);
    }

    #[test]
    fn conditional_writes_decide_on_the_live_value() {
        reset();
        assert!(kv::set_if_absent("claim", b"a", None).unwrap());
        assert!(!kv::set_if_absent("claim", b"b", None).unwrap());
        assert_eq!(kv::get("claim").unwrap().as_deref(), Some(&b"a"[..]));

        assert!(!kv::compare_and_set("claim", Some(b"b"), b"c", None).unwrap());
        assert!(kv::compare_and_set("claim", Some(b"a"), b"c", None).unwrap());
        assert!(!kv::compare_and_set("claim", None, b"d", None).unwrap());
        assert_eq!(kv::get("claim").unwrap().as_deref(), Some(&b"c"[..]));

        kv::set("lease", b"x", Some(Duration::from_secs(1))).unwrap();
        advance(Duration::from_secs(2));
        assert!(
            kv::set_if_absent("lease", b"y", None).unwrap(),
            "expired is absent"
        );
        assert!(matches!(
            kv::set_if_absent("", b"v", None),
            Err(KvError::InvalidKey(_))
        ));
    }
}
