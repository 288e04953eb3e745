//! A scratch copy of plugin state: reads see the live store (if any) until a
//! key is written here; writes stay here. What a replay writes never reaches
//! the live state, and [`ScratchStore::changes`] says which keys it touched.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::kv::{KvError, KvStore, add_counter, parse_counter};

/// One namespace's keys as a replay left them: `Some(value)` written, `None`
/// deleted (or expired).
pub type Changes = BTreeMap<String, Option<Vec<u8>>>;

/// A value and when it expires.
type Entry = (Vec<u8>, Option<Instant>);
/// A key as this scratch holds it: `None` = deleted here.
type Slot = Option<Entry>;
type Local = BTreeMap<(String, String), Slot>;

/// Copy-on-write over an optional base store.
pub struct ScratchStore {
    base: Option<Arc<dyn KvStore>>,
    local: Mutex<Local>,
}

impl ScratchStore {
    /// A scratch that starts as `base` (or empty) and never writes to it.
    pub fn over(base: Option<Arc<dyn KvStore>>) -> Self {
        Self {
            base,
            local: Mutex::new(BTreeMap::new()),
        }
    }

    /// What was written or deleted in `namespace`, by key.
    pub fn changes(&self, namespace: &str) -> Changes {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|((_, key), slot)| (key.clone(), live(slot.as_ref(), now).map(|(v, _)| v)))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Local> {
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The live value and its expiry as this scratch sees them, with the map
    /// locked (so that check-and-write operations are atomic). Values read
    /// from the base have no expiry here.
    fn current(&self, local: &Local, namespace: &str, key: &str) -> Result<Option<Entry>, KvError> {
        match local.get(&(namespace.to_string(), key.to_string())) {
            Some(slot) => Ok(live(slot.as_ref(), Instant::now())),
            None => match &self.base {
                Some(base) => Ok(base.get(namespace, key)?.map(|v| (v, None))),
                None => Ok(None),
            },
        }
    }

    fn put(local: &mut Local, namespace: &str, key: &str, value: &[u8], ttl: Option<Duration>) {
        let expires = ttl.map(|ttl| Instant::now() + ttl);
        local.insert(
            (namespace.into(), key.into()),
            Some((value.to_vec(), expires)),
        );
    }
}

fn live(
    slot: Option<&(Vec<u8>, Option<Instant>)>,
    now: Instant,
) -> Option<(Vec<u8>, Option<Instant>)> {
    slot.filter(|(_, expires)| expires.is_none_or(|at| at > now))
        .cloned()
}

impl KvStore for ScratchStore {
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let local = self.lock();
        Ok(self.current(&local, namespace, key)?.map(|(v, _)| v))
    }

    fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), KvError> {
        Self::put(&mut self.lock(), namespace, key, value, ttl);
        Ok(())
    }

    fn delete(&self, namespace: &str, key: &str) -> Result<bool, KvError> {
        let mut local = self.lock();
        let was = self.current(&local, namespace, key)?.is_some();
        local.insert((namespace.into(), key.into()), None);
        Ok(was)
    }

    fn incr(&self, namespace: &str, key: &str, delta: i64) -> Result<i64, KvError> {
        let mut local = self.lock();
        let (current, expires) = match self.current(&local, namespace, key)? {
            Some((raw, expires)) => (parse_counter(key, &raw)?, expires),
            None => (0, None),
        };
        let next = add_counter(key, current, delta)?;
        local.insert(
            (namespace.into(), key.into()),
            Some((next.to_string().into_bytes(), expires)),
        );
        Ok(next)
    }

    fn set_if_absent(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, KvError> {
        let mut local = self.lock();
        if self.current(&local, namespace, key)?.is_some() {
            return Ok(false);
        }
        Self::put(&mut local, namespace, key, value, ttl);
        Ok(true)
    }

    fn compare_and_set(
        &self,
        namespace: &str,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, KvError> {
        let mut local = self.lock();
        let current = self.current(&local, namespace, key)?;
        if current.as_ref().map(|(v, _)| v.as_slice()) != expected {
            return Ok(false);
        }
        Self::put(&mut local, namespace, key, value, ttl);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::EmbeddedStore;

    #[test]
    fn behaves_as_a_store() {
        crate::kv::conformance::all(&ScratchStore::over(None));
    }

    #[test]
    fn reads_the_base_and_never_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let base: Arc<dyn KvStore> =
            Arc::new(EmbeddedStore::open(&dir.path().join("kv.redb")).unwrap());
        base.set("orders", "a", b"1", None).unwrap();
        base.set("orders", "b", b"2", None).unwrap();
        let scratch = ScratchStore::over(Some(base.clone()));
        assert_eq!(
            scratch.get("orders", "a").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        assert!(
            scratch
                .compare_and_set("orders", "a", Some(b"1"), b"9", None)
                .unwrap()
        );
        assert!(scratch.delete("orders", "b").unwrap());
        assert_eq!(scratch.incr("orders", "n", 2).unwrap(), 2);
        assert_eq!(scratch.get("orders", "b").unwrap(), None);
        assert_eq!(base.get("orders", "a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(base.get("orders", "b").unwrap().as_deref(), Some(&b"2"[..]));
        let changes = scratch.changes("orders");
        assert_eq!(changes.len(), 3);
        assert_eq!(changes["a"].as_deref(), Some(&b"9"[..]));
        assert_eq!(changes["b"], None);
        assert!(scratch.changes("billing").is_empty());
    }
}
