//! Restarts while services keep publishing: the router (SIGTERM, `kill -9`, a
//! rolling restart of two replicas) and the broker are restarted under a
//! publisher that never pauses, as a real service's would not, and every id
//! the broker confirmed is accounted for at the end: handled (its output seen),
//! dead-lettered with a reason, or lost. None may be lost.
//!
//! The publisher is a service's: persistent messages, publisher confirms,
//! NOT mandatory. A message the broker cannot route is dropped by it *with a
//! positive confirm*, so an unbound route loses events silently; only the
//! account shows it. When its connection breaks, the publisher reconnects and
//! publishes again what was not confirmed; only confirmed ids count as
//! published.
//!
//! The plugins are the shipped ones (`notification`, `billing`), so outputs
//! are the services' envelopes: `causation_id` is the input's id and the AMQP
//! message id the deterministic output id (a second copy of it is a duplicate,
//! allowed within the deliveries a fault leaves unacknowledged).
//!
//! Each test prints an `ACCOUNT` line, the router's own dispatch counters
//! beside it, and how many `route unbound` lines the router logged.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::{Value, json};
use switchboard::kv::{EmbeddedStore, KvStore};
use switchboard_tests::account::{Ledger, report};
use switchboard_tests::broker::require_broker;
use switchboard_tests::broker::{Amqp, Received, SinkLife, TestVhost, ThrowawayNode};
use switchboard_tests::process::Replica;
use switchboard_tests::wait_until;

/// Deliveries one replica may hold unacknowledged (per plugin): what one
/// crash or restart can make the broker deliver twice.
const PREFETCH: usize = 50;

/// Where the plugins publish their outputs, and the durable queue that
/// collects them for the account.
const OUT: &str = "out";
const OBSERVED: &str = "observed";

/// `notification` takes `order.created` from the topic exchange `events` and
/// publishes one `notification.email` per order to `out`.
fn notification_config(url: &str) -> String {
    format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[broker]
url = "{url}"
timeout = "5s"
[defaults]
concurrency = 2
prefetch = {PREFETCH}
max_attempts = 5
[defaults.backoff]
initial = "200ms"
max = "1s"
jitter = 0.0
[[exchanges]]
name = "events"
kind = "topic"
[[exchanges]]
name = "{OUT}"
kind = "topic"
[plugins.notification]
output_exchange = "{OUT}"
[[routes]]
exchange = "events"
pattern = "order.created"
plugin = "notification"
"##
    )
}

/// `billing` takes `bill.*` and `payment.*` from `events` and publishes
/// `bill.paid` to `out` (not back to `events`, where `bill.*` would route it
/// to itself). Retries are many: a payment may come before its bill.
fn billing_config(url: &str) -> String {
    format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[broker]
url = "{url}"
timeout = "5s"
[defaults]
concurrency = 2
prefetch = {PREFETCH}
max_attempts = 40
[defaults.backoff]
initial = "200ms"
max = "1s"
jitter = 0.0
[[exchanges]]
name = "events"
kind = "topic"
[[exchanges]]
name = "{OUT}"
kind = "topic"
[plugins.billing]
output_exchange = "{OUT}"
[[routes]]
exchange = "events"
patterns = ["bill.*", "payment.*"]
plugin = "billing"
"##
    )
}

// --- A service that keeps publishing ------------------------------------------------

/// One message a service publishes to `events`.
struct Message {
    /// What the ledger calls it (the envelope id, or for an id-less payment
    /// its payment id).
    key: String,
    routing_key: String,
    body: Vec<u8>,
    message_id: Option<String>,
}

/// An `order.created` envelope with id `id`, as a shop publishes it (the
/// AMQP message id is the envelope's id).
fn order(id: String) -> Message {
    let body = json!({
        "id": id, "type": "order.created", "source": "shop",
        "data": {"order_id": id, "total": 42, "email": "buyer@example.com"},
    });
    Message {
        routing_key: "order.created".into(),
        body: body.to_string().into_bytes(),
        message_id: Some(id.clone()),
        key: id,
    }
}

/// Messages per publish round, and the pause between rounds: a few hundred
/// events a second, a steady stream rather than a flood, in rounds short
/// enough that a window of a few tens of milliseconds without a route
/// catches some.
const BATCH: usize = 5;
const PAUSE: Duration = Duration::from_millis(10);

