//! One plugin, three languages: the notification plugin in Rust (`plugins/notification`),
//! Python (`plugins/notification-py`) and JavaScript (`plugins/notification-js`) must
//! do exactly the same thing with every event.
//!
//! - The shared golden files in `golden/notification/` pass through `switchboard test`
//!   for each language.
//! - Over the golden events, the edge cases in `golden/notification/edge-*.jsonl` and
//!   a generated corpus, each language's outputs are byte for byte the Rust ones (kind,
//!   content type, exchange, headers and data bytes), and its failures are the same
//!   verdicts with the same reasons (for data that is not JSON, the same reason up to
//!   the parser's own detail).
//! - The large Python and JavaScript components are compiled once and then served
//!   from the compile cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use switchboard::cli::test::{TestArgs, run};
use switchboard::envelope;
use switchboard::runtime::{
    CacheOutcome, Event, Failure, Limits, Output, Plugin, PluginSpec, Runtime, RuntimeConfig,
};
use switchboard_tests::{Harness, lang_wasm, wasm};

/// The name every port runs under: output ids and `source` derive from it.
const NAME: &str = "notification";

/// What a reject for undecodable data starts with, before the parser's own words.
const NOT_JSON: &str = "data is not the expected JSON: ";

fn languages() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("rust", wasm("notification")),
        ("python", lang_wasm("notification-py")),
        ("javascript", lang_wasm("notification-js")),
    ]
}

fn golden(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden/notification")
        .join(file)
}

/// A `.config` file: one `key=value` per line (the value kept exactly, spaces and
/// all); blank lines and lines starting with `#` are skipped.
fn read_config(path: &Path) -> Config {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: {line:?} is not key=value", path.display()));
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

/// A plugin configuration: `key=value` pairs.
type Config = Vec<(String, String)>;

/// The golden sets: events, expected lines, configuration.
fn golden_sets() -> Vec<(&'static str, &'static str, Config)> {
    vec![
        ("events.jsonl", "expected.jsonl", vec![]),
        (
            "configured.events.jsonl",
            "configured.expected.jsonl",
            read_config(&golden("configured.config")),
        ),
    ]
}

#[test]
fn every_language_passes_the_shared_golden_files() {
    for (language, component) in languages() {
        for (events, expected, config) in golden_sets() {
            let args = TestArgs {
                plugin: component.clone(),
                events: golden(events),
                expect: Some(golden(expected)),
                bless: false,
                config: config.clone(),
                state: None,
                name: Some(NAME.into()),
                exchange: "events".into(),
                timeout: Duration::from_secs(5),
                memory: 64 << 20,
            };
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let code = run(&args, &mut out, &mut err).unwrap();
            let err = String::from_utf8_lossy(&err);
            assert_eq!(code, 0, "{language}, {events}:\n{err}");
            assert!(err.contains("lines match"), "{language}, {events}: {err}");
        }
    }
}

/// The events of a JSONL file of envelopes, as the host delivers them.
fn read_events(path: &Path) -> Vec<Event> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(n, line)| {
            envelope::decode_recorded("events", line.as_bytes(), None)
                .unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), n + 1))
        })
        .collect()
}

/// Every `edge-*.jsonl` in the golden folder, with the configurations of its
/// `edge-*.config`: one run per line, each a JSON array of `"key=value"` strings
/// (values keep every character, spaces included). Each file also runs without
/// configuration.
fn edge_cases() -> Vec<(Vec<Event>, Vec<Config>)> {
    let mut files: Vec<_> = std::fs::read_dir(golden(""))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("edge-") && name.ends_with(".jsonl")
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no edge-*.jsonl in {}",
        golden("").display()
    );
    files
        .into_iter()
        .map(|file| {
            let config = file.with_extension("config");
            let runs = std::fs::read_to_string(&config).unwrap_or_default();
            let mut configs: Vec<Config> = vec![vec![]];
            for line in runs.lines().filter(|l| !l.trim().is_empty()) {
                let pairs: Vec<String> = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{}: {line}: {e}", config.display()));
                configs.push(
                    pairs
                        .iter()
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').unwrap_or_else(|| {
                                panic!("{}: {kv:?} is not key=value", config.display())
                            });
                            (k.to_owned(), v.to_owned())
                        })
                        .collect(),
                );
            }
            (read_events(&file), configs)
        })
        .collect()
}

fn load(harness: &Harness, component: &Path, config: &[(String, String)]) -> Plugin {
    let mut spec = PluginSpec::from_file(NAME, component, harness.kv.clone()).unwrap();
    spec.config = config.iter().cloned().collect::<BTreeMap<_, _>>();
    spec.limits = Limits::default();
    harness.runtime.load(spec).unwrap().0
}

