//! `payment`: the card-payment step of the saga example (`examples/saga`). It
//! charges an order at most once, refunds it on request, and refuses a charge
//! that arrives after the refund meant to undo it.
//!
//! The same plugin serves both configurations of the example: in
//! `choreography.toml` it charges what `inventory` announces it reserved
//! (`inventory.reserved`); in `orchestration.toml` it obeys the `order-saga`
//! plugin's commands (`payment.charge`, `payment.refund`).
//!
//! The card provider is simulated by the order's `card`: `"declined"` is
//! declined, `"no-reply"` never answers (nothing is emitted: the step a saga
//! must time out), anything else is charged.
//!
//! # Config
//!
//! - `max_amount_cents` (default `"100000"`): larger charges are declined.
//!
//! # Input
//!
//! - `inventory.reserved` (choreography) and `payment.charge` (orchestration):
//!   `{"order_id", "amount_cents", "card", "sku", "qty"}`, all required (`sku` and
//!   `qty` so that a failure tells `inventory` what to release).
//! - `payment.refund` (orchestration compensation): `{"order_id"}`.
//!
//! Other kinds: no outputs. Data that is not a JSON object, or lacks a required
//! field, is rejected naming the field.
//!
//! # Output
//!
//! - `payment.succeeded`: `{"order_id", "amount_cents"}`. In choreography
//!   (`inventory.reserved`) followed by `order.confirmed {"order_id"}`.
//! - `payment.failed`: `{"order_id", "sku", "qty", "reason"}`, `reason` being
//!   `"declined"` (the card, or an amount over `max_amount_cents`) or
//!   `"cancelled"` (a refund came first).
//! - `payment.refunded`: `{"order_id", "amount_cents"}`, the amount given back (0
//!   when nothing had been charged).
//!
//! # State (kv)
//!
//! - `charge:<order_id>`: the order's [`Charge`], JSON
//!   `{"state": "charged" | "refunded" | "void", "amount_cents": n}`. `void` is a
//!   tombstone: a refund that found nothing charged. A declined charge stores
//!   nothing.
//!
//! # Delivery rules
//!
//! Every event may arrive more than once, a refund may overtake the charge it
//! undoes, and replicas may share the store (Redis). So:
//!
//! - A charge is written only with `set-if-absent`, and a refund only with
//!   `compare-and-set` over the charge it read (or `set-if-absent` of the
//!   tombstone): of two racing writers one wins, the other reads again and
//!   decides again. The payment is never taken twice.
//! - A charged order answers `payment.succeeded` to every later charge of it (a
//!   redelivery, or a command sent again); a refunded or voided order answers
//!   `payment.failed` (`cancelled`): the refund came first, the money is not
//!   taken. A declined charge is declined again, from the same data.
//! - A refund delivered again answers the same `payment.refunded` again.
//!
//! The replies of a redelivered event are the same as the first time, so the
//! host gives them the same ids. (One exception: changing `max_amount_cents`
//! between two deliveries of a charge that nothing stored may change the verdict.)

use serde::de::{Error as _, Unexpected};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;
use switchboard_plugin::{Event, Failure, Output, Plugin, config, export, kv, log};

/// The plugin. Its logic is plain Rust: call `Payment::handle` natively to test
/// it (state comes from `switchboard_plugin::testing`).
pub struct Payment;

impl Plugin for Payment {
    fn handle(event: Event) -> Result<Vec<Output>, Failure> {
        match event.kind.as_str() {
            "inventory.reserved" => charge(&event, Flow::Choreography),
            "payment.charge" => charge(&event, Flow::Orchestration),
            "payment.refund" => refund(&event),
            _ => Ok(vec![]),
        }
    }
}

export!(Payment);

/// How the event reached us: as a fact another service announced, or as a
/// command of the orchestrator. Choreography also announces what a payment
/// means for the order (`order.confirmed`), since no orchestrator will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Choreography,
    Orchestration,
}

/// The order, as a charge carries it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Order {
    /// The order's id.
    #[serde(deserialize_with = "text")]
    pub order_id: String,
    /// What it buys, for a failure's release.
    #[serde(deserialize_with = "text")]
    pub sku: String,
    /// How many units, for a failure's release.
    pub qty: u64,
    /// What to charge.
    pub amount_cents: u64,
    /// The card: `"declined"`, `"no-reply"`, or anything else to succeed.
    #[serde(deserialize_with = "text")]
    pub card: String,
}

impl Order {
    /// The order `event` carries; a missing or malformed field is a reject
    /// naming it.
    pub fn parse(event: &Event) -> Result<Order, Failure> {
        event.json()
    }
}

/// A refund, as `payment.refund` carries it.
#[derive(Debug, Deserialize)]
struct Refund {
    #[serde(deserialize_with = "text")]
    order_id: String,
}

/// Where an order's payment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeState {
    /// The money is taken.
    Charged,
    /// It was taken and given back.
    Refunded,
    /// A refund came before any charge: none may happen now.
    Void,
}

impl ChargeState {
    /// The state as it is stored and logged.
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeState::Charged => "charged",
            ChargeState::Refunded => "refunded",
            ChargeState::Void => "void",
        }
    }
}

/// An order's payment, as stored under `charge:<order_id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// Where it stands.
    pub state: ChargeState,
    /// The amount charged (0 for `void`).
    pub amount_cents: u64,
}

/// The kv key of an order's payment.
pub fn charge_key(order_id: &str) -> String {
    format!("charge:{order_id}")
}

/// The card the simulated provider never answers for.
pub const NO_REPLY: &str = "no-reply";
/// The card the simulated provider declines.
pub const DECLINED: &str = "declined";