/// What the service's publisher did.
#[derive(Debug, Default)]
struct Sent {
    /// Keys of the messages the broker confirmed (ack), in order.
    confirmed: Vec<String>,
    /// Messages published again after their batch failed (a broken
    /// connection, a timeout, a nack): each may have been stored twice.
    republished: usize,
    /// Connections it lost and made again.
    reconnects: usize,
}

/// A publisher in a thread of its own, like a service's: confirmed,
/// persistent, not mandatory; reconnects and publishes again what was not
/// confirmed. Stops when asked (after settling what it holds) or when
/// `next` says there is nothing more.
struct Service {
    stop: Arc<AtomicBool>,
    confirmed: Arc<AtomicUsize>,
    thread: Option<JoinHandle<Sent>>,
}

impl Service {
    fn start(url: &str, next: impl FnMut(usize) -> Option<Message> + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let confirmed = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (url, stop, confirmed) = (url.to_string(), stop.clone(), confirmed.clone());
            std::thread::spawn(move || publish_until_stopped(&url, next, &stop, &confirmed))
        };
        Self {
            stop,
            confirmed,
            thread: Some(thread),
        }
    }

    /// How many messages the broker has confirmed so far.
    fn confirmed(&self) -> usize {
        self.confirmed.load(Ordering::Relaxed)
    }

    /// Stops publishing (what is pending is settled first) and says what was sent.
    fn finish(mut self) -> Sent {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }

    /// Waits until it has published everything `next` gives.
    fn wait_done(self) -> Sent {
        let thread = self.thread.as_ref().unwrap();
        wait_until(
            "the service to publish all",
            Duration::from_secs(300),
            || thread.is_finished(),
        );
        self.finish()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn publish_until_stopped(
    url: &str,
    mut next: impl FnMut(usize) -> Option<Message>,
    stop: &AtomicBool,
    confirmed: &AtomicUsize,
) -> Sent {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut sent = Sent::default();
        let mut link: Option<(Connection, Channel)> = None;
        let mut pending: Vec<Message> = Vec::new();
        let mut made = 0;
        let mut exhausted = false;
        // Once asked to stop, what is pending gets this long to be confirmed.
        let mut give_up: Option<Instant> = None;
        loop {
            if stop.load(Ordering::Relaxed) && give_up.is_none() {
                give_up = Some(Instant::now() + Duration::from_secs(30));
            }
            if pending.is_empty() {
                if give_up.is_some() || exhausted {
                    break;
                }
                while pending.len() < BATCH {
                    match next(made) {
                        Some(m) => {
                            pending.push(m);
                            made += 1;
                        }
                        None => {
                            exhausted = true;
                            break;
                        }
                    }
                }
                if pending.is_empty() {
                    break;
                }
            }
            if give_up.is_some_and(|t| Instant::now() > t) {
                break;
            }
            if link.is_none() {
                match connect(url).await {
                    Ok(l) => link = Some(l),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            let (_, channel) = link.as_ref().unwrap();
            match publish_batch(channel, &pending).await {
                Ok(acks) => {
                    let mut again = Vec::new();
                    for (m, acked) in pending.drain(..).zip(acks) {
                        if acked {
                            sent.confirmed.push(m.key);
                            confirmed.fetch_add(1, Ordering::Relaxed);
                        } else {
                            again.push(m);
                        }
                    }
                    sent.republished += again.len();
                    pending = again;
                    tokio::time::sleep(PAUSE).await;
                }
                Err(_) => {
                    // The connection broke (or hangs): a new one, the batch again.
                    sent.republished += pending.len();
                    sent.reconnects += 1;
                    if let Some((connection, _)) = link.take() {
                        let close = connection.close(200, "reconnecting".into());
                        let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if let Some((connection, _)) = link {
            let close = connection.close(200, "done".into());
            let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
        }
        sent
    })
}

async fn connect(url: &str) -> Result<(Connection, Channel), String> {
    let connecting = async {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        lapin::Result::Ok((connection, channel))
    };
    match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no connection within 5 s".into()),
    }
}

/// Publishes the batch (not mandatory) and waits for every confirm: whether
/// each was acked. An error when the channel fails or 10 s pass (lapin's
/// publish can hang while a broker goes down).
async fn publish_batch(channel: &Channel, batch: &[Message]) -> Result<Vec<bool>, String> {
    let publishing = async {
        let mut confirms = Vec::with_capacity(batch.len());
        for m in batch {
            let mut properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into());
            if let Some(id) = &m.message_id {
                properties = properties.with_message_id(id.as_str().into());
            }
            let confirm = channel
                .basic_publish(
                    "events".into(),
                    m.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &m.body,
                    properties,
                )
                .await?;
            confirms.push(confirm);
        }
        let mut acks = Vec::with_capacity(confirms.len());
        for confirm in confirms {
            acks.push(matches!(confirm.await?, Confirmation::Ack(_)));
        }
        lapin::Result::Ok(acks)
    };
    match tokio::time::timeout(Duration::from_secs(10), publishing).await {
        Ok(Ok(acks)) => Ok(acks),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no confirm within 10 s".into()),
    }
}

// --- The account -----------------------------------------------------------------

/// Which published input (ledger key) an output or a dead letter is about.
type Reading = fn(&Received) -> String;

/// A notification's input: its envelope's `causation_id`.
fn caused_by(m: &Received) -> String {
    m.json()["causation_id"]
        .as_str()
        .unwrap_or_else(|| panic!("an output without causation_id: {m:?}"))
        .to_string()
}

/// A dead-lettered order's id: its message id, else its envelope's `id`.
fn order_id(m: &Received) -> String {
    m.message_id
        .clone()
        .or_else(|| m.json()["id"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("a dead letter with no id: {m:?}"))
}

/// Everything taken from the output queue and the dead-letter queue.
#[derive(Default)]
struct Collected {
    outputs: Vec<Received>,
    letters: Vec<Received>,
}

/// Takes outputs from `observed` and dead letters from `dlq` into the ledger
/// until every published id is settled and `quiet` passes with nothing new,
/// or until nothing new has come for 10 s with `queue` empty (what is left
/// then is lost), or 120 s pass.
fn collect(
    ledger: &mut Ledger,
    amqp: &Amqp,
    queue: &str,
    dlq: &str,
    input_of: Reading,
    letter_of: Reading,
) -> Collected {
    let quiet = Duration::from_secs(2);
    let until = Instant::now() + Duration::from_secs(120);
    let mut collected = Collected::default();
    let mut last_news = Instant::now();
    loop {
        let taken = amqp.get(OBSERVED, 500, Duration::from_millis(200));
        let letters = amqp.get(dlq, 500, Duration::from_millis(10));
        if !taken.is_empty() || !letters.is_empty() {
            last_news = Instant::now();
        }
        for m in &taken {
            let output = m
                .message_id
                .as_deref()
                .unwrap_or_else(|| panic!("an output without a message id: {m:?}"));
            ledger.output(&input_of(m), output, 1);
        }
        for m in &letters {
            ledger.dead_letter(
                &letter_of(m),
                m.header("switchboard-error-kind").unwrap_or_default(),
                m.header("switchboard-error").unwrap_or_default(),
            );
        }
        collected.outputs.extend(taken);
        collected.letters.extend(letters);
        let silent = last_news.elapsed();
        if ledger.settled() && silent >= quiet {
            break;
        }
        if silent >= Duration::from_secs(10) && depth(amqp, queue) == 0 {
            break;
        }
        if Instant::now() >= until {
            break;
        }
    }
    collected
}

/// Ready messages in `queue` (0 when it does not exist).
fn depth(amqp: &Amqp, queue: &str) -> usize {
    amqp.queue_state(queue).map_or(0, |s| s.messages as usize)
}

/// A ledger of what the service had confirmed.
fn ledger_of(sent: &Sent) -> Ledger {
    let mut ledger = Ledger::new();
    for key in &sent.confirmed {
        ledger.published(key.as_str());
    }
    ledger
}

/// A dispatch counter of `/plugins` (0 when absent).
fn counter(dispatch: &Value, name: &str) -> u64 {
    dispatch[name].as_u64().unwrap_or(0)
}

/// The router's own dispatch counters, summed over the runs of its processes
/// (each read just before that process was stopped or killed, the last one
/// once everything settled).
#[derive(Debug, Default)]
struct Counters {
    handled: u64,
    outputs: u64,
    dead_lettered: u64,
    settle_errors: u64,
}

impl Counters {
    /// Adds `replica`'s counters for `plugin` now.
    fn add(&mut self, replica: &Replica, plugin: &str) {
        let d = replica.dispatch(plugin);
        self.handled += counter(&d, "handled");
        self.outputs += counter(&d, "outputs");
        self.dead_lettered += counter(&d, "dead_lettered");
        self.settle_errors += counter(&d, "settle_errors");
    }
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "router counters: handled {}, outputs {}, dead-lettered {}, settle errors {}",
            self.handled, self.outputs, self.dead_lettered, self.settle_errors
        )
    }
}

/// The router's counters agree with what the broker shows: it never counted
/// an output that did not reach the output queue, and at most `slack`
/// outputs reached it after a process's counters were last read (the drain
/// after SIGTERM, the work between the last read and a kill).
fn assert_counters_agree(counters: &Counters, collected: &Collected, slack: usize) {
    let seen = collected.outputs.len() as u64;
    assert!(
        counters.outputs <= seen,
        "the router counted {} outputs, the output queue got {seen}",
        counters.outputs
    );
    assert!(
        seen - counters.outputs <= slack as u64,
        "{seen} outputs reached the queue, the router counted {} (slack {slack})",
        counters.outputs
    );
    assert_eq!(
        counters.dead_lettered as usize,
        collected.letters.len(),
        "dead letters counted by the router vs found in the DLQ"
    );
    assert_eq!(counters.settle_errors, 0, "{counters}");
}

/// How many times `replicas` logged that they unbound a route.
fn unbound_lines(replicas: &[&Replica]) -> usize {
    replicas
        .iter()
        .map(|r| r.log().matches("route unbound").count())
        .sum()
}

/// The plugin's queue is drained and every replica consumes it again.
fn assert_queue_drained(amqp: &Amqp, queue: &str, replicas: usize) {
    let state = amqp.queue_state(queue).expect("the plugin's queue exists");
    assert_eq!(state.messages, 0, "{queue} still holds messages");
    assert_eq!(
        state.consumers as usize, replicas,
        "consumers on {queue}: one per replica"
    );
}

// --- Router restarts, one replica --------------------------------------------------

/// How a scenario takes the router down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGTERM: drain, then exit.
    Graceful,
    /// `kill -9`: no drain, no goodbye.
    Kill,
}

/// Restarts of the router per scenario, and the time it serves between them.
const RESTARTS: usize = 3;
const SERVING: Duration = Duration::from_millis(2500);

/// One replica on `notification`, the shop publishing throughout; the router
/// taken down `RESTARTS` times by `fault` and started again in the same
/// folder (same state dir), as a service manager or a StatefulSet does.
fn restarts_while_publishing(fault: Fault, label: &str) {
    let started = Instant::now();
    let vhost = TestVhost::new(label);
    let mut replica = Replica::start(
        &notification_config(&vhost.url()),
        &[("notification.wasm", "notification")],
    );
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    amqp.declare_sink(Some(OBSERVED), SinkLife::Durable, OUT, "#");
    let shop = Service::start(&vhost.url(), move |i| Some(order(format!("o-{i}"))));

    let mut counters = Counters::default();
    let mut down = Vec::new();
    for _ in 0..RESTARTS {
        std::thread::sleep(SERVING);
        counters.add(&replica, "notification");
        let pid = replica.pid();
        let at = Instant::now();
        match fault {
            Fault::Graceful => replica.stop(),
            Fault::Kill => replica.kill(),
        }
        replica.restart();
        down.push(at.elapsed().as_millis());
        assert_ne!(replica.pid(), pid);
    }
    std::thread::sleep(SERVING);
    let sent = shop.finish();

    let mut ledger = ledger_of(&sent);
    let collected = collect(
        &mut ledger,
        &amqp,
        "switchboard.notification",
        "switchboard.notification.dlq",
        caused_by,
        order_id,
    );
    counters.add(&replica, "notification");
    let account = ledger.account();
    let unbound = unbound_lines(&[&replica]);
    report(
        &format!("{label} ({RESTARTS} restarts while publishing)"),
        &account,
        &format!(
            "{counters}; down (ms) {down:?}; {unbound} 'route unbound' log lines; {} s",
            started.elapsed().as_secs()
        ),
    );
    let faults = match fault {
        Fault::Graceful => 1,
        Fault::Kill => RESTARTS,
    };
    account.assert_complete(PREFETCH * faults);
    assert_eq!(account.dead_lettered, 0, "{account}");
    assert_queue_drained(&amqp, "switchboard.notification", 1);
    assert_counters_agree(&counters, &collected, PREFETCH * (RESTARTS + 1));
    assert_eq!(
        counters.outputs, counters.handled,
        "one email per order: {counters}"
    );
}

#[test]
fn graceful_restart_loses_nothing_while_publishing() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    restarts_while_publishing(Fault::Graceful, "graceful-restart");
}

