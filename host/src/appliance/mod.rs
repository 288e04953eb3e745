//! The running appliance: a [`RouterConfig`] applied to a runtime, a bus and the
//! plugins' workers, and kept in step with the file and the plugins folder.
//!
//! Lifecycle: [`Appliance::start`] builds everything and applies the first
//! configuration; [`Appliance::apply`] applies a changed one live (binds and
//! unbinds routes, starts, restarts and stops workers, reloads plugins whose
//! limits or configuration changed); [`Appliance::reload_plugin`] swaps in a new
//! version of a `.wasm` file; [`Appliance::shutdown`] stops ingress, lets
//! queued and in-flight events finish, and spools whatever still waits (retries)
//! to the state folder, from where the next start puts it back.
//!
//! A plugin that fails to load never takes the appliance down: its status says
//! why, the previous version (if any) keeps serving, and its queue keeps what is
//! routed to it until a working version arrives.

mod spool;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use serde::Serialize;

use crate::bus::embedded::{EmbeddedBus, QueueStats};
use crate::bus::rabbit::{BrokerQueueStats, RabbitBus, RabbitSettings};
use crate::bus::{
    Bus, BusError, DeadLetter, ExchangeSpec, Outgoing, Published, QueueSpec, Topology,
};
use crate::config::{PluginSettings, RouterConfig};
use crate::dispatch::{DispatchSettings, DispatchStats, PluginWorkers};
use crate::envelope::{self, EnvelopeError};
use crate::kv::KvStore;
use crate::metrics::{LoadResult, Metrics, QueueFigures};
use crate::route::Binding;
use crate::runtime::{Limits, LoadError, Plugin, PluginSpec, Runtime};

/// How long a removed plugin's queue may take to drain before its workers stop.
const REMOVAL_DRAIN: Duration = Duration::from_secs(60);

/// What a plugin is doing, for `/plugins` and `switchboard check`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PluginState {
    /// A version is loaded and its workers run.
    Serving,
    /// The configured file does not exist (yet).
    Missing,
    /// The file could not be loaded and no earlier version runs.
    Failed,
    /// `enabled = false`.
    Disabled,
}

/// One plugin's status.
#[derive(Debug, Clone, Serialize)]
pub struct PluginStatus {
    pub name: String,
    pub file: PathBuf,
    pub state: PluginState,
    /// Content hash of the version serving.
    pub version: Option<String>,
    /// Why the last load failed (the previous version, if any, still serves).
    pub error: Option<String>,
    /// When the serving version was loaded, RFC 3339.
    pub loaded_at: Option<String>,
    /// Successful loads since start.
    pub loads: u64,
    /// The plugin's queue on the embedded bus.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStats>,
    /// The plugin's queues on RabbitMQ, as the broker reports them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerQueueStats>,
    /// What this process's workers did with the plugin's events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatch: Option<Arc<DispatchStats>>,
}

/// Where events travel: the in-process bus, or RabbitMQ when `[broker] url`
/// (or `RABBITMQ_URL`) names one.
#[derive(Debug, Clone)]
pub enum Transport {
    Embedded(EmbeddedBus),
    Rabbit(RabbitBus),
}

impl Transport {
    /// The bus as the dispatcher sees it.
    pub fn bus(&self) -> Arc<dyn Bus> {
        match self {
            Self::Embedded(b) => Arc::new(b.clone()),
            Self::Rabbit(b) => Arc::new(b.clone()),
        }
    }

    fn as_bus(&self) -> &dyn Bus {
        match self {
            Self::Embedded(b) => b,
            Self::Rabbit(b) => b,
        }
    }

    /// The embedded bus, if that is the transport.
    pub fn embedded(&self) -> Option<&EmbeddedBus> {
        match self {
            Self::Embedded(b) => Some(b),
            Self::Rabbit(_) => None,
        }
    }

    /// The RabbitMQ bus, if that is the transport.
    pub fn rabbit(&self) -> Option<&RabbitBus> {
        match self {
            Self::Rabbit(b) => Some(b),
            Self::Embedded(_) => None,
        }
    }

    /// Every message this process publishes (outputs and ingress).
    pub fn subscribe_stream(&self) -> tokio::sync::broadcast::Receiver<Arc<Published>> {
        match self {
            Self::Embedded(b) => b.subscribe_stream(),
            Self::Rabbit(b) => b.subscribe_stream(),
        }
    }

