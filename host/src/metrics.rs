//! `/metrics`: what the appliance did, in the Prometheus (OpenMetrics) text
//! format. One [`Metrics`] per appliance.
//!
//! Per plugin (label `plugin`): events received, succeeded, failed by `reason`
//! (the failure kind: `timeout`, `out_of_memory`, `trap`, `panic`, `retry`,
//! `reject`, `undecodable`, `kv_unavailable`, ...), retried, dead-lettered by
//! `reason`, dropped as duplicates, outputs published, and the handler's latency.
//! The bus: connection state, reconnects, confirm latency, and per plugin the
//! queue's depth, consumers, waiting retries and dead letters (from the broker on
//! RabbitMQ: all replicas). Plugin loads by result, config reloads by result, and
//! the time of the last reload.
//!
//! Counters live as long as the process: a plugin reloaded or restarted keeps
//! counting where it was. The event path holds per-plugin handles
//! ([`PluginMetrics`]), so counting an event is an atomic add, no lookup.

use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabel {
    pub plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub plugin: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoadLabels {
    pub plugin: String,
    pub result: LoadResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: LoadResult,
}

/// How a load or reload ended.
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelValue,
)]
#[allow(non_camel_case_types)]
pub enum LoadResult {
    ok,
    error,
}

type Histograms = Family<PluginLabel, Histogram, fn() -> Histogram>;

