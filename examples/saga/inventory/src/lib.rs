//! `inventory`: the stock keeper of the saga example (`examples/saga`). It
//! reserves units of a SKU for an order and gives them back when the order is
//! compensated, and it does so exactly once per order however often, and in
//! whatever order, the events arrive.
//!
//! The same plugin serves both configurations of the example: in
//! `choreography.toml` it reacts to what other services announce (`order.created`,
//! `payment.failed`); in `orchestration.toml` it obeys the `order-saga` plugin's
//! commands (`inventory.reserve`, `inventory.release`).
//!
//! # Config
//!
//! - `stock.<sku>`: the units of that SKU in stock before the first order
//!   (`"stock.widget" = "100"`). A SKU with no value has none.
//!
//! # Input
//!
//! - `order.created` (choreography) and `inventory.reserve` (orchestration):
//!   `{"order_id", "sku", "qty", "amount_cents", "card"}`, all required, `qty` at
//!   least 1. Reserves `qty` units of `sku` for the order.
//! - `payment.failed` (choreography) and `inventory.release` (orchestration):
//!   `{"order_id", "sku"?, ...}`. Gives back what the order holds. Without `sku`,
//!   the SKU the order reserved is looked up (`order:<order_id>`).
//!
//! Other kinds: no outputs. Data that is not a JSON object, or lacks a required
//! field, is rejected naming the field.
//!
//! # Output
//!
//! - `inventory.reserved`: the order (`order_id`, `sku`, `qty`, `amount_cents`,
//!   `card`): its units are held.
//! - `inventory.rejected`: the order plus `reason`: `"out_of_stock"`, or
//!   `"cancelled"` when a release for the order came first (a compensation that
//!   overtook a slow reservation): nothing is held. In choreography
//!   (`order.created`) an `out_of_stock` rejection also emits
//!   `order.cancelled {"order_id", "reason": "out_of_stock"}`.
//! - `inventory.released`: `{"order_id", "sku", "qty"}`, `qty` being the units
//!   given back (0 when the order held none). In choreography (`payment.failed`)
//!   followed by `order.cancelled {"order_id", "reason": "payment_failed"}`.
//!
//! # State (kv)
//!
//! - `sku:<sku>`: the SKU's [`Stock`], one JSON document:
//!   `{"available": n, "holds": {"<order_id>": qty}, "released": {"<order_id>":
//!   qty}, "rejected": {"<order_id>": "<reason>"}}`, created from the config on
//!   first use. `released` is the units each release gave back (0 for a
//!   tombstone: a release that found no hold); `rejected` (left out while
//!   empty) the reservations refused for lack of stock.
//! - `order:<order_id>`: the SKU the order reserved (first reservation wins), for
//!   releases that do not say.
//!
//! # Delivery rules
//!
//! Every event may arrive more than once, compensations may overtake what they
//! compensate, and replicas may share the store (Redis). So:
//!
//! - A SKU's document changes only by `compare-and-set` over the bytes the
//!   decision was made on: read, decide, try, and on a lost race read again.
//!   Each reservation and each release is one atomic transition of that
//!   document, so no crash or redelivery takes or returns stock twice, and
//!   `available` never goes below 0.
//! - Every decision about an order is recorded in the document (`holds`,
//!   `released`, `rejected`), and a redelivered event finds it there and repeats
//!   the very same outputs (the host gives them the same ids) without touching
//!   the stock. A refusal is recorded too: stock freed in between must not turn
//!   a redelivered "out of stock" into a reservation of an order already
//!   cancelled.
//! - A release for an order that holds nothing leaves a tombstone in `released`:
//!   a reservation arriving after it is refused (`cancelled`) and takes nothing.
//!   A reservation redelivered after its own release is refused the same way.
//!
//! The document keeps every order it has seen; a real service would move
//! settled orders out of it. The host's 1 MiB value limit bounds it at some ten
//! thousand orders per SKU.

use std::collections::BTreeMap;
use std::num::NonZeroU64;

use serde::de::{Error as _, Unexpected};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};
use switchboard_plugin::{Event, Failure, Output, Plugin, config, export, kv, log};

/// The plugin. Its logic is plain Rust: call `Inventory::handle` natively to
/// test it (state comes from `switchboard_plugin::testing`).
pub struct Inventory;

impl Plugin for Inventory {
    fn handle(event: Event) -> Result<Vec<Output>, Failure> {
        match event.kind.as_str() {
            "order.created" => reserve(&event, Flow::Choreography),
            "inventory.reserve" => reserve(&event, Flow::Orchestration),
            "payment.failed" => release(&event, Flow::Choreography),
            "inventory.release" => release(&event, Flow::Orchestration),
            _ => Ok(vec![]),
        }
    }
}

export!(Inventory);

/// How the event reached us: as a fact another service announced, or as a
/// command of the orchestrator. Choreography also announces what it means for
/// the order (`order.cancelled`), since no orchestrator will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Choreography,
    Orchestration,
}

