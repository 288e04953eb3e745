//! The four seed plugins, as built components, on events in the services'
//! envelope: what they emit, what they keep, and how they fail.

use serde_json::json;
use switchboard::envelope::output_envelope;
use switchboard::kv::KvStore;
use switchboard::runtime::{Failure, Limits, Plugin};
use switchboard_tests::{Harness, data, event};

fn billing(h: &Harness) -> Plugin {
    h.load("billing", "billing", &[], Limits::default())
}

fn bill_created(id: &str, bill: &str) -> switchboard::runtime::Event {
    event(
        id,
        "bill.created",
        json!({"bill_id": bill, "amount": 42.5, "currency": "EUR",
               "customer": {"name": "Ann", "email": "ann@example.com"}}),
    )
}

fn payment(id: &str, kind: &str, bill: &str, payment: &str) -> switchboard::runtime::Event {
    event(
        id,
        kind,
        json!({"bill_id": bill, "payment_id": payment, "amount": 42.5, "reason": "card declined"}),
    )
}

#[test]
fn billing_records_bills_and_emits_bill_paid() {
    let h = Harness::new();
    let plugin = billing(&h);
    assert!(plugin.handle(&bill_created("e1", "b1")).unwrap().is_empty());
    let stored: serde_json::Value =
        serde_json::from_slice(&h.kv.get("billing", "bill:b1").unwrap().unwrap()).unwrap();
    assert_eq!(stored["status"], "open");

    let outputs = plugin
        .handle(&payment("e2", "payment.success", "b1", "p1"))
        .unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].kind, "bill.paid");
    let paid = data(&outputs[0]);
    assert_eq!(paid["bill_id"], "b1");
    assert_eq!(paid["payment_id"], "p1");
    assert_eq!(paid["status"], "paid");
    assert_eq!(paid["currency"], "EUR");
    assert_eq!(
        paid["customer"]["email"], "ann@example.com",
        "downstream needs a recipient"
    );
    let stored: serde_json::Value =
        serde_json::from_slice(&h.kv.get("billing", "bill:b1").unwrap().unwrap()).unwrap();
    assert_eq!(stored["status"], "paid");
}

#[test]
fn billing_applies_a_payment_once() {
    let h = Harness::new();
    let plugin = billing(&h);
    plugin.handle(&bill_created("e1", "b1")).unwrap();
    assert_eq!(
        plugin
            .handle(&payment("e2", "payment.success", "b1", "p1"))
            .unwrap()
            .len(),
        1
    );
    // The same payment again, in another event: no state change, nothing emitted.
    assert!(
        plugin
            .handle(&payment("e3", "payment.success", "b1", "p1"))
            .unwrap()
            .is_empty()
    );
    assert!(
        plugin
            .handle(&payment("e4", "payment.success", "b1", "p1"))
            .unwrap()
            .is_empty()
    );
    // A duplicate bill.created does not reset the bill.
    assert!(plugin.handle(&bill_created("e5", "b1")).unwrap().is_empty());
    let stored: serde_json::Value =
        serde_json::from_slice(&h.kv.get("billing", "bill:b1").unwrap().unwrap()).unwrap();
    assert_eq!(stored["status"], "paid");
    // A late failure does not undo a payment.
    assert!(
        plugin
            .handle(&payment("e6", "payment.failed", "b1", "p2"))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn billing_redelivery_yields_the_same_output() {
    let h = Harness::new();
    let plugin = billing(&h);
    plugin.handle(&bill_created("e1", "b1")).unwrap();
    let input = payment("e2", "payment.success", "b1", "p1");
    let first = plugin.handle(&input).unwrap();
    // The same event delivered again (say the process died before publishing):
    // the output is produced again, with the same id, so consumers can dedupe.
    let again = plugin.handle(&input).unwrap();
    assert_eq!(again.len(), 1);
    let id = |outputs: &[switchboard::runtime::Output]| {
        output_envelope("billing", &input, 0, &outputs[0])
            .unwrap()
            .id
    };
    assert_eq!(id(&first), id(&again));
    assert_eq!(data(&first[0]), data(&again[0]));
}

#[test]
fn billing_retries_payments_for_unknown_bills() {
    let h = Harness::new();
    let plugin = billing(&h);
    // The payment overtakes the bill.
    let early = payment("e1", "payment.success", "b9", "p9");
    let failure = plugin.handle(&early).unwrap_err();
    assert!(
        matches!(failure, Failure::Retry(ref r) if r.contains("b9")),
        "{failure:?}"
    );
    assert!(failure.is_retryable());
    plugin.handle(&bill_created("e2", "b9")).unwrap();
    // The retry (attempt 2) now succeeds.
    let retried = switchboard::runtime::Event {
        attempt: 2,
        ..early
    };
    let outputs = plugin.handle(&retried).unwrap();
    assert_eq!(outputs[0].kind, "bill.paid");
}

#[test]
fn billing_records_failed_payments() {
    let h = Harness::new();
    let plugin = billing(&h);
    plugin.handle(&bill_created("e1", "b1")).unwrap();
    let outputs = plugin
        .handle(&payment("e2", "payment.failed", "b1", "p1"))
        .unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].kind, "bill.payment_failed");
    assert_eq!(data(&outputs[0])["status"], "payment_failed");
    // A later successful payment still pays the bill.
    let outputs = plugin
        .handle(&payment("e3", "payment.success", "b1", "p2"))
        .unwrap();
    assert_eq!(outputs[0].kind, "bill.paid");
}

