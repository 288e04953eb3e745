//! The embedded bus's timer store: delayed outputs waiting for their time, in
//! one redb file in `state_dir` (`timers.redb`), so that they survive a
//! restart and a crash.
//!
//! - **A timer** is keyed by (due time in ms since the Unix epoch, output id)
//!   and holds the message, its exchange and routing key, and the plugin that
//!   produced it. The ids are kept apart too, so scheduling an output again (a
//!   redelivered input produces the same output ids) keeps the first timer.
//! - **Durability.** [`TimerStore::schedule`] returns once a commit with
//!   fsync covers the timers. Callers that arrive while a commit runs share
//!   the next one (group commit), so concurrent workers pay for one fsync.
//! - **Memory.** Only counts are kept in memory: the timers themselves stay on
//!   disk (redb's page cache is capped at [`CACHE`]), and [`TimerStore::due`]
//!   reads the next ones in due order.
//! - **Firing** is at least once: a timer is removed after its output is
//!   queued, so a crash in between publishes it again, with the same id.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Message, Outgoing};

/// (due ms, output id) → the stored timer.
const TIMERS: TableDefinition<'_, (u64, &str), &[u8]> = TableDefinition::new("timers");
/// Output id → due ms: one timer per output id.
const IDS: TableDefinition<'_, &str, u64> = TableDefinition::new("timer-ids");

/// redb's page cache: the timers are read in order and once, so a small cache
/// keeps 10,000 waiting timers within a few MB of memory.
const CACHE: usize = 2 << 20;

/// A delayed output as stored.
#[derive(Serialize, Deserialize)]
struct Stored {
    plugin: String,
    exchange: String,
    routing_key: String,
    content_type: Option<String>,
    message_id: Option<String>,
    headers: Vec<(String, String)>,
    body_base64: String,
}

/// One delayed output to schedule.
#[derive(Debug, Clone)]
pub struct Timer {
    /// When to publish it, ms since the Unix epoch.
    pub due_ms: u64,
    /// The plugin that produced it.
    pub plugin: String,
    pub output: Outgoing,
}

/// A stored timer by its key and producer: (due ms, output id, plugin).
pub type TimerKey = (u64, String, String);

/// A timer read back: what to publish, or why it could not be read (its key,
/// with the reason in place of the plugin).
pub type Read = Result<DueTimer, TimerKey>;

/// A timer that is due: where it is stored, and what to publish.
#[derive(Debug, Clone)]
pub struct DueTimer {
    pub due_ms: u64,
    pub id: String,
    pub plugin: String,
    pub output: Outgoing,
}

#[derive(Default)]
struct Commits {
    /// Timers waiting for the next commit.
    pending: Vec<Timer>,
    /// The commit the pending timers will be in.
    filling: u64,
    /// The last commit that finished.
    done: u64,
    committing: bool,
    /// Commits that failed, and why (the last few).
    failed: BTreeMap<u64, String>,
}

#[derive(Default)]
struct Counts {
    per_plugin: HashMap<String, usize>,
    /// The earliest due time stored, if known to be exact.
    next_due: Option<u64>,
}

/// Delayed outputs on disk (see the module notes).
pub struct TimerStore {
    /// `None` once closed ([`TimerStore::close`]).
    db: RwLock<Option<Database>>,
    commits: Mutex<Commits>,
    committed: Condvar,
    counts: Mutex<Counts>,
}

impl std::fmt::Debug for TimerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerStore").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn db_error(e: impl Into<redb::Error>) -> String {
    format!("timer store: {}", e.into())
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The due time of a delay starting now.
pub fn due_after(delay: Duration) -> u64 {
    now_ms().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
}

impl TimerStore {
    /// Opens (or creates) the store at `path` and counts what waits there.
    pub fn open(path: &Path) -> Result<Self, String> {
        let db = Database::builder()
            .set_cache_size(CACHE)
            .create(path)
            .map_err(|e| format!("cannot open the timer store {}: {e}", path.display()))?;
        Self::with_db(db)
    }

