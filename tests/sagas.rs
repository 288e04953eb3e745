//! The saga example (`examples/saga`: `order-saga`, `inventory`, `payment`)
//! end to end, with the real components on a real appliance.
//!
//! - Orchestration, on the embedded bus and on RabbitMQ (one scenario): the
//!   happy path, a declined payment (the stock given back), a payment that never
//!   answers (the saga's delayed `saga.timeout` fires after `step_timeout` and
//!   compensates, in reverse order: refund, release, cancel), a reply for a saga
//!   that never started (dead-lettered with the reason) and a late reply
//!   (nothing changes, nothing is emitted).
//! - Choreography, on both buses: the happy path and a declined payment.
//! - 500 concurrent sagas through a `switchboard run` process killed with
//!   SIGKILL three times while orders keep coming, on both buses. On RabbitMQ
//!   nothing may be lost. On the embedded bus a `kill -9` loses what the queues
//!   held in memory; the durable timers (`timers.redb`) and a replay from the
//!   archive (`switchboard replay order-saga --since … --publish`) bring every
//!   saga to an end. Then every order is accounted for: one terminal state, its
//!   stock held or given back, its card charged once or not at all. Each prints
//!   an `ACCOUNT` line.
//!
//! State is read over `GET /api/kv/{plugin}/{key}`, terminal events from the
//! archive (`GET /api/events`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use switchboard_tests::broker::{TestVhost, require_broker};
use switchboard_tests::epoch_ms;
use switchboard_tests::process::Replica;
use switchboard_tests::running::{Running, start};

/// Units of each SKU in stock before the first order.
const INITIAL: u64 = 1_000_000;
/// `order-saga`'s `step_timeout` in every configuration here.
const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// The three components, as `(file in plugins/, built component)`.
const SAGA_PLUGINS: [(&str, &str); 3] = [
    ("order-saga.wasm", "order_saga"),
    ("inventory.wasm", "inventory"),
    ("payment.wasm", "payment"),
];
const CHOREOGRAPHY_PLUGINS: [(&str, &str); 2] =
    [("inventory.wasm", "inventory"), ("payment.wasm", "payment")];

// --- Configuration ----------------------------------------------------------------

/// Which bus a router.toml is for.
enum Bus {
    Embedded,
    /// RabbitMQ at this URL (a test vhost).
    Rabbit(String),
}

impl Bus {
    fn name(&self) -> &'static str {
        match self {
            Bus::Embedded => "embedded",
            Bus::Rabbit(_) => "rabbitmq",
        }
    }
}

/// The common part: the bus, fast retries, exchange `shop`, the archive indexed
/// by order; `plugins` holds the plugin tables and routes.
fn router_toml(bus: &Bus, plugins: &str) -> String {
    let broker = match bus {
        Bus::Embedded => String::new(),
        Bus::Rabbit(url) => format!("[broker]\nurl = \"{url}\"\n"),
    };
    format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
{broker}
[defaults]
concurrency = 2
[defaults.backoff]
initial = "10ms"
max = "100ms"
jitter = 0.0

[[exchanges]]
name = "shop"
{plugins}
[archive]
enabled = true
[[archive.aggregates]]
match = "#"
field = "data.order_id"
"##
    )
}

const INVENTORY: &str = r#"
[plugins.inventory]
[plugins.inventory.config]
"stock.widget" = "1000000"
"stock.gadget" = "1000000"
[plugins.payment]
"#;

/// `order-saga` drives: it commands `inventory` and `payment` and hears their
/// replies and its own timeouts.
fn orchestration(bus: &Bus) -> String {
    let plugins = format!(
        r#"
[plugins.order-saga]
[plugins.order-saga.config]
step_timeout = "{}s"
{INVENTORY}
[[routes]]
exchange = "shop"
patterns = ["order.created", "inventory.reserved", "inventory.rejected", "payment.succeeded", "payment.failed", "saga.timeout"]
plugin = "order-saga"
[[routes]]
exchange = "shop"
patterns = ["inventory.reserve", "inventory.release"]
plugin = "inventory"
[[routes]]
exchange = "shop"
patterns = ["payment.charge", "payment.refund"]
plugin = "payment"
"#,
        STEP_TIMEOUT.as_secs()
    );
    router_toml(bus, &plugins)
}

/// No orchestrator: `inventory` reacts to orders and failed payments, `payment`
/// to reservations.
fn choreography(bus: &Bus) -> String {
    let plugins = format!(
        r#"
{INVENTORY}
[[routes]]
exchange = "shop"
patterns = ["order.created", "payment.failed"]
plugin = "inventory"
[[routes]]
exchange = "shop"
pattern = "inventory.reserved"
plugin = "payment"
"#
    );
    router_toml(bus, &plugins)
}

// --- The appliance over HTTP --------------------------------------------------------

/// The HTTP interface of a running appliance (in-process or a process).
#[derive(Clone)]
struct Api {
    base: String,
    agent: ureq::Agent,
}

impl Api {
    fn new(base: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Self {
            base: base.to_string(),
            agent,
        }
    }

