//! The RabbitMQ bus: the same seam as the embedded bus, on a real broker.
//!
//! One event's path through it, file by file:
//!
//! - `session`: the two connections per process (consuming, publishing),
//!   their supervisor (reconnect with backoff, declare again), and waiting for
//!   a session.
//! - `topology`: exchanges, one queue per plugin, retry tiers and a
//!   dead-letter queue per plugin, declared idempotently from the
//!   configuration; only what the configuration no longer names is unbound.
//! - `consume`: one consumer per plugin feeding its worker threads.
//! - `settle`: the one path by which a delivery ends (outputs, retry or dead
//!   letter; ack only after every copy is confirmed; never held on failure).
//! - `publish`: persistent, mandatory, confirmed publishing; where a return
//!   decides something, one batch per channel at a time so that it is credited
//!   to the right message.
//! - `amqp`: messages and headers between AMQP and the bus (also how the
//!   archive reader turns the archive stream's deliveries into messages).
//!
//! With `[archive]`, `topology` also declares the archive stream
//! (`<prefix>.archive`) and binds it to the archived exchanges; the
//! archive's reader is `crate::archive::stream`.
//!
//! **Replicas** are competing consumers on the same queues; an `ordered`
//! plugin's queue has a single active consumer across all of them.

pub(crate) mod amqp;
mod consume;
pub mod delays;
mod names;
mod publish;
mod session;
mod settle;
pub mod tools;
mod topology;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use crossbeam_channel::Receiver;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use consume::{ConsumerMode, ConsumerTask};
pub use names::Names;
use publish::{Returns, publish_confirmed, record_published};
pub use publish::{describe, is_not_found};
pub use session::connect;
use session::{Session, wait_session};
use topology::Declared;

use super::{Bus, BusError, DeadLetter, Delivered, Delivery, Outgoing, Published, Topology};
use crate::config::{ArchiveConfig, QueueType, RouterConfig, Secret, Unroutable};

/// How to reach the broker and what to declare there.
#[derive(Debug, Clone)]
pub struct RabbitSettings {
    pub url: Secret,
    pub prefix: String,
    pub queue_type: QueueType,
    /// What the dead-letter queues keep (their `x-message-ttl` and
    /// `x-max-length`).
    pub dlq: crate::config::DlqRetention,
    pub ca_file: Option<PathBuf>,
    pub unroutable: Unroutable,
    /// Longest wait for one broker operation.
    pub timeout: Duration,
    /// Where the declared bindings are recorded between runs.
    pub state_file: Option<PathBuf>,
    /// Observes each batch's publish-to-confirm time, when metrics are kept.
    pub confirm_seconds: Option<prometheus_client::metrics::histogram::Histogram>,
    /// `[archive]`, when enabled: the archive stream is declared and bound to
    /// the archived exchanges. Read at start, as on the embedded bus.
    pub archive: Option<ArchiveConfig>,
}

impl RabbitSettings {
    /// The broker settings of `config`, if it names a broker.
    pub fn from_config(config: &RouterConfig) -> Option<Self> {
        let url = config.broker.url.clone()?;
        Some(Self {
            url,
            prefix: config.broker.prefix.clone(),
            queue_type: config.broker.queue_type,
            dlq: config.broker.dlq_retention(),
            ca_file: config.broker.ca_file.clone(),
            unroutable: config.broker.unroutable,
            timeout: config.broker.timeout,
            state_file: Some(config.state_dir.join("broker-topology.json")),
            confirm_seconds: None,
            archive: config.archive.enabled.then(|| config.archive.clone()),
        })
    }
}

/// The connection as `/readyz` and metrics see it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkStatus {
    pub connected: bool,
    /// The topology is declared on the current connection.
    pub declared: bool,
    /// Why the last connection or declaration failed.
    pub error: Option<String>,
    /// Connections lost since start.
    pub reconnects: u64,
}

/// A plugin queue as the broker reports it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct BrokerQueueStats {
    /// Ready messages in the plugin's queue (all replicas).
    pub messages: u32,
    /// Consumers on it (all replicas).
    pub consumers: u32,
    /// Messages waiting in its retry tiers.
    pub waiting_retries: u32,
    /// Messages in its dead-letter queue.
    pub dead_letters: u32,
    /// Deliveries this process holds and has not settled.
    pub in_flight: u64,
}

