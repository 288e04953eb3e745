//! Plugin state: the key-value stores behind the `kv` host capability.
//!
//! Every plugin has its own namespace (its name); a plugin can never name another
//! plugin's keys. The capability (`runtime::capability::kv`) checks keys and sizes
//! and turns [`KvError::Unavailable`] into a failed event that is retried, so a
//! store only has to store. Values are bytes; counters are decimal integers stored
//! as text, the way Redis keeps them, so that backends agree byte for byte.

mod embedded;
mod redis;

use std::time::Duration;

pub use embedded::EmbeddedStore;
pub use redis::{RedisSettings, RedisStore};

/// What can go wrong in a store. The split matters: the first three are the
/// plugin's own doing and are returned to it; `Unavailable` is the store's, and
/// the host fails the event (to be retried) rather than let a plugin carry on.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KvError {
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("value too large: {0}")]
    TooLarge(String),
    #[error("not a number: {0}")]
    NotANumber(String),
    #[error("key-value store unavailable: {0}")]
    Unavailable(String),
}

/// Told once writes are durable, or that they could not be made so.
pub type OnDurable = Box<dyn FnOnce(Result<(), KvError>) + Send>;

/// The narrow seam every backend implements (embedded file store, Redis).
///
/// Calls are synchronous: they run inside a plugin call on the thread executing
/// the guest, and must bound their own time (epoch interruption does not reach
/// into host code).
///
/// A write is visible to every reader when it returns. It may become durable
/// later (group commit): [`KvStore::written`] numbers it and
/// [`KvStore::when_durable`] says when a commit covers that number. Stores
/// whose writes are durable on return keep both defaults.
pub trait KvStore: Send + Sync + 'static {
    /// The number of the latest write this store has taken, or has let a reader
    /// see; 0 for stores that are durable on return.
    fn written(&self) -> u64 {
        0
    }

    /// Runs `then` once every write numbered up to `mark` is durable (at once
    /// if it is already), possibly on another thread.
    fn when_durable(&self, mark: u64, then: OnDurable) {
        let _ = mark;
        then(Ok(()));
    }

    /// The value under `key` in `namespace`, unless absent or expired.
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    /// Store `value`, replacing any previous value and expiry.
    fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), KvError>;
    /// Remove `key`; true if a live value was there.
    fn delete(&self, namespace: &str, key: &str) -> Result<bool, KvError>;
    /// Add `delta` to the integer under `key` (absent = 0), keeping its expiry.
    fn incr(&self, namespace: &str, key: &str, delta: i64) -> Result<i64, KvError>;
    /// Store `value` only if no live value is there; true if this call stored it.
    /// Atomic: of concurrent callers (threads, processes sharing the store) on one
    /// key, exactly one gets true.
    fn set_if_absent(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, KvError>;
    /// Replace the value with `value` (and expiry `ttl`) only if the live value is
    /// `expected` (`None`: absent); true if replaced. Atomic, like `set_if_absent`.
    fn compare_and_set(
        &self,
        namespace: &str,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, KvError>;
}

/// Blocks until every write `store` has taken so far is durable, waiting at
/// most `timeout`.
pub fn wait_durable(store: &dyn KvStore, timeout: Duration) -> Result<(), KvError> {
    let (tx, rx) = std::sync::mpsc::channel();
    store.when_durable(
        store.written(),
        Box::new(move |result| {
            let _ = tx.send(result);
        }),
    );
    rx.recv_timeout(timeout)
        .map_err(|_| KvError::Unavailable(format!("the store did not commit within {timeout:?}")))?
}

/// Parses a stored counter; what `incr` accepts as a number.
pub(crate) fn parse_counter(key: &str, raw: &[u8]) -> Result<i64, KvError> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| KvError::NotANumber(format!("value under {key:?} is not a decimal integer")))
}

/// `current + delta`, or the error a counter overflow is.
pub(crate) fn add_counter(key: &str, current: i64, delta: i64) -> Result<i64, KvError> {
    current
        .checked_add(delta)
        .ok_or_else(|| KvError::NotANumber(format!("counter {key:?} would overflow")))
}

#[cfg(test)]
pub(crate) mod conformance {
    //! Behaviour every backend must show; each backend's tests call `all`.
    use super::*;

    pub(crate) fn all(store: &dyn KvStore) {
        set_get_delete(store);
        namespaces_are_separate(store);
        ttl_expires(store);
        incr_counts_and_keeps_ttl(store);
        incr_refuses_non_numbers(store);
        set_if_absent_stores_once(store);
        compare_and_set_needs_the_expected_value(store);
        binary_values_round_trip(store);
        races_have_exactly_one_winner(store);
    }

