//! Delivery on the embedded bus with the real plugins: choreography, retries,
//! dead letters, the loop guard, backpressure and dedupe. Every event is
//! accounted for: received = acked + dead-lettered once the bus is idle.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard::bus::embedded::EmbeddedBus;
use switchboard::bus::{
    Bus, BusError, ExchangeSpec, Message, Outgoing, Published, QueueSpec, Topology,
};
use switchboard::dispatch::{Backoff, DispatchSettings, PluginWorkers};
use switchboard::kv::{EmbeddedStore, KvError, KvStore, OnDurable};
use switchboard::route::{Binding, ExchangeKind};
use switchboard::runtime::{Limits, PluginSpec};
use switchboard_tests::{Harness, wasm};

fn topology(capacity: usize, routes: &[(&str, &str)]) -> Topology {
    let mut plugins: Vec<&str> = routes.iter().map(|(_, p)| *p).collect();
    plugins.sort_unstable();
    plugins.dedup();
    Topology {
        exchanges: vec![ExchangeSpec {
            name: "events".into(),
            kind: ExchangeKind::Topic,
            durable: true,
        }],
        queues: plugins
            .iter()
            .map(|p| QueueSpec {
                plugin: (*p).into(),
                capacity,
                prefetch: 16,
                ordered: false,
                retry_delays: Vec::new(),
            })
            .collect(),
        bindings: routes
            .iter()
            .map(|(pattern, plugin)| Binding {
                exchange: "events".into(),
                kind: ExchangeKind::Topic,
                pattern: (*pattern).into(),
                plugin: (*plugin).into(),
            })
            .collect(),
    }
}

fn fast() -> DispatchSettings {
    DispatchSettings {
        backoff: Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
            multiplier: 2.0,
            jitter: 0.0,
        },
        ..DispatchSettings::default()
    }
}

fn envelope(id: &str, kind: &str, data: Value) -> Outgoing {
    let body = json!({"id": id, "type": kind, "source": "test", "tenant_id": "acme",
                      "correlation_id": "flow-1", "data": data});
    Outgoing {
        exchange: "events".into(),
        routing_key: kind.into(),
        message: Message {
            body: serde_json::to_vec(&body).unwrap().into(),
            content_type: Some("application/json".into()),
            ..Message::default()
        },
    }
}

