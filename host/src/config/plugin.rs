//! How each plugin runs: `[defaults]` for every plugin, `[plugins.<name>]` for
//! one, and [`PluginSettings`], the two merged into the concrete values the
//! dispatcher and the runtime use.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::units;
use crate::runtime::Limits;

/// `[defaults]`: how every plugin runs unless its own table says otherwise.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginDefaults {
    /// Unacknowledged events the broker may hand one replica's consumer at once,
    /// per plugin (AMQP `basic.qos` prefetch). At least 1.
    pub prefetch: u16,
    /// Events of one plugin handled at the same time in one replica. At least 1.
    pub concurrency: u16,
    /// Wall time one event may take, guest code and host calls together
    /// (`"5s"`); past it the event fails and is retried. 1ms to 10m.
    #[serde(deserialize_with = "units::duration")]
    pub timeout: Duration,
    /// Linear memory one plugin instance may grow to (`"64MiB"`). 1MiB to 4GiB.
    #[serde(deserialize_with = "units::size")]
    pub memory: ByteSize,
    /// Events one instance handles before it is replaced by a fresh one; 1 gives
    /// every event a fresh instance. At least 1.
    pub instance_reuse: u32,
    /// Deliveries of one event, the first included, before it is dead-lettered.
    /// At least 1 (1 = never retry).
    pub max_attempts: u32,
    /// Plugin-to-plugin hops an event may have made; past it the event is
    /// dead-lettered with reason `loop`. At least 1.
    pub max_hops: u32,
    /// Most events waiting in one plugin's queue on the embedded bus. At least 1.
    pub queue_capacity: usize,
    /// Longest delay an output may ask for (`Output::after`); a longer one
    /// fails the event as `invalid_output`. 1ms to 90d.
    #[serde(deserialize_with = "units::duration")]
    pub max_delay: Duration,
    /// Delays between attempts.
    pub backoff: Backoff,
    /// Pausing a plugin whose events keep breaking its sandbox.
    pub cooldown: Cooldown,
}

impl Default for PluginDefaults {
    fn default() -> Self {
        Self {
            prefetch: 64,
            concurrency: 2,
            timeout: Duration::from_secs(5),
            memory: ByteSize::mib(64),
            instance_reuse: 1000,
            max_attempts: 5,
            max_hops: 10,
            queue_capacity: 10_000,
            max_delay: crate::runtime::DEFAULT_MAX_DELAY,
            backoff: Backoff::default(),
            cooldown: Cooldown::default(),
        }
    }
}

/// `cooldown`: after `after` events in a row broke the plugin's sandbox
/// (timeout, out of memory, stack overflow, trap, panic, invalid output), or
/// after one timeout,
/// the plugin's workers stop taking events for `initial`; then one event probes it. A probe that
/// breaks again doubles the pause, up to `max`; any other outcome ends the
/// cool-down. Paused events wait in the plugin's queue: nothing is lost, and a
/// broken plugin neither burns CPU that healthy plugins need nor burns its
/// events into the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cooldown {
    /// Broken events in a row that pause the plugin; 0 never pauses it.
    pub after: u32,
    /// The first pause (`"1s"`).
    #[serde(deserialize_with = "units::duration")]
    pub initial: Duration,
    /// The longest pause (`"1m"`); at least `initial`, at most 1h.
    #[serde(deserialize_with = "units::duration")]
    pub max: Duration,
}

impl Default for Cooldown {
    fn default() -> Self {
        Self {
            after: 3,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

/// `backoff`: the delay before attempt n+1 is `initial * multiplier^(n-1)`,
/// capped at `max`, then spread by up to ±`jitter` of itself.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// Delay before the second attempt (`"500ms"`).
    #[serde(deserialize_with = "units::duration")]
    pub initial: Duration,
    /// Longest delay between attempts (`"1m"`); at least `initial`.
    #[serde(deserialize_with = "units::duration")]
    pub max: Duration,
    /// Growth of the delay per attempt. At least 1.
    pub multiplier: f64,
    /// Random spread of each delay, as a fraction of it, so that failures that
    /// happened together do not retry together. 0 to 1.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

/// `[plugins.<name>]`: one plugin. The name becomes its queue
/// (`<prefix>.<name>`) and its key-value namespace, so it is lowercase letters,
/// digits, `_` and `-`, at most 64 characters. An empty table is a complete
/// declaration: `<name>.wasm` in the plugins folder, with the defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginConfig {
    /// The component, relative to the plugins folder. Default: `<name>.wasm`.
    pub file: Option<PathBuf>,
    /// `false` keeps the declaration but runs nothing and unbinds its routes:
    /// new events are not queued for it; what its queue already holds stays.
    pub enabled: bool,
    /// Exchange the plugin's outputs are published to, unless an output names
    /// one. Default: the exchange the input event came from.
    pub output_exchange: Option<String>,
    /// Values the plugin reads with `config.get(key)`.
    pub config: BTreeMap<String, String>,
    /// Drop an event whose id this plugin already handled within this window
    /// (`"10m"`). Default: no deduplication.
    #[serde(deserialize_with = "units::opt_duration")]
    pub dedupe: Option<Duration>,
    /// Handle events strictly one at a time in queue order: a single active
    /// consumer across replicas, concurrency and prefetch 1.
    pub ordered: bool,
    /// Overrides `defaults.prefetch`.
    pub prefetch: Option<u16>,
    /// Overrides `defaults.concurrency`.
    pub concurrency: Option<u16>,
    /// Overrides `defaults.timeout`.
    #[serde(deserialize_with = "units::opt_duration")]
    pub timeout: Option<Duration>,
    /// Overrides `defaults.memory`.
    #[serde(deserialize_with = "units::opt_size")]
    pub memory: Option<ByteSize>,
    /// Overrides `defaults.instance_reuse`.
    pub instance_reuse: Option<u32>,
    /// Overrides `defaults.max_attempts`.
    pub max_attempts: Option<u32>,
    /// Overrides `defaults.max_hops`.
    pub max_hops: Option<u32>,
    /// Overrides `defaults.queue_capacity`.
    pub queue_capacity: Option<usize>,
    /// Overrides `defaults.max_delay`.
    #[serde(deserialize_with = "units::opt_duration")]
    pub max_delay: Option<Duration>,
    /// Replaces `[defaults.backoff]` as a whole: fields this table leaves out take
    /// the built-in defaults, not those of `[defaults.backoff]`.
    pub backoff: Option<Backoff>,
    /// Replaces `[defaults.cooldown]` as a whole, like `backoff`.
    pub cooldown: Option<Cooldown>,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            file: None,
            enabled: true,
            output_exchange: None,
            config: BTreeMap::new(),
            dedupe: None,
            ordered: false,
            prefetch: None,
            concurrency: None,
            timeout: None,
            memory: None,
            instance_reuse: None,
            max_attempts: None,
            max_hops: None,
            queue_capacity: None,
            max_delay: None,
            backoff: None,
            cooldown: None,
        }
    }
}