#[test]
fn billing_rejects_events_missing_fields() {
    let h = Harness::new();
    let plugin = billing(&h);
    let failure = plugin
        .handle(&event("e1", "payment.success", json!({"bill_id": "b1"})))
        .unwrap_err();
    assert!(
        matches!(failure, Failure::Reject(ref r) if r.contains("payment_id")),
        "{failure:?}"
    );
    let failure = plugin
        .handle(&event("e2", "bill.created", json!({"amount": 1})))
        .unwrap_err();
    assert!(
        matches!(failure, Failure::Reject(ref r) if r.contains("bill_id")),
        "{failure:?}"
    );
}

fn orders(h: &Harness) -> Plugin {
    h.load("orders", "orders", &[], Limits::default())
}

fn order_created(id: &str, order: &str) -> switchboard::runtime::Event {
    event(
        id,
        "order.created",
        json!({"order_id": order, "items": [{"sku": "A-1", "qty": 2}],
               "customer": {"name": "Ann", "email": "ann@example.com"},
               "currency": "EUR", "total": 42.5}),
    )
}

/// The order as stored, as text: the projection's bytes are what a rebuild is
/// compared with.
fn stored_order(h: &Harness, order: &str) -> String {
    let raw =
        h.kv.get("orders", &format!("order:{order}"))
            .unwrap()
            .unwrap();
    String::from_utf8(raw).unwrap()
}

#[test]
fn orders_folds_an_order_through_its_lifecycle() {
    let h = Harness::new();
    let plugin = orders(&h);
    let lifecycle = [
        order_created("e1", "o1"),
        event(
            "e2",
            "order.paid",
            json!({"order_id": "o1", "amount": 42.5, "payment_id": "p1"}),
        ),
        event(
            "e3",
            "order.shipped",
            json!({"order_id": "o1", "carrier": "DHL", "tracking": "TRK1"}),
        ),
        event("e4", "order.delivered", json!({"order_id": "o1"})),
    ];
    for input in &lifecycle {
        assert!(
            plugin.handle(input).unwrap().is_empty(),
            "a projection emits nothing"
        );
    }
    let expected = concat!(
        r#"{"order_id":"o1","status":"DELIVERED","items":[{"qty":2,"sku":"A-1"}],"#,
        r#""customer":{"email":"ann@example.com","name":"Ann"},"currency":"EUR","total":42.5,"#,
        r#""amount":42.5,"payment_id":"p1","carrier":"DHL","tracking":"TRK1","history":["#,
        r#"{"event":"e1","kind":"order.created","status":"CREATED"},"#,
        r#"{"event":"e2","kind":"order.paid","status":"PAID"},"#,
        r#"{"event":"e3","kind":"order.shipped","status":"SHIPPED"},"#,
        r#"{"event":"e4","kind":"order.delivered","status":"DELIVERED"}]}"#,
    );
    assert_eq!(stored_order(&h, "o1"), expected);

    // Every event delivered again (at least once): nothing changes.
    for input in &lifecycle {
        assert!(plugin.handle(input).unwrap().is_empty());
    }
    assert_eq!(stored_order(&h, "o1"), expected);
}