    /// Published messages no queue was bound for.
    pub fn unroutable(&self) -> u64 {
        match self {
            Self::Embedded(b) => b.unroutable(),
            Self::Rabbit(b) => b.unroutable(),
        }
    }

    /// Up to `limit` dead letters of `plugin`, oldest first.
    pub fn dead_letters(&self, plugin: &str, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        match self {
            Self::Embedded(b) => Ok(b.dead_letters(plugin).into_iter().take(limit).collect()),
            Self::Rabbit(b) => b.dead_letters(plugin, limit),
        }
    }

    /// Moves up to `limit` dead letters of `plugin` back to its queue.
    pub fn redrive(&self, plugin: &str, limit: usize) -> Result<usize, BusError> {
        match self {
            Self::Embedded(b) => b.redrive(plugin, limit),
            Self::Rabbit(b) => b.redrive(plugin, limit),
        }
    }

    /// Whether the transport can take events: always for the embedded bus;
    /// connected with the topology declared for RabbitMQ.
    pub fn is_ready(&self) -> bool {
        match self {
            Self::Embedded(_) => true,
            Self::Rabbit(b) => b.is_ready(),
        }
    }

    /// Whether `plugin`'s queue still holds or hands out messages.
    fn queue_busy(&self, plugin: &str) -> bool {
        match self {
            Self::Embedded(b) => b
                .stats()
                .get(plugin)
                .is_some_and(|q| q.depth > 0 || q.in_flight > 0),
            Self::Rabbit(b) => b
                .queue_stats(plugin)
                .is_ok_and(|q| q.messages > 0 || q.in_flight > 0),
        }
    }
}

/// Why an ingress publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("{0}")]
    BadEvent(#[from] EnvelopeError),
    #[error("exchange {0:?} is not declared")]
    NoSuchExchange(String),
    #[error("queue of plugin {0:?} is full; try again shortly")]
    Full(String),
    #[error("shutting down")]
    Closed,
    #[error("{0}")]
    Bus(BusError),
}

struct Slot {
    settings: PluginSettings,
    workers: Option<PluginWorkers>,
    state: PluginState,
    error: Option<String>,
    loaded_at: Option<String>,
    loads: u64,
}

struct Inner {
    runtime: Runtime,
    metrics: Arc<Metrics>,
    kv: Arc<dyn KvStore>,
    bus: Transport,
    config: ArcSwap<RouterConfig>,
    slots: Mutex<BTreeMap<String, Slot>>,
    accepting: AtomicBool,
    /// Flips to true when ingress stops; long-lived streams end on it.
    closing: tokio::sync::watch::Sender<bool>,
    /// Why the last edit of router.toml was refused, if it was.
    config_error: Mutex<Option<String>>,
}

