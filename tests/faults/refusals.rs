//! The broker says no: faults where RabbitMQ refuses or cannot take what the
//! router sends — a dead-letter queue that is gone or full, an output exchange
//! deleted under load, outputs no queue is bound for, a memory alarm that
//! blocks every publish, a plugin removed while its retries wait in the tiers —
//! and the re-drive of dead letters.
//!
//! Black-box: each scenario runs real `switchboard run` processes
//! ([`Replica`]), a publisher that keeps publishing with confirms in a thread
//! of its own during the fault ([`Feeder`]), and an independent AMQP client
//! that collects outputs and dead letters ([`Observer`]). At the end every
//! confirmed input id is accounted for — handled (an output seen), or
//! dead-lettered with a kind and a reason — and an `ACCOUNT` line is printed.
//!
//! Run: `cargo test --release -p switchboard-tests --test faults refusals --
//! --test-threads=1 --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};
use switchboard_tests::account::{Account, Ledger, report};
use switchboard_tests::broker::{
    Amqp, Confirmed, Publish, SinkLife, TestVhost, ThrowawayNode, require_broker,
};
use switchboard_tests::process::Replica;
use switchboard_tests::{wait_until, wasm};

/// The worker's queues, with the default prefix.
const QUEUE: &str = "switchboard.worker";
const DLQ: &str = "switchboard.worker.dlq";
const DLX: &str = "switchboard.dlx";

/// How long collecting waits with nothing arriving before it calls what is
/// missing stuck.
const STALLED: Duration = Duration::from_secs(12);

// --- Configuration ------------------------------------------------------------------

/// A router on `url` with the exchanges `events` (inputs) and `out` (outputs);
/// `broker` and `defaults` are extra lines of those sections, `plugins` the
/// plugin tables and routes.
fn config(url: &str, broker: &str, defaults: &str, plugins: &str) -> String {
    format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[broker]
url = "{url}"
{broker}
[defaults]
{defaults}
[defaults.backoff]
initial = "200ms"
max = "400ms"
jitter = 0.0
[[exchanges]]
name = "events"
[[exchanges]]
name = "out"
{plugins}
"##
    )
}

/// `worker` (the scripted guest) takes every key of `events`, outputs to `out`.
const WORKER: &str = r##"
[plugins.worker]
output_exchange = "out"
[[routes]]
exchange = "events"
pattern = "#"
plugin = "worker"
"##;

fn defaults(concurrency: usize, prefetch: usize, max_attempts: u32) -> String {
    format!("concurrency = {concurrency}\nprefetch = {prefetch}\nmax_attempts = {max_attempts}")
}

// --- A publisher that keeps publishing ---------------------------------------------

/// One input the broker confirmed as routed.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    kind: &'static str,
    /// When its publish began.
    at: Instant,
}

#[derive(Debug, Default, Clone)]
struct Fed {
    sent: Vec<Sent>,
    /// Publishes the broker did not confirm as routed, by what it said.
    refused: BTreeMap<String, usize>,
}

impl Fed {
    fn ids_of(&self, kind: &str) -> BTreeSet<String> {
        self.sent
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| s.id.clone())
            .collect()
    }
}