    fn set_if_absent_stores_once(s: &dyn KvStore) {
        assert!(s.set_if_absent("i", "pay:1", b"ev-1", None).unwrap());
        assert!(!s.set_if_absent("i", "pay:1", b"ev-2", None).unwrap());
        assert_eq!(s.get("i", "pay:1").unwrap().as_deref(), Some(&b"ev-1"[..]));
        // Another namespace has its own key.
        assert!(s.set_if_absent("j", "pay:1", b"ev-3", None).unwrap());
        // An expired value counts as absent, and the new value takes its ttl.
        assert!(
            s.set_if_absent("i", "lease", b"a", Some(Duration::from_millis(50)))
                .unwrap()
        );
        assert!(!s.set_if_absent("i", "lease", b"b", None).unwrap());
        std::thread::sleep(Duration::from_millis(120));
        assert!(
            s.set_if_absent("i", "lease", b"c", Some(Duration::from_secs(60)))
                .unwrap()
        );
        assert_eq!(s.get("i", "lease").unwrap().as_deref(), Some(&b"c"[..]));
    }

    fn compare_and_set_needs_the_expected_value(s: &dyn KvStore) {
        // `None` expects absence.
        assert!(s.compare_and_set("x", "bill", None, b"open", None).unwrap());
        assert!(
            !s.compare_and_set("x", "bill", None, b"again", None)
                .unwrap()
        );
        assert!(
            !s.compare_and_set("x", "bill", Some(b"paid"), b"failed", None)
                .unwrap(),
            "a stale expectation changes nothing"
        );
        assert_eq!(s.get("x", "bill").unwrap().as_deref(), Some(&b"open"[..]));
        assert!(
            s.compare_and_set("x", "bill", Some(b"open"), b"paid", None)
                .unwrap()
        );
        assert_eq!(s.get("x", "bill").unwrap().as_deref(), Some(&b"paid"[..]));
        // A prefix of the value is not the value.
        assert!(
            !s.compare_and_set("x", "bill", Some(b"pai"), b"no", None)
                .unwrap()
        );
        // The new value takes the given expiry; an expired value is absent.
        assert!(
            s.compare_and_set(
                "x",
                "bill",
                Some(b"paid"),
                b"short",
                Some(Duration::from_millis(50))
            )
            .unwrap()
        );
        std::thread::sleep(Duration::from_millis(120));
        assert!(
            !s.compare_and_set("x", "bill", Some(b"short"), b"late", None)
                .unwrap()
        );
        assert!(s.compare_and_set("x", "bill", None, b"new", None).unwrap());
        // Expecting absence when a value is present and vice versa.
        assert!(
            !s.compare_and_set("x", "missing", Some(b""), b"v", None)
                .unwrap()
        );
        assert_eq!(s.get("x", "missing").unwrap(), None);
    }

    fn binary_values_round_trip(s: &dyn KvStore) {
        let value: Vec<u8> = (0..=255).collect();
        s.set("b", "all-bytes", &value, None).unwrap();
        assert_eq!(s.get("b", "all-bytes").unwrap(), Some(value.clone()));
        assert!(
            s.compare_and_set("b", "all-bytes", Some(&value), b"\0\xff", None)
                .unwrap()
        );
        s.set("b", "empty", b"", None).unwrap();
        assert_eq!(s.get("b", "empty").unwrap(), Some(Vec::new()));
        assert!(!s.set_if_absent("b", "empty", b"x", None).unwrap());
        assert!(
            s.compare_and_set("b", "empty", Some(b""), b"y", None)
                .unwrap()
        );
        s.set("b", "key with spaces:and/colons", b"ok", None)
            .unwrap();
        assert_eq!(
            s.get("b", "key with spaces:and/colons").unwrap().as_deref(),
            Some(&b"ok"[..])
        );
    }

