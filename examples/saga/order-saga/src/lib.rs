//! `order-saga`: the orchestrator of the saga example (`examples/saga`,
//! `orchestration.toml`). For each order it runs the steps — reserve the stock,
//! charge the card — by sending commands to `inventory` and `payment`, waits for
//! their replies, gives each step a deadline, and when a step fails or never
//! answers, undoes what was done, in reverse order.
//!
//! The saga's deadline is a delayed output: `saga.timeout` is published with the
//! step's commands, [`Output::after`] the configured `step_timeout`, and the host
//! keeps it durably until then. When it comes back, the saga either has moved
//! on (the timeout no longer matters) or is still waiting (compensate).
//!
//! # Config
//!
//! - `step_timeout` (default `"30s"`): how long a step may take, as a whole
//!   number with a unit: `ms`, `s`, `m` or `h` (`"500ms"`, `"10s"`, `"2m"`).
//!
//! # Input and output
//!
//! The order is `{"order_id", "sku", "qty", "amount_cents", "card"}`, all
//! required. Every reply carries `order_id`.
//!
//! | input | saga | outputs |
//! |---|---|---|
//! | `order.created` (the order) | none → `reserving` | `inventory.reserve` (the order), `saga.timeout {"order_id", "step": "reserving"}` after `step_timeout` |
//! | `inventory.reserved` | `reserving` → `charging` | `payment.charge` (the order), `saga.timeout {"order_id", "step": "charging"}` after `step_timeout` |
//! | `inventory.rejected {"reason"?}` | `reserving` → `cancelled` | `order.cancelled {"order_id", "reason"}` (the rejection's, else `"rejected"`) |
//! | `payment.succeeded` | `charging` → `confirmed` | `order.confirmed {"order_id"}` |
//! | `payment.failed` | `charging` → `cancelled` | `inventory.release` (the order), `order.cancelled {"order_id", "reason": "payment_failed"}` |
//! | `saga.timeout {"step": "reserving"}` | `reserving` → `cancelled` | `inventory.release` (the order), `order.cancelled {"order_id", "reason": "timeout"}` |
//! | `saga.timeout {"step": "charging"}` | `charging` → `cancelled` | `payment.refund {"order_id"}`, `inventory.release` (the order), `order.cancelled {"order_id", "reason": "timeout"}` |
//!
//! A reply or timeout for a saga in any other state (late, or a duplicate) is
//! logged and changes nothing: no outputs. A reply or timeout for an order with
//! no saga is rejected (`no saga for order <id>: …`), so it is dead-lettered
//! saying so. `inventory.released` and `payment.refunded` (the compensations'
//! receipts) and other kinds: no outputs.
//!
//! Compensations are safe to send for a step whose command may not even have
//! been handled yet: `inventory` and `payment` leave a tombstone, and the late
//! command is then refused (`cancelled`) and takes nothing.
//!
//! # State (kv)
//!
//! - `saga:<order_id>`: the [`Saga`], JSON `{"state", "order", "by", "reason"?}`:
//!   where it stands, the order, the id of the event that made the last
//!   transition, and why it was cancelled.
//!
//! # Delivery rules
//!
//! - The saga is created with `set-if-absent` and moved with `compare-and-set`
//!   over the bytes the decision was made on; on a lost race it is read again
//!   and the decision made again. So each transition happens once, on any
//!   number of replicas.
//! - An event delivered again that finds `by` equal to its own id made the last
//!   transition already: it emits that transition's outputs again (same kinds,
//!   same data, same order: the host gives them the same ids) and changes
//!   nothing. Any other event that finds its step done is late or a duplicate.
//! - A second `order.created` for an order with a saga (another event id) is a
//!   duplicate: logged, no outputs.

use std::fmt;
use std::num::NonZeroU64;
use std::time::Duration;

use serde::de::{Error as _, Unexpected};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;
use switchboard_plugin::{Event, Failure, Output, Plugin, config, export, kv, log};

/// The plugin. Its logic is plain Rust: call `OrderSaga::handle` natively to
/// test it (state comes from `switchboard_plugin::testing`), or [`decide`]
/// alone.
pub struct OrderSaga;

impl Plugin for OrderSaga {
    fn handle(event: Event) -> Result<Vec<Output>, Failure> {
        match Move::parse(&event)? {
            Some((order_id, step)) => run(&event, &order_id, &step),
            None => {
                if matches!(
                    event.kind.as_str(),
                    "inventory.released" | "payment.refunded"
                ) {
                    log::debug(format!("{} is a receipt; nothing to do", event.kind));
                }
                Ok(vec![])
            }
        }
    }
}

