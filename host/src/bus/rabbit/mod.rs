//! The RabbitMQ bus: the same seam as the embedded bus, on a real broker.
//!
//! - **Connection.** One AMQP connection per process, owned by a supervisor
//!   task: it connects (TLS for `amqps://`, an optional custom CA), declares the
//!   topology, opens the confirm-mode publishing channel, and when the
//!   connection dies it reconnects with backoff and declares again. Every other
//!   part waits for the next session rather than failing at once; every wait
//!   is bounded by `[broker] timeout`. Credentials never reach a log line or an
//!   error: library errors are scrubbed of the URL and the password.
//! - **Topology** ([`topology`]): exchanges, one queue per plugin, retry tiers
//!   and a dead-letter queue per plugin, declared idempotently; on a change,
//!   new bindings are made and removed ones unbound.
//! - **Delivery.** One consumer (own channel, `basic.qos` prefetch, manual
//!   acks) per plugin, feeding the plugin's worker threads. Retry and
//!   dead-letter are done by the router: it publishes a copy with its headers
//!   (attempt, error, first failure, plugin version, origin) to the retry tier
//!   or the DLQ, waits for the confirm, then acks the original. A delivery whose
//!   channel has closed is not processed (the broker has requeued it).
//! - **Publishing** is persistent, mandatory and confirmed: a batch is sent
//!   whole, then its confirms awaited together (pipelined). If the connection
//!   drops before every confirm arrived, the whole batch is published again on
//!   the next session (output ids are deterministic, so a duplicate is
//!   recognisable), within the timeout.
//! - **Replicas** are competing consumers on the same queues; an `ordered`
//!   plugin's queue has a single active consumer across all of them.

mod amqp;
mod names;
pub mod tools;
mod topology;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use crossbeam_channel::{Receiver, Sender};
use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
use serde::Serialize;
use tokio::sync::{broadcast, watch};

pub use names::Names;
use topology::Declared;

use super::{
    Bus, BusError, DeadLetter, Delivered, Delivery, Outgoing, Published, Settle, Settlement,
    Topology,
};
use crate::config::{QueueType, RouterConfig, Secret, Unroutable};

/// How to reach the broker and what to declare there.
#[derive(Debug, Clone)]
pub struct RabbitSettings {
    pub url: Secret,
    pub prefix: String,
    pub queue_type: QueueType,
    pub ca_file: Option<PathBuf>,
    pub unroutable: Unroutable,
    /// Longest wait for one broker operation.
    pub timeout: Duration,
    /// Where the declared bindings are recorded between runs.
    pub state_file: Option<PathBuf>,
    /// Observes each batch's publish-to-confirm time, when metrics are kept.
    pub confirm_seconds: Option<prometheus_client::metrics::histogram::Histogram>,
}

impl RabbitSettings {
    /// The broker settings of `config`, if it names a broker.
    pub fn from_config(config: &RouterConfig) -> Option<Self> {
        let url = config.broker.url.clone()?;
        Some(Self {
            url,
            prefix: config.broker.prefix.clone(),
            queue_type: config.broker.queue_type,
            ca_file: config.broker.ca_file.clone(),
            unroutable: config.broker.unroutable,
            timeout: config.broker.timeout,
            state_file: Some(config.state_dir.join("broker-topology.json")),
            confirm_seconds: None,
        })
    }
}

