//! Durable key-value state, private to this plugin.
//!
//! Plugin state lives here, never in instance memory: the host recycles instances
//! and replaces them on reload, so a `static` forgets. Each plugin has its own
//! namespace; keys are 1 to 512 bytes, values at most 1 MiB.
//!
//! Writes take effect at once and are not rolled back when the handler later fails,
//! and every event can be delivered more than once: write handlers so that running
//! them again changes nothing (record what you applied, keyed by event or business
//! id, and check it first).
//!
//! # Replicas
//!
//! Several routers may share one store (Redis) and run the same plugin at the
//! same moment: on two redeliveries of one event, or on two events about one
//! thing. Each call is atomic on its own, but a [`get`] followed by a [`set`] is
//! not: another replica can write in between. Where that matters, let the store
//! pick the winner:
//!
//! - [`set_if_absent`] claims a key once ("payment p-1 is applied by event e-7");
//! - [`compare_and_set`] writes only over the value you read (read, decide, try;
//!   on `false`, read again);
//! - [`incr`] counts without losing increments.
//!
//! Errors are only ever the plugin's own doing ([`KvError`]); when the store itself
//! is unreachable the call does not return at all — the host fails the event and
//! retries it later. So `?` on a kv call inside `handle` is right: it turns a
//! misuse into a [`Failure::Reject`].

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Failure, host};

/// A kv call the host refused, or a value that would not convert.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvError {
    /// The key is empty or longer than the host's limit (512 bytes).
    InvalidKey(String),
    /// The value is larger than the host's limit (1 MiB).
    TooLarge(String),
    /// [`incr`] on a value that is not a decimal integer, or an overflow.
    NotANumber(String),
    /// [`get_json`]: the stored value is not JSON of the requested type.
    Decode {
        /// The key read.
        key: String,
        /// serde's message.
        message: String,
    },
    /// [`set_json`]: the value cannot be serialized as JSON.
    Encode {
        /// The key to write.
        key: String,
        /// serde's message.
        message: String,
    },
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::InvalidKey(m) => write!(f, "kv: invalid key: {m}"),
            KvError::TooLarge(m) => write!(f, "kv: value too large: {m}"),
            KvError::NotANumber(m) => write!(f, "kv: not a number: {m}"),
            KvError::Decode { key, message } => {
                write!(
                    f,
                    "kv: value under {key:?} is not the expected JSON: {message}"
                )
            }
            KvError::Encode { key, message } => {
                write!(
                    f,
                    "kv: value for {key:?} cannot be serialized as JSON: {message}"
                )
            }
        }
    }
}

impl std::error::Error for KvError {}

/// A kv error is caused by the plugin's own call (a bad key, an oversized value,
/// a counter that is not one), so retrying the event would fail the same way: it
/// is a [`Failure::Reject`].
impl From<KvError> for Failure {
    fn from(err: KvError) -> Self {
        Failure::reject(err.to_string())
    }
}

/// The value stored under `key`, if any and not expired.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
    host::kv_get(key)
}

/// The JSON value stored under `key`, parsed into `T`, if any and not expired.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, KvError> {
    let Some(bytes) = get(key)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|err| KvError::Decode {
            key: key.to_owned(),
            message: err.to_string(),
        })
}

/// Stores `value` under `key`, replacing any previous value and expiry. With a
/// `ttl`, the value expires that long from now (rounded up to a whole millisecond;
/// a zero `ttl` removes the key).
pub fn set(key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), KvError> {
    host::kv_set(key, value, ttl.map(ttl_ms))
}

/// Stores `value` serialized as JSON under `key`; see [`set`].
pub fn set_json(key: &str, value: &impl Serialize, ttl: Option<Duration>) -> Result<(), KvError> {
    let bytes = serde_json::to_vec(value).map_err(|err| KvError::Encode {
        key: key.to_owned(),
        message: err.to_string(),
    })?;
    set(key, &bytes, ttl)
}

/// Removes `key`; `true` if a live value was there.
pub fn delete(key: &str) -> Result<bool, KvError> {
    host::kv_delete(key)
}

