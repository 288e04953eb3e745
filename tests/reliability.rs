//! The delivery promise under faults, by account: every scenario publishes
//! events with unique ids and then accounts for each one — handled (its output
//! seen), dead-lettered with a reason, or lost — and asserts that none is lost.
//! Duplicates (a second copy of a deterministic output id) are allowed only
//! within the in-flight window a crash leaves unacknowledged.
//!
//! On RabbitMQ: `kill -9` of a `switchboard run` process mid-load and a restart;
//! a broker restart mid-load (a throwaway node); 100 hot swaps of the plugin
//! under load. On the embedded bus: a graceful restart mid-load (the shutdown
//! spool) and 100 hot swaps under load. Each prints an `ACCOUNT` line with its
//! figures (`make reliability` shows them; RELIABILITY.md records them).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard::kv::{EmbeddedStore, KvStore};
use switchboard_tests::account::{Account, Ledger, report};
use switchboard_tests::broker::{
    Amqp, Confirmed, Publish, SinkLife, TestVhost, ThrowawayNode, require_broker,
};
use switchboard_tests::process::Replica;
use switchboard_tests::running::{Running, start, start_in};
use switchboard_tests::wait_until;
use switchboard_tests::{wasm, with_custom_section};

/// How many times the CI-sized load each scenario runs: `SWITCHBOARD_SOAK=10`
/// (`make soak`) for the longer runs RELIABILITY.md records.
fn soak() -> usize {
    std::env::var("SWITCHBOARD_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// Deliveries one worker group may hold unacknowledged: what a crash can make
/// the broker deliver twice.
const PREFETCH: usize = 50;

/// `worker` (the scripted guest) echoes `echo` events from `events` to `out`.
fn rabbit_config(url: &str) -> String {
    format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[broker]
url = "{url}"
timeout = "3s"
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
[[exchanges]]
name = "out"
[plugins.worker]
output_exchange = "out"
[[routes]]
exchange = "events"
pattern = "echo"
plugin = "worker"
"##
    )
}

/// The same on the embedded bus, with `tally` counting the outputs.
const EMBEDDED: &str = r##"
plugins_dir = "plugins"
state_dir = "state"
[defaults]
concurrency = 2
queue_capacity = 100000
[defaults.backoff]
initial = "20ms"
max = "100ms"
jitter = 0.0
[[exchanges]]
name = "events"
[[exchanges]]
name = "out"
[plugins.worker]
output_exchange = "out"
[plugins.tally]
[[routes]]
exchange = "events"
pattern = "echo"
plugin = "worker"
[[routes]]
exchange = "out"
pattern = "echoed"
plugin = "tally"
"##;

fn envelope(id: &str) -> serde_json::Value {
    json!({"id": id, "type": "echo", "source": "reliability", "data": {"id": id}})
}

/// Publishes events `<prefix>-<i>` for `i` in `range` to `events`, confirmed,
/// in batches; records them in the ledger.
fn publish(amqp: &Amqp, ledger: &mut Ledger, prefix: &str, range: std::ops::Range<usize>) {
    let ids: Vec<String> = range.map(|i| format!("{prefix}-{i}")).collect();
    for batch in ids.chunks(500) {
        let messages: Vec<Publish> = batch
            .iter()
            .map(|id| Publish::json("events", "echo", &envelope(id)).message_id(id))
            .collect();
        for (id, confirmed) in batch.iter().zip(amqp.publish_all(&messages)) {
            assert_eq!(confirmed, Confirmed::Routed, "{id} was not routed");
            ledger.published(id.as_str());
        }
    }
}

/// Collects the worker's outputs (from `observed`) and dead letters until every
/// published id is settled and `quiet` passes with nothing new; the totals.
fn settle_rabbit(ledger: &mut Ledger, amqp: &Amqp, quiet: Duration) -> Account {
    ledger.collect_rabbit(
        amqp,
        "observed",
        "switchboard.worker.dlq",
        quiet,
        Duration::from_secs(120 * soak() as u64),
    );
    ledger.account()
}

/// Outputs waiting in `queue`.
fn depth(amqp: &Amqp, queue: &str) -> usize {
    amqp.queue_state(queue).map_or(0, |s| s.messages as usize)
}

#[test]
fn kill_9_mid_load_then_restart_loses_nothing() {
    if !require_broker() {
        return;
    }
    let n = 10_000 * soak();
    let vhost = TestVhost::new("kill9");
    let mut replica = Replica::start(
        &rabbit_config(&vhost.url()),
        &[("worker.wasm", "scripted_guest")],
    );
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    amqp.declare_sink(Some("observed"), SinkLife::Durable, "out", "#");
    let mut ledger = Ledger::new();
    publish(&amqp, &mut ledger, "k", 0..n);
    // Mid-load: about a third handled, the rest queued or in flight.
    wait_until("a third of the outputs", Duration::from_secs(600), || {
        depth(&amqp, "observed") >= n / 3
    });
    let at_kill = depth(&amqp, "observed");
    let pid = replica.pid();
    replica.kill();
    let started = Instant::now();
    replica.restart();
    let back_in = started.elapsed();
    assert_ne!(replica.pid(), pid);
    let account = settle_rabbit(&mut ledger, &amqp, Duration::from_secs(2));
    report(
        "rabbitmq kill -9",
        &account,
        &format!(
            "killed after {at_kill} outputs, ready again in {} ms, prefetch {PREFETCH}",
            back_in.as_millis()
        ),
    );
    account.assert_complete(PREFETCH);
    assert_eq!(account.dead_lettered, 0, "{account}");
}

#[test]
fn a_broker_restart_mid_load_loses_nothing() {
    if !require_broker() {
        return;
    }
    let n = 5000 * soak();
    let node = ThrowawayNode::start();
    let replica = Replica::start(
        &rabbit_config(&node.url()),
        &[("worker.wasm", "scripted_guest")],
    );
    let mut ledger = Ledger::new();
    let at_restart;
    {
        let amqp = Amqp::connect(&node.url()).unwrap();
        amqp.declare_sink(Some("observed"), SinkLife::Durable, "out", "#");
        publish(&amqp, &mut ledger, "before", 0..n);
        wait_until("the first outputs", Duration::from_secs(600), || {
            depth(&amqp, "observed") >= n / 5
        });
        at_restart = depth(&amqp, "observed");
    }
    let started = Instant::now();
    node.restart();
    wait_until("the router to reconnect", Duration::from_secs(90), || {
        replica.is_ready() && metric(&replica, "switchboard_bus_reconnects_total") >= 1.0
    });
    let reconnected = started.elapsed();
    let amqp = Amqp::connect(&node.url()).unwrap();
    publish(&amqp, &mut ledger, "after", 0..n);
    let account = settle_rabbit(&mut ledger, &amqp, Duration::from_secs(2));
    report(
        "rabbitmq broker restart",
        &account,
        &format!(
            "restarted after {at_restart} of {n} outputs, router ready again in {} ms",
            reconnected.as_millis()
        ),
    );
    account.assert_complete(PREFETCH);
    assert_eq!(account.dead_lettered, 0, "{account}");
}

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

/// Two byte-different builds of the scripted guest (same behaviour), so that
/// every write of the other one is a new version to load.
fn two_versions() -> [Vec<u8>; 2] {
    let component = std::fs::read(wasm("scripted_guest")).unwrap();
    [
        with_custom_section(&component, "reliability-version", b"a"),
        with_custom_section(&component, "reliability-version", b"b"),
    ]
}

#[test]
fn a_hundred_hot_swaps_under_load_lose_nothing_on_rabbitmq() {
    if !require_broker() {
        return;
    }
    let swaps = 100 * soak() as u64;
    let vhost = TestVhost::new("swaps");
    let replica = Replica::start(
        &rabbit_config(&vhost.url()),
        &[("worker.wasm", "scripted_guest")],
    );
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    amqp.declare_sink(Some("observed"), SinkLife::Durable, "out", "#");
    let versions = two_versions();
    let swapping = AtomicBool::new(true);
    let started = Instant::now();
    let mut ledger = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let amqp = Amqp::connect(&vhost.url()).unwrap();
            let mut ledger = Ledger::new();
            let mut i = 0;
            while swapping.load(Ordering::Relaxed) || i < 1000 {
                publish(&amqp, &mut ledger, "s", i..i + 20);
                i += 20;
                // A steady stream (about 2,000 events/s) rather than a flood.
                std::thread::sleep(Duration::from_millis(10));
            }
            ledger
        });
        let plugins = replica.dir().join("plugins");
        for swap in 0..swaps {
            let next = &versions[usize::from(swap % 2 == 1)];
            let tmp = plugins.join(".worker.wasm.tmp");
            std::fs::write(&tmp, next).unwrap();
            std::fs::rename(&tmp, plugins.join("worker.wasm")).unwrap();
            // Writes closer together than the watcher's debounce are one change:
            // wait for each version to serve before the next.
            wait_until("the new version to serve", Duration::from_secs(30), || {
                replica.plugin("worker")["loads"].as_u64() == Some(swap + 2)
            });
        }
        swapping.store(false, Ordering::Relaxed);
        load.join().unwrap()
    });
    let swapped_in = started.elapsed();
    assert!(replica.plugin("worker")["last_error"].is_null());
    let account = settle_rabbit(&mut ledger, &amqp, Duration::from_secs(1));
    report(
        "rabbitmq hot swaps",
        &account,
        &format!("{swaps} swaps in {} ms", swapped_in.as_millis()),
    );
    account.assert_complete(0);
    assert_eq!(account.dead_lettered, 0, "{account}");
}

