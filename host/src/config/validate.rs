//! Everything a configuration must satisfy beyond its shape: names that can
//! become queues and namespaces, routes and outputs that point at things that
//! exist, and numbers in ranges that work. [`RouterConfig::validate`] collects
//! every problem, each prefixed with the key it is about, so that one run of
//! `switchboard check` shows them all.

use std::collections::BTreeMap;
use std::time::Duration;

use bytesize::ByteSize;

use super::units::{duration_text, size_text};
use super::{Backoff, Cooldown, KvBackend, PluginConfig, PluginDefaults, RouterConfig};

/// Longest plugin name: it is part of queue names and key-value namespaces.
pub const MAX_PLUGIN_NAME: usize = 64;
/// Longest exchange name (AMQP's short string).
pub const MAX_EXCHANGE_NAME: usize = 255;

const MIN_TIMEOUT: Duration = Duration::from_millis(1);
const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// Bounds of `max_delay`: what a delayed output may ask for (RabbitMQ's delay
/// ladder declares a queue for each power of two up to the largest).
const MIN_MAX_DELAY: Duration = Duration::from_millis(1);
pub const MAX_MAX_DELAY: Duration = Duration::from_secs(90 * 24 * 3600);
const MIN_MEMORY: ByteSize = ByteSize::mib(1);
const MAX_MEMORY: ByteSize = ByteSize::gib(4);
const MIN_STACK: ByteSize = ByteSize::kib(64);
const MAX_STACK: ByteSize = ByteSize::mib(8);