/// What one event produced, in a form that compares bytes.
#[derive(Debug, PartialEq)]
enum Outcome {
    Outputs(Vec<OutputBytes>),
    Failure(&'static str, String),
}

#[derive(Debug, PartialEq)]
struct OutputBytes {
    kind: String,
    content_type: Option<String>,
    exchange: Option<String>,
    headers: Vec<(String, String)>,
    /// The data as text when it is UTF-8 (readable diffs), else its bytes.
    data: Result<String, Vec<u8>>,
}

fn outcome(result: Result<Vec<Output>, Failure>) -> Outcome {
    match result {
        Ok(outputs) => Outcome::Outputs(
            outputs
                .into_iter()
                .map(|o| OutputBytes {
                    kind: o.kind,
                    content_type: o.content_type,
                    exchange: o.exchange,
                    headers: o.headers,
                    data: String::from_utf8(o.data).map_err(|e| e.into_bytes()),
                })
                .collect(),
        ),
        Err(failure) => {
            let value = serde_json::to_value(&failure).unwrap();
            let kind = match value["kind"].as_str().unwrap() {
                "reject" => "reject",
                "retry" => "retry",
                other => panic!("the plugin broke its sandbox ({other}): {value}"),
            };
            let reason = value["reason"].as_str().unwrap_or_default().to_owned();
            // The parser's own words after the fixed prefix are the language's.
            let reason = match reason.find(NOT_JSON) {
                Some(at) => reason[..at + NOT_JSON.len()].to_owned(),
                None => reason,
            };
            Outcome::Failure(kind, reason)
        }
    }
}

/// Runs `events` through every language under `config` and describes each event
/// on which a port differs from Rust.
fn differences(
    harness: &Harness,
    events: &[Event],
    config: &[(String, String)],
    checked: &mut usize,
) -> Vec<String> {
    let plugins: Vec<_> = languages()
        .into_iter()
        .map(|(language, component)| (language, load(harness, &component, config)))
        .collect();
    let mut found = Vec::new();
    for event in events {
        let reference = outcome(plugins[0].1.handle(event));
        for (language, plugin) in &plugins[1..] {
            let got = outcome(plugin.handle(event));
            if got != reference {
                found.push(format!(
                    "{language}, event {} ({}), data {:?}, config {config:?}:\n  rust: {reference:?}\n  {language}: {got:?}",
                    event.id,
                    event.kind,
                    String::from_utf8_lossy(&event.data),
                ));
            }
        }
        *checked += 1;
    }
    found
}

#[test]
fn every_language_produces_the_same_bytes() {
    // Each configuration is a load; the compile cache makes every load after the
    // first a cache hit, as in the appliance.
    let cache = tempfile::tempdir().unwrap();
    let harness = Harness::with_config(RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..RuntimeConfig::default()
    });
    let mut found = Vec::new();
    let mut checked = 0;

    for (events, _, config) in golden_sets() {
        let events = read_events(&golden(events));
        found.extend(differences(&harness, &events, &config, &mut checked));
    }
    for (events, configs) in edge_cases() {
        for config in configs {
            found.extend(differences(&harness, &events, &config, &mut checked));
        }
    }
    let generated = Corpus::new(0x5eed_cafe).events(600);
    for (_, _, config) in golden_sets() {
        found.extend(differences(&harness, &generated, &config, &mut checked));
    }

    eprintln!(
        "{checked} events through {} languages, {} differences",
        languages().len(),
        found.len()
    );
    assert!(
        found.is_empty(),
        "{} differences, the first ones:\n{}",
        found.len(),
        found[..found.len().min(10)].join("\n")
    );
    assert!(checked > 1000, "only {checked} events checked");
}

#[test]
fn large_components_are_compiled_once_then_served_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let config = || RuntimeConfig {
        cache_dir: Some(dir.path().join("cache")),
        ..RuntimeConfig::default()
    };
    let harness = Harness::new();
    let event = switchboard_tests::event(
        "cache-1",
        "order.created",
        serde_json::json!({"order_id": "o-1", "email": "c@example.com"}),
    );
    for (language, component) in languages().into_iter().skip(1) {
        let size = std::fs::metadata(&component).unwrap().len();
        let mut seen = Vec::new();
        for round in 0..2 {
            // A new runtime each round: what a restart of the appliance sees.
            let runtime = Runtime::new(config()).unwrap();
            let spec = PluginSpec::from_file(NAME, &component, harness.kv.clone()).unwrap();
            let started = Instant::now();
            let (plugin, cache) = runtime.load(spec).unwrap();
            let took = started.elapsed();
            let outputs = plugin.handle(&event).unwrap();
            assert_eq!(outputs.len(), 1, "{language}, round {round}");
            eprintln!("{language} ({size} bytes): load {took:?}, {cache:?}");
            seen.push(cache);
        }
        assert_eq!(
            seen,
            [CacheOutcome::Compiled, CacheOutcome::Hit],
            "{language}: compiled on the first load, from the cache on the second"
        );
        assert!(
            size > 4 << 20,
            "{language}: {size} bytes is not a large component"
        );
    }
}