export!(OrderSaga);

/// The order a saga runs for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The order's id.
    #[serde(deserialize_with = "text")]
    pub order_id: String,
    /// What it buys.
    #[serde(deserialize_with = "text")]
    pub sku: String,
    /// How many units; at least 1.
    #[serde(deserialize_with = "at_least_one")]
    pub qty: u64,
    /// What it costs.
    pub amount_cents: u64,
    /// How it is paid.
    #[serde(deserialize_with = "text")]
    pub card: String,
}

/// Where a saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// `inventory.reserve` sent; waiting for the stock.
    Reserving,
    /// `payment.charge` sent; waiting for the money.
    Charging,
    /// Both steps done: the end.
    Confirmed,
    /// A step failed or timed out, and what was done is undone: the end.
    Cancelled,
}

impl State {
    /// The state as it is stored, logged and named in `saga.timeout`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Reserving => "reserving",
            State::Charging => "charging",
            State::Confirmed => "confirmed",
            State::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A saga, as stored under `saga:<order_id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saga {
    /// Where it stands.
    pub state: State,
    /// The order, as `order.created` gave it.
    pub order: Order,
    /// The id of the event that made the last transition.
    pub by: String,
    /// Why it was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The kv key of an order's saga.
pub fn saga_key(order_id: &str) -> String {
    format!("saga:{order_id}")
}

/// What an event asks of a saga: to start, or to move on from a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Move {
    /// `order.created`.
    Start(Order),
    /// `inventory.reserved`.
    Reserved,
    /// `inventory.rejected`, with its reason.
    Rejected(String),
    /// `payment.succeeded`.
    Succeeded,
    /// `payment.failed`.
    Failed,
    /// `saga.timeout`, of the step it guards (`Reserving` or `Charging`).
    Timeout(State),
}

impl Move {
    /// The order id and the move `event` carries; `None` for kinds that move no
    /// saga. Malformed data is a reject naming the field.
    pub fn parse(event: &Event) -> Result<Option<(String, Move)>, Failure> {
        let moved = match event.kind.as_str() {
            "order.created" => {
                let order: Order = event.json()?;
                (order.order_id.clone(), Move::Start(order))
            }
            "inventory.reserved" => (event.json::<Reply>()?.order_id, Move::Reserved),
            "inventory.rejected" => {
                let Rejection { order_id, reason } = event.json()?;
                let reason = reason.unwrap_or_else(|| "rejected".to_owned());
                (order_id, Move::Rejected(reason))
            }
            "payment.succeeded" => (event.json::<Reply>()?.order_id, Move::Succeeded),
            "payment.failed" => (event.json::<Reply>()?.order_id, Move::Failed),
            "saga.timeout" => {
                let Timeout { order_id, step } = event.json()?;
                let step = match step {
                    Step::Reserving => State::Reserving,
                    Step::Charging => State::Charging,
                };
                (order_id, Move::Timeout(step))
            }
            _ => return Ok(None),
        };
        Ok(Some(moved))
    }

    /// The event kind that carries this move.
    pub fn kind(&self) -> &'static str {
        match self {
            Move::Start(_) => "order.created",
            Move::Reserved => "inventory.reserved",
            Move::Rejected(_) => "inventory.rejected",
            Move::Succeeded => "payment.succeeded",
            Move::Failed => "payment.failed",
            Move::Timeout(_) => "saga.timeout",
        }
    }

    /// The state a saga must be in for this move to apply: the step it answers.
    fn answers(&self) -> Option<State> {
        match self {
            Move::Start(_) => None,
            Move::Reserved | Move::Rejected(_) => Some(State::Reserving),
            Move::Succeeded | Move::Failed => Some(State::Charging),
            Move::Timeout(step) => Some(*step),
        }
    }

    /// Where the move takes the saga, and why when it cancels it.
    fn target(&self) -> (State, Option<String>) {
        match self {
            Move::Start(_) => (State::Reserving, None),
            Move::Reserved => (State::Charging, None),
            Move::Rejected(reason) => (State::Cancelled, Some(reason.clone())),
            Move::Succeeded => (State::Confirmed, None),
            Move::Failed => (State::Cancelled, Some(PAYMENT_FAILED.to_owned())),
            Move::Timeout(_) => (State::Cancelled, Some(TIMEOUT.to_owned())),
        }
    }

    /// Whether the move's outputs start a step, and so a timer.
    fn starts_a_step(&self) -> bool {
        matches!(self, Move::Start(_) | Move::Reserved)
    }

    /// The outputs of the transition this move makes on the saga of `order`:
    /// the next step's command and its timer, or the compensations (the last
    /// step first) and the verdict. A function of the move and the order only,
    /// so a redelivered event gets the very same outputs.
    pub fn outputs(&self, order: &Order, step_timeout: Duration) -> Result<Vec<Output>, Failure> {
        let id = &order.order_id;
        let timer = |step: State| {
            Output::json(
                "saga.timeout",
                &json!({ "order_id": id, "step": step.as_str() }),
            )
            .map(|out| out.after(step_timeout))
        };
        let cancelled = |reason: &str| {
            Output::json(
                "order.cancelled",
                &json!({ "order_id": id, "reason": reason }),
            )
        };
        let release = || Output::json("inventory.release", order);
        Ok(match self {
            Move::Start(_) => vec![
                Output::json("inventory.reserve", order)?,
                timer(State::Reserving)?,
            ],
            Move::Reserved => vec![
                Output::json("payment.charge", order)?,
                timer(State::Charging)?,
            ],
            Move::Rejected(reason) => vec![cancelled(reason)?],
            Move::Succeeded => vec![Output::json("order.confirmed", &json!({ "order_id": id }))?],
            Move::Failed => vec![release()?, cancelled(PAYMENT_FAILED)?],
            Move::Timeout(State::Charging) => vec![
                Output::json("payment.refund", &json!({ "order_id": id }))?,
                release()?,
                cancelled(TIMEOUT)?,
            ],
            Move::Timeout(_) => vec![release()?, cancelled(TIMEOUT)?],
        })
    }
}

/// A reply to a step: `inventory.reserved`, `payment.succeeded`,
/// `payment.failed`.
#[derive(Debug, Deserialize)]
struct Reply {
    #[serde(deserialize_with = "text")]
    order_id: String,
}

/// `inventory.rejected`.
#[derive(Debug, Deserialize)]
struct Rejection {
    #[serde(deserialize_with = "text")]
    order_id: String,
    /// `"rejected"` when absent (or null).
    #[serde(default, deserialize_with = "optional_text")]
    reason: Option<String>,
}

/// `saga.timeout`.
#[derive(Debug, Deserialize)]
struct Timeout {
    #[serde(deserialize_with = "text")]
    order_id: String,
    step: Step,
}

/// The steps a `saga.timeout` may guard.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Step {
    Reserving,
    Charging,
}

/// Why a saga is cancelled when the payment fails.
pub const PAYMENT_FAILED: &str = "payment_failed";
/// Why a saga is cancelled when a step does not answer in time.
pub const TIMEOUT: &str = "timeout";

/// What an event does to a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Store this saga, then emit the move's outputs.
    Transition(Saga),
    /// The event made this transition already (a redelivery): emit its outputs
    /// again for this order, store nothing.
    Repeat(Order),
    /// Nothing to do (a duplicate, a late reply, a timeout that no longer
    /// matters); why.
    Nothing(String),
}

/// The saga pattern's heart: what event `event_id`, carrying `step` for order
/// `order_id`, does to its saga as it stands (`None`: no saga). Pure.
pub fn decide(
    current: Option<&Saga>,
    event_id: &str,
    order_id: &str,
    step: &Move,
) -> Result<Decision, Failure> {
    let kind = step.kind();
    let Some(saga) = current else {
        return match step {
            Move::Start(order) => Ok(Decision::Transition(Saga {
                state: State::Reserving,
                order: order.clone(),
                by: event_id.to_owned(),
                reason: None,
            })),
            _ => Err(Failure::reject(format!(
                "no saga for order {order_id}: {kind} {event_id} answers a saga that was never started"
            ))),
        };
    };
    if saga.by == event_id {
        return Ok(Decision::Repeat(saga.order.clone()));
    }
    let state = saga.state;
    match step.answers() {
        None => Ok(Decision::Nothing(format!(
            "order {order_id} already has a saga ({state}); duplicate {kind} {event_id} ignored"
        ))),
        Some(step_state) if step_state != state => Ok(Decision::Nothing(match step {
            Move::Timeout(_) => format!(
                "timeout of step {step_state} for order {order_id} no longer matters: the saga is {state}"
            ),
            _ => format!(
                "late reply {kind} {event_id} for order {order_id} changes nothing: the saga is {state}"
            ),
        })),
        Some(_) => {
            let (state, reason) = step.target();
            Ok(Decision::Transition(Saga {
                state,
                order: saga.order.clone(),
                by: event_id.to_owned(),
                reason,
            }))
        }
    }
}

/// How many times an event reads the saga again after losing a race for it
/// before it gives up and lets the event be retried later.
const MAX_SAGA_RACES: usize = 16;

/// Applies `step` to the stored saga: read, decide, write (set-if-absent or
/// compare-and-set over the bytes read), and again on a lost race.
fn run(event: &Event, order_id: &str, step: &Move) -> Result<Vec<Output>, Failure> {
    // Read before any state changes, so that a bad value rejects the event
    // having done nothing. Only the moves that start a step need it.
    let step_timeout = if step.starts_a_step() {
        step_timeout()?
    } else {
        Duration::ZERO
    };
    let key = saga_key(order_id);
    for _ in 0..MAX_SAGA_RACES {
        let raw = kv::get(&key)?;
        let current = raw
            .as_deref()
            .map(|raw| {
                serde_json::from_slice::<Saga>(raw).map_err(|e| {
                    Failure::reject(format!(
                        "stored saga of order {order_id} is not a saga: {e}"
                    ))
                })
            })
            .transpose()?;
        match decide(current.as_ref(), &event.id, order_id, step)? {
            Decision::Transition(next) => {
                let bytes = serde_json::to_vec(&next).map_err(|e| {
                    Failure::reject(format!("saga of order {order_id} cannot be stored: {e}"))
                })?;
                let written = match raw.as_deref() {
                    None => kv::set_if_absent(&key, &bytes, None)?,
                    Some(raw) => kv::compare_and_set(&key, Some(raw), &bytes, None)?,
                };
                if !written {
                    log::debug(format!(
                        "saga of order {order_id} changed while deciding; reading it again"
                    ));
                    continue;
                }
                let from = current.map_or("none", |saga| saga.state.as_str());
                log::info(format!(
                    "order {order_id}: {from} → {} on {}",
                    next.state,
                    step.kind()
                ));
                return step.outputs(&next.order, step_timeout);
            }
            Decision::Repeat(order) => {
                log::debug(format!(
                    "event {} made this transition already; outputs repeated",
                    event.id
                ));
                return step.outputs(&order, step_timeout);
            }
            Decision::Nothing(why) => {
                log::info(why);
                return Ok(vec![]);
            }
        }
    }
    Err(Failure::retry(format!(
        "saga of order {order_id} kept changing; trying again later"
    )))
}

/// `step_timeout` from the config (default 30 s).
fn step_timeout() -> Result<Duration, Failure> {
    let value = config::get_or("step_timeout", "30s");
    parse_duration(&value).ok_or_else(|| {
        Failure::reject(format!(
            "config step_timeout = {value:?} is not a duration above zero such as \"30s\", \"500ms\" or \"2m\""
        ))
    })
}

/// A whole number with a unit (`ms`, `s`, `m`, `h`), above zero: `"500ms"`,
/// `"30s"`, `"2m"`. `None` for anything else.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit())?;
    let n: u64 = text[..digits].parse().ok()?;
    let duration = match text[digits..].trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (!duration.is_zero()).then_some(duration)
}

/// Reads a non-blank string and trims it (`order_id`, `sku`, `card`, `reason`).
fn text<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    let text = String::deserialize(de)?.trim().to_owned();
    let blank = D::Error::invalid_value(Unexpected::Str(&text), &"a non-empty string");
    (!text.is_empty()).then_some(text).ok_or(blank)
}

/// Reads an optional field that, when there (and not null), is a [`text`].
fn optional_text<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Given(#[serde(deserialize_with = "text")] String);
    Ok(Option::<Given>::deserialize(de)?.map(|Given(reason)| reason))
}

/// Reads a whole number of units, 1 or more.
fn at_least_one<'de, D: Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    NonZeroU64::deserialize(de).map(NonZeroU64::get)
}

// Native only: the tests run on the SDK's in-memory host.
#[cfg(test)]
#[cfg(not(target_arch = "wasm32"))]
mod tests;