    /// `GET path`: (status, JSON body or the text as a JSON string).
    fn get(&self, path: &str) -> (u16, Value) {
        let mut response = self
            .agent
            .get(&format!("{}{path}", self.base))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `POST /events/shop/{key}` with `body`: the status, or why there was none.
    fn try_publish(&self, key: &str, body: &Value) -> Result<u16, String> {
        self.agent
            .post(&format!("{}/events/shop/{key}", self.base))
            .header("content-type", "application/json")
            .send(body.to_string())
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string())
    }

    /// Publishes on `shop`, expecting `202`.
    fn publish(&self, key: &str, body: &Value) {
        let status = self.try_publish(key, body);
        assert_eq!(status, Ok(202), "POST /events/shop/{key} {body}");
    }

    /// A plugin's kv value (JSON), `None` when it has none.
    fn kv(&self, plugin: &str, key: &str) -> Option<Value> {
        match self.get(&format!("/api/kv/{plugin}/{key}")) {
            (200, body) => Some(body["value"].clone()),
            (404, _) => None,
            (status, body) => panic!("GET /api/kv/{plugin}/{key}: {status} {body}"),
        }
    }

    fn saga(&self, order_id: &str) -> Option<Value> {
        self.kv("order-saga", &format!("saga:{order_id}"))
    }

    fn charge(&self, order_id: &str) -> Option<Value> {
        self.kv("payment", &format!("charge:{order_id}"))
    }

    fn stock(&self, sku: &str) -> Stock {
        let doc = self
            .kv("inventory", &format!("sku:{sku}"))
            .unwrap_or_else(|| panic!("inventory has no document for {sku}"));
        Stock::of(&doc)
    }

    /// One order's archived history, oldest first.
    fn history(&self, order_id: &str) -> Vec<Value> {
        let (status, page) = self.get(&format!("/api/events?aggregate={order_id}&limit=1000"));
        assert_eq!(status, 200, "{page}");
        page["items"].as_array().cloned().unwrap_or_default()
    }

    /// Every archived event whose routing key matches `pattern` (`*` only).
    fn archived(&self, pattern: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after = String::new();
        loop {
            let (status, page) =
                self.get(&format!("/api/events?match={pattern}&limit=1000{after}"));
            assert_eq!(status, 200, "{page}");
            all.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next_after"].as_u64() {
                Some(next) => after = format!("&after={next}"),
                None => return all,
            }
        }
    }

    fn dead_letters(&self, plugin: &str) -> Vec<Value> {
        let (status, page) = self.get(&format!("/api/dlq/{plugin}?limit=1000"));
        assert_eq!(status, 200, "{page}");
        page["items"].as_array().cloned().unwrap_or_default()
    }
}

/// A SKU's document in `inventory`'s state.
#[derive(Debug)]
struct Stock {
    available: u64,
    holds: BTreeMap<String, u64>,
    /// Units each release gave back (0: a tombstone).
    released: BTreeMap<String, u64>,
}

