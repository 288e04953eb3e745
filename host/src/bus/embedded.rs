//! The embedded bus: exchanges, bindings and one bounded queue per plugin, all in
//! this process. It is what `switchboard run` uses when no broker is configured.
//!
//! - Publishing is all-or-nothing: under one lock, every destination queue is
//!   checked for room before anything is enqueued. A full queue refuses the whole
//!   batch ([`BusError::Full`]); the HTTP ingress turns that into 503, plugin
//!   workers wait and try again. Nothing is ever dropped for lack of room.
//! - Retries wait in a timer heap and go back to the one plugin's queue when due.
//! - Delayed outputs wait in the [`TimerStore`] (on disk, in `state_dir`, for
//!   the appliance) and are published when due, by their own thread.
//! - Dead letters are kept per plugin, with the reason, for inspection and
//!   re-drive, as long as `[broker] dlq_ttl` and `dlq_max_length` say (by
//!   default 100000 per plugin, for ever).
//! - Every published message is also offered to stream watchers (SSE), who may
//!   lag and miss some; the queues never do.
//!
//! Everything lives in memory: [`EmbeddedBus::drain`] waits for queues and
//! in-flight deliveries to empty on shutdown, and [`EmbeddedBus::pending`] hands
//! over what could not be delivered before the deadline (waiting retries).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde::Serialize;

use super::timers::{Timer, TimerStore, now_ms};
use super::{
    Bus, BusError, Delivered, Delivery, FailureInfo, OnSettled, Outgoing, Settle, Settled,
    Settlement, Topology,
};
pub use super::{DeadLetter, Published};
use crate::config::DlqRetention;
use crate::route::{ExchangeKind, RouteTable};

/// Dead letters kept per plugin when `[broker] dlq_max_length` is not set; past
/// this the oldest are discarded, loudly.
const MAX_DEAD_LETTERS: u64 = 100_000;

/// Counters of one plugin queue. `received = acked + dead_lettered + depth +
/// in_flight + waiting_retries` at every quiet moment.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages enqueued from publishes (not counting retries or re-drives).
    pub received: u64,
    pub acked: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub redriven: u64,
    /// Messages waiting in the queue.
    pub depth: usize,
    /// Delivered to a worker, not settled yet.
    pub in_flight: u64,
    /// Waiting for their retry delay.
    pub waiting_retries: usize,
    /// Delayed outputs this plugin produced, waiting for their time.
    pub waiting_delayed: usize,
    /// Dead letters kept now.
    pub dead_letters: usize,
    /// Dead letters discarded since start because they were older than
    /// `dlq_ttl`.
    pub dead_letters_expired: u64,
    /// Dead letters discarded since start to keep at most `dlq_max_length`.
    pub dead_letters_overflowed: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    redriven: AtomicU64,
    /// Every enqueue: publishes, retries and re-drives.
    enqueued: AtomicU64,
    settled: AtomicU64,
}

/// A plugin's queue: a channel that grows as it fills (nothing is allocated
/// for room not used), refused past `capacity`.
struct Queue {
    tx: Sender<Delivery>,
    rx: Receiver<Delivery>,
    capacity: usize,
    counters: Arc<Counters>,
}

struct Topo {
    exchanges: HashMap<String, ExchangeKind>,
    queues: HashMap<String, Queue>,
    routes: RouteTable,
}

struct Retry {
    due: Instant,
    plugin: String,
    delivered: Delivered,
}

impl PartialEq for Retry {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due
    }
}
impl Eq for Retry {}
impl PartialOrd for Retry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Retry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.due.cmp(&other.due)
    }
}

struct Inner {
    topo: Mutex<Topo>,
    retries: Mutex<BinaryHeap<Reverse<Retry>>>,
    retry_wake: Condvar,
    dead: Mutex<DeadLetters>,
    stream: tokio::sync::broadcast::Sender<Arc<Published>>,
    unroutable: AtomicU64,
    /// Notified whenever a delivery is settled (with `quiet` held), for
    /// [`EmbeddedBus::drain`] to wait on.
    quiet: Mutex<()>,
    settled: Condvar,
    /// The event archive, when `[archive]` is enabled.
    archive: Option<Arc<crate::archive::Archive>>,
    /// Delayed outputs, and what wakes their thread (kept apart from the bus:
    /// the thread waits without holding the bus, so dropping the bus closes
    /// the timer store at once, for the next start to open).
    timers: Arc<TimerStore>,
    delay_wake: Arc<(Mutex<bool>, Condvar)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The in-process bus. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBus").finish_non_exhaustive()
    }
}

impl Default for EmbeddedBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EmbeddedBus {
    /// An empty bus; starts its retry timer thread (it stops when the last clone
    /// of the bus is dropped).
    pub fn new() -> Self {
        Self::with_archive(None)
    }

