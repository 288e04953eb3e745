//! The default store: one redb file on local disk (`kv.redb`), shared by all
//! plugins, with a write-ahead log beside it (`kv.wal`).
//!
//! Keys are `(namespace, key)`; values carry their expiry (ms since the Unix epoch,
//! 0 = none). Expired values read as absent and are swept by
//! [`EmbeddedStore::purge_expired`].
//!
//! # Group commit
//!
//! A write is applied in memory (every reader sees it at once) and appended, as
//! the value it leaves (never as the operation, so replaying it twice is
//! harmless), to a log buffer. A committer thread writes the buffer to
//! `kv.wal` and fsyncs it: one fsync for every write made since the last one,
//! over and over while writes come, and writers never wait for it. Each write
//! takes a number ([`KvStore::written`]); [`KvStore::when_durable`] runs a
//! callback once an fsync covers a number. The dispatcher publishes an event's
//! outputs and acks it only then, so an acked event's writes survive a crash
//! (as when every write was its own fsync), while events handled at the same
//! time share one fsync. A crash takes back only writes of events not yet acked,
//! which the broker delivers again.
//!
//! About once a second (sooner when many keys wait), the committer moves what
//! is in memory into `kv.redb` in one transaction, with the number of the last
//! write it holds, and empties the log. Opening the store replays the log's
//! writes numbered past that into `kv.redb`; a torn or corrupt record at the end
//! of the log (a crash in the middle of a write) ends the replay there, and is
//! logged. Every record carries a CRC-32 of its content.
//!
//! Dropping the store writes everything into `kv.redb` before it returns.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{KvError, KvStore, OnDurable, add_counter, parse_counter};

const ENTRIES: TableDefinition<'_, (&str, &str), (u64, &[u8])> = TableDefinition::new("kv");

/// `checkpoint`: the number of the last write `kv.redb` holds.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("kv-meta");
const CHECKPOINT: &str = "checkpoint";

/// How often what is in memory moves into `kv.redb`, and how many keys may
/// wait in memory before it moves sooner.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
const CHECKPOINT_KEYS: usize = 50_000;