/// What an input asks the scripted guest to do: its kind (also the routing
/// key) and data.
type Script = fn(usize) -> (&'static str, Value);

/// Publishes events `<prefix>-<i>` to `events` in confirmed batches from a
/// thread of its own (its own connection), as a service does, until stopped
/// or `limit` events were sent.
struct Feeder {
    stop: Arc<AtomicBool>,
    fed: Arc<Mutex<Fed>>,
    thread: Option<JoinHandle<()>>,
}

impl Feeder {
    fn start(
        url: &str,
        prefix: &'static str,
        batch: usize,
        pause: Duration,
        limit: Option<usize>,
        script: Script,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let fed = Arc::new(Mutex::new(Fed::default()));
        let url = url.to_string();
        let thread = {
            let (stop, fed) = (stop.clone(), fed.clone());
            std::thread::spawn(move || {
                let amqp = Amqp::connect(&url).unwrap();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) && limit.is_none_or(|l| i < l) {
                    let mut ids = Vec::with_capacity(batch);
                    let mut messages = Vec::with_capacity(batch);
                    for j in i..i + batch {
                        let id = format!("{prefix}-{j}");
                        let (kind, data) = script(j);
                        let body =
                            json!({"id": id, "type": kind, "source": "faults", "data": data});
                        messages.push(Publish::json("events", kind, &body).message_id(&id));
                        ids.push((id, kind));
                    }
                    let at = Instant::now();
                    let confirmed = amqp.publish_all(&messages);
                    let mut fed = fed.lock().unwrap();
                    for ((id, kind), confirmed) in ids.into_iter().zip(confirmed) {
                        if confirmed == Confirmed::Routed {
                            fed.sent.push(Sent { id, kind, at });
                        } else {
                            *fed.refused.entry(format!("{confirmed:?}")).or_default() += 1;
                        }
                    }
                    drop(fed);
                    i += batch;
                    std::thread::sleep(pause);
                }
            })
        };
        Self {
            stop,
            fed,
            thread: Some(thread),
        }
    }

    /// What was confirmed so far.
    fn fed(&self) -> Fed {
        self.fed.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.fed.lock().unwrap().sent.len()
    }

    /// Stops publishing (after the batch in flight) and returns what was confirmed.
    fn stop(mut self) -> Fed {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take()
            && let Err(panic) = thread.join()
        {
            std::panic::resume_unwind(panic);
        }
        self.fed()
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// --- An independent observer --------------------------------------------------------

/// One dead letter as the observer took it.
#[derive(Debug, Clone)]
struct Letter {
    kind: String,
    reason: String,
}

/// Takes outputs from sink queues and dead letters from dead-letter queues
/// (its own connection, which never publishes: a memory alarm does not block
/// it), and remembers what answered which input.
struct Observer {
    amqp: Amqp,
    sinks: Vec<String>,
    dlqs: Vec<String>,
    /// Whether dead-letter queues are read now (not while a test needs them full).
    read_dlqs: bool,
    /// Input id → output id → copies seen.
    outputs: BTreeMap<String, BTreeMap<String, usize>>,
    /// Input id → when its first output was seen.
    first_output: BTreeMap<String, Instant>,
    /// Input id → its dead letters.
    letters: BTreeMap<String, Vec<Letter>>,
}

impl Observer {
    /// Declares a durable sink `queue` on `out` for each `(queue, pattern)`.
    fn new(url: &str, sinks: &[(&str, &str)], dlqs: &[&str]) -> Self {
        let amqp = Amqp::connect(url).unwrap();
        for (queue, pattern) in sinks {
            amqp.declare_sink(Some(queue), SinkLife::Durable, "out", pattern);
        }
        Self {
            amqp,
            sinks: sinks.iter().map(|(q, _)| q.to_string()).collect(),
            dlqs: dlqs.iter().map(ToString::to_string).collect(),
            read_dlqs: true,
            outputs: BTreeMap::new(),
            first_output: BTreeMap::new(),
            letters: BTreeMap::new(),
        }
    }

    /// Takes what is there now; how many messages it took.
    fn poll(&mut self) -> usize {
        let mut taken = 0;
        for sink in self.sinks.clone() {
            for m in self.amqp.get(&sink, 500, Duration::from_millis(100)) {
                taken += 1;
                let input = match m.header("echo-of") {
                    Some(id) => id.to_string(),
                    None => m.json()["causation_id"]
                        .as_str()
                        .unwrap_or_else(|| panic!("an output naming no input: {m:?}"))
                        .to_string(),
                };
                let output = m.message_id.clone().expect("outputs carry their id");
                self.first_output
                    .entry(input.clone())
                    .or_insert_with(Instant::now);
                *self
                    .outputs
                    .entry(input)
                    .or_default()
                    .entry(output)
                    .or_default() += 1;
            }
        }
        if self.read_dlqs {
            for dlq in self.dlqs.clone() {
                // A missing queue would close the client's channel: look first.
                if self.amqp.queue_state(&dlq).is_none() {
                    continue;
                }
                for m in self.amqp.get(&dlq, 500, Duration::from_millis(10)) {
                    taken += 1;
                    let id = m
                        .message_id
                        .clone()
                        .unwrap_or_else(|| m.json()["id"].as_str().unwrap_or_default().to_string());
                    let header = |name: &str| m.header(name).unwrap_or_default().to_string();
                    self.letters.entry(id).or_default().push(Letter {
                        kind: header("switchboard-error-kind"),
                        reason: header("switchboard-error"),
                    });
                }
            }
        }
        taken
    }

    /// Keeps taking for `time`.
    fn watch(&mut self, time: Duration) {
        let until = Instant::now() + time;
        while Instant::now() < until {
            self.poll();
        }
    }

    /// Whether every id of `fed` has an output or a dead letter.
    fn settled(&self, fed: &Fed) -> bool {
        fed.sent
            .iter()
            .all(|s| self.outputs.contains_key(&s.id) || self.letters.contains_key(&s.id))
    }

    /// Takes until every id of `fed` is settled and `quiet` passed with nothing
    /// new (late duplicates come in that time), or `timeout` passed, or
    /// nothing at all came for [`STALLED`] (what is missing then is stuck).
    fn settle(&mut self, fed: &Fed, quiet: Duration, timeout: Duration) {
        let until = Instant::now() + timeout;
        let mut news = Instant::now();
        while Instant::now() < until && news.elapsed() < STALLED {
            if self.poll() > 0 {
                news = Instant::now();
            }
            if self.settled(fed) && news.elapsed() >= quiet {
                return;
            }
        }
    }

    /// The account of `fed` by what was seen.
    fn account(&self, fed: &Fed) -> Account {
        let mut ledger = Ledger::new();
        for s in &fed.sent {
            ledger.published(s.id.clone());
        }
        for (input, outputs) in &self.outputs {
            for (output, copies) in outputs {
                ledger.output(input, output, *copies);
            }
        }
        for (id, letters) in &self.letters {
            for l in letters {
                ledger.dead_letter(id, &l.kind, &l.reason);
            }
        }
        ledger.account()
    }

    /// Inputs of `kind` that waited longer than `limit` for their output (or
    /// still wait, published longer ago than that): (how many, the longest wait).
    fn late(&self, fed: &Fed, kind: &str, limit: Duration) -> (usize, Duration) {
        let now = Instant::now();
        let mut late = 0;
        let mut longest = Duration::ZERO;
        for s in fed.sent.iter().filter(|s| s.kind == kind) {
            let waited = match self.first_output.get(&s.id) {
                Some(seen) => seen.saturating_duration_since(s.at),
                None => now.saturating_duration_since(s.at),
            };
            if waited > limit {
                late += 1;
            }
            if self.first_output.contains_key(&s.id) || waited > limit {
                longest = longest.max(waited);
            }
        }
        (late, longest)
    }

    /// Dead-letter kinds of the ids in `ids`: kind → how many ids.
    fn kinds(&self, ids: &BTreeSet<String>) -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        for id in ids {
            if let Some(letters) = self.letters.get(id) {
                let set: BTreeSet<&str> = letters.iter().map(|l| l.kind.as_str()).collect();
                for kind in set {
                    *kinds.entry(kind.to_string()).or_default() += 1;
                }
            }
        }
        kinds
    }
}

// --- Broker administration --------------------------------------------------------

/// A plain lapin connection for what [`Amqp`] does not offer: deleting and
/// declaring exchanges, declaring a queue exactly as the router does. Each
/// operation uses a channel of its own (a refusal closes its channel).
struct Admin {
    runtime: tokio::runtime::Runtime,
    connection: Connection,
}

impl Admin {
    fn connect(url: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let connection = runtime
            .block_on(Connection::connect(url, ConnectionProperties::default()))
            .unwrap();
        Self {
            runtime,
            connection,
        }
    }

    fn channel(&self) -> lapin::Channel {
        self.runtime
            .block_on(self.connection.create_channel())
            .unwrap()
    }

    fn delete_exchange(&self, name: &str) {
        let channel = self.channel();
        self.runtime
            .block_on(channel.exchange_delete(name.into(), ExchangeDeleteOptions::default()))
            .unwrap();
        let _ = self.runtime.block_on(channel.close(200, "done".into()));
    }

    fn exchange_exists(&self, name: &str) -> bool {
        let channel = self.channel();
        let options = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        let found = self
            .runtime
            .block_on(channel.exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            ))
            .is_ok();
        let _ = self.runtime.block_on(channel.close(200, "done".into()));
        found
    }

    fn declare_exchange(&self, name: &str, kind: ExchangeKind) {
        let channel = self.channel();
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        self.runtime
            .block_on(channel.exchange_declare(name.into(), kind, options, FieldTable::default()))
            .unwrap();
        let _ = self.runtime.block_on(channel.close(200, "done".into()));
    }

    /// A durable quorum queue bound to `exchange` with `key`: a dead-letter
    /// queue as the router declares it.
    fn declare_quorum_queue(&self, name: &str, exchange: &str, key: &str) {
        let channel = self.channel();
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        self.runtime
            .block_on(channel.queue_declare(name.into(), options, args))
            .unwrap();
        self.runtime
            .block_on(channel.queue_bind(
                name.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ))
            .unwrap();
        let _ = self.runtime.block_on(channel.close(200, "done".into()));
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        let close = self.connection.close(200, "test done".into());
        let _ = self
            .runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), close).await });
    }
}