impl RouterConfig {
    fn validate_kv(&self, e: &mut Vec<String>) {
        let kv = &self.kv;
        match (kv.backend, &kv.url) {
            (KvBackend::Redis, None) => e.push(
                "kv.url: backend \"redis\" needs a URL (kv.url, or the REDIS_URL environment \
                 variable), e.g. redis://redis:6379/0"
                    .into(),
            ),
            (KvBackend::Redis, Some(url)) => {
                let raw = url.expose();
                if !["redis://", "rediss://", "redis+unix://", "unix://"]
                    .iter()
                    .any(|scheme| raw.starts_with(scheme))
                {
                    e.push(format!(
                        "kv.url: expected a redis:// or rediss:// URL, got \"{url}\""
                    ));
                } else if let Err(why) = redis::Client::open(raw) {
                    let why = url.scrub(&why.to_string());
                    e.push(format!("kv.url: \"{url}\" is not a valid Redis URL: {why}"));
                }
            }
            (KvBackend::Embedded, Some(_)) => e.push(
                "kv.url: set, but kv.backend is \"embedded\": add backend = \"redis\" to share \
                 plugin state through Redis, or remove the URL"
                    .into(),
            ),
            (KvBackend::Embedded, None) => {}
        }
        if kv.prefix.is_empty()
            || kv
                .prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            e.push(format!(
                "kv.prefix: must be non-empty, without spaces or control characters, got {:?}",
                kv.prefix
            ));
        }
        if !(1..=1024).contains(&kv.pool_size) {
            e.push(format!(
                "kv.pool_size: must be between 1 and 1024, got {}",
                kv.pool_size
            ));
        }
        if kv.timeout < Duration::from_millis(10) || kv.timeout > Duration::from_secs(60) {
            e.push(format!(
                "kv.timeout: must be between 10ms and 1m, got {}",
                super::duration_text(kv.timeout)
            ));
        }
    }

    /// Every problem with this configuration, each naming its key
    /// (`routes[2].plugin: unknown plugin "biling" (declared: …)`), or `Ok`.
    /// A missing `.wasm` file is not a problem here: the watcher may add it later.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = self.env_errors.clone();
        let e = &mut errors;

        let kind = self.broker.bus_kind();
        if let Err(why) = &kind {
            e.push(why.clone());
        }
        if let (Some(url), Ok(super::BrokerKind::RedisStreams)) = (&self.broker.url, &kind) {
            if let Err(why) = redis::Client::open(url.expose()) {
                let why = url.scrub(&why.to_string());
                e.push(format!(
                    "broker.url: \"{url}\" is not a valid Redis URL: {why}"
                ));
            }
            if self.archive.enabled {
                e.push(
                    "archive.enabled: the event archive is not available on the \
                     redis-streams bus yet"
                        .into(),
                );
            }
        }
        if self.broker.claim_idle < std::time::Duration::from_secs(1)
            || self.broker.claim_idle > std::time::Duration::from_secs(24 * 3600)
        {
            e.push(format!(
                "broker.claim_idle: must be between 1s and 24h, got {}",
                super::duration_text(self.broker.claim_idle)
            ));
        }
        if self.broker.stream_max_length < 1000 {
            e.push(format!(
                "broker.stream_max_length: must be at least 1000, got {}",
                self.broker.stream_max_length
            ));
        }
        if let (Some(url), Ok(super::BrokerKind::RabbitMq)) = (&self.broker.url, &kind) {
            let raw = url.expose();
            if let Err(why) = raw.parse::<lapin::uri::AMQPUri>()
                // A malformed RABBITMQ_* variable is already reported by name.
                && !self.env_errors.iter().any(|e| e.starts_with("RABBITMQ_"))
            {
                // The parser's message may quote the URL: redact what it says.
                let why = url.scrub(&why);
                e.push(format!(
                    "broker.url: \"{url}\" is not a valid AMQP URL: {why}"
                ));
            }
        }
        for (i, rule) in self.archive.aggregates.iter().enumerate() {
            if let Err(why) = crate::route::TopicPattern::parse(&rule.pattern) {
                e.push(format!("archive.aggregates[{i}].match: {why}"));
            }
            if rule.field.is_empty() || rule.field.split('.').any(str::is_empty) {
                e.push(format!(
                    "archive.aggregates[{i}].field: {:?} is not a dotted path such as data.order_id",
                    rule.field
                ));
            }
        }
        if self.archive.segment_size.as_u64() < 4096 {
            e.push(format!(
                "archive.segment_size: {} is too small (at least 4KiB)",
                self.archive.segment_size
            ));
        }
        if let Some(ca) = &self.broker.ca_file
            && !ca.is_file()
        {
            e.push(format!(
                "broker.ca_file: {} is not a readable file",
                ca.display()
            ));
        }
        if self.broker.timeout < std::time::Duration::from_millis(100)
            || self.broker.timeout > std::time::Duration::from_secs(600)
        {
            e.push(format!(
                "broker.timeout: must be between 100ms and 10m, got {}",
                super::duration_text(self.broker.timeout)
            ));
        }
        if let Some(ttl) = self.broker.dlq_ttl
            && (ttl < std::time::Duration::from_secs(1) || ttl.as_millis() > u128::from(u32::MAX))
        {
            e.push(format!(
                "broker.dlq_ttl: must be between 1s and 49d (RabbitMQ's largest message TTL), got {}",
                super::duration_text(ttl)
            ));
        }
        if self.broker.dlq_max_length == Some(0) {
            e.push(
                "broker.dlq_max_length: must be at least 1 (leave it unset to keep every dead letter)"
                    .into(),
            );
        }
        if let Err(why) = check_exchange_name(&self.broker.prefix) {
            e.push(format!("broker.prefix: {why}"));
        }
        self.validate_kv(e);
        if let Some(token) = &self.http.token
            && token.expose().trim().len() < 16
        {
            e.push(
                "http.token: must be at least 16 characters (e.g. `openssl rand -hex 32`)".into(),
            );
        }
        if self.http.protect_reads && self.http.token.is_none() {
            e.push(
                "http.protect_reads: needs a token (http.token or SWITCHBOARD_ADMIN_TOKEN)".into(),
            );
        }
        if self.runtime.max_instances < 1 {
            e.push("runtime.max_instances: must be at least 1, got 0".into());
        }
        size_range(
            e,
            "runtime.max_stack",
            self.runtime.max_stack,
            MIN_STACK,
            MAX_STACK,
        );

        let mut exchanges: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, exchange) in self.exchanges.iter().enumerate() {
            if let Err(why) = check_exchange_name(&exchange.name) {
                e.push(format!("exchanges[{i}].name: {why}"));
            }
            if let Some(first) = exchanges.insert(&exchange.name, i) {
                e.push(format!(
                    "exchanges[{i}].name: {:?} is already declared by exchanges[{first}]",
                    exchange.name
                ));
                exchanges.insert(&exchange.name, first);
            }
        }
        let declared_exchanges = declared(exchanges.keys().copied());
        let declared_plugins = declared(self.plugins.keys().map(String::as_str));

        check_defaults(e, &self.defaults);
        for (name, plugin) in &self.plugins {
            let key = plugin_key(name);
            if let Err(why) = check_plugin_name(name) {
                e.push(format!("{key}: {why}"));
            }
            check_plugin(e, &key, plugin);
            if let Some(out) = &plugin.output_exchange
                && !exchanges.contains_key(out.as_str())
            {
                e.push(format!(
                    "{key}.output_exchange: unknown exchange {out:?} ({declared_exchanges})"
                ));
            }
        }

        for (i, route) in self.routes.iter().enumerate() {
            if !exchanges.contains_key(route.exchange.as_str()) {
                e.push(format!(
                    "routes[{i}].exchange: unknown exchange {:?} ({declared_exchanges})",
                    route.exchange
                ));
            }
            if route.patterns.is_empty() {
                e.push(format!(
                    "routes[{i}].patterns: empty; a route needs at least one pattern"
                ));
            }
            for (j, pattern) in route.patterns.iter().enumerate() {
                if let Err(why) = check_pattern(pattern) {
                    e.push(format!(
                        "routes[{i}].patterns[{j}]: invalid pattern {pattern:?}: {why}"
                    ));
                }
            }
            if !self.plugins.contains_key(&route.plugin) {
                e.push(format!(
                    "routes[{i}].plugin: unknown plugin {:?} ({declared_plugins})",
                    route.plugin
                ));
            }
        }

        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// `declared: a, b, c` or `none declared`, for "unknown …" messages.