#[test]
fn kill_9_and_restart_loses_nothing_while_publishing() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    restarts_while_publishing(Fault::Kill, "kill-9-restart");
}

// --- Two replicas, restarted in turn ---------------------------------------------

/// How a replica comes back in a rolling restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Comeback {
    /// In its own folder, state dir and all (a StatefulSet with a volume, a
    /// systemd unit): the realistic case.
    SameFolder,
    /// As a brand-new replica in a new folder (no state from before).
    FreshFolder,
}

/// Two replicas on the same queues, the shop publishing throughout; each is
/// restarted in turn (SIGTERM), twice, while the other one serves.
fn rolling_restart(comeback: Comeback, label: &str) {
    const ROUNDS: usize = 4;
    let started = Instant::now();
    let vhost = TestVhost::new(label);
    let config = notification_config(&vhost.url());
    let plugins = [("notification.wasm", "notification")];
    let mut replicas = [
        Replica::start(&config, &plugins),
        Replica::start(&config, &plugins),
    ];
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    amqp.declare_sink(Some(OBSERVED), SinkLife::Durable, OUT, "#");
    let shop = Service::start(&vhost.url(), move |i| Some(order(format!("r-{i}"))));

    let mut counters = Counters::default();
    let mut unbound = 0;
    for round in 0..ROUNDS {
        std::thread::sleep(SERVING);
        let replica = &mut replicas[round % 2];
        counters.add(replica, "notification");
        replica.stop();
        match comeback {
            Comeback::SameFolder => replica.restart(),
            Comeback::FreshFolder => {
                unbound += unbound_lines(&[replica]);
                *replica = Replica::start(&config, &plugins);
            }
        }
        // The other one served throughout.
        assert!(replicas[(round + 1) % 2].is_ready());
    }
    std::thread::sleep(SERVING);
    let sent = shop.finish();

    let mut ledger = ledger_of(&sent);
    let collected = collect(
        &mut ledger,
        &amqp,
        "switchboard.notification",
        "switchboard.notification.dlq",
        caused_by,
        order_id,
    );
    for replica in &replicas {
        counters.add(replica, "notification");
    }
    let account = ledger.account();
    unbound += unbound_lines(&[&replicas[0], &replicas[1]]);
    report(
        &format!("{label} (2 replicas, {ROUNDS} restarts in turn, {comeback:?})"),
        &account,
        &format!(
            "{counters}; {unbound} 'route unbound' log lines; {} s",
            started.elapsed().as_secs()
        ),
    );
    account.assert_complete(PREFETCH * 2);
    assert_eq!(account.dead_lettered, 0, "{account}");
    assert_queue_drained(&amqp, "switchboard.notification", 2);
    assert_counters_agree(&counters, &collected, PREFETCH * (ROUNDS + 2));
}