/// `rabbitmqctl <args>` on the shared broker; its output, or a panic.
fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Ready and unacknowledged messages per queue, from `list_queues` output.
fn parse_queue_counts(text: &str) -> BTreeMap<String, (u64, u64)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields[..] {
                [name, ready, unacked] => Some((
                    name.to_string(),
                    (ready.parse().ok()?, unacked.parse().ok()?),
                )),
                _ => None,
            }
        })
        .collect()
}

const LIST_QUEUES: [&str; 6] = [
    "list_queues",
    "--quiet",
    "--no-table-headers",
    "name",
    "messages_ready",
    "messages_unacknowledged",
];

/// Queue counts of a vhost of the shared broker.
fn vhost_queues(vhost: &TestVhost) -> BTreeMap<String, (u64, u64)> {
    let mut args = vec!["-p", vhost.name()];
    args.extend_from_slice(&LIST_QUEUES);
    parse_queue_counts(&rabbitmqctl(&args))
}

/// Queue counts of the default vhost of a throwaway node.
fn node_queues(node: &ThrowawayNode) -> BTreeMap<String, (u64, u64)> {
    parse_queue_counts(&node.ctl(&LIST_QUEUES))
}

// --- Reading the router -------------------------------------------------------------

/// What `plugin`'s workers did (`/plugins`, its `dispatch`), or `None` when the
/// router does not answer within 3 s (its status pages wait on the broker).
fn dispatch(replica: &Replica, plugin: &str) -> Option<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .into();
    let mut response = agent.get(format!("{}/plugins", replica.url)).call().ok()?;
    let text = response.body_mut().read_to_string().ok()?;
    let list: Value = serde_json::from_str(&text).ok()?;
    list.as_array()?
        .iter()
        .find(|p| p["name"] == plugin)
        .map(|p| p["dispatch"].clone())
}

/// A dispatch counter of `plugin` (0 when absent), `None` when unanswered.
fn counter(replica: &Replica, plugin: &str, name: &str) -> Option<u64> {
    dispatch(replica, plugin).map(|d| d[name].as_u64().unwrap_or(0))
}

fn counters(replica: &Replica, plugin: &str) -> String {
    let Some(d) = dispatch(replica, plugin) else {
        return "(the router did not answer /plugins within 3 s)".into();
    };
    let get = |name: &str| d[name].as_u64().unwrap_or(0);
    format!(
        "handled {}, retried {}, dead_lettered {}, settle_errors {}",
        get("handled"),
        get("retried"),
        get("dead_lettered"),
        get("settle_errors")
    )
}

