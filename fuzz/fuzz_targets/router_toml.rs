//! `router.toml` parsing and validation on any text, and on line-level edits of
//! real configurations.
//!
//! The input is the file's text (invalid UTF-8 replaced). Half of the mutations
//! are libFuzzer's own; the other half edit whole lines the way people do (drop,
//! repeat or swap a line, put in a known line, give a key another value), so that
//! the fuzzer spends its time on files that get past the TOML syntax.
//!
//! Checked: [`RouterConfig::parse`] never panics. A parse error has a position
//! inside the text and a message; a validation error lists problems that each
//! start with the key they are about. Where a broker or Redis URL carries
//! [`PASSWORD`] in its credentials (between `://` and the last `@`), or the
//! admin token carries it, neither the error nor the parsed configuration's
//! `Debug` ever shows it. A configuration that validates is turned into what
//! the appliance derives from it at start: the bus topology, a route table,
//! each plugin's settings, limits and retry delays.

#![no_main]

use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::{fuzz_mutator, fuzz_target, fuzzer_mutate};
use switchboard::appliance::topology;
use switchboard::config::{ConfigError, RouterConfig};
use switchboard::route::RouteTable;

/// A password the seeds put in URLs: it must never appear in what is printed.
const PASSWORD: &str = "Zq8Xv3Kp";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let secret = secret_in_credentials(&text);
    match RouterConfig::parse(&text, Path::new("/nonexistent/switchboard")) {
        Ok(config) => {
            if secret {
                let debug = format!("{config:?}");
                assert!(!debug.contains(PASSWORD), "{debug}");
            }
            check_config(&config);
        }
        Err(error) => {
            check_error(&text, &error);
            if secret {
                let (display, debug) = (error.to_string(), format!("{error:?}"));
                assert!(!display.contains(PASSWORD), "{display}");
                assert!(!debug.contains(PASSWORD), "{debug}");
            }
        }
    }
});

fn check_error(text: &str, error: &ConfigError) {
    assert!(!error.to_string().trim().is_empty(), "{error:?}");
    match error {
        ConfigError::Parse {
            line,
            column,
            message,
            ..
        } => {
            let lines = text.split('\n').count();
            assert!((1..=lines).contains(line), "line {line} of {lines}");
            assert!(*column >= 1, "column {column}");
            assert!(!message.trim().is_empty(), "{error:?}");
        }
        ConfigError::Invalid { errors, .. } => {
            assert!(!errors.is_empty(), "{error:?}");
            for problem in errors {
                let (key, what) = problem.split_once(": ").unwrap_or(("", ""));
                let named = KEY_ROOTS.iter().any(|root| key.starts_with(root));
                assert!(named && !what.trim().is_empty(), "{problem:?}");
            }
        }
        ConfigError::Read { .. } => panic!("parse read a file: {error}"),
    }
}

/// How every validation problem starts: a key of the file, or the environment
/// variable that set it.
const KEY_ROOTS: &[&str] = &[
    "broker.",
    "kv.",
    "http.",
    "runtime.",
    "defaults.",
    "exchanges[",
    "plugins.",
    "routes[",
    "RABBITMQ_",
    "REDIS_",
    "SWITCHBOARD_",
];

/// What the appliance derives from a configuration when it starts.
fn check_config(config: &RouterConfig) {
    let topology = topology(config);
    if let Err(error) = RouteTable::new(topology.bindings.iter().cloned()) {
        panic!("a valid configuration makes no route table: {error}");
    }
    for route in &config.routes {
        assert!(config.exchange(&route.exchange).is_some(), "{route:?}");
    }
    for name in config.plugins.keys() {
        let Some(settings) = config.plugin_settings(name) else {
            panic!("no settings for plugin {name:?}");
        };
        let limits = settings.limits();
        assert_eq!(limits.memory, settings.memory.as_u64());
        for attempt in [1, 2, settings.max_attempts, u32::MAX] {
            let delay = settings.backoff.delay(attempt);
            // At most `max` (rounded to the millisecond), plus all the jitter.
            let most =
                (settings.backoff.max.saturating_mul(2)).saturating_add(Duration::from_millis(2));
            assert!(delay <= most, "{delay:?} after attempt {attempt}");
        }
    }
    let _ = config.runtime_config();
    let _ = config.redis_settings();
    assert!(config.restart_only_changes(config).is_empty());
}

/// Whether [`PASSWORD`] occurs once in `text`, in the credentials of
/// `[broker] url` or `[kv] url` or in `[http] token`, as TOML reads the file.
fn secret_in_credentials(text: &str) -> bool {
    if text.matches(PASSWORD).count() != 1 {
        return false;
    }
    let Ok(table) = text.parse::<toml::Table>() else {
        return false;
    };
    let value = |section: &str, key: &str| {
        table
            .get(section)
            .and_then(|s| s.get(key))
            .and_then(toml::Value::as_str)
            .map(str::to_owned)
    };
    let in_credentials = |url: Option<String>| {
        url.is_some_and(|url| {
            let Some((_, rest)) = url.split_once("://") else {
                return false;
            };
            rest.rfind('@')
                .is_some_and(|at| rest[..at].contains(PASSWORD))
        })
    };
    in_credentials(value("broker", "url"))
        || in_credentials(value("kv", "url"))
        || value("http", "token").is_some_and(|token| token.contains(PASSWORD))
}

