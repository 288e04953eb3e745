//! `router.toml`: everything the appliance does, declared in one file — the
//! broker, the HTTP listener, the exchanges, the plugins and how they run, and
//! the routes from (exchange, topic pattern) to plugin.
//!
//! The path of a configuration: [`RouterConfig::load`] reads the file, parses it
//! (unknown keys are errors with line and column), resolves relative paths
//! against the file's folder, applies the environment ([`RouterConfig::apply_env`]:
//! secrets such as `RABBITMQ_URL` come from there), and validates everything at
//! once ([`RouterConfig::validate`] lists every problem, not just the first).
//! A configuration that fails any step is never used; on reload, the running one
//! stays. [`RouterConfig::plugin_settings`] then gives each plugin its concrete,
//! merged settings.
//!
//! Every key is documented on the field that declares it; the shipped
//! `router.toml` is parsed by a unit test so that the example cannot rot.

mod env;
mod plugin;
mod secret;
mod units;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use bytesize::ByteSize;
use serde::Deserialize;

use crate::runtime::RuntimeConfig;

pub use plugin::{Backoff, Cooldown, PluginConfig, PluginDefaults, PluginSettings};
pub use secret::{Secret, Token};
pub use units::{duration_text, size_text};
pub use validate::{
    MAX_EXCHANGE_NAME, MAX_MAX_DELAY, MAX_PLUGIN_NAME, check_exchange_name, check_plugin_name,
};

/// The whole `router.toml`. Every key is optional; an empty file is a valid
/// configuration (embedded bus, no plugins).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Folder watched for plugin components (`*.wasm`). Relative to the folder
    /// of `router.toml`; absolute once loaded.
    pub plugins_dir: PathBuf,
    /// Folder for plugin state (`kv.redb`) and the compiled-plugin cache
    /// (`cache/`). Relative to the folder of `router.toml`; absolute once loaded.
    pub state_dir: PathBuf,
    /// `[broker]`: where events come from; none configured = the embedded bus.
    pub broker: BrokerConfig,
    /// `[kv]`: where plugin state lives; none configured = the embedded store.
    pub kv: KvConfig,
    /// `[http]`: ingress, metrics, health and the admin API.
    pub http: HttpConfig,
    /// `[archive]`: the event history (off unless enabled).
    pub archive: ArchiveConfig,
    /// `[runtime]`: the WebAssembly engine shared by all plugins.
    pub runtime: RuntimeSection,
    /// `[defaults]`: how every plugin runs unless its own table overrides it.
    pub defaults: PluginDefaults,
    /// `[[exchanges]]`: the exchanges the router declares and routes from.
    pub exchanges: Vec<ExchangeConfig>,
    /// `[plugins.<name>]`: the plugins, by name.
    pub plugins: BTreeMap<String, PluginConfig>,
    /// `[[routes]]`: which events go to which plugin.
    pub routes: Vec<RouteConfig>,
    /// Problems found while applying the environment, reported by `validate`.
    #[serde(skip)]
    env_errors: Vec<String>,
    /// The `[defaults]` keys the file sets (`prefetch`, `backoff.initial`, …):
    /// the environment's defaults apply only where the file says nothing.
    #[serde(skip)]
    file_defaults: std::collections::BTreeSet<String>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            plugins_dir: PathBuf::from("plugins"),
            state_dir: PathBuf::from(".switchboard"),
            broker: BrokerConfig::default(),
            kv: KvConfig::default(),
            http: HttpConfig::default(),
            archive: ArchiveConfig::default(),
            runtime: RuntimeSection::default(),
            defaults: PluginDefaults::default(),
            exchanges: Vec::new(),
            plugins: BTreeMap::new(),
            routes: Vec::new(),
            env_errors: Vec::new(),
            file_defaults: std::collections::BTreeSet::new(),
        }
    }
}