/// The router's warnings and errors, one line per distinct message with its
/// count: what an operator would see.
fn log_summary(log: &str) -> String {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut order = Vec::new();
    for line in log.lines() {
        let line = strip_ansi(line);
        if !(line.contains("WARN") || line.contains("ERROR")) {
            continue;
        }
        // Drop the timestamp, and the per-event fields that make lines unique.
        let text = line
            .split_once(' ')
            .map_or(line.as_str(), |(_, t)| t)
            .trim();
        let text: String = text
            .split(' ')
            .filter(|w| {
                !(w.starts_with("id=")
                    || w.starts_with("event_id=")
                    || w.starts_with("attempt=")
                    || w.starts_with("correlation_id="))
            })
            .collect::<Vec<_>>()
            .join(" ");
        let text: String = text.chars().take(300).collect();
        let n = seen.entry(text.clone()).or_default();
        if *n == 0 {
            order.push(text);
        }
        *n += 1;
    }
    order
        .iter()
        .take(15)
        .map(|t| format!("  {}× {t}", seen[t]))
        .collect::<Vec<_>>()
        .join("\n")
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn show_log(scenario: &str, replica: &Replica) {
    eprintln!(
        "router log ({scenario}), warnings and errors:\n{}",
        log_summary(&replica.log())
    );
}

// --- 1. A deleted dead-letter queue ------------------------------------------------

/// Every fourth event is one the plugin rejects; the rest are echoed.
fn one_in_four_rejected(i: usize) -> (&'static str, Value) {
    if i % 4 == 1 {
        ("reject", json!({}))
    } else {
        ("echo", json!({ "i": i }))
    }
}

/// The plugin's DLQ is deleted, then events it rejects arrive between good
/// ones, continuously, at prefetch 2. The good ones keep being handled within
/// a few seconds (a dead letter that cannot be placed does not hold a
/// prefetch slot), and once the DLQ exists again (re-declared by the router,
/// or else by the operator) every rejected event is in it; nothing is lost.
#[test]
fn a_deleted_dlq_does_not_freeze_the_plugin() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    const PREFETCH: usize = 2;
    let started = Instant::now();
    let vhost = TestVhost::new("dlq-deleted");
    let replica = Replica::start(
        &config(
            &vhost.url(),
            "timeout = \"3s\"",
            &defaults(2, PREFETCH, 3),
            WORKER,
        ),
        &[("worker.wasm", "scripted_guest")],
    );
    let admin = Admin::connect(&vhost.url());
    let mut observer = Observer::new(&vhost.url(), &[("observed", "#")], &[DLQ]);
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    amqp.delete_queue(DLQ);
    drop(amqp);

    let feeder = Feeder::start(
        &vhost.url(),
        "d",
        4,
        Duration::from_millis(100),
        None,
        one_in_four_rejected,
    );
    observer.watch(Duration::from_secs(8));
    let (late, longest) = observer.late(&feeder.fed(), "echo", Duration::from_secs(4));
    let during = counters(&replica, "worker");
    let waiting = vhost_queues(&vhost).get(QUEUE).copied().unwrap_or_default();

    // The DLQ again: the router's, or (if it did not declare it again) the
    // operator's, exactly as the router declares it.
    let mut redeclared = false;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if observer.amqp.queue_state(DLQ).is_some() {
            redeclared = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !redeclared {
        admin.declare_quorum_queue(DLQ, DLX, "worker");
    }
    observer.watch(Duration::from_secs(2));
    let fed = feeder.stop();
    observer.settle(&fed, Duration::from_secs(2), Duration::from_secs(30));
    let account = observer.account(&fed);
    let rejects = fed.ids_of("reject");
    let echoes = fed.ids_of("echo");
    report(
        "deleted dlq",
        &account,
        &format!(
            "prefetch {PREFETCH}; during the fault: {late} good events waited > 4 s \
             (longest {longest:?}), counters {during}, {QUEUE} ready/unacked {waiting:?}; \
             DLQ re-declared by the router: {redeclared}; in {:?}",
            started.elapsed()
        ),
    );
    show_log("deleted dlq", &replica);
    assert_eq!(
        late, 0,
        "good events waited more than 4 s behind rejected ones whose dead-letter queue was \
         gone (longest {longest:?}); counters {during}"
    );
    account.assert_complete(PREFETCH);
    assert_eq!(
        observer.kinds(&rejects),
        BTreeMap::from([("reject".to_string(), rejects.len())]),
        "every rejected event dead-lettered as `reject`: {account}"
    );
    assert_eq!(account.handled, echoes.len(), "{account}");
}

// --- 4. Unroutable and routed outputs, mixed --------------------------------------

/// Half the events are echoed (`echoed`, bound), half emit `emitted.0` (bound
/// nowhere).
fn half_unroutable(i: usize) -> (&'static str, Value) {
    if i.is_multiple_of(2) {
        ("echo", json!({ "i": i }))
    } else {
        ("emit", json!({ "count": 1 }))
    }
}

/// With `[broker] unroutable = "dead-letter"`, inputs whose outputs are routed
/// and inputs whose outputs no queue is bound for, interleaved at prefetch 100
/// and concurrency 4 (every worker publishing on the router's confirm channel
/// at once): exactly the inputs with unroutable outputs are dead-lettered with
/// kind `unroutable`, every other one is handled and none of them
/// dead-lettered. A basic.return credited to the wrong publish (the confirm of
/// another worker's message) would show as a routed input dead-lettered and an
/// unroutable one acknowledged (lost).
#[test]
fn unroutable_and_routed_outputs_mixed_with_dead_letter_policy() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    const PREFETCH: usize = 100;
    let started = Instant::now();
    let vhost = TestVhost::new("unroutable-mixed");
    let replica = Replica::start(
        &config(
            &vhost.url(),
            "timeout = \"5s\"\nunroutable = \"dead-letter\"",
            &defaults(4, PREFETCH, 3),
            WORKER,
        ),
        &[("worker.wasm", "scripted_guest")],
    );
    let mut observer = Observer::new(&vhost.url(), &[("observed", "echoed")], &[DLQ]);
    let feeder = Feeder::start(
        &vhost.url(),
        "u",
        100,
        Duration::from_millis(20),
        Some(8000),
        half_unroutable,
    );
    observer.watch(Duration::from_secs(3));
    let fed = feeder.stop();
    observer.settle(&fed, Duration::from_secs(2), Duration::from_secs(50));
    let account = observer.account(&fed);
    let routed = fed.ids_of("echo");
    let unroutable = fed.ids_of("emit");
    let routed_but_dead: Vec<&String> = routed
        .iter()
        .filter(|id| observer.letters.contains_key(*id))
        .collect();
    let unroutable_not_dead: Vec<&String> = unroutable
        .iter()
        .filter(|id| {
            !observer
                .letters
                .get(*id)
                .is_some_and(|l| l.iter().any(|l| l.kind == "unroutable"))
        })
        .collect();
    let other_kinds: BTreeMap<String, usize> = observer
        .kinds(&routed.union(&unroutable).cloned().collect())
        .into_iter()
        .filter(|(k, _)| k != "unroutable")
        .collect();
    report(
        "unroutable mixed",
        &account,
        &format!(
            "{} routed + {} unroutable inputs, prefetch {PREFETCH}, concurrency 4; \
             routed inputs dead-lettered: {}, unroutable inputs not dead-lettered: {}, \
             other dead-letter kinds {other_kinds:?}; counters {}; in {:?}",
            routed.len(),
            unroutable.len(),
            routed_but_dead.len(),
            unroutable_not_dead.len(),
            counters(&replica, "worker"),
            started.elapsed()
        ),
    );
    show_log("unroutable mixed", &replica);
    if let Some(id) = routed_but_dead.first() {
        eprintln!(
            "e.g. routed input {id}: outputs {:?}, dead letters {:?}",
            observer.outputs.get(*id),
            observer.letters.get(*id)
        );
    }
    assert!(
        routed_but_dead.is_empty(),
        "{} inputs whose outputs were routed were dead-lettered (e.g. {:?}): {account}",
        routed_but_dead.len(),
        routed_but_dead.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        unroutable_not_dead.is_empty(),
        "{} inputs whose outputs were unroutable were not dead-lettered as `unroutable` \
         (e.g. {:?}): {account}",
        unroutable_not_dead.len(),
        unroutable_not_dead.iter().take(5).collect::<Vec<_>>()
    );
    assert!(other_kinds.is_empty(), "spurious failures: {other_kinds:?}");
    account.assert_complete(PREFETCH);
    assert_eq!(account.handled, routed.len(), "{account}");
    assert_eq!(account.dead_lettered, unroutable.len(), "{account}");
}

// --- 7. A plugin removed while its retries wait -----------------------------------

/// `worker` retries everything after 6 s (one tier); `keeper` echoes.
const RETRIER_AND_KEEPER: &str = r##"
[plugins.worker]
output_exchange = "out"
max_attempts = 3
[plugins.worker.backoff]
initial = "6s"
max = "6s"
jitter = 0.0
[plugins.keeper]
output_exchange = "out"
[[routes]]
exchange = "events"
pattern = "retry"
plugin = "worker"
[[routes]]
exchange = "events"
pattern = "payment.*"
plugin = "keeper"
"##;

/// Only `keeper`: `worker` and its route removed.
const KEEPER_ONLY: &str = r##"
[plugins.keeper]
output_exchange = "out"
[[routes]]
exchange = "events"
pattern = "payment.*"
plugin = "keeper"
"##;

/// One in four retried by `worker`; the rest payments that `keeper` (the
/// notification plugin) answers with an email request.
fn one_in_four_retried(i: usize) -> (&'static str, Value) {
    if i % 4 == 1 {
        ("retry", json!({}))
    } else {
        (
            "payment.success",
            json!({"payment_id": format!("p-{i}"), "amount": 42.5, "currency": "EUR",
                   "customer": {"email": "ada@example.com"}}),
        )
    }
}