// --- Line-level mutations ------------------------------------------------------

/// Lines worth putting into a configuration: every section and most keys.
const LINES: &[&str] = &[
    "[broker]",
    "url = \"amqp://app:Zq8Xv3Kp@rabbit:5672/%2f\"",
    "url = \"amqps://app:Zq8Xv3Kp@rabbit/vhost?heartbeat=10\"",
    "prefix = \"switchboard\"",
    "queue_type = \"classic\"",
    "unroutable = \"dead-letter\"",
    "ca_file = \"ca.pem\"",
    "timeout = \"5s\"",
    "[kv]",
    "backend = \"redis\"",
    "url = \"redis://:Zq8Xv3Kp@cache:6379/0\"",
    "pool_size = 16",
    "[http]",
    "listen = \"0.0.0.0:8080\"",
    "token = \"Zq8Xv3Kp-0123456789abcdef\"",
    "protect_reads = true",
    "[runtime]",
    "pooling = false",
    "max_instances = 1",
    "max_stack = \"512KiB\"",
    "cache = false",
    "[defaults]",
    "prefetch = 1",
    "concurrency = 1",
    "memory = \"64MiB\"",
    "instance_reuse = 1",
    "max_attempts = 5",
    "max_hops = 10",
    "queue_capacity = 10000",
    "[defaults.backoff]",
    "initial = \"500ms\"",
    "max = \"1m\"",
    "multiplier = 2.0",
    "jitter = 0.2",
    "[[exchanges]]",
    "name = \"events\"",
    "kind = \"fanout\"",
    "kind = \"direct\"",
    "durable = false",
    "[plugins.billing]",
    "[plugins.billing.config]",
    "file = \"billing.wasm\"",
    "enabled = false",
    "output_exchange = \"events\"",
    "dedupe = \"10m\"",
    "ordered = true",
    "backoff = { initial = \"1s\", max = \"2s\" }",
    "config = { forward = \"false\" }",
    "[[routes]]",
    "exchange = \"events\"",
    "pattern = \"payment.*\"",
    "patterns = [\"#\", \"a.*.b\"]",
    "plugin = \"billing\"",
];

/// Values worth giving a key: edges of every type the schema uses.
const VALUES: &[&str] = &[
    "\"\"",
    "\" \"",
    "0",
    "1",
    "-1",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "1e309",
    "nan",
    "inf",
    "-0.0",
    "true",
    "[]",
    "{}",
    "\"0s\"",
    "\"1ns\"",
    "\"10m 1s\"",
    "\"18446744073709551615s\"",
    "\"99999999999999h\"",
    "\"0B\"",
    "\"-1MiB\"",
    "\"18446744073709551615B\"",
    "\"16EiB\"",
    "\"1.5GiB\"",
    "\"amq.x\"",
    "\"a b\"",
    "\"\u{e9}\"",
    "\"amqp://\"",
    "\"amqp://app:Zq8Xv3Kp@\"",
    "\"amqp://app:Zq8Xv3Kp@[::1\"",
    "\"redis://app:Zq8Xv3Kp@cache:99999\"",
    "\"[::1]:0\"",
];

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let mut rng = Rng(u64::from(seed) | (1 << 32));
    if rng.below(2) == 0 {
        return fuzzer_mutate(data, size, max_size);
    }
    let text = String::from_utf8_lossy(&data[..size]).into_owned();
    let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
    let at = rng.below(lines.len());
    match rng.below(5) {
        0 => {
            lines.remove(at);
        }
        1 => {
            let line = lines[at].clone();
            lines.insert(rng.below(lines.len() + 1), line);
        }
        2 => {
            let other = rng.below(lines.len());
            lines.swap(at, other);
        }
        3 => {
            let line = LINES[rng.below(LINES.len())];
            lines.insert(rng.below(lines.len() + 1), line.to_owned());
        }
        _ => {
            if let Some((key, _)) = lines[at].split_once('=') {
                let value = VALUES[rng.below(VALUES.len())];
                lines[at] = format!("{}= {value}", key);
            }
        }
    }
    let edited = lines.join("\n");
    if edited.len() > max_size {
        return fuzzer_mutate(data, size, max_size);
    }
    data[..edited.len()].copy_from_slice(edited.as_bytes());
    edited.len()
});

/// xorshift64: mutations only need to differ, not to be good random numbers.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 as usize % n.max(1)
    }
}
