//! Plugin state shared by replicas through Redis: two `switchboard run`
//! processes on the same RabbitMQ queues and the same Redis apply a payment
//! once however it is duplicated, and a Redis that goes away mid-run costs
//! retries, never events.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard_tests::broker::{Amqp, Confirmed, Publish, SinkLife, TestVhost, require_broker};
use switchboard_tests::process::Replica;
use switchboard_tests::redis::{RedisNamespace, ThrowawayRedis, require_redis};
use switchboard_tests::running::start;
use switchboard_tests::wait_until;

/// billing on `payments` (bills and payments), its outputs on `bills`.
fn config(amqp_url: &str, kv_table: &str, concurrency: u32) -> String {
    format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[broker]
url = "{amqp_url}"
timeout = "5s"
{kv_table}
[defaults]
concurrency = {concurrency}
max_attempts = 40
[defaults.backoff]
initial = "200ms"
max = "1s"
jitter = 0.0
[[exchanges]]
name = "payments"
[[exchanges]]
name = "bills"
[plugins.billing]
output_exchange = "bills"
[[routes]]
exchange = "payments"
patterns = ["bill.created", "payment.*"]
plugin = "billing"
"##
    )
}

fn publish(amqp: &Amqp, id: &str, kind: &str, data: Value) {
    let body = json!({"id": id, "type": kind, "source": "payments-api", "data": data});
    assert_eq!(
        amqp.publish(&Publish::json("payments", kind, &body)),
        Confirmed::Routed,
        "{id} was not routed"
    );
}

/// The stored bill, as JSON.
fn bill(ns: &RedisNamespace, bill_id: &str) -> Option<Value> {
    ns.get("billing", &format!("bill:{bill_id}"))
        .map(|raw| serde_json::from_slice(&raw).unwrap())
}

/// Creates `count` bills `<prefix>-<n>` and waits until all are stored.
fn create_bills(amqp: &Amqp, ns: &RedisNamespace, prefix: &str, count: usize) {
    for n in 0..count {
        let bill_id = format!("{prefix}-{n}");
        publish(
            amqp,
            &format!("created-{bill_id}"),
            "bill.created",
            json!({"bill_id": bill_id, "amount": 100 + n, "currency": "EUR",
                   "customer": {"email": format!("c{n}@example.com")}}),
        );
    }
    wait_until("the bills to be stored", Duration::from_secs(60), || {
        (0..count).all(|n| bill(ns, &format!("{prefix}-{n}")).is_some())
    });
}

/// Drains `queue` until `expected` messages have come or `quiet` passes with
/// none; the bodies as JSON, with their message ids.
fn collect(amqp: &Amqp, queue: &str, expected: usize, timeout: Duration) -> Vec<(String, Value)> {
    let mut got = Vec::new();
    let until = Instant::now() + timeout;
    while got.len() < expected && Instant::now() < until {
        for m in amqp.get(queue, expected - got.len(), Duration::from_millis(500)) {
            let body = m.json();
            got.push((body["id"].as_str().unwrap_or_default().to_string(), body));
        }
    }
    // Anything beyond what was expected would be a duplicate: give it time to show.
    for m in amqp.get(queue, 1000, Duration::from_secs(2)) {
        let body = m.json();
        got.push((body["id"].as_str().unwrap_or_default().to_string(), body));
    }
    got
}

fn counter(dispatch: &Value, name: &str) -> u64 {
    dispatch[name].as_u64().unwrap_or(0)
}

