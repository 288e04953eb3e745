//! `billing`: keeps the state of bills and turns payments into bill events.
//!
//! # Input
//!
//! - `bill.created`: `{"bill_id", "amount"?, "currency"?, "customer"?, ...}`;
//!   `bill_id` (string or integer) is required, every other field is kept with the
//!   bill. Records the bill with status `open`; a bill id already known is left as
//!   it is (a redelivery, or a producer repeating itself). No output.
//! - `payment.success` / `payment.failed`: `{"bill_id", "payment_id", "amount"?,
//!   "currency"?, "reason"?}`; `bill_id` and `payment_id` are required. Sets the
//!   bill's status to `paid` / `payment_failed` and emits one output.
//!
//! Other kinds: no outputs. Data that is not a JSON object, or lacks a required
//! field, is rejected naming the field.
//!
//! # Output
//!
//! `bill.paid` / `bill.payment_failed`:
//! `{"bill_id", "payment_id", "amount", "currency", "customer", "status"}`, plus
//! `"reason"` for `bill.payment_failed`. `amount` and `currency` come from the
//! payment, else from the bill; `customer` from the bill (else the payment), so a
//! notification plugin downstream has a recipient.
//!
//! # State (kv)
//!
//! - `bill:<bill_id>`: the bill as JSON (the `bill.created` data, plus `status`,
//!   `last_payment_id`, `failure_reason`).
//! - `payment:<payment_id>`: the claim on that payment, JSON:
//!   `{"event": "<id of the event that applies it>", "decided": "applied" | "ignored"}`
//!   (`decided` missing while the event is being applied).
//!
//! # Delivery rules
//!
//! Several replicas may run billing at once on shared state (Redis), so every
//! decision is made by the store, never by a read followed by a write:
//!
//! - A payment for a bill not known yet is retried (`bill <id> not known yet`):
//!   events from different producers arrive out of order.
//! - The first event to claim a payment id (`set-if-absent` on `payment:<id>`)
//!   is the only one that may apply it. Any *other* event carrying the same
//!   payment id is a duplicate payment (the provider sent it twice, on this
//!   replica or another): nothing changes, nothing is emitted.
//! - The bill is changed with `compare-and-set`: when two payments of one bill
//!   race, one writes, the other reads the new bill and decides again.
//! - The claiming event delivered again (redelivered after a crash, say) repeats
//!   what it decided: the same output when it applied the payment (the host gives
//!   it the same output id, so consumers dedupe), nothing when it ignored it. A
//!   claim left undecided by a crash is decided by the redelivery.
//! - A `paid` bill ignores a later `payment.failed`, and a second, different
//!   successful payment (both logged).
//! - `bill.created` writes only if the bill is absent: a late duplicate never
//!   resets a bill that a payment has moved on.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use switchboard_plugin::{Event, Failure, Output, Plugin, export, kv, log};

/// The plugin. Its logic is plain Rust: call `Billing::handle` natively to test it
/// (state comes from `switchboard_plugin::testing`).
pub struct Billing;

impl Plugin for Billing {
    fn handle(event: Event) -> Result<Vec<Output>, Failure> {
        match event.kind.as_str() {
            "bill.created" => bill_created(&event),
            "payment.success" => payment(&event, Outcome::Paid),
            "payment.failed" => payment(&event, Outcome::Failed),
            _ => Ok(vec![]),
        }
    }
}

export!(Billing);

/// Where a bill stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Created, no payment applied yet.
    Open,
    /// A successful payment was applied.
    Paid,
    /// The last payment applied failed.
    PaymentFailed,
}

impl Status {
    /// The status as it appears in the stored bill and in outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Open => "open",
            Status::Paid => "paid",
            Status::PaymentFailed => "payment_failed",
        }
    }
}

/// A bill as stored under `bill:<bill_id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bill {
    /// The bill's id.
    pub bill_id: String,
    /// Where it stands.
    pub status: Status,
    /// The payment that set `status`, once one has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_payment_id: Option<String>,
    /// Why the last payment failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// Everything else `bill.created` said (`amount`, `currency`, `customer`...).
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// The kv key of a bill.
pub fn bill_key(bill_id: &str) -> String {
    format!("bill:{bill_id}")
}

/// The kv key recording which event applied a payment.
pub fn payment_key(payment_id: &str) -> String {
    format!("payment:{payment_id}")
}

