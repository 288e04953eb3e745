//! The Redis Streams bus: the same seam and semantics as the embedded bus and
//! RabbitMQ, on a Redis server shared by every replica.
//!
//! One event's path through it, file by file:
//!
//! - `keys`: where everything lives (an exchange is a stream, each plugin a
//!   consumer group on the streams its routes read, plus a stream of its own
//!   for retries and redrives, a sorted set of waiting retries and a
//!   dead-letter stream).
//! - `link`: the connection pool, dedicated connections for blocking reads,
//!   reconnecting with backoff, and reading replies.
//! - `entry`: messages between stream entries and the bus.
//! - `consume`: one thread per plugin reading its groups (`XREADGROUP`),
//!   matching routing keys with the router's own matcher, claiming what dead
//!   replicas held (`XAUTOCLAIM`) and keeping its own claims fresh.
//! - `settle`: the one path by which a delivery ends: outputs `XADD`ed and the
//!   input `XACK`ed in one `MULTI`; a retry into the plugin's sorted set, a dead
//!   letter into its dead-letter stream, each with the ack in the same `MULTI`.
//! - `mover`: moves due retries and delayed outputs into their streams (one
//!   Lua script, atomic whichever replica runs it), and declares the topology
//!   again after Redis comes back.
//! - `tools`: dead letters (peek, redrive), replays and the CLI's publish and
//!   tail.
//!
//! **Replicas** are consumers in the same groups (competing consumers); each
//! process is one consumer, named by [`keys::consumer_name`].
//!
//! What the consumer groups do not give: a plugin group created after events
//! were published does not see them (as an unbound RabbitMQ queue), and an
//! entry trimmed (`stream_max_length`) before a lagging group read it is gone.

mod consume;
mod entry;
mod keys;
mod link;
mod mover;
mod settle;
pub mod tools;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use crossbeam_channel::Receiver;
use redis::Value;
use tokio::sync::broadcast;

use super::{Bus, BusError, DeadLetter, Delivered, Delivery, Outgoing, Published, Topology};
use crate::config::{BrokerKind, DlqRetention, RouterConfig, Secret, Unroutable};
use crate::route::RouteTable;
use consume::ConsumerState;
pub use keys::{Keys, consumer_name};
pub use link::Link;

/// How to reach Redis and what to keep there: `[broker]` with
/// `kind = "redis-streams"`.
#[derive(Debug, Clone)]
pub struct RedisBusSettings {
    pub url: Secret,
    pub prefix: String,
    /// Longest wait for one Redis command.
    pub timeout: Duration,
    /// Pending this long, an entry is claimed by a live replica.
    pub claim_idle: Duration,
    /// `MAXLEN ~` of every exchange and plugin stream.
    pub stream_max_length: u64,
    pub dlq: DlqRetention,
    pub unroutable: Unroutable,
}

impl RedisBusSettings {
    /// The settings of `config`, if it chooses the Redis Streams bus.
    pub fn from_config(config: &RouterConfig) -> Option<Self> {
        if config.broker.bus_kind() != Ok(BrokerKind::RedisStreams) {
            return None;
        }
        Some(Self {
            url: config.broker.url.clone()?,
            prefix: config.broker.prefix.clone(),
            timeout: config.broker.timeout,
            claim_idle: config.broker.claim_idle,
            stream_max_length: config.broker.stream_max_length,
            dlq: config.broker.dlq_retention(),
            unroutable: config.broker.unroutable,
        })
    }
}

/// The connection as `/readyz` and metrics see it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LinkStatus {
    pub connected: bool,
    /// The consumer groups are declared on the current server.
    pub declared: bool,
    pub error: Option<String>,
    /// Times the connection was lost since start.
    pub reconnects: u64,
}

/// The desired topology, and the route table built from it (what each
/// plugin's group keeps of what it reads).
pub(crate) struct Routing {
    pub topology: Topology,
    pub table: RouteTable,
    pub exchanges: HashSet<String>,
}

impl Routing {
    fn new(topology: &Topology) -> Result<Self, BusError> {
        let table = RouteTable::new(topology.bindings.iter().cloned())
            .map_err(|e| BusError::Topology(e.to_string()))?;
        Ok(Self {
            exchanges: topology.exchanges.iter().map(|e| e.name.clone()).collect(),
            topology: topology.clone(),
            table,
        })
    }

