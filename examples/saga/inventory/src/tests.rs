//! The inventory's behaviour on the SDK's in-memory host.

use super::*;
use switchboard_plugin::testing;

fn order(order_id: &str, sku: &str, qty: u64) -> Value {
    json!({"order_id": order_id, "sku": sku, "qty": qty, "amount_cents": 500, "card": "ok"})
}

fn handle(kind: &str, data: &Value) -> Result<Vec<Output>, Failure> {
    Inventory::handle(testing::event(kind, data))
}

fn kinds(outputs: &[Output]) -> Vec<&str> {
    outputs.iter().map(|o| o.kind.as_str()).collect()
}

fn data(output: &Output) -> Value {
    output.data_json().unwrap()
}

fn stock(sku: &str) -> Stock {
    kv::get_json(&sku_key(sku)).unwrap().unwrap()
}

/// A fresh host with 100 widgets and 5 gadgets.
fn shop() {
    testing::reset();
    testing::set_config("stock.widget", "100");
    testing::set_config("stock.gadget", "5");
}

#[test]
fn a_reservation_holds_the_units_and_repeats_the_order() {
    shop();
    let outputs = handle("inventory.reserve", &order("o-1", "widget", 3)).unwrap();
    assert_eq!(kinds(&outputs), ["inventory.reserved"]);
    assert_eq!(data(&outputs[0]), order("o-1", "widget", 3));

    let stored: Value = kv::get_json("sku:widget").unwrap().unwrap();
    assert_eq!(
        stored,
        json!({"available": 97, "holds": {"o-1": 3}, "released": {}}),
        "one document per SKU, created from the config"
    );
    assert_eq!(
        kv::get("order:o-1").unwrap().as_deref(),
        Some(&b"widget"[..])
    );
}

#[test]
fn order_created_reserves_in_choreography_without_announcing_anything_else() {
    shop();
    let outputs = handle("order.created", &order("o-1", "gadget", 5)).unwrap();
    assert_eq!(kinds(&outputs), ["inventory.reserved"]);
    assert_eq!(stock("gadget").available, 0);
}

#[test]
fn stock_never_goes_negative() {
    shop();
    let reply = |order_id: &str, qty: u64| {
        let outputs = handle("inventory.reserve", &order(order_id, "gadget", qty)).unwrap();
        let reply = data(&outputs[0]);
        (outputs[0].kind.clone(), reply["reason"].clone())
    };
    assert_eq!(reply("o-1", 3), ("inventory.reserved".into(), Value::Null));
    assert_eq!(
        reply("o-2", 3),
        ("inventory.rejected".into(), json!("out_of_stock"))
    );
    assert_eq!(stock("gadget").available, 2, "a refusal takes nothing");
    assert_eq!(reply("o-3", 2), ("inventory.reserved".into(), Value::Null));
    assert_eq!(
        reply("o-4", 1),
        ("inventory.rejected".into(), json!("out_of_stock"))
    );
    let s = stock("gadget");
    assert_eq!(s.available, 0);
    assert_eq!(
        s.holds,
        BTreeMap::from([("o-1".into(), 3), ("o-3".into(), 2)])
    );
    assert_eq!(
        s.rejected.keys().collect::<Vec<_>>(),
        ["o-2", "o-4"],
        "refusals are recorded"
    );
}

#[test]
fn a_sku_without_config_has_no_units() {
    shop();
    let outputs = handle("inventory.reserve", &order("o-1", "gizmo", 1)).unwrap();
    assert_eq!(kinds(&outputs), ["inventory.rejected"]);
    assert_eq!(data(&outputs[0])["reason"], "out_of_stock");
    assert_eq!(stock("gizmo").available, 0);
}

#[test]
fn out_of_stock_in_choreography_also_cancels_the_order() {
    shop();
    let outputs = handle("order.created", &order("o-1", "gadget", 6)).unwrap();
    assert_eq!(kinds(&outputs), ["inventory.rejected", "order.cancelled"]);
    let mut rejected = order("o-1", "gadget", 6);
    rejected["reason"] = json!("out_of_stock");
    assert_eq!(
        data(&outputs[0]),
        rejected,
        "the whole order and the reason"
    );
    assert_eq!(
        data(&outputs[1]),
        json!({"order_id": "o-1", "reason": "out_of_stock"})
    );

    // The orchestrator announces cancellations itself.
    let outputs = handle("inventory.reserve", &order("o-2", "gadget", 6)).unwrap();
    assert_eq!(kinds(&outputs), ["inventory.rejected"]);
}

