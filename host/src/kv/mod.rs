//! Plugin state: the key-value stores behind the `kv` host capability.
//!
//! Every plugin has its own namespace (its name); a plugin can never name another
//! plugin's keys. The capability (`runtime::capability::kv`) checks keys and sizes
//! and turns [`KvError::Unavailable`] into a failed event that is retried, so a
//! store only has to store. Values are bytes; counters are decimal integers stored
//! as text, the way Redis keeps them, so that backends agree byte for byte.

mod embedded;

use std::time::Duration;

pub use embedded::EmbeddedStore;

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

/// The narrow seam every backend implements (embedded file store, Redis).
///
/// Calls are synchronous: they run inside a plugin call on the thread executing
/// the guest, and must bound their own time (epoch interruption does not reach
/// into host code).
pub trait KvStore: Send + Sync + 'static {
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
