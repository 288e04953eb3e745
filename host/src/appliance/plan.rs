//! The plan: what a configuration asks of the bus (the topology, from
//! router.toml alone, whether or not a plugin has loaded), of the dispatcher
//! and of the runtime, and what a change of it requires.

use crate::bus::{ExchangeSpec, QueueSpec, Topology};
use crate::config::{PluginSettings, RouterConfig};
use crate::dispatch::DispatchSettings;
use crate::route::Binding;
use crate::runtime::Limits;

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

pub(super) fn dispatch_settings(s: &PluginSettings) -> DispatchSettings {
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

pub(super) fn limits(s: &PluginSettings) -> Limits {
    Limits {
        timeout: s.timeout,
        memory: s.memory.as_u64(),
        instance_reuse: s.instance_reuse,
        max_delay: s.max_delay,
        ..Limits::default()
    }
}

/// What must be rebuilt when settings change.
pub(super) fn needs_reload(old: &PluginSettings, new: &PluginSettings) -> bool {
    old.wasm != new.wasm || old.config != new.config || limits(old) != limits(new)
}

pub(super) fn needs_new_workers(old: &PluginSettings, new: &PluginSettings) -> bool {
    old.concurrency != new.concurrency || old.dedupe != new.dedupe
}