/// Events of `worker` wait in its 6 s retry tier when `worker` is removed
/// from router.toml (hot reload), and one more is being handled (slowly) at
/// that moment, failing with a retry only after the removal. Each of them ends
/// in `worker`'s DLQ with kind `plugin_removed` (or `retry`, had it used up
/// its attempts first): none is stranded in a tier or in the orphaned queue,
/// or lost, and none goes round until the broker's delivery limit drops it
/// there without a reason. `keeper` (the shipped notification plugin) handles
/// its payments throughout.
#[test]
fn a_plugin_removed_while_its_retries_wait_dead_letters_them() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    const PREFETCH: usize = 20;
    const TIER: &str = "switchboard.worker.retry.6s";
    let started = Instant::now();
    let vhost = TestVhost::new("removed-retries");
    let url = vhost.url();
    let broker = "timeout = \"3s\"";
    let replica = Replica::start(
        &config(&url, broker, &defaults(2, PREFETCH, 3), RETRIER_AND_KEEPER),
        &[
            ("worker.wasm", "scripted_guest"),
            ("keeper.wasm", "notification"),
        ],
    );
    let mut observer = Observer::new(&url, &[("observed", "#")], &[DLQ, "switchboard.keeper.dlq"]);
    // Leave the worker's dead letters where they land until the end: its
    // DLQ may be deleted with the plugin only when empty.
    observer.read_dlqs = false;
    let feeder = Feeder::start(
        &url,
        "r",
        4,
        Duration::from_millis(100),
        None,
        one_in_four_retried,
    );
    observer.watch(Duration::from_secs(3));
    wait_until(
        "retries waiting in the tier",
        Duration::from_secs(10),
        || vhost_queues(&vhost).get(TIER).is_some_and(|(r, _)| *r >= 5),
    );
    // Fails 4 s after it is taken: after the removal below, while the
    // plugin drains (its retry must still reach the tier).
    const SLOW: &str = "r-slow";
    let slow = Publish::json(
        "events",
        "retry",
        &json!({"id": SLOW, "type": "retry", "source": "faults", "data": {"sleep_ms": 4000}}),
    )
    .message_id(SLOW);
    assert_eq!(observer.amqp.publish(&slow), Confirmed::Routed);
    let slow_at = Instant::now();
    wait_until("the slow event taken", Duration::from_secs(10), || {
        replica.plugin("worker")["broker"]["in_flight"].as_u64() >= Some(1)
    });
    let before = vhost_queues(&vhost);
    let in_tier = before.get(TIER).map_or(0, |(r, _)| *r);
    let fed_before = feeder.fed();

    std::fs::write(
        replica.dir().join("router.toml"),
        config(&url, broker, &defaults(2, PREFETCH, 3), KEEPER_ONLY),
    )
    .unwrap();
    wait_until(
        "the worker to leave /api/plugins",
        Duration::from_secs(20),
        || replica.plugin("worker").is_null(),
    );
    let removed_at = Instant::now();
    observer.watch(Duration::from_secs(3));
    let mut fed = feeder.stop();
    fed.sent.push(Sent {
        id: SLOW.into(),
        kind: "retry",
        at: slow_at,
    });
    // Long enough for every tier message to come due (6 s) and be moved.
    while removed_at.elapsed() < Duration::from_secs(20) {
        observer.poll();
    }
    observer.read_dlqs = true;
    observer.settle(&fed, Duration::from_secs(2), Duration::from_secs(15));
    let after = vhost_queues(&vhost);
    let account = observer.account(&fed);
    let retries = fed.ids_of("retry");
    let kinds = observer.kinds(&retries);
    let where_left = |q: &str| after.get(q).copied();
    report(
        "plugin removed with waiting retries",
        &account,
        &format!(
            "{} retry events ({} confirmed before the removal, {in_tier} in {TIER} at \
             removal), dead-letter kinds {kinds:?}; left behind: {QUEUE} {:?}, {TIER} {:?}, \
             {DLQ} {:?} (ready, unacked; None = deleted); publishes refused after removal \
             {:?}; in {:?}",
            retries.len(),
            fed_before.ids_of("retry").len(),
            where_left(QUEUE),
            where_left(TIER),
            where_left(DLQ),
            fed.refused,
            started.elapsed()
        ),
    );
    show_log("plugin removed", &replica);
    let stranded: Vec<&String> = retries
        .iter()
        .filter(|id| !observer.letters.contains_key(*id))
        .collect();
    assert!(
        stranded.is_empty(),
        "{} of {} retry events of the removed plugin never reached its DLQ (e.g. {:?}); \
         left: {QUEUE} {:?}, {TIER} {:?}",
        stranded.len(),
        retries.len(),
        stranded.iter().take(5).collect::<Vec<_>>(),
        where_left(QUEUE),
        where_left(TIER)
    );
    assert!(
        kinds.keys().all(|k| k == "plugin_removed" || k == "retry"),
        "dead-letter kinds {kinds:?}"
    );
    assert!(
        kinds.get("plugin_removed").is_some_and(|n| *n > 0),
        "the retries waiting at the removal say why they were dead-lettered: {kinds:?}"
    );
    let slow_letters: Vec<&str> = observer.letters[SLOW]
        .iter()
        .map(|l| l.kind.as_str())
        .collect();
    assert_eq!(
        slow_letters,
        ["plugin_removed"],
        "the event that failed while its plugin drained"
    );
    account.assert_complete(PREFETCH);
    assert_eq!(
        account.handled,
        fed.ids_of("payment.success").len(),
        "{account}"
    );
}

// --- 2. A dead-letter queue that refuses ------------------------------------------

fn one_in_five_rejected(i: usize) -> (&'static str, Value) {
    if i % 5 == 2 {
        ("reject", json!({}))
    } else {
        ("echo", json!({ "i": i }))
    }
}

/// A policy caps the DLQ at 3 messages with `overflow: reject-publish`; far
/// more events are rejected, between good ones, continuously. The good ones
/// keep being handled within seconds; the rejected ones that do not fit are
/// not lost but wait (retried, or back in the queue, and counted); once the
/// policy is removed they are all dead-lettered.
#[test]
fn a_dlq_refusing_with_max_length_reject_publish_does_not_freeze_the_plugin() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    const PREFETCH: usize = 10;
    let started = Instant::now();
    let vhost = TestVhost::new("dlq-full");
    let replica = Replica::start(
        &config(
            &vhost.url(),
            "timeout = \"3s\"",
            &defaults(2, PREFETCH, 3),
            WORKER,
        ),
        &[("worker.wasm", "scripted_guest")],
    );
    rabbitmqctl(&[
        "set_policy",
        "-p",
        vhost.name(),
        "--apply-to",
        "queues",
        "dlq-cap",
        r"^switchboard\.worker\.dlq$",
        r#"{"max-length":3,"overflow":"reject-publish"}"#,
    ]);
    let mut observer = Observer::new(&vhost.url(), &[("observed", "#")], &[DLQ]);
    observer.read_dlqs = false;
    let feeder = Feeder::start(
        &vhost.url(),
        "f",
        5,
        Duration::from_millis(100),
        None,
        one_in_five_rejected,
    );
    observer.watch(Duration::from_secs(10));
    let fed_during = feeder.fed();
    let (late, longest) = observer.late(&fed_during, "echo", Duration::from_secs(4));
    let in_dlq = observer.amqp.queue_state(DLQ).map_or(0, |s| s.messages);
    let during = counters(&replica, "worker");
    let refusals = counter(&replica, "worker", "settle_errors").unwrap_or(0)
        + counter(&replica, "worker", "retried").unwrap_or(0);
    let queues = vhost_queues(&vhost);

    rabbitmqctl(&["clear_policy", "-p", vhost.name(), "dlq-cap"]);
    observer.read_dlqs = true;
    observer.watch(Duration::from_secs(2));
    let fed = feeder.stop();
    observer.settle(&fed, Duration::from_secs(2), Duration::from_secs(30));
    let account = observer.account(&fed);
    let rejects = fed.ids_of("reject");
    report(
        "dlq full (reject-publish)",
        &account,
        &format!(
            "{} rejected before the policy went ({} fit in the DLQ); during: {late} good \
             events waited > 4 s (longest {longest:?}), counters {during}, queues \
             (ready, unacked) {queues:?}; in {:?}",
            fed_during.ids_of("reject").len(),
            in_dlq,
            started.elapsed()
        ),
    );
    show_log("dlq full", &replica);
    // A quorum queue enters its reject-publish state once it is at the limit,
    // which lets it go one message over.
    assert!(
        in_dlq <= 4,
        "the policy holds the DLQ to about 3 messages: {in_dlq}"
    );
    assert_eq!(
        late, 0,
        "good events waited more than 4 s behind rejected ones the DLQ refused \
         (longest {longest:?}); counters {during}"
    );
    assert!(
        refusals > 0,
        "the refused dead letters are counted (settle_errors or retried): {during}"
    );
    account.assert_complete(PREFETCH);
    assert_eq!(
        observer.kinds(&rejects),
        BTreeMap::from([("reject".to_string(), rejects.len())]),
        "every rejected event dead-lettered as `reject` once the DLQ takes them: {account}"
    );
    assert_eq!(account.handled, fed.ids_of("echo").len(), "{account}");
}