fn wait_idle(bus: &EmbeddedBus) {
    let until = Instant::now() + Duration::from_secs(20);
    while !bus.is_idle() {
        assert!(
            Instant::now() < until,
            "bus never became idle: {:?}",
            bus.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Appliance {
    h: Harness,
    bus: EmbeddedBus,
    workers: Vec<PluginWorkers>,
}

impl Appliance {
    fn new(capacity: usize, routes: &[(&str, &str)]) -> Self {
        let bus = EmbeddedBus::new();
        bus.apply(&topology(capacity, routes)).unwrap();
        Self {
            h: Harness::new(),
            bus,
            workers: vec![],
        }
    }

    fn start(
        &mut self,
        name: &str,
        component: &str,
        config: &[(&str, &str)],
        settings: DispatchSettings,
    ) {
        let plugin = Arc::new(self.h.load(name, component, config, Limits::default()));
        let bus: Arc<dyn Bus> = Arc::new(self.bus.clone());
        let metrics = switchboard::metrics::Metrics::new().plugin(name);
        self.workers
            .push(PluginWorkers::start(bus, plugin, settings, metrics).unwrap());
    }

    fn publish(&self, out: Outgoing) {
        self.bus.publish(vec![out], Duration::ZERO).unwrap();
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        for w in self.workers.drain(..) {
            w.stop();
        }
    }
}

fn body(message: &Message) -> Value {
    serde_json::from_slice(&message.body).unwrap()
}

#[test]
fn payment_flows_through_billing_to_notification() {
    let mut app = Appliance::new(
        1000,
        &[
            ("bill.created", "billing"),
            ("payment.*", "billing"),
            ("bill.paid", "notification"),
        ],
    );
    let mut stream = app.bus.subscribe_stream();
    app.start("billing", "billing", &[], fast());
    app.start("notification", "notification", &[], fast());
    app.publish(envelope(
        "evt-1",
        "bill.created",
        json!({"bill_id": "B-1", "amount": 30, "currency": "EUR",
               "customer": {"name": "Ann", "email": "ann@example.com"}}),
    ));
    wait_idle(&app.bus);
    app.publish(envelope(
        "evt-2",
        "payment.success",
        json!({"bill_id": "B-1", "payment_id": "P-1"}),
    ));
    wait_idle(&app.bus);

    let mut seen = Vec::new();
    while let Ok(p) = stream.try_recv() {
        seen.push(p);
    }
    let kinds: Vec<&str> = seen.iter().map(|p| p.routing_key.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "bill.created",
            "payment.success",
            "bill.paid",
            "notification.email"
        ]
    );
    let paid = body(&seen[2].message);
    assert_eq!(paid["source"], "billing");
    assert_eq!(paid["causation_id"], "evt-2");
    assert_eq!(paid["correlation_id"], "flow-1");
    assert_eq!(paid["hops"], 1);
    let email = body(&seen[3].message);
    assert_eq!(email["causation_id"], paid["id"]);
    assert_eq!(
        email["correlation_id"], "flow-1",
        "the flow keeps its correlation id"
    );
    assert_eq!(email["hops"], 2);
    assert_eq!(email["data"]["recipient"], "ann@example.com");
    assert_eq!(
        email["exchange"],
        Value::Null,
        "outputs went back to the input's exchange"
    );
    assert_eq!(seen[3].exchange, "events");

    let stats = app.bus.stats();
    assert_eq!((stats["billing"].received, stats["billing"].acked), (2, 2));
    assert_eq!(
        (stats["notification"].received, stats["notification"].acked),
        (1, 1)
    );
    assert_eq!(
        app.bus.unroutable(),
        1,
        "notification.email has no consumer here"
    );
}

#[test]
fn a_transient_failure_is_retried_until_it_succeeds() {
    let mut app = Appliance::new(100, &[("fail-until", "scripted")]);
    let mut stream = app.bus.subscribe_stream();
    app.start("scripted", "scripted_guest", &[], fast());
    app.publish(envelope("e1", "fail-until", json!({"succeed_on": 3})));
    wait_idle(&app.bus);
    let stats = &app.bus.stats()["scripted"];
    assert_eq!(
        (
            stats.received,
            stats.retried,
            stats.acked,
            stats.dead_lettered
        ),
        (1, 2, 1, 0)
    );
    let mut outputs = Vec::new();
    while let Ok(p) = stream.try_recv() {
        outputs.push(p);
    }
    let succeeded = outputs
        .iter()
        .find(|p| p.routing_key == "succeeded")
        .unwrap();
    assert_eq!(body(&succeeded.message)["data"], json!({"attempt": 3}));
}

#[test]
fn retries_exhausted_go_to_the_dead_letter_queue_with_the_reason() {
    let mut app = Appliance::new(100, &[("retry", "scripted")]);
    app.start(
        "scripted",
        "scripted_guest",
        &[],
        DispatchSettings {
            max_attempts: 3,
            ..fast()
        },
    );
    let started = Instant::now();
    app.publish(envelope("e1", "retry", json!({})));
    wait_idle(&app.bus);
    // Two backoffs: 10 ms, then 20 ms.
    assert!(started.elapsed() >= Duration::from_millis(30));
    let dead = app.bus.dead_letters("scripted");
    assert_eq!(dead.len(), 1);
    let failure = &dead[0].failure;
    assert_eq!(failure.kind, "retry");
    assert_eq!(failure.reason, "asked to retry");
    assert_eq!(failure.attempts, 3);
    assert_eq!(failure.plugin_version, app.workers[0].plugin().version());
    assert!(!failure.first_failure.is_empty());
    assert_eq!(
        body(&dead[0].delivered.message)["id"],
        "e1",
        "the message is kept whole"
    );
    let stats = &app.bus.stats()["scripted"];
    assert_eq!(
        (
            stats.received,
            stats.retried,
            stats.acked,
            stats.dead_lettered
        ),
        (1, 2, 0, 1)
    );
}

#[test]
fn traps_are_retried_then_dead_lettered() {
    let mut app = Appliance::new(100, &[("panic", "scripted")]);
    app.start(
        "scripted",
        "scripted_guest",
        &[],
        DispatchSettings {
            max_attempts: 2,
            ..fast()
        },
    );
    app.publish(envelope("e1", "panic", json!({})));
    wait_idle(&app.bus);
    let dead = app.bus.dead_letters("scripted");
    assert_eq!(dead[0].failure.kind, "panic");
    assert!(
        dead[0].failure.reason.contains("scripted panic"),
        "{:?}",
        dead[0].failure
    );
    assert_eq!(dead[0].failure.attempts, 2);
}

#[test]
fn a_reject_is_dead_lettered_at_once() {
    let mut app = Appliance::new(100, &[("reject", "scripted")]);
    app.start("scripted", "scripted_guest", &[], fast());
    app.publish(envelope("e1", "reject", json!({})));
    wait_idle(&app.bus);
    let dead = app.bus.dead_letters("scripted");
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].failure.kind.as_str(), dead[0].failure.attempts),
        ("reject", 1)
    );
    assert_eq!(app.bus.stats()["scripted"].retried, 0);
}