#[test]
fn a_redelivered_reservation_repeats_its_reply_and_takes_the_units_once() {
    shop();
    let event = testing::event("inventory.reserve", &order("o-1", "widget", 10));
    let first = Inventory::handle(event.clone()).unwrap();
    let after_first = testing::kv_dump();
    let mut again = event;
    again.attempt = 2;
    assert_eq!(
        Inventory::handle(again).unwrap(),
        first,
        "the very same outputs"
    );
    assert_eq!(testing::kv_dump(), after_first, "no state change");
    assert_eq!(stock("widget").available, 90);
}

#[test]
fn a_redelivered_refusal_stays_a_refusal_when_stock_comes_back() {
    shop();
    handle("inventory.reserve", &order("o-1", "gadget", 5)).unwrap();
    let late = testing::event("order.created", &order("o-2", "gadget", 2));
    let first = Inventory::handle(late.clone()).unwrap();
    assert_eq!(kinds(&first), ["inventory.rejected", "order.cancelled"]);

    // o-1 gives its units back before o-2's event is delivered again: o-2 is
    // cancelled already, so it must not take them now.
    handle(
        "inventory.release",
        &json!({"order_id": "o-1", "sku": "gadget"}),
    )
    .unwrap();
    assert_eq!(Inventory::handle(late).unwrap(), first);
    assert_eq!(stock("gadget").available, 5);
    assert!(stock("gadget").holds.is_empty());
}

#[test]
fn a_release_gives_the_held_units_back_once() {
    shop();
    handle("inventory.reserve", &order("o-1", "widget", 4)).unwrap();
    let release = testing::event(
        "inventory.release",
        &json!({"order_id": "o-1", "sku": "widget", "qty": 4, "amount_cents": 500, "card": "ok"}),
    );
    let first = Inventory::handle(release.clone()).unwrap();
    assert_eq!(kinds(&first), ["inventory.released"]);
    assert_eq!(
        data(&first[0]),
        json!({"order_id": "o-1", "sku": "widget", "qty": 4})
    );
    let s = stock("widget");
    assert_eq!(s.available, 100);
    assert!(s.holds.is_empty());
    assert_eq!(s.released, BTreeMap::from([("o-1".into(), 4)]));

    let after_first = testing::kv_dump();
    assert_eq!(
        Inventory::handle(release).unwrap(),
        first,
        "same reply again"
    );
    assert_eq!(testing::kv_dump(), after_first, "returned once");
    assert_eq!(stock("widget").available, 100);
}

#[test]
fn payment_failed_in_choreography_releases_and_cancels_the_order() {
    shop();
    handle("order.created", &order("o-1", "gadget", 2)).unwrap();
    let outputs = handle(
        "payment.failed",
        &json!({"order_id": "o-1", "sku": "gadget", "qty": 2, "reason": "declined"}),
    )
    .unwrap();
    assert_eq!(kinds(&outputs), ["inventory.released", "order.cancelled"]);
    assert_eq!(
        data(&outputs[0]),
        json!({"order_id": "o-1", "sku": "gadget", "qty": 2})
    );
    assert_eq!(
        data(&outputs[1]),
        json!({"order_id": "o-1", "reason": "payment_failed"})
    );
    assert_eq!(stock("gadget").available, 5);
}

#[test]
fn a_release_before_its_reservation_leaves_a_tombstone() {
    shop();
    // The compensation overtook the slow reservation.
    let outputs = handle(
        "inventory.release",
        &json!({"order_id": "o-1", "sku": "gadget"}),
    )
    .unwrap();
    assert_eq!(
        data(&outputs[0]),
        json!({"order_id": "o-1", "sku": "gadget", "qty": 0}),
        "nothing was held"
    );
    assert_eq!(stock("gadget").available, 5, "nothing given back either");
    assert_eq!(
        stock("gadget").released,
        BTreeMap::from([("o-1".into(), 0)])
    );

    for kind in ["inventory.reserve", "order.created"] {
        let outputs = handle(kind, &order("o-1", "gadget", 2)).unwrap();
        assert_eq!(
            kinds(&outputs),
            ["inventory.rejected"],
            "{kind}: the order was cancelled by whoever released it"
        );
        assert_eq!(data(&outputs[0])["reason"], "cancelled");
    }
    let s = stock("gadget");
    assert_eq!((s.available, s.holds.len()), (5, 0), "nothing taken");
}

