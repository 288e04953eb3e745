//! The seed topologies under `tests/rabbit/` on the real broker, fed with
//! envelopes in the services' own format: the commerce bus (billing, then
//! notification, with analytics on a fanout and a direct exchange) and the
//! backstage bus.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard::config::RouterConfig;
use switchboard_tests::broker::{Amqp, Confirmed, Publish, TestVhost, require_broker};
use switchboard_tests::running::{Running, start};

fn topology(file: &str, url: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("rabbit")
        .join(file);
    let text = std::fs::read_to_string(path).unwrap();
    text.replacen("[broker]\n", &format!("[broker]\nurl = \"{url}\"\n"), 1)
}

fn publish(amqp: &Amqp, exchange: &str, event: &Value) -> Confirmed {
    let key = event["type"].as_str().unwrap();
    amqp.publish(&Publish::json(exchange, key, event))
}

fn handled(r: &Running, plugin: &str) -> u64 {
    r.appliance
        .statuses()
        .into_iter()
        .find(|s| s.name == plugin)
        .and_then(|s| s.dispatch)
        .map_or(0, |d| d.handled.load(std::sync::atomic::Ordering::SeqCst))
}

#[test]
fn the_seed_topologies_parse_as_shipped() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["commerce.toml", "backstage.toml"] {
        let text = topology(file, "amqp://guest:guest@127.0.0.1:5672/%2f");
        RouterConfig::parse(&text, dir.path()).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

#[test]
fn the_commerce_bus_bills_notifies_and_counts() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("commerce");
    let r = start(
        &topology("commerce.toml", &vhost.url()),
        &[
            ("billing.wasm", "billing"),
            ("notification.wasm", "notification"),
            ("analytics.wasm", "analytics"),
        ],
    );
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    let emails = amqp.sink("notifications", "notification.#");
    let paid = amqp.sink("payments", "bill.paid");
    let customer = json!({"name": "Ann Lee", "email": "ann@example.com", "phone": "+33612345678"});

    let bill = json!({"id": "evt-1001", "type": "bill.created", "source": "billing-api",
        "timestamp": "2026-11-22T09:00:00Z", "tenant_id": "acme", "correlation_id": "order-77",
        "data": {"bill_id": "B-1001", "amount": 129.9, "currency": "EUR", "customer": customer}});
    assert_eq!(publish(&amqp, "payments", &bill), Confirmed::Routed);
    let payment = json!({"id": "evt-1002", "type": "payment.success", "source": "payments-api",
        "timestamp": "2026-11-22T09:05:00Z", "tenant_id": "acme", "correlation_id": "order-77",
        "data": {"bill_id": "B-1001", "payment_id": "PAY-1", "amount": 129.9, "currency": "EUR",
                 "customer": customer}});
    // Billing must have recorded the bill first (a payment for an unknown
    // bill is retried): give it a moment, as the services' own order does.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(publish(&amqp, "payments", &payment), Confirmed::Routed);
    let shipped = json!({"id": "evt-1003", "type": "order.shipped", "source": "orders-api",
        "tenant_id": "acme", "correlation_id": "order-77",
        "data": {"order_id": "O-77", "carrier": "DHL", "tracking": "JD0146", "customer": customer}});
    assert_eq!(publish(&amqp, "orders", &shipped), Confirmed::Routed);
    let signup = json!({"id": "evt-1004", "type": "user.created", "source": "accounts-api",
        "tenant_id": "acme", "data": {"user_id": "U-1", "user": {"name": "Ann Lee", "email": "ann@example.com"}}});
    assert_eq!(publish(&amqp, "customers", &signup), Confirmed::Routed);
    // A product event: declared, nobody routes it (yet).
    let product = json!({"id": "evt-1005", "type": "product.updated", "data": {}});
    assert_eq!(publish(&amqp, "products", &product), Confirmed::Unroutable);

    let bill_paid = amqp.get(&paid, 1, Duration::from_secs(20));
    assert_eq!(bill_paid.len(), 1);
    let bill_paid = bill_paid[0].json();
    assert_eq!(bill_paid["source"], "billing");
    assert_eq!(bill_paid["correlation_id"], "order-77");
    assert_eq!(bill_paid["causation_id"], "evt-1002");

    // bill.paid (email + SMS), order.shipped (email), user.created (email).
    let got = amqp.get(&emails, 4, Duration::from_secs(20));
    let mut kinds: Vec<(String, String)> = got
        .iter()
        .map(|m| {
            (
                m.routing_key.clone(),
                m.json()["data"]["template_id"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    kinds.sort();
    assert_eq!(got.len(), 4, "{kinds:?}");
    assert!(got.iter().all(
        |m| m.json()["correlation_id"] == "order-77" || m.json()["causation_id"] == "evt-1004"
    ));
    assert!(got.iter().any(|m| m.routing_key == "notification.sms"));

    // Analytics: a copy on the fanout (any key) and one on the direct exchange.
    let copy =
        json!({"id": "evt-2001", "type": "page.viewed", "source": "web", "data": {"path": "/"}});
    assert_eq!(publish(&amqp, "analytics", &copy), Confirmed::Routed);
    let dead =
        json!({"id": "evt-2002", "type": "order.failed", "source": "orders-api", "data": {}});
    assert_eq!(
        amqp.publish(&Publish::json("deadletter", "dead", &dead)),
        Confirmed::Routed
    );
    assert_eq!(
        amqp.publish(&Publish::json("deadletter", "dead.letter", &dead)),
        Confirmed::Unroutable
    );
    let until = Instant::now() + Duration::from_secs(20);
    while handled(&r, "analytics") < 2 {
        assert!(
            Instant::now() < until,
            "analytics handled {}",
            handled(&r, "analytics")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        r.appliance
            .transport()
            .dead_letters("billing", 10)
            .unwrap()
            .is_empty()
    );
    assert!(
        r.appliance
            .transport()
            .dead_letters("notification", 10)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn the_backstage_bus_notifies_on_posts_and_signups() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("backstage");
    let r = start(
        &topology("backstage.toml", &vhost.url()),
        &[("notification.wasm", "notification")],
    );
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    // The router's own queues carry the backstage prefix.
    assert!(
        amqp.queue_state("backstage.switchboard.notification")
            .is_some()
    );
    let out = amqp.sink("backstage.notifications", "#");
    let post = json!({"id": "post-1", "type": "post.published", "source": "backstage-api",
        "tenant_id": "guild", "correlation_id": "req-9",
        "data": {"post_id": "P-1", "title": "Hello", "author": {"name": "Bo"},
                 "recipient": {"email": "bo@example.com"}}});
    assert_eq!(publish(&amqp, "backstage.events", &post), Confirmed::Routed);
    let signup = json!({"id": "user-1", "type": "user.created", "source": "backstage-api",
        "data": {"user": {"name": "Cy", "email": "cy@example.com"}}});
    assert_eq!(
        publish(&amqp, "backstage.events", &signup),
        Confirmed::Routed
    );
    // `post.*` is one word: a deeper key is not routed.
    let deep = json!({"id": "post-2", "type": "post.comment.added", "data": {}});
    assert_eq!(
        publish(&amqp, "backstage.events", &deep),
        Confirmed::Unroutable
    );

    let got = amqp.get(&out, 2, Duration::from_secs(20));
    let dead = r
        .appliance
        .transport()
        .dead_letters("notification", 10)
        .unwrap();
    assert_eq!(got.len(), 2, "dead letters: {dead:?}");
    let post_mail = got
        .iter()
        .find(|m| m.json()["causation_id"] == "post-1")
        .unwrap()
        .json();
    assert_eq!(post_mail["data"]["recipient"], "bo@example.com");
    assert_eq!(post_mail["data"]["subject"], "New post: Hello");
    assert_eq!(post_mail["data"]["body"], "Bo published \"Hello\".");
    assert_eq!(post_mail["correlation_id"], "req-9");
    drop(r);
}