fn bill_created(event: &Event) -> Result<Vec<Output>, Failure> {
    let mut fields = object(event)?;
    let bill_id = required_id(event, &fields, "bill_id")?;
    let key = bill_key(&bill_id);
    // Our own bookkeeping fields are ours, whatever the producer sent.
    for own in ["bill_id", "status", "last_payment_id", "failure_reason"] {
        fields.remove(own);
    }
    let bill = Bill {
        bill_id,
        status: Status::Open,
        last_payment_id: None,
        failure_reason: None,
        fields,
    };
    let value = serde_json::to_vec(&bill)
        .map_err(|e| Failure::reject(format!("bill {} cannot be stored: {e}", bill.bill_id)))?;
    // Only if absent: a repeated bill.created must not reset a bill that a
    // payment (on any replica) has moved on since.
    if kv::set_if_absent(&key, &value, None)? {
        log::info(format!("bill {} recorded", bill.bill_id));
    } else {
        log::debug(format!(
            "bill {} is already known; bill.created ignored",
            bill.bill_id
        ));
    }
    Ok(vec![])
}

/// Which payment event this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Paid,
    Failed,
}

impl Outcome {
    fn status(self) -> Status {
        match self {
            Outcome::Paid => Status::Paid,
            Outcome::Failed => Status::PaymentFailed,
        }
    }

    fn output_kind(self) -> &'static str {
        match self {
            Outcome::Paid => "bill.paid",
            Outcome::Failed => "bill.payment_failed",
        }
    }
}

/// The fields of a payment event.
struct Payment {
    bill_id: String,
    payment_id: String,
    fields: Map<String, Value>,
}

/// What the claiming event decided about its payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The bill was changed and the output emitted.
    Applied,
    /// The bill was left as it was (already paid); nothing emitted.
    Ignored,
}

/// The claim stored under `payment:<payment_id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The event that claimed the payment: the only one that may apply it.
    pub event: String,
    /// What it decided; `None` until it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided: Option<Decision>,
}

impl Claim {
    /// A stored claim. Bare bytes are the record an earlier version of this
    /// plugin wrote (the event id, after the bill): an applied payment.
    fn parse(raw: &[u8]) -> Claim {
        serde_json::from_slice(raw).unwrap_or_else(|_| Claim {
            event: String::from_utf8_lossy(raw).into_owned(),
            decided: Some(Decision::Applied),
        })
    }
}

/// How many times a payment reads the bill again after losing a race for it
/// before it gives up and lets the event be retried later.
const MAX_BILL_RACES: usize = 16;

fn payment(event: &Event, outcome: Outcome) -> Result<Vec<Output>, Failure> {
    let fields = object(event)?;
    let payment = Payment {
        bill_id: required_id(event, &fields, "bill_id")?,
        payment_id: required_id(event, &fields, "payment_id")?,
        fields,
    };
    let (bill_id, payment_id) = (&payment.bill_id, &payment.payment_id);
    // Unknown bill: retried, and nothing claimed, so that a later delivery of
    // this or another event can still apply the payment.
    known_bill(bill_id)?;

    let payment_key = payment_key(payment_id);
    let mine = Claim {
        event: event.id.clone(),
        decided: None,
    };
    if !kv::set_if_absent(&payment_key, &claim_bytes(&mine)?, None)? {
        let Some(raw) = kv::get(&payment_key)? else {
            return Err(Failure::retry(format!(
                "the claim on payment {payment_id} vanished; trying again"
            )));
        };
        let claim = Claim::parse(&raw);
        if claim.event != event.id {
            log::info(format!(
                "payment {payment_id} is applied by event {}; duplicate in event {} ignored",
                claim.event, event.id
            ));
            return Ok(vec![]);
        }
        match claim.decided {
            // This very event decided before and is delivered again: the output
            // may never have been published. Same output, no state change.
            Some(Decision::Applied) => {
                let bill = known_bill(bill_id)?;
                log::debug(format!("event {} redelivered; output repeated", event.id));
                return Ok(vec![output(&bill, &payment, outcome)?]);
            }
            Some(Decision::Ignored) => return Ok(vec![]),
            // Claimed by an earlier attempt that stopped before deciding.
            None => {}
        }
    }

    let (decision, bill) = apply(&payment, outcome)?;
    let decided = Claim {
        event: event.id.clone(),
        decided: Some(decision),
    };
    kv::set(&payment_key, &claim_bytes(&decided)?, None)?;
    match decision {
        Decision::Applied => Ok(vec![output(&bill, &payment, outcome)?]),
        Decision::Ignored => Ok(vec![]),
    }
}