/// A redb-backed [`KvStore`] with a write-ahead log (see the module notes).
pub struct EmbeddedStore {
    db: Arc<Database>,
    shared: Arc<Shared>,
    committer: Option<JoinHandle<()>>,
    settler: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

/// A value and its expiry (0: none).
type Stored = (u64, Vec<u8>);

/// `(namespace, key)`.
type Key = (String, String);

/// A key's latest value in memory (`None`: deleted), and the write that left it.
type Recent = (Option<Stored>, u64);

/// What the writers, the readers and the committer share.
struct Shared {
    state: Mutex<State>,
    /// Wakes the committer: a write, a waiter, or the store closing.
    wake: Condvar,
    /// The number of the latest write (`State::written`, readable without the lock).
    written: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Writes not yet in `kv.redb`: each key's latest value (`None`: deleted),
    /// with the number of the write that left it.
    recent: HashMap<Key, Recent>,
    /// Log records not yet written to `kv.wal`.
    log: Vec<u8>,
    /// The number of the latest write.
    written: u64,
    /// Every write numbered up to this is in `kv.wal`, fsynced.
    durable: u64,
    /// Callbacks waiting for an fsync, with the write number each waits for.
    waiting: Vec<(u64, OnDurable)>,
    closing: bool,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Callbacks an fsync covered, with how it went; they run on the settler
/// thread, since what they do (publish, ack) may wait for room in a queue and
/// must never hold up the next fsync.
type Ready = (Vec<OnDurable>, Result<(), KvError>);

fn unavailable(e: impl Into<redb::Error>) -> KvError {
    KvError::Unavailable(e.into().to_string())
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> KvError {
    KvError::Unavailable(format!("cannot {what} {}: {e}", path.display()))
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

// --- The log ---------------------------------------------------------------------

/// One logged write: the value a key was left with (`None`: deleted).
#[derive(Debug, PartialEq, Eq)]
struct Record {
    number: u64,
    namespace: String,
    key: String,
    value: Option<Stored>,
}

impl Record {
    /// `[length u32][crc32 u32][number u64][kind u8][expiry u64]`
    /// `[namespace: u16 length, bytes][key: u16 length, bytes][value: u32 length, bytes]`,
    /// little-endian; the CRC covers what follows it.
    fn append(number: u64, namespace: &str, key: &str, value: Option<&Stored>, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&number.to_le_bytes());
        let (kind, expires_at, bytes): (u8, u64, &[u8]) = match value {
            Some((expires_at, bytes)) => (1, *expires_at, bytes),
            None => (0, 0, &[]),
        };
        out.push(kind);
        out.extend_from_slice(&expires_at.to_le_bytes());
        // Lengths were checked by the kv capability (keys ≤ 512 bytes, values ≤ 1 MiB;
        // namespaces are plugin names).
        for part in [namespace.as_bytes(), key.as_bytes()] {
            out.extend_from_slice(&u16::try_from(part.len()).unwrap_or(u16::MAX).to_le_bytes());
            out.extend_from_slice(part);
        }
        out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(bytes);
        let body = start + 8;
        let length = u32::try_from(out.len() - body).unwrap_or(u32::MAX);
        let crc = crc32fast::hash(&out[body..]);
        out[start..start + 4].copy_from_slice(&length.to_le_bytes());
        out[start + 4..body].copy_from_slice(&crc.to_le_bytes());
    }

    /// The records of a log, and where the valid part ends (short of the end
    /// when the last record is torn or corrupt).
    fn read_all(log: &[u8]) -> (Vec<Self>, usize) {
        let mut records = Vec::new();
        let mut at = 0;
        while let Some((record, next)) = Self::read(log, at) {
            records.push(record);
            at = next;
        }
        (records, at)
    }

    fn read(log: &[u8], at: usize) -> Option<(Self, usize)> {
        let word = |i: usize| -> Option<[u8; 4]> { log.get(i..i + 4)?.try_into().ok() };
        let length = usize::try_from(u32::from_le_bytes(word(at)?)).ok()?;
        let crc = u32::from_le_bytes(word(at + 4)?);
        let body = log.get(at + 8..at + 8 + length)?;
        if crc32fast::hash(body) != crc {
            return None;
        }
        let mut cursor = body;
        let mut take = |n: usize| -> Option<&[u8]> {
            let (head, rest) = cursor.split_at_checked(n)?;
            cursor = rest;
            Some(head)
        };
        let number = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let kind = take(1)?[0];
        let expires_at = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let mut text = || -> Option<String> {
            let n = usize::from(u16::from_le_bytes(take(2)?.try_into().ok()?));
            String::from_utf8(take(n)?.to_vec()).ok()
        };
        let namespace = text()?;
        let key = text()?;
        let n = usize::try_from(u32::from_le_bytes(take(4)?.try_into().ok()?)).ok()?;
        let bytes = take(n)?.to_vec();
        let value = (kind == 1).then_some((expires_at, bytes));
        Some((
            Self {
                number,
                namespace,
                key,
                value,
            },
            at + 8 + length,
        ))
    }
}

/// The log file, appended to by the committer alone.
struct Wal {
    path: PathBuf,
    file: File,
    /// Its length after the last good write: a failed write is cut back to it,
    /// so that no half record sits before later ones.
    length: u64,
}

impl Wal {
    fn append(&mut self, bytes: &[u8]) -> Result<(), KvError> {
        let written = self
            .file
            .write_all(bytes)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.length += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.length);
                Err(io_error("write", &self.path, &e))
            }
        }
    }

    /// Empties the log (its writes are all in `kv.redb`).
    fn clear(&mut self) -> Result<(), KvError> {
        self.file
            .set_len(0)
            .and_then(|()| self.file.sync_all())
            .map_err(|e| io_error("truncate", &self.path, &e))?;
        self.length = 0;
        Ok(())
    }
}

