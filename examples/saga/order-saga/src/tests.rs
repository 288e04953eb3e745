//! The orchestrator's behaviour on the SDK's in-memory host.

use super::*;
use serde_json::Value;
use switchboard_plugin::log::Level;
use switchboard_plugin::testing;

fn order_data() -> Value {
    json!({"order_id": "o-1", "sku": "widget", "qty": 2, "amount_cents": 500, "card": "ok"})
}

fn handle(event: &Event) -> Result<Vec<Output>, Failure> {
    OrderSaga::handle(event.clone())
}

fn kinds(outputs: &[Output]) -> Vec<&str> {
    outputs.iter().map(|o| o.kind.as_str()).collect()
}

fn data(output: &Output) -> Value {
    output.data_json().unwrap()
}

fn saga() -> Saga {
    kv::get_json(&saga_key("o-1")).unwrap().unwrap()
}

/// A fresh host with a 10 s step timeout.
fn fresh() {
    testing::reset();
    testing::set_config("step_timeout", "10s");
}

/// `order.created` for o-1, handled; returns the event and its outputs.
fn start() -> (Event, Vec<Output>) {
    let created = testing::event("order.created", &order_data());
    let outputs = handle(&created).unwrap();
    (created, outputs)
}

/// A reply of `kind` for o-1, not yet handled.
fn reply(kind: &str, extra: Value) -> Event {
    let mut data = json!({"order_id": "o-1"});
    if let (Some(map), Value::Object(extra)) = (data.as_object_mut(), extra) {
        map.extend(extra);
    }
    testing::event(kind, &data)
}

fn timeout(step: &str) -> Event {
    reply("saga.timeout", json!({"step": step}))
}

/// Handles `event`, then the same event again (a redelivery), and checks that
/// the second time emits the same outputs and changes nothing.
fn handle_twice(event: &Event) -> Vec<Output> {
    let first = handle(event).unwrap();
    let after_first = testing::kv_dump();
    let mut again = event.clone();
    again.attempt = 2;
    assert_eq!(
        handle(&again).unwrap(),
        first,
        "{}: a redelivery emits the same outputs",
        event.kind
    );
    assert_eq!(
        testing::kv_dump(),
        after_first,
        "{}: state changed once",
        event.kind
    );
    first
}

fn info_logs() -> Vec<String> {
    testing::take_logs()
        .into_iter()
        .filter(|(level, _)| *level == Level::Info)
        .map(|(_, line)| line)
        .collect()
}

#[test]
fn the_happy_path_reserves_charges_and_confirms() {
    fresh();
    let (created, outputs) = start();
    assert_eq!(kinds(&outputs), ["inventory.reserve", "saga.timeout"]);
    assert_eq!(
        data(&outputs[0]),
        order_data(),
        "the command carries the order"
    );
    assert_eq!(
        data(&outputs[1]),
        json!({"order_id": "o-1", "step": "reserving"})
    );
    assert_eq!(outputs[0].delay(), None, "the command goes at once");
    assert_eq!(outputs[1].delay(), Some(Duration::from_secs(10)));
    assert_eq!(
        kv::get_json::<Value>("saga:o-1").unwrap().unwrap(),
        json!({"state": "reserving", "order": order_data(), "by": created.id})
    );

    let reserved = reply("inventory.reserved", order_data());
    let outputs = handle(&reserved).unwrap();
    assert_eq!(kinds(&outputs), ["payment.charge", "saga.timeout"]);
    assert_eq!(data(&outputs[0]), order_data());
    assert_eq!(
        data(&outputs[1]),
        json!({"order_id": "o-1", "step": "charging"})
    );
    assert_eq!(outputs[1].delay(), Some(Duration::from_secs(10)));
    assert_eq!((saga().state, saga().by), (State::Charging, reserved.id));

    let succeeded = reply("payment.succeeded", json!({"amount_cents": 500}));
    let outputs = handle(&succeeded).unwrap();
    assert_eq!(kinds(&outputs), ["order.confirmed"]);
    assert_eq!(data(&outputs[0]), json!({"order_id": "o-1"}));
    let s = saga();
    assert_eq!(
        (s.state, s.by, s.reason),
        (State::Confirmed, succeeded.id, None)
    );
}

