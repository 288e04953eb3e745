//! `orders`: the event-sourcing example. A projection (the classic reducer):
//! folds each order's `order.*` events into the order's current state in kv.
//!
//! # Input
//!
//! Every event carries `order_id` (string or integer) in a JSON object.
//!
//! - `order.created`: `{"order_id", "items"?: [...], "customer"?, "currency"?,
//!   "total"?, ...}`. Records the order with status `CREATED` (`items` empty when
//!   not given), keeping every field it was given.
//! - `order.paid`: `{"order_id", "amount", "currency"?, "payment_id"?}` →
//!   `PAID`, recording `amount`, and `currency` (replacing the order's) and
//!   `payment_id` when given.
//! - `order.shipped`: `{"order_id", "carrier"?, "tracking"?}` → `SHIPPED`.
//! - `order.delivered`: `{"order_id"}` → `DELIVERED`.
//! - `order.cancelled`: `{"order_id", "reason"?}` → `CANCELLED`.
//!
//! The lifecycle: `CREATED → PAID → SHIPPED → DELIVERED`, and `CANCELLED` from
//! `CREATED` or `PAID`. Data that is not a JSON object, lacks a required field
//! (`order_id`; `amount` for `order.paid`) or has one
//! of the wrong type is rejected naming the field.
//!
//! Other kinds: nothing happens. The plugin never emits outputs.
//!
//! # State (kv)
//!
//! - `order:<order_id>`: the order as JSON, [`Order`]: `order_id`, `status`, what
//!   the events said (`items`, `customer`, `currency`, `total`, any other field of
//!   `order.created`, `amount`, `payment_id`, `carrier`, `tracking`, `reason`),
//!   then `history`, one `{"event", "kind", "status"}` per event applied (its id,
//!   its kind, the status it left). Fields in a fixed order, object keys sorted,
//!   nothing taken from a clock: the same events give the same bytes, so an order
//!   rebuilt from the archive (`switchboard replay orders --aggregate <id>
//!   --rebuild`) can be compared with the live one byte for byte.
//!
//! # Delivery rules
//!
//! Every event can be delivered more than once, events from different producers
//! arrive out of order, and replicas may share the store (Redis):
//!
//! - An event for an order not created yet is retried (`order <id> not created
//!   yet`); nothing is stored for it.
//! - An event already in the order's `history` (a redelivery), an event whose
//!   status the order already has (a producer repeating itself), and
//!   `order.created` for an order that exists change nothing.
//! - Any other move outside the lifecycle (shipped after cancelled, paid after
//!   delivered, shipped before paid) is rejected with a sentence naming both
//!   statuses.
//! - The order is written with `compare-and-set` over the bytes the decision was
//!   made on (`order.created`: only if absent): when two events of one order race
//!   on two replicas, one writes, the other reads the new order and decides again.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use switchboard_plugin::{Event, Failure, Output, Plugin, export, kv, log};

/// The plugin. Its logic is plain Rust: call `Orders::handle` natively to test it
/// (state comes from `switchboard_plugin::testing`), or [`reduce`] alone.
pub struct Orders;

impl Plugin for Orders {
    fn handle(event: Event) -> Result<Vec<Output>, Failure> {
        if let Some((order_id, change)) = Change::parse(&event)? {
            project(&event, &order_id, &change)?;
        }
        Ok(vec![])
    }
}

export!(Orders);

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// `order.created`: placed, not paid.
    Created,
    /// `order.paid`.
    Paid,
    /// `order.shipped`.
    Shipped,
    /// `order.delivered`: the end of the road.
    Delivered,
    /// `order.cancelled`, before it was shipped.
    Cancelled,
}

impl Status {
    /// The status as it appears in the stored order and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "CREATED",
            Status::Paid => "PAID",
            Status::Shipped => "SHIPPED",
            Status::Delivered => "DELIVERED",
            Status::Cancelled => "CANCELLED",
        }
    }

    /// Whether the lifecycle allows going from `self` to `next`.
    pub fn may_become(self, next: Status) -> bool {
        use Status::*;
        matches!(
            (self, next),
            (Created, Paid)
                | (Created, Cancelled)
                | (Paid, Shipped)
                | (Paid, Cancelled)
                | (Shipped, Delivered)
        )
    }
}