struct ConsumerHandle {
    rx: Receiver<Delivery>,
    prefetch: watch::Sender<u16>,
    mode: watch::Sender<ConsumerMode>,
    /// Deliveries handed to workers and not settled (buffered ones included).
    outstanding: Arc<watch::Sender<u64>>,
}

struct Inner {
    settings: RabbitSettings,
    names: Names,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    session: ArcSwapOption<Session>,
    /// Bumped whenever a session opens or closes.
    sessions: watch::Sender<u64>,
    desired: Mutex<Topology>,
    declared: tokio::sync::Mutex<Declared>,
    exchanges: RwLock<HashSet<String>>,
    consumers: Mutex<HashMap<String, ConsumerHandle>>,
    link: Mutex<LinkStatus>,
    unroutable: AtomicU64,
    stream: broadcast::Sender<Arc<Published>>,
    closing: AtomicBool,
    /// A declaration of the whole topology is under way (see
    /// [`session::redeclare`]).
    redeclaring: AtomicBool,
    /// Retry delays of plugins removed from the configuration whose queues
    /// are not deleted yet (their tiers may hold retries).
    retired: Mutex<HashMap<String, Vec<Duration>>>,
    /// Why the broker blocks the publishing connection (a resource alarm), while
    /// it does: nothing is sent meanwhile, since the broker would read it only
    /// after the alarm, as a copy of what the router has since sent again.
    blocked: watch::Sender<Option<String>>,
}

impl Inner {
    /// The retry delays of `plugin`: configured, or removed from the
    /// configuration while its queue is not deleted yet (its tiers stay until
    /// then).
    fn retry_delays(&self, plugin: &str) -> Option<Vec<Duration>> {
        lock(&self.desired)
            .queues
            .iter()
            .find(|q| q.plugin == plugin)
            .map(|q| q.retry_delays.clone())
            .or_else(|| lock(&self.retired).get(plugin).cloned())
    }

    /// The most bytes a message's properties and headers may take on the
    /// current connection (see [`amqp::header_limit`]).
    fn header_limit(&self) -> usize {
        let frame_max = self
            .session
            .load()
            .as_ref()
            .map_or(0, |s| s.publishing.configuration().frame_max());
        amqp::header_limit(frame_max)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The RabbitMQ bus. Cheap to clone.
#[derive(Clone)]
pub struct RabbitBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RabbitBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitBus")
            .field("url", &self.inner.settings.url)
            .finish_non_exhaustive()
    }
}

