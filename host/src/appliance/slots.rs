//! Slots: one per configured plugin, holding its settings, the workers serving
//! it and how its last load went. Compiling a plugin (which may take seconds)
//! happens outside the slots lock; only installing the result takes it.

use std::sync::Arc;
use std::time::Duration;

use super::plan::{dispatch_settings, limits, needs_new_workers, needs_reload};
use super::{Appliance, PluginState, lock};
use crate::config::PluginSettings;
use crate::dispatch::PluginWorkers;
use crate::envelope;
use crate::metrics::LoadResult;
use crate::runtime::{LoadError, Plugin, PluginSpec};

/// How long a removed plugin's queue may take to drain before its workers stop.
const REMOVAL_DRAIN: Duration = Duration::from_secs(60);

/// A plugin version compiled for a slot, or why it could not be.
pub(super) type Loaded = Result<Arc<Plugin>, LoadError>;

pub(super) struct Slot {
    pub(super) settings: PluginSettings,
    pub(super) workers: Option<PluginWorkers>,
    pub(super) state: PluginState,
    pub(super) error: Option<String>,
    pub(super) loaded_at: Option<String>,
    pub(super) loads: u64,
}

impl Slot {
    /// Whether taking `new` settings means loading the plugin's file again.
    pub(super) fn must_load(&self, new: &PluginSettings) -> bool {
        needs_reload(&self.settings, new) || self.workers.is_none()
    }
}

impl Appliance {
    /// A slot for a newly configured plugin, with its version compiled by
    /// the caller (`None`: compile it here).
    pub(super) fn new_slot(&self, settings: PluginSettings, compiled: Option<Loaded>) -> Slot {
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
        let compiled = compiled.unwrap_or_else(|| self.load(&slot.settings));
        self.install(&mut slot, compiled);
        slot
    }

    pub(super) fn update_slot(
        &self,
        mut slot: Slot,
        settings: PluginSettings,
        compiled: Option<Loaded>,
    ) -> Slot {
        if !settings.enabled {
            if let Some(workers) = slot.workers.take() {
                workers.stop();
            }
            slot.settings = settings;
            slot.state = PluginState::Disabled;
            return slot;
        }
        let reload = slot.must_load(&settings);
        let respawn = needs_new_workers(&slot.settings, &settings);
        slot.settings = settings;
        if reload {
            let compiled = compiled.unwrap_or_else(|| self.load(&slot.settings));
            self.install(&mut slot, compiled);
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

    /// Installs a compiled version in the slot: it serves (swapped under
    /// running workers, or with new workers); on a load error the old one
    /// stays and the status says why.
    fn install(&self, slot: &mut Slot, compiled: Loaded) {
        let name = slot.settings.name.clone();
        match compiled {
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

    /// Compiles (or takes from the cache) the plugin's file. Called without
    /// the slots lock held.
    pub(super) fn load(&self, settings: &PluginSettings) -> Loaded {
        let mut spec =
            PluginSpec::from_file(settings.name.clone(), &settings.wasm, self.inner.kv.clone())?;
        spec.limits = limits(settings);
        spec.config = settings.config.clone();
        let (plugin, _) = self.inner.runtime.load(spec)?;
        Ok(Arc::new(plugin))
    }

    /// A plugin left the configuration: its routes are already unbound; let its
    /// queue drain, then stop its workers and delete the queue.
    pub(super) fn retire(&self, name: String, slot: Slot) {
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
        let settings = lock(&self.inner.slots)
            .get(name)
            .map(|slot| slot.settings.clone())
            .ok_or_else(|| format!("no plugin {name:?} is configured"))?;
        if !settings.enabled {
            return Ok(());
        }
        let compiled = self.load(&settings);
        let mut slots = lock(&self.inner.slots);
        let slot = slots
            .get_mut(name)
            .ok_or_else(|| format!("no plugin {name:?} is configured"))?;
        if slot.settings != settings {
            // The configuration changed while this compiled; its apply loaded
            // what it needed.
            return Ok(());
        }
        self.install(slot, compiled);
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
}