/// The realistic rolling restart: each replica comes back in its own folder.
/// While one restarts, the other keeps consuming the shared queue, so not a
/// single event may be lost, however the restarting one declares its
/// topology.
#[test]
fn rolling_restart_of_two_replicas_loses_nothing() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    rolling_restart(Comeback::SameFolder, "rolling-restart");
}

/// The control beside it: replicas replaced by new ones in new folders. A
/// new folder has no record of what an earlier run bound
/// (`state/broker-topology.json`), so its start-up unbinds nothing: this one
/// loses nothing even where the same-folder restart does.
#[test]
fn rolling_replacement_with_fresh_folders_loses_nothing() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    rolling_restart(Comeback::FreshFolder, "rolling-replacement");
}

// --- Broker restart --------------------------------------------------------------

/// A sample from `/metrics` (summed over labels), 0 when absent.
fn metric(replica: &Replica, name: &str) -> f64 {
    let text = ureq::get(format!("{}/metrics", replica.url))
        .call()
        .map(|mut r| r.body_mut().read_to_string().unwrap_or_default())
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn broker_restart_loses_nothing_while_publishing() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    let started = Instant::now();
    let node = ThrowawayNode::start();
    let replica = Replica::start(
        &notification_config(&node.url()),
        &[("notification.wasm", "notification")],
    );
    {
        let amqp = Amqp::connect(&node.url()).unwrap();
        amqp.declare_sink(Some(OBSERVED), SinkLife::Durable, OUT, "#");
    }
    let shop = Service::start(&node.url(), move |i| Some(order(format!("b-{i}"))));
    std::thread::sleep(SERVING);
    let before = shop.confirmed();
    let mut counters = Counters::default();
    counters.add(&replica, "notification");
    let at = Instant::now();
    node.restart();
    let node_back = at.elapsed();
    wait_until("the router to reconnect", Duration::from_secs(90), || {
        replica.is_ready() && metric(&replica, "switchboard_bus_reconnects_total") >= 1.0
    });
    let router_back = at.elapsed();
    let during = shop.confirmed();
    std::thread::sleep(SERVING);
    let sent = shop.finish();

    let amqp = Amqp::connect(&node.url()).unwrap();
    let mut ledger = ledger_of(&sent);
    let collected = collect(
        &mut ledger,
        &amqp,
        "switchboard.notification",
        "switchboard.notification.dlq",
        caused_by,
        order_id,
    );
    // The process kept running: its counters cover the whole run.
    let mut counters = Counters::default();
    counters.add(&replica, "notification");
    let account = ledger.account();
    report(
        "broker restart while publishing",
        &account,
        &format!(
            "{counters}; {before} confirmed before the restart, {during} when the router was back; \
             node back in {} ms, router in {} ms; publisher: {} reconnects, {} republished; {} s",
            node_back.as_millis(),
            router_back.as_millis(),
            sent.reconnects,
            sent.republished,
            started.elapsed().as_secs()
        ),
    );
    // What the service published again may have been stored twice.
    account.assert_complete(PREFETCH + sent.republished);
    assert_eq!(account.dead_lettered, 0, "{account}");
    assert!(sent.reconnects >= 1, "the publisher saw the broker go");
    assert_queue_drained(&amqp, "switchboard.notification", 1);
    // Outputs in flight when the broker went are published again by the
    // router (same ids): a duplicate in the queue, counted once by it.
    let seen = collected.outputs.len() as u64;
    assert!(
        counters.outputs <= seen && seen - counters.outputs <= PREFETCH as u64 + 1,
        "router counted {} outputs, the queue got {seen}",
        counters.outputs
    );
    assert_eq!(counters.dead_lettered, 0, "{counters}");
}

