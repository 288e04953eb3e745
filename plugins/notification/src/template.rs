//! Templates: the built-in defaults, the config that overrides them, and the
//! `{{placeholder}}` rendering.

use serde_json::Value;
use switchboard_plugin::{Event, config};

/// The kinds handled with no configuration at all: the eight business events, and
/// the two the billing plugin emits (which carry the bill's customer).
pub const BUILT_IN_KINDS: [&str; 10] = [
    "payment.success",
    "payment.failed",
    "bill.created",
    "order.created",
    "order.shipped",
    "user.created",
    "ticket.purchased",
    "listing.sold",
    "bill.paid",
    "bill.payment_failed",
];

/// The templates for one kind, after config overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Templates {
    /// `template_id` of the outputs: config `<kind>.template_id`, else the kind.
    pub template_id: String,
    /// Email subject.
    pub subject: String,
    /// Email body.
    pub body: String,
    /// SMS text; `None` when SMS is off for this kind (configured as empty).
    pub sms: Option<String>,
}

impl Templates {
    /// The templates for `kind`, or `None` when this plugin does not notify on it:
    /// built-in kinds always have templates (config `<kind>.subject`, `.body`,
    /// `.sms`, `.template_id` override the defaults); any other kind only when
    /// config gives it a `<kind>.body`.
    pub fn for_kind(kind: &str) -> Option<Templates> {
        Self::resolve(kind, config::get)
    }

    /// [`Templates::for_kind`] with the configuration passed in.
    pub fn resolve(kind: &str, config: impl Fn(&str) -> Option<String>) -> Option<Templates> {
        let get = |field: &str| config(&format!("{kind}.{field}"));
        let (subject, body, sms) = match defaults(kind) {
            Some((subject, body, sms)) => (
                get("subject").unwrap_or_else(|| subject.to_owned()),
                get("body").unwrap_or_else(|| body.to_owned()),
                get("sms").unwrap_or_else(|| sms.to_owned()),
            ),
            None => (
                get("subject").unwrap_or_else(|| "{{event.kind}}".to_owned()),
                get("body")?,
                get("sms").unwrap_or_default(),
            ),
        };
        Some(Templates {
            template_id: get("template_id").unwrap_or_else(|| kind.to_owned()),
            subject,
            body,
            sms: (!sms.trim().is_empty()).then_some(sms),
        })
    }
}

/// Built-in (subject, body, sms) templates. They only use fields the usual
/// producers send, with fallbacks where a field is often missing.
fn defaults(kind: &str) -> Option<(&'static str, &'static str, &'static str)> {
    Some(match kind {
        "payment.success" => (
            "Payment received",
            "We received your payment of {{amount}} {{currency}}. Reference: {{payment_id}}.",
            "Payment of {{amount}} {{currency}} received. Ref {{payment_id}}.",
        ),
        "payment.failed" => (
            "Your payment did not go through",
            "Your payment of {{amount}} {{currency}} failed: {{reason|no reason given}}. \
             Please try again or use another payment method. Reference: {{payment_id}}.",
            "Payment of {{amount}} {{currency}} failed: {{reason|no reason given}}.",
        ),
        "bill.created" => (
            "New bill {{bill_id}}",
            "Your bill {{bill_id}} for {{amount}} {{currency}} is ready.",
            "New bill {{bill_id}}: {{amount}} {{currency}}.",
        ),
        "order.created" => (
            "Order {{order_id}} confirmed",
            "Thank you for your order {{order_id}}. We will let you know when it ships.",
            "Order {{order_id}} confirmed.",
        ),
        "order.shipped" => (
            "Order {{order_id}} has shipped",
            "Your order {{order_id}} is on its way. \
             Tracking number: {{tracking_number|not available yet}}.",
            "Order {{order_id}} shipped. Tracking: {{tracking_number|n/a}}.",
        ),
        "user.created" => (
            "Welcome, {{name|there}}!",
            "Hi {{name|there}}, your account is ready. We are glad to have you.",
            "Welcome, {{name|there}}! Your account is ready.",
        ),
        "ticket.purchased" => (
            "Your tickets for {{event_name|your event}}",
            "Your tickets for {{event_name|your event}} are confirmed. \
             Ticket: {{ticket_id}}. Quantity: {{quantity|1}}.",
            "Tickets for {{event_name|your event}} confirmed. Ticket {{ticket_id}}.",
        ),
        "listing.sold" => (
            "Your listing {{listing_id}} sold",
            "Good news: your listing {{listing_id}} sold for {{price|the asking price}}.",
            "Your listing {{listing_id}} sold.",
        ),
        "bill.paid" => (
            "Bill {{bill_id}} is paid",
            "Thank you: bill {{bill_id}} is paid ({{amount}} {{currency}}). \
             Payment reference: {{payment_id}}.",
            "Bill {{bill_id}} paid: {{amount}} {{currency}}.",
        ),
        "bill.payment_failed" => (
            "Payment for bill {{bill_id}} failed",
            "We could not collect {{amount}} {{currency}} for bill {{bill_id}}: \
             {{reason|no reason given}}. Please update your payment method.",
            "Payment for bill {{bill_id}} failed: {{reason|no reason given}}.",
        ),
        _ => return None,
    })
}