/// One event applied to an order, as kept in its `history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The event's id.
    pub event: String,
    /// The event's kind.
    pub kind: String,
    /// The order's status after it.
    pub status: Status,
}

/// An order as stored under `order:<order_id>`. Serialized in field order;
/// `fields` (a `serde_json::Map`, sorted by key) where it is declared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// The order's id.
    pub order_id: String,
    /// Where it stands.
    pub status: Status,
    /// `order.created`'s `items`.
    pub items: Vec<Value>,
    /// `order.created`'s `customer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<Value>,
    /// `order.created`'s `currency`, replaced by `order.paid`'s when it gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<Value>,
    /// `order.created`'s `total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<Value>,
    /// Every other field `order.created` gave.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
    /// `order.paid`'s `amount`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Value>,
    /// `order.paid`'s `payment_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    /// `order.shipped`'s `carrier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier: Option<Value>,
    /// `order.shipped`'s `tracking`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<Value>,
    /// `order.cancelled`'s `reason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Value>,
    /// The events applied, oldest first.
    pub history: Vec<Step>,
}

/// The fields [`Order`] declares: `order.created` cannot set them through
/// `fields`.
const OWN_FIELDS: [&str; 12] = [
    "order_id",
    "status",
    "items",
    "customer",
    "currency",
    "total",
    "amount",
    "payment_id",
    "carrier",
    "tracking",
    "reason",
    "history",
];

/// The kv key of an order.
pub fn order_key(order_id: &str) -> String {
    format!("order:{order_id}")
}

/// What one `order.*` event says happened, its data checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// `order.created`.
    Created {
        items: Vec<Value>,
        customer: Option<Value>,
        currency: Option<Value>,
        total: Option<Value>,
        /// Every other field given, but the ones [`Order`] declares.
        fields: Map<String, Value>,
    },
    /// `order.paid`.
    Paid {
        amount: Value,
        currency: Option<Value>,
        payment_id: Option<String>,
    },
    /// `order.shipped`.
    Shipped {
        carrier: Option<Value>,
        tracking: Option<Value>,
    },
    /// `order.delivered`.
    Delivered,
    /// `order.cancelled`.
    Cancelled { reason: Option<Value> },
}

impl Change {
    /// The order id and the change `event` carries; `None` for kinds that are
    /// not this plugin's. Malformed data is a reject naming the field.
    pub fn parse(event: &Event) -> Result<Option<(String, Change)>, Failure> {
        let kinds = [
            "order.created",
            "order.paid",
            "order.shipped",
            "order.delivered",
            "order.cancelled",
        ];
        if !kinds.contains(&event.kind.as_str()) {
            return Ok(None);
        }
        let mut data = object(event)?;
        let order_id = id(event, &data, "order_id")?.ok_or_else(|| missing(event, "order_id"))?;
        let change = match event.kind.as_str() {
            "order.created" => {
                let items = match data.remove("items") {
                    Some(Value::Array(items)) => items,
                    // An order placed without lines (a service that sends them
                    // later, or a demo): its state says so.
                    None | Some(Value::Null) => Vec::new(),
                    Some(other) => return Err(wrong(event, "items", "an array", &other)),
                };
                let customer = optional(&mut data, "customer");
                let currency = optional(&mut data, "currency");
                let total = optional(&mut data, "total");
                for own in OWN_FIELDS {
                    data.remove(own);
                }
                Change::Created {
                    items,
                    customer,
                    currency,
                    total,
                    fields: data,
                }
            }
            "order.paid" => {
                let amount = match data.remove("amount") {
                    None | Some(Value::Null) => return Err(missing(event, "amount")),
                    Some(amount @ Value::Number(_)) => amount,
                    Some(Value::String(s)) if !s.trim().is_empty() => Value::String(s),
                    Some(other) => {
                        return Err(wrong(event, "amount", "a number or a string", &other));
                    }
                };
                Change::Paid {
                    amount,
                    currency: optional(&mut data, "currency"),
                    payment_id: id(event, &data, "payment_id")?,
                }
            }
            "order.shipped" => Change::Shipped {
                carrier: optional(&mut data, "carrier"),
                tracking: optional(&mut data, "tracking"),
            },
            "order.delivered" => Change::Delivered,
            _ => Change::Cancelled {
                reason: optional(&mut data, "reason"),
            },
        };
        Ok(Some((order_id, change)))
    }