/// The order, as `order.created` and `inventory.reserve` carry it and every
/// reservation reply repeats it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The order's id.
    #[serde(deserialize_with = "text")]
    pub order_id: String,
    /// What it buys.
    #[serde(deserialize_with = "text")]
    pub sku: String,
    /// How many units; at least 1.
    #[serde(deserialize_with = "units")]
    pub qty: u64,
    /// What it costs, for the payment step.
    pub amount_cents: u64,
    /// How it is paid, for the payment step.
    #[serde(deserialize_with = "text")]
    pub card: String,
}

impl Order {
    /// The order `event` carries; a missing or malformed field is a reject
    /// naming it.
    pub fn parse(event: &Event) -> Result<Order, Failure> {
        event.json()
    }

    /// The order as JSON, with `reason` when there is one.
    fn reply(&self, reason: Option<&str>) -> Value {
        let mut data = json!({
            "order_id": self.order_id,
            "sku": self.sku,
            "qty": self.qty,
            "amount_cents": self.amount_cents,
            "card": self.card,
        });
        if let (Some(reason), Some(map)) = (reason, data.as_object_mut()) {
            map.insert("reason".into(), reason.into());
        }
        data
    }
}

/// One SKU's stock, as stored under `sku:<sku>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    /// Units neither held nor sold: what the next reservation may take.
    pub available: u64,
    /// Units held, by order.
    #[serde(default)]
    pub holds: BTreeMap<String, u64>,
    /// Orders released, with the units each release gave back (0: a tombstone,
    /// the release found nothing held).
    #[serde(default)]
    pub released: BTreeMap<String, u64>,
    /// Reservations refused, with the reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rejected: BTreeMap<String, String>,
}

/// The kv key of a SKU's stock.
pub fn sku_key(sku: &str) -> String {
    format!("sku:{sku}")
}

/// The kv key recording which SKU an order reserved.
pub fn order_key(order_id: &str) -> String {
    format!("order:{order_id}")
}

/// Why a reservation is refused because a release came first.
pub const CANCELLED: &str = "cancelled";
/// Why a reservation is refused for lack of units.
pub const OUT_OF_STOCK: &str = "out_of_stock";

/// What a reservation came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reservation {
    /// The units are held; `new` unless an earlier delivery held them.
    Held { new: bool },
    /// Nothing is held, for `reason`; `new` unless decided before.
    Refused { reason: String, new: bool },
}

/// Decides a reservation of `order` against `stock`: the next stock, if it
/// changes, and the verdict. Pure.
fn decide_reservation(stock: &Stock, order: &Order) -> (Option<Stock>, Reservation) {
    let id = &order.order_id;
    if stock.holds.contains_key(id) {
        return (None, Reservation::Held { new: false });
    }
    if let Some(reason) = stock.rejected.get(id) {
        let reason = reason.clone();
        return (None, Reservation::Refused { reason, new: false });
    }
    if stock.released.contains_key(id) {
        let reason = CANCELLED.to_owned();
        return (None, Reservation::Refused { reason, new: false });
    }
    let mut next = stock.clone();
    if let Some(left) = stock.available.checked_sub(order.qty) {
        next.available = left;
        next.holds.insert(id.clone(), order.qty);
        (Some(next), Reservation::Held { new: true })
    } else {
        next.rejected.insert(id.clone(), OUT_OF_STOCK.to_owned());
        let reason = OUT_OF_STOCK.to_owned();
        (Some(next), Reservation::Refused { reason, new: true })
    }
}

fn reserve(event: &Event, flow: Flow) -> Result<Vec<Output>, Failure> {
    let order = Order::parse(event)?;
    let (id, sku) = (&order.order_id, &order.sku);
    // Where a release that does not name the SKU finds it; the first
    // reservation of the order wins.
    kv::set_if_absent(&order_key(id), sku.as_bytes(), None)?;
    let verdict = update_stock(sku, |stock| Ok(decide_reservation(stock, &order)))?;
    match verdict {
        Reservation::Held { new } => {
            if new {
                log::info(format!("order {id}: {} × {sku} held", order.qty));
            } else {
                log::debug(format!("order {id}: already held; reply repeated"));
            }
            Ok(vec![Output::json(
                "inventory.reserved",
                &order.reply(None),
            )?])
        }
        Reservation::Refused { reason, new } => {
            if new {
                log::info(format!(
                    "order {id}: {} × {sku} refused ({reason})",
                    order.qty
                ));
            } else {
                log::debug(format!(
                    "order {id}: already refused ({reason}); reply repeated"
                ));
            }
            let mut outputs = vec![Output::json(
                "inventory.rejected",
                &order.reply(Some(&reason)),
            )?];
            // A `cancelled` order was cancelled by whoever released it.
            if flow == Flow::Choreography && reason == OUT_OF_STOCK {
                outputs.push(Output::json(
                    "order.cancelled",
                    &json!({ "order_id": id, "reason": OUT_OF_STOCK }),
                )?);
            }
            Ok(outputs)
        }
    }
}

/// A release, as `payment.failed` and `inventory.release` carry it.
#[derive(Debug, Deserialize)]
struct ReleaseOf {
    #[serde(deserialize_with = "text")]
    order_id: String,
    /// Looked up from the reservation when absent (or null).
    #[serde(default, deserialize_with = "some_text")]
    sku: Option<String>,
}