impl RabbitBus {
    /// Starts the connection supervisor and waits (at most the broker timeout)
    /// for the first connection, which declares `topology` (the configured
    /// one, whether or not its plugins have loaded). Not being connected yet
    /// is not an error: the supervisor keeps trying, and `/readyz` says so.
    ///
    /// The first declaration is the configuration's, never an empty one: what
    /// the last run bound and the configuration still routes stays bound
    /// throughout a restart, so what services publish meanwhile waits in the
    /// plugins' queues instead of being dropped as unroutable.
    pub fn start(settings: RabbitSettings, topology: Topology) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("switchboard-amqp")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let declared = settings
            .state_file
            .as_deref()
            .and_then(Declared::load)
            .unwrap_or_default();
        let (stream, _) = broadcast::channel(4096);
        let inner = Arc::new(Inner {
            names: Names::new(&settings.prefix).with_archive(settings.archive.clone()),
            settings,
            runtime: Mutex::new(Some(runtime)),
            handle,
            session: ArcSwapOption::empty(),
            sessions: watch::Sender::new(0),
            exchanges: RwLock::new(topology.exchanges.iter().map(|e| e.name.clone()).collect()),
            desired: Mutex::new(topology),
            declared: tokio::sync::Mutex::new(declared),
            consumers: Mutex::new(HashMap::new()),
            link: Mutex::new(LinkStatus::default()),
            unroutable: AtomicU64::new(0),
            stream,
            closing: AtomicBool::new(false),
            redeclaring: AtomicBool::new(false),
            retired: Mutex::new(HashMap::new()),
            blocked: watch::Sender::new(None),
        });
        inner.handle.spawn(session::supervise(inner.clone()));
        inner.handle.spawn(delays::serve(inner.clone()));
        let bus = Self { inner };
        let deadline = Instant::now() + bus.inner.settings.timeout;
        while bus.inner.session.load().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if bus.inner.session.load().is_none() {
            let why = bus.status().error.unwrap_or_default();
            tracing::warn!(error = %why, "not connected to the broker yet; retrying in the background");
        }
        Ok(bus)
    }

    /// Runs `fut` on the bus's runtime and waits for it, from any thread.
    fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, BusError>> + Send + 'static,
    ) -> Result<T, BusError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.inner.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().unwrap_or(Err(BusError::Closed))
    }

    /// The connection's state.
    pub fn status(&self) -> LinkStatus {
        lock(&self.inner.link).clone()
    }

    /// Connected, with the topology declared.
    pub fn is_ready(&self) -> bool {
        let status = self.status();
        status.connected && status.declared
    }

    /// Outputs published that no queue was bound for.
    pub fn unroutable(&self) -> u64 {
        self.inner.unroutable.load(Ordering::Relaxed)
    }

    /// Every message this process publishes (outputs and ingress).
    pub fn subscribe_stream(&self) -> broadcast::Receiver<Arc<Published>> {
        self.inner.stream.subscribe()
    }

    /// The names declared for this prefix.
    pub fn names(&self) -> &Names {
        &self.inner.names
    }

    /// The retry tier queues of `plugin` (configured, or removed and not
    /// deleted yet).
    fn tiers_of(&self, plugin: &str) -> Vec<String> {
        self.inner
            .retry_delays(plugin)
            .unwrap_or_default()
            .into_iter()
            .map(|d| self.inner.names.retry_queue(plugin, d))
            .collect()
    }

    /// What the broker says about `plugin`'s queues.
    pub fn queue_stats(&self, plugin: &str) -> Result<BrokerQueueStats, BusError> {
        let inner = self.inner.clone();
        let plugin = plugin.to_string();
        let in_flight = lock(&self.inner.consumers)
            .get(&plugin)
            .map_or(0, |c| *c.outstanding.borrow());
        let tiers = self.tiers_of(&plugin);
        let timeout = self.inner.settings.timeout;
        self.block(async move {
            let deadline = Instant::now() + inner.settings.timeout;
            let session = wait_session(&inner, deadline).await?;
            let asked = async {
                let (messages, consumers) =
                    tools::depth(&session.connection, &inner.names.queue(&plugin))
                        .await
                        .map_err(BusError::Unavailable)?
                        .ok_or_else(|| BusError::NoSuchQueue(plugin.clone()))?;
                let dead_letters = tools::depth(&session.connection, &inner.names.dlq(&plugin))
                    .await
                    .map_err(BusError::Unavailable)?
                    .map_or(0, |(m, _)| m);
                let mut waiting_retries = 0;
                for tier in tiers {
                    if let Some((m, _)) = tools::depth(&session.connection, &tier)
                        .await
                        .map_err(BusError::Unavailable)?
                    {
                        waiting_retries += m;
                    }
                }
                Ok(BrokerQueueStats {
                    messages,
                    consumers,
                    waiting_retries,
                    dead_letters,
                    in_flight,
                })
            };
            // A status page must answer even when the broker does not.
            tokio::time::timeout_at(deadline.into(), asked)
                .await
                .unwrap_or_else(|_| {
                    Err(BusError::Unavailable(format!(
                        "the broker did not answer within {timeout:?}"
                    )))
                })
        })
    }

    /// Delayed outputs waiting on the broker: the messages in the delay
    /// ladder's queues and in `<prefix>.delay.due` (all replicas').
    pub fn delayed_waiting(&self) -> Result<u64, BusError> {
        let inner = self.inner.clone();
        let timeout = self.inner.settings.timeout;
        self.block(async move {
            let deadline = Instant::now() + inner.settings.timeout;
            let session = wait_session(&inner, deadline).await?;
            let asked = async {
                let mut queues: Vec<String> = (0..names::DELAY_STEPS)
                    .map(|k| inner.names.delay_queue(k))
                    .collect();
                queues.push(inner.names.delay_due());
                let mut waiting = 0u64;
                for queue in queues {
                    if let Some((m, _)) = tools::depth(&session.connection, &queue)
                        .await
                        .map_err(BusError::Unavailable)?
                    {
                        waiting += u64::from(m);
                    }
                }
                Ok(waiting)
            };
            tokio::time::timeout_at(deadline.into(), asked)
                .await
                .unwrap_or_else(|_| {
                    Err(BusError::Unavailable(format!(
                        "the broker did not answer within {timeout:?}"
                    )))
                })
        })
    }

    /// Up to `limit` dead letters of `plugin`, oldest first; they stay in the
    /// dead-letter queue.
    pub fn dead_letters(&self, plugin: &str, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        let inner = self.inner.clone();
        let queue = self.inner.names.dlq(plugin);
        self.block(async move {
            let deadline = Instant::now() + inner.settings.timeout;
            let session = wait_session(&inner, deadline).await?;
            tools::peek(&session.connection, &queue, limit)
                .await
                .map_err(BusError::Unavailable)
        })
    }

    /// Moves up to `limit` dead letters of `plugin` back to its queue, as first
    /// attempts. Returns how many moved.
    pub fn redrive(&self, plugin: &str, limit: usize) -> Result<usize, BusError> {
        let inner = self.inner.clone();
        let plugin = plugin.to_string();
        self.block(async move {
            let deadline = Instant::now() + inner.settings.timeout;
            let session = wait_session(&inner, deadline).await?;
            tools::redrive(
                &session.connection,
                &inner.names,
                &plugin,
                limit,
                inner.settings.timeout,
            )
            .await
            .map_err(BusError::Unavailable)
        })
    }

    /// Moves the dead letters of `plugin` whose [`DeadLetter::id`] is one of
    /// `ids` back to its queue, as first attempts; the others stay. Returns
    /// the ids of the letters moved, one per letter.
    pub fn redrive_ids(
        &self,
        plugin: &str,
        ids: &std::collections::BTreeSet<String>,
    ) -> Result<Vec<String>, BusError> {
        let inner = self.inner.clone();
        let plugin = plugin.to_string();
        let ids = ids.clone();
        self.block(async move {
            let deadline = Instant::now() + inner.settings.timeout;
            let session = wait_session(&inner, deadline).await?;
            tools::redrive_ids(
                &session.connection,
                &inner.names,
                &plugin,
                &ids,
                inner.settings.timeout,
            )
            .await
            .map_err(BusError::Unavailable)
        })
    }

    /// Puts `messages` in `plugin`'s queue as first attempts (a replay);
    /// returns how many, all confirmed.
    pub fn deliver(&self, plugin: &str, messages: Vec<Delivered>) -> Result<usize, BusError> {
        let inner = self.inner.clone();
        let plugin = plugin.to_string();
        self.block(async move {
            let deadline = Instant::now() + inner.settings.timeout;
            let session = wait_session(&inner, deadline).await?;
            tools::deliver(
                &session.connection,
                &inner.names,
                &plugin,
                messages,
                inner.settings.timeout,
            )
            .await
            .map_err(BusError::Unavailable)
        })
    }

    /// Stops every consumer taking new deliveries; what was delivered can still
    /// be settled. The first step of a graceful shutdown.
    pub fn cancel_consumers(&self) {
        for c in lock(&self.inner.consumers).values() {
            c.mode.send_replace(ConsumerMode::Cancel);
        }
    }

    /// Waits until every delivery handed to this process is settled, at most
    /// `deadline`; true if that happened.
    pub fn drain(&self, deadline: Duration) -> bool {
        let counts: Vec<watch::Receiver<u64>> = lock(&self.inner.consumers)
            .values()
            .map(|c| c.outstanding.subscribe())
            .collect();
        self.block(async move {
            let settled = async {
                for mut count in counts {
                    let _ = count.wait_for(|n| *n == 0).await;
                }
            };
            Ok(tokio::time::timeout(deadline, settled).await.is_ok())
        })
        .unwrap_or(false)
    }

    /// Closes every consumer channel and the connection. Unsettled deliveries
    /// go back to their queues (the broker redelivers them to a replica).
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        for (_, c) in lock(&self.inner.consumers).drain() {
            c.mode.send_replace(ConsumerMode::Close);
        }
        let inner = self.inner.clone();
        let _ = self.block(async move {
            // Give consumer tasks a moment to close their channels cleanly.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(session) = inner.session.swap(None) {
                let bye = "switchboard is shutting down";
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = session.publishing.close(200, bye.into()).await;
                    let _ = session.connection.close(200, bye.into()).await;
                })
                .await;
            }
            inner.sessions.send_modify(|g| *g += 1);
            Ok(())
        });
        if let Some(runtime) = lock(&self.inner.runtime).take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(runtime) = lock(&self.runtime).take() {
            runtime.shutdown_background();
        }
    }
}