    /// The status the order has after this change.
    pub fn status(&self) -> Status {
        match self {
            Change::Created { .. } => Status::Created,
            Change::Paid { .. } => Status::Paid,
            Change::Shipped { .. } => Status::Shipped,
            Change::Delivered => Status::Delivered,
            Change::Cancelled { .. } => Status::Cancelled,
        }
    }
}

/// What an event does to an order.
#[derive(Debug, Clone, PartialEq)]
pub enum Reduced {
    /// The order after the event: store it.
    Changed(Box<Order>),
    /// The order already reflects the event; why.
    Unchanged(String),
}

/// The reducer: what `event` (carrying `change` for order `order_id`) does to
/// the order as it stands (`None`: not created yet). Pure: it depends on its
/// arguments only. An event that arrived too early is a retry; a move the
/// lifecycle does not allow, a reject.
pub fn reduce(
    current: Option<&Order>,
    order_id: &str,
    event: &Event,
    change: &Change,
) -> Result<Reduced, Failure> {
    let step = Step {
        event: event.id.clone(),
        kind: event.kind.clone(),
        status: change.status(),
    };
    let Some(order) = current else {
        let Change::Created {
            items,
            customer,
            currency,
            total,
            fields,
        } = change
        else {
            return Err(Failure::retry(format!("order {order_id} not created yet")));
        };
        return Ok(Reduced::Changed(Box::new(Order {
            order_id: order_id.to_owned(),
            status: Status::Created,
            items: items.clone(),
            customer: customer.clone(),
            currency: currency.clone(),
            total: total.clone(),
            fields: fields.clone(),
            amount: None,
            payment_id: None,
            carrier: None,
            tracking: None,
            reason: None,
            history: vec![step],
        })));
    };
    if order.history.iter().any(|s| s.event == event.id) {
        return Ok(Reduced::Unchanged(format!(
            "event {} is already applied to order {order_id}",
            event.id
        )));
    }
    if matches!(change, Change::Created { .. }) {
        return Ok(Reduced::Unchanged(format!(
            "order {order_id} already exists"
        )));
    }
    if order.status == step.status {
        return Ok(Reduced::Unchanged(format!(
            "order {order_id} is already {}",
            order.status.as_str()
        )));
    }
    if !order.status.may_become(step.status) {
        return Err(Failure::reject(format!(
            "order {order_id} cannot go from {} to {} ({} event {})",
            order.status.as_str(),
            step.status.as_str(),
            event.kind,
            event.id
        )));
    }

    let mut next = order.clone();
    match change {
        Change::Created { .. } | Change::Delivered => {}
        Change::Paid {
            amount,
            currency,
            payment_id,
        } => {
            next.amount = Some(amount.clone());
            if currency.is_some() {
                next.currency = currency.clone();
            }
            if payment_id.is_some() {
                next.payment_id = payment_id.clone();
            }
        }
        Change::Shipped { carrier, tracking } => {
            if carrier.is_some() {
                next.carrier = carrier.clone();
            }
            if tracking.is_some() {
                next.tracking = tracking.clone();
            }
        }
        Change::Cancelled { reason } => {
            if reason.is_some() {
                next.reason = reason.clone();
            }
        }
    }
    next.status = step.status;
    next.history.push(step);
    Ok(Reduced::Changed(Box::new(next)))
}

/// How many times an event reads the order again after losing a race for it
/// before it gives up and lets the event be retried later.
const MAX_ORDER_RACES: usize = 16;