#[test]
fn the_loop_guard_stops_a_plugin_feeding_itself() {
    // `bounce` answers every event with one of the same kind, on the same
    // exchange, which the same binding matches again.
    let mut app = Appliance::new(100, &[("#", "scripted")]);
    app.start(
        "scripted",
        "scripted_guest",
        &[],
        DispatchSettings {
            max_hops: 5,
            ..fast()
        },
    );
    app.publish(envelope("e1", "bounce", json!({})));
    wait_idle(&app.bus);
    let dead = app.bus.dead_letters("scripted");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].failure.kind, "loop");
    assert!(
        dead[0].failure.reason.contains("max_hops = 5"),
        "{}",
        dead[0].failure.reason
    );
    let stats = &app.bus.stats()["scripted"];
    // The original and four bounces were handled; the fifth bounce was stopped.
    assert_eq!(
        (stats.received, stats.acked, stats.dead_lettered),
        (6, 5, 1)
    );
}

#[test]
fn a_full_queue_refuses_the_publish_and_loses_nothing() {
    let mut app = Appliance::new(5, &[("ok", "scripted")]);
    for i in 0..5 {
        app.publish(envelope(&format!("e{i}"), "ok", json!({})));
    }
    let refused = app
        .bus
        .publish(vec![envelope("e5", "ok", json!({}))], Duration::ZERO);
    assert_eq!(
        refused,
        Err(BusError::Full {
            plugin: "scripted".into()
        })
    );
    app.start("scripted", "scripted_guest", &[], fast());
    wait_idle(&app.bus);
    let stats = &app.bus.stats()["scripted"];
    assert_eq!((stats.received, stats.acked), (5, 5));
    // With room again, the refused event goes through.
    app.publish(envelope("e5", "ok", json!({})));
    wait_idle(&app.bus);
    assert_eq!(app.bus.stats()["scripted"].acked, 6);
}

#[test]
fn a_batch_is_all_or_nothing() {
    let app = Appliance::new(2, &[("a", "scripted"), ("b", "noop")]);
    app.publish(envelope("x", "b", json!({})));
    app.publish(envelope("y", "b", json!({})));
    // `b` is full: a batch that needs it puts nothing anywhere.
    let batch = vec![envelope("1", "a", json!({})), envelope("2", "b", json!({}))];
    assert!(matches!(
        app.bus.publish(batch, Duration::ZERO),
        Err(BusError::Full { .. })
    ));
    assert_eq!(app.bus.stats()["scripted"].received, 0);
    assert_eq!(app.bus.stats()["noop"].received, 2);
}

