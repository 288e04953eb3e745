//! `kv.*`: durable state in the plugin's own namespace (its name), over whichever
//! [`KvStore`] the host was given.
//!
//! This layer owns the rules every backend shares: key and value size limits, and
//! what a store outage means. A misuse is returned to the plugin as a `kv-error`;
//! an outage traps the call, which fails the event as `kv_unavailable` (retried
//! later) and discards the instance — a plugin can never carry on as if a write it
//! could not make had been made.

use std::sync::Arc;
use std::time::Duration;

use crate::kv::{KvError, KvStore};
use crate::runtime::bindings::switchboard::plugin::kv::{self as wit, Host};
use crate::runtime::store::InstanceState;

/// Longest key, in bytes.
pub const MAX_KEY: usize = 512;
/// Largest value, in bytes.
pub const MAX_VALUE: usize = 1 << 20;

/// The kv capability of one plugin: which store, which namespace.
#[derive(Clone)]
pub(crate) struct KvState {
    pub(crate) store: Arc<dyn KvStore>,
}

/// The error that traps a kv call when the store is unreachable; the runtime
/// recognises it to classify the failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct StoreUnavailable(pub(crate) String);

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

fn check_value(value: &[u8]) -> Result<(), KvError> {
    if value.len() > MAX_VALUE {
        return Err(KvError::TooLarge(format!(
            "value of {} bytes is over the {MAX_VALUE}-byte limit",
            value.len()
        )));
    }
    Ok(())
}

/// The expiry of a value written by the conditional calls. A zero ttl means
/// "expires at once"; stores take 1 ms for it, so the condition is still decided
/// (and answered) by the store, while nobody can read the value afterwards.
fn conditional_ttl(ttl_ms: Option<u64>) -> Option<Duration> {
    ttl_ms.map(|ms| Duration::from_millis(ms.max(1)))
}

impl InstanceState {
    /// Runs one store call in the plugin's namespace and notes the store's
    /// latest write number: the event's outputs wait until a commit covers
    /// what it wrote and what it read (see `KvStore::when_durable`).
    fn kv<T>(
        &mut self,
        call: impl FnOnce(&dyn KvStore, &str) -> Result<T, KvError>,
    ) -> Result<T, KvError> {
        let plugin = &self.plugin;
        let result = call(&*plugin.kv.store, &plugin.name);
        self.kv_mark = self.kv_mark.max(plugin.kv.store.written());
        result
    }
}

impl Host for InstanceState {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, KvError> {
        check_key(&key)?;
        self.kv(|store, ns| store.get(ns, &key))
    }

    fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), KvError> {
        check_key(&key)?;
        check_value(&value)?;
        self.kv(|store, ns| match ttl_ms {
            // Expiring now: what is left to store is nothing.
            Some(0) => store.delete(ns, &key).map(drop),
            ttl => store.set(ns, &key, &value, ttl.map(Duration::from_millis)),
        })
    }

    fn delete(&mut self, key: String) -> Result<bool, KvError> {
        check_key(&key)?;
        self.kv(|store, ns| store.delete(ns, &key))
    }

    fn incr(&mut self, key: String, delta: i64) -> Result<i64, KvError> {
        check_key(&key)?;
        self.kv(|store, ns| store.incr(ns, &key, delta))
    }

    fn set_if_absent(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        check_key(&key)?;
        check_value(&value)?;
        self.kv(|store, ns| store.set_if_absent(ns, &key, &value, conditional_ttl(ttl_ms)))
    }

    fn compare_and_set(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        check_key(&key)?;
        check_value(&value)?;
        self.kv(|store, ns| {
            store.compare_and_set(
                ns,
                &key,
                expected.as_deref(),
                &value,
                conditional_ttl(ttl_ms),
            )
        })
    }

    fn convert_kv_error(&mut self, err: KvError) -> wasmtime::Result<wit::KvError> {
        match err {
            KvError::InvalidKey(m) => Ok(wit::KvError::InvalidKey(m)),
            KvError::TooLarge(m) => Ok(wit::KvError::TooLarge(m)),
            KvError::NotANumber(m) => Ok(wit::KvError::NotANumber(m)),
            KvError::Unavailable(m) => Err(StoreUnavailable(m).into()),
        }
    }
}