// --- Id-less payments and kill -9 ------------------------------------------------

/// Bills, then one payment each.
const BILLS: usize = 1000;

/// A `bill.created` envelope, with an id.
fn bill_created(n: usize) -> Message {
    let id = format!("created-{n}");
    let body = json!({
        "id": id, "type": "bill.created", "source": "billing-api",
        "data": {"bill_id": format!("bill-{n}"), "amount": 100 + n, "currency": "EUR",
                 "customer": {"email": format!("c{n}@example.com")}},
    });
    Message {
        key: id.clone(),
        routing_key: "bill.created".into(),
        body: body.to_string().into_bytes(),
        message_id: Some(id),
    }
}

/// A `payment.success` as many payment providers' bridges publish it: no
/// envelope `id`, no AMQP message id; only the payment id says which it is.
fn payment_success(n: usize) -> Message {
    let payment_id = format!("pay-{n}");
    let body = json!({
        "type": "payment.success", "source": "payment-provider",
        "data": {"bill_id": format!("bill-{n}"), "payment_id": payment_id,
                 "amount": 100 + n, "currency": "EUR"},
    });
    Message {
        key: payment_id,
        routing_key: "payment.success".into(),
        body: body.to_string().into_bytes(),
        message_id: None,
    }
}

/// A `bill.paid` output's payment id.
fn paid_by(m: &Received) -> String {
    let body = m.json();
    assert_eq!(body["type"], "bill.paid", "{body}");
    body["data"]["payment_id"]
        .as_str()
        .unwrap_or_else(|| panic!("bill.paid without payment_id: {body}"))
        .to_string()
}