/// A generated corpus: events of every kind the plugin knows (and some it does
/// not), with data built from the fields its templates and lookups read, and values
/// of every shape (numbers written in many ways, odd whitespace and characters,
/// nested objects and arrays, duplicates, nulls). Deterministic for a seed.
struct Corpus {
    state: u64,
}

/// Kinds beyond the built-in ones: two the configured golden set gives templates
/// (or only a subject), and one the plugin knows nothing of.
const OTHER_KINDS: [&str; 3] = ["invoice.overdue", "refund.issued", "inventory.low"];

const FIELDS: [&str; 20] = [
    "email",
    "phone",
    "to",
    "amount",
    "currency",
    "payment_id",
    "reason",
    "bill_id",
    "order_id",
    "tracking_number",
    "name",
    "event_name",
    "ticket_id",
    "quantity",
    "listing_id",
    "price",
    "invoice_id",
    "items",
    "customer",
    "user",
];

const NESTED: [&str; 6] = ["recipient", "customer", "user", "buyer", "items", "0"];

const NUMBERS: [&str; 30] = [
    "0",
    "-0",
    "1",
    "42",
    "-7",
    "1.0",
    "19.99",
    "0.1",
    "2.50",
    "1e3",
    "1E+3",
    "1e-3",
    "1.5e300",
    "-2.5e-300",
    "1e15",
    "1e16",
    "123456789012345.6",
    "1234567890123456.7",
    "0.00001",
    "0.000001",
    "9007199254740993",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "-9223372036854775809",
    "3.141592653589793238462643383279",
    "4.9e-324",
    "2.2250738585072014e-308",
    "100000000000000000000000",
    "0.30000000000000004",
];

/// Characters strings are made of: plain, whitespace of every trim set, escapes,
/// controls, non-ASCII, astral.
const CHARS: [&str; 24] = [
    "a", "Z", "0", "@", ".", "+", " ", "\\t", "\\n", "\\r", "\\u000b", "\\u000c", "\\u001c",
    "\\u0085", "\u{a0}", "\u{3000}", "\u{2029}", "\u{feff}", "\\\"", "\\\\", "é", "😀", "{{", "}}",
];

impl Corpus {
    fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// xorshift64*: small, deterministic, good enough to spread cases.
    fn next(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn string(&mut self) -> String {
        let len = self.below(8);
        let mut s = String::from("\"");
        for _ in 0..len {
            s.push_str(self.pick(&CHARS));
        }
        s.push('"');
        s
    }

    fn email(&mut self) -> String {
        let around = ["", " ", "\\u0085", "\u{3000}", "\u{feff}", "\\u001c", "\\t"];
        format!(
            "\"{}user{}@example.com{}\"",
            self.pick(&around),
            self.below(100),
            self.pick(&around)
        )
    }

    fn value(&mut self, depth: usize) -> String {
        match self.below(if depth > 2 { 5 } else { 8 }) {
            0 | 1 => self.pick(&NUMBERS).to_owned(),
            2 => self.string(),
            3 => self.email(),
            4 => ["true", "false", "null"][self.below(3)].to_owned(),
            5 | 6 => self.object(depth + 1),
            _ => {
                let len = self.below(4);
                let items: Vec<_> = (0..len).map(|_| self.value(depth + 1)).collect();
                format!("[{}]", items.join(","))
            }
        }
    }

    fn object(&mut self, depth: usize) -> String {
        let len = self.below(5);
        let mut members = Vec::new();
        for _ in 0..len {
            let key = if self.below(2) == 0 {
                self.pick(&NESTED)
            } else {
                self.pick(&FIELDS)
            };
            let value = if key == "email" || key == "phone" {
                self.email()
            } else {
                self.value(depth)
            };
            let space = [" ", "", "\n\t"][self.below(3)];
            members.push(format!("\"{key}\":{space}{value}"));
        }
        format!("{{{}}}", members.join(","))
    }

    fn data(&mut self) -> Vec<u8> {
        let mut members = Vec::new();
        for _ in 0..1 + self.below(8) {
            let key = self.pick(&FIELDS);
            let value = match key {
                "email" | "phone" | "to" => self.email(),
                "customer" | "user" => self.object(1),
                _ => self.value(0),
            };
            members.push(format!("\"{key}\":{value}"));
        }
        let text = format!("{{{}}}", members.join(","));
        match self.below(40) {
            0 => text[..text.len() / 2].into(), // cut short: not JSON
            1 => format!("{text},"),            // trailing garbage
            _ => text,
        }
        .into_bytes()
    }

    fn events(&mut self, n: usize) -> Vec<Event> {
        let kinds: Vec<&str> = notification::BUILT_IN_KINDS
            .into_iter()
            .chain(OTHER_KINDS)
            .collect();
        (0..n)
            .map(|i| {
                let kind = self.pick(&kinds);
                let mut event = switchboard_tests::event(&format!("gen-{i}"), kind, Value::Null);
                event.data = self.data();
                event
            })
            .collect()
    }
}
