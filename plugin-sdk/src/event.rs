//! [`Event`]: one event as the host delivers it to a handler.

use serde::de::DeserializeOwned;

use crate::Failure;

/// One event, as the host delivers it to [`Plugin::handle`](crate::Plugin::handle).
///
/// A plain Rust value (the SDK converts from the WIT record at the boundary), so
/// handler logic can be called and tested natively. `Default` gives an empty event
/// to fill in with struct-update syntax in tests; see also
/// [`testing::event`](crate::testing::event) on native targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// Unique id of the event (the producer's, or one the host assigned). A
    /// redelivered event keeps its id: use it to make handlers idempotent.
    pub id: String,
    /// What happened, e.g. `payment.success`: the envelope's `type` (or the
    /// CloudEvents `type`); for a raw message, the routing key it was published with.
    pub kind: String,
    /// The exchange the event was published to.
    pub exchange: String,
    /// Delivery attempt for this plugin: 1 the first time, 2 on the first retry...
    pub attempt: u32,
    /// Who produced the event (a service name, or the plugin name for outputs).
    pub source: String,
    /// When the event happened, RFC 3339.
    pub time: String,
    /// Ties together every event of one business flow.
    pub correlation_id: Option<String>,
    /// The id of the event that caused this one, when a plugin produced it.
    pub causation_id: Option<String>,
    /// The tenant the event belongs to, for multi-tenant producers.
    pub tenant_id: Option<String>,
    /// MIME type of `data`, e.g. `application/json`.
    pub content_type: String,
    /// The payload, as bytes.
    pub data: Vec<u8>,
    /// Remaining metadata: envelope `metadata`, AMQP headers, CloudEvents extensions.
    pub headers: Vec<(String, String)>,
}

impl Event {
    /// Parses `data` as JSON into `T`.
    ///
    /// Data that is not JSON, or not JSON of the shape `T` describes, can never be
    /// handled however often it is retried, so the error is a
    /// [`Failure::Reject`] naming the event kind, its id and serde's message
    /// (which says which field was wrong, and where).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        serde_json::from_slice(&self.data).map_err(|err| self.reject_data(&err))
    }

    /// Parses `data` as untyped JSON; a parse error is a [`Failure::Reject`], as
    /// for [`Event::json`].
    pub fn json_value(&self) -> Result<serde_json::Value, Failure> {
        self.json()
    }

    /// The value of header `name`. Names match ignoring ASCII case (AMQP header
    /// names are case-sensitive, HTTP ones are not; producers differ); an exact
    /// match wins over a case-insensitive one, then the first one.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .or_else(|| {
                self.headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
            })
            .map(|(_, v)| v.as_str())
    }

    fn reject_data(&self, err: &serde_json::Error) -> Failure {
        Failure::reject(format!(
            "{} event {}: data is not the expected JSON: {err}",
            self.kind, self.id
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str) -> Event {
        Event {
            id: "e1".into(),
            kind: "order.created".into(),
            data: data.as_bytes().to_vec(),
            headers: vec![
                ("X-Trace".into(), "upper".into()),
                ("x-trace".into(), "lower".into()),
                ("origin".into(), "shop".into()),
            ],
            ..Event::default()
        }
    }

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Order {
        order_id: String,
        total: u32,
    }

    #[test]
    fn json_parses_into_the_requested_type() {
        let order: Order = event(r#"{"order_id":"o-1","total":12,"extra":true}"#)
            .json()
            .unwrap();
        assert_eq!(
            order,
            Order {
                order_id: "o-1".into(),
                total: 12
            }
        );
    }

    #[test]
    fn a_parse_error_is_a_reject_naming_the_kind_and_the_field() {
        let err = event(r#"{"order_id":"o-1"}"#).json::<Order>().unwrap_err();
        assert!(err.is_reject());
        assert!(err.message().contains("order.created"), "{err}");
        assert!(err.message().contains("e1"), "{err}");
        assert!(err.message().contains("missing field `total`"), "{err}");

        let err = event("not json").json_value().unwrap_err();
        assert!(err.is_reject(), "{err}");
    }

    #[test]
    fn headers_prefer_an_exact_match_then_ignore_case() {
        let e = event("{}");
        assert_eq!(e.header("x-trace"), Some("lower"));
        assert_eq!(e.header("X-Trace"), Some("upper"));
        assert_eq!(e.header("X-TRACE"), Some("upper"));
        assert_eq!(e.header("Origin"), Some("shop"));
        assert_eq!(e.header("missing"), None);
    }
}