// --- The store ---------------------------------------------------------------------

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path` and its log beside it
    /// (`<path>` with extension `wal`), replaying what the log holds.
    pub fn open(path: &Path) -> Result<Self, KvError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                KvError::Unavailable(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let db = Database::create(path)
            .map_err(|e| KvError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let wal_path = path.with_extension("wal");
        let (wal, written) = recover(&db, &wal_path)?;

        let db = Arc::new(db);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                written,
                durable: written,
                ..State::default()
            }),
            wake: Condvar::new(),
            written: AtomicU64::new(written),
        });
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded::<Ready>();
        let settler = std::thread::Builder::new()
            .name("kv-settle".into())
            .spawn(move || {
                for (callbacks, result) in ready_rx {
                    for then in callbacks {
                        then(result.clone());
                    }
                }
            })
            .map_err(|e| KvError::Unavailable(format!("cannot start the kv settler: {e}")))?;
        let committer = {
            let (db, shared) = (db.clone(), shared.clone());
            std::thread::Builder::new()
                .name("kv-commit".into())
                .spawn(move || {
                    Committer {
                        db,
                        shared,
                        wal,
                        ready: ready_tx,
                    }
                    .run()
                })
                .map_err(|e| KvError::Unavailable(format!("cannot start the kv committer: {e}")))?
        };
        Ok(Self {
            db,
            shared,
            committer: Some(committer),
            settler: Some(settler),
        })
    }

    /// Removes every expired entry from `kv.redb`; returns how many.
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

    /// The live value under a key: the latest write in memory, else `kv.redb`.
    fn current(
        &self,
        state: &State,
        namespace: &str,
        key: &str,
    ) -> Result<Option<Stored>, KvError> {
        let now = now_ms();
        let found = match state.recent.get(&(namespace.to_string(), key.to_string())) {
            Some((value, _)) => value.clone(),
            None => {
                let txn = self.db.begin_read().map_err(unavailable)?;
                let table = txn.open_table(ENTRIES).map_err(unavailable)?;
                let found = table.get((namespace, key)).map_err(unavailable)?;
                found.map(|guard| {
                    let (expires_at, value) = guard.value();
                    (expires_at, value.to_vec())
                })
            }
        };
        Ok(found.filter(|(expires_at, _)| live(*expires_at, now)))
    }

    /// One atomic read-and-write: `decide` sees the live value and says what to
    /// return and what the key becomes (`None`: unchanged; `Some(None)`:
    /// deleted). Writers take turns on the lock; none waits for a disk.
    fn write<T>(
        &self,
        namespace: &str,
        key: &str,
        decide: impl FnOnce(Option<&Stored>) -> Result<(T, Option<Option<Stored>>), KvError>,
    ) -> Result<T, KvError> {
        let mut state = lock(&self.shared.state);
        let current = self.current(&state, namespace, key)?;
        let (answer, change) = decide(current.as_ref())?;
        if let Some(value) = change {
            state.written += 1;
            let number = state.written;
            Record::append(number, namespace, key, value.as_ref(), &mut state.log);
            state
                .recent
                .insert((namespace.to_string(), key.to_string()), (value, number));
            self.shared.written.store(number, Ordering::SeqCst);
            drop(state);
            self.shared.wake.notify_one();
        }
        Ok(answer)
    }
}

/// Writes what a key was left with into `kv.redb` (`None`: deleted).
fn store(
    table: &mut redb::Table<'_, (&str, &str), (u64, &[u8])>,
    namespace: &str,
    key: &str,
    value: Option<&Stored>,
) -> Result<(), KvError> {
    let at = (namespace, key);
    match value {
        Some((expires_at, bytes)) => table
            .insert(at, (*expires_at, bytes.as_slice()))
            .map(drop)
            .map_err(unavailable),
        None => table.remove(at).map(drop).map_err(unavailable),
    }
}

/// Replays the log into `kv.redb` (the writes numbered past its checkpoint, up
/// to the first bad record), empties it, and returns it with the number of the
/// last write.
fn recover(db: &Database, path: &Path) -> Result<(Wal, u64), KvError> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(|e| io_error("open", path, &e))?;
    let mut log = Vec::new();
    file.read_to_end(&mut log)
        .map_err(|e| io_error("read", path, &e))?;
    let (records, valid) = Record::read_all(&log);

    let txn = db.begin_write().map_err(unavailable)?;
    let mut last;
    {
        let mut meta = txn.open_table(META).map_err(unavailable)?;
        last = meta
            .get(CHECKPOINT)
            .map_err(unavailable)?
            .map_or(0, |guard| guard.value());
        let checkpoint = last;
        let mut table = txn.open_table(ENTRIES).map_err(unavailable)?;
        for record in records.iter().filter(|r| r.number > checkpoint) {
            store(
                &mut table,
                &record.namespace,
                &record.key,
                record.value.as_ref(),
            )?;
            last = last.max(record.number);
        }
        meta.insert(CHECKPOINT, last).map_err(unavailable)?;
    }
    txn.commit().map_err(unavailable)?;
    if valid < log.len() {
        tracing::warn!(
            log = %path.display(),
            replayed = records.len(),
            dropped_bytes = log.len() - valid,
            "kv store: the log ends in a torn or corrupt record (a crash during a write); \
             recovered up to the last good record"
        );
    } else if !records.is_empty() {
        tracing::info!(log = %path.display(), replayed = records.len(), "kv store: replayed the log");
    }
    let mut wal = Wal {
        path: path.to_path_buf(),
        file,
        length: log.len() as u64,
    };
    wal.clear()?;
    Ok((wal, last))
}

/// The committer thread: fsyncs the log, tells the waiters, and now and then
/// moves what is in memory into `kv.redb`.
struct Committer {
    db: Arc<Database>,
    shared: Arc<Shared>,
    wal: Wal,
    ready: crossbeam_channel::Sender<Ready>,
}

impl Committer {
    fn run(mut self) {
        let mut last_checkpoint = Instant::now();
        loop {
            let (log, target, closing, keys) = {
                let mut state = lock(&self.shared.state);
                while state.log.is_empty()
                    && !state.closing
                    && (state.recent.is_empty() || last_checkpoint.elapsed() < CHECKPOINT_EVERY)
                {
                    let wait = CHECKPOINT_EVERY.saturating_sub(last_checkpoint.elapsed());
                    state = self
                        .shared
                        .wake
                        .wait_timeout(state, wait.max(Duration::from_millis(10)))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                (
                    std::mem::take(&mut state.log),
                    state.written,
                    state.closing,
                    state.recent.len(),
                )
            };
            if !log.is_empty() {
                self.flush(log, target);
            }
            if closing || keys >= CHECKPOINT_KEYS || last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                if let Err(e) = self.checkpoint() {
                    tracing::error!(error = %e, "kv store: cannot move writes into kv.redb; they stay in the log");
                }
                last_checkpoint = Instant::now();
            }
            // Closing: nobody writes any more (the store is being dropped).
            if closing {
                return;
            }
        }
    }

    /// Writes and fsyncs `log` (every write up to `target`), then tells whoever
    /// waits for those writes. If the disk refuses, they are told so (their
    /// events are retried) and the records go back to be written next time.
    fn flush(&mut self, log: Vec<u8>, target: u64) {
        let result = self.wal.append(&log);
        let covered: Vec<OnDurable> = {
            let mut state = lock(&self.shared.state);
            if result.is_ok() {
                state.durable = target;
            } else {
                let later = std::mem::replace(&mut state.log, log);
                state.log.extend_from_slice(&later);
            }
            let (covered, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut state.waiting)
                .into_iter()
                .partition(|(mark, _)| *mark <= target);
            state.waiting = rest;
            covered.into_iter().map(|(_, then)| then).collect()
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "kv store: the log cannot be written; the events that wrote are retried");
            std::thread::sleep(Duration::from_millis(100));
        }
        if !covered.is_empty() {
            let _ = self.ready.send((covered, result));
        }
    }

    /// Moves every write in memory into `kv.redb` (one transaction, with the
    /// number of the last one), then empties the log: all it holds is in there.
    fn checkpoint(&mut self) -> Result<(), KvError> {
        let (snapshot, upto) = {
            let state = lock(&self.shared.state);
            if state.recent.is_empty() {
                return Ok(());
            }
            let snapshot: Vec<(Key, Recent)> = state
                .recent
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (snapshot, state.written)
        };
        let txn = self.db.begin_write().map_err(unavailable)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(unavailable)?;
            for ((namespace, key), (value, _)) in &snapshot {
                store(&mut table, namespace, key, value.as_ref())?;
            }
            let mut meta = txn.open_table(META).map_err(unavailable)?;
            meta.insert(CHECKPOINT, upto).map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)?;
        {
            let mut state = lock(&self.shared.state);
            for (key, (_, number)) in snapshot {
                if state.recent.get(&key).is_some_and(|(_, n)| *n == number) {
                    state.recent.remove(&key);
                }
            }
        }
        // Every record in the file is numbered at most `upto`: all in kv.redb
        // now. (Records still in memory are written to the emptied file later;
        // replaying one that kv.redb already holds is skipped by its number.)
        self.wal.clear()
    }
}

impl KvStore for EmbeddedStore {
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let state = lock(&self.shared.state);
        Ok(self
            .current(&state, namespace, key)?
            .map(|(_, value)| value))
    }

    fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), KvError> {
        self.write(namespace, key, |_| {
            Ok(((), Some(Some((expiry(ttl), value.to_vec())))))
        })
    }

    fn delete(&self, namespace: &str, key: &str) -> Result<bool, KvError> {
        self.write(namespace, key, |current| match current {
            Some(_) => Ok((true, Some(None))),
            None => Ok((false, None)),
        })
    }

    fn incr(&self, namespace: &str, key: &str, delta: i64) -> Result<i64, KvError> {
        self.write(namespace, key, |current| {
            let (expires_at, value) = match current {
                Some((expires_at, raw)) => (*expires_at, parse_counter(key, raw)?),
                None => (0, 0),
            };
            let next = add_counter(key, value, delta)?;
            Ok((
                next,
                Some(Some((expires_at, next.to_string().into_bytes()))),
            ))
        })
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
        self.write(namespace, key, |current| {
            if current.map(|(_, v)| v.as_slice()) == expected {
                Ok((true, Some(Some((expiry(ttl), value.to_vec())))))
            } else {
                Ok((false, None))
            }
        })
    }

    fn written(&self) -> u64 {
        self.shared.written.load(Ordering::SeqCst)
    }

    fn when_durable(&self, mark: u64, then: OnDurable) {
        let mut state = lock(&self.shared.state);
        if mark <= state.durable {
            drop(state);
            then(Ok(()));
            return;
        }
        state.waiting.push((mark, then));
        drop(state);
        self.shared.wake.notify_one();
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        lock(&self.shared.state).closing = true;
        self.shared.wake.notify_one();
        // The committer leaves once everything is in kv.redb; the settler once
        // the committer (the only sender) is gone and the last callbacks ran.
        // (A callback on the settler may hold the last handle on this store:
        // that thread is not waited for by itself.)
        let me = std::thread::current().id();
        for thread in [self.committer.take(), self.settler.take()]
            .into_iter()
            .flatten()
            .filter(|thread| thread.thread().id() != me)
        {
            let _ = thread.join();
        }
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

    /// A log as a crash leaves it: records, then half a record.
    fn crashed_log(path: &Path, records: &[(u64, &str, Option<&str>)], torn: bool) {
        let mut log = Vec::new();
        for (number, key, value) in records {
            let value = value.map(|v| (0, v.as_bytes().to_vec()));
            Record::append(*number, "p", key, value.as_ref(), &mut log);
        }
        if torn {
            let mut last = Vec::new();
            Record::append(99, "p", "torn", Some(&(0, b"never".to_vec())), &mut last);
            log.extend_from_slice(&last[..last.len() / 2]);
        }
        std::fs::write(path, log).unwrap();
    }

    #[test]
    fn records_round_trip_and_a_corrupt_one_ends_the_log() {
        let mut log = Vec::new();
        Record::append(
            1,
            "billing",
            "bill:1",
            Some(&(7, b"open".to_vec())),
            &mut log,
        );
        Record::append(2, "billing", "bill:2", None, &mut log);
        let end = log.len();
        Record::append(
            3,
            "billing",
            "bill:3",
            Some(&(0, b"paid".to_vec())),
            &mut log,
        );
        let (records, valid) = Record::read_all(&log);
        assert_eq!(records.len(), 3);
        assert_eq!(valid, log.len());
        assert_eq!(records[0].value, Some((7, b"open".to_vec())));
        assert_eq!(records[1].value, None);
        // A flipped byte in the last record: the log ends before it.
        let last = log.len() - 1;
        log[last] ^= 1;
        let (records, valid) = Record::read_all(&log);
        assert_eq!((records.len(), valid), (2, end));
    }

    #[test]
    fn opening_replays_the_log_up_to_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        drop(EmbeddedStore::open(&path).unwrap());
        crashed_log(
            &path.with_extension("wal"),
            &[
                (1, "a", Some("1")),
                (2, "b", Some("2")),
                (3, "a", None),
                (4, "c", Some("4")),
            ],
            true,
        );
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.get("p", "a").unwrap(), None, "deleted by record 3");
        assert_eq!(store.get("p", "b").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(store.get("p", "c").unwrap().as_deref(), Some(&b"4"[..]));
        assert_eq!(store.get("p", "torn").unwrap(), None);
        assert!(
            store.written() >= 4,
            "numbers go on after the replayed ones"
        );
        // The replay is in kv.redb and the log is empty.
        drop(store);
        assert_eq!(
            std::fs::metadata(path.with_extension("wal")).unwrap().len(),
            0
        );
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.get("p", "c").unwrap().as_deref(), Some(&b"4"[..]));
    }

    #[test]
    fn records_kv_redb_already_holds_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            for _ in 0..5 {
                store.incr("p", "n", 1).unwrap();
            }
        }
        // A crash between a checkpoint (n = 5, write 5) and emptying the log:
        // the log still holds an older value of n.
        crashed_log(&path.with_extension("wal"), &[(3, "n", Some("3"))], false);
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.incr("p", "n", 0).unwrap(), 5);
    }

    #[test]
    fn a_write_is_durable_once_when_durable_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        store.set("p", "k", b"v", None).unwrap();
        let mark = store.written();
        assert!(mark > 0);
        let (tx, rx) = std::sync::mpsc::channel();
        store.when_durable(mark, Box::new(move |r| tx.send(r).unwrap()));
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        // Durable means in the log on disk: replaying that log alone gives it.
        let log = std::fs::read(path.with_extension("wal")).unwrap();
        let (records, _) = Record::read_all(&log);
        let in_redb = store
            .db
            .begin_read()
            .unwrap()
            .open_table(ENTRIES)
            .unwrap()
            .get(("p", "k"))
            .unwrap()
            .is_some();
        assert!(
            in_redb || records.iter().any(|r| r.key == "k" && r.number == mark),
            "write {mark} neither in the log nor in kv.redb"
        );
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
        // Purging sweeps kv.redb: let the writes reach it first.
        drop(store);
        let store = EmbeddedStore::open(&dir.path().join("kv.redb")).unwrap();
        assert_eq!(store.purge_expired().unwrap(), 1);
        assert!(store.get("p", "kept").unwrap().is_some());
    }
}