/// The appliance. Cheap to clone.
#[derive(Clone)]
pub struct Appliance {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Appliance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appliance").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The bus topology a configuration asks for. Disabled plugins keep their
/// queue (it may hold events) but lose their bindings.
pub fn topology(config: &RouterConfig) -> Topology {
    let exchanges = config
        .exchanges
        .iter()
        .map(|e| ExchangeSpec {
            name: e.name.clone(),
            kind: e.kind,
            durable: e.durable,
        })
        .collect();
    let queues = config
        .plugins
        .keys()
        .filter_map(|name| config.plugin_settings(name))
        .map(|s| QueueSpec {
            retry_delays: s.backoff.tiers(s.max_attempts),
            plugin: s.name,
            capacity: s.queue_capacity,
            prefetch: s.prefetch,
            ordered: s.ordered,
        })
        .collect();
    let bindings = config
        .routes
        .iter()
        .filter(|r| config.plugins.get(&r.plugin).is_some_and(|p| p.enabled))
        .flat_map(|r| {
            let kind = config
                .exchange(&r.exchange)
                .map(|e| e.kind)
                .unwrap_or_default();
            r.patterns.iter().map(move |pattern| Binding {
                exchange: r.exchange.clone(),
                kind,
                pattern: pattern.clone(),
                plugin: r.plugin.clone(),
            })
        })
        .collect();
    Topology {
        exchanges,
        queues,
        bindings,
    }
}

fn dispatch_settings(s: &PluginSettings) -> DispatchSettings {
    DispatchSettings {
        concurrency: usize::from(s.concurrency.max(1)),
        max_attempts: s.max_attempts,
        backoff: s.backoff.clone(),
        cooldown: s.cooldown.clone(),
        max_hops: s.max_hops,
        output_exchange: s.output_exchange.clone(),
        dedupe: s.dedupe,
        ..DispatchSettings::default()
    }
}

fn limits(s: &PluginSettings) -> Limits {
    Limits {
        timeout: s.timeout,
        memory: s.memory.as_u64(),
        instance_reuse: s.instance_reuse,
        ..Limits::default()
    }
}

/// What must be rebuilt when settings change.
fn needs_reload(old: &PluginSettings, new: &PluginSettings) -> bool {
    old.wasm != new.wasm || old.config != new.config || limits(old) != limits(new)
}

fn needs_new_workers(old: &PluginSettings, new: &PluginSettings) -> bool {
    old.concurrency != new.concurrency || old.dedupe != new.dedupe
}

impl Appliance {
    /// Builds the runtime, the state store and the bus, puts back what the last
    /// shutdown spooled, and applies `config`.
    pub fn start(config: RouterConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("cannot create {}", config.state_dir.display()))?;
        let runtime = Runtime::new(config.runtime_config())?;
        let kv = config.open_kv()?;
        let metrics = Arc::new(Metrics::new());
        let bus = match RabbitSettings::from_config(&config) {
            Some(mut settings) => {
                settings.confirm_seconds = Some(metrics.confirm_seconds.clone());
                Transport::Rabbit(RabbitBus::start(settings, topology(&config))?)
            }
            None => Transport::Embedded(EmbeddedBus::new()),
        };
        let appliance = Self {
            inner: Arc::new(Inner {
                runtime,
                metrics,
                kv,
                bus,
                config: ArcSwap::from_pointee(config.clone()),
                slots: Mutex::new(BTreeMap::new()),
                accepting: AtomicBool::new(true),
                closing: tokio::sync::watch::Sender::new(false),
                config_error: Mutex::new(None),
            }),
        };
        appliance.apply(config)?;
        let Some(embedded) = appliance.inner.bus.embedded() else {
            // On RabbitMQ, waiting retries and dead letters live in the broker.
            return Ok(appliance);
        };
        let restored = spool::restore(&appliance.inner.config.load().state_dir, embedded)?;
        if restored > 0 {
            tracing::info!(
                restored,
                "events spooled at the last shutdown are back in their queues"
            );
        }
        Ok(appliance)
    }

    /// The transport (for stream watchers, dead letters and statistics).
    pub fn transport(&self) -> &Transport {
        &self.inner.bus
    }

