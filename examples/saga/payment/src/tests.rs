//! The payment step's behaviour on the SDK's in-memory host.

use super::*;
use serde_json::Value;
use switchboard_plugin::log::Level;
use switchboard_plugin::testing;

fn order(order_id: &str, amount_cents: u64, card: &str) -> Value {
    json!({"order_id": order_id, "sku": "widget", "qty": 2,
           "amount_cents": amount_cents, "card": card})
}

fn handle(kind: &str, data: &Value) -> Result<Vec<Output>, Failure> {
    Payment::handle(testing::event(kind, data))
}

fn kinds(outputs: &[Output]) -> Vec<&str> {
    outputs.iter().map(|o| o.kind.as_str()).collect()
}

fn data(output: &Output) -> Value {
    output.data_json().unwrap()
}

fn stored(order_id: &str) -> Option<Value> {
    kv::get_json(&charge_key(order_id)).unwrap()
}

fn refund(order_id: &str) -> Vec<Output> {
    handle("payment.refund", &json!({"order_id": order_id})).unwrap()
}

#[test]
fn a_charge_succeeds_and_is_recorded() {
    testing::reset();
    let outputs = handle("payment.charge", &order("o-1", 500, "ok")).unwrap();
    assert_eq!(kinds(&outputs), ["payment.succeeded"]);
    assert_eq!(
        data(&outputs[0]),
        json!({"order_id": "o-1", "amount_cents": 500})
    );
    assert_eq!(
        stored("o-1"),
        Some(json!({"state": "charged", "amount_cents": 500}))
    );
}

#[test]
fn in_choreography_a_charge_also_confirms_the_order() {
    testing::reset();
    let outputs = handle("inventory.reserved", &order("o-1", 500, "ok")).unwrap();
    assert_eq!(kinds(&outputs), ["payment.succeeded", "order.confirmed"]);
    assert_eq!(data(&outputs[1]), json!({"order_id": "o-1"}));
}

#[test]
fn the_payment_is_never_taken_twice() {
    testing::reset();
    let event = testing::event("payment.charge", &order("o-1", 500, "ok"));
    let first = Payment::handle(event.clone()).unwrap();
    let after_first = testing::kv_dump();
    assert_eq!(
        Payment::handle(event).unwrap(),
        first,
        "redelivery: same reply"
    );
    assert_eq!(testing::kv_dump(), after_first, "charged once");

    // The same command sent again as a new event, with another amount even:
    // the recorded charge answers.
    let again = handle("payment.charge", &order("o-1", 900, "ok")).unwrap();
    assert_eq!(
        data(&again[0]),
        json!({"order_id": "o-1", "amount_cents": 500})
    );
    assert_eq!(testing::kv_dump(), after_first);
}

#[test]
fn a_declined_card_or_amount_fails_and_stores_nothing() {
    testing::reset();
    testing::set_config("max_amount_cents", "1000");
    for data_in in [order("o-1", 500, "declined"), order("o-2", 1001, "ok")] {
        let event = testing::event("payment.charge", &data_in);
        let first = Payment::handle(event.clone()).unwrap();
        assert_eq!(kinds(&first), ["payment.failed"]);
        assert_eq!(
            data(&first[0]),
            json!({"order_id": data_in["order_id"], "sku": "widget", "qty": 2,
                   "reason": "declined"}),
            "enough for inventory to release"
        );
        assert_eq!(Payment::handle(event).unwrap(), first, "declined again");
    }
    assert!(testing::kv_dump().is_empty());
    let at_max = handle("payment.charge", &order("o-3", 1000, "ok")).unwrap();
    assert_eq!(kinds(&at_max), ["payment.succeeded"]);
}

#[test]
fn the_default_limit_is_100000_cents() {
    testing::reset();
    let outputs = handle("payment.charge", &order("o-1", 100_001, "ok")).unwrap();
    assert_eq!(data(&outputs[0])["reason"], "declined");
    let outputs = handle("payment.charge", &order("o-2", 100_000, "ok")).unwrap();
    assert_eq!(kinds(&outputs), ["payment.succeeded"]);
}

#[test]
fn a_provider_that_never_answers_sends_nothing_and_changes_nothing() {
    testing::reset();
    for kind in ["payment.charge", "inventory.reserved"] {
        assert!(
            handle(kind, &order("o-1", 500, "no-reply"))
                .unwrap()
                .is_empty()
        );
    }
    assert!(testing::kv_dump().is_empty());
    let logs = testing::logs();
    assert_eq!(logs.len(), 2);
    assert!(
        logs.iter()
            .all(|(level, line)| *level == Level::Warn && line.contains("does not answer")),
        "{logs:?}"
    );
}