#[test]
fn a_reservation_redelivered_after_its_release_takes_nothing() {
    shop();
    let reserve = testing::event("inventory.reserve", &order("o-1", "gadget", 2));
    Inventory::handle(reserve.clone()).unwrap();
    handle(
        "inventory.release",
        &json!({"order_id": "o-1", "sku": "gadget"}),
    )
    .unwrap();
    let outputs = Inventory::handle(reserve).unwrap();
    assert_eq!(data(&outputs[0])["reason"], "cancelled");
    assert_eq!(stock("gadget").available, 5);
}

#[test]
fn a_release_without_sku_finds_the_one_the_order_reserved() {
    shop();
    handle("inventory.reserve", &order("o-1", "gadget", 1)).unwrap();
    let outputs = handle("inventory.release", &json!({"order_id": "o-1"})).unwrap();
    assert_eq!(
        data(&outputs[0]),
        json!({"order_id": "o-1", "sku": "gadget", "qty": 1})
    );
    assert_eq!(stock("gadget").available, 5);

    let err = handle("inventory.release", &json!({"order_id": "o-9"})).unwrap_err();
    assert!(err.is_reject());
    assert!(
        err.message().contains("missing required field `sku`"),
        "{err}"
    );
}

#[test]
fn bad_data_is_rejected_naming_the_field() {
    shop();
    let mut no_id = order("o-1", "widget", 1);
    no_id.as_object_mut().unwrap().remove("order_id");
    let mut no_sku = order("o-1", "widget", 1);
    no_sku.as_object_mut().unwrap().remove("sku");
    let cases = [
        ("inventory.reserve", no_id, "missing field `order_id`"),
        ("order.created", no_sku, "missing field `sku`"),
        (
            "inventory.reserve",
            order("o-1", "widget", 0),
            "invalid value: integer `0`, expected a nonzero u64",
        ),
        (
            "inventory.reserve",
            json!({"order_id": "o-1", "sku": "widget", "qty": -1, "amount_cents": 1, "card": "ok"}),
            "invalid value: integer `-1`, expected a nonzero u64",
        ),
        (
            "inventory.reserve",
            json!({"order_id": "o-1", "sku": " ", "qty": 1, "amount_cents": 1, "card": "ok"}),
            "invalid value: string \"\", expected a non-empty string",
        ),
        (
            "inventory.release",
            json!({"sku": "widget"}),
            "missing field `order_id`",
        ),
        (
            "payment.failed",
            json!({"order_id": "o-1", "sku": 7}),
            "invalid type: integer `7`, expected a string",
        ),
        (
            "inventory.reserve",
            json!("o-1"),
            "invalid type: string \"o-1\", expected struct Order",
        ),
    ];
    for (kind, data, expected) in cases {
        let event = testing::event(kind, &data);
        let id = event.id.clone();
        let err = Inventory::handle(event).unwrap_err();
        assert!(err.is_reject(), "{kind} {data}: {err}");
        let prefix = format!("{kind} event {id}: data is not the expected JSON: {expected}");
        assert!(err.message().starts_with(&prefix), "{kind} {data}: {err}");
    }
    assert!(testing::kv_dump().is_empty(), "nothing stored");
}

#[test]
fn a_stock_config_that_is_not_a_number_is_rejected() {
    shop();
    testing::set_config("stock.widget", "lots");
    let err = handle("inventory.reserve", &order("o-1", "widget", 1)).unwrap_err();
    assert_eq!(
        err,
        Failure::reject("config stock.widget = \"lots\" is not a whole number of units")
    );
}

#[test]
fn other_kinds_are_ignored() {
    shop();
    for kind in ["inventory.reserved", "payment.succeeded", "order.cancelled"] {
        assert!(handle(kind, &order("o-1", "widget", 1)).unwrap().is_empty());
    }
    assert!(testing::kv_dump().is_empty());
}