/// Applies a claimed payment to its bill: read, decide, compare-and-set, and
/// again if another writer changed the bill in between.
fn apply(payment: &Payment, outcome: Outcome) -> Result<(Decision, Bill), Failure> {
    let (bill_id, payment_id) = (&payment.bill_id, &payment.payment_id);
    let key = bill_key(bill_id);
    for _ in 0..MAX_BILL_RACES {
        let raw = kv::get(&key)?
            .ok_or_else(|| Failure::retry(format!("bill {bill_id} not known yet")))?;
        let mut bill: Bill = serde_json::from_slice(&raw)
            .map_err(|e| Failure::reject(format!("stored bill {bill_id} is not a bill: {e}")))?;
        if bill.last_payment_id.as_deref() == Some(payment_id.as_str()) {
            // An earlier attempt wrote the bill, then stopped.
            return Ok((Decision::Applied, bill));
        }
        if bill.status == Status::Paid {
            if outcome == Outcome::Failed {
                log::info(format!(
                    "bill {bill_id} is already paid; failed payment {payment_id} ignored"
                ));
            } else {
                log::warn(format!(
                    "bill {bill_id} is already paid by payment {}; second payment {payment_id} ignored",
                    bill.last_payment_id.as_deref().unwrap_or("?")
                ));
            }
            return Ok((Decision::Ignored, bill));
        }
        bill.status = outcome.status();
        bill.last_payment_id = Some(payment_id.clone());
        bill.failure_reason = match outcome {
            Outcome::Paid => None,
            Outcome::Failed => Some(reason(&payment.fields)),
        };
        let next = serde_json::to_vec(&bill)
            .map_err(|e| Failure::reject(format!("bill {bill_id} cannot be stored: {e}")))?;
        if kv::compare_and_set(&key, Some(&raw), &next, None)? {
            log::info(format!(
                "bill {bill_id}: payment {payment_id} applied, status {}",
                bill.status.as_str()
            ));
            return Ok((Decision::Applied, bill));
        }
        log::debug(format!(
            "bill {bill_id} changed while payment {payment_id} was applied; reading it again"
        ));
    }
    Err(Failure::retry(format!(
        "bill {bill_id} kept changing under payment {payment_id}; trying again later"
    )))
}

fn claim_bytes(claim: &Claim) -> Result<Vec<u8>, Failure> {
    serde_json::to_vec(claim)
        .map_err(|e| Failure::reject(format!("claim cannot be serialized: {e}")))
}

/// The output for `payment` on `bill`. It depends only on the payment event and
/// on what `bill.created` recorded, never on the bill's current status, so a
/// redelivered event yields the very same output.
fn output(bill: &Bill, payment: &Payment, outcome: Outcome) -> Result<Output, Failure> {
    let pick = |field: &str| {
        [&payment.fields, &bill.fields]
            .into_iter()
            .filter_map(|fields| fields.get(field))
            .find(|v| !v.is_null())
            .cloned()
            .unwrap_or(Value::Null)
    };
    let customer = [&bill.fields, &payment.fields]
        .into_iter()
        .filter_map(|fields| fields.get("customer"))
        .find(|v| !v.is_null())
        .cloned()
        .unwrap_or(Value::Null);

    let mut data = Map::new();
    data.insert("bill_id".into(), bill.bill_id.clone().into());
    data.insert("payment_id".into(), payment.payment_id.clone().into());
    data.insert("amount".into(), pick("amount"));
    data.insert("currency".into(), pick("currency"));
    data.insert("customer".into(), customer);
    data.insert("status".into(), outcome.status().as_str().into());
    if outcome == Outcome::Failed {
        data.insert("reason".into(), reason(&payment.fields).into());
    }
    Output::json(outcome.output_kind(), &data)
}

fn reason(fields: &Map<String, Value>) -> String {
    match fields.get("reason") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => "unknown".to_owned(),
        Some(other) => other.to_string(),
    }
}