/// Accepts event `id` at the ingress; false when the queue was full.
fn ingress(r: &Running, id: &str) -> bool {
    accept(r, id, &envelope(id))
}

/// Accepts `body` (event `id`) at the ingress; false when the queue was full.
fn accept(r: &Running, id: &str, body: &serde_json::Value) -> bool {
    let body = body.to_string();
    match r
        .appliance
        .ingress("events", "echo", body.as_bytes(), Some("application/json"))
    {
        Ok(accepted) => {
            assert_eq!(accepted, id);
            true
        }
        Err(switchboard::appliance::IngressError::Full(_)) => false,
        Err(e) => panic!("{id}: {e}"),
    }
}

/// Counts what `tally` saw, and the worker's dead letters, into the ledger.
/// Call with the appliance stopped (the store is the state folder's).
fn tally(ledger: &mut Ledger, state: &std::path::Path, ids: &[String]) {
    let store = EmbeddedStore::open(&state.join("kv.redb")).unwrap();
    for id in ids {
        if let Some(raw) = store.get("tally", id).unwrap() {
            let copies: usize = String::from_utf8(raw).unwrap().parse().unwrap();
            let output = switchboard::envelope::output_id(id, "worker", 0);
            ledger.output(id, &output, copies);
        }
    }
}

fn dead_letters(r: &Running, ledger: &mut Ledger) {
    let bus = r.appliance.transport().embedded().unwrap();
    for letter in bus.dead_letters("worker") {
        let id = letter
            .delivered
            .message
            .message_id
            .clone()
            .unwrap_or_default();
        ledger.dead_letter(&id, &letter.failure.kind, &letter.failure.reason);
    }
}