// --- 6 and 5. A memory alarm --------------------------------------------------------

fn all_echo(i: usize) -> (&'static str, Value) {
    ("echo", json!({ "i": i }))
}

/// Raises a memory alarm on `node` and waits until it is in force.
fn raise_alarm(node: &ThrowawayNode) {
    node.ctl(&["set_vm_memory_high_watermark", "0.000001"]);
    wait_until("the memory alarm", Duration::from_secs(20), || {
        node.ctl(&["eval", "rabbit_alarm:get_alarms()."])
            .contains("memory")
    });
}

fn lift_alarm(node: &ThrowawayNode) {
    node.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    wait_until("the memory alarm to clear", Duration::from_secs(20), || {
        !node
            .ctl(&["eval", "rabbit_alarm:get_alarms()."])
            .contains("memory")
    });
}

/// Makes `node` report queue counts 4 times a second rather than every 5 s
/// (quorum queues publish their counts on each tick): for queues declared
/// from now on. A throwaway node's own setting; the shared broker keeps its.
fn fast_queue_counts(node: &ThrowawayNode) {
    node.ctl(&[
        "eval",
        "application:set_env(rabbit, quorum_tick_interval, 250), \
         application:set_env(rabbit, collect_statistics_interval, 250).",
    ]);
}

/// Ready + unacknowledged messages of the worker's queue and retry tiers on
/// `node`: what only an acknowledgement can make fewer.
fn held(node: &ThrowawayNode) -> u64 {
    held_in(&node_queues(node))
}

fn held_in(queues: &BTreeMap<String, (u64, u64)>) -> u64 {
    queues
        .iter()
        .filter(|(q, _)| q.starts_with(QUEUE) && q.as_str() != DLQ)
        .map(|(_, (r, u))| r + u)
        .sum()
}

/// What was seen while an alarm lasted.
#[derive(Debug)]
struct DuringAlarm {
    /// The fewest inputs (ready + unacknowledged) the broker held.
    least_held: u64,
    /// The router's `handled` counter, each time it answered.
    handled: Vec<u64>,
    /// Times `/plugins` did not answer within 3 s.
    unanswered: usize,
    /// Outputs that arrived.
    outputs: usize,
    /// The most inputs the worker's queue held (ready + unacknowledged) and
    /// the most the router held unacknowledged.
    most_in_queue: u64,
    most_unacked: u64,
}

/// Watches the broker, the router's counters and the outputs until `until`.
fn during_alarm(
    node: &ThrowawayNode,
    replica: &Replica,
    observer: &mut Observer,
    until: Instant,
) -> DuringAlarm {
    let mut seen = DuringAlarm {
        least_held: u64::MAX,
        handled: Vec::new(),
        unanswered: 0,
        outputs: 0,
        most_in_queue: 0,
        most_unacked: 0,
    };
    while Instant::now() < until {
        let queues = node_queues(node);
        seen.least_held = seen.least_held.min(held_in(&queues));
        let (ready, unacked) = queues.get(QUEUE).copied().unwrap_or_default();
        seen.most_in_queue = seen.most_in_queue.max(ready + unacked);
        seen.most_unacked = seen.most_unacked.max(unacked);
        match counter(replica, "worker", "handled") {
            Some(n) => seen.handled.push(n),
            None => seen.unanswered += 1,
        }
        seen.outputs += observer.poll();
        std::thread::sleep(Duration::from_millis(200));
    }
    seen
}