fn declared<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    if names.is_empty() {
        "none declared".into()
    } else {
        format!("declared: {}", names.join(", "))
    }
}

/// How a plugin's table is named in messages: `plugins.billing`, or quoted when
/// the name is not a bare TOML key.
fn plugin_key(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        format!("plugins.{name}")
    } else {
        format!("plugins.{name:?}")
    }
}

/// A plugin name: `[a-z0-9][a-z0-9_-]*`, at most 64 characters.
pub fn check_plugin_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !first_ok || !rest_ok {
        return Err(format!(
            "invalid plugin name {name:?}: use lowercase letters, digits, `_` and `-`, \
             starting with a letter or digit (it names the plugin's queue and state)"
        ));
    }
    if name.len() > MAX_PLUGIN_NAME {
        return Err(format!(
            "plugin name {name:?} is {} characters long; the limit is {MAX_PLUGIN_NAME}",
            name.len()
        ));
    }
    Ok(())
}

/// An exchange name (or the broker prefix): letters, digits, `-_.:`, at most 255
/// bytes, not starting with `amq.` (reserved by RabbitMQ).
pub fn check_exchange_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(format!(
            "invalid name {name:?}: {c:?} is not allowed (use letters, digits, `-`, `_`, `.`, `:`)"
        ));
    }
    if name.len() > MAX_EXCHANGE_NAME {
        return Err(format!(
            "name is {} characters long; the limit is {MAX_EXCHANGE_NAME}",
            name.len()
        ));
    }
    if name.starts_with("amq.") {
        return Err(format!(
            "invalid name {name:?}: names starting with \"amq.\" are reserved by RabbitMQ"
        ));
    }
    Ok(())
}

/// A route pattern: what RabbitMQ accepts, except the empty pattern, which
/// matches only the empty routing key and is almost always a mistake.
fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("empty (use \"#\" to match every routing key)".into());
    }
    crate::route::TopicPattern::parse(pattern)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn check_defaults(e: &mut Vec<String>, d: &PluginDefaults) {
    at_least_1(e, "defaults.prefetch", d.prefetch.into());
    at_least_1(e, "defaults.concurrency", d.concurrency.into());
    duration_range(e, "defaults.timeout", d.timeout, MIN_TIMEOUT, MAX_TIMEOUT);
    size_range(e, "defaults.memory", d.memory, MIN_MEMORY, MAX_MEMORY);
    at_least_1(e, "defaults.instance_reuse", d.instance_reuse.into());
    at_least_1(e, "defaults.max_attempts", d.max_attempts.into());
    at_least_1(e, "defaults.max_hops", d.max_hops.into());
    at_least_1(
        e,
        "defaults.queue_capacity",
        u64::try_from(d.queue_capacity).unwrap_or(u64::MAX),
    );
    duration_range(
        e,
        "defaults.max_delay",
        d.max_delay,
        MIN_MAX_DELAY,
        MAX_MAX_DELAY,
    );
    check_backoff(e, "defaults.backoff", &d.backoff);
    check_cooldown(e, "defaults.cooldown", &d.cooldown);
}