#[test]
fn a_graceful_restart_mid_load_loses_nothing_on_the_embedded_bus() {
    let n = 2000 * soak();
    let r = start(
        EMBEDDED,
        &[
            ("worker.wasm", "scripted_guest"),
            ("tally.wasm", "tally_guest"),
        ],
    );
    let mut ledger = Ledger::new();
    let mut ids = Vec::new();
    // 1 ms each, two at a time: a second of work, accepted far faster, so the
    // stop below finds most of it still queued whatever the machine.
    let slow = |id: &str| {
        json!({"id": id, "type": "echo", "source": "reliability",
               "data": {"id": id, "sleep_ms": 1}})
    };
    for i in 0..n {
        let id = format!("g-{i}");
        if accept(&r, &id, &slow(&id)) {
            ledger.published(id.clone());
            ids.push(id);
        }
    }
    // Stop at once, with most of them still queued: a short drain, the rest
    // goes to the shutdown spool.
    let (spooled, dir) = r.stop_and_keep(Duration::from_millis(50));
    assert!(spooled > 0, "the restart was not mid-load");
    let mut r = start_in(dir.path());
    for i in 0..n {
        let id = format!("h-{i}");
        if ingress(&r, &id) {
            ledger.published(id.clone());
            ids.push(id);
        }
    }
    r.wait_idle();
    dead_letters(&r, &mut ledger);
    r.stop(Duration::from_secs(10));
    drop(r);
    tally(&mut ledger, &dir.path().join("state"), &ids);
    let account = ledger.account();
    report(
        "embedded graceful restart",
        &account,
        &format!("{spooled} events spooled at the restart"),
    );
    account.assert_complete(0);
    assert_eq!(account.dead_lettered, 0, "{account}");
}