    /// Ready for events: ingress open and the transport connected.
    pub fn is_ready(&self) -> bool {
        self.accepting() && self.inner.bus.is_ready()
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<RouterConfig> {
        self.inner.config.load_full()
    }

    /// Applies `config` live. The bus topology is applied first; if the bus
    /// refuses it, nothing changes. Plugin load failures do not fail the apply:
    /// they show in the plugin's status.
    pub fn apply(&self, config: RouterConfig) -> anyhow::Result<()> {
        let pending = self.inner.config.load().restart_only_changes(&config);
        if !pending.is_empty() {
            tracing::warn!(
                settings = %pending.join(", "),
                "these settings changed in router.toml but are read only at start; \
                 they apply after a restart (the rest of the change is applied now)"
            );
        }
        self.inner
            .bus
            .as_bus()
            .apply(&topology(&config))
            .context("the bus refused the new topology")?;
        let mut slots = lock(&self.inner.slots);
        let removed: Vec<String> = slots
            .keys()
            .filter(|name| !config.plugins.contains_key(*name))
            .cloned()
            .collect();
        for name in removed {
            if let Some(slot) = slots.remove(&name) {
                self.retire(name, slot);
            }
        }
        for name in config.plugins.keys() {
            let Some(settings) = config.plugin_settings(name) else {
                continue;
            };
            match slots.remove(name) {
                None => {
                    let slot = self.new_slot(settings);
                    slots.insert(name.clone(), slot);
                }
                Some(slot) => {
                    let slot = self.update_slot(slot, settings);
                    slots.insert(name.clone(), slot);
                }
            }
        }
        self.inner.config.store(Arc::new(config));
        self.set_config_error(None);
        Ok(())
    }

    /// Records why the last configuration edit was refused (`None`: it wasn't).
    pub fn set_config_error(&self, error: Option<String>) {
        *lock(&self.inner.config_error) = error;
    }

    /// The metrics, as `/metrics` serves them: counters as they stand, and the
    /// bus and queue gauges read now (on RabbitMQ, from the broker).
    pub fn metrics_text(&self) -> String {
        let metrics = &self.inner.metrics;
        match self.transport() {
            Transport::Rabbit(rabbit) => {
                let link = rabbit.status();
                metrics.set_bus(link.connected && link.declared, link.reconnects);
            }
            Transport::Embedded(_) => metrics.set_bus(true, 0),
        }
        for status in self.statuses() {
            let figures = if let Some(b) = &status.broker {
                QueueFigures {
                    messages: u64::from(b.messages),
                    consumers: u64::from(b.consumers),
                    waiting_retries: u64::from(b.waiting_retries),
                    dead_letters: u64::from(b.dead_letters),
                }
            } else if let Some(q) = &status.queue {
                let workers = lock(&self.inner.slots)
                    .get(&status.name)
                    .and_then(|s| s.workers.as_ref().map(|w| w.settings().concurrency))
                    .unwrap_or(0);
                QueueFigures {
                    messages: q.depth as u64,
                    consumers: workers as u64,
                    waiting_retries: q.waiting_retries as u64,
                    dead_letters: q.dead_letters as u64,
                }
            } else {
                continue;
            };
            metrics.set_queue(&status.name, figures);
        }
        metrics.encode()
    }

    /// Records how a router.toml reload ended, for the metrics.
    pub fn config_reloaded(&self, ok: bool) {
        self.inner.metrics.config_reloaded(if ok {
            LoadResult::ok
        } else {
            LoadResult::error
        });
    }

    /// Why the last configuration edit was refused, if it was.
    pub fn config_error(&self) -> Option<String> {
        lock(&self.inner.config_error).clone()
    }

    fn new_slot(&self, settings: PluginSettings) -> Slot {
        let mut slot = Slot {
            settings,
            workers: None,
            state: PluginState::Missing,
            error: None,
            loaded_at: None,
            loads: 0,
        };
        if !slot.settings.enabled {
            slot.state = PluginState::Disabled;
            return slot;
        }
        self.load_into(&mut slot);
        slot
    }

    fn update_slot(&self, mut slot: Slot, settings: PluginSettings) -> Slot {
        if !settings.enabled {
            if let Some(workers) = slot.workers.take() {
                workers.stop();
            }
            slot.settings = settings;
            slot.state = PluginState::Disabled;
            return slot;
        }
        let reload = needs_reload(&slot.settings, &settings) || slot.workers.is_none();
        let respawn = needs_new_workers(&slot.settings, &settings);
        slot.settings = settings;
        if reload {
            self.load_into(&mut slot);
        }
        if let Some(workers) = &slot.workers {
            if respawn {
                let plugin = workers.plugin();
                if let Some(old) = slot.workers.take() {
                    old.stop();
                }
                self.start_workers(&mut slot, plugin);
            } else {
                workers.update_settings(dispatch_settings(&slot.settings));
            }
        }
        slot
    }

    /// Loads the slot's file; on success the new version serves (swapped under
    /// running workers, or with new workers), on failure the old one stays.
    fn load_into(&self, slot: &mut Slot) {
        let name = slot.settings.name.clone();
        match self.load(&slot.settings) {
            Ok(plugin) => {
                tracing::info!(plugin = %name, version = plugin.version(), "plugin loaded");
                self.inner.metrics.plugin_loaded(&name, LoadResult::ok);
                slot.error = None;
                slot.loaded_at = Some(envelope::now_rfc3339());
                slot.loads += 1;
                match &slot.workers {
                    Some(workers) => workers.swap_plugin(plugin),
                    None => self.start_workers(slot, plugin),
                }
            }
            Err(e) => {
                let missing = matches!(&e, LoadError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
                if missing {
                    tracing::warn!(plugin = %name, file = %slot.settings.wasm.display(), "plugin file not found; waiting for it");
                } else {
                    tracing::error!(plugin = %name, error = %e, "plugin not loaded");
                    self.inner.metrics.plugin_loaded(&name, LoadResult::error);
                }
                slot.error = Some(e.to_string());
                if slot.workers.is_none() {
                    slot.state = if missing {
                        PluginState::Missing
                    } else {
                        PluginState::Failed
                    };
                }
            }
        }
    }

    fn start_workers(&self, slot: &mut Slot, plugin: Arc<Plugin>) {
        let bus = self.inner.bus.bus();
        let metrics = self.inner.metrics.plugin(&slot.settings.name);
        match PluginWorkers::start(bus, plugin, dispatch_settings(&slot.settings), metrics) {
            Ok(workers) => {
                slot.workers = Some(workers);
                slot.state = PluginState::Serving;
            }
            Err(e) => {
                slot.error = Some(format!("cannot start workers: {e}"));
                slot.state = PluginState::Failed;
            }
        }
    }

    fn load(&self, settings: &PluginSettings) -> Result<Arc<Plugin>, LoadError> {
        let mut spec =
            PluginSpec::from_file(settings.name.clone(), &settings.wasm, self.inner.kv.clone())?;
        spec.limits = limits(settings);
        spec.config = settings.config.clone();
        let (plugin, _) = self.inner.runtime.load(spec)?;
        Ok(Arc::new(plugin))
    }

    /// A plugin left the configuration: its routes are already unbound; let its
    /// queue drain, then stop its workers and delete the queue.
    fn retire(&self, name: String, slot: Slot) {
        self.inner.metrics.remove_queue(&name);
        let bus = self.inner.bus.clone();
        let workers = slot.workers;
        let spawned = std::thread::Builder::new().name(format!("retire-{name}")).spawn(move || {
            let deadline = std::time::Instant::now() + REMOVAL_DRAIN;
            while bus.queue_busy(&name) && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(workers) = workers {
                workers.stop();
            }
            // Whatever is left after the drain (or waits in a retry tier) is
            // dead-lettered as plugin_removed, never dropped.
            match bus.as_bus().delete_queue(&name, true) {
                Ok(()) => tracing::info!(plugin = %name, "plugin removed"),
                Err(e) => tracing::warn!(plugin = %name, error = %e, "plugin stopped; its queue is kept"),
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot retire a plugin");
        }
    }

    /// Loads the plugin's file again (it changed on disk). On failure the
    /// running version keeps serving and the status carries the error.
    pub fn reload_plugin(&self, name: &str) -> Result<(), String> {
        let mut slots = lock(&self.inner.slots);
        let slot = slots
            .get_mut(name)
            .ok_or_else(|| format!("no plugin {name:?} is configured"))?;
        if !slot.settings.enabled {
            return Ok(());
        }
        self.load_into(slot);
        slot.error.clone().map_or(Ok(()), Err)
    }

    /// If the version of `plugin` serving now was built from exactly the bytes
    /// now in `path`, a reload would change nothing: say so (true) and forget
    /// any error a broken file in between left in the status.
    pub fn is_serving_file(&self, plugin: &str, path: &std::path::Path) -> bool {
        let Ok(bytes) = std::fs::read(path) else {
            return false;
        };
        let version = crate::runtime::content_version(&bytes);
        let mut slots = lock(&self.inner.slots);
        let Some(slot) = slots.get_mut(plugin) else {
            return false;
        };
        let serving = slot
            .workers
            .as_ref()
            .is_some_and(|w| w.plugin().version() == version);
        if serving {
            slot.error = None;
        }
        serving
    }

    /// The plugin's file was deleted: its workers stop once their current
    /// events finish; its queue keeps what arrives until the file is back.
    pub fn plugin_file_removed(&self, name: &str) {
        let mut slots = lock(&self.inner.slots);
        let Some(slot) = slots.get_mut(name) else {
            return;
        };
        if let Some(workers) = slot.workers.take() {
            workers.stop();
        }
        slot.state = PluginState::Missing;
        slot.error = Some(format!("{} was deleted", slot.settings.wasm.display()));
        tracing::warn!(
            plugin = name,
            "plugin file deleted; plugin stopped, its queue keeps new events"
        );
    }

    /// Every plugin's status, by name.
    pub fn statuses(&self) -> Vec<PluginStatus> {
        let stats = self
            .inner
            .bus
            .embedded()
            .map(EmbeddedBus::stats)
            .unwrap_or_default();
        let rabbit = self.inner.bus.rabbit();
        lock(&self.inner.slots)
            .values()
            .map(|s| PluginStatus {
                broker: rabbit.and_then(|b| b.queue_stats(&s.settings.name).ok()),
                dispatch: s.workers.as_ref().map(PluginWorkers::stats),
                name: s.settings.name.clone(),
                file: s.settings.wasm.clone(),
                state: s.state.clone(),
                version: s.workers.as_ref().map(|w| w.plugin().version().to_string()),
                error: s.error.clone(),
                loaded_at: s.loaded_at.clone(),
                loads: s.loads,
                queue: stats.get(&s.settings.name).cloned(),
            })
            .collect()
    }

    /// Publishes an event from outside (HTTP). Refused, never dropped, when a
    /// destination queue is full or the appliance is shutting down.
    pub fn ingress(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<String, IngressError> {
        self.ingress_with(exchange, routing_key, body, content_type, &[])
    }

    /// [`Appliance::ingress`] with message headers, e.g. the request's W3C
    /// `traceparent` and `tracestate`, which then flow on to every output.
    pub fn ingress_with(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        content_type: Option<&str>,
        headers: &[(String, String)],
    ) -> Result<String, IngressError> {
        if !self.inner.accepting.load(Ordering::SeqCst) {
            return Err(IngressError::Closed);
        }
        let (mut message, id) = envelope::ingress_message(routing_key, body, content_type)?;
        for (name, value) in headers {
            if !message.headers.iter().any(|(k, _)| k == name) {
                message.headers.push((name.clone(), value.clone()));
            }
        }
        let out = Outgoing {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            message,
        };
        match self.inner.bus.as_bus().publish(vec![out], Duration::ZERO) {
            Ok(()) => Ok(id),
            Err(BusError::Full { plugin }) => Err(IngressError::Full(plugin)),
            Err(BusError::NoSuchExchange(e)) => Err(IngressError::NoSuchExchange(e)),
            Err(e) => Err(IngressError::Bus(e)),
        }
    }

    /// Whether ingress is open.
    pub fn accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::SeqCst)
    }

    /// Stops ingress (503 from now on) and ends live streams. Workers go on.
    pub fn stop_ingress(&self) {
        self.inner.accepting.store(false, Ordering::SeqCst);
        self.inner.closing.send_replace(true);
    }

    /// Resolves once ingress has stopped.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static + use<> {
        let mut rx = self.inner.closing.subscribe();
        async move {
            let _ = rx.wait_for(|closing| *closing).await;
        }
    }

    /// Stops ingress, waits (at most `deadline`) for queued and in-flight events
    /// to finish, stops the workers and spools what still waits to the state
    /// folder. Returns how many events were spooled.
    pub fn shutdown(&self, deadline: Duration) -> anyhow::Result<usize> {
        self.stop_ingress();
        let embedded = match &self.inner.bus {
            Transport::Embedded(bus) => bus,
            Transport::Rabbit(bus) => {
                // Stop new deliveries, finish what this process holds, then
                // close: anything unsettled goes back to the broker's queues.
                bus.cancel_consumers();
                if !bus.drain(deadline) {
                    tracing::warn!(
                        "drain deadline reached; unfinished events go back to the broker"
                    );
                }
                let slots = std::mem::take(&mut *lock(&self.inner.slots));
                for slot in slots.into_values() {
                    if let Some(workers) = slot.workers {
                        workers.stop();
                    }
                }
                bus.close();
                return Ok(0);
            }
        };
        let drained = embedded.drain(deadline);
        if !drained {
            tracing::warn!("drain deadline reached; what is left will be spooled");
        }
        let slots = std::mem::take(&mut *lock(&self.inner.slots));
        for slot in slots.into_values() {
            if let Some(workers) = slot.workers {
                workers.stop();
            }
        }
        let left = embedded.take_all();
        let dead = embedded.take_dead_letters();
        let spooled = spool::save(&self.inner.config.load().state_dir, &left, &dead)?;
        Ok(spooled)
    }
}