/// Inputs wait in the queue (the plugin's file is not there yet); a memory
/// alarm blocks every publish; then the plugin arrives and takes them. While
/// the alarm lasts (3× the broker timeout) no output can be confirmed, so no
/// input may be acknowledged: the broker still holds every input (ready or
/// unacknowledged), no output arrives, and the router counts none as handled.
/// After the alarm each is handled, none dead-lettered, none lost.
#[test]
fn outputs_are_confirmed_before_the_input_is_acked_under_an_alarm() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    const PREFETCH: usize = 10;
    let started = Instant::now();
    let node = ThrowawayNode::start();
    fast_queue_counts(&node);
    let url = node.url();
    let mut replica = Replica::start(
        &config(&url, "timeout = \"2s\"", &defaults(2, PREFETCH, 10), WORKER),
        &[],
    );
    let mut observer = Observer::new(&url, &[("observed", "#")], &[DLQ]);
    let feeder = Feeder::start(&url, "a", 5, Duration::from_millis(100), None, all_echo);
    wait_until("inputs waiting", Duration::from_secs(20), || {
        feeder.count() >= 50
    });
    raise_alarm(&node);
    // The feeder's batch in flight is blocked now: what it has is final.
    std::thread::sleep(Duration::from_millis(500));
    let confirmed = feeder.count() as u64;
    wait_until(
        "the broker to count the inputs",
        Duration::from_secs(10),
        || held(&node) >= confirmed,
    );

    std::fs::copy(
        wasm("scripted_guest"),
        replica.dir().join("plugins/worker.wasm"),
    )
    .unwrap();
    wait_until(
        "the router to take deliveries",
        Duration::from_secs(30),
        || node_queues(&node).get(QUEUE).is_some_and(|(_, u)| *u > 0),
    );
    let seen = during_alarm(
        &node,
        &replica,
        &mut observer,
        Instant::now() + Duration::from_secs(6),
    );
    let queues = node_queues(&node);
    lift_alarm(&node);
    observer.watch(Duration::from_secs(2));
    let fed = feeder.stop();
    observer.settle(&fed, Duration::from_secs(2), Duration::from_secs(40));
    let account = observer.account(&fed);
    let handled_count = counter(&replica, "worker", "handled");
    report(
        "outputs confirmed before the ack (alarm)",
        &account,
        &format!(
            "{confirmed} inputs waiting at the alarm; during the alarm: the broker held at \
             least {} of them, {} outputs arrived, the router's handled counter read {:?} \
             (/plugins unanswered {} times); queues {queues:?}; after: {}; in {:?}",
            seen.least_held,
            seen.outputs,
            seen.handled,
            seen.unanswered,
            counters(&replica, "worker"),
            started.elapsed()
        ),
    );
    show_log("alarm, outputs before ack", &replica);
    replica.stop();
    assert!(
        seen.least_held >= confirmed,
        "an input was acknowledged while no output could be confirmed: the broker held \
         {} of {confirmed}",
        seen.least_held
    );
    assert_eq!(seen.outputs, 0, "no output can be routed during the alarm");
    account.assert_complete(PREFETCH);
    assert_eq!(account.dead_lettered, 0, "{account}");
    assert!(
        seen.handled.iter().all(|n| *n == 0),
        "the router counted events handled whose outputs were not confirmed: {:?}",
        seen.handled
    );
    // One replica, no connection lost: each input was acknowledged once, and
    // only acknowledged deliveries count as handled.
    assert_eq!(
        handled_count,
        Some(account.handled as u64),
        "the handled counter counts deliveries whose outputs were never confirmed \
         (they went back to the queue): {account}"
    );
}

/// `worker` with a 3 s retry tier.
const SLOW_RETRIES: &str = r##"
[plugins.worker]
output_exchange = "out"
[plugins.worker.backoff]
initial = "3s"
max = "3s"
jitter = 0.0
[[routes]]
exchange = "events"
pattern = "#"
plugin = "worker"
"##;

/// Most events are echoed; one in five fails its first attempt and succeeds
/// on the second, 3 s later (out of the retry tier).
fn echo_or_second_attempt(i: usize) -> (&'static str, Value) {
    if i % 5 == 3 {
        ("fail-until", json!({ "succeed_on": 2 }))
    } else {
        ("echo", json!({ "i": i }))
    }
}

/// Under a steady load, a memory alarm for about 3.5× the broker timeout
/// (`2s`): the publisher's publishes block; events that failed once come back
/// out of their 3 s retry tier during the alarm, so the router holds
/// deliveries whose outputs cannot be confirmed. While the alarm lasts the
/// broker's count of the worker's messages (queue and tier) never drops
/// (nothing acknowledged); after it, every confirmed input is accounted for.
/// (How the router counts them is
/// `outputs_are_confirmed_before_the_input_is_acked_under_an_alarm`'s
/// business; the figures are reported here.)
#[test]
fn a_memory_alarm_longer_than_the_broker_timeout_loses_nothing() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    const PREFETCH: usize = 50;
    let started = Instant::now();
    let node = ThrowawayNode::start();
    fast_queue_counts(&node);
    let url = node.url();
    let mut replica = Replica::start(
        &config(
            &url,
            "timeout = \"2s\"",
            &defaults(2, PREFETCH, 5),
            SLOW_RETRIES,
        ),
        &[("worker.wasm", "scripted_guest")],
    );
    let mut observer = Observer::new(&url, &[("observed", "#")], &[DLQ]);
    let feeder = Feeder::start(
        &url,
        "m",
        20,
        Duration::from_millis(50),
        None,
        echo_or_second_attempt,
    );
    observer.watch(Duration::from_secs(4));
    raise_alarm(&node);
    let raised = Instant::now();
    // Confirms that arrived before the alarm may still be settling, and the
    // broker's counts lag by a tick.
    observer.watch(Duration::from_secs(2));
    let held_at = held(&node);
    let handled_at = counter(&replica, "worker", "handled");
    let seen = during_alarm(
        &node,
        &replica,
        &mut observer,
        raised + Duration::from_secs(7),
    );
    lift_alarm(&node);
    let alarm = raised.elapsed();
    observer.watch(Duration::from_secs(3));
    let fed = feeder.stop();
    observer.settle(&fed, Duration::from_secs(2), Duration::from_secs(40));
    let account = observer.account(&fed);
    report(
        "memory alarm > broker timeout",
        &account,
        &format!(
            "alarm {alarm:?} (timeout 2s), prefetch {PREFETCH}, {} inputs retried once; \
             during it: worker queue + tier {held_at} → least {}, worker queue up to {} \
             ({} unacknowledged), handled counter {handled_at:?} → {:?} (/plugins \
             unanswered {} times), {} outputs arrived; after: {}; in {:?}",
            fed.ids_of("fail-until").len(),
            seen.least_held,
            seen.most_in_queue,
            seen.most_unacked,
            seen.handled,
            seen.unanswered,
            seen.outputs,
            counters(&replica, "worker"),
            started.elapsed()
        ),
    );
    show_log("memory alarm", &replica);
    replica.stop();
    assert!(
        seen.most_in_queue > 0,
        "no input reached the worker during the alarm: the scenario did not happen"
    );
    account.assert_complete(PREFETCH);
    assert!(
        seen.least_held >= held_at,
        "inputs were acknowledged during the alarm ({held_at} → {}), when no output could \
         be confirmed",
        seen.least_held
    );
}

// --- 3. The output exchange deleted -----------------------------------------------