impl Bus for RabbitBus {
    fn apply(&self, topology: &Topology) -> Result<(), BusError> {
        let previous = std::mem::replace(&mut *lock(&self.inner.desired), topology.clone());
        {
            let mut retired = lock(&self.inner.retired);
            for q in &previous.queues {
                if !topology.queues.iter().any(|n| n.plugin == q.plugin) {
                    retired.insert(q.plugin.clone(), q.retry_delays.clone());
                }
            }
            for q in &topology.queues {
                retired.remove(&q.plugin);
            }
        }
        *self
            .inner
            .exchanges
            .write()
            .unwrap_or_else(PoisonError::into_inner) =
            topology.exchanges.iter().map(|e| e.name.clone()).collect();
        for q in &topology.queues {
            if let Some(c) = lock(&self.inner.consumers).get(&q.plugin) {
                c.prefetch.send_if_modified(|p| {
                    let changed = *p != q.prefetch;
                    *p = q.prefetch;
                    changed
                });
            }
        }
        let Some(session) = self.inner.session.load_full().filter(|s| s.live()) else {
            // Declared when the connection comes.
            return Ok(());
        };
        let inner = self.inner.clone();
        let result = self.block(async move {
            session::declare(&inner, &session)
                .await
                .map_err(BusError::Topology)
        });
        let mut link = lock(&self.inner.link);
        match &result {
            Ok(()) => {
                link.declared = true;
                link.error = None;
            }
            Err(_) => {
                drop(link);
                // Keep declaring what was accepted before, not what was refused.
                *lock(&self.inner.desired) = previous;
            }
        }
        result
    }