#[test]
fn a_refund_gives_the_charge_back_once() {
    testing::reset();
    handle("payment.charge", &order("o-1", 500, "ok")).unwrap();
    let event = testing::event("payment.refund", &json!({"order_id": "o-1"}));
    let first = Payment::handle(event.clone()).unwrap();
    assert_eq!(kinds(&first), ["payment.refunded"]);
    assert_eq!(
        data(&first[0]),
        json!({"order_id": "o-1", "amount_cents": 500})
    );
    assert_eq!(
        stored("o-1"),
        Some(json!({"state": "refunded", "amount_cents": 500}))
    );
    let after_first = testing::kv_dump();
    assert_eq!(Payment::handle(event).unwrap(), first, "same reply again");
    assert_eq!(refund("o-1"), first, "a second refund command too");
    assert_eq!(testing::kv_dump(), after_first);

    // A charge delivered again after its refund does not charge again.
    let late = handle("payment.charge", &order("o-1", 500, "ok")).unwrap();
    assert_eq!(kinds(&late), ["payment.failed"]);
    assert_eq!(data(&late[0])["reason"], "cancelled");
    assert_eq!(testing::kv_dump(), after_first);
}

#[test]
fn a_refund_before_the_charge_voids_the_payment() {
    testing::reset();
    // The compensation overtook the slow charge.
    let outputs = refund("o-1");
    assert_eq!(
        data(&outputs[0]),
        json!({"order_id": "o-1", "amount_cents": 0}),
        "nothing to give back"
    );
    assert_eq!(
        stored("o-1"),
        Some(json!({"state": "void", "amount_cents": 0}))
    );
    assert_eq!(refund("o-1"), outputs, "same reply again");

    for kind in ["payment.charge", "inventory.reserved"] {
        let outputs = handle(kind, &order("o-1", 500, "ok")).unwrap();
        assert_eq!(kinds(&outputs), ["payment.failed"], "{kind}");
        assert_eq!(
            data(&outputs[0]),
            json!({"order_id": "o-1", "sku": "widget", "qty": 2, "reason": "cancelled"})
        );
    }
    assert_eq!(
        stored("o-1"),
        Some(json!({"state": "void", "amount_cents": 0})),
        "never charged"
    );
}

#[test]
fn bad_data_and_config_are_rejected_naming_the_field() {
    testing::reset();
    let cases = [
        (
            "payment.charge",
            json!({"order_id": "o-1", "sku": "w", "qty": 1, "card": "ok"}),
            "missing field `amount_cents`",
        ),
        (
            "inventory.reserved",
            json!({"order_id": "o-1", "sku": "w", "qty": 1, "amount_cents": "5", "card": "ok"}),
            "invalid type: string \"5\", expected u64",
        ),
        (
            "payment.charge",
            json!({"sku": "w", "qty": 1, "amount_cents": 5, "card": "ok"}),
            "missing field `order_id`",
        ),
        ("payment.refund", json!({}), "missing field `order_id`"),
        (
            "payment.refund",
            json!("o-1"),
            "invalid type: string \"o-1\", expected struct Refund",
        ),
    ];
    for (kind, data, expected) in cases {
        let event = testing::event(kind, &data);
        let id = event.id.clone();
        let err = Payment::handle(event).unwrap_err();
        assert!(err.is_reject(), "{kind} {data}: {err}");
        let prefix = format!("{kind} event {id}: data is not the expected JSON: {expected}");
        assert!(err.message().starts_with(&prefix), "{kind} {data}: {err}");
    }

    testing::set_config("max_amount_cents", "a lot");
    let err = handle("payment.charge", &order("o-1", 5, "ok")).unwrap_err();
    assert_eq!(
        err,
        Failure::reject("config max_amount_cents = \"a lot\" is not a whole number of cents")
    );
    assert!(testing::kv_dump().is_empty());
}

#[test]
fn other_kinds_are_ignored() {
    testing::reset();
    for kind in ["payment.succeeded", "payment.refunded", "order.created"] {
        assert!(handle(kind, &order("o-1", 5, "ok")).unwrap().is_empty());
    }
    assert!(testing::kv_dump().is_empty());
}
