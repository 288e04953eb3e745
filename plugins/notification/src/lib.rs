//! `notification`: turns business events into notification requests.
//!
//! For each event of a kind it knows, it renders templates against the event's
//! JSON data and emits a `notification.email` and, when the data carries a phone
//! number, a `notification.sms`. A delivery service consumes those; this plugin
//! never talks to a mail or SMS provider itself.
//!
//! # Input
//!
//! Kinds handled out of the box: `payment.success`, `payment.failed`,
//! `bill.created`, `order.created`, `order.shipped`, `user.created`,
//! `ticket.purchased`, `listing.sold`, and the billing plugin's `bill.paid` and
//! `bill.payment_failed` (which carry the bill's `customer`); also any other kind
//! for which config has a `<kind>.body` template. Other kinds: no outputs. Data
//! must be JSON, else the event is rejected.
//!
//! The email recipient is the first non-empty string among the data's
//! `email`, `recipient.email`, `customer.email`, `user.email`, `buyer.email`, `to`;
//! the phone number among `phone`, `customer.phone`, `user.phone`, `buyer.phone`.
//! An event with neither is rejected (`no recipient: ...`); one with only a phone
//! gets only the SMS.
//!
//! # Output
//!
//! - `notification.email`: `{"recipient", "template_id", "subject", "body"}`
//! - `notification.sms`: `{"recipient", "template_id", "body"}` (recipient = phone)
//!
//! # Config (all optional)
//!
//! - `<kind>.subject`, `<kind>.body`: the email templates;
//! - `<kind>.sms`: the SMS template; set it to `""` to send no SMS for that kind;
//! - `<kind>.template_id`: the outputs' `template_id` (default: the kind).
//!
//! Templates use `{{path.to.field}}` into the data, `{{event.id}}`,
//! `{{event.kind}}` and `{{path|fallback}}`; see [`template::render`].
//!
//! The plugin keeps no state: a redelivered event renders the same outputs.

pub mod template;

use serde_json::{Value, json};
use switchboard_plugin::{Event, Failure, Output, Plugin, export, log};

pub use template::{BUILT_IN_KINDS, Templates, render};

/// Where the email address is looked for, in this order.
pub const EMAIL_PATHS: [&str; 6] = [
    "email",
    "recipient.email",
    "customer.email",
    "user.email",
    "buyer.email",
    "to",
];

/// Where the phone number is looked for, in this order.
pub const PHONE_PATHS: [&str; 4] = ["phone", "customer.phone", "user.phone", "buyer.phone"];

/// Kind of the email output.
pub const EMAIL: &str = "notification.email";
/// Kind of the SMS output.
pub const SMS: &str = "notification.sms";

/// The plugin. Its logic is plain Rust: call `Notification::handle` natively to
/// test or benchmark it (config comes from `switchboard_plugin::testing`).
pub struct Notification;

impl Plugin for Notification {
    fn handle(event: Event) -> Result<Vec<Output>, Failure> {
        let Some(templates) = Templates::for_kind(&event.kind) else {
            return Ok(vec![]);
        };
        let data = event.json_value()?;
        notify(&event, &data, &templates)
    }
}

export!(Notification);

/// The outputs for `event` (with parsed `data`) rendered from `templates`.
pub fn notify(event: &Event, data: &Value, templates: &Templates) -> Result<Vec<Output>, Failure> {
    let email = first_string(data, &EMAIL_PATHS);
    let phone = templates.sms.as_ref().and(first_string(data, &PHONE_PATHS));
    if email.is_none() && phone.is_none() {
        return Err(Failure::reject(format!(
            "no recipient: {} event {} has no email at {} (nor a phone at {})",
            event.kind,
            event.id,
            EMAIL_PATHS.join(", "),
            PHONE_PATHS.join(", "),
        )));
    }

    let mut outputs = Vec::with_capacity(2);
    if let Some(recipient) = email {
        outputs.push(Output::json(
            EMAIL,
            &json!({
                "recipient": recipient,
                "template_id": templates.template_id,
                "subject": render(&templates.subject, event, data),
                "body": render(&templates.body, event, data),
            }),
        )?);
    }
    if let (Some(recipient), Some(sms)) = (phone, &templates.sms) {
        outputs.push(Output::json(
            SMS,
            &json!({
                "recipient": recipient,
                "template_id": templates.template_id,
                "body": render(sms, event, data),
            }),
        )?);
    }
    log::debug(format!(
        "{} notification(s) for {}",
        outputs.len(),
        event.kind
    ));
    Ok(outputs)
}