/// A dead letter's ledger key: a payment's payment id, a bill's envelope id.
fn billing_letter(m: &Received) -> String {
    let body = m.json();
    match body["type"].as_str() {
        Some("bill.created") => body["id"].as_str().unwrap_or_default().to_string(),
        _ => body["data"]["payment_id"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    }
}

/// Why each of the `unpaid` bills (`bill-<n>`) was not paid, as far as
/// billing's own log lines tell (a diagnosis for the failure message, not
/// an assertion: plugin log lines are rate-limited).
fn why_unpaid(log: &str, unpaid: &[String]) -> BTreeMap<&'static str, Vec<String>> {
    let mut why: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for bill in unpaid {
        let payment = bill.replace("bill-", "pay-");
        let cause = if log.contains(&format!("payment {payment} is applied by event")) {
            "its redelivery was ignored as a duplicate payment"
        } else if log.contains(&format!("payment {payment} applied")) {
            "applied, but no output came"
        } else {
            "never reached billing (dropped by the broker?)"
        };
        why.entry(cause).or_default().push(bill.clone());
    }
    why
}

/// The bills `bill-0` … `bill-<bills - 1>` no `bill.paid` output paid, and
/// those paid under more than one output id (with how many).
fn bills_paid(collected: &Collected, bills: usize) -> (Vec<String>, Vec<(String, usize)>) {
    let mut outputs_per_bill: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in &collected.outputs {
        let bill = m.json()["data"]["bill_id"].as_str().unwrap().to_string();
        outputs_per_bill
            .entry(bill)
            .or_default()
            .insert(m.message_id.clone().unwrap());
    }
    let unpaid = (0..bills)
        .map(|n| format!("bill-{n}"))
        .filter(|b| !outputs_per_bill.contains_key(b))
        .collect();
    let paid_twice = outputs_per_bill
        .into_iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(b, ids)| (b, ids.len()))
        .collect();
    (unpaid, paid_twice)
}