#[test]
fn timeouts_of_steps_that_answered_no_longer_matter() {
    fresh();
    start();
    handle(&reply("inventory.reserved", order_data())).unwrap();
    handle(&reply("payment.succeeded", json!({}))).unwrap();
    let before = testing::kv_dump();
    testing::take_logs();

    for step in ["reserving", "charging"] {
        assert!(handle(&timeout(step)).unwrap().is_empty(), "{step}");
    }
    assert_eq!(testing::kv_dump(), before);
    assert_eq!(
        info_logs(),
        [
            "timeout of step reserving for order o-1 no longer matters: the saga is confirmed",
            "timeout of step charging for order o-1 no longer matters: the saga is confirmed",
        ]
    );
}

#[test]
fn a_rejected_reservation_cancels_the_order_with_its_reason() {
    fresh();
    start();
    let rejected = reply(
        "inventory.rejected",
        json!({"sku": "widget", "qty": 2, "reason": "out_of_stock"}),
    );
    let outputs = handle_twice(&rejected);
    assert_eq!(kinds(&outputs), ["order.cancelled"]);
    assert_eq!(
        data(&outputs[0]),
        json!({"order_id": "o-1", "reason": "out_of_stock"})
    );
    let s = saga();
    assert_eq!(
        (s.state, s.reason.as_deref()),
        (State::Cancelled, Some("out_of_stock"))
    );

    // Its timer, when it fires, finds nothing to do.
    assert!(handle(&timeout("reserving")).unwrap().is_empty());
}

#[test]
fn a_failed_payment_releases_the_stock_then_cancels() {
    fresh();
    start();
    handle(&reply("inventory.reserved", order_data())).unwrap();
    let failed = reply(
        "payment.failed",
        json!({"sku": "widget", "qty": 2, "reason": "declined"}),
    );
    let outputs = handle_twice(&failed);
    assert_eq!(kinds(&outputs), ["inventory.release", "order.cancelled"]);
    assert_eq!(data(&outputs[0]), order_data());
    assert_eq!(
        data(&outputs[1]),
        json!({"order_id": "o-1", "reason": "payment_failed"})
    );
    assert_eq!(saga().reason.as_deref(), Some("payment_failed"));
    assert!(handle(&timeout("charging")).unwrap().is_empty());
}

#[test]
fn a_reservation_that_never_answers_is_released_and_the_order_cancelled() {
    fresh();
    start();
    let outputs = handle_twice(&timeout("reserving"));
    assert_eq!(kinds(&outputs), ["inventory.release", "order.cancelled"]);
    assert_eq!(data(&outputs[0]), order_data(), "in case it did reserve");
    assert_eq!(
        data(&outputs[1]),
        json!({"order_id": "o-1", "reason": "timeout"})
    );
    let s = saga();
    assert_eq!(
        (s.state, s.reason.as_deref()),
        (State::Cancelled, Some("timeout"))
    );

    // The slow reply arrives after all: nothing is charged.
    let before = testing::kv_dump();
    testing::take_logs();
    let late = reply("inventory.reserved", order_data());
    assert!(handle(&late).unwrap().is_empty());
    assert_eq!(testing::kv_dump(), before);
    assert_eq!(
        info_logs(),
        [format!(
            "late reply inventory.reserved {} for order o-1 changes nothing: the saga is cancelled",
            late.id
        )]
    );
}

#[test]
fn a_payment_that_never_answers_is_refunded_released_and_cancelled() {
    fresh();
    start();
    handle(&reply("inventory.reserved", order_data())).unwrap();
    let outputs = handle_twice(&timeout("charging"));
    assert_eq!(
        kinds(&outputs),
        ["payment.refund", "inventory.release", "order.cancelled"],
        "the compensations undo the last step first"
    );
    assert_eq!(data(&outputs[0]), json!({"order_id": "o-1"}));
    assert_eq!(data(&outputs[1]), order_data());
    assert_eq!(
        data(&outputs[2]),
        json!({"order_id": "o-1", "reason": "timeout"})
    );
    assert!(outputs.iter().all(|o| o.delay().is_none()));

    // The payment answers late: it changes nothing (the refund undoes it).
    let before = testing::kv_dump();
    for late in [
        reply("payment.succeeded", json!({"amount_cents": 500})),
        reply("payment.failed", json!({"reason": "cancelled"})),
    ] {
        assert!(handle(&late).unwrap().is_empty(), "{}", late.kind);
    }
    assert_eq!(testing::kv_dump(), before);
    assert_eq!(saga().state, State::Cancelled);
}