impl Stock {
    fn of(doc: &Value) -> Self {
        let counts = |field: &str| -> BTreeMap<String, u64> {
            doc[field]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| {
                            let n = v.as_u64().unwrap_or_else(|| panic!("{field}: {doc}"));
                            (k.clone(), n)
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        Self {
            available: doc["available"]
                .as_u64()
                .unwrap_or_else(|| panic!("no `available` in {doc}")),
            holds: counts("holds"),
            released: counts("released"),
        }
    }
}

/// Polls `check` (every 50 ms) until it gives a value; fails after `timeout`
/// with `what` and the last reason it gave.
fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let until = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(why) if Instant::now() >= until => {
                panic!("timed out after {timeout:?} waiting for {what}: {why}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The saga of `order_id` once `wanted` holds for it.
fn saga_when(api: &Api, order_id: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    eventually(
        &format!("the saga of {order_id}"),
        Duration::from_secs(30),
        || match api.saga(order_id) {
            Some(saga) if wanted(&saga) => Ok(saga),
            other => Err(format!(
                "saga {other:?}; history {:?}",
                kinds(&api.history(order_id))
            )),
        },
    )
}

fn kinds(history: &[Value]) -> Vec<String> {
    history
        .iter()
        .map(|e| e["routing_key"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// The events of `history` with routing key `key`.
fn of_kind<'a>(history: &'a [Value], key: &str) -> Vec<&'a Value> {
    history.iter().filter(|e| e["routing_key"] == key).collect()
}

/// The one event of `history` with routing key `key`.
fn one<'a>(history: &'a [Value], key: &str) -> &'a Value {
    let found = of_kind(history, key);
    assert_eq!(found.len(), 1, "one {key} in {:?}", kinds(history));
    found[0]
}

/// Asserts that each of `keys` appears once in `history`, caused by the one
/// before it (`causation_id`). Causes, not archive positions: on the embedded
/// bus an event is queued before it is archived, so what a consumer makes of
/// it can be archived first.
fn chain(history: &[Value], keys: &[&str]) {
    for pair in keys.windows(2) {
        let (cause, effect) = (one(history, pair[0]), one(history, pair[1]));
        assert_eq!(
            effect["causation_id"], cause["id"],
            "{} is caused by {}: {history:?}",
            pair[1], pair[0]
        );
    }
}

/// The archived history of `order_id` once it holds every one of `keys` and a
/// terminal event (`order.confirmed` or `order.cancelled`); fails at once on a
/// second terminal event. (An event is queued before it is archived, so what
/// it caused can be archived a moment before it.)
fn history_with(api: &Api, order_id: &str, keys: &[&str]) -> Vec<Value> {
    eventually(
        &format!("the history of {order_id} to hold {keys:?}"),
        Duration::from_secs(30),
        || {
            let history = api.history(order_id);
            let terminal = of_kind(&history, "order.confirmed").len()
                + of_kind(&history, "order.cancelled").len();
            assert!(
                terminal <= 1,
                "{order_id} has {terminal} terminal events: {:?}",
                kinds(&history)
            );
            if terminal == 1 && keys.iter().all(|k| !of_kind(&history, k).is_empty()) {
                Ok(history)
            } else {
                Err(format!("{:?}", kinds(&history)))
            }
        },
    )
}

/// When an archived event was published, in ms since the epoch.
fn published_ms(event: &Value) -> i64 {
    let time = event["time"].as_str().unwrap();
    switchboard::archive::parse_time(time)
        .unwrap_or_else(|why| panic!("{why}: {event}"))
        .timestamp_millis()
}

fn order(order_id: &str, sku: &str, qty: u64, amount_cents: u64, card: &str) -> Value {
    json!({"order_id": order_id, "sku": sku, "qty": qty,
           "amount_cents": amount_cents, "card": card})
}

fn dispatch(r: &Running, plugin: &str) -> (u64, u64, u64) {
    let stats = r.status(plugin).dispatch.unwrap();
    (
        stats.handled.load(Ordering::SeqCst),
        stats.outputs.load(Ordering::SeqCst),
        stats.delayed.load(Ordering::SeqCst),
    )
}

// --- Orchestration ----------------------------------------------------------------

/// The orchestrated saga on a running appliance, whichever its bus.
fn orchestration_scenario(r: &Running, bus: &Bus) {
    let api = Api::new(&r.url);
    let begun = Instant::now();

    // The happy path: reserved, charged, confirmed.
    api.publish("order.created", &order("o-ok", "widget", 3, 1250, "ok"));
    let saga = saga_when(&api, "o-ok", |s| {
        s["state"] != "reserving" && s["state"] != "charging"
    });
    assert_eq!(saga["state"], "confirmed", "{saga}");
    let happy = [
        "order.created",
        "inventory.reserve",
        "inventory.reserved",
        "payment.charge",
        "payment.succeeded",
        "order.confirmed",
    ];
    let history = history_with(&api, "o-ok", &happy);
    chain(&history, &happy);
    let confirmed = of_kind(&history, "order.confirmed");
    assert_eq!(confirmed.len(), 1, "{:?}", kinds(&history));
    assert_eq!(confirmed[0]["body"]["data"]["order_id"], "o-ok");
    assert!(of_kind(&history, "order.cancelled").is_empty());
    let stock = api.stock("widget");
    assert_eq!(stock.holds.get("o-ok"), Some(&3), "{stock:?}");
    assert_eq!(stock.available, INITIAL - 3, "{stock:?}");
    assert_eq!(
        api.charge("o-ok"),
        Some(json!({"state": "charged", "amount_cents": 1250}))
    );

    // Declined: the payment fails, the stock is given back, the order cancelled.
    api.publish(
        "order.created",
        &order("o-declined", "widget", 2, 990, "declined"),
    );
    let saga = saga_when(&api, "o-declined", |s| s["state"] == "cancelled");
    assert_eq!(saga["reason"], "payment_failed", "{saga}");
    let declined = [
        "order.created",
        "inventory.reserve",
        "inventory.reserved",
        "payment.charge",
        "payment.failed",
        "inventory.release",
    ];
    let history = history_with(&api, "o-declined", &declined);
    chain(&history, &declined);
    chain(&history, &["payment.failed", "order.cancelled"]);
    assert_eq!(
        one(&history, "order.cancelled")["body"]["data"],
        json!({"order_id": "o-declined", "reason": "payment_failed"})
    );
    assert_eq!(
        one(&history, "payment.failed")["body"]["data"]["reason"],
        "declined"
    );
    assert!(of_kind(&history, "payment.refund").is_empty());
    assert!(of_kind(&history, "order.confirmed").is_empty());
    let stock = eventually(
        "o-declined's units given back",
        Duration::from_secs(30),
        || {
            let stock = api.stock("widget");
            if stock.released.contains_key("o-declined") {
                Ok(stock)
            } else {
                Err(format!("{stock:?}"))
            }
        },
    );
    assert_eq!(stock.released.get("o-declined"), Some(&2), "{stock:?}");
    assert!(!stock.holds.contains_key("o-declined"), "{stock:?}");
    assert_eq!(
        stock.available,
        INITIAL - 3,
        "back to what o-ok left: {stock:?}"
    );
    assert_eq!(api.charge("o-declined"), None, "nothing charged");

    // No reply from the card provider: the saga waits `step_timeout`, then
    // refunds (nothing was taken: the refund voids the payment), releases and
    // cancels.
    let posted = Instant::now();
    let posted_ms = epoch_ms();
    api.publish(
        "order.created",
        &order("o-silent", "widget", 4, 4200, "no-reply"),
    );
    let saga = saga_when(&api, "o-silent", |s| s["state"] != "reserving");
    assert_eq!(saga["state"], "charging", "{saga}");
    let about_one_second = posted + Duration::from_secs(1);
    if let Some(wait) = about_one_second.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
    let saga = api.saga("o-silent").unwrap();
    let checked_at = posted.elapsed();
    // The charging step began after the post: its timeout cannot be due within
    // 2 s of it.
    if checked_at < STEP_TIMEOUT {
        assert_eq!(
            saga["state"], "charging",
            "{checked_at:?} after the order, before the timeout: {saga}"
        );
        assert!(api.charge("o-silent").is_none());
    } else {
        eprintln!("(the ~1 s check of o-silent came late, {checked_at:?}: skipped)");
    }
    let saga = saga_when(&api, "o-silent", |s| s["state"] == "cancelled");
    assert_eq!(saga["reason"], "timeout", "{saga}");
    let history = history_with(
        &api,
        "o-silent",
        &[
            "payment.charge",
            "saga.timeout",
            "payment.refund",
            "inventory.release",
        ],
    );
    chain(
        &history,
        &[
            "order.created",
            "inventory.reserve",
            "inventory.reserved",
            "payment.charge",
        ],
    );
    let timeouts = of_kind(&history, "saga.timeout");
    let charging_timeout = timeouts
        .iter()
        .find(|e| e["body"]["data"]["step"] == "charging")
        .unwrap_or_else(|| panic!("no charging timeout: {:?}", kinds(&history)));
    assert_eq!(
        charging_timeout["body"]["data"],
        json!({"order_id": "o-silent", "step": "charging"})
    );
    assert_eq!(
        charging_timeout["causation_id"],
        one(&history, "inventory.reserved")["id"]
    );
    // The step began after the post, so its timeout was due no earlier than
    // step_timeout after it. Archive times are to the millisecond on the
    // embedded bus, AMQP timestamps (whole seconds, truncated) on RabbitMQ.
    let resolution = match bus {
        Bus::Embedded => 1,
        Bus::Rabbit(_) => 1000,
    };
    let due = posted_ms + STEP_TIMEOUT.as_millis() as i64;
    let fired = published_ms(charging_timeout);
    assert!(
        fired >= due - due.rem_euclid(resolution),
        "the timeout fired {} ms after the order was posted, before step_timeout",
        fired - posted_ms
    );
    // Compensation in reverse order, caused by the timeout.
    let seq_of = |key: &str| {
        let found = of_kind(&history, key);
        assert_eq!(found.len(), 1, "{key}: {:?}", kinds(&history));
        assert_eq!(
            found[0]["causation_id"], charging_timeout["id"],
            "{key} is caused by the charging timeout"
        );
        found[0]["seq"].as_u64().unwrap()
    };
    let (refund, release, cancel) = (
        seq_of("payment.refund"),
        seq_of("inventory.release"),
        seq_of("order.cancelled"),
    );
    assert!(
        refund < release && release < cancel,
        "refund {refund}, release {release}, cancel {cancel}"
    );
    assert_eq!(
        of_kind(&history, "order.cancelled")[0]["body"]["data"],
        json!({"order_id": "o-silent", "reason": "timeout"})
    );
    assert!(of_kind(&history, "payment.succeeded").is_empty());
    assert!(of_kind(&history, "payment.failed").is_empty());
    let stock = eventually(
        "o-silent's units given back",
        Duration::from_secs(30),
        || {
            let stock = api.stock("widget");
            if stock.released.contains_key("o-silent") {
                Ok(stock)
            } else {
                Err(format!("{stock:?}"))
            }
        },
    );
    assert_eq!(stock.released.get("o-silent"), Some(&4), "{stock:?}");
    assert!(!stock.holds.contains_key("o-silent"), "{stock:?}");
    assert_eq!(stock.available, INITIAL - 3, "{stock:?}");
    let charge = eventually("o-silent's refund", Duration::from_secs(30), || {
        api.charge("o-silent")
            .ok_or_else(|| "no payment record".to_string())
    });
    assert!(
        charge["state"] == "void" || charge["state"] == "refunded",
        "{charge}"
    );

    // A reply for a saga that never started: dead-lettered, saying why.
    api.publish(
        "payment.succeeded",
        &json!({"id": "ghost-reply", "type": "payment.succeeded",
                "data": {"order_id": "ghost", "amount_cents": 1}}),
    );
    let letter = eventually(
        "the ghost reply in order-saga's DLQ",
        Duration::from_secs(30),
        || {
            let letters = api.dead_letters("order-saga");
            letters
                .iter()
                .find(|l| l["message"]["data"]["order_id"] == "ghost")
                .cloned()
                .ok_or_else(|| format!("{letters:?}"))
        },
    );
    assert_eq!(letter["kind"], "reject", "{letter}");
    assert_eq!(letter["routing_key"], "payment.succeeded", "{letter}");
    let reason = letter["reason"].as_str().unwrap();
    assert!(reason.contains("ghost"), "{reason}");
    assert_eq!(api.saga("ghost"), None);

    // A late reply for a cancelled saga: handled, nothing changes, nothing is
    // emitted. Wait first until order-saga has heard everything due so far (3
    // orders, 3 + 2 replies, 2 timeouts each): the next event it handles is
    // the late reply.
    eventually(
        "order-saga to have handled every reply and timeout",
        Duration::from_secs(30),
        || {
            let (handled, _, _) = dispatch(r, "order-saga");
            if handled >= 14 {
                Ok(())
            } else {
                Err(format!("{handled} handled"))
            }
        },
    );
    let before = api.saga("o-declined").unwrap();
    let (handled, outputs, delayed) = dispatch(r, "order-saga");
    api.publish(
        "payment.succeeded",
        &json!({"id": "late-reply", "type": "payment.succeeded",
                "data": {"order_id": "o-declined", "amount_cents": 990}}),
    );
    eventually("the late reply handled", Duration::from_secs(30), || {
        let now = dispatch(r, "order-saga");
        if now.0 > handled {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    });
    assert_eq!(
        dispatch(r, "order-saga"),
        (handled + 1, outputs, delayed),
        "the late reply emitted nothing"
    );
    assert_eq!(api.saga("o-declined").unwrap(), before, "state unchanged");
    let history = api.history("o-declined");
    assert!(
        history.iter().any(|e| e["id"] == "late-reply"),
        "{history:?}"
    );
    assert_eq!(of_kind(&history, "order.cancelled").len(), 1);
    assert!(of_kind(&history, "order.confirmed").is_empty());
    assert_eq!(api.charge("o-declined"), None);
    let letters = api.dead_letters("order-saga");
    assert_eq!(letters.len(), 1, "only the ghost: {letters:?}");
    for plugin in ["inventory", "payment"] {
        let letters = api.dead_letters(plugin);
        assert!(letters.is_empty(), "{plugin}: {letters:?}");
    }
    eprintln!("orchestration scenario: {:?}", begun.elapsed());
}

#[test]
fn orchestration_on_the_embedded_bus() {
    let bus = Bus::Embedded;
    let r = start(&orchestration(&bus), &SAGA_PLUGINS);
    orchestration_scenario(&r, &bus);
}

#[test]
fn orchestration_on_rabbitmq() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("saga-orchestration");
    let bus = Bus::Rabbit(vhost.url());
    let r = start(&orchestration(&bus), &SAGA_PLUGINS);
    orchestration_scenario(&r, &bus);
}

// --- Choreography -----------------------------------------------------------------

#[test]
fn choreography_on_the_embedded_bus() {
    let bus = Bus::Embedded;
    let r = start(&choreography(&bus), &CHOREOGRAPHY_PLUGINS);
    choreography_scenario(&r, &bus);
}

#[test]
fn choreography_on_rabbitmq() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("saga-choreography");
    let bus = Bus::Rabbit(vhost.url());
    let r = start(&choreography(&bus), &CHOREOGRAPHY_PLUGINS);
    choreography_scenario(&r, &bus);
}

/// No coordinator: the happy path, and a declined payment that gives the
/// stock back and cancels the order.
fn choreography_scenario(r: &Running, bus: &Bus) {
    let api = Api::new(&r.url);

    // order.created → inventory.reserved → payment.succeeded + order.confirmed.
    api.publish("order.created", &order("c-ok", "gadget", 2, 700, "ok"));
    let happy = [
        "order.created",
        "inventory.reserved",
        "payment.succeeded",
        "order.confirmed",
    ];
    let history = history_with(&api, "c-ok", &happy);
    assert_eq!(history.len(), happy.len(), "{:?}", kinds(&history));
    chain(&history, &happy[..3]);
    chain(&history, &["inventory.reserved", "order.confirmed"]);
    assert_eq!(
        of_kind(&history, "order.confirmed")[0]["body"]["data"],
        json!({"order_id": "c-ok"})
    );
    let stock = api.stock("gadget");
    assert_eq!(stock.holds.get("c-ok"), Some(&2), "{stock:?}");
    assert_eq!(stock.available, INITIAL - 2, "{stock:?}");
    assert_eq!(
        api.charge("c-ok"),
        Some(json!({"state": "charged", "amount_cents": 700}))
    );

    // Declined: payment.failed → inventory gives the units back and cancels.
    api.publish(
        "order.created",
        &order("c-no", "gadget", 5, 800, "declined"),
    );
    let declined = [
        "order.created",
        "inventory.reserved",
        "payment.failed",
        "inventory.released",
        "order.cancelled",
    ];
    let history = history_with(&api, "c-no", &declined);
    assert_eq!(history.len(), declined.len(), "{:?}", kinds(&history));
    chain(&history, &declined[..4]);
    chain(&history, &["payment.failed", "order.cancelled"]);
    assert_eq!(
        of_kind(&history, "order.cancelled")[0]["body"]["data"],
        json!({"order_id": "c-no", "reason": "payment_failed"})
    );
    assert_eq!(
        of_kind(&history, "inventory.released")[0]["body"]["data"],
        json!({"order_id": "c-no", "sku": "gadget", "qty": 5})
    );
    let stock = api.stock("gadget");
    assert!(!stock.holds.contains_key("c-no"), "{stock:?}");
    assert_eq!(stock.released.get("c-no"), Some(&5), "{stock:?}");
    assert_eq!(stock.available, INITIAL - 2, "only c-ok's units: {stock:?}");
    assert_eq!(api.charge("c-no"), None);
    if let Bus::Embedded = bus {
        r.wait_idle();
    }
    for plugin in ["inventory", "payment"] {
        let letters = api.dead_letters(plugin);
        assert!(letters.is_empty(), "{plugin}: {letters:?}");
    }
}

// --- 500 sagas, three kill -9 -------------------------------------------------------

const CRASH_ORDERS: usize = 500;

/// What a test order is.
#[derive(Debug, Clone)]
struct TestOrder {
    id: String,
    sku: &'static str,
    qty: u64,
    amount_cents: u64,
    card: &'static str,
}

/// 80 % `ok`, 10 % `declined`, 10 % `no-reply`; two SKUs, 1 to 3 units.
fn crash_orders() -> Vec<TestOrder> {
    (0..CRASH_ORDERS)
        .map(|i| TestOrder {
            id: format!("k-{i:03}"),
            sku: if i % 2 == 0 { "widget" } else { "gadget" },
            qty: 1 + (i % 3) as u64,
            amount_cents: 100 + i as u64,
            card: match i % 10 {
                3 => "declined",
                7 => "no-reply",
                _ => "ok",
            },
        })
        .collect()
}

/// A small random source (xorshift64*), seeded from the clock unless
/// `SAGA_SEED` says; the seed is printed, so a run can be repeated.
struct Random(u64);

impl Random {
    fn new() -> Self {
        let seed = std::env::var("SAGA_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            })
            .max(1);
        eprintln!("SAGA_SEED={seed}");
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A duration in `[low, high)`.
    fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = (high - low).as_millis() as u64;
        low + Duration::from_millis(self.next() % span.max(1))
    }
}

/// Publishes every order, one after the other as fast as the router takes
/// them (so that a kill finds sagas at every step and events in flight),
/// retrying each until it gets a `202` (connection refused while the process
/// is down, `503` while it starts or stops); counts the published ones and the
/// refused attempts.
fn publisher(
    api: Api,
    orders: Vec<TestOrder>,
    published: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for o in orders {
            // The event id is the order's: a retried POST that did get through
            // is the same event, not a second order.
            let event = json!({
                "id": format!("order-{}", o.id),
                "type": "order.created",
                "data": order(&o.id, o.sku, o.qty, o.amount_cents, o.card),
            });
            let until = Instant::now() + Duration::from_secs(180);
            loop {
                match api.try_publish("order.created", &event) {
                    Ok(202) => break,
                    Ok(status) if status < 500 => {
                        panic!("order {} refused with {status}", o.id)
                    }
                    Ok(_) | Err(_) => {
                        assert!(Instant::now() < until, "order {} never accepted", o.id);
                        refused.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            published.fetch_add(1, Ordering::SeqCst);
        }
    })
}

/// How the orders ended.
#[derive(Debug, Default)]
struct Outcome {
    confirmed: usize,
    /// Cancelled orders by reason.
    cancelled: BTreeMap<String, usize>,
    /// Cancelled orders whose payment record is `void` (refunded before any
    /// charge) or `refunded`.
    voided: usize,
    refunded: usize,
    /// Units held per SKU.
    held: BTreeMap<&'static str, u64>,
}

/// Checks every order against the three plugins' state: one terminal saga,
/// its stock held (confirmed) or not (cancelled), its card charged once
/// (confirmed) or not at all (cancelled), and no unit of stock leaked.
fn audit(api: &Api, orders: &[TestOrder]) -> Result<Outcome, String> {
    let mut outcome = Outcome::default();
    let mut sagas = BTreeMap::new();
    for o in orders {
        let saga = api
            .saga(&o.id)
            .ok_or_else(|| format!("{} has no saga", o.id))?;
        match saga["state"].as_str() {
            Some("confirmed") => outcome.confirmed += 1,
            Some("cancelled") => {
                let reason = saga["reason"].as_str().unwrap_or("(none)").to_string();
                *outcome.cancelled.entry(reason).or_default() += 1;
            }
            _ => return Err(format!("{} is not over: {saga}", o.id)),
        }
        sagas.insert(o.id.clone(), saga);
    }
    for sku in ["widget", "gadget"] {
        let stock = api.stock(sku);
        let mine: Vec<&TestOrder> = orders.iter().filter(|o| o.sku == sku).collect();
        for o in &mine {
            let held = stock.holds.get(&o.id);
            match (sagas[&o.id]["state"].as_str(), held) {
                (Some("confirmed"), Some(&qty)) if qty == o.qty => {}
                (Some("cancelled"), None) => {}
                (state, held) => {
                    return Err(format!(
                        "{} is {state:?} and holds {held:?} of {sku} (ordered {})",
                        o.id, o.qty
                    ));
                }
            }
        }
        let strangers: Vec<&String> = stock
            .holds
            .keys()
            .filter(|id| !mine.iter().any(|o| &o.id == *id))
            .collect();
        if !strangers.is_empty() {
            return Err(format!("holds of {sku} for unknown orders: {strangers:?}"));
        }
        let held: u64 = stock.holds.values().sum();
        if held + stock.available != INITIAL {
            return Err(format!(
                "{sku}: {held} held + {} available != {INITIAL}: stock leaked",
                stock.available
            ));
        }
        outcome.held.insert(sku, held);
    }
    let mut charged = 0;
    for o in orders {
        let charge = api.charge(&o.id);
        let state = charge.as_ref().and_then(|c| c["state"].as_str());
        match (sagas[&o.id]["state"].as_str(), state) {
            (Some("confirmed"), Some("charged"))
                if charge.as_ref().unwrap()["amount_cents"] == o.amount_cents =>
            {
                charged += 1;
            }
            (Some("cancelled"), None) => {}
            (Some("cancelled"), Some("void")) => outcome.voided += 1,
            (Some("cancelled"), Some("refunded")) => outcome.refunded += 1,
            (saga, _) => {
                return Err(format!(
                    "{} is {saga:?} with payment {charge:?} (amount {})",
                    o.id, o.amount_cents
                ));
            }
        }
    }
    if charged != outcome.confirmed {
        return Err(format!(
            "{charged} charged for {} confirmed",
            outcome.confirmed
        ));
    }
    Ok(outcome)
}

/// Each order's terminal events in the archive: exactly one event (one id,
/// however many copies a redelivery or replay made), and the one its saga says.
fn audit_terminal_events(api: &Api, orders: &[TestOrder]) -> Result<(), String> {
    let mut terminal: BTreeMap<String, BTreeSet<(String, String, String)>> = BTreeMap::new();
    for e in api.archived("order.*") {
        let key = e["routing_key"].as_str().unwrap_or_default();
        if key == "order.confirmed" || key == "order.cancelled" {
            let data = &e["body"]["data"];
            terminal
                .entry(data["order_id"].as_str().unwrap_or_default().to_string())
                .or_default()
                .insert((
                    e["id"].as_str().unwrap_or_default().to_string(),
                    key.to_string(),
                    data["reason"].as_str().unwrap_or_default().to_string(),
                ));
        }
    }
    for o in orders {
        let saga = api.saga(&o.id).unwrap_or_default();
        let events = terminal.remove(&o.id).unwrap_or_default();
        let wanted = match saga["state"].as_str() {
            Some("confirmed") => ("order.confirmed".to_string(), String::new()),
            _ => (
                "order.cancelled".to_string(),
                saga["reason"].as_str().unwrap_or_default().to_string(),
            ),
        };
        let as_wanted = events.len() == 1
            && events
                .iter()
                .all(|(_, key, reason)| (key, reason) == (&wanted.0, &wanted.1));
        if !as_wanted {
            return Err(format!("{}: saga {saga}, terminal events {events:?}", o.id));
        }
    }
    if !terminal.is_empty() {
        return Err(format!("terminal events of unknown orders: {terminal:?}"));
    }
    Ok(())
}

/// 500 sagas while the router is killed three times; on the embedded bus,
/// what the kills lost is replayed from the archive after the last restart.
fn kill_9_scenario(bus: &Bus) {
    let begun = Instant::now();
    // Everything this test's fresh archive holds is after this.
    let since =
        humantime::format_rfc3339_millis(SystemTime::now() - Duration::from_secs(60)).to_string();
    let mut random = Random::new();
    let mut replica = Replica::start(&orchestration(bus), &SAGA_PLUGINS);
    let api = Api::new(&replica.url);
    let orders = crash_orders();
    let published = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let feeding = publisher(
        api.clone(),
        orders.clone(),
        published.clone(),
        refused.clone(),
    );
    // Three kills at random points of the publishing: each once so many orders
    // are in, and a random moment later.
    let mut points: Vec<usize> = Vec::new();
    while points.len() < 3 {
        let point = 25 + (random.next() % (CRASH_ORDERS as u64 - 100)) as usize;
        if points.iter().all(|p| p.abs_diff(point) >= 40) {
            points.push(point);
        }
    }
    points.sort_unstable();
    let mut kills = Vec::new();
    for point in points {
        let until = Instant::now() + Duration::from_secs(300);
        while published.load(Ordering::SeqCst) < point {
            assert!(Instant::now() < until, "the publisher never got to {point}");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(random.between(Duration::ZERO, Duration::from_millis(20)));
        let at = published.load(Ordering::SeqCst);
        assert!(
            at < CRASH_ORDERS,
            "the publisher was done before kill {point}"
        );
        replica.kill();
        let down = Instant::now();
        replica.restart();
        kills.push(format!("{at} ({} ms down)", down.elapsed().as_millis()));
    }
    if let Err(panic) = feeding.join() {
        std::panic::resume_unwind(panic);
    }
    assert_eq!(published.load(Ordering::SeqCst), CRASH_ORDERS);

    // The embedded bus lost what its queues held. Every order-saga input since
    // the start goes to its queue again: orders it never saw start; a
    // transition whose state was committed but whose outputs (its command,
    // its compensations, its timer) died with the process is made again by
    // the event that made it (the saga records it), which re-emits them;
    // timeouts that fired into a lost queue are heard; the rest is late and
    // changes nothing. Replaying `order.created` alone is not enough: a saga
    // left `charging` with its `payment.charge` and timer lost has nothing
    // left to wake it.
    let mut replayed = 0;
    if let Bus::Embedded = bus {
        let (code, lines, stderr) = switchboard_tests::cli(
            replica.dir(),
            &[
                "replay",
                "order-saga",
                "--since",
                &since,
                "--publish",
                "--url",
                &replica.url,
            ],
        );
        assert_eq!(code, 0, "{stderr}");
        replayed = lines[0]["delivered"].as_u64().unwrap_or_default();
        assert!(replayed >= CRASH_ORDERS as u64, "{lines:?}");
    }

    // Every saga ends...
    let mut pending: Vec<&TestOrder> = orders.iter().collect();
    let until = Instant::now() + Duration::from_secs(180);
    while !pending.is_empty() {
        pending.retain(|o| {
            !api.saga(&o.id)
                .is_some_and(|s| s["state"] == "confirmed" || s["state"] == "cancelled")
        });
        if Instant::now() > until {
            let sample: Vec<String> = pending
                .iter()
                .take(5)
                .map(|o| {
                    format!(
                        "{} ({}): saga {:?}, history {:?}",
                        o.id,
                        o.card,
                        api.saga(&o.id),
                        kinds(&api.history(&o.id))
                    )
                })
                .collect();
            panic!(
                "{} sagas never ended, e.g. {sample:#?}\nlog:\n{}",
                pending.len(),
                replica.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let all_over = begun.elapsed();
    // ...and once their compensations have run, the books balance.
    let outcome = eventually("every order accounted for", Duration::from_secs(60), || {
        audit(&api, &orders)
    });
    eventually(
        "one terminal event per order in the archive",
        Duration::from_secs(30),
        || audit_terminal_events(&api, &orders),
    );
    for o in &orders {
        let saga = api.saga(&o.id).unwrap();
        match o.card {
            // The card provider never answers: only the timeout ends it.
            "no-reply" => assert_eq!(
                (&saga["state"], &saga["reason"]),
                (&json!("cancelled"), &json!("timeout")),
                "{}: {saga}",
                o.id
            ),
            "declined" => assert_eq!(saga["state"], "cancelled", "{}: {saga}", o.id),
            // A good card is confirmed, or timed out under the kills and load.
            _ => assert!(
                saga["state"] == "confirmed" || saga["reason"] == "timeout",
                "{}: {saga}",
                o.id
            ),
        }
    }
    for plugin in ["order-saga", "inventory", "payment"] {
        let letters = api.dead_letters(plugin);
        assert!(letters.is_empty(), "{plugin}: {letters:?}");
    }
    let cards = |card: &str| orders.iter().filter(|o| o.card == card).count();
    eprintln!(
        "ACCOUNT sagas {} kill -9: {} orders ({} ok, {} declined, {} no-reply) published with \
         {} refused attempts, kills after {} published; replayed {replayed}; \
         {} confirmed, cancelled {:?}; payments {} charged, {} refunded, {} void; \
         held {:?}; all over after {} s, checked after {} s",
        bus.name(),
        orders.len(),
        cards("ok"),
        cards("declined"),
        cards("no-reply"),
        refused.load(Ordering::SeqCst),
        kills.join(", "),
        outcome.confirmed,
        outcome.cancelled,
        outcome.confirmed,
        outcome.refunded,
        outcome.voided,
        outcome.held,
        all_over.as_secs(),
        begun.elapsed().as_secs(),
    );
    replica.stop();
}

#[test]
fn five_hundred_sagas_through_three_kill_9_on_the_embedded_bus() {
    kill_9_scenario(&Bus::Embedded);
}

#[test]
fn five_hundred_sagas_through_three_kill_9_on_rabbitmq() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("saga-kill9");
    kill_9_scenario(&Bus::Rabbit(vhost.url()));
}