/// `[broker]`: the broker connection (RabbitMQ or Redis Streams) and what the
/// router declares on it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Which bus: `"embedded"`, `"rabbitmq"` or `"redis-streams"`. Unset: the
    /// URL's scheme says (`amqp://` or `amqps://` is RabbitMQ, no URL is the
    /// embedded bus); a `redis://` URL needs `kind = "redis-streams"`, and a
    /// kind the URL contradicts is an error.
    pub kind: Option<BrokerKind>,
    /// `amqp://user:password@host:5672/vhost` (or `amqps://`) for RabbitMQ,
    /// `redis://[:password@]host:6379[/db]` (or `rediss://`) for Redis
    /// Streams. Overridden by the `RABBITMQ_URL` environment variable (or built
    /// from `RABBITMQ_HOST` & co.), or with `kind = "redis-streams"` by
    /// `REDIS_BUS_URL`. None = the embedded in-process bus. Keep passwords out
    /// of this file: set them in the environment. Never printed with its
    /// credentials.
    pub url: Option<Secret>,
    /// Redis Streams: how long an entry may stay delivered to a consumer and
    /// unacknowledged before a live replica claims it (`XAUTOCLAIM`): what a
    /// crashed replica held comes back after this long (`"30s"`).
    #[serde(deserialize_with = "units::duration")]
    pub claim_idle: std::time::Duration,
    /// Redis Streams: the length each exchange stream and plugin stream is
    /// trimmed to (`XADD … MAXLEN ~`), acknowledged or not: keep it well above
    /// the plugins' `queue_capacity`.
    pub stream_max_length: u64,
    /// Prefix of everything the router declares on the broker: queues
    /// `<prefix>.<plugin>`, exchanges `<prefix>.retry` and `<prefix>.dlx`.
    pub prefix: String,
    /// Type of the queues the router declares: `"quorum"` (replicated, the
    /// default) or `"classic"`. A queue keeps the type it was created with:
    /// changing it needs the old queues deleted (`switchboard` refuses to start
    /// rather than loop on RabbitMQ's refusal).
    pub queue_type: QueueType,
    /// PEM file of the certificate authority that signed the broker's TLS
    /// certificate, for `amqps://` URLs (default: the system's roots). Relative
    /// to the folder of `router.toml`.
    pub ca_file: Option<PathBuf>,
    /// What happens to a plugin output that no queue is bound to: `"drop"` (as
    /// AMQP does; counted and logged) or `"dead-letter"` (the input event is
    /// dead-lettered with reason `unroutable`).
    pub unroutable: Unroutable,
    /// Longest wait for any one broker operation: a publish and its confirm, a
    /// declaration, an acknowledgement (`"5s"`). Past it the operation fails and
    /// the event is retried.
    #[serde(deserialize_with = "units::duration")]
    pub timeout: std::time::Duration,
    /// How long a dead letter is kept (`"7d"`), after which the bus discards
    /// it. Unset: until it is redriven or purged. On RabbitMQ it is the
    /// dead-letter queues' `x-message-ttl`. Set by `RABBITMQ_DLQ_TTL` (ms)
    /// when this file sets nothing.
    #[serde(deserialize_with = "units::opt_duration")]
    pub dlq_ttl: Option<std::time::Duration>,
    /// Most dead letters kept per plugin; one more discards the oldest (RabbitMQ's
    /// `x-max-length` with `x-overflow = "drop-head"`). Unset: RabbitMQ keeps
    /// them all, the embedded bus keeps 100000.
    pub dlq_max_length: Option<u64>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            kind: None,
            url: None,
            claim_idle: std::time::Duration::from_secs(30),
            stream_max_length: 1_000_000,
            prefix: "switchboard".into(),
            queue_type: QueueType::default(),
            ca_file: None,
            unroutable: Unroutable::default(),
            timeout: std::time::Duration::from_secs(5),
            dlq_ttl: None,
            dlq_max_length: None,
        }
    }
}

/// `[broker] dlq_ttl` and `dlq_max_length`: how long, and how many, dead
/// letters each plugin's dead-letter queue keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DlqRetention {
    pub ttl: Option<std::time::Duration>,
    pub max_length: Option<u64>,
}

/// `[broker] kind`: which bus carries the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerKind {
    /// The in-process bus (no URL).
    Embedded,
    /// RabbitMQ (`amqp://`, `amqps://`).
    #[serde(rename = "rabbitmq")]
    RabbitMq,
    /// Redis Streams (`redis://`, `rediss://`).
    RedisStreams,
}

impl BrokerKind {
    /// The name `router.toml` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::RabbitMq => "rabbitmq",
            Self::RedisStreams => "redis-streams",
        }
    }
}