#[test]
fn orders_cancels_and_refuses_to_ship_a_cancelled_order() {
    let h = Harness::new();
    let plugin = orders(&h);
    plugin.handle(&order_created("e1", "o1")).unwrap();
    plugin
        .handle(&event(
            "e2",
            "order.cancelled",
            json!({"order_id": "o1", "reason": "out of stock"}),
        ))
        .unwrap();
    let cancelled: serde_json::Value = serde_json::from_str(&stored_order(&h, "o1")).unwrap();
    assert_eq!(cancelled["status"], "CANCELLED");
    assert_eq!(cancelled["reason"], "out of stock");
    assert_eq!(
        cancelled["history"][1],
        json!({"event": "e2", "kind": "order.cancelled", "status": "CANCELLED"})
    );

    let failure = plugin
        .handle(&event("e3", "order.shipped", json!({"order_id": "o1"})))
        .unwrap_err();
    assert!(
        matches!(failure, Failure::Reject(ref r) if r.contains("CANCELLED") && r.contains("SHIPPED")),
        "{failure:?}"
    );
    assert!(!failure.is_retryable());
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stored_order(&h, "o1")).unwrap(),
        cancelled,
        "the order is left as it was"
    );
}

#[test]
fn orders_retries_events_that_overtake_their_order_and_rejects_a_missing_id() {
    let h = Harness::new();
    let plugin = orders(&h);
    let early = event("e2", "order.paid", json!({"order_id": "o9", "amount": 5}));
    let failure = plugin.handle(&early).unwrap_err();
    assert!(
        matches!(failure, Failure::Retry(ref r) if r == "order o9 not created yet"),
        "{failure:?}"
    );
    assert_eq!(h.kv.get("orders", "order:o9").unwrap(), None);
    plugin.handle(&order_created("e1", "o9")).unwrap();
    let retried = switchboard::runtime::Event {
        attempt: 2,
        ..early
    };
    plugin.handle(&retried).unwrap();
    assert!(stored_order(&h, "o9").contains(r#""status":"PAID""#));

    let failure = plugin
        .handle(&event("e3", "order.shipped", json!({"carrier": "DHL"})))
        .unwrap_err();
    assert!(
        matches!(failure, Failure::Reject(ref r) if r.contains("order_id")),
        "{failure:?}"
    );
}

fn notification(h: &Harness, config: &[(&str, &str)]) -> Plugin {
    h.load("notification", "notification", config, Limits::default())
}

#[test]
fn notification_emails_on_every_seed_kind() {
    let h = Harness::new();
    let plugin = notification(&h, &[]);
    for kind in [
        "payment.success",
        "payment.failed",
        "bill.created",
        "order.created",
        "order.shipped",
        "user.created",
        "ticket.purchased",
        "listing.sold",
    ] {
        let outputs = plugin
            .handle(&event(
                "e1",
                kind,
                json!({"email": "ann@example.com", "amount": 5, "currency": "EUR"}),
            ))
            .unwrap();
        assert_eq!(outputs.len(), 1, "{kind}");
        assert_eq!(outputs[0].kind, "notification.email");
        let email = data(&outputs[0]);
        assert_eq!(email["recipient"], "ann@example.com", "{kind}");
        assert_eq!(email["template_id"], kind);
        assert!(!email["subject"].as_str().unwrap().is_empty(), "{kind}");
        assert!(!email["body"].as_str().unwrap().is_empty(), "{kind}");
        assert!(
            !email["body"].as_str().unwrap().contains("{{"),
            "{kind}: unrendered template"
        );
    }
}

#[test]
fn notification_renders_configured_templates_and_sms() {
    let h = Harness::new();
    let plugin = notification(
        &h,
        &[
            ("order.shipped.subject", "Order {{order_id}} is on its way"),
            (
                "order.shipped.body",
                "Hi {{customer.name}}, tracking {{tracking}}.",
            ),
        ],
    );
    let outputs = plugin
        .handle(&event(
            "e1",
            "order.shipped",
            json!({"order_id": "o-7", "tracking": "TRK1",
                   "customer": {"name": "Ann", "email": "ann@example.com", "phone": "+3312345678"}}),
        ))
        .unwrap();
    let kinds: Vec<_> = outputs.iter().map(|o| o.kind.as_str()).collect();
    assert_eq!(kinds, ["notification.email", "notification.sms"]);
    let email = data(&outputs[0]);
    assert_eq!(email["subject"], "Order o-7 is on its way");
    assert_eq!(email["body"], "Hi Ann, tracking TRK1.");
    let sms = data(&outputs[1]);
    assert_eq!(sms["recipient"], "+3312345678");
    assert!(!sms["body"].as_str().unwrap().is_empty());
}

#[test]
fn notification_rejects_events_without_a_recipient() {
    let h = Harness::new();
    let plugin = notification(&h, &[]);
    let failure = plugin
        .handle(&event("e1", "order.created", json!({"order_id": "o-1"})))
        .unwrap_err();
    assert!(
        matches!(failure, Failure::Reject(ref r) if r.contains("recipient")),
        "{failure:?}"
    );
    assert!(!failure.is_retryable());
    // Kinds it does not handle are not its business.
    assert!(
        plugin
            .handle(&event("e2", "inventory.changed", json!({})))
            .unwrap()
            .is_empty()
    );
}

fn counter(h: &Harness, key: &str) -> Option<i64> {
    h.kv.get("analytics", key)
        .unwrap()
        .map(|v| String::from_utf8(v).unwrap().parse().unwrap())
}

#[test]
fn analytics_counts_per_kind_day_and_tenant() {
    let h = Harness::new();
    let plugin = h.load("analytics", "analytics", &[], Limits::default());
    for i in 0..3 {
        assert!(
            plugin
                .handle(&event(&format!("e{i}"), "order.created", json!({"i": i})))
                .unwrap()
                .is_empty()
        );
    }
    plugin
        .handle(&event("p1", "payment.success", json!({})))
        .unwrap();
    assert_eq!(counter(&h, "count:kind:order.created"), Some(3));
    assert_eq!(counter(&h, "count:day:2026-11-22:order.created"), Some(3));
    assert_eq!(counter(&h, "count:tenant:acme:order.created"), Some(3));
    assert_eq!(counter(&h, "count:kind:payment.success"), Some(1));
    // A redelivered event is not counted twice.
    plugin
        .handle(&event("e0", "order.created", json!({"i": 0})))
        .unwrap();
    assert_eq!(counter(&h, "count:kind:order.created"), Some(3));
}

#[test]
fn analytics_forwards_when_configured_and_ignores_its_own_events() {
    let h = Harness::new();
    let plugin = h.load(
        "analytics",
        "analytics",
        &[("forward", "true")],
        Limits::default(),
    );
    let outputs = plugin
        .handle(&event("e1", "user.created", json!({"email": "x@y.z"})))
        .unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].kind, "analytics.tracked");
    let tracked = data(&outputs[0]);
    assert_eq!(tracked["kind"], "user.created");
    assert_eq!(tracked["tenant"], "acme");
    assert_eq!(tracked["count_kind"], 1);
    assert!(
        plugin
            .handle(&event("e2", "analytics.tracked", json!({})))
            .unwrap()
            .is_empty()
    );
    assert_eq!(counter(&h, "count:kind:analytics.tracked"), None);
}

#[test]
fn analytics_counts_events_whatever_their_payload() {
    let h = Harness::new();
    let plugin = h.load("analytics", "analytics", &[], Limits::default());
    let mut raw = event("r1", "sensor.reading", json!(null));
    raw.content_type = "application/octet-stream".into();
    raw.data = vec![0xde, 0xad, 0xbe, 0xef];
    assert!(plugin.handle(&raw).unwrap().is_empty());
    assert_eq!(counter(&h, "count:kind:sensor.reading"), Some(1));
}