/// Under load, the plugin's output exchange is deleted, and after a few
/// seconds exists again (the router's re-declaration, or else the operator's).
/// An alternate exchange (a policy on `out`) catches what `out` routes nowhere
/// while the sink is not bound yet. No input is lost: each is handled, or
/// dead-lettered with kind `invalid_output` or `publish`.
#[test]
fn output_exchange_deleted_under_load() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    const PREFETCH: usize = 20;
    let started = Instant::now();
    let vhost = TestVhost::new("out-deleted");
    let url = vhost.url();
    let admin = Admin::connect(&url);
    admin.declare_exchange("out-ae", ExchangeKind::Fanout);
    rabbitmqctl(&[
        "set_policy",
        "-p",
        vhost.name(),
        "--apply-to",
        "exchanges",
        "out-ae",
        "^out$",
        r#"{"alternate-exchange":"out-ae"}"#,
    ]);
    let replica = Replica::start(
        &config(&url, "timeout = \"3s\"", &defaults(2, PREFETCH, 3), WORKER),
        &[("worker.wasm", "scripted_guest")],
    );
    let mut observer = Observer::new(&url, &[("observed", "#")], &[DLQ]);
    {
        let amqp = Amqp::connect(&url).unwrap();
        let queue = amqp.declare_sink(Some("observed-ae"), SinkLife::Durable, "out-ae", "");
        observer.sinks.push(queue);
    }
    let feeder = Feeder::start(&url, "x", 10, Duration::from_millis(50), None, all_echo);
    observer.watch(Duration::from_secs(3));
    admin.delete_exchange("out");
    let deleted = Instant::now();
    observer.watch(Duration::from_secs(4));
    let redeclared = admin.exchange_exists("out");
    if !redeclared {
        admin.declare_exchange("out", ExchangeKind::Topic);
    }
    observer.amqp.bind("observed", "out", "#");
    let during = counters(&replica, "worker");
    observer.watch(Duration::from_secs(3));
    let fed = feeder.stop();
    observer.settle(&fed, Duration::from_secs(2), Duration::from_secs(40));
    let account = observer.account(&fed);
    let kinds = observer.kinds(&fed.ids_of("echo"));
    report(
        "output exchange deleted",
        &account,
        &format!(
            "exchange gone for {:?}, re-declared by the router: {redeclared}; counters while \
             gone {during}, after {}; dead-letter kinds {kinds:?}; in {:?}",
            deleted.elapsed().min(Duration::from_secs(4)),
            counters(&replica, "worker"),
            started.elapsed()
        ),
    );
    show_log("output exchange deleted", &replica);
    account.assert_complete(PREFETCH);
    assert!(
        kinds
            .keys()
            .all(|k| k == "invalid_output" || k == "publish"),
        "dead-letter kinds {kinds:?}"
    );
}

// --- 8. Re-drive --------------------------------------------------------------------

/// The `switchboard` CLI against the vhost; (exit code, stdout, stderr).
fn cli(url: &str, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(switchboard_tests::target_dir().join("release/switchboard"))
        .args(args)
        .args(["--config", "/nonexistent/router.toml"])
        .env("RABBITMQ_URL", url)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Events that fail on every attempt go through the retry tiers (200 ms,
/// 400 ms) and are dead-lettered after 3 attempts; `switchboard dlq redrive`
/// puts them back, and the re-driven delivery is attempt 1 again: the retry
/// copies (watched on the retry exchange) say "attempt 1", then "attempt 2",
/// and the new dead letter again says 3 attempts. Echo events flow meanwhile.
#[test]
fn redrive_resets_attempts() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    const PREFETCH: usize = 10;
    const FAILING: usize = 3;
    let started = Instant::now();
    let vhost = TestVhost::new("redrive");
    let url = vhost.url();
    let replica = Replica::start(
        &config(&url, "timeout = \"3s\"", &defaults(2, PREFETCH, 3), WORKER),
        &[("worker.wasm", "scripted_guest")],
    );
    let mut observer = Observer::new(&url, &[("observed", "echoed")], &[]);
    let amqp = Amqp::connect(&url).unwrap();
    // Copies of every retry, as they pass the retry exchange.
    let retries = amqp.declare_sink(
        None,
        SinkLife::Exclusive,
        "switchboard.retry",
        "worker.200ms",
    );
    amqp.bind(&retries, "switchboard.retry", "worker.400ms");
    let feeder = Feeder::start(&url, "e", 5, Duration::from_millis(100), None, all_echo);
    let failing: Vec<String> = (0..FAILING).map(|i| format!("fail-{i}")).collect();
    for id in &failing {
        let body = json!({"id": id, "type": "fail-until", "source": "faults",
                          "data": {"succeed_on": 1000}});
        let confirmed = amqp.publish(&Publish::json("events", "fail-until", &body).message_id(id));
        assert_eq!(confirmed, Confirmed::Routed);
    }
    let dlq_depth = |amqp: &Amqp| amqp.queue_state(DLQ).map_or(0, |s| s.messages as usize);
    wait_until("the first dead letters", Duration::from_secs(20), || {
        observer.poll();
        dlq_depth(&amqp) == FAILING
    });
    let first_round = amqp.get(&retries, 100, Duration::from_millis(500));

    let (code, out, err) = cli(&url, &["dlq", "redrive", "worker"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap(),
        json!({ "redriven": FAILING })
    );
    // Out of the DLQ first, then back in it after three more attempts.
    wait_until(
        "the re-driven events to fail again",
        Duration::from_secs(20),
        || {
            observer.poll();
            dlq_depth(&amqp) == FAILING
        },
    );
    let letters = amqp.get(DLQ, 100, Duration::from_millis(500));
    let second_round = amqp.get(&retries, 100, Duration::from_millis(500));
    observer.watch(Duration::from_secs(1));
    let fed = feeder.stop();
    observer.settle(&fed, Duration::from_secs(1), Duration::from_secs(20));
    let account = observer.account(&fed);

    // Per failing id: the errors its retry copies carried, in order.
    let errors = |copies: &[switchboard_tests::broker::Received]| {
        let mut by_id: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for m in copies {
            let id = m.message_id.clone().unwrap_or_default();
            by_id.entry(id).or_default().push(
                m.header("switchboard-error")
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        by_id
    };
    let (first, second) = (errors(&first_round), errors(&second_round));
    let final_attempts: BTreeMap<String, (String, String)> = letters
        .iter()
        .map(|m| {
            (
                m.message_id.clone().unwrap_or_default(),
                (
                    m.header("switchboard-attempt")
                        .unwrap_or_default()
                        .to_string(),
                    m.header("switchboard-error")
                        .unwrap_or_default()
                        .to_string(),
                ),
            )
        })
        .collect();
    report(
        "redrive",
        &account,
        &format!(
            "retry errors before the redrive {first:?}, after {second:?}; final dead letters \
             (attempt, error) {final_attempts:?}; in {:?}",
            started.elapsed()
        ),
    );
    show_log("redrive", &replica);
    let expected: Vec<String> = vec!["attempt 1 of 1000".into(), "attempt 2 of 1000".into()];
    for id in &failing {
        assert_eq!(first.get(id), Some(&expected), "{id} before the redrive");
        assert_eq!(
            second.get(id),
            Some(&expected),
            "{id} after the redrive starts again at attempt 1"
        );
        assert_eq!(
            final_attempts.get(id),
            Some(&("3".to_string(), "attempt 3 of 1000".to_string())),
            "{id}'s new dead letter"
        );
    }
    account.assert_complete(PREFETCH);
    assert_eq!(account.dead_lettered, 0, "{account}");
}