impl std::fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl BrokerConfig {
    /// The bus this table chooses: `kind` when set, else what the URL's scheme
    /// says (RabbitMQ for `amqp://`, the embedded bus without a URL). `Err`
    /// says why neither decides (a `redis://` URL without `kind`, another
    /// scheme, or a kind the URL contradicts); `validate` reports the same.
    pub fn bus_kind(&self) -> Result<BrokerKind, String> {
        let scheme = self.url.as_ref().map(|url| {
            let raw = url.expose();
            if raw.starts_with("amqp://") || raw.starts_with("amqps://") {
                Some(BrokerKind::RabbitMq)
            } else if raw.starts_with("redis://") || raw.starts_with("rediss://") {
                Some(BrokerKind::RedisStreams)
            } else {
                None
            }
        });
        match (self.kind, scheme) {
            (None | Some(BrokerKind::Embedded), None) => Ok(BrokerKind::Embedded),
            (Some(BrokerKind::Embedded), Some(_)) => Err(format!(
                "broker.kind: \"embedded\" takes no url, but broker.url is \"{}\"",
                self.url.as_ref().map(Secret::redacted).unwrap_or_default()
            )),
            (Some(kind), None) => Err(format!(
                "broker.kind: \"{kind}\" needs broker.url{}",
                match kind {
                    BrokerKind::RedisStreams => " (redis://…) or REDIS_BUS_URL",
                    _ => " (amqp://…) or RABBITMQ_URL",
                }
            )),
            (None, Some(Some(BrokerKind::RedisStreams))) => Err(
                "broker.url: a redis:// url needs kind = \"redis-streams\" in [broker] \
                 (REDIS_URL is the kv store's; the bus is chosen explicitly)"
                    .into(),
            ),
            (kind, Some(None)) => Err(format!(
                "broker.url: expected {}, got \"{}\"",
                match kind {
                    Some(BrokerKind::RedisStreams) => "a redis:// or rediss:// URL",
                    _ => "an amqp:// or amqps:// URL",
                },
                self.url.as_ref().map(Secret::redacted).unwrap_or_default()
            )),
            (Some(kind), Some(Some(scheme))) if kind == scheme => Ok(kind),
            (Some(kind), Some(Some(scheme))) => Err(format!(
                "broker.kind: \"{kind}\" contradicts broker.url \"{}\", a {} URL",
                self.url.as_ref().map(Secret::redacted).unwrap_or_default(),
                scheme
            )),
            (None, Some(Some(scheme))) => Ok(scheme),
        }
    }

    pub fn dlq_retention(&self) -> DlqRetention {
        DlqRetention {
            ttl: self.dlq_ttl,
            max_length: self.dlq_max_length,
        }
    }
}

/// `[kv]`: the store behind the plugins' `kv` capability.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvConfig {
    /// `"embedded"` (the default: a file in `state_dir`, private to this
    /// process) or `"redis"` (shared by every replica pointing at it). Read at
    /// start: changing it takes a restart.
    pub backend: KvBackend,
    /// With `backend = "redis"`: `redis://[:password@]host:6379[/db]`, or
    /// `rediss://` for TLS. Overridden by the `REDIS_URL` environment variable;
    /// keep passwords there. Never printed with its credentials.
    pub url: Option<Secret>,
    /// First part of every Redis key: `<prefix>:<plugin>:<key>`. Replicas that
    /// share state share the prefix; two routers on one Redis that must not
    /// share state use different ones.
    pub prefix: String,
    /// Most Redis connections one process opens (calls beyond it wait for a
    /// free connection, at most `timeout`).
    pub pool_size: u32,
    /// Longest wait for a Redis connection, and for each call's request and
    /// reply (`"500ms"`). Past it the call fails and the event is retried.
    #[serde(deserialize_with = "units::duration")]
    pub timeout: std::time::Duration,
}

impl Default for KvConfig {
    fn default() -> Self {
        Self {
            backend: KvBackend::default(),
            url: None,
            prefix: "switchboard".into(),
            pool_size: 16,
            timeout: std::time::Duration::from_millis(500),
        }
    }
}

/// `[kv] backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvBackend {
    #[default]
    Embedded,
    Redis,
}