    /// An empty bus that archives what is published to it: [`Bus::publish`]
    /// returns once the archive holds the batch on disk.
    pub fn with_archive(archive: Option<Arc<crate::archive::Archive>>) -> Self {
        let timers = match TimerStore::in_memory() {
            Ok(store) => Arc::new(store),
            Err(e) => {
                // An in-memory database only fails to open when out of memory.
                tracing::error!(error = %e, "cannot create the in-memory timer store");
                std::process::abort()
            }
        };
        Self::with_state(archive, timers)
    }

    /// An empty bus with its archive and the timer store delayed outputs wait
    /// in (the appliance's is on disk).
    pub fn with_state(
        archive: Option<Arc<crate::archive::Archive>>,
        timers: Arc<TimerStore>,
    ) -> Self {
        let (stream, _) = tokio::sync::broadcast::channel(4096);
        let inner = Arc::new(Inner {
            topo: Mutex::new(Topo {
                exchanges: HashMap::new(),
                queues: HashMap::new(),
                routes: RouteTable::default(),
            }),
            retries: Mutex::new(BinaryHeap::new()),
            retry_wake: Condvar::new(),
            dead: Mutex::new(DeadLetters::default()),
            stream,
            unroutable: AtomicU64::new(0),
            quiet: Mutex::new(()),
            settled: Condvar::new(),
            archive,
            timers,
            delay_wake: Arc::new((Mutex::new(false), Condvar::new())),
        });
        let weak = Arc::downgrade(&inner);
        let spawned = std::thread::Builder::new()
            .name("switchboard-retries".into())
            .spawn(move || retry_timer(&weak));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the retry timer; retries will wait for shutdown");
        }
        let weak = Arc::downgrade(&inner);
        let wake = inner.delay_wake.clone();
        let spawned = std::thread::Builder::new()
            .name("switchboard-delays".into())
            .spawn(move || delay_timer(&weak, &wake));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the delay timer; delayed outputs wait for a restart");
        }
        Self { inner }
    }

    /// Closes the timer store (the last step of a shutdown): its file is
    /// released at once, for the next start; delayed outputs stay in it.
    pub fn close_timers(&self) {
        self.inner.timers.close();
    }

    /// Delayed outputs waiting for their time, in all.
    pub fn delayed_waiting(&self) -> usize {
        self.inner.timers.len()
    }

    /// The event archive, when enabled.
    pub fn archive(&self) -> Option<&Arc<crate::archive::Archive>> {
        self.inner.archive.as_ref()
    }

    /// Watch every published message (outputs and ingress alike).
    pub fn subscribe_stream(&self) -> tokio::sync::broadcast::Receiver<Arc<Published>> {
        self.inner.stream.subscribe()
    }

    /// Counters per plugin queue.
    pub fn stats(&self) -> HashMap<String, QueueStats> {
        // Lock order: retries before topo (the retry timer's).
        let mut waiting: HashMap<String, usize> = HashMap::new();
        for retry in lock(&self.inner.retries).iter() {
            *waiting.entry(retry.0.plugin.clone()).or_default() += 1;
        }
        let delayed = self.inner.timers.waiting();
        let topo = lock(&self.inner.topo);
        let mut dead = lock(&self.inner.dead);
        dead.prune(now_ms());
        topo.queues
            .iter()
            .map(|(plugin, q)| {
                let c = &q.counters;
                let outstanding = c
                    .enqueued
                    .load(Ordering::SeqCst)
                    .saturating_sub(c.settled.load(Ordering::SeqCst));
                let stats = QueueStats {
                    received: c.received.load(Ordering::SeqCst),
                    acked: c.acked.load(Ordering::SeqCst),
                    retried: c.retried.load(Ordering::SeqCst),
                    dead_lettered: c.dead_lettered.load(Ordering::SeqCst),
                    redriven: c.redriven.load(Ordering::SeqCst),
                    depth: q.rx.len(),
                    in_flight: outstanding.saturating_sub(q.rx.len() as u64),
                    waiting_retries: waiting.get(plugin).copied().unwrap_or(0),
                    waiting_delayed: delayed.get(plugin).copied().unwrap_or(0),
                    dead_letters: dead.letters.get(plugin).map_or(0, VecDeque::len),
                    dead_letters_expired: dead.expired.get(plugin).copied().unwrap_or(0),
                    dead_letters_overflowed: dead.overflowed.get(plugin).copied().unwrap_or(0),
                };
                (plugin.clone(), stats)
            })
            .collect()
    }

    /// Messages published that no binding matched.
    pub fn unroutable(&self) -> u64 {
        self.inner.unroutable.load(Ordering::SeqCst)
    }

    /// The dead letters of `plugin`, oldest first.
    pub fn dead_letters(&self, plugin: &str) -> Vec<DeadLetter> {
        let mut dead = lock(&self.inner.dead);
        dead.prune(now_ms());
        dead.letters
            .get(plugin)
            .map(|q| q.iter().map(|kept| kept.letter.clone()).collect())
            .unwrap_or_default()
    }

    /// How long and how many dead letters each plugin keeps (`[broker]
    /// dlq_ttl` and `dlq_max_length`); applied to those kept already, too.
    pub fn set_dead_letter_retention(&self, retention: DlqRetention) {
        let mut dead = lock(&self.inner.dead);
        dead.retention = retention;
        dead.prune(now_ms());
    }

    /// Moves up to `limit` dead letters of `plugin` back to its queue as first
    /// attempts; returns how many. Stops early when the queue is full.
    pub fn redrive(&self, plugin: &str, limit: usize) -> Result<usize, BusError> {
        Ok(self.move_back(plugin, limit, |_| true)?.len())
    }

    /// Moves the dead letters of `plugin` whose [`DeadLetter::id`] is one of
    /// `ids` back to its queue as first attempts, oldest first; the others
    /// keep their places. Returns the ids of the letters moved, one per
    /// letter; stops early when the queue is full (what did not move stays).
    pub fn redrive_ids(
        &self,
        plugin: &str,
        ids: &std::collections::BTreeSet<String>,
    ) -> Result<Vec<String>, BusError> {
        self.move_back(plugin, usize::MAX, |letter| ids.contains(&letter.id()))
    }

    /// Moves up to `limit` of the dead letters of `plugin` that `pick`
    /// chooses, oldest first, back to its queue as first attempts, until the
    /// queue is full; the others keep their places. The ids of those moved.
    fn move_back(
        &self,
        plugin: &str,
        limit: usize,
        mut pick: impl FnMut(&DeadLetter) -> bool,
    ) -> Result<Vec<String>, BusError> {
        let topo = lock(&self.inner.topo);
        let queue = topo
            .queues
            .get(plugin)
            .ok_or_else(|| BusError::NoSuchQueue(plugin.into()))?;
        let mut dead = lock(&self.inner.dead);
        dead.prune(now_ms());
        let Some(letters) = dead.letters.get_mut(plugin) else {
            return Ok(Vec::new());
        };
        let mut staying = VecDeque::with_capacity(letters.len());
        let mut moved = Vec::new();
        while let Some(kept) = letters.pop_front() {
            if moved.len() >= limit || !pick(&kept.letter) {
                staying.push_back(kept);
                continue;
            }
            let delivered = Delivered {
                attempt: 1,
                first_failure: None,
                ..kept.letter.delivered.clone()
            };
            if self.enqueue(queue, plugin, delivered).is_err() {
                // Full: this one and the rest stay, in order.
                staying.push_back(kept);
                staying.extend(letters.drain(..));
                break;
            }
            moved.push(kept.letter.id());
            queue.counters.redriven.fetch_add(1, Ordering::SeqCst);
        }
        *letters = staying;
        Ok(moved)
    }

    /// Puts `messages` in `plugin`'s queue as first attempts (a replay), in
    /// order, until the queue is full; returns how many it took.
    pub fn deliver(&self, plugin: &str, messages: Vec<Delivered>) -> Result<usize, BusError> {
        let topo = lock(&self.inner.topo);
        let queue = topo
            .queues
            .get(plugin)
            .ok_or_else(|| BusError::NoSuchQueue(plugin.into()))?;
        let mut taken = 0;
        for delivered in messages {
            match self.enqueue(queue, plugin, delivered) {
                Ok(()) => taken += 1,
                Err(BusError::Full { .. }) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(taken)
    }

    /// Whether every queue is empty, nothing is in flight and no retry waits.
    pub fn is_idle(&self) -> bool {
        let queues_idle = lock(&self.inner.topo).queues.values().all(|q| {
            q.counters.enqueued.load(Ordering::SeqCst) == q.counters.settled.load(Ordering::SeqCst)
        });
        queues_idle && lock(&self.inner.retries).is_empty()
    }

    /// Waits until queues are empty and nothing is in flight (retries excluded),
    /// at most `deadline`; true if that happened.
    pub fn drain(&self, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        // Checked with `quiet` held: a settlement notifies under it, so none
        // is missed between the check and the wait.
        let mut quiet = lock(&self.inner.quiet);
        loop {
            let busy = lock(&self.inner.topo).queues.values().any(|q| {
                q.counters.enqueued.load(Ordering::SeqCst)
                    != q.counters.settled.load(Ordering::SeqCst)
            });
            if !busy {
                return true;
            }
            let Some(left) = until.checked_duration_since(Instant::now()) else {
                return false;
            };
            quiet = self
                .inner
                .settled
                .wait_timeout(quiet, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Retries still waiting for their delay (for a shutdown report).
    pub fn pending(&self) -> usize {
        lock(&self.inner.retries).len()
    }

    /// Takes every message still on the bus — waiting retries and, if a drain
    /// timed out, queued messages — for spooling at shutdown. Call it after the
    /// workers have stopped.
    pub fn take_all(&self) -> Vec<(String, Delivered)> {
        let mut taken: Vec<(String, Delivered)> = lock(&self.inner.retries)
            .drain()
            .map(|Reverse(r)| (r.plugin, r.delivered))
            .collect();
        let topo = lock(&self.inner.topo);
        for (plugin, queue) in &topo.queues {
            while let Ok(delivery) = queue.rx.try_recv() {
                queue.counters.settled.fetch_add(1, Ordering::SeqCst);
                taken.push((plugin.clone(), delivery.delivered));
            }
        }
        taken
    }

    /// Takes every dead letter (for spooling at shutdown).
    pub fn take_dead_letters(&self) -> Vec<(String, DeadLetter)> {
        let mut dead = lock(&self.inner.dead);
        dead.prune(now_ms());
        dead.letters
            .drain()
            .flat_map(|(plugin, letters)| {
                letters
                    .into_iter()
                    .map(move |kept| (plugin.clone(), kept.letter))
            })
            .collect()
    }

    /// Puts a spooled dead letter back into `plugin`'s dead-letter queue.
    pub fn restore_dead_letter(&self, plugin: &str, letter: DeadLetter) {
        // Kept since it was dead-lettered, not since the restart.
        let at_ms = crate::archive::parse_time(&letter.at)
            .ok()
            .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
            .unwrap_or_else(now_ms);
        lock(&self.inner.dead).keep(plugin, at_ms, letter);
    }

    /// Puts a spooled message back: it reaches `plugin`'s queue as soon as there
    /// is room (through the retry timer), keeping its attempt count.
    pub fn restore(&self, plugin: &str, delivered: Delivered) {
        let retry = Retry {
            due: Instant::now(),
            plugin: plugin.into(),
            delivered,
        };
        lock(&self.inner.retries).push(Reverse(retry));
        self.inner.retry_wake.notify_one();
    }

    fn enqueue(&self, queue: &Queue, plugin: &str, delivered: Delivered) -> Result<(), BusError> {
        let settle = Box::new(EmbeddedSettle {
            bus: Arc::downgrade(&self.inner),
            plugin: plugin.into(),
            counters: queue.counters.clone(),
        });
        if queue.tx.len() >= queue.capacity {
            return Err(BusError::Full {
                plugin: plugin.into(),
            });
        }
        match queue.tx.try_send(Delivery { delivered, settle }) {
            Ok(()) => {
                queue.counters.enqueued.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(BusError::Full {
                plugin: plugin.into(),
            }),
            Err(TrySendError::Disconnected(_)) => Err(BusError::NoSuchQueue(plugin.into())),
        }
    }

    /// One attempt at publishing the whole batch.
    /// Queues `batch` (waiting up to `timeout` for room), then archives it.
    /// With `synced`, returns only once an fsync covers the archived records
    /// (ingress: what is answered 202 is on disk). Without, they are written
    /// (a `kill -9` keeps them) and fsynced by the archive's flusher within
    /// milliseconds: plugin outputs, whose worker takes its next event meanwhile.
    fn publish_archived(
        &self,
        batch: Vec<Outgoing>,
        timeout: Duration,
        synced: bool,
    ) -> Result<(), BusError> {
        let until = Instant::now() + timeout;
        let mut pause = Duration::from_micros(200);
        loop {
            match self.try_publish(&batch) {
                Err(BusError::Full { plugin }) => {
                    if Instant::now() + pause > until {
                        return Err(BusError::Full { plugin });
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Ok(()) => break,
                other => return other,
            }
        }
        // Queued, and archived before anyone is told it was published: an
        // event acknowledged (202, an input settled) is in the archive.
        let Some(archive) = &self.inner.archive else {
            return Ok(());
        };
        let archived = if synced {
            archive.append(&batch)
        } else {
            archive.write(&batch).map(|_| ())
        };
        archived.map_err(|e| BusError::Unavailable(e.to_string()))
    }

    fn try_publish(&self, batch: &[Outgoing]) -> Result<(), BusError> {
        let topo = lock(&self.inner.topo);
        let mut plan: Vec<(usize, Vec<Arc<str>>)> = Vec::with_capacity(batch.len());
        let mut needed: HashMap<Arc<str>, usize> = HashMap::new();
        for (i, out) in batch.iter().enumerate() {
            if !topo.exchanges.contains_key(&out.exchange) {
                return Err(BusError::NoSuchExchange(out.exchange.clone()));
            }
            let destinations = topo.routes.destinations(&out.exchange, &out.routing_key);
            for d in &destinations {
                *needed.entry(d.clone()).or_default() += 1;
            }
            plan.push((i, destinations));
        }
        for (plugin, n) in &needed {
            if let Some(q) = topo.queues.get(&**plugin)
                && q.tx.len() + n > q.capacity
            {
                return Err(BusError::Full {
                    plugin: plugin.to_string(),
                });
            }
        }
        for (i, destinations) in plan {
            let out = &batch[i];
            if destinations.is_empty() {
                self.inner.unroutable.fetch_add(1, Ordering::Relaxed);
            }
            for plugin in destinations {
                let Some(queue) = topo.queues.get(&*plugin) else {
                    continue;
                };
                let delivered = Delivered {
                    exchange: out.exchange.clone(),
                    routing_key: out.routing_key.clone(),
                    message: out.message.clone(),
                    attempt: 1,
                    first_failure: None,
                };
                // Room was checked under this same lock; consumers only make more.
                self.enqueue(queue, &plugin, delivered)?;
                queue.counters.received.fetch_add(1, Ordering::Relaxed);
            }
            if self.inner.stream.receiver_count() > 0 {
                let _ = self.inner.stream.send(Arc::new(Published {
                    exchange: out.exchange.clone(),
                    routing_key: out.routing_key.clone(),
                    message: out.message.clone(),
                }));
            }
        }
        Ok(())
    }
}

impl Bus for EmbeddedBus {
    fn apply(&self, topology: &Topology) -> Result<(), BusError> {
        let routes = RouteTable::new(topology.bindings.iter().cloned())
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        let mut topo = lock(&self.inner.topo);
        topo.exchanges = topology
            .exchanges
            .iter()
            .map(|e| (e.name.clone(), e.kind))
            .collect();
        for spec in &topology.queues {
            if let Some(queue) = topo.queues.get_mut(&spec.plugin) {
                // What already waits stays, even past a smaller capacity.
                queue.capacity = spec.capacity;
            } else {
                let (tx, rx) = crossbeam_channel::unbounded();
                topo.queues.insert(
                    spec.plugin.clone(),
                    Queue {
                        tx,
                        rx,
                        capacity: spec.capacity,
                        counters: Arc::default(),
                    },
                );
            }
        }
        topo.routes = routes;
        Ok(())
    }

    fn consume(&self, plugin: &str) -> Result<Receiver<Delivery>, BusError> {
        let topo = lock(&self.inner.topo);
        let queue = topo
            .queues
            .get(plugin)
            .ok_or_else(|| BusError::NoSuchQueue(plugin.into()))?;
        Ok(queue.rx.clone())
    }

    fn publish(&self, batch: Vec<Outgoing>, timeout: Duration) -> Result<(), BusError> {
        self.publish_archived(batch, timeout, true)
    }

    fn has_exchange(&self, name: &str) -> bool {
        lock(&self.inner.topo).exchanges.contains_key(name)
    }

    fn delete_queue(&self, plugin: &str, force: bool) -> Result<(), BusError> {
        let mut topo = lock(&self.inner.topo);
        let Some(queue) = topo.queues.get(plugin) else {
            return Ok(());
        };
        if !force && !queue.rx.is_empty() {
            return Err(BusError::Unavailable(format!(
                "queue of plugin {plugin:?} still holds {} messages",
                queue.rx.len()
            )));
        }
        // What still waits is accounted for: dead-lettered, not dropped.
        while let Ok(delivery) = queue.rx.try_recv() {
            queue.counters.settled.fetch_add(1, Ordering::SeqCst);
            queue.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
            let delivered = delivery.delivered;
            let failure = FailureInfo {
                kind: "plugin_removed".into(),
                reason: format!(
                    "plugin {plugin:?} was removed from the configuration while the event waited"
                ),
                attempts: delivered.attempt.saturating_sub(1),
                plugin_version: String::new(),
                first_failure: delivered.first_failure.clone().unwrap_or_default(),
            };
            dead_letter(&self.inner, plugin, delivered, failure);
        }
        topo.queues.remove(plugin);
        Ok(())
    }
}

/// Settles an embedded delivery; holds the bus weakly so that a delivery left
/// in a worker's hands never keeps a dropped bus alive.
struct EmbeddedSettle {
    bus: std::sync::Weak<Inner>,
    plugin: String,
    counters: Arc<Counters>,
}

impl Settle for EmbeddedSettle {
    fn settle(self: Box<Self>, delivered: Delivered, settlement: Settlement, then: OnSettled) {
        let Some(inner) = self.bus.upgrade() else {
            then(Settled::Lost("the bus is gone".into()));
            return;
        };
        match settlement {
            Settlement::Handled {
                outputs,
                delayed,
                timeout,
            } => {
                if !delayed.is_empty() {
                    // Stored (fsynced) before the input is acked, like any output.
                    let timers = delayed
                        .into_iter()
                        .map(|d| Timer {
                            due_ms: super::timers::due_after(d.after),
                            plugin: self.plugin.clone(),
                            output: d.output,
                        })
                        .collect();
                    if let Err(why) = inner.timers.schedule(timers) {
                        let delivery = Box::new(Delivery {
                            delivered,
                            settle: self,
                        });
                        let error = BusError::Unavailable(why);
                        then(Settled::Refused { delivery, error });
                        return;
                    }
                    let (woken, wake) = &*inner.delay_wake;
                    *lock(woken) = true;
                    wake.notify_one();
                }
                if !outputs.is_empty() {
                    let bus = EmbeddedBus {
                        inner: inner.clone(),
                    };
                    if let Err(error) = bus.publish_archived(outputs, timeout, false) {
                        let delivery = Box::new(Delivery {
                            delivered,
                            settle: self,
                        });
                        then(Settled::Refused { delivery, error });
                        return;
                    }
                }
                self.counters.acked.fetch_add(1, Ordering::Relaxed);
            }
            Settlement::Retry { delay, failure } => {
                let retry = Retry {
                    due: Instant::now() + delay,
                    plugin: self.plugin.clone(),
                    delivered: Delivered {
                        attempt: failure.attempts.saturating_add(1),
                        first_failure: Some(failure.first_failure),
                        ..delivered
                    },
                };
                lock(&inner.retries).push(Reverse(retry));
                inner.retry_wake.notify_one();
                self.counters.retried.fetch_add(1, Ordering::Relaxed);
            }
            Settlement::DeadLetter { failure } => {
                dead_letter(&inner, &self.plugin, delivered, failure);
                self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.counters.settled.fetch_add(1, Ordering::SeqCst);
        {
            let _quiet = lock(&inner.quiet);
            inner.settled.notify_all();
        }
        then(Settled::Done);
    }
}

fn dead_letter(inner: &Inner, plugin: &str, delivered: Delivered, failure: FailureInfo) {
    tracing::debug!(plugin, kind = %failure.kind, "kept in the dead-letter queue");
    let letter = DeadLetter {
        delivered,
        failure,
        at: crate::envelope::now_rfc3339(),
    };
    lock(&inner.dead).keep(plugin, now_ms(), letter);
}

/// Every plugin's dead letters, oldest first, and what retention discarded.
#[derive(Default)]
struct DeadLetters {
    letters: HashMap<String, VecDeque<Kept>>,
    retention: DlqRetention,
    expired: HashMap<String, u64>,
    overflowed: HashMap<String, u64>,
}

struct Kept {
    /// When it was dead-lettered, ms since the epoch.
    at_ms: u64,
    letter: DeadLetter,
}

impl DeadLetters {
    fn max_length(&self) -> u64 {
        self.retention.max_length.unwrap_or(MAX_DEAD_LETTERS)
    }

    fn keep(&mut self, plugin: &str, at_ms: u64, letter: DeadLetter) {
        let letters = self.letters.entry(plugin.to_string()).or_default();
        letters.push_back(Kept { at_ms, letter });
        self.prune(now_ms());
    }

    /// Discards what is older than `dlq_ttl` (letters are kept in the order
    /// they were dead-lettered, so only the front can be due) and what is
    /// beyond `dlq_max_length`.
    fn prune(&mut self, now_ms: u64) {
        let ttl_ms = self
            .retention
            .ttl
            .map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let max = self.max_length();
        for (plugin, letters) in &mut self.letters {
            let mut expired = 0;
            if let Some(ttl_ms) = ttl_ms {
                while letters
                    .front()
                    .is_some_and(|kept| now_ms.saturating_sub(kept.at_ms) >= ttl_ms)
                {
                    letters.pop_front();
                    expired += 1;
                }
            }
            let over = (letters.len() as u64).saturating_sub(max);
            letters.drain(..usize::try_from(over).unwrap_or(usize::MAX));
            if expired > 0 {
                *self.expired.entry(plugin.clone()).or_default() += expired;
                tracing::info!(plugin, expired, "dead letters older than dlq_ttl discarded");
            }
            if over > 0 {
                *self.overflowed.entry(plugin.clone()).or_default() += over;
                tracing::warn!(
                    plugin,
                    discarded = over,
                    max_length = max,
                    "dead letters beyond dlq_max_length discarded"
                );
            }
        }
    }
}

/// Moves due retries back to their queues until the bus is dropped. A retry
/// is moved under the retries lock, so that [`EmbeddedBus::take_all`] finds
/// every message either waiting or queued, never in between.
fn retry_timer(bus: &std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = bus.upgrade() else { return };
        let bus = EmbeddedBus { inner };
        let mut retries = lock(&bus.inner.retries);
        let now = Instant::now();
        let mut wait = Duration::from_millis(100);
        let mut blocked = Vec::new();
        while let Some(Reverse(next)) = retries.peek() {
            if next.due > now {
                wait = wait.min(next.due - now);
                break;
            }
            let Some(Reverse(due)) = retries.pop() else {
                break;
            };
            let outcome = {
                let topo = lock(&bus.inner.topo);
                match topo.queues.get(&due.plugin) {
                    Some(queue) => bus.enqueue(queue, &due.plugin, due.delivered.clone()),
                    None => Err(BusError::NoSuchQueue(due.plugin.clone())),
                }
            };
            match outcome {
                Ok(()) => {}
                Err(BusError::NoSuchQueue(plugin)) => {
                    let failure = FailureInfo {
                        kind: "plugin_removed".into(),
                        reason: format!(
                            "plugin {plugin:?} was removed while the event waited for a retry"
                        ),
                        attempts: due.delivered.attempt.saturating_sub(1),
                        plugin_version: String::new(),
                        first_failure: due.delivered.first_failure.clone().unwrap_or_default(),
                    };
                    tracing::warn!(plugin, reason = %failure.reason, "event dead-lettered");
                    dead_letter(&bus.inner, &plugin, due.delivered, failure);
                }
                Err(_) => blocked.push(Retry {
                    due: now + Duration::from_millis(10),
                    ..due
                }),
            }
        }
        for retry in blocked {
            retries.push(Reverse(retry));
            wait = wait.min(Duration::from_millis(10));
        }
        // Wake on new retries, or when the next one is due; the timeout also
        // lets the thread notice the bus being dropped.
        let _unused = bus
            .inner
            .retry_wake
            .wait_timeout(retries, wait)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// Timers fired per round; the rest wait for the next one, so firing a large
/// backlog is done in slices.
const FIRE_BATCH: usize = 256;

/// Publishes delayed outputs when due, until the bus is dropped. A delayed
/// output whose plugin queue is full waits a little and is tried again; one
/// whose exchange is gone is dead-lettered in the producing plugin's
/// dead-letter queue, so that nothing is lost unseen.
fn delay_timer(bus: &std::sync::Weak<Inner>, wake: &(Mutex<bool>, Condvar)) {
    loop {
        let wait = {
            let Some(inner) = bus.upgrade() else { return };
            if inner.timers.is_closed() {
                return;
            }
            let now = super::timers::now_ms();
            match inner.timers.next_due() {
                Some(due) if due <= now => fire_due(&inner, now),
                Some(due) => Duration::from_millis((due - now).min(1000)),
                None => Duration::from_secs(1),
            }
        };
        if wait.is_zero() {
            continue;
        }
        // Not holding the bus: see `Inner::delay_wake`.
        let (woken, condvar) = wake;
        let guard = lock(woken);
        let (mut guard, _) = condvar
            .wait_timeout_while(guard, wait, |woken| !*woken)
            .unwrap_or_else(PoisonError::into_inner);
        *guard = false;
    }
}

/// Fires up to [`FIRE_BATCH`] due timers; how long to wait before the next round.
fn fire_due(inner: &Arc<Inner>, now: u64) -> Duration {
    let due = match inner.timers.due(now, FIRE_BATCH) {
        Ok(due) => due,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the due delayed outputs; trying again");
            return Duration::from_millis(500);
        }
    };
    let bus = EmbeddedBus {
        inner: inner.clone(),
    };
    let mut fired = Vec::with_capacity(due.len());
    let mut blocked = false;
    for timer in due {
        let timer = match timer {
            Ok(timer) => timer,
            Err((due_ms, id, why)) => {
                tracing::error!(id, reason = %why, "a delayed output cannot be read and is dropped");
                fired.push((due_ms, id, String::new()));
                continue;
            }
        };
        let key = (timer.due_ms, timer.id.clone(), timer.plugin.clone());
        match bus.publish_archived(vec![timer.output.clone()], Duration::ZERO, false) {
            Ok(()) => fired.push(key),
            Err(BusError::Full { .. }) => {
                // Its plugin's queue is full: it waits; the others fire.
                blocked = true;
            }
            Err(BusError::Unavailable(why)) => {
                // The archive could not write it: queued all the same, so the
                // timer is done (firing it again would only repeat it).
                tracing::warn!(reason = %why, "a fired delayed output could not be archived");
                fired.push(key);
            }
            Err(e) => {
                let failure = FailureInfo {
                    kind: "invalid_output".into(),
                    reason: format!("a delayed output could not be published when due: {e}"),
                    attempts: 1,
                    plugin_version: String::new(),
                    first_failure: crate::envelope::now_rfc3339(),
                };
                tracing::warn!(plugin = %timer.plugin, reason = %failure.reason, "delayed output dead-lettered");
                let delivered = Delivered {
                    exchange: timer.output.exchange,
                    routing_key: timer.output.routing_key,
                    message: timer.output.message,
                    attempt: 1,
                    first_failure: None,
                };
                dead_letter(inner, &timer.plugin, delivered, failure);
                fired.push(key);
            }
        }
    }
    if let Err(e) = inner.timers.remove(&fired) {
        // They fire again (at least once, same ids) after the store recovers.
        tracing::error!(error = %e, "cannot remove fired delayed outputs");
        return Duration::from_millis(500);
    }
    if blocked {
        Duration::from_millis(20)
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(id: &str, at: &str) -> DeadLetter {
        DeadLetter {
            delivered: Delivered {
                exchange: "events".into(),
                routing_key: "reject".into(),
                message: super::super::Message {
                    body: bytes::Bytes::from(format!("{{\"id\":\"{id}\"}}")),
                    content_type: None,
                    message_id: Some(id.into()),
                    headers: Vec::new(),
                },
                attempt: 1,
                first_failure: None,
            },
            failure: FailureInfo {
                kind: "reject".into(),
                reason: "asked to reject".into(),
                attempts: 1,
                plugin_version: String::new(),
                first_failure: at.into(),
            },
            at: at.into(),
        }
    }

    fn ids(letters: &DeadLetters, plugin: &str) -> Vec<String> {
        letters.letters.get(plugin).map_or_else(Vec::new, |q| {
            q.iter()
                .map(|k| k.letter.delivered.message.message_id.clone().unwrap())
                .collect()
        })
    }

    #[test]
    fn the_oldest_letters_go_past_max_length_and_each_goes_after_ttl() {
        let now = now_ms();
        let mut dead = DeadLetters {
            retention: DlqRetention {
                ttl: Some(Duration::from_secs(60)),
                max_length: Some(2),
            },
            ..DeadLetters::default()
        };
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            dead.keep("worker", now - 30_000 + i as u64 * 10_000, letter(id, "-"));
        }
        // a, b and c came 30, 20 and 10 s ago: a was one too many.
        assert_eq!(ids(&dead, "worker"), ["b", "c"]);
        assert_eq!(
            (dead.overflowed["worker"], dead.expired.get("worker")),
            (1, None)
        );
        dead.prune(now + 45_000);
        assert_eq!(ids(&dead, "worker"), ["c"], "b turned 60 s old");
        dead.prune(now + 55_000);
        assert!(ids(&dead, "worker").is_empty());
        assert_eq!(dead.expired["worker"], 2);

        // Without retention: kept for ever, up to the built-in bound.
        let mut dead = DeadLetters::default();
        dead.keep("worker", 0, letter("old", "-"));
        dead.prune(now);
        assert_eq!(ids(&dead, "worker"), ["old"]);
    }

    #[test]
    fn a_restored_letter_keeps_the_age_it_had() {
        let bus = EmbeddedBus::new();
        bus.set_dead_letter_retention(DlqRetention {
            ttl: Some(Duration::from_secs(60)),
            max_length: None,
        });
        let ago = |s: i64| (chrono::Utc::now() - chrono::Duration::seconds(s)).to_rfc3339();
        bus.restore_dead_letter("worker", letter("stale", &ago(120)));
        bus.restore_dead_letter("worker", letter("fresh", &ago(5)));
        let kept: Vec<_> = bus
            .dead_letters("worker")
            .into_iter()
            .map(|l| l.delivered.message.message_id.unwrap())
            .collect();
        assert_eq!(kept, ["fresh"]);
    }

    #[test]
    fn chosen_letters_are_redriven_until_the_queue_is_full_and_the_rest_keep_their_order() {
        use crate::bus::{Bus as _, QueueSpec, Topology};
        let bus = EmbeddedBus::new();
        let queue = QueueSpec {
            plugin: "worker".into(),
            capacity: 2,
            prefetch: 1,
            ordered: false,
            retry_delays: Vec::new(),
        };
        bus.apply(&Topology {
            queues: vec![queue],
            ..Topology::default()
        })
        .unwrap();
        for id in ["a", "b", "c", "d", "e"] {
            bus.restore_dead_letter("worker", letter(id, &crate::envelope::now_rfc3339()));
        }
        let chosen = ["b", "d", "e", "z"].map(String::from).into_iter().collect();
        // Room for two: b and d move; e stays where it was.
        let moved = bus.redrive_ids("worker", &chosen).unwrap();
        assert_eq!(moved, ["b", "d"]);
        let left: Vec<String> = bus
            .dead_letters("worker")
            .iter()
            .map(DeadLetter::id)
            .collect();
        assert_eq!(left, ["a", "c", "e"]);
        let queued = bus.consume("worker").unwrap();
        let first = queued.try_recv().unwrap();
        assert_eq!(first.delivered.message.message_id.as_deref(), Some("b"));
        assert_eq!(first.delivered.attempt, 1);
        assert_eq!(
            bus.redrive_ids("nobody", &chosen),
            Err(BusError::NoSuchQueue("nobody".into()))
        );
    }
}