/// Kills of the router while it works through the payments.
const KILLS: usize = 3;

#[test]
fn idless_payments_with_kill_9_pay_every_bill_exactly_once() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    let started = Instant::now();
    let vhost = TestVhost::new("idless-payments");
    let mut replica = Replica::start(
        &billing_config(&vhost.url()),
        &[("billing.wasm", "billing")],
    );
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    amqp.declare_sink(Some(OBSERVED), SinkLife::Durable, OUT, "#");
    // Bills first, then the payments, one per bill, at the service's pace.
    let provider = Service::start(&vhost.url(), move |i| match i {
        i if i < BILLS => Some(bill_created(i)),
        i if i < 2 * BILLS => Some(payment_success(i - BILLS)),
        _ => None,
    });

    // Kill while billing is in the middle of the payments: after a first
    // few bills are paid, and again after each restart once more are.
    let mut kills_at = Vec::new();
    for _ in 0..KILLS {
        let paid = depth(&amqp, OBSERVED);
        wait_until("more bills to be paid", Duration::from_secs(120), || {
            depth(&amqp, OBSERVED) >= paid + 60
        });
        kills_at.push(depth(&amqp, OBSERVED));
        replica.kill();
        replica.restart();
    }
    let sent = provider.wait_done();
    assert_eq!(sent.confirmed.len(), 2 * BILLS, "everything was confirmed");

    // The ledger keeps payments only: a bill is accounted for by its payment.
    let mut ledger = Ledger::new();
    let payments: BTreeSet<&String> = sent
        .confirmed
        .iter()
        .filter(|k| k.starts_with("pay-"))
        .collect();
    for key in &payments {
        ledger.published(key.as_str());
    }
    let collected = collect(
        &mut ledger,
        &amqp,
        "switchboard.billing",
        "switchboard.billing.dlq",
        paid_by,
        billing_letter,
    );

    let (unpaid, paid_twice) = bills_paid(&collected, BILLS);
    let bill_letters = collected
        .letters
        .iter()
        .filter(|m| m.json()["type"] == "bill.created")
        .count();
    let account = ledger.account();
    let why = why_unpaid(&replica.log(), &unpaid);
    report(
        "id-less payments, kill -9",
        &account,
        &format!(
            "{} bills unpaid {why:?}, {} paid under two output ids, {bill_letters} bills \
             dead-lettered; killed at {kills_at:?} bill.paid outputs; {} 'route unbound' log \
             lines; {} s",
            unpaid.len(),
            paid_twice.len(),
            unbound_lines(&[&replica]),
            started.elapsed().as_secs()
        ),
    );
    assert!(unpaid.is_empty(), "bills left unpaid: {why:?}: {account}");
    assert!(paid_twice.is_empty(), "bills paid twice: {paid_twice:?}");
    assert_eq!(bill_letters, 0, "bills dead-lettered");
    account.assert_complete(PREFETCH * KILLS);
    assert_eq!(account.dead_lettered, 0, "{account}");
    assert_queue_drained(&amqp, "switchboard.billing", 1);
    // The last process's own counters: nothing dead-lettered, every
    // settlement accepted.
    let mut counters = Counters::default();
    counters.add(&replica, "billing");
    assert_eq!(counters.dead_lettered, 0, "{counters}");
    assert_eq!(counters.settle_errors, 0, "{counters}");
}