/// The first non-empty string found at one of `paths`.
fn first_string<'a>(data: &'a Value, paths: &[&str]) -> Option<&'a str> {
    paths
        .iter()
        .filter_map(|path| template::lookup(data, path)?.as_str())
        .map(str::trim)
        .find(|s| !s.is_empty())
}

// Native only: the tests run on the SDK's in-memory host.
#[cfg(test)]
#[cfg(not(target_arch = "wasm32"))]
mod tests {
    use super::*;
    use switchboard_plugin::testing;

    fn handle(kind: &str, data: Value) -> Result<Vec<Output>, Failure> {
        Notification::handle(testing::event(kind, &data))
    }

    fn json_of(output: &Output) -> Value {
        output.data_json().unwrap()
    }

    #[test]
    fn payment_success_emails_the_customer_with_the_default_template() {
        testing::reset();
        let outputs = handle(
            "payment.success",
            json!({"payment_id": "p-1", "amount": 42.5, "currency": "EUR",
                   "customer": {"email": "ada@example.com"}}),
        )
        .unwrap();
        assert_eq!(outputs.len(), 1, "no phone, no SMS");
        assert_eq!(outputs[0].kind, EMAIL);
        assert_eq!(outputs[0].content_type.as_deref(), Some("application/json"));
        assert_eq!(
            json_of(&outputs[0]),
            json!({
                "recipient": "ada@example.com",
                "template_id": "payment.success",
                "subject": "Payment received",
                "body": "We received your payment of 42.5 EUR. Reference: p-1.",
            })
        );
    }

    #[test]
    fn a_phone_adds_an_sms() {
        testing::reset();
        let outputs = handle(
            "order.shipped",
            json!({"order_id": "o-7", "tracking_number": "TN1",
                   "user": {"email": "bob@example.com", "phone": "+15550100"}}),
        )
        .unwrap();
        let kinds: Vec<_> = outputs.iter().map(|o| o.kind.as_str()).collect();
        assert_eq!(kinds, [EMAIL, SMS]);
        assert_eq!(
            json_of(&outputs[1]),
            json!({
                "recipient": "+15550100",
                "template_id": "order.shipped",
                "body": "Order o-7 shipped. Tracking: TN1.",
            })
        );
        assert_eq!(json_of(&outputs[0])["subject"], "Order o-7 has shipped");
    }

    #[test]
    fn every_built_in_kind_notifies_without_config() {
        testing::reset();
        for kind in BUILT_IN_KINDS {
            let outputs = handle(kind, json!({"email": "x@example.com", "phone": "+1"})).unwrap();
            assert_eq!(outputs.len(), 2, "{kind}");
            let email = json_of(&outputs[0]);
            assert_eq!(email["template_id"], kind);
            assert!(
                !email["subject"].as_str().unwrap().contains("{{"),
                "{kind}: {email}"
            );
            assert!(
                !email["body"].as_str().unwrap().contains("{{"),
                "{kind}: {email}"
            );
        }
    }

    #[test]
    fn recipients_are_looked_up_in_the_documented_order() {
        testing::reset();
        let cases = [
            (json!({"email": "a@x", "customer": {"email": "b@x"}}), "a@x"),
            (
                json!({"email": "", "recipient": {"email": "r@x"}, "to": "t@x"}),
                "r@x",
            ),
            (
                json!({"customer": {"email": "c@x"}, "user": {"email": "u@x"}}),
                "c@x",
            ),
            (
                json!({"user": {"email": "u@x"}, "buyer": {"email": "b@x"}}),
                "u@x",
            ),
            (json!({"buyer": {"email": "b@x"}, "to": "t@x"}), "b@x"),
            (json!({"to": "t@x"}), "t@x"),
        ];
        for (data, expected) in cases {
            let outputs = handle("order.created", data.clone()).unwrap();
            assert_eq!(json_of(&outputs[0])["recipient"], expected, "{data}");
        }
        let outputs = handle(
            "order.created",
            json!({"email": "e@x", "customer": {"phone": "+2"}, "buyer": {"phone": "+3"}}),
        )
        .unwrap();
        assert_eq!(json_of(&outputs[1])["recipient"], "+2");
    }