/// Adds `delta` to the decimal integer under `key` (absent counts as 0) and returns
/// the new value. A counter keeps the expiry it had; counters are stored as decimal
/// text, so [`get`] reads them as e.g. `b"42"`.
pub fn incr(key: &str, delta: i64) -> Result<i64, KvError> {
    host::kv_incr(key, delta)
}

/// Stores `value` under `key` only if no live value is there; `true` if this call
/// stored it. Of several handlers racing on one key (on any replica), exactly one
/// gets `true`: use it for idempotency keys and claims. With a `ttl`, the value
/// expires that long from now.
///
/// Needs a host with contract 0.1.1 or later.
pub fn set_if_absent(key: &str, value: &[u8], ttl: Option<Duration>) -> Result<bool, KvError> {
    host::kv_set_if_absent(key, value, ttl.map(ttl_ms))
}

/// Replaces the value under `key` with `value` only if the live value is exactly
/// `expected` (`None`: only if there is none); `true` if it was replaced. `false`
/// means someone else wrote first: read again and decide again. The new value's
/// expiry is `ttl`, as with [`set`].
///
/// ```no_run
/// # use switchboard_plugin::kv;
/// // Append to a list that other replicas append to as well.
/// loop {
///     let current = kv::get("seen")?;
///     let mut next = current.clone().unwrap_or_default();
///     next.extend_from_slice(b"e-7\n");
///     if kv::compare_and_set("seen", current.as_deref(), &next, None)? {
///         break;
///     }
/// }
/// # Ok::<(), kv::KvError>(())
/// ```
///
/// Needs a host with contract 0.1.1 or later.
pub fn compare_and_set(
    key: &str,
    expected: Option<&[u8]>,
    value: &[u8],
    ttl: Option<Duration>,
) -> Result<bool, KvError> {
    host::kv_compare_and_set(key, expected, value, ttl.map(ttl_ms))
}

/// Whole milliseconds, rounded up so that a short but non-zero ttl does not become
/// "expire now"; saturating far beyond any useful ttl.
fn ttl_ms(ttl: Duration) -> u64 {
    let ms = ttl.as_millis() + u128::from(!ttl.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(ms).unwrap_or(u64::MAX)
}

// The in-memory host these tests use exists on native targets only.
#[cfg(test)]
#[cfg(not(target_arch = "wasm32"))]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn ttls_round_up_to_whole_milliseconds() {
        assert_eq!(ttl_ms(Duration::ZERO), 0);
        assert_eq!(ttl_ms(Duration::from_micros(1)), 1);
        assert_eq!(ttl_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(ttl_ms(Duration::from_nanos(1_500_001)), 2);
        assert_eq!(ttl_ms(Duration::MAX), u64::MAX);
    }

    #[test]
    fn json_values_round_trip() {
        testing::reset();
        set_json("k", &serde_json::json!({"a": [1, 2]}), None).unwrap();
        let v: Option<serde_json::Value> = get_json("k").unwrap();
        assert_eq!(v, Some(serde_json::json!({"a": [1, 2]})));
        assert_eq!(get_json::<u32>("absent").unwrap(), None);
    }

    #[test]
    fn undecodable_values_name_the_key() {
        testing::reset();
        set("k", b"not json", None).unwrap();
        let err = get_json::<serde_json::Value>("k").unwrap_err();
        assert!(
            matches!(err, KvError::Decode { ref key, .. } if key == "k"),
            "{err}"
        );
    }

    #[test]
    fn kv_errors_become_rejects() {
        let failure: Failure = KvError::InvalidKey("keys cannot be empty".into()).into();
        assert_eq!(
            failure,
            Failure::reject("kv: invalid key: keys cannot be empty")
        );
    }

    #[test]
    fn question_mark_works_inside_a_handler() {
        fn handler() -> Result<i64, Failure> {
            Ok(incr("", 1)?)
        }
        testing::reset();
        assert!(handler().unwrap_err().is_reject());
    }
}