    fn consume(&self, plugin: &str) -> Result<Receiver<Delivery>, BusError> {
        if self.inner.closing.load(Ordering::SeqCst) {
            return Err(BusError::Closed);
        }
        let mut consumers = lock(&self.inner.consumers);
        if let Some(c) = consumers.get(plugin) {
            return Ok(c.rx.clone());
        }
        let spec = lock(&self.inner.desired)
            .queues
            .iter()
            .find(|q| q.plugin == plugin)
            .cloned()
            .ok_or_else(|| BusError::NoSuchQueue(plugin.into()))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let (prefetch, prefetch_rx) = watch::channel(spec.prefetch.max(1));
        let (mode, mode_rx) = watch::channel(ConsumerMode::Run);
        let outstanding = Arc::new(watch::Sender::new(0));
        let task = ConsumerTask {
            bus: self.clone(),
            plugin: plugin.to_string(),
            tx,
            prefetch: prefetch_rx,
            mode: mode_rx,
            outstanding: outstanding.clone(),
        };
        self.inner.handle.spawn(task.run());
        consumers.insert(
            plugin.to_string(),
            ConsumerHandle {
                rx: rx.clone(),
                prefetch,
                mode,
                outstanding,
            },
        );
        Ok(rx)
    }

    fn publish(&self, batch: Vec<Outgoing>, timeout: Duration) -> Result<(), BusError> {
        {
            let exchanges = self
                .inner
                .exchanges
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(out) = batch.iter().find(|o| !exchanges.contains(&o.exchange)) {
                return Err(BusError::NoSuchExchange(out.exchange.clone()));
            }
        }
        let inner = self.inner.clone();
        // Ingress passes no timeout (it must not wait for room on the embedded
        // bus); a broker publish still needs its confirm.
        let wait = if timeout.is_zero() {
            self.inner.settings.timeout
        } else {
            timeout.min(self.inner.settings.timeout)
        };
        let deadline = Instant::now() + wait;
        self.block(async move {
            let returns = match inner.settings.unroutable {
                Unroutable::DeadLetter => Returns::Decide,
                Unroutable::Drop => Returns::Count,
            };
            let routed = publish_confirmed(&inner, &batch, deadline, returns).await?;
            let unroutable = record_published(&inner, batch, &routed);
            match (unroutable, inner.settings.unroutable) {
                (Some((exchange, routing_key)), Unroutable::DeadLetter) => {
                    Err(BusError::Unroutable {
                        exchange,
                        routing_key,
                    })
                }
                _ => Ok(()),
            }
        })
    }