/// Opens a connection (TLS per the URL's scheme, with the custom CA if any).
/// The error is safe to show: the URL's credentials are scrubbed from it.
pub async fn connect(settings: &RabbitSettings, name: &str) -> Result<Connection, String> {
    let url = settings.url.expose();
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let tls = match &settings.ca_file {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read broker.ca_file {}: {e}", path.display()))?;
            lapin::tcp::OwnedTLSConfig {
                identity: None,
                cert_chain: Some(pem),
            }
        }
        None => lapin::tcp::OwnedTLSConfig::default(),
    };
    let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
    let connecting = Connection::connect_with_config(url, properties, tls, runtime);
    match tokio::time::timeout(settings.timeout.max(Duration::from_secs(1)), connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(format!(
            "cannot connect to {}: {}",
            settings.url,
            settings.url.scrub(&e.to_string())
        )),
        Err(_) => Err(format!(
            "cannot connect to {}: no answer within {:?}",
            settings.url, settings.timeout
        )),
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

/// One connected session: the connection and its publishing channel.
struct Session {
    connection: Connection,
    publisher: ArcSwap<Channel>,
}

impl Session {
    fn live(&self) -> bool {
        self.connection.status().connected()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConsumerMode {
    Run,
    /// No new deliveries (basic.cancel); the channel stays open so that what was
    /// delivered can still be acknowledged.
    Cancel,
    /// Close the channel: unacknowledged deliveries go back to the queue.
    Close,
}

struct ConsumerHandle {
    rx: Receiver<Delivery>,
    prefetch: watch::Sender<u16>,
    mode: watch::Sender<ConsumerMode>,
    /// Deliveries handed to workers and not settled (buffered ones included).
    outstanding: Arc<AtomicU64>,
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
}

impl Inner {
    /// The most bytes a message's properties and headers may take on the
    /// current connection (see [`amqp::header_limit`]).
    fn header_limit(&self) -> usize {
        let frame_max = self
            .session
            .load()
            .as_ref()
            .map_or(0, |s| s.connection.configuration().frame_max());
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
    /// for the first connection. Not being connected yet is not an error: the
    /// supervisor keeps trying, and `/readyz` says so.
    pub fn start(settings: RabbitSettings) -> anyhow::Result<Self> {
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
            names: Names::new(&settings.prefix),
            settings,
            runtime: Mutex::new(Some(runtime)),
            handle,
            session: ArcSwapOption::empty(),
            sessions: watch::Sender::new(0),
            desired: Mutex::new(Topology::default()),
            declared: tokio::sync::Mutex::new(declared),
            exchanges: RwLock::new(HashSet::new()),
            consumers: Mutex::new(HashMap::new()),
            link: Mutex::new(LinkStatus::default()),
            unroutable: AtomicU64::new(0),
            stream,
            closing: AtomicBool::new(false),
        });
        inner.handle.spawn(supervise(inner.clone()));
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

    /// What the broker says about `plugin`'s queues.
    pub fn queue_stats(&self, plugin: &str) -> Result<BrokerQueueStats, BusError> {
        let inner = self.inner.clone();
        let plugin = plugin.to_string();
        let in_flight = lock(&self.inner.consumers)
            .get(&plugin)
            .map_or(0, |c| c.outstanding.load(Ordering::SeqCst));
        let tiers: Vec<String> = lock(&self.inner.desired)
            .queues
            .iter()
            .filter(|q| q.plugin == plugin)
            .flat_map(|q| {
                q.retry_delays
                    .iter()
                    .map(|d| inner.names.retry_queue(&q.plugin, *d))
                    .collect::<Vec<_>>()
            })
            .collect();
        self.block(async move {
            let deadline = Instant::now() + inner.settings.timeout;
            let session = wait_session(&inner, deadline).await?;
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
        let until = Instant::now() + deadline;
        loop {
            let busy = lock(&self.inner.consumers)
                .values()
                .any(|c| c.outstanding.load(Ordering::SeqCst) > 0);
            if !busy {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
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
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    session
                        .connection
                        .close(200, "switchboard is shutting down".into()),
                )
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

/// Waits for a live session, at most until `deadline`.
async fn wait_session(inner: &Inner, deadline: Instant) -> Result<Arc<Session>, BusError> {
    let mut sessions = inner.sessions.subscribe();
    loop {
        if let Some(session) = inner.session.load_full()
            && session.live()
        {
            return Ok(session);
        }
        if inner.closing.load(Ordering::SeqCst) {
            return Err(BusError::Closed);
        }
        let why = lock(&inner.link)
            .error
            .clone()
            .unwrap_or_else(|| "connecting".into());
        match tokio::time::timeout_at(deadline.into(), sessions.changed()).await {
            Err(_) => {
                return Err(BusError::Unavailable(format!(
                    "not connected to the broker ({why})"
                )));
            }
            Ok(Err(_)) => return Err(BusError::Closed),
            Ok(Ok(())) => {}
        }
    }
}

/// The connection supervisor: connect, declare, serve until the connection
/// dies, and again, with backoff, until the bus closes.
async fn supervise(inner: Arc<Inner>) {
    let mut delay = Duration::from_millis(100);
    let mut first = true;
    while !inner.closing.load(Ordering::SeqCst) {
        let connection = match connect(&inner.settings, "switchboard").await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "broker connection failed");
                lock(&inner.link).error = Some(e);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let publisher = match open_publisher(&connection).await {
            Ok(p) => p,
            Err(e) => {
                lock(&inner.link).error = Some(format!("cannot open the publishing channel: {e}"));
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        delay = Duration::from_millis(100);
        let session = Arc::new(Session {
            connection,
            publisher: ArcSwap::from_pointee(publisher),
        });
        let declared = declare(&inner, &session).await;
        {
            let mut link = lock(&inner.link);
            link.connected = true;
            link.declared = declared.is_ok();
            link.error = declared.err();
            if !first {
                link.reconnects += 1;
            }
        }
        first = false;
        tracing::info!(url = %inner.settings.url, "connected to the broker");
        inner.session.store(Some(session.clone()));
        inner.sessions.send_modify(|g| *g += 1);

        let mut events = session.connection.events_listener();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                event = events.next() => {
                    if let Some(lapin::Event::Error(e)) = event {
                        tracing::warn!(error = %inner.settings.url.scrub(&e.to_string()), "broker connection lost");
                        break;
                    }
                    if event.is_none() {
                        break;
                    }
                }
                _ = tick.tick() => {
                    if !session.live() || inner.closing.load(Ordering::SeqCst) {
                        break;
                    }
                }
            }
        }
        if inner.closing.load(Ordering::SeqCst) {
            break;
        }
        {
            let mut link = lock(&inner.link);
            link.connected = false;
            link.declared = false;
            link.error = Some("connection lost; reconnecting".into());
        }
        inner.session.store(None);
        inner.sessions.send_modify(|g| *g += 1);
        tracing::warn!("broker connection lost; reconnecting");
    }
}

async fn open_publisher(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Declares the desired topology on `session` and records what it declared.
async fn declare(inner: &Inner, session: &Session) -> Result<(), String> {
    let desired = lock(&inner.desired).clone();
    let mut declared = inner.declared.lock().await;
    let deadline = inner.settings.timeout * 4;
    let result = tokio::time::timeout(
        deadline,
        topology::declare(
            &session.connection,
            &inner.names,
            inner.settings.queue_type,
            &desired,
            &declared,
        ),
    )
    .await
    .unwrap_or_else(|_| {
        Err(format!(
            "declaring the topology took longer than {deadline:?}"
        ))
    });
    match result {
        Ok(now) => {
            if let Some(path) = &inner.settings.state_file {
                now.save(path);
            }
            *declared = now;
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "the broker refused the topology");
            Err(e)
        }
    }
}

/// Publishes `batch` (persistent, mandatory) and waits for every confirm,
/// republishing the whole batch on the next session if the connection drops
/// first. Returns, per message, whether a queue took it.
async fn publish_confirmed(
    inner: &Inner,
    batch: &[Outgoing],
    deadline: Instant,
) -> Result<Vec<bool>, BusError> {
    loop {
        let session = wait_session(inner, deadline).await?;
        let started = Instant::now();
        match publish_on(&session, batch, deadline).await {
            Ok(routed) => {
                if let Some(histogram) = &inner.settings.confirm_seconds {
                    histogram.observe(started.elapsed().as_secs_f64());
                }
                return Ok(routed);
            }
            Err(PublishError::Refused(why)) => return Err(BusError::Unavailable(why)),
            Err(PublishError::TooLarge(why)) => return Err(BusError::TooLarge(why)),
            Err(PublishError::Lost(why)) => {
                if Instant::now() >= deadline {
                    return Err(BusError::Unavailable(format!(
                        "publish not confirmed: {why}"
                    )));
                }
                if session.live() {
                    // The channel failed but the connection lives: a new channel.
                    match open_publisher(&session.connection).await {
                        Ok(channel) => session.publisher.store(Arc::new(channel)),
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot reopen the publishing channel");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                } else {
                    tracing::debug!(error = %why, "connection lost during a publish; publishing again once reconnected");
                }
            }
        }
    }
}

/// Counts the messages no queue took and offers every published message to
/// stream watchers; returns the first unroutable (exchange, routing key).
fn record_published(
    inner: &Inner,
    batch: Vec<Outgoing>,
    routed: &[bool],
) -> Option<(String, String)> {
    let mut unroutable = None;
    for (out, routed) in batch.into_iter().zip(routed) {
        if !routed {
            inner.unroutable.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(exchange = %out.exchange, routing_key = %out.routing_key, "no queue is bound for a published message");
            unroutable.get_or_insert_with(|| (out.exchange.clone(), out.routing_key.clone()));
        }
        let _ = inner.stream.send(Arc::new(Published {
            exchange: out.exchange,
            routing_key: out.routing_key,
            message: out.message,
        }));
    }
    unroutable
}

/// Whether every message of `batch` has properties and headers that fit in one
/// frame (`limit` bytes); `Err` says which does not.
fn fits(batch: &[Outgoing], limit: usize) -> Result<(), String> {
    for out in batch {
        let len = amqp::header_len(&out.message);
        if len > limit {
            return Err(format!(
                "a message to exchange {:?} with routing key {:?} has {len} bytes of \
                 properties and headers, more than one AMQP frame holds ({limit})",
                out.exchange, out.routing_key
            ));
        }
    }
    Ok(())
}

enum PublishError {
    /// The broker said no (nack): trying again now would not help.
    Refused(String),
    /// A message the broker could not take at all (nothing was sent).
    TooLarge(String),
    /// No answer (connection or channel lost, timeout): publish again.
    Lost(String),
}

async fn publish_on(
    session: &Session,
    batch: &[Outgoing],
    deadline: Instant,
) -> Result<Vec<bool>, PublishError> {
    let channel = session.publisher.load_full();
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    // Checked before anything is sent: the batch goes whole or not at all, and
    // a header the broker cannot take would close the whole connection.
    let limit = amqp::header_limit(session.connection.configuration().frame_max());
    fits(batch, limit).map_err(PublishError::TooLarge)?;
    let mut confirms = Vec::with_capacity(batch.len());
    for out in batch {
        let properties = amqp::properties(&out.message, &[]);
        let sent = tokio::time::timeout_at(
            deadline.into(),
            channel.basic_publish(
                out.exchange.as_str().into(),
                out.routing_key.as_str().into(),
                options,
                &out.message.body,
                properties,
            ),
        )
        .await;
        match sent {
            Ok(Ok(confirm)) => confirms.push(confirm),
            Ok(Err(e)) => return Err(PublishError::Lost(e.to_string())),
            Err(_) => return Err(PublishError::Lost("timed out sending".into())),
        }
    }
    let mut routed = Vec::with_capacity(confirms.len());
    for confirm in confirms {
        match tokio::time::timeout_at(deadline.into(), confirm).await {
            Ok(Ok(Confirmation::Ack(returned))) => routed.push(returned.is_none()),
            Ok(Ok(Confirmation::NotRequested)) => routed.push(true),
            Ok(Ok(Confirmation::Nack(_))) => {
                return Err(PublishError::Refused(
                    "the broker refused the message (nack)".into(),
                ));
            }
            Ok(Err(e)) => return Err(PublishError::Lost(e.to_string())),
            Err(_) => {
                return Err(PublishError::Lost(
                    "timed out waiting for the confirm".into(),
                ));
            }
        }
    }
    Ok(routed)
}

impl Bus for RabbitBus {
    fn apply(&self, topology: &Topology) -> Result<(), BusError> {
        let previous = std::mem::replace(&mut *lock(&self.inner.desired), topology.clone());
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
        let result =
            self.block(async move { declare(&inner, &session).await.map_err(BusError::Topology) });
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
        let outstanding = Arc::new(AtomicU64::new(0));
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
            let routed = publish_confirmed(&inner, &batch, deadline).await?;
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
        let tiers: Vec<String> = inner
            .declared
            .try_lock()
            .map(|d| {
                d.tiers
                    .iter()
                    .map(|(q, _)| q.clone())
                    .filter(|q| q.starts_with(&format!("{}.retry.", inner.names.queue(&plugin))))
                    .collect()
            })
            .unwrap_or_default();
        self.block(async move {
            let deadline = Instant::now() + inner.settings.timeout;
            let session = wait_session(&inner, deadline).await?;
            let options = QueueDeleteOptions {
                if_empty: !force,
                ..QueueDeleteOptions::default()
            };
            // Tiers first: a tier's messages dead-letter into the plugin's
            // queue, so that queue must outlive them.
            let mut queues = tiers;
            queues.push(inner.names.queue(&plugin));
            queues.push(inner.names.dlq(&plugin));
            for queue in queues {
                // A refusal closes the channel: one channel per deletion.
                let channel = session
                    .connection
                    .create_channel()
                    .await
                    .map_err(|e| BusError::Unavailable(e.to_string()))?;
                let deleted = channel.queue_delete(queue.as_str().into(), options).await;
                let _ = channel.close(200, "done".into()).await;
                if let Err(e) = deleted {
                    return Err(BusError::Unavailable(format!("queue {queue:?} kept: {e}")));
                }
            }
            Ok(())
        })
    }

    fn pipelines(&self) -> bool {
        // With `dead-letter`, an unroutable output fails the input: the worker
        // must wait for the confirms to know.
        self.inner.settings.unroutable == Unroutable::Drop
    }

    fn publish_then_ack(
        &self,
        batch: Vec<Outgoing>,
        delivery: Delivery,
        timeout: Duration,
    ) -> Result<(), Box<(Delivery, BusError)>> {
        {
            let exchanges = self
                .inner
                .exchanges
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(out) = batch.iter().find(|o| !exchanges.contains(&o.exchange)) {
                let missing = out.exchange.clone();
                drop(exchanges);
                return Err(Box::new((delivery, BusError::NoSuchExchange(missing))));
            }
        }
        // Refused here, not in the task below: a batch that can never be sent
        // is a failure of the input (retried, then dead-lettered with the
        // reason), not something to put back in the queue and try again at once.
        if let Err(why) = fits(&batch, self.inner.header_limit()) {
            return Err(Box::new((delivery, BusError::TooLarge(why))));
        }
        let Delivery { delivered, settle } = delivery;
        let settle = match settle.into_any().downcast::<RabbitSettle>() {
            Ok(settle) => settle,
            Err(_) => {
                return Err(Box::new((
                    Delivery {
                        delivered,
                        settle: Box::new(NotOurs),
                    },
                    BusError::Unavailable("a delivery from another bus".into()),
                )));
            }
        };
        let inner = self.inner.clone();
        let deadline = Instant::now() + timeout.min(self.inner.settings.timeout);
        drop(delivered);
        self.inner.handle.spawn(async move {
            let published = publish_confirmed(&inner, &batch, deadline).await;
            let settled = match &published {
                Ok(routed) => {
                    record_published(&inner, batch, routed);
                    settle.acker.ack(BasicAckOptions::default()).await
                }
                Err(e) => {
                    tracing::warn!(plugin = %settle.plugin, error = %e, "outputs not confirmed; the event goes back to its queue");
                    let requeue = lapin::options::BasicNackOptions {
                        requeue: true,
                        ..lapin::options::BasicNackOptions::default()
                    };
                    settle.acker.nack(requeue).await
                }
            };
            if !matches!(settled, Ok(true)) {
                tracing::debug!(plugin = %settle.plugin, "could not settle a delivery; the broker delivers it again");
            }
            drop(settle);
        });
        Ok(())
    }

    fn stop_consuming(&self, plugin: &str) {
        if let Some(c) = lock(&self.inner.consumers).remove(plugin) {
            c.mode.send_replace(ConsumerMode::Close);
        }
    }
}

/// One plugin's consumer: follows the sessions, re-declares and resumes when
/// the broker cancels it (its queue was deleted).
struct ConsumerTask {
    bus: RabbitBus,
    plugin: String,
    tx: Sender<Delivery>,
    prefetch: watch::Receiver<u16>,
    mode: watch::Receiver<ConsumerMode>,
    outstanding: Arc<AtomicU64>,
}

enum Ended {
    Closed,
    Cancelled,
    Failed(String),
}

impl ConsumerTask {
    async fn run(mut self) {
        let inner = self.bus.inner.clone();
        let mut sessions = inner.sessions.subscribe();
        loop {
            if *self.mode.borrow() == ConsumerMode::Close || inner.closing.load(Ordering::SeqCst) {
                return;
            }
            let Some(session) = inner.session.load_full().filter(|s| s.live()) else {
                tokio::select! {
                    _ = sessions.changed() => {}
                    _ = self.mode.changed() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            };
            match self.consume(&session).await {
                Ended::Closed => return,
                Ended::Cancelled => {
                    tracing::warn!(plugin = %self.plugin, "the broker cancelled the consumer (queue deleted?); declaring again");
                    if let Err(e) = declare(&inner, &session).await {
                        tracing::error!(plugin = %self.plugin, error = %e, "cannot declare the queue again");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ended::Failed(why) => {
                    tracing::debug!(plugin = %self.plugin, error = %why, "consumer stopped; resuming on the next connection");
                    tokio::select! {
                        _ = sessions.changed() => {}
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    async fn consume(&mut self, session: &Arc<Session>) -> Ended {
        let inner = &self.bus.inner;
        let queue = inner.names.queue(&self.plugin);
        let channel = match session.connection.create_channel().await {
            Ok(c) => c,
            Err(e) => return Ended::Failed(e.to_string()),
        };
        let prefetch = *self.prefetch.borrow_and_update();
        if let Err(e) = channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
        {
            return Ended::Failed(e.to_string());
        }
        let mut consumer = match channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(c) => c,
            Err(e) => {
                let text = e.to_string();
                // 404: the queue is gone; declare it again.
                return if text.contains("NOT_FOUND") || text.contains("404") {
                    Ended::Cancelled
                } else {
                    Ended::Failed(text)
                };
            }
        };
        let mut cancelled = false;
        loop {
            tokio::select! {
                next = consumer.next(), if !cancelled => match next {
                    Some(Ok(d)) => {
                        let message = amqp::message(d.data, &d.properties);
                        let delivered = amqp::delivered(d.exchange.as_str(), d.routing_key.as_str(), message);
                        self.outstanding.fetch_add(1, Ordering::SeqCst);
                        let settle = RabbitSettle {
                            bus: self.bus.clone(),
                            plugin: self.plugin.clone(),
                            acker: d.acker,
                            outstanding: self.outstanding.clone(),
                        };
                        if self.tx.send(Delivery { delivered, settle: Box::new(settle) }).is_err() {
                            let _ = channel.close(200, "stopped".into()).await;
                            return Ended::Closed;
                        }
                    }
                    Some(Err(e)) => return Ended::Failed(e.to_string()),
                    None => {
                        return if session.live() && channel.status().connected() {
                            Ended::Cancelled
                        } else {
                            Ended::Failed("channel closed".into())
                        };
                    }
                },
                changed = self.prefetch.changed() => {
                    if changed.is_ok() {
                        let prefetch = *self.prefetch.borrow_and_update();
                        if let Err(e) = channel.basic_qos(prefetch, BasicQosOptions::default()).await {
                            return Ended::Failed(e.to_string());
                        }
                    }
                }
                changed = self.mode.changed() => {
                    let mode = if changed.is_ok() { *self.mode.borrow_and_update() } else { ConsumerMode::Close };
                    match mode {
                        ConsumerMode::Run => {}
                        ConsumerMode::Cancel => {
                            let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
                            cancelled = true;
                        }
                        ConsumerMode::Close => {
                            let _ = channel.close(200, "consumer stopped".into()).await;
                            return Ended::Closed;
                        }
                    }
                }
            }
        }
    }
}

/// A settle handle that is not this bus's (never settles anything).
struct NotOurs;

impl Settle for NotOurs {
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }

    fn settle(self: Box<Self>, _: Delivered, _: Settlement) -> Result<(), BusError> {
        Err(BusError::Unavailable("a delivery from another bus".into()))
    }
}

/// Settles one RabbitMQ delivery: ack, or a copy to the retry tier / DLQ
/// (confirmed) and then ack.
struct RabbitSettle {
    bus: RabbitBus,
    plugin: String,
    acker: lapin::Acker,
    outstanding: Arc<AtomicU64>,
}

impl Drop for RabbitSettle {
    fn drop(&mut self) {
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RabbitSettle {
    /// The retry tier nearest to `delay` among the plugin's tiers.
    fn tier(&self, delay: Duration) -> Option<Duration> {
        lock(&self.bus.inner.desired)
            .queues
            .iter()
            .find(|q| q.plugin == self.plugin)
            .and_then(|q| {
                q.retry_delays
                    .iter()
                    .min_by_key(|d| d.as_millis().abs_diff(delay.as_millis()))
                    .copied()
            })
    }
}

impl Settle for RabbitSettle {
    fn is_live(&self) -> bool {
        self.acker.usable()
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }

    fn settle(
        self: Box<Self>,
        delivered: Delivered,
        settlement: Settlement,
    ) -> Result<(), BusError> {
        let names = &self.bus.inner.names;
        let limit = self.bus.inner.header_limit();
        let copy = match &settlement {
            Settlement::Ack => None,
            Settlement::Retry { delay, failure } => {
                let Some(tier) = self.tier(*delay) else {
                    return Err(BusError::NoSuchQueue(format!(
                        "{} (no retry tier)",
                        self.plugin
                    )));
                };
                Some(Outgoing {
                    exchange: names.retry_exchange(),
                    routing_key: Names::retry_key(&self.plugin, tier),
                    message: amqp::moved(&delivered, failure, Some(failure.attempts + 1), limit),
                })
            }
            Settlement::DeadLetter { failure } => Some(Outgoing {
                exchange: names.dlx(),
                routing_key: self.plugin.clone(),
                message: amqp::moved(&delivered, failure, None, limit),
            }),
        };
        let inner = self.bus.inner.clone();
        let this = *self;
        let timeout = inner.settings.timeout;
        this.bus.clone().block(async move {
            if let Some(copy) = copy {
                let deadline = Instant::now() + timeout;
                let (exchange, key) = (copy.exchange.clone(), copy.routing_key.clone());
                let routed = publish_confirmed(&inner, std::slice::from_ref(&copy), deadline).await?;
                if routed.first() != Some(&true) {
                    return Err(BusError::Unavailable(format!(
                        "no queue took the copy sent to {exchange:?} with key {key:?}; the original stays unacknowledged"
                    )));
                }
            }
            match tokio::time::timeout(timeout, this.acker.ack(BasicAckOptions::default())).await {
                Ok(Ok(true)) => Ok(()),
                Ok(Ok(false)) => Err(BusError::Unavailable(
                    "the channel the delivery came on is closed; the broker delivers it again".into(),
                )),
                Ok(Err(e)) => Err(BusError::Unavailable(format!("ack failed: {e}"))),
                Err(_) => Err(BusError::Unavailable("ack timed out".into())),
            }
        })
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
    }
}