/// What a release came to: the units given back, and whether this delivery
/// gave them (else an earlier one did).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Release {
    qty: u64,
    new: bool,
}

/// Decides a release of order `id` against `stock`. Pure.
fn decide_release(stock: &Stock, id: &str) -> (Option<Stock>, Release) {
    if let Some(&qty) = stock.released.get(id) {
        return (None, Release { qty, new: false });
    }
    let mut next = stock.clone();
    let qty = next.holds.remove(id).unwrap_or(0);
    next.available = next.available.saturating_add(qty);
    next.released.insert(id.to_owned(), qty);
    (Some(next), Release { qty, new: true })
}

fn release(event: &Event, flow: Flow) -> Result<Vec<Output>, Failure> {
    let ReleaseOf { order_id: id, sku } = event.json()?;
    let sku = match sku {
        Some(sku) => sku,
        None => reserved_sku(event, &id)?,
    };
    let verdict = update_stock(&sku, |stock| Ok(decide_release(stock, &id)))?;
    match verdict {
        Release { qty: 0, new: true } => log::info(format!(
            "order {id}: nothing held of {sku}; tombstone left so a late reservation takes nothing"
        )),
        Release { qty, new: true } => log::info(format!("order {id}: {qty} × {sku} given back")),
        Release { new: false, .. } => {
            log::debug(format!("order {id}: already released; reply repeated"));
        }
    }
    let mut outputs = vec![Output::json(
        "inventory.released",
        &json!({ "order_id": id, "sku": sku, "qty": verdict.qty }),
    )?];
    if flow == Flow::Choreography {
        outputs.push(Output::json(
            "order.cancelled",
            &json!({ "order_id": id, "reason": "payment_failed" }),
        )?);
    }
    Ok(outputs)
}

/// The SKU order `id` reserved, for a release that does not say.
fn reserved_sku(event: &Event, id: &str) -> Result<String, Failure> {
    match kv::get(&order_key(id))? {
        Some(raw) => String::from_utf8(raw)
            .map_err(|_| Failure::reject(format!("stored SKU of order {id} is not text"))),
        None => Err(Failure::reject(format!(
            "{} event {}: missing required field `sku` (order {id} reserved nothing here to look it up)",
            event.kind, event.id
        ))),
    }
}

/// How many times a change reads the stock again after losing a race for it
/// before it gives up and lets the event be retried later.
const MAX_STOCK_RACES: usize = 16;

/// Changes `sku`'s stock by `decide`: read (or start from the config), decide,
/// compare-and-set over the bytes read, and again if another writer changed the
/// stock in between. A decision that changes nothing writes nothing.
fn update_stock<T>(
    sku: &str,
    decide: impl Fn(&Stock) -> Result<(Option<Stock>, T), Failure>,
) -> Result<T, Failure> {
    let key = sku_key(sku);
    for _ in 0..MAX_STOCK_RACES {
        let raw = kv::get(&key)?;
        let stock = match &raw {
            Some(raw) => serde_json::from_slice(raw).map_err(|e| {
                Failure::reject(format!(
                    "stored stock of {sku} is not a stock document: {e}"
                ))
            })?,
            None => Stock {
                available: initial_stock(sku)?,
                ..Stock::default()
            },
        };
        let (next, verdict) = decide(&stock)?;
        let Some(next) = next else {
            return Ok(verdict);
        };
        let bytes = serde_json::to_vec(&next)
            .map_err(|e| Failure::reject(format!("stock of {sku} cannot be stored: {e}")))?;
        if kv::compare_and_set(&key, raw.as_deref(), &bytes, None)? {
            return Ok(verdict);
        }
        log::debug(format!(
            "stock of {sku} changed while deciding; reading it again"
        ));
    }
    Err(Failure::retry(format!(
        "stock of {sku} kept changing; trying again later"
    )))
}

/// The units of `sku` the config starts with (`stock.<sku>`; none without one).
fn initial_stock(sku: &str) -> Result<u64, Failure> {
    let key = format!("stock.{sku}");
    match config::get(&key) {
        None => Ok(0),
        Some(value) => value.trim().parse().map_err(|_| {
            Failure::reject(format!(
                "config {key} = {value:?} is not a whole number of units"
            ))
        }),
    }
}

/// A required string field, trimmed, that is not blank.
fn text<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    let text = String::deserialize(de)?.trim().to_owned();
    let blank = D::Error::invalid_value(Unexpected::Str(&text), &"a non-empty string");
    (!text.is_empty()).then_some(text).ok_or(blank)
}

/// An optional [`text`] field: absent and null are `None`.
fn some_text<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Text(#[serde(deserialize_with = "text")] String);
    Ok(Option::<Text>::deserialize(de)?.map(|Text(text)| text))
}

/// A number of units: a whole number, at least 1.
fn units<'de, D: Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    NonZeroU64::deserialize(de).map(NonZeroU64::get)
}

// Native only: the tests run on the SDK's in-memory host.
#[cfg(test)]
#[cfg(not(target_arch = "wasm32"))]
mod tests;