/// `[broker] queue_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    #[default]
    Quorum,
    Classic,
}

/// `[broker] unroutable`: the policy for outputs that no binding matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unroutable {
    /// Dropped, as AMQP does with a non-mandatory message; counted and logged.
    #[default]
    Drop,
    /// The input is dead-lettered with reason `unroutable`, outputs unpublished.
    DeadLetter,
}

/// `[archive]`: the event history. Every message published to an archived
/// exchange is kept: on the embedded bus in `state_dir/archive/` (an
/// append-only, segmented log), on RabbitMQ in the stream `<prefix>.archive`
/// bound to those exchanges. `switchboard events`, `GET /api/events` and
/// `switchboard replay` read it. Read at start only.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArchiveConfig {
    /// Keep the history (default false).
    pub enabled: bool,
    /// The exchanges archived; empty (the default) = every exchange.
    pub exchanges: Vec<String>,
    /// Segments whose newest event is older than this are deleted (`"7d"`).
    #[serde(deserialize_with = "units::duration")]
    pub max_age: std::time::Duration,
    /// Past this size the oldest segments are deleted (`"1GiB"`).
    #[serde(deserialize_with = "units::size")]
    pub max_size: ByteSize,
    /// Size at which a new segment starts (`"64MiB"`); retention deletes whole
    /// segments.
    #[serde(deserialize_with = "units::size")]
    pub segment_size: ByteSize,
    /// `[[archive.aggregates]]`: which events are indexed under which
    /// aggregate id, first matching rule wins.
    pub aggregates: Vec<AggregateRule>,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            exchanges: Vec::new(),
            max_age: std::time::Duration::from_secs(7 * 24 * 3600),
            max_size: ByteSize::gib(1),
            segment_size: ByteSize::mib(64),
            aggregates: Vec::new(),
        }
    }
}

/// One `[[archive.aggregates]]` rule: events whose routing key matches `match`
/// are indexed under the value at `field`, a dotted path into the event
/// (`data.order_id`; `id`, `type`, `source`, `correlation_id` also work).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateRule {
    /// A topic pattern (`order.*`, `bill.#`).
    #[serde(rename = "match")]
    pub pattern: String,
    pub field: String,
}

/// `[http]`: the HTTP server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on. Overridden by `SWITCHBOARD_HTTP_LISTEN`; use
    /// `0.0.0.0:8080` in a container.
    pub listen: SocketAddr,
    /// Bearer token for the admin API: with one, ingress and every endpoint that
    /// changes something (re-drive, reload) answer 401 without
    /// `Authorization: Bearer <token>`. Overridden by `SWITCHBOARD_ADMIN_TOKEN`;
    /// keep it there. Applies on reload. Never printed.
    pub token: Option<Token>,
    /// With a token: also require it to read (plugins, routes, dead letters,
    /// the event stream, metrics). `/healthz` and `/readyz` stay open for probes.
    pub protect_reads: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            token: None,
            protect_reads: false,
        }
    }
}

/// `[runtime]`: the WebAssembly engine.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSection {
    /// Pre-reserve instance slots (wasmtime's pooling allocator): faster
    /// instantiation, more virtual address space. Falls back to on-demand
    /// allocation when the machine cannot reserve it.
    pub pooling: bool,
    /// Plugin instances that may exist at once across all plugins, with pooling.
    /// At least 1.
    pub max_instances: u32,
    /// WebAssembly stack per call (`"512KiB"`); deeper recursion fails the event
    /// as a stack overflow. 64KiB to 8MiB: it must fit in the worker thread's
    /// own stack.
    #[serde(deserialize_with = "units::size")]
    pub max_stack: ByteSize,
    /// Keep compiled plugins in `<state_dir>/cache`, so that restarts skip
    /// compilation.
    pub cache: bool,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            pooling: true,
            max_instances: 256,
            max_stack: ByteSize::kib(512),
            cache: true,
        }
    }
}

/// `[[exchanges]]`: an exchange the router declares (on RabbitMQ; the embedded
/// bus creates it) and that routes may bind to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    /// Its name: letters, digits, `-`, `_`, `.`, `:`; not starting with `amq.`.
    pub name: String,
    /// How its routes' patterns match routing keys.
    #[serde(default)]
    pub kind: ExchangeKind,
    /// Survives a broker restart. Changing it on an existing exchange is refused
    /// by RabbitMQ.
    #[serde(default = "yes")]
    pub durable: bool,
}

