//! Status: what each plugin is doing, as `/api/plugins`, `/metrics` and
//! `switchboard check` show it. Taken from a snapshot of the slots: the broker
//! is asked for queue figures after the slots lock is released, so a slow or
//! absent broker never stalls hot reload.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::{Appliance, Transport, lock};
use crate::bus::embedded::{EmbeddedBus, QueueStats};
use crate::bus::rabbit::BrokerQueueStats;
use crate::dispatch::{DispatchStats, PluginWorkers};
use crate::metrics::QueueFigures;

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
    /// Worker threads running for it in this process.
    #[serde(skip)]
    pub workers: usize,
}

impl Appliance {
    /// The metrics, as `/metrics` serves them: counters as they stand, and the
    /// bus and queue gauges read now (on RabbitMQ, from the broker).
    pub fn metrics_text(&self) -> String {
        let metrics = &self.inner.metrics;
        match self.transport() {
            Transport::Rabbit(rabbit) => {
                let link = rabbit.status();
                metrics.set_bus(link.connected && link.declared, link.reconnects);
                if let Ok(waiting) = rabbit.delayed_waiting() {
                    metrics.set_delayed_waiting(waiting);
                }
            }
            Transport::Redis(redis) => {
                let link = redis.status();
                metrics.set_bus(link.connected && link.declared, link.reconnects);
                if let Ok(waiting) = redis.delayed_waiting() {
                    metrics.set_delayed_waiting(waiting);
                }
            }
            Transport::Embedded(bus) => {
                metrics.set_bus(true, 0);
                metrics.set_delayed_waiting(bus.delayed_waiting() as u64);
            }
        }
        for status in self.statuses() {
            let figures = if let Some(b) = &status.broker {
                QueueFigures {
                    messages: u64::from(b.messages),
                    consumers: u64::from(b.consumers),
                    waiting_retries: u64::from(b.waiting_retries),
                    dead_letters: u64::from(b.dead_letters),
                    waiting_delayed: None,
                    dead_letters_discarded: None,
                }
            } else if let Some(q) = &status.queue {
                QueueFigures {
                    messages: q.depth as u64,
                    consumers: status.workers as u64,
                    waiting_retries: q.waiting_retries as u64,
                    dead_letters: q.dead_letters as u64,
                    waiting_delayed: Some(q.waiting_delayed as u64),
                    dead_letters_discarded: Some((
                        q.dead_letters_expired,
                        q.dead_letters_overflowed,
                    )),
                }
            } else {
                continue;
            };
            metrics.set_queue(&status.name, figures);
        }
        metrics.encode()
    }

    /// Every plugin's status, by name.
    pub fn statuses(&self) -> Vec<PluginStatus> {
        let stats = self
            .inner
            .bus
            .embedded()
            .map(EmbeddedBus::stats)
            .unwrap_or_default();
        let mut statuses: Vec<PluginStatus> = lock(&self.inner.slots)
            .values()
            .map(|s| PluginStatus {
                broker: None,
                dispatch: s.workers.as_ref().map(PluginWorkers::stats),
                name: s.settings.name.clone(),
                file: s.settings.wasm.clone(),
                state: s.state.clone(),
                version: s.workers.as_ref().map(|w| w.plugin().version().to_string()),
                error: s.error.clone(),
                loaded_at: s.loaded_at.clone(),
                loads: s.loads,
                queue: stats.get(&s.settings.name).cloned(),
                workers: s.workers.as_ref().map_or(0, |w| w.settings().concurrency),
            })
            .collect();
        if let Some(rabbit) = self.inner.bus.rabbit() {
            for status in &mut statuses {
                status.broker = rabbit.queue_stats(&status.name).ok();
            }
        }
        if let Some(redis) = self.inner.bus.redis() {
            for status in &mut statuses {
                status.broker = redis.queue_stats(&status.name).ok();
            }
        }
        statuses
    }
}