    fn has_exchange(&self, name: &str) -> bool {
        self.inner
            .exchanges
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(name)
    }

    fn delete_queue(&self, plugin: &str, force: bool) -> Result<(), BusError> {
        let inner = self.inner.clone();
        let plugin = plugin.to_string();
        let tiers = self.tiers_of(&plugin);
        self.block(async move {
            let deadline = Instant::now() + inner.settings.timeout;
            let session = wait_session(&inner, deadline).await?;
            let connection = &session.connection;
            let (names, timeout) = (&inner.names, inner.settings.timeout);
            let queue = names.queue(&plugin);
            // Retries waiting in the tiers would come back to a queue nobody
            // reads: they go to the dead-letter queue, as on the embedded bus.
            // Tiers first: a tier's messages dead-letter into the plugin's queue.
            let mut moved = 0;
            for tier in &tiers {
                moved += tools::dead_letter_all(connection, names, &plugin, tier, timeout)
                    .await
                    .map_err(BusError::Unavailable)?;
                tools::delete_if_empty(connection, tier)
                    .await
                    .map_err(BusError::Unavailable)?;
            }
            if force {
                moved += tools::dead_letter_all(connection, names, &plugin, &queue, timeout)
                    .await
                    .map_err(BusError::Unavailable)?;
            }
            if moved > 0 {
                tracing::warn!(plugin = %plugin, moved, "events of a removed plugin dead-lettered (plugin_removed)");
            }
            if !tools::delete_if_empty(connection, &queue)
                .await
                .map_err(BusError::Unavailable)?
            {
                return Err(BusError::Unavailable(format!(
                    "queue {queue:?} still holds messages; kept"
                )));
            }
            // Dead letters are the operator's: the DLQ goes only when empty.
            let dlq = names.dlq(&plugin);
            if !tools::delete_if_empty(connection, &dlq)
                .await
                .map_err(BusError::Unavailable)?
            {
                tracing::info!(queue = %dlq, "the removed plugin's dead-letter queue holds messages; kept");
            }
            lock(&inner.retired).remove(&plugin);
            Ok(())
        })
    }

    fn stop_consuming(&self, plugin: &str) {
        if let Some(c) = lock(&self.inner.consumers).remove(plugin) {
            c.mode.send_replace(ConsumerMode::Close);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_config() {
        let mut config = RouterConfig::default();
        assert!(RabbitSettings::from_config(&config).is_none());
        config.broker.url = Some(Secret::new("amqp://u:p@h:5672/v"));
        let s = RabbitSettings::from_config(&config).unwrap();
        assert_eq!(s.prefix, "switchboard");
        assert_eq!(s.queue_type, QueueType::Quorum);
        assert!(s.archive.is_none(), "no archive unless enabled");
        config.archive.enabled = true;
        let s = RabbitSettings::from_config(&config).unwrap();
        assert_eq!(s.archive, Some(config.archive.clone()));
    }
}