/// The overrides a plugin sets; what it inherits was checked in `[defaults]`.
fn check_plugin(e: &mut Vec<String>, key: &str, p: &PluginConfig) {
    let k = |field: &str| format!("{key}.{field}");
    if let Some(v) = p.prefetch {
        at_least_1(e, &k("prefetch"), v.into());
    }
    if let Some(v) = p.concurrency {
        at_least_1(e, &k("concurrency"), v.into());
    }
    if let Some(v) = p.timeout {
        duration_range(e, &k("timeout"), v, MIN_TIMEOUT, MAX_TIMEOUT);
    }
    if let Some(v) = p.memory {
        size_range(e, &k("memory"), v, MIN_MEMORY, MAX_MEMORY);
    }
    if let Some(v) = p.instance_reuse {
        at_least_1(e, &k("instance_reuse"), v.into());
    }
    if let Some(v) = p.max_attempts {
        at_least_1(e, &k("max_attempts"), v.into());
    }
    if let Some(v) = p.max_hops {
        at_least_1(e, &k("max_hops"), v.into());
    }
    if let Some(v) = p.queue_capacity {
        at_least_1(
            e,
            &k("queue_capacity"),
            u64::try_from(v).unwrap_or(u64::MAX),
        );
    }
    if let Some(v) = p.max_delay {
        duration_range(e, &k("max_delay"), v, MIN_MAX_DELAY, MAX_MAX_DELAY);
    }
    if let Some(b) = &p.backoff {
        check_backoff(e, &k("backoff"), b);
    }
    if let Some(c) = &p.cooldown {
        check_cooldown(e, &k("cooldown"), c);
    }
    if p.dedupe == Some(Duration::ZERO) {
        e.push(format!(
            "{}: must be longer than 0 (leave it out for no deduplication)",
            k("dedupe")
        ));
    }
    if let Some(file) = &p.file
        && file.as_os_str().is_empty()
    {
        e.push(format!("{}: empty path", k("file")));
    }
}

/// Longest cool-down pause.
const MAX_COOLDOWN: Duration = Duration::from_secs(3600);
/// Shortest cool-down pause (the workers look at it every few milliseconds).
const MIN_COOLDOWN: Duration = Duration::from_millis(10);

fn check_cooldown(e: &mut Vec<String>, key: &str, c: &Cooldown) {
    duration_range(
        e,
        &format!("{key}.initial"),
        c.initial,
        MIN_COOLDOWN,
        MAX_COOLDOWN,
    );
    duration_range(e, &format!("{key}.max"), c.max, MIN_COOLDOWN, MAX_COOLDOWN);
    if c.initial > c.max {
        e.push(format!(
            "{key}: initial ({}) is longer than max ({})",
            duration_text(c.initial),
            duration_text(c.max)
        ));
    }
}

fn check_backoff(e: &mut Vec<String>, key: &str, b: &Backoff) {
    if b.initial > b.max {
        e.push(format!(
            "{key}: initial ({}) is longer than max ({})",
            duration_text(b.initial),
            duration_text(b.max)
        ));
    }
    if !(b.multiplier.is_finite() && b.multiplier >= 1.0) {
        e.push(format!(
            "{key}.multiplier: must be at least 1, got {}",
            b.multiplier
        ));
    }
    if !(0.0..=1.0).contains(&b.jitter) {
        e.push(format!(
            "{key}.jitter: must be between 0 and 1, got {}",
            b.jitter
        ));
    }
}

fn at_least_1(e: &mut Vec<String>, key: &str, value: u64) {
    if value < 1 {
        e.push(format!("{key}: must be at least 1, got {value}"));
    }
}

fn duration_range(e: &mut Vec<String>, key: &str, value: Duration, min: Duration, max: Duration) {
    if value < min || value > max {
        e.push(format!(
            "{key}: must be between {} and {}, got {}",
            duration_text(min),
            duration_text(max),
            duration_text(value)
        ));
    }
}

fn size_range(e: &mut Vec<String>, key: &str, value: ByteSize, min: ByteSize, max: ByteSize) {
    if value < min || value > max {
        e.push(format!(
            "{key}: must be between {} and {}, got {}",
            size_text(min),
            size_text(max),
            size_text(value)
        ));
    }
}