// --- Group commit: what is acked is durable -----------------------------------------

/// Bills recorded while the router is killed.
const RECORDED_BILLS: usize = 4000;

/// Bills billing records in one run before it is killed.
const BILLS_PER_RUN: u64 = 400;

/// Billing's kv writes share fsyncs (group commit): a `bill.created` (no
/// output) is acked once the log record of its bill is fsynced, and the store
/// reaches `kv.redb` only about once a second. The router is killed while it
/// records bills; then every bill is paid. A bill whose acked write the crash
/// took back (a log not replayed on start, a record acked before it was
/// written) leaves its payment with no bill: retried until its attempts run
/// out, and dead-lettered. (That nothing is acked before its fsync is held
/// exactly by `delivery.rs`, with a store whose commits the test releases.)
#[test]
fn kill_9_while_bills_are_recorded_loses_no_acknowledged_bill() {
    let _one_at_a_time = crate::serial();
    if !require_broker() {
        return;
    }
    let started = Instant::now();
    let vhost = TestVhost::new("acked-bills");
    let mut replica = Replica::start(
        &billing_config(&vhost.url()),
        &[("billing.wasm", "billing")],
    );
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    amqp.declare_sink(Some(OBSERVED), SinkLife::Durable, OUT, "#");
    let recorder = Service::start(&vhost.url(), |i| {
        (i < RECORDED_BILLS).then(|| bill_created(i))
    });
    let mut killed_after = Vec::new();
    for _ in 0..KILLS {
        wait_until(
            "billing to record more bills",
            Duration::from_secs(120),
            || counter(&replica.dispatch("billing"), "handled") >= BILLS_PER_RUN,
        );
        killed_after.push(counter(&replica.dispatch("billing"), "handled"));
        replica.kill();
        replica.restart();
    }
    let bills = recorder.wait_done();
    assert_eq!(
        bills.confirmed.len(),
        RECORDED_BILLS,
        "every bill was confirmed"
    );
    wait_until("the bills to be recorded", Duration::from_secs(120), || {
        depth(&amqp, "switchboard.billing") == 0
    });

    let payer = Service::start(&vhost.url(), |i| {
        (i < RECORDED_BILLS).then(|| payment_success(i))
    });
    let payments = payer.wait_done();
    let mut ledger = ledger_of(&payments);
    let collected = collect(
        &mut ledger,
        &amqp,
        "switchboard.billing",
        "switchboard.billing.dlq",
        paid_by,
        billing_letter,
    );
    let (unpaid, paid_twice) = bills_paid(&collected, RECORDED_BILLS);
    let account = ledger.account();
    replica.stop();

    // The store itself: every bill is there, paid.
    let store = EmbeddedStore::open(&replica.dir().join("state/kv.redb")).unwrap();
    let not_paid_in_store: Vec<String> = (0..RECORDED_BILLS)
        .map(|n| format!("bill-{n}"))
        .filter(|bill| {
            let stored = store.get("billing", &format!("bill:{bill}")).unwrap();
            stored.is_none_or(|raw| {
                serde_json::from_slice::<Value>(&raw).unwrap()["status"] != "paid"
            })
        })
        .collect();
    report(
        "bills recorded through kill -9, then paid",
        &account,
        &format!(
            "killed after {killed_after:?} bills recorded in each run; {} bills unpaid, {} paid \
             under two output ids, {} not paid in the store; {} s",
            unpaid.len(),
            paid_twice.len(),
            not_paid_in_store.len(),
            started.elapsed().as_secs()
        ),
    );
    assert!(
        unpaid.is_empty(),
        "{} bills unpaid (their bill.created was acked, its write lost?): first {:?}",
        unpaid.len(),
        &unpaid[..unpaid.len().min(10)]
    );
    assert!(paid_twice.is_empty(), "bills paid twice: {paid_twice:?}");
    assert!(
        not_paid_in_store.is_empty(),
        "bills not paid in the store: first {:?}",
        &not_paid_in_store[..not_paid_in_store.len().min(10)]
    );
    account.assert_complete(0);
}