    /// Whether an entry on `exchange` with `routing_key` is `plugin`'s.
    pub fn routes_to(&self, exchange: &str, routing_key: &str, plugin: &str) -> bool {
        let mut yes = false;
        self.table
            .for_each_destination(exchange, routing_key, |p| yes |= &**p == plugin);
        yes
    }

    /// The exchanges `plugin`'s routes read.
    pub fn exchanges_of(&self, plugin: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .topology
            .bindings
            .iter()
            .filter(|b| b.plugin == plugin)
            .map(|b| b.exchange.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn capacity(&self, plugin: &str) -> Option<usize> {
        self.topology
            .queues
            .iter()
            .find(|q| q.plugin == plugin)
            .map(|q| q.capacity)
    }

    fn prefetch(&self, plugin: &str) -> Option<u16> {
        self.topology
            .queues
            .iter()
            .find(|q| q.plugin == plugin)
            .map(|q| q.prefetch.max(1))
    }
}

struct ConsumerHandle {
    rx: Receiver<Delivery>,
    state: Arc<ConsumerState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub(crate) struct Inner {
    settings: RedisBusSettings,
    keys: Keys,
    link: Link,
    consumer: String,
    routing: ArcSwap<Routing>,
    /// Plugins removed from the configuration and not deleted yet, with the
    /// routes they had: their groups keep what was routed to them until
    /// [`Bus::delete_queue`] dead-letters it, and their retries may still wait.
    retired: Mutex<HashMap<String, Arc<RouteTable>>>,
    consumers: Mutex<HashMap<String, ConsumerHandle>>,
    status: Mutex<LinkStatus>,
    unroutable: AtomicU64,
    stream: broadcast::Sender<Arc<Published>>,
    closing: AtomicBool,
    /// Dropping it stops the mover.
    stop_mover: Mutex<Option<crossbeam_channel::Sender<()>>>,
    mover: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    /// Records how the last command went, for `/readyz`.
    fn record(&self, result: Result<(), &str>) {
        let mut status = lock(&self.status);
        match result {
            Ok(()) => {
                status.connected = true;
                status.error = None;
            }
            Err(why) => {
                if status.connected {
                    status.reconnects += 1;
                }
                status.connected = false;
                status.declared = false;
                status.error = Some(why.to_string());
            }
        }
    }

    /// Declares every consumer group of the desired topology (idempotent), and
    /// removes the groups of routes `previous` had and it no longer has.
    fn declare(&self, previous: Option<&Topology>) -> Result<(), BusError> {
        let routing = self.routing.load_full();
        let keys = &self.keys;
        let mut groups: Vec<(String, String, &str)> = Vec::new();
        for b in &routing.topology.bindings {
            groups.push((keys.exchange(&b.exchange), b.plugin.clone(), "$"));
        }
        for q in &routing.topology.queues {
            groups.push((keys.queue(&q.plugin), q.plugin.clone(), "0"));
        }
        groups.sort();
        groups.dedup();
        // Routes the configuration dropped, of plugins it still has: a removed
        // plugin's groups go with `delete_queue`, after they are drained.
        let gone: Vec<(String, String)> = previous
            .map(|p| {
                p.bindings
                    .iter()
                    .filter(|b| {
                        routing.topology.queues.iter().any(|q| q.plugin == b.plugin)
                            && !routing
                                .topology
                                .bindings
                                .iter()
                                .any(|n| n.exchange == b.exchange && n.plugin == b.plugin)
                    })
                    .map(|b| (keys.exchange(&b.exchange), b.plugin.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut routes: HashMap<&str, Vec<serde_json::Value>> = routing
            .topology
            .exchanges
            .iter()
            .map(|e| (e.name.as_str(), Vec::new()))
            .collect();
        for b in &routing.topology.bindings {
            routes
                .entry(b.exchange.as_str())
                .or_default()
                .push(serde_json::json!({
                    "plugin": b.plugin, "pattern": b.pattern, "kind": b.kind.as_str(),
                }));
        }
        let result = self.link.run(|con| {
            for (stream, group, start) in &groups {
                let created = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(stream)
                    .arg(group)
                    .arg(*start)
                    .arg("MKSTREAM")
                    .query::<Value>(con);
                match created {
                    Err(e) if !link::is_busy_group(&e) => return Err(e),
                    _ => {}
                }
            }
            for (stream, group) in &gone {
                let _: Value = redis::cmd("XGROUP")
                    .arg("DESTROY")
                    .arg(stream)
                    .arg(group)
                    .query(con)?;
            }
            let mut pipe = redis::pipe();
            pipe.atomic().cmd("DEL").arg(keys.routes()).ignore();
            for (exchange, bindings) in &routes {
                pipe.cmd("HSET")
                    .arg(keys.routes())
                    .arg(*exchange)
                    .arg(serde_json::Value::from(bindings.clone()).to_string())
                    .ignore();
            }
            pipe.query::<Value>(con).map(drop)
        });
        match &result {
            Ok(()) => {
                self.record(Ok(()));
                lock(&self.status).declared = true;
            }
            Err(e) => self.record(Err(&e.to_string())),
        }
        result
    }

    /// Whether an entry on `exchange` with `routing_key` is `plugin`'s: by
    /// its routes, or the routes it had if it was removed and not yet deleted.
    fn takes(&self, exchange: &str, routing_key: &str, plugin: &str) -> bool {
        if self.routing.load().routes_to(exchange, routing_key, plugin) {
            return true;
        }
        lock(&self.retired)
            .get(plugin)
            .is_some_and(|table| !table.destinations(exchange, routing_key).is_empty())
    }

    /// The exchange streams `plugin`'s groups are on: its routes', or those
    /// it had if it was removed and not yet deleted.
    fn streams_of(&self, plugin: &str) -> Vec<String> {
        let mut exchanges = self.routing.load().exchanges_of(plugin);
        if let Some(table) = lock(&self.retired).get(plugin) {
            exchanges.extend(table.exchanges().map(|(x, _)| x.to_string()));
        }
        exchanges.sort();
        exchanges.dedup();
        exchanges.iter().map(|x| self.keys.exchange(x)).collect()
    }

    /// Publishes what is published to stream watchers and counts what no
    /// route takes.
    fn record_published(&self, batch: Vec<Outgoing>) {
        let routing = self.routing.load();
        for out in batch {
            if routing
                .table
                .destinations(&out.exchange, &out.routing_key)
                .is_empty()
            {
                self.unroutable.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(exchange = %out.exchange, routing_key = %out.routing_key, "no route takes this message");
            }
            let _ = self.stream.send(Arc::new(Published {
                exchange: out.exchange,
                routing_key: out.routing_key,
                message: out.message,
            }));
        }
    }

    /// Refuses a batch with an undeclared exchange, an entry too large, or
    /// (with `unroutable = "dead-letter"`) a message no route takes.
    fn check(&self, batch: &[&Outgoing]) -> Result<(), BusError> {
        let routing = self.routing.load();
        for out in batch {
            if !routing.exchanges.contains(&out.exchange) {
                return Err(BusError::NoSuchExchange(out.exchange.clone()));
            }
            let size = entry::size(&out.routing_key, &out.message);
            if size > entry::MAX_ENTRY {
                return Err(BusError::TooLarge(format!(
                    "a message of {size} bytes for exchange {:?} is more than a stream entry may take ({} bytes)",
                    out.exchange,
                    entry::MAX_ENTRY
                )));
            }
            if self.settings.unroutable == Unroutable::DeadLetter
                && routing
                    .table
                    .destinations(&out.exchange, &out.routing_key)
                    .is_empty()
            {
                return Err(BusError::Unroutable {
                    exchange: out.exchange.clone(),
                    routing_key: out.routing_key.clone(),
                });
            }
        }
        Ok(())
    }

    /// Adds `XADD`s of `batch` to `pipe`.
    fn add_outputs(&self, pipe: &mut redis::Pipeline, batch: &[Outgoing]) {
        for out in batch {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(self.keys.exchange(&out.exchange))
                .arg("MAXLEN")
                .arg("~")
                .arg(self.settings.stream_max_length)
                .arg("*");
            for (k, v) in entry::fields(None, &out.routing_key, &out.message) {
                cmd.arg(k).arg(v);
            }
            pipe.add_command(cmd).ignore();
        }
    }
}

/// The Redis Streams bus. Cheap to clone.
#[derive(Clone)]
pub struct RedisBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("url", &self.inner.settings.url)
            .field("consumer", &self.inner.consumer)
            .finish_non_exhaustive()
    }
}

impl RedisBus {
    /// Connects, declares `topology` and starts the mover. Redis being down
    /// now is not an error: the mover declares again once it answers, and
    /// `/readyz` says so meanwhile.
    pub fn start(settings: RedisBusSettings, topology: Topology) -> anyhow::Result<Self> {
        let link = Link::new(&settings.url, settings.timeout, 32).map_err(anyhow::Error::msg)?;
        let routing = Routing::new(&topology)?;
        let (stream, _) = broadcast::channel(4096);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let inner = Arc::new(Inner {
            keys: Keys::new(&settings.prefix),
            settings,
            link,
            consumer: consumer_name(),
            routing: ArcSwap::from_pointee(routing),
            retired: Mutex::new(HashMap::new()),
            consumers: Mutex::new(HashMap::new()),
            status: Mutex::new(LinkStatus::default()),
            unroutable: AtomicU64::new(0),
            stream,
            closing: AtomicBool::new(false),
            stop_mover: Mutex::new(Some(stop_tx)),
            mover: Mutex::new(None),
        });
        if let Err(e) = inner.declare(None) {
            tracing::warn!(error = %e, "Redis is not answering yet; retrying in the background");
        }
        let mover = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("switchboard-redis-mover".into())
                .spawn(move || mover::run(&inner, &stop_rx))?
        };
        *lock(&inner.mover) = Some(mover);
        tracing::info!(consumer = %inner.consumer, prefix = %inner.keys.prefix(), "redis streams bus started");
        Ok(Self { inner })
    }

    pub fn status(&self) -> LinkStatus {
        lock(&self.inner.status).clone()
    }

    /// Connected, with the consumer groups declared.
    pub fn is_ready(&self) -> bool {
        let s = self.status();
        s.connected && s.declared
    }

    pub fn unroutable(&self) -> u64 {
        self.inner.unroutable.load(Ordering::Relaxed)
    }

    pub fn subscribe_stream(&self) -> broadcast::Receiver<Arc<Published>> {
        self.inner.stream.subscribe()
    }

    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// This process's consumer name.
    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }

    /// What Redis says about `plugin`'s groups, retries and dead letters.
    pub fn queue_stats(
        &self,
        plugin: &str,
    ) -> Result<crate::bus::rabbit::BrokerQueueStats, BusError> {
        let keys = &self.inner.keys;
        let mut streams = self.inner.streams_of(plugin);
        streams.push(keys.queue(plugin));
        let in_flight = lock(&self.inner.consumers)
            .get(plugin)
            .map_or(0, |c| c.state.outstanding());
        self.inner.link.run(|con| {
            let mut messages = 0u64;
            let mut consumers = 0u64;
            for s in &streams {
                for group in link::info_groups(con, s)? {
                    if group.name == plugin {
                        messages += group.lag.unwrap_or(0);
                        consumers = consumers.max(group.consumers);
                    }
                }
            }
            let waiting: u64 = redis::cmd("ZCARD").arg(keys.retries(plugin)).query(con)?;
            let dead: u64 = redis::cmd("XLEN").arg(keys.dlq(plugin)).query(con)?;
            let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
            Ok(crate::bus::rabbit::BrokerQueueStats {
                messages: clamp(messages),
                consumers: clamp(consumers),
                waiting_retries: clamp(waiting),
                dead_letters: clamp(dead),
                in_flight,
            })
        })
    }

    /// Delayed outputs waiting (every replica's).
    pub fn delayed_waiting(&self) -> Result<u64, BusError> {
        let key = self.inner.keys.delayed();
        self.inner
            .link
            .run(|con| redis::cmd("ZCARD").arg(&key).query(con))
    }

    /// Up to `limit` dead letters of `plugin`, oldest first; they stay.
    pub fn dead_letters(&self, plugin: &str, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        tools::peek(&self.inner.link, &self.inner.keys, plugin, limit)
    }

    /// Moves up to `limit` dead letters of `plugin` back to its stream, as
    /// first attempts. Returns how many moved.
    pub fn redrive(&self, plugin: &str, limit: usize) -> Result<usize, BusError> {
        tools::redrive(
            &self.inner.link,
            &self.inner.keys,
            plugin,
            limit,
            self.inner.settings.stream_max_length,
        )
    }

    /// Moves the dead letters of `plugin` whose [`DeadLetter::id`] is one of
    /// `ids` back to its stream; the ids moved, one per letter.
    pub fn redrive_ids(
        &self,
        plugin: &str,
        ids: &std::collections::BTreeSet<String>,
    ) -> Result<Vec<String>, BusError> {
        tools::redrive_ids(
            &self.inner.link,
            &self.inner.keys,
            plugin,
            ids,
            self.inner.settings.stream_max_length,
        )
    }

    /// Puts `messages` in `plugin`'s stream as first attempts (a replay).
    pub fn deliver(&self, plugin: &str, messages: Vec<Delivered>) -> Result<usize, BusError> {
        tools::deliver(
            &self.inner.link,
            &self.inner.keys,
            plugin,
            messages,
            self.inner.settings.stream_max_length,
        )
    }

    /// Stops reading new entries; what was delivered can still be settled.
    pub fn cancel_consumers(&self) {
        for c in lock(&self.inner.consumers).values() {
            c.state.cancel();
        }
    }

    /// Waits until every delivery handed out is settled, at most `deadline`.
    pub fn drain(&self, deadline: Duration) -> bool {
        let states: Vec<Arc<ConsumerState>> = lock(&self.inner.consumers)
            .values()
            .map(|c| c.state.clone())
            .collect();
        let until = std::time::Instant::now() + deadline;
        states.iter().all(|s| s.wait_settled(until))
    }

    /// Stops the consumers and the mover. What was delivered and not settled
    /// stays pending in its group, claimed by a live replica after
    /// `claim_idle` (or by this process's successor).
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        let handles: Vec<ConsumerHandle> = lock(&self.inner.consumers)
            .drain()
            .map(|(_, c)| c)
            .collect();
        for c in &handles {
            c.state.stop();
        }
        for mut c in handles {
            if let Some(t) = c.thread.take() {
                let _ = t.join();
            }
        }
        lock(&self.inner.stop_mover).take();
        if let Some(t) = lock(&self.inner.mover).take() {
            let _ = t.join();
        }
    }
}

impl Bus for RedisBus {
    fn apply(&self, topology: &Topology) -> Result<(), BusError> {
        let routing = Routing::new(topology)?;
        let previous = self.inner.routing.swap(Arc::new(routing));
        {
            let mut retired = lock(&self.inner.retired);
            for q in &previous.topology.queues {
                if !topology.queues.iter().any(|n| n.plugin == q.plugin) {
                    let old = previous
                        .topology
                        .bindings
                        .iter()
                        .filter(|b| b.plugin == q.plugin)
                        .cloned();
                    if let Ok(table) = RouteTable::new(old) {
                        retired.insert(q.plugin.clone(), Arc::new(table));
                    }
                }
            }
            for q in &topology.queues {
                retired.remove(&q.plugin);
            }
        }
        match self.inner.declare(Some(&previous.topology)) {
            // Declared when Redis answers again (the mover).
            Ok(()) | Err(BusError::Unavailable(_)) => Ok(()),
            Err(e) => {
                self.inner.routing.store(previous);
                Err(e)
            }
        }
    }

    fn consume(&self, plugin: &str) -> Result<Receiver<Delivery>, BusError> {
        if self.inner.closing.load(Ordering::SeqCst) {
            return Err(BusError::Closed);
        }
        let mut consumers = lock(&self.inner.consumers);
        if let Some(c) = consumers.get(plugin) {
            return Ok(c.rx.clone());
        }
        let prefetch = self
            .inner
            .routing
            .load()
            .prefetch(plugin)
            .ok_or_else(|| BusError::NoSuchQueue(plugin.into()))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let state = Arc::new(ConsumerState::new(prefetch));
        let thread = consume::spawn(self.inner.clone(), plugin.to_string(), tx, state.clone())
            .map_err(|e| BusError::Unavailable(format!("cannot start a consumer thread: {e}")))?;
        consumers.insert(
            plugin.to_string(),
            ConsumerHandle {
                rx: rx.clone(),
                state,
                thread: Some(thread),
            },
        );
        Ok(rx)
    }

    fn publish(&self, batch: Vec<Outgoing>, _timeout: Duration) -> Result<(), BusError> {
        if batch.is_empty() {
            return Ok(());
        }
        let refs: Vec<&Outgoing> = batch.iter().collect();
        self.inner.check(&refs)?;
        // Backpressure: a group whose lag (unread) and pending (unsettled)
        // reach the plugin's queue_capacity refuses more, as the embedded bus
        // does.
        let routing = self.inner.routing.load_full();
        let mut wanted: Vec<(String, String, usize)> = Vec::new();
        for out in &batch {
            for plugin in routing.table.destinations(&out.exchange, &out.routing_key) {
                if let Some(capacity) = routing.capacity(&plugin) {
                    let key = self.inner.keys.exchange(&out.exchange);
                    if !wanted.iter().any(|(k, p, _)| *k == key && **p == *plugin) {
                        wanted.push((key, plugin.to_string(), capacity));
                    }
                }
            }
        }
        let inner = &self.inner;
        let result = inner.link.run(|con| {
            let mut full = None;
            let mut infos: HashMap<String, Vec<link::GroupInfo>> = HashMap::new();
            for (key, plugin, capacity) in &wanted {
                if !infos.contains_key(key) {
                    infos.insert(key.clone(), link::info_groups(con, key)?);
                }
                let waiting = infos
                    .get(key)
                    .and_then(|g| g.iter().find(|g| g.name == *plugin))
                    .map_or(0, link::GroupInfo::waiting);
                if waiting >= *capacity as u64 {
                    full = Some(plugin.clone());
                    break;
                }
            }
            if let Some(plugin) = full {
                return Ok(Err(BusError::Full { plugin }));
            }
            let mut pipe = redis::pipe();
            pipe.atomic();
            inner.add_outputs(&mut pipe, &batch);
            pipe.query::<Value>(con).map(|_| Ok(()))
        });
        match result {
            Ok(Ok(())) => {
                inner.record(Ok(()));
                inner.record_published(batch);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(e) => {
                if let BusError::Unavailable(why) = &e {
                    inner.record(Err(why));
                }
                Err(e)
            }
        }
    }

    fn has_exchange(&self, name: &str) -> bool {
        self.inner.routing.load().exchanges.contains(name)
    }

    fn delete_queue(&self, plugin: &str, force: bool) -> Result<(), BusError> {
        tools::delete_queue(&self.inner, plugin, force)?;
        lock(&self.inner.retired).remove(plugin);
        Ok(())
    }

    fn stop_consuming(&self, plugin: &str) {
        let handle = lock(&self.inner.consumers).remove(plugin);
        if let Some(mut c) = handle {
            c.state.stop();
            if let Some(t) = c.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_config_only_for_the_redis_streams_kind() {
        let mut config = RouterConfig::default();
        assert!(RedisBusSettings::from_config(&config).is_none());
        config.broker.url = Some(Secret::new("amqp://h"));
        assert!(RedisBusSettings::from_config(&config).is_none(), "RabbitMQ");
        config.broker.url = Some(Secret::new("redis://h:6379/2"));
        assert!(
            RedisBusSettings::from_config(&config).is_none(),
            "a redis url without kind chooses nothing"
        );
        config.broker.kind = Some(BrokerKind::RedisStreams);
        config.broker.claim_idle = Duration::from_secs(7);
        let s = RedisBusSettings::from_config(&config).unwrap();
        assert_eq!(s.url.expose(), "redis://h:6379/2");
        assert_eq!(s.claim_idle, Duration::from_secs(7));
        assert_eq!(s.stream_max_length, 1_000_000);
        assert_eq!(s.prefix, "switchboard");
        assert!(crate::bus::rabbit::RabbitSettings::from_config(&config).is_some());
    }

    #[test]
    fn an_unmatched_routing_key_is_not_the_plugins() {
        use crate::route::{Binding, ExchangeKind};
        let topology = Topology {
            bindings: vec![
                Binding {
                    exchange: "payments".into(),
                    kind: ExchangeKind::Topic,
                    pattern: "payment.*".into(),
                    plugin: "billing".into(),
                },
                Binding {
                    exchange: "dead".into(),
                    kind: ExchangeKind::Direct,
                    pattern: "dead".into(),
                    plugin: "analytics".into(),
                },
            ],
            ..Topology::default()
        };
        let routing = Routing::new(&topology).unwrap();
        assert!(routing.routes_to("payments", "payment.success", "billing"));
        assert!(!routing.routes_to("payments", "payment.success.late", "billing"));
        assert!(!routing.routes_to("payments", "payment.success", "analytics"));
        assert!(routing.routes_to("dead", "dead", "analytics"));
        assert!(!routing.routes_to("dead", "dead.letter", "analytics"));
        assert_eq!(routing.exchanges_of("billing"), ["payments"]);
    }
}