/// How many times a payment reads its record again after losing a race for it
/// before it gives up and lets the event be retried later.
const MAX_RACES: usize = 16;

fn charge(event: &Event, flow: Flow) -> Result<Vec<Output>, Failure> {
    let order = Order::parse(event)?;
    let id = &order.order_id;
    if order.card == NO_REPLY {
        log::warn(format!(
            "order {id}: the card provider does not answer; no reply sent"
        ));
        return Ok(vec![]);
    }
    let max = max_amount()?;
    let key = charge_key(id);
    for _ in 0..MAX_RACES {
        // Charged wins over everything: whatever the config says now, the
        // money is taken and the answer stays what it was.
        let current = read_charge(&key)?;
        if let Some(charge) = current.filter(|c| c.state == ChargeState::Charged) {
            log::debug(format!("order {id}: already charged; reply repeated"));
            return succeeded(&order, charge.amount_cents, flow);
        }
        if order.card == DECLINED || order.amount_cents > max {
            log::info(format!(
                "order {id}: {} cents on card {:?} declined",
                order.amount_cents, order.card
            ));
            return failed(&order, "declined");
        }
        if let Some(charge) = current {
            log::info(format!(
                "order {id}: payment is {}, a refund came first; not charged",
                charge.state.as_str()
            ));
            return failed(&order, "cancelled");
        }
        let charged = Charge {
            state: ChargeState::Charged,
            amount_cents: order.amount_cents,
        };
        if kv::set_if_absent(&key, &bytes(&key, &charged)?, None)? {
            log::info(format!("order {id}: {} cents charged", order.amount_cents));
            return succeeded(&order, order.amount_cents, flow);
        }
        log::debug(format!(
            "order {id}: payment written meanwhile; reading it again"
        ));
    }
    Err(retry(id))
}

fn succeeded(order: &Order, amount_cents: u64, flow: Flow) -> Result<Vec<Output>, Failure> {
    let id = &order.order_id;
    let mut outputs = vec![Output::json(
        "payment.succeeded",
        &json!({ "order_id": id, "amount_cents": amount_cents }),
    )?];
    if flow == Flow::Choreography {
        outputs.push(Output::json("order.confirmed", &json!({ "order_id": id }))?);
    }
    Ok(outputs)
}

fn failed(order: &Order, reason: &str) -> Result<Vec<Output>, Failure> {
    Ok(vec![Output::json(
        "payment.failed",
        &json!({
            "order_id": order.order_id,
            "sku": order.sku,
            "qty": order.qty,
            "reason": reason,
        }),
    )?])
}

fn refund(event: &Event) -> Result<Vec<Output>, Failure> {
    let Refund { order_id: id } = event.json()?;
    let key = charge_key(&id);
    for _ in 0..MAX_RACES {
        let raw = kv::get(&key)?;
        let current = raw
            .as_deref()
            .map(|raw| parse_charge(&key, raw))
            .transpose()?;
        let refunded = match current {
            Some(charge) if charge.state == ChargeState::Charged => {
                let next = Charge {
                    state: ChargeState::Refunded,
                    ..charge
                };
                if !kv::compare_and_set(&key, raw.as_deref(), &bytes(&key, &next)?, None)? {
                    continue;
                }
                log::info(format!(
                    "order {id}: {} cents refunded",
                    charge.amount_cents
                ));
                charge.amount_cents
            }
            Some(charge) => {
                log::debug(format!(
                    "order {id}: already {}; reply repeated",
                    charge.state.as_str()
                ));
                charge.amount_cents
            }
            None => {
                let void = Charge {
                    state: ChargeState::Void,
                    amount_cents: 0,
                };
                if !kv::set_if_absent(&key, &bytes(&key, &void)?, None)? {
                    continue;
                }
                log::info(format!(
                    "order {id}: nothing charged yet; payment voided so a late charge is refused"
                ));
                0
            }
        };
        return Ok(vec![Output::json(
            "payment.refunded",
            &json!({ "order_id": id, "amount_cents": refunded }),
        )?]);
    }
    Err(retry(&id))
}

fn read_charge(key: &str) -> Result<Option<Charge>, Failure> {
    kv::get(key)?.map(|raw| parse_charge(key, &raw)).transpose()
}

fn parse_charge(key: &str, raw: &[u8]) -> Result<Charge, Failure> {
    serde_json::from_slice(raw)
        .map_err(|e| Failure::reject(format!("stored {key} is not a payment record: {e}")))
}

fn bytes(key: &str, charge: &Charge) -> Result<Vec<u8>, Failure> {
    serde_json::to_vec(charge).map_err(|e| Failure::reject(format!("{key} cannot be stored: {e}")))
}

fn retry(order_id: &str) -> Failure {
    Failure::retry(format!(
        "payment of order {order_id} kept changing; trying again later"
    ))
}

/// `max_amount_cents` from the config.
fn max_amount() -> Result<u64, Failure> {
    let value = config::get_or("max_amount_cents", "100000");
    value.trim().parse().map_err(|_| {
        Failure::reject(format!(
            "config max_amount_cents = {value:?} is not a whole number of cents"
        ))
    })
}

/// Reads a string that must hold more than whitespace; trims it.
fn text<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    let text = String::deserialize(de)?.trim().to_owned();
    let blank = D::Error::invalid_value(Unexpected::Str(&text), &"a non-empty string");
    (!text.is_empty()).then_some(text).ok_or(blank)
}

// Native only: the tests run on the SDK's in-memory host.
#[cfg(test)]
#[cfg(not(target_arch = "wasm32"))]
mod tests;