fn handler_histogram() -> Histogram {
    // 50 µs to ~26 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

fn confirm_histogram() -> Histogram {
    // 100 µs to ~52 s.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 20))
}

/// A plugin's counters, as the event path updates them.
#[derive(Clone, Debug)]
pub struct PluginMetrics {
    plugin: String,
    pub received: Counter,
    pub succeeded: Counter,
    pub retried: Counter,
    pub deduplicated: Counter,
    pub outputs: Counter,
    /// Delayed outputs kept for later.
    pub delayed: Counter,
    pub handler_seconds: Histogram,
    /// Cool-down pauses begun.
    pub pauses: Counter,
    /// 1 while the plugin is paused.
    pub paused: Gauge,
    failed: Family<ReasonLabels, Counter>,
    dead_lettered: Family<ReasonLabels, Counter>,
}

impl PluginMetrics {
    /// One failed attempt, by failure kind.
    pub fn failed(&self, reason: &str) {
        self.failed
            .get_or_create(&ReasonLabels {
                plugin: self.plugin.clone(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// One event dead-lettered, by failure kind.
    pub fn dead_lettered(&self, reason: &str) {
        self.dead_lettered
            .get_or_create(&ReasonLabels {
                plugin: self.plugin.clone(),
                reason: reason.to_string(),
            })
            .inc();
    }
}

/// Queue figures read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueFigures {
    pub messages: u64,
    pub consumers: u64,
    pub waiting_retries: u64,
    pub dead_letters: u64,
    /// Delayed outputs of the plugin waiting for their time (embedded bus).
    pub waiting_delayed: Option<u64>,
    /// Dead letters discarded by `dlq_ttl` and by `dlq_max_length` (embedded
    /// bus).
    pub dead_letters_discarded: Option<(u64, u64)>,
}

/// Every metric of one appliance.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    received: Family<PluginLabel, Counter>,
    succeeded: Family<PluginLabel, Counter>,
    failed: Family<ReasonLabels, Counter>,
    retried: Family<PluginLabel, Counter>,
    dead_lettered: Family<ReasonLabels, Counter>,
    deduplicated: Family<PluginLabel, Counter>,
    outputs: Family<PluginLabel, Counter>,
    delayed: Family<PluginLabel, Counter>,
    handler_seconds: Histograms,
    pauses: Family<PluginLabel, Counter>,
    paused: Family<PluginLabel, Gauge>,
    /// Publish-to-confirm time of each batch published to the broker.
    pub confirm_seconds: Histogram,
    bus_connected: Gauge,
    bus_reconnects: Counter,
    queue_messages: Family<PluginLabel, Gauge>,
    queue_consumers: Family<PluginLabel, Gauge>,
    queue_waiting_retries: Family<PluginLabel, Gauge>,
    queue_dead_letters: Family<PluginLabel, Gauge>,
    queue_dead_letters_discarded: Family<ReasonLabels, Gauge>,
    queue_waiting_delayed: Family<PluginLabel, Gauge>,
    delayed_waiting: Gauge,
    plugin_loads: Family<LoadLabels, Counter>,
    config_reloads: Family<ResultLabel, Counter>,
    last_reload: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchboard");
        let received = Family::default();
        let succeeded = Family::default();
        let failed = Family::default();
        let retried = Family::default();
        let dead_lettered = Family::default();
        let deduplicated = Family::default();
        let outputs = Family::default();
        let delayed = Family::default();
        let handler_seconds: Histograms = Family::new_with_constructor(handler_histogram);
        let pauses = Family::default();
        let paused = Family::default();
        let confirm_seconds = confirm_histogram();
        let bus_connected = Gauge::default();
        let bus_reconnects = Counter::default();
        let queue_messages = Family::default();
        let queue_consumers = Family::default();
        let queue_waiting_retries = Family::default();
        let queue_dead_letters = Family::default();
        let queue_dead_letters_discarded = Family::default();
        let queue_waiting_delayed = Family::default();
        let delayed_waiting = Gauge::default();
        let plugin_loads = Family::default();
        let config_reloads = Family::default();
        let last_reload = Gauge::<f64, AtomicU64>::default();

        let r = &mut registry;
        r.register(
            "events_received",
            "Events delivered to a plugin (every attempt)",
            received.clone(),
        );
        r.register(
            "events_succeeded",
            "Events a plugin handled, their outputs published",
            succeeded.clone(),
        );
        r.register(
            "events_failed",
            "Failed attempts, by failure kind",
            failed.clone(),
        );
        r.register(
            "events_retried",
            "Failed attempts scheduled for a retry",
            retried.clone(),
        );
        r.register(
            "events_dead_lettered",
            "Events dead-lettered, by failure kind",
            dead_lettered.clone(),
        );
        r.register(
            "events_deduplicated",
            "Events dropped by the dedupe window",
            deduplicated.clone(),
        );
        r.register(
            "outputs_published",
            "Plugin outputs published",
            outputs.clone(),
        );
        r.register(
            "outputs_delayed",
            "Delayed outputs kept for later publishing (Output::after)",
            delayed.clone(),
        );
        r.register_with_unit(
            "handler_duration",
            "Time spent in a plugin's handler per event",
            Unit::Seconds,
            handler_seconds.clone(),
        );
        r.register(
            "plugin_pauses",
            "Cool-down pauses begun: the plugin kept breaking its sandbox",
            pauses.clone(),
        );
        r.register(
            "plugin_paused",
            "1 while the plugin is paused by its cool-down",
            paused.clone(),
        );
        r.register_with_unit(
            "bus_confirm_duration",
            "Time from publishing a batch to the broker's confirms",
            Unit::Seconds,
            confirm_seconds.clone(),
        );
        r.register(
            "bus_connected",
            "1 when connected to the broker with the topology declared (always 1 on the embedded bus)",
            bus_connected.clone(),
        );
        r.register(
            "bus_reconnects",
            "Broker connections lost since start",
            bus_reconnects.clone(),
        );
        r.register(
            "queue_messages",
            "Messages ready in the plugin's queue (on RabbitMQ: all replicas)",
            queue_messages.clone(),
        );
        r.register(
            "queue_consumers",
            "Consumers on the plugin's queue (on RabbitMQ: all replicas)",
            queue_consumers.clone(),
        );
        r.register(
            "queue_waiting_retries",
            "Messages waiting for their retry delay",
            queue_waiting_retries.clone(),
        );
        r.register(
            "queue_dead_letters",
            "Messages in the plugin's dead-letter queue",
            queue_dead_letters.clone(),
        );
        r.register(
            "queue_dead_letters_discarded",
            "Dead letters discarded since start by [broker] dlq_ttl (reason ttl) or \
             dlq_max_length (reason max_length) (embedded bus; RabbitMQ counts its own)",
            queue_dead_letters_discarded.clone(),
        );
        r.register(
            "queue_waiting_delayed",
            "Delayed outputs the plugin produced, waiting for their time (embedded bus)",
            queue_waiting_delayed.clone(),
        );
        r.register(
            "delayed_outputs_waiting",
            "Delayed outputs waiting for their time, all plugins (on RabbitMQ: in the delay queues)",
            delayed_waiting.clone(),
        );
        r.register(
            "plugin_loads",
            "Plugin loads and hot reloads, by result",
            plugin_loads.clone(),
        );
        r.register(
            "config_reloads",
            "router.toml reloads, by result",
            config_reloads.clone(),
        );
        r.register(
            "last_reload_timestamp_seconds",
            "When a plugin or router.toml was last (re)loaded, Unix time",
            last_reload.clone(),
        );
        Self {
            registry,
            received,
            succeeded,
            failed,
            retried,
            dead_lettered,
            deduplicated,
            outputs,
            delayed,
            handler_seconds,
            pauses,
            paused,
            confirm_seconds,
            bus_connected,
            bus_reconnects,
            queue_messages,
            queue_consumers,
            queue_waiting_retries,
            queue_dead_letters,
            queue_dead_letters_discarded,
            queue_waiting_delayed,
            delayed_waiting,
            plugin_loads,
            config_reloads,
            last_reload,
        }
    }

    /// The handles `plugin`'s workers count with.
    pub fn plugin(&self, plugin: &str) -> PluginMetrics {
        let label = PluginLabel {
            plugin: plugin.to_string(),
        };
        PluginMetrics {
            plugin: plugin.to_string(),
            received: self.received.get_or_create(&label).clone(),
            succeeded: self.succeeded.get_or_create(&label).clone(),
            retried: self.retried.get_or_create(&label).clone(),
            deduplicated: self.deduplicated.get_or_create(&label).clone(),
            outputs: self.outputs.get_or_create(&label).clone(),
            delayed: self.delayed.get_or_create(&label).clone(),
            handler_seconds: self.handler_seconds.get_or_create(&label).clone(),
            pauses: self.pauses.get_or_create(&label).clone(),
            paused: self.paused.get_or_create(&label).clone(),
            failed: self.failed.clone(),
            dead_lettered: self.dead_lettered.clone(),
        }
    }

    /// A plugin load (start, hot reload, config change) ended with `result`.
    pub fn plugin_loaded(&self, plugin: &str, result: LoadResult) {
        self.plugin_loads
            .get_or_create(&LoadLabels {
                plugin: plugin.to_string(),
                result,
            })
            .inc();
        self.reloaded_now();
    }

    /// A router.toml reload ended with `result`.
    pub fn config_reloaded(&self, result: LoadResult) {
        self.config_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
        self.reloaded_now();
    }

    fn reloaded_now(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_reload.set(now);
    }

    /// The bus's state, read at scrape time. `reconnects` is the running total.
    pub fn set_bus(&self, connected: bool, reconnects: u64) {
        self.bus_connected.set(i64::from(connected));
        let counted = self.bus_reconnects.get();
        if reconnects > counted {
            self.bus_reconnects.inc_by(reconnects - counted);
        }
    }

    /// A plugin queue's figures, read at scrape time.
    pub fn set_queue(&self, plugin: &str, q: QueueFigures) {
        let label = PluginLabel {
            plugin: plugin.to_string(),
        };
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.queue_messages
            .get_or_create(&label)
            .set(gauge(q.messages));
        self.queue_consumers
            .get_or_create(&label)
            .set(gauge(q.consumers));
        self.queue_waiting_retries
            .get_or_create(&label)
            .set(gauge(q.waiting_retries));
        self.queue_dead_letters
            .get_or_create(&label)
            .set(gauge(q.dead_letters));
        if let Some((expired, overflowed)) = q.dead_letters_discarded {
            for (reason, n) in [("ttl", expired), ("max_length", overflowed)] {
                self.queue_dead_letters_discarded
                    .get_or_create(&ReasonLabels {
                        plugin: plugin.to_string(),
                        reason: reason.into(),
                    })
                    .set(gauge(n));
            }
        }
        if let Some(waiting) = q.waiting_delayed {
            self.queue_waiting_delayed
                .get_or_create(&label)
                .set(gauge(waiting));
        }
    }

    /// Delayed outputs waiting on the bus, all plugins together.
    pub fn set_delayed_waiting(&self, waiting: u64) {
        self.delayed_waiting
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }

    /// Forgets a removed plugin's queue gauges (its counters stay).
    pub fn remove_queue(&self, plugin: &str) {
        let label = PluginLabel {
            plugin: plugin.to_string(),
        };
        for family in [
            &self.queue_messages,
            &self.queue_consumers,
            &self.queue_waiting_retries,
            &self.queue_dead_letters,
        ] {
            family.remove(&label);
        }
        for reason in ["ttl", "max_length"] {
            self.queue_dead_letters_discarded.remove(&ReasonLabels {
                plugin: plugin.to_string(),
                reason: reason.into(),
            });
        }
    }

    /// Everything, in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        let p = m.plugin("billing");
        p.received.inc();
        p.failed("timeout");
        p.dead_lettered("reject");
        p.handler_seconds.observe(0.002);
        m.plugin_loaded("billing", LoadResult::ok);
        m.set_bus(true, 2);
        m.set_bus(true, 3);
        m.set_queue(
            "billing",
            QueueFigures {
                messages: 4,
                ..QueueFigures::default()
            },
        );
        let text = m.encode();
        for line in [
            "switchboard_events_received_total{plugin=\"billing\"} 1",
            "switchboard_events_failed_total{plugin=\"billing\",reason=\"timeout\"} 1",
            "switchboard_events_dead_lettered_total{plugin=\"billing\",reason=\"reject\"} 1",
            "switchboard_handler_duration_seconds_count{plugin=\"billing\"} 1",
            "switchboard_plugin_loads_total{plugin=\"billing\",result=\"ok\"} 1",
            "switchboard_bus_connected 1",
            "switchboard_bus_reconnects_total 3",
            "switchboard_queue_messages{plugin=\"billing\"} 4",
            "# TYPE switchboard_bus_confirm_duration_seconds histogram",
            "# TYPE switchboard_last_reload_timestamp_seconds gauge",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