    #[test]
    fn billing_outputs_reach_the_bills_customer() {
        testing::reset();
        let outputs = handle(
            "bill.payment_failed",
            json!({"bill_id": "b-1", "payment_id": "p-1", "amount": 10, "currency": "EUR",
                   "customer": {"email": "ada@x"}, "status": "payment_failed",
                   "reason": "card declined"}),
        )
        .unwrap();
        assert_eq!(
            json_of(&outputs[0]),
            json!({
                "recipient": "ada@x",
                "template_id": "bill.payment_failed",
                "subject": "Payment for bill b-1 failed",
                "body": "We could not collect 10 EUR for bill b-1: card declined. \
                         Please update your payment method.",
            })
        );
    }

    #[test]
    fn only_a_phone_gets_only_an_sms() {
        testing::reset();
        let outputs = handle("user.created", json!({"phone": "+1", "name": "Ada"})).unwrap();
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].kind, SMS);
        assert_eq!(
            json_of(&outputs[0])["body"],
            "Welcome, Ada! Your account is ready."
        );
    }

    #[test]
    fn no_recipient_is_a_reject() {
        testing::reset();
        let err = handle(
            "payment.failed",
            json!({"amount": 5, "customer": {"id": 1}}),
        )
        .unwrap_err();
        assert!(err.is_reject());
        assert!(
            err.message()
                .starts_with("no recipient: payment.failed event evt-"),
            "{err}"
        );
    }

    #[test]
    fn invalid_data_is_a_reject_but_other_kinds_are_ignored() {
        testing::reset();
        let mut event = testing::event("order.created", &json!(null));
        event.data = b"<xml/>".to_vec();
        let err = Notification::handle(event.clone()).unwrap_err();
        assert!(err.is_reject());
        assert!(err.message().contains("order.created"), "{err}");

        event.kind = "inventory.low".into();
        assert_eq!(
            Notification::handle(event).unwrap(),
            vec![],
            "unknown kinds: nothing"
        );
        assert_eq!(
            handle("notification.email", json!({"email": "a@x"})).unwrap(),
            vec![]
        );
    }

    #[test]
    fn config_overrides_templates_and_adds_kinds() {
        testing::reset();
        testing::set_config("payment.success.subject", "Thanks, {{customer.name}}!");
        testing::set_config(
            "payment.success.body",
            "{{event.kind}} {{amount}} ({{event.id}})",
        );
        testing::set_config("payment.success.template_id", "pay-ok-v2");
        testing::set_config("payment.success.sms", "");
        testing::set_config("invoice.overdue.body", "Invoice {{invoice_id}} is overdue.");

        let event = testing::event(
            "payment.success",
            &json!({"amount": 3, "customer": {"name": "Ada", "email": "ada@x", "phone": "+1"}}),
        );
        let id = event.id.clone();
        let outputs = Notification::handle(event).unwrap();
        assert_eq!(outputs.len(), 1, "SMS turned off by an empty template");
        assert_eq!(
            json_of(&outputs[0]),
            json!({
                "recipient": "ada@x",
                "template_id": "pay-ok-v2",
                "subject": "Thanks, Ada!",
                "body": format!("payment.success 3 ({id})"),
            })
        );

        let outputs = handle(
            "invoice.overdue",
            json!({"invoice_id": "i-1", "customer": {"email": "c@x", "phone": "+1"}}),
        )
        .unwrap();
        assert_eq!(outputs.len(), 1, "no SMS without an sms template");
        let email = json_of(&outputs[0]);
        assert_eq!(email["body"], "Invoice i-1 is overdue.");
        assert_eq!(email["subject"], "invoice.overdue");
    }
}