#[test]
fn two_replicas_apply_a_duplicated_payment_once() {
    if !require_broker() || !require_redis() {
        return;
    }
    const BILLS: usize = 40;
    const SAME_EVENT: usize = 20;
    let vhost = TestVhost::new("shared-state");
    let ns = RedisNamespace::shared("replicas");
    let router_toml = config(&vhost.url(), &ns.kv_table("1s"), 4);
    let plugins = [("billing.wasm", "billing")];
    let a = Replica::start(&router_toml, &plugins);
    let b = Replica::start(&router_toml, &plugins);

    let amqp = Amqp::connect(&vhost.url()).unwrap();
    let sink = amqp.declare_sink(Some("bills-seen"), SinkLife::Durable, "bills", "#");
    create_bills(&amqp, &ns, "dup", BILLS);
    create_bills(&amqp, &ns, "same", SAME_EVENT);

    // The payment provider sends each payment twice, as two events (a webhook
    // redelivered): back to back, so that the copies go to different replicas
    // and race.
    for n in 0..BILLS {
        for copy in ["first", "second"] {
            publish(
                &amqp,
                &format!("pay-dup-{n}-{copy}"),
                "payment.success",
                json!({"bill_id": format!("dup-{n}"), "payment_id": format!("p-dup-{n}")}),
            );
        }
    }
    // The same event, published twice (a publisher retrying after a lost confirm).
    for n in 0..SAME_EVENT {
        for _ in 0..2 {
            publish(
                &amqp,
                &format!("pay-same-{n}"),
                "payment.success",
                json!({"bill_id": format!("same-{n}"), "payment_id": format!("p-same-{n}")}),
            );
        }
    }
    let total_payments = u64::try_from(2 * (BILLS + SAME_EVENT)).unwrap();
    let total_events = total_payments + u64::try_from(BILLS + SAME_EVENT).unwrap();
    wait_until(
        "both replicas to handle everything",
        Duration::from_secs(90),
        || {
            counter(&a.dispatch("billing"), "handled") + counter(&b.dispatch("billing"), "handled")
                >= total_events
        },
    );
    let outputs = collect(&amqp, &sink, BILLS + SAME_EVENT, Duration::from_secs(30));

    // Both replicas worked on the payments.
    let (da, db) = (a.dispatch("billing"), b.dispatch("billing"));
    assert!(
        counter(&da, "handled") > 0 && counter(&db, "handled") > 0,
        "both replicas consumed: {da} / {db}"
    );
    assert_eq!(
        counter(&da, "dead_lettered") + counter(&db, "dead_lettered"),
        0
    );

    // Payments sent as two events: exactly one bill.paid per bill, one state change.
    let mut per_bill: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (id, body) in &outputs {
        assert_eq!(body["type"], "bill.paid", "{body}");
        per_bill
            .entry(body["data"]["bill_id"].as_str().unwrap().to_string())
            .or_default()
            .push(id);
    }
    for n in 0..BILLS {
        let bill_id = format!("dup-{n}");
        assert_eq!(
            per_bill.get(&bill_id).map(Vec::len),
            Some(1),
            "{bill_id}: one bill.paid for a payment sent twice"
        );
        let stored = bill(&ns, &bill_id).unwrap();
        assert_eq!(stored["status"], "paid");
        assert_eq!(stored["last_payment_id"], format!("p-dup-{n}"));
        let claim: Value =
            serde_json::from_slice(&ns.get("billing", &format!("payment:p-dup-{n}")).unwrap())
                .unwrap();
        assert_eq!(claim["decided"], "applied");
        assert!(
            claim["event"] == format!("pay-dup-{n}-first")
                || claim["event"] == format!("pay-dup-{n}-second"),
            "{claim}"
        );
    }
    // The losers of those races said so, on whichever replica they ran.
    let ignored = |r: &Replica| r.log().matches("duplicate in event").count();
    assert_eq!(
        ignored(&a) + ignored(&b),
        BILLS,
        "one duplicate ignored per payment (replica a: {}, b: {})",
        ignored(&a),
        ignored(&b)
    );

    // The same event twice: one state change; its output id is the same each
    // time it is emitted, so consumers dedupe.
    for n in 0..SAME_EVENT {
        let bill_id = format!("same-{n}");
        let ids: BTreeSet<&str> = per_bill
            .get(&bill_id)
            .unwrap_or_else(|| panic!("{bill_id}: no bill.paid"))
            .iter()
            .copied()
            .collect();
        assert_eq!(ids.len(), 1, "{bill_id}: one distinct bill.paid: {ids:?}");
        assert_eq!(bill(&ns, &bill_id).unwrap()["status"], "paid");
    }
    drop((a, b));
}

#[test]
fn redis_stopping_mid_run_costs_retries_not_events() {
    if !require_broker() {
        return;
    }
    const BILLS: usize = 60;
    let mut redis = ThrowawayRedis::start();
    let vhost = TestVhost::new("redis-outage");
    let ns = RedisNamespace::new(&redis.url(), "outage");
    let r = start(
        &config(&vhost.url(), &ns.kv_table("200ms"), 2),
        &[("billing.wasm", "billing")],
    );
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    let sink = amqp.declare_sink(Some("bills-seen"), SinkLife::Durable, "bills", "#");
    create_bills(&amqp, &ns, "b", BILLS);

    // Payments go out over ~1.2 s; Redis stops a third of the way in and comes
    // back two seconds later.
    let url = vhost.url();
    let publisher = std::thread::spawn(move || {
        let amqp = Amqp::connect(&url).unwrap();
        for n in 0..BILLS {
            publish(
                &amqp,
                &format!("pay-{n}"),
                "payment.success",
                json!({"bill_id": format!("b-{n}"), "payment_id": format!("p-{n}")}),
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    std::thread::sleep(Duration::from_millis(400));
    redis.stop();
    std::thread::sleep(Duration::from_secs(2));
    let retried_during_outage = r
        .status("billing")
        .dispatch
        .unwrap()
        .retried
        .load(std::sync::atomic::Ordering::Relaxed);
    redis.start_again();
    publisher.join().unwrap();

    let outputs = collect(&amqp, &sink, BILLS, Duration::from_secs(90));
    let bills: BTreeSet<String> = outputs
        .iter()
        .map(|(_, body)| body["data"]["bill_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outputs.len(), BILLS, "one bill.paid per payment: {bills:?}");
    assert_eq!(bills.len(), BILLS);
    assert!(
        retried_during_outage > 0,
        "events that met the outage were retried"
    );
    let dispatch = r.status("billing").dispatch.unwrap();
    assert_eq!(
        dispatch
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "nothing dead-lettered"
    );
    for n in 0..BILLS {
        assert_eq!(bill(&ns, &format!("b-{n}")).unwrap()["status"], "paid");
    }
    drop(r);
}