fn known_bill(bill_id: &str) -> Result<Bill, Failure> {
    kv::get_json(&bill_key(bill_id))?
        .ok_or_else(|| Failure::retry(format!("bill {bill_id} not known yet")))
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

/// A required id field: a non-empty string, or an integer (kept as its digits).
fn required_id(event: &Event, fields: &Map<String, Value>, name: &str) -> Result<String, Failure> {
    let id = match fields.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        None | Some(Value::Null) => {
            return Err(Failure::reject(format!(
                "{} event {}: missing required field `{name}`",
                event.kind, event.id
            )));
        }
        Some(other) => {
            return Err(Failure::reject(format!(
                "{} event {}: field `{name}` must be a non-empty string or an integer, not {}",
                event.kind,
                event.id,
                kind_of(other)
            )));
        }
    };
    Ok(id)
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

    fn handle(kind: &str, data: Value) -> Result<Vec<Output>, Failure> {
        Billing::handle(testing::event(kind, &data))
    }

    fn create_bill(bill_id: &str) {
        let outputs = handle(
            "bill.created",
            json!({"bill_id": bill_id, "amount": 100, "currency": "EUR",
                   "customer": {"id": "c-1", "email": "ada@example.com"},
                   "due": "2025-02-01"}),
        )
        .unwrap();
        assert!(outputs.is_empty(), "bill.created emits nothing");
    }

    fn bill(bill_id: &str) -> Bill {
        kv::get_json(&bill_key(bill_id)).unwrap().unwrap()
    }

    fn payment_event(kind: &str, bill_id: &str, payment_id: &str) -> Event {
        testing::event(
            kind,
            &json!({"bill_id": bill_id, "payment_id": payment_id, "amount": 100,
                    "reason": "card declined"}),
        )
    }

    #[test]
    fn bill_created_records_an_open_bill_keeping_its_fields() {
        testing::reset();
        create_bill("b-1");
        let stored: Value = kv::get_json("bill:b-1").unwrap().unwrap();
        assert_eq!(
            stored,
            json!({"bill_id": "b-1", "status": "open", "amount": 100, "currency": "EUR",
                   "customer": {"id": "c-1", "email": "ada@example.com"}, "due": "2025-02-01"})
        );
    }

    #[test]
    fn bill_created_again_does_not_reset_the_status() {
        testing::reset();
        create_bill("b-1");
        Billing::handle(payment_event("payment.success", "b-1", "p-1")).unwrap();
        create_bill("b-1");
        assert_eq!(bill("b-1").status, Status::Paid);
    }

    #[test]
    fn payment_success_pays_the_bill_and_carries_the_customer() {
        testing::reset();
        create_bill("b-1");
        let event = testing::event(
            "payment.success",
            &json!({"bill_id": "b-1", "payment_id": "p-1", "amount": 100}),
        );
        let event_id = event.id.clone();
        let outputs = Billing::handle(event).unwrap();
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].kind, "bill.paid");
        assert_eq!(
            outputs[0].data_json::<Value>().unwrap(),
            json!({"bill_id": "b-1", "payment_id": "p-1", "amount": 100, "currency": "EUR",
                   "customer": {"id": "c-1", "email": "ada@example.com"}, "status": "paid"})
        );
        let b = bill("b-1");
        assert_eq!(
            (b.status, b.last_payment_id.as_deref()),
            (Status::Paid, Some("p-1"))
        );
        assert_eq!(
            kv::get_json::<Claim>("payment:p-1").unwrap(),
            Some(Claim {
                event: event_id,
                decided: Some(Decision::Applied)
            })
        );
    }

    #[test]
    fn payment_failed_marks_the_bill_and_says_why() {
        testing::reset();
        create_bill("b-1");
        let outputs = Billing::handle(payment_event("payment.failed", "b-1", "p-1")).unwrap();
        assert_eq!(outputs[0].kind, "bill.payment_failed");
        assert_eq!(
            outputs[0].data_json::<Value>().unwrap(),
            json!({"bill_id": "b-1", "payment_id": "p-1", "amount": 100, "currency": "EUR",
                   "customer": {"id": "c-1", "email": "ada@example.com"},
                   "status": "payment_failed", "reason": "card declined"})
        );
        let b = bill("b-1");
        assert_eq!(b.status, Status::PaymentFailed);
        assert_eq!(b.failure_reason.as_deref(), Some("card declined"));

        // A later successful payment still pays it.
        let outputs = Billing::handle(payment_event("payment.success", "b-1", "p-2")).unwrap();
        assert_eq!(outputs[0].kind, "bill.paid");
        assert_eq!(bill("b-1").status, Status::Paid);
        assert_eq!(bill("b-1").failure_reason, None);
    }

    #[test]
    fn a_payment_before_its_bill_is_retried() {
        testing::reset();
        let err = Billing::handle(payment_event("payment.success", "b-9", "p-1")).unwrap_err();
        assert_eq!(err, Failure::retry("bill b-9 not known yet"));
        assert!(testing::kv_dump().is_empty(), "nothing recorded");

        create_bill("b-9");
        let outputs = Billing::handle(payment_event("payment.success", "b-9", "p-1")).unwrap();
        assert_eq!(outputs[0].kind, "bill.paid");
    }

    #[test]
    fn a_duplicate_payment_changes_nothing_and_emits_nothing() {
        testing::reset();
        create_bill("b-1");
        Billing::handle(payment_event("payment.failed", "b-1", "p-1")).unwrap();
        let before = testing::kv_dump();
        // Same payment id, published again as a new event (another event id).
        let outputs = Billing::handle(payment_event("payment.failed", "b-1", "p-1")).unwrap();
        assert!(outputs.is_empty());
        assert_eq!(testing::kv_dump(), before);
    }

    #[test]
    fn a_redelivered_event_repeats_its_output_without_changing_state() {
        testing::reset();
        create_bill("b-1");
        let failed = payment_event("payment.failed", "b-1", "p-1");
        let first = Billing::handle(failed.clone()).unwrap();
        // The bill moves on before the failed event is redelivered.
        Billing::handle(payment_event("payment.success", "b-1", "p-2")).unwrap();
        let before = testing::kv_dump();

        let mut redelivered = failed;
        redelivered.attempt = 2;
        let again = Billing::handle(redelivered).unwrap();
        assert_eq!(again, first, "the very same output");
        assert_eq!(testing::kv_dump(), before, "no state change");
        assert_eq!(bill("b-1").status, Status::Paid);
    }

    fn claim(event: &str, decided: Option<Decision>) -> Vec<u8> {
        serde_json::to_vec(&Claim {
            event: event.into(),
            decided,
        })
        .unwrap()
    }

    #[test]
    fn a_crash_after_the_bill_write_is_finished_by_the_redelivery() {
        testing::reset();
        create_bill("b-1");
        let event = payment_event("payment.success", "b-1", "p-1");
        let first = Billing::handle(event.clone()).unwrap();
        // The crash: the bill was written, the claim not yet marked decided.
        kv::set("payment:p-1", &claim(&event.id, None), None).unwrap();
        let again = Billing::handle(event.clone()).unwrap();
        assert_eq!(again, first);
        assert_eq!(
            kv::get("payment:p-1").unwrap(),
            Some(claim(&event.id, Some(Decision::Applied)))
        );
    }

    #[test]
    fn a_crash_right_after_the_claim_is_applied_by_the_redelivery() {
        testing::reset();
        create_bill("b-1");
        let event = payment_event("payment.success", "b-1", "p-1");
        // The crash: claimed, bill untouched.
        kv::set("payment:p-1", &claim(&event.id, None), None).unwrap();
        let outputs = Billing::handle(event).unwrap();
        assert_eq!(outputs[0].kind, "bill.paid");
        assert_eq!(bill("b-1").status, Status::Paid);
    }

    #[test]
    fn a_payment_claimed_by_another_event_is_a_duplicate_even_before_it_is_applied() {
        testing::reset();
        create_bill("b-1");
        // Another replica has claimed p-1 and is applying it right now.
        kv::set("payment:p-1", &claim("evt-on-replica-2", None), None).unwrap();
        let before = testing::kv_dump();
        let outputs = Billing::handle(payment_event("payment.success", "b-1", "p-1")).unwrap();
        assert!(outputs.is_empty());
        assert_eq!(
            testing::kv_dump(),
            before,
            "the claimant applies it, not us"
        );
    }

    #[test]
    fn an_ignored_payment_stays_ignored_when_redelivered() {
        testing::reset();
        create_bill("b-1");
        Billing::handle(payment_event("payment.success", "b-1", "p-1")).unwrap();
        let late = payment_event("payment.failed", "b-1", "p-2");
        assert!(Billing::handle(late.clone()).unwrap().is_empty());
        assert_eq!(
            kv::get("payment:p-2").unwrap(),
            Some(claim(&late.id, Some(Decision::Ignored)))
        );
        let before = testing::kv_dump();
        assert!(Billing::handle(late).unwrap().is_empty());
        assert_eq!(testing::kv_dump(), before);
    }

    #[test]
    fn payment_records_of_the_previous_version_are_understood() {
        testing::reset();
        create_bill("b-1");
        let event = payment_event("payment.success", "b-1", "p-1");
        let first = Billing::handle(event.clone()).unwrap();
        // What the previous version stored: the bare event id, after the bill.
        kv::set("payment:p-1", event.id.as_bytes(), None).unwrap();
        assert_eq!(Billing::handle(event).unwrap(), first, "redelivery repeats");
        let other = payment_event("payment.success", "b-1", "p-1");
        assert!(
            Billing::handle(other).unwrap().is_empty(),
            "duplicate ignored"
        );
    }

    #[test]
    fn a_late_bill_created_does_not_reset_a_paid_bill() {
        testing::reset();
        create_bill("b-1");
        Billing::handle(payment_event("payment.success", "b-1", "p-1")).unwrap();
        let before = testing::kv_dump();
        create_bill("b-1");
        assert_eq!(testing::kv_dump(), before);
    }

    #[test]
    fn a_paid_bill_ignores_later_failures_and_second_payments() {
        testing::reset();
        create_bill("b-1");
        Billing::handle(payment_event("payment.success", "b-1", "p-1")).unwrap();
        let before = bill("b-1");
        testing::take_logs();

        assert!(
            Billing::handle(payment_event("payment.failed", "b-1", "p-2"))
                .unwrap()
                .is_empty()
        );
        assert!(
            Billing::handle(payment_event("payment.success", "b-1", "p-3"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(bill("b-1"), before, "the bill is unchanged");
        let logs = testing::logs();
        assert!(
            logs[0]
                .1
                .contains("already paid; failed payment p-2 ignored"),
            "{logs:?}"
        );
        assert!(logs[1].1.contains("second payment p-3 ignored"), "{logs:?}");
    }

    #[test]
    fn missing_or_malformed_fields_are_rejected_by_name() {
        testing::reset();
        create_bill("b-1");
        let cases = [
            (
                "bill.created",
                json!({"amount": 1}),
                "missing required field `bill_id`",
            ),
            (
                "bill.created",
                json!({"bill_id": ""}),
                "`bill_id` must be a non-empty string",
            ),
            (
                "payment.success",
                json!({"bill_id": "b-1"}),
                "missing required field `payment_id`",
            ),
            (
                "payment.failed",
                json!({"payment_id": "p"}),
                "missing required field `bill_id`",
            ),
            (
                "payment.success",
                json!({"bill_id": "b-1", "payment_id": {"x": 1}}),
                "not an object",
            ),
            (
                "payment.success",
                json!([1, 2]),
                "data must be a JSON object",
            ),
        ];
        for (kind, data, expected) in cases {
            let err = handle(kind, data.clone()).unwrap_err();
            assert!(err.is_reject(), "{kind} {data}: {err}");
            assert!(err.message().contains(expected), "{kind} {data}: {err}");
        }
        let mut event = payment_event("payment.success", "b-1", "p-1");
        event.data = b"not json".to_vec();
        assert!(Billing::handle(event).unwrap_err().is_reject());
    }

    #[test]
    fn integer_ids_are_accepted_and_other_kinds_ignored() {
        testing::reset();
        handle("bill.created", json!({"bill_id": 42})).unwrap();
        let outputs = handle("payment.success", json!({"bill_id": 42, "payment_id": 7})).unwrap();
        let data: Value = outputs[0].data_json().unwrap();
        assert_eq!(
            (data["bill_id"].clone(), data["payment_id"].clone()),
            (json!("42"), json!("7"))
        );
        assert_eq!(data["customer"], Value::Null);
        assert!(
            handle("order.created", json!({"bill_id": 1}))
                .unwrap()
                .is_empty()
        );
    }
}