#[test]
fn every_redelivery_repeats_its_transition_exactly() {
    fresh();
    let created = testing::event("order.created", &order_data());
    let outputs = handle_twice(&created);
    assert_eq!(outputs[1].delay(), Some(Duration::from_secs(10)));
    let outputs = handle_twice(&reply("inventory.reserved", order_data()));
    assert_eq!(kinds(&outputs), ["payment.charge", "saga.timeout"]);
    assert_eq!(outputs[1].delay(), Some(Duration::from_secs(10)));
    let outputs = handle_twice(&reply("payment.succeeded", json!({})));
    assert_eq!(kinds(&outputs), ["order.confirmed"]);
}

#[test]
fn a_redelivery_after_the_saga_moved_on_emits_nothing() {
    fresh();
    let (created, _) = start();
    let reserved = reply("inventory.reserved", order_data());
    handle(&reserved).unwrap();
    handle(&reply("payment.succeeded", json!({}))).unwrap();
    let before = testing::kv_dump();
    // Their outputs were published before the saga could move on.
    assert!(handle(&created).unwrap().is_empty());
    assert!(handle(&reserved).unwrap().is_empty());
    assert_eq!(testing::kv_dump(), before);
}

#[test]
fn a_second_order_created_is_a_duplicate() {
    fresh();
    start();
    let before = testing::kv_dump();
    testing::take_logs();
    let duplicate = testing::event("order.created", &order_data());
    assert!(handle(&duplicate).unwrap().is_empty());
    assert_eq!(testing::kv_dump(), before);
    assert_eq!(
        info_logs(),
        [format!(
            "order o-1 already has a saga (reserving); duplicate order.created {} ignored",
            duplicate.id
        )]
    );
}

#[test]
fn a_duplicate_reply_under_another_id_is_late() {
    fresh();
    start();
    handle(&reply("inventory.reserved", order_data())).unwrap();
    let before = testing::kv_dump();
    assert!(
        handle(&reply("inventory.reserved", order_data()))
            .unwrap()
            .is_empty()
    );
    assert!(
        handle(&reply(
            "inventory.rejected",
            json!({"reason": "out_of_stock"})
        ))
        .unwrap()
        .is_empty()
    );
    assert_eq!(testing::kv_dump(), before, "still charging");
    assert_eq!(saga().state, State::Charging);
}

#[test]
fn a_reply_for_an_unknown_saga_is_rejected() {
    fresh();
    for event in [
        reply("inventory.reserved", order_data()),
        reply("inventory.rejected", json!({"reason": "out_of_stock"})),
        reply("payment.succeeded", json!({})),
        reply("payment.failed", json!({})),
        timeout("reserving"),
    ] {
        let err = handle(&event).unwrap_err();
        assert_eq!(
            err,
            Failure::reject(format!(
                "no saga for order o-1: {} {} answers a saga that was never started",
                event.kind, event.id
            ))
        );
    }
    assert!(testing::kv_dump().is_empty(), "nothing created");
}

#[test]
fn the_step_timeout_comes_from_the_config() {
    for (value, expected) in [
        (None, Duration::from_secs(30)),
        (Some("500ms"), Duration::from_millis(500)),
        (Some("2m"), Duration::from_secs(120)),
        (Some(" 1h "), Duration::from_secs(3600)),
    ] {
        testing::reset();
        if let Some(value) = value {
            testing::set_config("step_timeout", value);
        }
        let (_, outputs) = start();
        assert_eq!(outputs[1].delay(), Some(expected), "{value:?}");
        let outputs = handle(&reply("inventory.reserved", order_data())).unwrap();
        assert_eq!(outputs[1].delay(), Some(expected), "{value:?}");
    }
}

