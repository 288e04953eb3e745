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
//!
//! # Layout
//!
//! - [`plan`]: what a configuration asks of the bus, the
//!   dispatcher and the runtime.
//! - `slots`: one per configured plugin: loading (outside the lock), workers,
//!   retiring.
//! - `status`: plugin status and metrics, from a snapshot of the slots.
//! - `ingress`: events from outside onto the bus.
//! - `transport`: the embedded bus, RabbitMQ or Redis Streams.
//! - `spool`: what the embedded bus still holds at shutdown.

mod ingress;
pub mod plan;
mod slots;
mod spool;
mod status;
mod transport;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;

pub use ingress::IngressError;
pub use plan::topology;
pub use status::{PluginState, PluginStatus};
pub use transport::Transport;

use crate::bus::embedded::EmbeddedBus;
use crate::bus::rabbit::{RabbitBus, RabbitSettings};
use crate::bus::redis::{RedisBus, RedisBusSettings};
use crate::config::RouterConfig;
use crate::kv::KvStore;
use crate::metrics::{LoadResult, Metrics};
use crate::runtime::Runtime;
use slots::Slot;

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

/// Longest wait for the kv store to commit an admin write.
const KV_COMMIT_WAIT: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
        let rabbit = RabbitSettings::from_config(&config);
        let bus = match (RedisBusSettings::from_config(&config), rabbit) {
            (Some(settings), _) => Transport::Redis(RedisBus::start(settings, topology(&config))?),
            (None, Some(mut settings)) => {
                settings.confirm_seconds = Some(metrics.confirm_seconds.clone());
                Transport::Rabbit(RabbitBus::start(settings, topology(&config))?)
            }
            (None, None) => {
                let archive = if config.archive.enabled {
                    let archive = crate::archive::Archive::open(&config.state_dir, &config.archive)
                        .context("cannot open the event archive")?;
                    let archive = Arc::new(archive);
                    archive.start_flusher();
                    Some(archive)
                } else {
                    None
                };
                std::fs::create_dir_all(&config.state_dir).with_context(|| {
                    format!("cannot create state_dir {}", config.state_dir.display())
                })?;
                let timers =
                    crate::bus::timers::TimerStore::open(&config.state_dir.join("timers.redb"))
                        .map_err(anyhow::Error::msg)?;
                let bus = EmbeddedBus::with_state(archive, Arc::new(timers));
                bus.set_dead_letter_retention(config.broker.dlq_retention());
                Transport::Embedded(bus)
            }
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
    /// The newest lines `plugin` logged, oldest first.
    pub fn recent_logs(&self, plugin: &str) -> Vec<crate::runtime::LogLine> {
        self.inner.runtime.recent_logs(plugin)
    }

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

    /// The plugins' kv store (an offline replay reads through it).
    pub fn kv_store(&self) -> Arc<dyn KvStore> {
        self.inner.kv.clone()
    }

    /// The value plugin `plugin` keeps under `key` in its kv state, as the
    /// plugin would read it now.
    pub fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, crate::kv::KvError> {
        self.inner.kv.get(plugin, key)
    }

    /// Sets (`Some`) or deletes (`None`) the value plugin `plugin` keeps under
    /// `key`, returning once the write is durable; for a delete, whether a
    /// value was there.
    pub fn kv_put(
        &self,
        plugin: &str,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<bool, crate::kv::KvError> {
        let kv = &self.inner.kv;
        let existed = match value {
            Some(value) => {
                kv.set(plugin, key, value, None)?;
                true
            }
            None => kv.delete(plugin, key)?,
        };
        crate::kv::wait_durable(&**kv, KV_COMMIT_WAIT)?;
        Ok(existed)
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
        // Compile what must be (re)loaded before taking the slots lock: a
        // compile may take seconds, and status, metrics and other reloads wait
        // on that lock.
        let settings: Vec<_> = config
            .plugins
            .keys()
            .filter_map(|name| config.plugin_settings(name))
            .collect();
        let to_load: Vec<_> = {
            let slots = lock(&self.inner.slots);
            settings
                .iter()
                .filter(|s| s.enabled && slots.get(&s.name).is_none_or(|slot| slot.must_load(s)))
                .cloned()
                .collect()
        };
        let mut loaded: HashMap<String, slots::Loaded> = to_load
            .into_iter()
            .map(|s| (s.name.clone(), self.load(&s)))
            .collect();
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
        for settings in settings {
            let name = settings.name.clone();
            let compiled = loaded.remove(&name);
            let slot = match slots.remove(&name) {
                None => self.new_slot(settings, compiled),
                Some(slot) => self.update_slot(slot, settings, compiled),
            };
            slots.insert(name, slot);
        }
        drop(slots);
        self.inner.config.store(Arc::new(config));
        self.set_config_error(None);
        Ok(())
    }

    /// Records why the last configuration edit was refused (`None`: it wasn't).
    pub fn set_config_error(&self, error: Option<String>) {
        *lock(&self.inner.config_error) = error;
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

    /// Stops every plugin's workers (their queues are drained or given back
    /// already).
    fn stop_workers(&self) {
        let slots = std::mem::take(&mut *lock(&self.inner.slots));
        for slot in slots.into_values() {
            if let Some(workers) = slot.workers {
                workers.stop();
            }
        }
    }

    /// Stops ingress, waits (at most `deadline`) for queued and in-flight events
    /// to finish, stops the workers and spools what still waits to the state
    /// folder. Returns how many events were spooled.
    pub fn shutdown(&self, deadline: Duration) -> anyhow::Result<usize> {
        self.stop_ingress();
        let embedded = match &self.inner.bus {
            Transport::Embedded(bus) => bus,
            Transport::Redis(bus) => {
                // Stop reading, finish what this process holds, then stop:
                // anything unsettled stays pending and is claimed by a live
                // replica (or this one's successor) after claim_idle.
                bus.cancel_consumers();
                if !bus.drain(deadline) {
                    tracing::warn!(
                        "drain deadline reached; unfinished events stay pending in Redis"
                    );
                }
                self.stop_workers();
                bus.close();
                return Ok(0);
            }
            Transport::Rabbit(bus) => {
                // Stop new deliveries, finish what this process holds, then
                // close: anything unsettled goes back to the broker's queues.
                bus.cancel_consumers();
                if !bus.drain(deadline) {
                    tracing::warn!(
                        "drain deadline reached; unfinished events go back to the broker"
                    );
                }
                self.stop_workers();
                bus.close();
                return Ok(0);
            }
        };
        let drained = embedded.drain(deadline);
        if !drained {
            tracing::warn!("drain deadline reached; what is left will be spooled");
        }
        self.stop_workers();
        let left = embedded.take_all();
        let dead = embedded.take_dead_letters();
        let spooled = spool::save(&self.inner.config.load().state_dir, &left, &dead)?;
        embedded.close_timers();
        Ok(spooled)
    }
}