/// Applies `change` to the stored order: read, reduce, compare-and-set, and
/// again if another writer changed the order in between.
fn project(event: &Event, order_id: &str, change: &Change) -> Result<(), Failure> {
    let key = order_key(order_id);
    for _ in 0..MAX_ORDER_RACES {
        let raw = kv::get(&key)?;
        let current = raw
            .as_deref()
            .map(|raw| {
                serde_json::from_slice::<Order>(raw).map_err(|e| {
                    Failure::reject(format!("stored order {order_id} is not an order: {e}"))
                })
            })
            .transpose()?;
        let next = match reduce(current.as_ref(), order_id, event, change)? {
            Reduced::Unchanged(why) => {
                log::debug(format!("{} event {}: {why}; ignored", event.kind, event.id));
                return Ok(());
            }
            Reduced::Changed(next) => next,
        };
        let bytes = serde_json::to_vec(&next)
            .map_err(|e| Failure::reject(format!("order {order_id} cannot be stored: {e}")))?;
        if kv::compare_and_set(&key, raw.as_deref(), &bytes, None)? {
            log::info(format!(
                "order {order_id}: {} applied, status {}",
                event.kind,
                next.status.as_str()
            ));
            return Ok(());
        }
        log::debug(format!(
            "order {order_id} changed while {} event {} was applied; reading it again",
            event.kind, event.id
        ));
    }
    Err(Failure::retry(format!(
        "order {order_id} kept changing under {} event {}; trying again later",
        event.kind, event.id
    )))
}

fn object(event: &Event) -> Result<Map<String, Value>, Failure> {
    match event.json_value()? {
        Value::Object(map) => Ok(map),
        other => Err(Failure::reject(format!(
            "{} event {}: data must be a JSON object, not {}",
            event.kind,
            event.id,
            kind_of(&other)
        ))),
    }
}

/// An optional field, taken out of `data`; `null` counts as absent.
fn optional(data: &mut Map<String, Value>, name: &str) -> Option<Value> {
    data.remove(name).filter(|v| !v.is_null())
}

/// An id field: a non-empty string, or an integer (kept as its digits); `None`
/// when absent or `null`.
fn id(event: &Event, data: &Map<String, Value>, name: &str) -> Result<Option<String>, Failure> {
    match data.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
        Some(other) => Err(wrong(
            event,
            name,
            "a non-empty string or an integer",
            other,
        )),
    }
}

fn missing(event: &Event, name: &str) -> Failure {
    Failure::reject(format!(
        "{} event {}: missing required field `{name}`",
        event.kind, event.id
    ))
}