    /// Eight threads race on each primitive: exactly one claim wins, no
    /// increment is lost, and a compare-and-set loop applies every update once.
    fn races_have_exactly_one_winner(s: &dyn KvStore) {
        const THREADS: usize = 8;
        const ROUNDS: i64 = 25;
        let winners = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let winners = &winners;
                scope.spawn(move || {
                    let me = format!("t{t}");
                    if s.set_if_absent("race", "claim", me.as_bytes(), None)
                        .unwrap()
                    {
                        winners.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    for _ in 0..ROUNDS {
                        s.incr("race", "counter", 1).unwrap();
                        // Read, modify, compare-and-set until it sticks.
                        loop {
                            let current = s.get("race", "list").unwrap();
                            let n: i64 = current
                                .as_deref()
                                .map_or(0, |v| std::str::from_utf8(v).unwrap().parse().unwrap());
                            let next = (n + 1).to_string();
                            if s.compare_and_set(
                                "race",
                                "list",
                                current.as_deref(),
                                next.as_bytes(),
                                None,
                            )
                            .unwrap()
                            {
                                break;
                            }
                        }
                    }
                });
            }
        });
        assert_eq!(winners.load(std::sync::atomic::Ordering::SeqCst), 1);
        let total = i64::try_from(THREADS).unwrap() * ROUNDS;
        assert_eq!(s.incr("race", "counter", 0).unwrap(), total);
        assert_eq!(
            s.get("race", "list").unwrap(),
            Some(total.to_string().into_bytes())
        );
    }

    fn set_get_delete(s: &dyn KvStore) {
        assert_eq!(s.get("a", "k").unwrap(), None);
        s.set("a", "k", b"v1", None).unwrap();
        assert_eq!(s.get("a", "k").unwrap().as_deref(), Some(&b"v1"[..]));
        s.set("a", "k", b"v2", None).unwrap();
        assert_eq!(s.get("a", "k").unwrap().as_deref(), Some(&b"v2"[..]));
        assert!(s.delete("a", "k").unwrap());
        assert!(!s.delete("a", "k").unwrap());
        assert_eq!(s.get("a", "k").unwrap(), None);
    }

    fn namespaces_are_separate(s: &dyn KvStore) {
        s.set("billing", "shared", b"b", None).unwrap();
        s.set("analytics", "shared", b"a", None).unwrap();
        assert_eq!(
            s.get("billing", "shared").unwrap().as_deref(),
            Some(&b"b"[..])
        );
        assert_eq!(
            s.get("analytics", "shared").unwrap().as_deref(),
            Some(&b"a"[..])
        );
        s.delete("billing", "shared").unwrap();
        assert_eq!(
            s.get("analytics", "shared").unwrap().as_deref(),
            Some(&b"a"[..])
        );
    }

    fn ttl_expires(s: &dyn KvStore) {
        s.set("t", "short", b"x", Some(Duration::from_millis(50)))
            .unwrap();
        s.set("t", "long", b"y", Some(Duration::from_secs(3600)))
            .unwrap();
        assert!(s.get("t", "short").unwrap().is_some());
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(s.get("t", "short").unwrap(), None);
        assert!(
            !s.delete("t", "short").unwrap(),
            "an expired key is not live"
        );
        assert!(s.get("t", "long").unwrap().is_some());
        // A plain set clears a previous expiry.
        s.set("t", "long", b"z", None).unwrap();
        assert_eq!(s.get("t", "long").unwrap().as_deref(), Some(&b"z"[..]));
    }

    fn incr_counts_and_keeps_ttl(s: &dyn KvStore) {
        assert_eq!(s.incr("c", "n", 1).unwrap(), 1);
        assert_eq!(s.incr("c", "n", 41).unwrap(), 42);
        assert_eq!(s.incr("c", "n", -50).unwrap(), -8);
        assert_eq!(s.get("c", "n").unwrap().as_deref(), Some(&b"-8"[..]));
        s.set("c", "ttl", b"10", Some(Duration::from_millis(80)))
            .unwrap();
        assert_eq!(s.incr("c", "ttl", 5).unwrap(), 15);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(s.get("c", "ttl").unwrap(), None, "incr keeps the expiry");
        assert_eq!(
            s.incr("c", "ttl", 1).unwrap(),
            1,
            "expired counts as absent"
        );
    }

    fn incr_refuses_non_numbers(s: &dyn KvStore) {
        s.set("c", "text", b"hello", None).unwrap();
        assert!(matches!(
            s.incr("c", "text", 1),
            Err(KvError::NotANumber(_))
        ));
        s.set("c", "max", i64::MAX.to_string().as_bytes(), None)
            .unwrap();
        assert!(matches!(s.incr("c", "max", 1), Err(KvError::NotANumber(_))));
        assert_eq!(
            s.get("c", "max").unwrap().as_deref(),
            Some(i64::MAX.to_string().as_bytes()),
            "a refused incr changes nothing"
        );
    }
}