#[test]
fn duplicates_within_the_dedupe_window_are_dropped() {
    let mut app = Appliance::new(100, &[("echo", "scripted")]);
    let mut stream = app.bus.subscribe_stream();
    app.start(
        "scripted",
        "scripted_guest",
        &[],
        DispatchSettings {
            dedupe: Some(Duration::from_secs(60)),
            ..fast()
        },
    );
    for _ in 0..3 {
        app.publish(envelope("same-id", "echo", json!({})));
    }
    wait_idle(&app.bus);
    let mut echoes = 0;
    while let Ok(p) = stream.try_recv() {
        echoes += usize::from(p.routing_key == "echoed");
    }
    assert_eq!(echoes, 1);
    assert_eq!(
        app.workers[0]
            .stats()
            .deduplicated
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn outputs_to_an_undeclared_exchange_are_dead_lettered() {
    let mut app = Appliance::new(100, &[("emit", "scripted")]);
    app.start("scripted", "scripted_guest", &[], fast());
    app.publish(envelope("e1", "emit", json!({"exchange": "nowhere"})));
    wait_idle(&app.bus);
    let dead = app.bus.dead_letters("scripted");
    assert_eq!(dead[0].failure.kind, "invalid_output");
    assert!(dead[0].failure.reason.contains("\"nowhere\""));
}

#[test]
fn dead_letters_can_be_redriven() {
    let mut app = Appliance::new(100, &[("fail-until", "scripted")]);
    app.start(
        "scripted",
        "scripted_guest",
        &[],
        DispatchSettings {
            max_attempts: 1,
            ..fast()
        },
    );
    // Succeeds on attempt 2 only: with one attempt allowed it is dead-lettered...
    app.publish(envelope("e1", "fail-until", json!({"succeed_on": 2})));
    wait_idle(&app.bus);
    assert_eq!(app.bus.dead_letters("scripted").len(), 1);
    // ...and a re-drive starts again at attempt 1, so it fails again.
    assert_eq!(app.bus.redrive("scripted", 10).unwrap(), 1);
    wait_idle(&app.bus);
    assert_eq!(app.bus.dead_letters("scripted").len(), 1);
    assert_eq!(app.bus.stats()["scripted"].redriven, 1);
}

/// A store whose writes become durable only when the test says so.
struct GatedStore {
    inner: EmbeddedStore,
    held: Mutex<Vec<OnDurable>>,
}

impl GatedStore {
    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// The commit everyone waits for.
    fn commit(&self) {
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        for then in held {
            then(Ok(()));
        }
    }
}

impl KvStore for GatedStore {
    fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.inner.get(ns, key)
    }
    fn set(&self, ns: &str, key: &str, v: &[u8], ttl: Option<Duration>) -> Result<(), KvError> {
        self.inner.set(ns, key, v, ttl)
    }
    fn delete(&self, ns: &str, key: &str) -> Result<bool, KvError> {
        self.inner.delete(ns, key)
    }
    fn incr(&self, ns: &str, key: &str, delta: i64) -> Result<i64, KvError> {
        self.inner.incr(ns, key, delta)
    }
    fn set_if_absent(
        &self,
        ns: &str,
        key: &str,
        v: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, KvError> {
        self.inner.set_if_absent(ns, key, v, ttl)
    }
    fn compare_and_set(
        &self,
        ns: &str,
        key: &str,
        expected: Option<&[u8]>,
        v: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, KvError> {
        self.inner.compare_and_set(ns, key, expected, v, ttl)
    }
    fn written(&self) -> u64 {
        self.inner.written()
    }
    fn when_durable(&self, _mark: u64, then: OnDurable) {
        self.held.lock().unwrap().push(then);
    }
}

/// Group commit: a handled event is acked, and its outputs published, only
/// once the store says what it wrote is durable.
#[test]
fn nothing_leaves_before_the_commit_that_holds_the_events_writes() {
    let app = Appliance::new(
        100,
        &[("bill.created", "billing"), ("payment.*", "billing")],
    );
    let mut stream = app.bus.subscribe_stream();
    let store = Arc::new(GatedStore {
        inner: EmbeddedStore::open(&app.h.dir.path().join("gated.redb")).unwrap(),
        held: Mutex::new(Vec::new()),
    });
    let spec = PluginSpec::from_file("billing", &wasm("billing"), store.clone()).unwrap();
    let plugin = Arc::new(app.h.runtime.load(spec).unwrap().0);
    let bus: Arc<dyn Bus> = Arc::new(app.bus.clone());
    let metrics = switchboard::metrics::Metrics::new().plugin("billing");
    let workers = PluginWorkers::start(bus, plugin, fast(), metrics).unwrap();

    let waits = |n: usize| {
        let until = Instant::now() + Duration::from_secs(10);
        while store.held() < n {
            assert!(
                Instant::now() < until,
                "the event never waited for a commit"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let acked = || app.bus.stats()["billing"].acked;

    // A bill (no output): handled, written, not acked until the commit.
    app.publish(envelope(
        "evt-1",
        "bill.created",
        json!({"bill_id": "B-1", "amount": 30, "customer": {"email": "a@b.c"}}),
    ));
    waits(1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(acked(), 0, "acked before its write was durable");
    store.commit();
    wait_idle(&app.bus);
    assert_eq!(acked(), 1);

    // A payment: its bill.paid is not published before the commit either.
    app.publish(envelope(
        "evt-2",
        "payment.success",
        json!({"bill_id": "B-1", "payment_id": "P-1"}),
    ));
    waits(1);
    std::thread::sleep(Duration::from_millis(200));
    let kinds = |stream: &mut tokio::sync::broadcast::Receiver<Arc<Published>>| {
        let mut kinds = Vec::new();
        while let Ok(p) = stream.try_recv() {
            kinds.push(p.routing_key.clone());
        }
        kinds
    };
    assert_eq!(kinds(&mut stream), ["bill.created", "payment.success"]);
    assert_eq!(acked(), 1);
    store.commit();
    wait_idle(&app.bus);
    assert_eq!(
        kinds(&mut stream),
        ["bill.paid"],
        "published after the commit"
    );
    assert_eq!(acked(), 2);
    workers.stop();
}