fn wrong(event: &Event, name: &str, expected: &str, got: &Value) -> Failure {
    Failure::reject(format!(
        "{} event {}: field `{name}` must be {expected}, not {}",
        event.kind,
        event.id,
        kind_of(got)
    ))
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(s) if s.trim().is_empty() => "an empty string",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// Native only: the tests run on the SDK's in-memory host.
#[cfg(test)]
#[cfg(not(target_arch = "wasm32"))]
mod tests {
    use super::*;
    use serde_json::json;
    use switchboard_plugin::testing;

    /// An event with a chosen id, so that tests can deliver it again.
    fn event(id: &str, kind: &str, data: Value) -> Event {
        Event {
            id: id.into(),
            ..testing::event(kind, &data)
        }
    }

    fn handle(id: &str, kind: &str, data: Value) -> Result<Vec<Output>, Failure> {
        Orders::handle(event(id, kind, data))
    }

    /// Handles an event that must be applied or ignored, never emitting.
    fn apply(id: &str, kind: &str, data: Value) {
        let outputs = handle(id, kind, data).unwrap();
        assert!(outputs.is_empty(), "a projection emits nothing");
    }

    fn create(id: &str, order_id: &str) {
        apply(
            id,
            "order.created",
            json!({"order_id": order_id, "items": [{"sku": "A-1", "qty": 2}],
                   "customer": {"id": "c-1", "email": "ada@example.com"},
                   "currency": "EUR", "total": 40, "channel": "web"}),
        );
    }

    /// The stored order, as text.
    fn stored(order_id: &str) -> String {
        let raw = kv::get(&order_key(order_id)).unwrap().unwrap();
        String::from_utf8(raw).unwrap()
    }

    fn order(order_id: &str) -> Order {
        kv::get_json(&order_key(order_id)).unwrap().unwrap()
    }

    fn statuses(order_id: &str) -> Vec<(String, Status)> {
        order(order_id)
            .history
            .into_iter()
            .map(|s| (s.event, s.status))
            .collect()
    }

    #[test]
    fn an_order_goes_through_its_lifecycle_and_keeps_what_each_event_said() {
        testing::reset();
        create("e1", "o-1");
        assert_eq!(
            stored("o-1"),
            r#"{"order_id":"o-1","status":"CREATED","items":[{"qty":2,"sku":"A-1"}],"customer":{"email":"ada@example.com","id":"c-1"},"currency":"EUR","total":40,"channel":"web","history":[{"event":"e1","kind":"order.created","status":"CREATED"}]}"#
        );
        apply(
            "e2",
            "order.paid",
            json!({"order_id": "o-1", "amount": 40, "payment_id": "p-1"}),
        );
        apply(
            "e3",
            "order.shipped",
            json!({"order_id": "o-1", "carrier": "DHL", "tracking": "TRK-9"}),
        );
        assert_eq!(
            stored("o-1"),
            r#"{"order_id":"o-1","status":"SHIPPED","items":[{"qty":2,"sku":"A-1"}],"customer":{"email":"ada@example.com","id":"c-1"},"currency":"EUR","total":40,"channel":"web","amount":40,"payment_id":"p-1","carrier":"DHL","tracking":"TRK-9","history":[{"event":"e1","kind":"order.created","status":"CREATED"},{"event":"e2","kind":"order.paid","status":"PAID"},{"event":"e3","kind":"order.shipped","status":"SHIPPED"}]}"#
        );
        apply("e4", "order.delivered", json!({"order_id": "o-1"}));
        let o = order("o-1");
        assert_eq!(o.status, Status::Delivered);
        assert_eq!(
            statuses("o-1"),
            [
                ("e1".into(), Status::Created),
                ("e2".into(), Status::Paid),
                ("e3".into(), Status::Shipped),
                ("e4".into(), Status::Delivered),
            ]
        );
        assert_eq!(o.history[3].kind, "order.delivered");
    }

    #[test]
    fn the_payment_records_its_amount_and_currency() {
        testing::reset();
        apply(
            "e1",
            "order.created",
            json!({"order_id": "o-1", "items": []}),
        );
        apply(
            "e2",
            "order.paid",
            json!({"order_id": "o-1", "amount": "12.50", "currency": "USD"}),
        );
        let o = order("o-1");
        assert_eq!(
            (o.status, o.amount, o.currency, o.payment_id),
            (Status::Paid, Some(json!("12.50")), Some(json!("USD")), None)
        );
    }

    #[test]
    fn an_order_is_cancelled_before_payment_or_after_it() {
        testing::reset();
        create("e1", "o-1");
        apply(
            "e2",
            "order.cancelled",
            json!({"order_id": "o-1", "reason": "changed my mind"}),
        );
        let o = order("o-1");
        assert_eq!(
            (o.status, o.reason),
            (Status::Cancelled, Some(json!("changed my mind")))
        );

        create("e3", "o-2");
        apply("e4", "order.paid", json!({"order_id": "o-2", "amount": 40}));
        apply("e5", "order.cancelled", json!({"order_id": "o-2"}));
        assert_eq!(
            statuses("o-2"),
            [
                ("e3".into(), Status::Created),
                ("e4".into(), Status::Paid),
                ("e5".into(), Status::Cancelled),
            ]
        );
        assert_eq!(order("o-2").reason, None);
    }

    #[test]
    fn a_redelivered_event_changes_nothing() {
        testing::reset();
        create("e1", "o-1");
        let paid = json!({"order_id": "o-1", "amount": 40});
        apply("e2", "order.paid", paid.clone());
        let before = testing::kv_dump();

        // The same event again, and the same fact published again under another id.
        apply("e2", "order.paid", paid.clone());
        apply("e2b", "order.paid", paid.clone());
        // order.created again, even with other data, does not reset the order.
        apply(
            "e1",
            "order.created",
            json!({"order_id": "o-1", "items": []}),
        );
        apply(
            "e1b",
            "order.created",
            json!({"order_id": "o-1", "items": []}),
        );
        assert_eq!(testing::kv_dump(), before);

        // The payment delivered again once the order has moved on (its ack was
        // lost): it is in the history, so it is a redelivery, not an illegal move.
        apply("e3", "order.shipped", json!({"order_id": "o-1"}));
        let before = testing::kv_dump();
        apply("e2", "order.paid", paid);
        assert_eq!(testing::kv_dump(), before);
    }

    #[test]
    fn an_event_before_its_order_is_retried_and_stores_nothing() {
        testing::reset();
        let early = event("e2", "order.paid", json!({"order_id": "o-9", "amount": 5}));
        let err = Orders::handle(early.clone()).unwrap_err();
        assert_eq!(err, Failure::retry("order o-9 not created yet"));
        assert!(testing::kv_dump().is_empty(), "nothing recorded");

        create("e1", "o-9");
        let retried = Event {
            attempt: 2,
            ..early
        };
        assert!(Orders::handle(retried).unwrap().is_empty());
        assert_eq!(order("o-9").status, Status::Paid);
    }

    #[test]
    fn moves_outside_the_lifecycle_are_rejected_naming_both_statuses() {
        testing::reset();
        create("e1", "o-1");
        apply("e2", "order.cancelled", json!({"order_id": "o-1"}));
        create("e3", "o-2");
        for (id, kind) in [
            ("e4", "order.paid"),
            ("e5", "order.shipped"),
            ("e6", "order.delivered"),
        ] {
            apply(id, kind, json!({"order_id": "o-2", "amount": 1}));
        }
        create("e7", "o-3");
        let before = testing::kv_dump();

        let cases = [
            (
                "order.shipped",
                "o-1",
                "order o-1 cannot go from CANCELLED to SHIPPED",
            ),
            (
                "order.paid",
                "o-2",
                "order o-2 cannot go from DELIVERED to PAID",
            ),
            (
                "order.cancelled",
                "o-2",
                "order o-2 cannot go from DELIVERED to CANCELLED",
            ),
            (
                "order.shipped",
                "o-3",
                "order o-3 cannot go from CREATED to SHIPPED",
            ),
            (
                "order.delivered",
                "o-3",
                "order o-3 cannot go from CREATED to DELIVERED",
            ),
        ];
        for (kind, order_id, expected) in cases {
            let err = handle("x", kind, json!({"order_id": order_id, "amount": 1})).unwrap_err();
            assert!(err.is_reject(), "{kind} {order_id}: {err}");
            assert_eq!(
                err.message(),
                format!("{expected} ({kind} event x)"),
                "{kind} {order_id}"
            );
        }
        assert_eq!(testing::kv_dump(), before, "nothing changed");
    }

    #[test]
    fn missing_or_malformed_fields_are_rejected_by_name() {
        testing::reset();
        create("e1", "o-1");
        let cases = [
            (
                "order.paid",
                json!({"amount": 1}),
                "missing required field `order_id`",
            ),
            (
                "order.shipped",
                json!({"order_id": null}),
                "missing required field `order_id`",
            ),
            (
                "order.created",
                json!({"order_id": "  ", "items": []}),
                "field `order_id` must be a non-empty string or an integer, not an empty string",
            ),
            (
                "order.delivered",
                json!({"order_id": 1.5}),
                "field `order_id` must be a non-empty string or an integer, not a number",
            ),
            (
                "order.cancelled",
                json!({"order_id": {"id": 1}}),
                "field `order_id` must be a non-empty string or an integer, not an object",
            ),
            (
                "order.created",
                json!({"order_id": "o-2", "items": "A-1"}),
                "field `items` must be an array, not a string",
            ),
            (
                "order.paid",
                json!({"order_id": "o-1"}),
                "missing required field `amount`",
            ),
            (
                "order.paid",
                json!({"order_id": "o-1", "amount": true}),
                "field `amount` must be a number or a string, not a boolean",
            ),
            (
                "order.paid",
                json!({"order_id": "o-1", "amount": 1, "payment_id": []}),
                "field `payment_id` must be a non-empty string or an integer, not an array",
            ),
            (
                "order.paid",
                json!([1, 2]),
                "data must be a JSON object, not an array",
            ),
        ];
        for (kind, data, expected) in cases {
            let err = handle("x", kind, data.clone()).unwrap_err();
            assert!(err.is_reject(), "{kind} {data}: {err}");
            assert_eq!(
                err.message(),
                format!("{kind} event x: {expected}"),
                "{kind} {data}"
            );
        }
        let mut not_json = event("y", "order.paid", json!({}));
        not_json.data = b"not json".to_vec();
        assert!(Orders::handle(not_json).unwrap_err().is_reject());
        assert_eq!(order("o-1").status, Status::Created, "nothing applied");
    }

    #[test]
    fn integer_ids_are_kept_as_digits_and_other_kinds_ignored() {
        testing::reset();
        apply("e1", "order.created", json!({"order_id": 42, "items": []}));
        apply(
            "e2",
            "order.paid",
            json!({"order_id": 42, "amount": 3, "payment_id": 7}),
        );
        let o = order("42");
        assert_eq!(
            (o.order_id.as_str(), o.payment_id.as_deref()),
            ("42", Some("7"))
        );

        let before = testing::kv_dump();
        for kind in ["order.refunded", "bill.created", "order"] {
            apply("e3", kind, json!({"order_id": 42}));
        }
        apply("e4", "user.created", json!("not even an object"));
        assert_eq!(testing::kv_dump(), before);
    }

    #[test]
    fn fields_of_ours_in_order_created_do_not_leak_into_the_state() {
        testing::reset();
        apply(
            "e1",
            "order.created",
            json!({"order_id": "o-1", "items": [], "status": "DELIVERED",
                   "history": [], "amount": 99, "note": "gift"}),
        );
        let o = order("o-1");
        assert_eq!((o.status, o.amount), (Status::Created, None));
        assert_eq!(
            o.fields,
            json!({"note": "gift"}).as_object().unwrap().clone()
        );
        assert_eq!(o.history.len(), 1);
    }

    #[test]
    fn the_same_events_rebuild_the_same_bytes() {
        let events = [
            (
                "e1",
                "order.created",
                json!({"order_id": "o-1", "total": 40,
                  "items": [{"sku": "A-1", "qty": 2}], "customer": {"name": "Ann", "id": "c-1"}}),
            ),
            (
                "e2",
                "order.paid",
                json!({"order_id": "o-1", "amount": 40, "currency": "EUR"}),
            ),
            (
                "e3",
                "order.shipped",
                json!({"tracking": "T-1", "order_id": "o-1"}),
            ),
        ];
        let run = || {
            testing::reset();
            for (id, kind, data) in &events {
                apply(id, kind, data.clone());
            }
            testing::kv_dump()
        };
        let live = run();
        assert_eq!(run(), live, "rebuilt from scratch");
        // Replayed over the live state: every event is already applied.
        for (id, kind, data) in &events {
            apply(id, kind, data.clone());
        }
        assert_eq!(testing::kv_dump(), live, "replayed over itself");
    }

    #[test]
    fn the_reducer_is_pure() {
        let created = event(
            "e1",
            "order.created",
            json!({"order_id": "o-1", "items": []}),
        );
        let Some((order_id, change)) = Change::parse(&created).unwrap() else {
            panic!("order.created is ours");
        };
        let Reduced::Changed(order) = reduce(None, &order_id, &created, &change).unwrap() else {
            panic!("a new order");
        };
        assert_eq!(
            reduce(Some(&order), &order_id, &created, &change).unwrap(),
            Reduced::Unchanged("event e1 is already applied to order o-1".into())
        );
        let paid = event("e2", "order.paid", json!({"order_id": "o-1", "amount": 1}));
        let (_, change) = Change::parse(&paid).unwrap().unwrap();
        assert!(reduce(None, "o-1", &paid, &change).unwrap_err().is_retry());
        let Reduced::Changed(paid_order) = reduce(Some(&order), "o-1", &paid, &change).unwrap()
        else {
            panic!("paid");
        };
        assert_eq!(paid_order.status, Status::Paid);
        assert_eq!(order.status, Status::Created, "the input is not touched");
    }
}