#[test]
fn a_bad_step_timeout_is_rejected_before_anything_changes() {
    for value in ["soon", "10", "0s", "1.5s", "-1s", "10 days"] {
        testing::reset();
        testing::set_config("step_timeout", value);
        let err = handle(&testing::event("order.created", &order_data())).unwrap_err();
        assert_eq!(
            err,
            Failure::reject(format!(
                "config step_timeout = {value:?} is not a duration above zero such as \"30s\", \"500ms\" or \"2m\""
            ))
        );
        assert!(testing::kv_dump().is_empty(), "{value}: no saga");
    }
    // Replies that start no step do not need it.
    fresh();
    start();
    handle(&reply("inventory.reserved", order_data())).unwrap();
    testing::set_config("step_timeout", "soon");
    let outputs = handle(&reply("payment.succeeded", json!({}))).unwrap();
    assert_eq!(kinds(&outputs), ["order.confirmed"]);
}

#[test]
fn bad_data_is_rejected_naming_the_field() {
    fresh();
    start();
    let mut no_sku = order_data();
    no_sku.as_object_mut().unwrap().remove("sku");
    let cases = [
        ("order.created", no_sku, "missing field `sku`"),
        (
            "order.created",
            json!({"order_id": "o-2", "sku": "w", "qty": 0, "amount_cents": 1, "card": "ok"}),
            "invalid value: integer `0`, expected a nonzero u64",
        ),
        (
            "payment.succeeded",
            json!({"amount_cents": 500}),
            "missing field `order_id`",
        ),
        (
            "saga.timeout",
            json!({"order_id": "o-1"}),
            "missing field `step`",
        ),
        (
            "saga.timeout",
            json!({"order_id": "o-1", "step": "confirmed"}),
            "unknown variant `confirmed`, expected `reserving` or `charging`",
        ),
        (
            "inventory.rejected",
            json!({"order_id": "o-1", "reason": 3}),
            "invalid type: integer `3`, expected a string",
        ),
    ];
    let before = testing::kv_dump();
    for (kind, data, expected) in cases {
        let event = testing::event(kind, &data);
        let err = handle(&event).unwrap_err();
        let prefix = format!(
            "{kind} event {}: data is not the expected JSON: {expected}",
            event.id
        );
        assert!(err.is_reject(), "{kind} {data}: {err}");
        assert!(err.message().starts_with(&prefix), "{kind} {data}: {err}");
    }
    assert_eq!(testing::kv_dump(), before);
}

#[test]
fn receipts_and_other_kinds_are_ignored() {
    fresh();
    start();
    let before = testing::kv_dump();
    for kind in [
        "inventory.released",
        "payment.refunded",
        "order.confirmed",
        "order.cancelled",
        "inventory.reserve",
    ] {
        assert!(
            handle(&reply(kind, json!({}))).unwrap().is_empty(),
            "{kind}"
        );
    }
    assert_eq!(testing::kv_dump(), before);
}

#[test]
fn decide_is_pure() {
    let order: Order = serde_json::from_value(order_data()).unwrap();
    let Decision::Transition(saga) =
        decide(None, "e1", "o-1", &Move::Start(order.clone())).unwrap()
    else {
        panic!("a new saga");
    };
    assert_eq!(saga.state, State::Reserving);
    assert_eq!(
        decide(Some(&saga), "e1", "o-1", &Move::Start(order.clone())).unwrap(),
        Decision::Repeat(order.clone())
    );
    let Decision::Transition(charging) = decide(Some(&saga), "e2", "o-1", &Move::Reserved).unwrap()
    else {
        panic!("reserved moves it on");
    };
    assert_eq!(
        (charging.state, charging.by.as_str()),
        (State::Charging, "e2")
    );
    assert!(matches!(
        decide(
            Some(&charging),
            "e3",
            "o-1",
            &Move::Timeout(State::Reserving)
        )
        .unwrap(),
        Decision::Nothing(_)
    ));
    assert_eq!(saga.state, State::Reserving, "the input is not touched");
}

#[test]
fn durations_take_a_unit() {
    assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("3m"), Some(Duration::from_secs(180)));
    for bad in ["", "s", "30", "0ms", "3 weeks", "1.5s", "ms30"] {
        assert_eq!(parse_duration(bad), None, "{bad:?}");
    }
}
