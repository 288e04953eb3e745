//! The default store: one redb file on local disk, shared by all plugins.
//!
//! Keys are `(namespace, key)`; values carry their expiry (ms since the Unix epoch,
//! 0 = none). Expired values read as absent and are swept lazily by writes and by
//! [`EmbeddedStore::purge_expired`]. Every write commits durably before it returns:
//! a plugin that saw its write succeed can rely on it after a crash, which is what
//! at-least-once handling needs.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{KvError, KvStore, add_counter, parse_counter};

const ENTRIES: TableDefinition<'_, (&str, &str), (u64, &[u8])> = TableDefinition::new("kv");

/// A redb-backed [`KvStore`].
pub struct EmbeddedStore {
    db: Database,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

fn unavailable(e: impl Into<redb::Error>) -> KvError {
    KvError::Unavailable(e.into().to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn expiry(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |ttl| {
        now_ms()
            .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
            .max(1)
    })
}

fn live(expires_at: u64, now: u64) -> bool {
    expires_at == 0 || expires_at > now
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`, creating parent folders.
    pub fn open(path: &Path) -> Result<Self, KvError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                KvError::Unavailable(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let db = Database::create(path)
            .map_err(|e| KvError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let store = Self { db };
        // Make sure the table exists so that reads never race its creation.
        let txn = store.db.begin_write().map_err(unavailable)?;
        txn.open_table(ENTRIES).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        Ok(store)
    }

    /// Removes every expired entry; returns how many.
    pub fn purge_expired(&self) -> Result<usize, KvError> {
        let now = now_ms();
        let txn = self.db.begin_write().map_err(unavailable)?;
        let mut removed = 0;
        {
            let mut table = txn.open_table(ENTRIES).map_err(unavailable)?;
            table
                .retain(|_, (expires_at, _)| {
                    let keep = live(expires_at, now);
                    removed += usize::from(!keep);
                    keep
                })
                .map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)?;
        Ok(removed)
    }
}

impl KvStore for EmbeddedStore {
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        let table = txn.open_table(ENTRIES).map_err(unavailable)?;
        let found = table.get((namespace, key)).map_err(unavailable)?;
        Ok(found.and_then(|guard| {
            let (expires_at, value) = guard.value();
            live(expires_at, now_ms()).then(|| value.to_vec())
        }))
    }

    fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), KvError> {
        let txn = self.db.begin_write().map_err(unavailable)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(unavailable)?;
            table
                .insert((namespace, key), (expiry(ttl), value))
                .map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)
    }

    fn delete(&self, namespace: &str, key: &str) -> Result<bool, KvError> {
        let txn = self.db.begin_write().map_err(unavailable)?;
        let was_live = {
            let mut table = txn.open_table(ENTRIES).map_err(unavailable)?;
            let removed = table.remove((namespace, key)).map_err(unavailable)?;
            removed.is_some_and(|guard| live(guard.value().0, now_ms()))
        };
        txn.commit().map_err(unavailable)?;
        Ok(was_live)
    }

    fn incr(&self, namespace: &str, key: &str, delta: i64) -> Result<i64, KvError> {
        let txn = self.db.begin_write().map_err(unavailable)?;
        let next = {
            let mut table = txn.open_table(ENTRIES).map_err(unavailable)?;
            let (expires_at, current) = match table.get((namespace, key)).map_err(unavailable)? {
                Some(guard) => {
                    let (expires_at, value) = guard.value();
                    if live(expires_at, now_ms()) {
                        (expires_at, parse_counter(key, value)?)
                    } else {
                        (0, 0)
                    }
                }
                None => (0, 0),
            };
            let next = add_counter(key, current, delta)?;
            table
                .insert((namespace, key), (expires_at, next.to_string().as_bytes()))
                .map_err(unavailable)?;
            next
        };
        txn.commit().map_err(unavailable)?;
        Ok(next)
    }

    fn set_if_absent(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, KvError> {
        self.compare_and_set(namespace, key, None, value, ttl)
    }

    fn compare_and_set(
        &self,
        namespace: &str,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, KvError> {
        // redb runs one write transaction at a time: the read and the write below
        // are one atomic step for every other caller.
        let txn = self.db.begin_write().map_err(unavailable)?;
        let swapped = {
            let mut table = txn.open_table(ENTRIES).map_err(unavailable)?;
            let matches = {
                let found = table.get((namespace, key)).map_err(unavailable)?;
                let current = found.as_ref().and_then(|guard| {
                    let (expires_at, value) = guard.value();
                    live(expires_at, now_ms()).then_some(value)
                });
                current == expected
            };
            if matches {
                table
                    .insert((namespace, key), (expiry(ttl), value))
                    .map_err(unavailable)?;
            }
            matches
        };
        if swapped {
            txn.commit().map_err(unavailable)?;
        } else {
            txn.abort().map_err(unavailable)?;
        }
        Ok(swapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("state/kv.redb")).unwrap();
        crate::kv::conformance::all(&store);
    }

    #[test]
    fn state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            store.set("billing", "bill:1", b"open", None).unwrap();
            store.incr("analytics", "count", 3).unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(
            store.get("billing", "bill:1").unwrap().as_deref(),
            Some(&b"open"[..])
        );
        assert_eq!(store.incr("analytics", "count", 1).unwrap(), 4);
    }

    #[test]
    fn purge_removes_only_expired() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("kv.redb")).unwrap();
        store
            .set("p", "gone", b"1", Some(Duration::from_millis(10)))
            .unwrap();
        store.set("p", "kept", b"2", None).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(store.purge_expired().unwrap(), 1);
        assert!(store.get("p", "kept").unwrap().is_some());
    }
}
