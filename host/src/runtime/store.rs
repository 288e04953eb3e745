//! What a wasmtime `Store` holds for one plugin instance: the sandboxed WASI
//! context, the memory limiter, and each capability's state. A store lives as long
//! as its instance: one event when instances are fresh, up to `instance_reuse`
//! events otherwise, and never past a trap.

use std::sync::Arc;

use super::capability::config::PluginConfig;
use super::capability::kv::KvState;
use super::capability::logging::LogState;
use super::capability::wasi::WasiState;
use super::limits::MemoryLimiter;

/// What every instance of one plugin version shares.
pub(crate) struct PluginContext {
    pub(crate) name: Arc<str>,
    pub(crate) config: PluginConfig,
    pub(crate) kv: KvState,
    /// How fast this plugin may log, across all its instances.
    pub(crate) log_limit: super::capability::logging::RateLimit,
    /// Where its newest log lines are kept.
    pub(crate) recent: Arc<super::capability::logging::RecentLogs>,
}

/// The data of one instance's `Store`.
pub(crate) struct InstanceState {
    pub(crate) wasi: WasiState,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) log: LogState,
    pub(crate) plugin: Arc<PluginContext>,
    /// The event being handled, for log lines.
    pub(crate) event_id: String,
    /// The store's latest write number seen by this event's kv calls (0: none).
    pub(crate) kv_mark: u64,
}

impl InstanceState {
    pub(crate) fn new(plugin: Arc<PluginContext>, memory_limit: u64) -> Self {
        Self {
            wasi: WasiState::sandboxed(),
            limiter: MemoryLimiter::new(memory_limit),
            log: LogState::default(),
            plugin,
            event_id: String::new(),
            kv_mark: 0,
        }
    }
}