#[test]
fn a_hundred_hot_swaps_under_load_lose_nothing_on_the_embedded_bus() {
    let swaps = 100 * soak() as u64;
    let r = start(
        EMBEDDED,
        &[
            ("worker.wasm", "scripted_guest"),
            ("tally.wasm", "tally_guest"),
        ],
    );
    let versions = two_versions();
    let swapping = AtomicBool::new(true);
    let started = Instant::now();
    let ids = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let mut ids = Vec::new();
            let mut i = 0;
            while swapping.load(Ordering::Relaxed) || i < 1000 {
                let id = format!("s-{i}");
                if ingress(&r, &id) {
                    ids.push(id);
                }
                i += 1;
                // A steady stream rather than a flood: the point is events
                // arriving throughout the swaps.
                std::thread::sleep(Duration::from_micros(500));
            }
            ids
        });
        for swap in 0..swaps {
            r.write_plugin("worker.wasm", &versions[usize::from(swap % 2 == 1)]);
            r.wait_for("the new version to serve", |r| {
                r.status("worker").loads == swap + 2
            });
        }
        swapping.store(false, Ordering::Relaxed);
        load.join().unwrap()
    });
    let swapped_in = started.elapsed();
    r.wait_idle();
    assert!(r.status("worker").error.is_none());
    let mut ledger = Ledger::new();
    for id in &ids {
        ledger.published(id.clone());
    }
    dead_letters(&r, &mut ledger);
    let (_, dir) = r.stop_and_keep(Duration::from_secs(10));
    tally(&mut ledger, &dir.path().join("state"), &ids);
    let account = ledger.account();
    report(
        "embedded hot swaps",
        &account,
        &format!("{swaps} swaps in {} ms", swapped_in.as_millis()),
    );
    account.assert_complete(0);
    assert_eq!(account.dead_lettered, 0, "{account}");
}

/// `EMBEDDED` with the worker's cool-down and retries short enough for a test.
fn embedded_with_cooldown() -> String {
    EMBEDDED.replace(
        "[plugins.worker]\n",
        "[plugins.worker]\nmax_attempts = 3\n\
         cooldown = { after = 3, initial = \"200ms\", max = \"1s\" }\n",
    )
}