fn yes() -> bool {
    true
}

pub use crate::route::ExchangeKind;

/// `[[routes]]`: events on `exchange` whose routing key matches one of
/// `patterns` go to `plugin` (each plugin has its own queue, so one event can go
/// to several plugins).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RouteSpelling")]
pub struct RouteConfig {
    /// A declared exchange.
    pub exchange: String,
    /// AMQP topic patterns: words split on `.`, `*` one word, `#` zero or more.
    /// In the file, `patterns = [...]` or, for one, `pattern = "..."`.
    pub patterns: Vec<String>,
    /// A declared plugin (it may be disabled).
    pub plugin: String,
}

/// A route as written: `patterns` or `pattern`, exactly one of them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpelling {
    /// A declared exchange.
    exchange: String,
    /// Topic patterns.
    patterns: Option<Vec<String>>,
    /// One topic pattern: `pattern = "a.*"` is `patterns = ["a.*"]`.
    pattern: Option<String>,
    /// A declared plugin.
    plugin: String,
}

impl TryFrom<RouteSpelling> for RouteConfig {
    type Error = String;

    fn try_from(route: RouteSpelling) -> Result<Self, String> {
        let patterns = match (route.patterns, route.pattern) {
            (Some(patterns), None) => patterns,
            (None, Some(pattern)) => vec![pattern],
            (Some(_), Some(_)) => {
                return Err(format!(
                    "route to plugin {:?} has both `patterns` and `pattern`; keep one",
                    route.plugin
                ));
            }
            (None, None) => {
                return Err(format!(
                    "route to plugin {:?} has no pattern; add `patterns = [\"…\"]` or `pattern = \"…\"`",
                    route.plugin
                ));
            }
        };
        Ok(Self {
            exchange: route.exchange,
            patterns,
            plugin: route.plugin,
        })
    }
}

/// Why a configuration cannot be used. Messages name the file, and the line and
/// column or the key that is wrong; none ever contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    // The cause is in the message and not a `source`, so that a chain of
    // errors printed whole (`{:#}`) says it once.
    #[error("cannot read {}: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema (unknown key, wrong
    /// type, bad duration…). `line` and `column` are 1-based.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The file parses but says something impossible; `errors` lists every
    /// problem, each naming its key (`routes[2].plugin: …`).
    #[error("{}", invalid_text(path, errors))]
    Invalid { path: PathBuf, errors: Vec<String> },
}

fn invalid_text(path: &Path, errors: &[String]) -> String {
    let mut text = format!(
        "{} is not valid ({} problem{}):",
        path.display(),
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    for e in errors {
        text.push_str("\n  ");
        text.push_str(e);
    }
    text
}

/// The keys `text` sets under `[defaults]`, nested ones dotted
/// (`backoff.initial`). The text has parsed as a configuration already.
fn defaults_set_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut keys = std::collections::BTreeSet::new();
    let Ok(table) = text.parse::<toml::Table>() else {
        return keys;
    };
    if let Some(toml::Value::Table(defaults)) = table.get("defaults") {
        for (key, value) in defaults {
            keys.insert(key.clone());
            if let toml::Value::Table(inner) = value {
                keys.extend(inner.keys().map(|k| format!("{key}.{k}")));
            }
        }
    }
    keys
}