    /// A store in memory, for a bus without a state folder (tests, tools):
    /// timers work, but do not survive the process.
    pub fn in_memory() -> Result<Self, String> {
        let db = Database::builder()
            .set_cache_size(CACHE)
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(db_error)?;
        Self::with_db(db)
    }

    fn with_db(db: Database) -> Result<Self, String> {
        let txn = db.begin_write().map_err(db_error)?;
        txn.open_table(TIMERS).map_err(db_error)?;
        txn.open_table(IDS).map_err(db_error)?;
        txn.commit().map_err(db_error)?;
        let store = Self {
            db: RwLock::new(Some(db)),
            commits: Mutex::new(Commits::default()),
            committed: Condvar::new(),
            counts: Mutex::new(Counts::default()),
        };
        store.recount()?;
        Ok(store)
    }

    /// The database, `None` once closed.
    fn db(&self) -> RwLockReadGuard<'_, Option<Database>> {
        self.db.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes the store: the file is released at once (for the next start
    /// to open), even while clones of the bus linger; every call after fails.
    pub fn close(&self) {
        self.db
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Whether [`TimerStore::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.db().is_none()
    }

    /// Counts the stored timers per plugin, and finds the earliest.
    fn recount(&self) -> Result<(), String> {
        let guard = self.db();
        let db = open(&guard)?;
        let txn = db.begin_read().map_err(db_error)?;
        let table = txn.open_table(TIMERS).map_err(db_error)?;
        let mut counts = Counts::default();
        for entry in table.iter().map_err(db_error)? {
            let (key, value) = entry.map_err(db_error)?;
            let (due, _) = key.value();
            counts.next_due = Some(counts.next_due.map_or(due, |d: u64| d.min(due)));
            if let Ok(stored) = serde_json::from_slice::<Stored>(value.value()) {
                *counts.per_plugin.entry(stored.plugin).or_default() += 1;
            }
        }
        *lock(&self.counts) = counts;
        Ok(())
    }

    /// Stores `timers`; returns once a commit with fsync covers them. A timer
    /// whose output id is already stored is kept as it was.
    pub fn schedule(&self, timers: Vec<Timer>) -> Result<(), String> {
        if timers.is_empty() {
            return Ok(());
        }
        let mut commits = lock(&self.commits);
        commits.pending.extend(timers);
        let mine = commits.filling + 1;
        loop {
            if commits.done >= mine {
                return match commits.failed.get(&mine) {
                    Some(why) => Err(why.clone()),
                    None => Ok(()),
                };
            }
            if commits.committing {
                commits = self
                    .committed
                    .wait(commits)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Lead: commit everything pending, for everyone waiting.
            commits.committing = true;
            commits.filling += 1;
            let number = commits.filling;
            let batch = std::mem::take(&mut commits.pending);
            drop(commits);
            let result = self.commit(batch);
            commits = lock(&self.commits);
            commits.committing = false;
            commits.done = number;
            if let Err(why) = result {
                commits.failed.insert(number, why);
                while commits.failed.len() > 64 {
                    commits.failed.pop_first();
                }
            }
            self.committed.notify_all();
        }
    }

    fn commit(&self, batch: Vec<Timer>) -> Result<(), String> {
        let mut added: Vec<(String, u64)> = Vec::new();
        let guard = self.db();
        let db = open(&guard)?;
        let txn = db.begin_write().map_err(db_error)?;
        {
            let mut timers = txn.open_table(TIMERS).map_err(db_error)?;
            let mut ids = txn.open_table(IDS).map_err(db_error)?;
            for timer in batch {
                let message = &timer.output.message;
                let id = message
                    .message_id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
                if ids.get(id.as_str()).map_err(db_error)?.is_some() {
                    continue;
                }
                let stored = Stored {
                    plugin: timer.plugin.clone(),
                    exchange: timer.output.exchange.clone(),
                    routing_key: timer.output.routing_key.clone(),
                    content_type: message.content_type.clone(),
                    message_id: message.message_id.clone(),
                    headers: message.headers.clone(),
                    body_base64: base64::engine::general_purpose::STANDARD.encode(&message.body),
                };
                let bytes = serde_json::to_vec(&stored)
                    .map_err(|e| format!("timer store: cannot encode a timer: {e}"))?;
                timers
                    .insert((timer.due_ms, id.as_str()), bytes.as_slice())
                    .map_err(db_error)?;
                ids.insert(id.as_str(), timer.due_ms).map_err(db_error)?;
                added.push((timer.plugin, timer.due_ms));
            }
        }
        txn.commit().map_err(db_error)?;
        let mut counts = lock(&self.counts);
        for (plugin, due) in added {
            *counts.per_plugin.entry(plugin).or_default() += 1;
            counts.next_due = Some(counts.next_due.map_or(due, |d| d.min(due)));
        }
        Ok(())
    }

    /// The earliest due time stored, if any.
    pub fn next_due(&self) -> Option<u64> {
        lock(&self.counts).next_due
    }

    /// Up to `limit` timers due at `now_ms`, earliest first. A stored timer
    /// that cannot be read is returned as a dead one (`Err` with why) so that
    /// it is accounted for and removed.
    pub fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<Read>, String> {
        let guard = self.db();
        let db = open(&guard)?;
        let txn = db.begin_read().map_err(db_error)?;
        let table = txn.open_table(TIMERS).map_err(db_error)?;
        let mut out = Vec::new();
        let mut next = None;
        for entry in table.iter().map_err(db_error)? {
            let (key, value) = entry.map_err(db_error)?;
            let (due_ms, id) = key.value();
            if due_ms > now_ms || out.len() >= limit {
                next = Some(due_ms);
                break;
            }
            out.push(decode(due_ms, id, value.value()));
        }
        if out.is_empty() {
            lock(&self.counts).next_due = next;
        }
        Ok(out)
    }

    /// Removes fired timers (`(due_ms, id, plugin)`).
    pub fn remove(&self, fired: &[TimerKey]) -> Result<(), String> {
        if fired.is_empty() {
            return Ok(());
        }
        let guard = self.db();
        let db = open(&guard)?;
        let txn = db.begin_write().map_err(db_error)?;
        let next = {
            let mut timers = txn.open_table(TIMERS).map_err(db_error)?;
            let mut ids = txn.open_table(IDS).map_err(db_error)?;
            for (due, id, _) in fired {
                timers.remove((*due, id.as_str())).map_err(db_error)?;
                ids.remove(id.as_str()).map_err(db_error)?;
            }
            let first = timers.first().map_err(db_error)?;
            first.map(|(k, _)| k.value().0)
        };
        txn.commit().map_err(db_error)?;
        let mut counts = lock(&self.counts);
        for (_, _, plugin) in fired {
            if let Some(n) = counts.per_plugin.get_mut(plugin) {
                *n = n.saturating_sub(1);
            }
        }
        counts.next_due = next;
        Ok(())
    }

    /// Timers waiting, per plugin that produced them.
    pub fn waiting(&self) -> HashMap<String, usize> {
        lock(&self.counts)
            .per_plugin
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(p, n)| (p.clone(), *n))
            .collect()
    }

    /// Timers waiting in all.
    pub fn len(&self) -> usize {
        lock(&self.counts).per_plugin.values().sum()
    }

    /// Whether no timer waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Timers stored, counted on disk (for tests and checks).
    pub fn stored(&self) -> Result<u64, String> {
        let guard = self.db();
        let db = open(&guard)?;
        let txn = db.begin_read().map_err(db_error)?;
        let table = txn.open_table(TIMERS).map_err(db_error)?;
        table.len().map_err(db_error)
    }
}

/// The database of a store not closed yet.
fn open(db: &Option<Database>) -> Result<&Database, String> {
    db.as_ref()
        .ok_or_else(|| "timer store: closed (the router is stopping)".to_string())
}

fn decode(due_ms: u64, id: &str, bytes: &[u8]) -> Read {
    let bad = |why: String| (due_ms, id.to_string(), why);
    let stored: Stored = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("a stored timer is not readable: {e}")))?;
    let body = base64::engine::general_purpose::STANDARD
        .decode(&stored.body_base64)
        .map_err(|e| bad(format!("a stored timer's body is not base64: {e}")))?;
    Ok(DueTimer {
        due_ms,
        id: id.to_string(),
        plugin: stored.plugin,
        output: Outgoing {
            exchange: stored.exchange,
            routing_key: stored.routing_key,
            message: Message {
                body: body.into(),
                content_type: stored.content_type,
                message_id: stored.message_id,
                headers: stored.headers,
            },
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn timer(id: &str, due_ms: u64, plugin: &str) -> Timer {
        Timer {
            due_ms,
            plugin: plugin.into(),
            output: Outgoing {
                exchange: "shop".into(),
                routing_key: "saga.timeout".into(),
                message: Message {
                    body: bytes::Bytes::from_static(b"{\"order_id\":\"o-1\"}"),
                    content_type: Some("application/json".into()),
                    message_id: Some(id.into()),
                    headers: vec![("switchboard-source".into(), plugin.into())],
                },
            },
        }
    }

    #[test]
    fn timers_come_out_due_in_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timers.redb");
        {
            let store = TimerStore::open(&path).unwrap();
            store
                .schedule(vec![
                    timer("b", 200, "saga"),
                    timer("a", 100, "saga"),
                    timer("c", 300, "other"),
                ])
                .unwrap();
            assert_eq!(store.next_due(), Some(100));
        }
        let store = TimerStore::open(&path).unwrap();
        assert_eq!(store.len(), 3);
        assert_eq!(store.waiting().get("saga"), Some(&2));
        assert_eq!(store.next_due(), Some(100));
        let due: Vec<DueTimer> = store
            .due(250, 10)
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            due.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(&due[0].output.message.body[..], b"{\"order_id\":\"o-1\"}");
        assert_eq!(due[0].output.routing_key, "saga.timeout");
        let fired: Vec<_> = due
            .iter()
            .map(|t| (t.due_ms, t.id.clone(), t.plugin.clone()))
            .collect();
        store.remove(&fired).unwrap();
        assert_eq!(store.next_due(), Some(300));
        assert_eq!(store.waiting().get("saga"), None);
        assert!(store.due(250, 10).unwrap().is_empty());
        assert_eq!(store.stored().unwrap(), 1);
    }

    #[test]
    fn a_closed_store_releases_its_file_for_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timers.redb");
        let first = std::sync::Arc::new(TimerStore::open(&path).unwrap());
        first.schedule(vec![timer("a", 100, "saga")]).unwrap();
        let lingering = first.clone();
        assert!(
            TimerStore::open(&path).is_err(),
            "the file is locked while open"
        );
        first.close();
        assert!(lingering.is_closed());
        assert!(lingering.schedule(vec![timer("b", 100, "saga")]).is_err());
        let second = TimerStore::open(&path).unwrap();
        assert_eq!(second.len(), 1, "what waited is still there");
    }

    #[test]
    fn an_output_scheduled_again_keeps_its_first_timer() {
        let store = TimerStore::in_memory().unwrap();
        store.schedule(vec![timer("a", 100, "saga")]).unwrap();
        store.schedule(vec![timer("a", 900, "saga")]).unwrap();
        assert_eq!(store.len(), 1);
        assert_eq!(store.stored().unwrap(), 1);
        assert_eq!(store.due(100, 10).unwrap().len(), 1);
    }

    #[test]
    fn concurrent_schedulers_all_get_their_timers_stored() {
        let store = std::sync::Arc::new(TimerStore::in_memory().unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        store
                            .schedule(vec![timer(&format!("{t}-{i}"), 1000 + i, "saga")])
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(store.stored().unwrap(), 400);
        assert_eq!(store.len(), 400);
    }
}