#[test]
fn bad_reloads_under_load_leave_the_old_version_serving_and_lose_nothing() {
    let r = start(
        &embedded_with_cooldown(),
        &[
            ("worker.wasm", "scripted_guest"),
            ("tally.wasm", "tally_guest"),
        ],
    );
    let good = std::fs::read(wasm("scripted_guest")).unwrap();
    let serving = r.status("worker").version.unwrap();
    let mut ledger = Ledger::new();
    let mut ids = Vec::new();
    let mut next = 0;
    let mut send = |r: &Running, ledger: &mut Ledger, count: usize| {
        for _ in 0..count {
            let id = format!("b-{next}");
            next += 1;
            assert!(ingress(r, &id), "the queue is large enough");
            ledger.published(id.clone());
            ids.push(id);
        }
    };

    // Files that cannot be a new version: refused, the old one keeps serving.
    let wrong_world = std::fs::read(wasm("wrong_world_guest")).unwrap();
    let refused: [(&str, &[u8], &str); 3] = [
        (
            "garbage",
            b"\x00asm garbage, not a component",
            "invalid component",
        ),
        ("truncated", &good[..good.len() / 2], "invalid component"),
        ("wrong world", &wrong_world, "does not implement"),
    ];
    for (what, bytes, expected) in refused {
        send(&r, &mut ledger, 100);
        r.write_plugin("worker.wasm", bytes);
        r.wait_for(what, |r| r.status("worker").error.is_some());
        let status = r.status("worker");
        let error = status.error.unwrap();
        eprintln!("refused {what}: {error}");
        assert!(error.contains(expected), "{what}: {error}");
        assert_eq!(status.version.as_deref(), Some(serving.as_str()), "{what}");
        send(&r, &mut ledger, 100);
        r.write_plugin("worker.wasm", &good);
        r.wait_for("the error to clear", |r| r.status("worker").error.is_none());
    }

    // An invalid router.toml: refused, the running config stays.
    let config = std::fs::read_to_string(r.dir.join("router.toml")).unwrap();
    for (what, text) in [
        ("a syntax error", format!("{config}\n[[routes]\n")),
        (
            "an unknown plugin",
            format!(
                "{config}\n[[routes]]\nexchange = \"events\"\npattern = \"x\"\nplugin = \"ghost\"\n"
            ),
        ),
    ] {
        send(&r, &mut ledger, 100);
        r.write_config(&text);
        r.wait_for(what, |r| r.appliance.config_error().is_some());
        eprintln!(
            "refused router.toml with {what}: {}",
            r.appliance.config_error().unwrap()
        );
        send(&r, &mut ledger, 100);
        r.write_config(&config);
        r.wait_for("the error to clear", |r| {
            r.appliance.config_error().is_none()
        });
    }
    r.wait_idle();

    // A release that loads but traps on every event: the cool-down pauses it,
    // its events wait in the queue, and rolling back handles them.
    let trap = std::fs::read(wasm("trap_guest")).unwrap();
    r.write_plugin("worker.wasm", &trap);
    r.wait_for("the broken release to serve", |r| {
        r.status("worker").version.as_deref() != Some(serving.as_str())
    });
    send(&r, &mut ledger, 300);
    r.wait_for("the cool-down", |r| {
        r.status("worker")
            .dispatch
            .is_some_and(|d| d.paused.load(Ordering::Relaxed))
    });
    std::thread::sleep(Duration::from_secs(2));
    let pauses = r
        .status("worker")
        .dispatch
        .map_or(0, |d| d.pauses.load(Ordering::Relaxed));
    r.write_plugin("worker.wasm", &good);
    r.wait_for("the rollback", |r| {
        r.status("worker").version.as_deref() == Some(serving.as_str())
    });
    r.wait_idle();
    dead_letters(&r, &mut ledger);
    let (_, dir) = r.stop_and_keep(Duration::from_secs(10));
    tally(&mut ledger, &dir.path().join("state"), &ids);
    let account = ledger.account();
    report(
        "embedded bad reloads",
        &account,
        &format!("{pauses} cool-down pauses while the trapping release served for 2 s"),
    );
    account.assert_complete(0);
    assert!(pauses >= 1);
    // Only the attempts the cool-down let through can have used up an event's
    // retries: most of the 300 waited for the rollback.
    assert!(account.dead_lettered <= 30, "{account}");
    assert!(account.reasons.keys().all(|k| k == "trap"), "{account}");
}