/// One plugin's concrete settings: `[defaults]` with its overrides applied and
/// paths resolved. What the dispatcher and the runtime are given.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSettings {
    /// The plugin's name: queue suffix and key-value namespace.
    pub name: String,
    /// Absolute path of the component.
    pub wasm: PathBuf,
    /// Whether it runs.
    pub enabled: bool,
    /// Where outputs go when they name no exchange; `None` = the input's exchange.
    pub output_exchange: Option<String>,
    /// Values for `config.get`.
    pub config: BTreeMap<String, String>,
    /// Deduplication window on event ids.
    pub dedupe: Option<Duration>,
    /// One event at a time, in order (then `concurrency` and `prefetch` are 1).
    pub ordered: bool,
    /// Consumer prefetch.
    pub prefetch: u16,
    /// Events handled at once per replica.
    pub concurrency: u16,
    /// Wall time per event.
    pub timeout: Duration,
    /// Memory per instance.
    pub memory: ByteSize,
    /// Events per instance before it is recycled.
    pub instance_reuse: u32,
    /// Deliveries before dead-lettering.
    pub max_attempts: u32,
    /// Hops before an event is dead-lettered as a loop.
    pub max_hops: u32,
    /// Embedded-bus queue bound.
    pub queue_capacity: usize,
    /// Longest delay of an output.
    pub max_delay: Duration,
    /// Delays between attempts.
    pub backoff: Backoff,
    /// Pausing the plugin when its events keep breaking its sandbox.
    pub cooldown: Cooldown,
}

impl PluginSettings {
    /// Merges `plugin` over `defaults`; `wasm` is the resolved component path.
    pub(crate) fn merge(
        name: &str,
        wasm: PathBuf,
        plugin: &PluginConfig,
        defaults: &PluginDefaults,
    ) -> Self {
        let (prefetch, concurrency) = if plugin.ordered {
            (1, 1)
        } else {
            (
                plugin.prefetch.unwrap_or(defaults.prefetch),
                plugin.concurrency.unwrap_or(defaults.concurrency),
            )
        };
        Self {
            name: name.to_string(),
            wasm,
            enabled: plugin.enabled,
            output_exchange: plugin.output_exchange.clone(),
            config: plugin.config.clone(),
            dedupe: plugin.dedupe,
            ordered: plugin.ordered,
            prefetch,
            concurrency,
            timeout: plugin.timeout.unwrap_or(defaults.timeout),
            memory: plugin.memory.unwrap_or(defaults.memory),
            instance_reuse: plugin.instance_reuse.unwrap_or(defaults.instance_reuse),
            max_attempts: plugin.max_attempts.unwrap_or(defaults.max_attempts),
            max_hops: plugin.max_hops.unwrap_or(defaults.max_hops),
            queue_capacity: plugin.queue_capacity.unwrap_or(defaults.queue_capacity),
            max_delay: plugin.max_delay.unwrap_or(defaults.max_delay),
            backoff: plugin
                .backoff
                .clone()
                .unwrap_or_else(|| defaults.backoff.clone()),
            cooldown: plugin
                .cooldown
                .clone()
                .unwrap_or_else(|| defaults.cooldown.clone()),
        }
    }

    /// The sandbox limits to load the plugin with.
    pub fn limits(&self) -> Limits {
        Limits {
            timeout: self.timeout,
            memory: self.memory.as_u64(),
            instance_reuse: self.instance_reuse,
            max_delay: self.max_delay,
            ..Limits::default()
        }
    }
}