impl RouterConfig {
    /// Reads, parses, resolves and validates the file at `path`, with the
    /// process environment applied.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config = Self::load_unvalidated(path)?;
        config.validated(path)
    }

    /// Like [`load`](Self::load) but without validating, for `switchboard check`,
    /// which reports validation problems and still goes on to check the plugins.
    pub fn load_unvalidated(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let base_dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let mut config = Self::parse_unvalidated(&text, path, base_dir)?;
        config.apply_env(|name| std::env::var(name).ok());
        Ok(config)
    }

    /// Parses and validates `text` as if it were a `router.toml` in `base_dir`;
    /// the environment is not applied. Errors call the file `router.toml`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let path = Path::new("router.toml");
        Self::parse_unvalidated(text, path, base_dir)?.validated(path)
    }

    fn parse_unvalidated(text: &str, path: &Path, base_dir: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |span| position(text, span.start));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().trim_end().to_string(),
            }
        })?;
        config.file_defaults = defaults_set_in(text);
        let base_dir = std::path::absolute(base_dir).unwrap_or_else(|_| base_dir.to_path_buf());
        config.plugins_dir = base_dir.join(&config.plugins_dir);
        config.state_dir = base_dir.join(&config.state_dir);
        if let Some(ca) = &config.broker.ca_file {
            config.broker.ca_file = Some(base_dir.join(ca));
        }
        Ok(config)
    }

    fn validated(self, path: &Path) -> Result<Self, ConfigError> {
        match self.validate() {
            Ok(()) => Ok(self),
            Err(errors) => Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                errors,
            }),
        }
    }

    /// The declared exchange called `name`.
    pub fn exchange(&self, name: &str) -> Option<&ExchangeConfig> {
        self.exchanges.iter().find(|e| e.name == name)
    }

    /// The concrete settings of the plugin called `name`: `[defaults]` with its
    /// overrides applied, and the absolute path of its component.
    pub fn plugin_settings(&self, name: &str) -> Option<PluginSettings> {
        let plugin = self.plugins.get(name)?;
        let file = plugin
            .file
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{name}.wasm")));
        let wasm = self.plugins_dir.join(file);
        Some(PluginSettings::merge(name, wasm, plugin, &self.defaults))
    }

    /// The engine settings; the artifact cache lives in `<state_dir>/cache`.
    pub fn runtime_config(&self) -> RuntimeConfig {
        RuntimeConfig {
            cache_dir: self.runtime.cache.then(|| self.state_dir.join("cache")),
            pooling: self.runtime.pooling,
            max_instances: self.runtime.max_instances,
            max_stack: usize::try_from(self.runtime.max_stack.as_u64()).unwrap_or(usize::MAX),
            ..RuntimeConfig::default()
        }
    }

    /// The embedded key-value store's file.
    pub fn kv_path(&self) -> PathBuf {
        self.state_dir.join("kv.redb")
    }

    /// The settings read only at start that differ between `self` (running) and
    /// `next` (a reloaded file), by name: a reload cannot apply them.
    pub fn restart_only_changes(&self, next: &RouterConfig) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.plugins_dir != next.plugins_dir {
            changed.push("plugins_dir");
        }
        if self.state_dir != next.state_dir {
            changed.push("state_dir");
        }
        if self.broker != next.broker {
            changed.push("[broker]");
        }
        if self.kv != next.kv {
            changed.push("[kv]");
        }
        if self.http.listen != next.http.listen {
            changed.push("[http] listen");
        }
        if self.runtime != next.runtime {
            changed.push("[runtime]");
        }
        if self.archive != next.archive {
            changed.push("[archive]");
        }
        changed
    }

    /// The Redis settings, when `[kv] backend = "redis"` (validation makes sure
    /// the URL is there).
    pub fn redis_settings(&self) -> Option<crate::kv::RedisSettings> {
        if self.kv.backend != KvBackend::Redis {
            return None;
        }
        Some(crate::kv::RedisSettings {
            url: self.kv.url.clone()?,
            prefix: self.kv.prefix.clone(),
            pool_size: self.kv.pool_size,
            timeout: self.kv.timeout,
        })
    }

    /// Opens the configured store: the embedded file, or a pool on Redis (which
    /// connects lazily: a Redis that is down now only fails the events that use
    /// kv while it is, and they are retried).
    pub fn open_kv(&self) -> Result<std::sync::Arc<dyn crate::kv::KvStore>, crate::kv::KvError> {
        match self.redis_settings() {
            Some(settings) => {
                let store = crate::kv::RedisStore::new(&settings)?;
                match store.ping() {
                    Ok(()) => tracing::info!(store = %store.describe(), "plugin state is shared"),
                    Err(e) => tracing::warn!(
                        store = %store.describe(),
                        error = %e,
                        "redis is not reachable yet; events that use kv are retried until it is"
                    ),
                }
                Ok(std::sync::Arc::new(store))
            }
            None => Ok(std::sync::Arc::new(crate::kv::EmbeddedStore::open(
                &self.kv_path(),
            )?)),
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}