/// Renders `template`, replacing each `{{placeholder}}`:
///
/// - `{{event.id}}`, `{{event.kind}}`, `{{event.source}}`, `{{event.time}}`,
///   `{{event.tenant_id}}`, `{{event.correlation_id}}`: the event's own fields;
/// - `{{a.b.c}}`: a dotted path into the event's JSON data (objects by key,
///   arrays by index). Strings, numbers and booleans render plainly, objects and
///   arrays as compact JSON;
/// - `{{path|fallback}}`: the fallback text when the path is missing, null or an
///   empty string. Without a fallback, such a placeholder renders as nothing.
///
/// Text is not escaped (the outputs are plain text); an unclosed `{{` stays as is.
pub fn render(template: &str, event: &Event, data: &Value) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let (path, fallback) = match after[..end].split_once('|') {
            Some((path, fallback)) => (path.trim(), Some(fallback)),
            None => (after[..end].trim(), None),
        };
        match resolve(path, event, data).filter(|v| !v.is_empty()) {
            Some(value) => out.push_str(&value),
            None => out.push_str(fallback.unwrap_or_default()),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

fn resolve(path: &str, event: &Event, data: &Value) -> Option<String> {
    if let Some(field) = path.strip_prefix("event.") {
        return match field {
            "id" => Some(event.id.clone()),
            "kind" => Some(event.kind.clone()),
            "source" => Some(event.source.clone()),
            "time" => Some(event.time.clone()),
            "tenant_id" => event.tenant_id.clone(),
            "correlation_id" => event.correlation_id.clone(),
            _ => None,
        };
    }
    plain(lookup(data, path)?)
}

/// The value at dotted `path` in `data`.
pub fn lookup<'a>(data: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(data, |value, segment| match value {
            Value::Object(map) => map.get(segment),
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?),
            _ => None,
        })
}

fn plain(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Array(_) | Value::Object(_) => Some(value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> Event {
        Event {
            id: "evt-9".into(),
            kind: "order.created".into(),
            tenant_id: Some("acme".into()),
            ..Event::default()
        }
    }

    #[test]
    fn placeholders_resolve_against_data_and_event() {
        let data = json!({
            "order_id": "o-1",
            "total": 12.5,
            "paid": true,
            "count": 3,
            "customer": {"name": "Ada", "tags": ["vip", "early"]},
            "empty": "",
            "nothing": null,
        });
        let cases = [
            ("Order {{order_id}}", "Order o-1"),
            ("{{ total }} / {{paid}} / {{count}}", "12.5 / true / 3"),
            ("Hi {{customer.name}} ({{customer.tags.0}})", "Hi Ada (vip)"),
            ("{{customer.tags}}", r#"["vip","early"]"#),
            (
                "{{event.id}} {{event.kind}} {{event.tenant_id}}",
                "evt-9 order.created acme",
            ),
            (
                "[{{missing}}][{{empty}}][{{nothing}}][{{order_id.deeper}}]",
                "[][][][]",
            ),
            ("Hi {{missing|there}}, {{empty|friend}}", "Hi there, friend"),
            ("{{customer.name|x}}", "Ada"),
            ("no placeholders", "no placeholders"),
            ("unclosed {{order_id", "unclosed {{order_id"),
            ("{{order_id}}}}", "o-1}}"),
        ];
        for (template, expected) in cases {
            assert_eq!(
                render(template, &event(), &data),
                expected,
                "template {template:?}"
            );
        }
    }

    #[test]
    fn every_built_in_kind_has_templates_without_config() {
        for kind in BUILT_IN_KINDS {
            let t = Templates::resolve(kind, |_| None).unwrap();
            assert_eq!(t.template_id, kind);
            assert!(!t.subject.is_empty() && !t.body.is_empty(), "{kind}");
            assert!(t.sms.is_some(), "{kind}");
        }
        assert_eq!(Templates::resolve("inventory.low", |_| None), None);
    }

    #[test]
    fn config_overrides_defaults_and_adds_kinds() {
        let config = |key: &str| match key {
            "payment.success.subject" => Some("Paid: {{amount}}".to_owned()),
            "payment.success.template_id" => Some("pay-ok-v2".to_owned()),
            "payment.success.sms" => Some(String::new()),
            "invoice.overdue.body" => Some("Invoice {{id}} overdue".to_owned()),
            _ => None,
        };
        let t = Templates::resolve("payment.success", config).unwrap();
        assert_eq!(t.subject, "Paid: {{amount}}");
        assert_eq!(t.template_id, "pay-ok-v2");
        assert_eq!(t.sms, None, "an empty sms template turns SMS off");
        assert!(
            t.body.contains("{{payment_id}}"),
            "unconfigured parts keep the default"
        );

        let t = Templates::resolve("invoice.overdue", config).unwrap();
        assert_eq!(t.body, "Invoice {{id}} overdue");
        assert_eq!(t.subject, "{{event.kind}}");
        assert_eq!(t.sms, None);
    }
}
