//! [`Output`]: one event a handler produces, and the builders that make one.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Failure;

/// The content type [`Output::json`] sets, and the one the host assumes when an
/// output has none.
pub const JSON: &str = "application/json";

/// The output header that asks the host to publish the output later: a decimal
/// number of milliseconds ([`Output::after`] sets it). The host reads it and
/// does not publish it; a value that is not a whole number of milliseconds up
/// to the host's `max_delay` fails the event as `invalid_output`.
pub const DELAY_HEADER: &str = "switchboard-delay-ms";

/// One event a handler produces; return them all from
/// [`Plugin::handle`](crate::Plugin::handle).
///
/// The host publishes a handler's outputs all-or-nothing, then acknowledges the
/// input. It fills in the id (derived from the input id, the plugin and the
/// output's index, so a redelivered input yields the same ids), source, time,
/// correlation, causation and tenant ids.
///
/// ```
/// use switchboard_plugin::{Failure, Output};
/// # fn main() -> Result<(), Failure> {
/// let out = Output::json("bill.paid", &serde_json::json!({ "bill_id": "b-1" }))?
///     .to_exchange("billing")
///     .with_header("x-origin", "billing-plugin");
/// assert_eq!(out.exchange.as_deref(), Some("billing"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// What happened, e.g. `bill.paid`. Becomes the routing key.
    pub kind: String,
    /// MIME type of `data`; the host assumes `application/json` when `None`.
    pub content_type: Option<String>,
    /// The payload.
    pub data: Vec<u8>,
    /// Where to publish; the plugin's configured output exchange when `None`.
    pub exchange: Option<String>,
    /// Extra metadata to carry with the output.
    pub headers: Vec<(String, String)>,
}

impl Output {
    /// An output whose data is `value` serialized as JSON.
    ///
    /// Serialization only fails for values JSON cannot represent (a map with
    /// non-string keys, a failing `Serialize` impl): a bug in the handler that no
    /// retry would fix, hence a [`Failure::Reject`].
    pub fn json(kind: impl Into<String>, value: &impl Serialize) -> Result<Self, Failure> {
        let kind = kind.into();
        let data = serde_json::to_vec(value).map_err(|err| {
            Failure::reject(format!(
                "output {kind}: data cannot be serialized as JSON: {err}"
            ))
        })?;
        Ok(Output {
            kind,
            content_type: Some(JSON.to_owned()),
            data,
            exchange: None,
            headers: Vec::new(),
        })
    }

    /// An output carrying `data` as is, labelled with `content_type`.
    pub fn bytes(kind: impl Into<String>, content_type: impl Into<String>, data: Vec<u8>) -> Self {
        Output {
            kind: kind.into(),
            content_type: Some(content_type.into()),
            data,
            exchange: None,
            headers: Vec::new(),
        }
    }

    /// Publish to exchange `name` instead of the plugin's output exchange.
    #[must_use]
    pub fn to_exchange(mut self, name: impl Into<String>) -> Self {
        self.exchange = Some(name.into());
        self
    }

    /// Carry an extra header (added after any already set).
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Publish this output `delay` from now instead of at once: a reminder, or
    /// the timeout of a step that may never answer. The host keeps it durably
    /// (it survives a restart of the router) and publishes it no earlier than
    /// asked. Like every output it is kept all-or-nothing with the others
    /// before the input is acknowledged, and it keeps its deterministic id.
    ///
    /// A delay longer than the host's `max_delay` (7 days unless configured)
    /// fails the event as `invalid_output`. A later call replaces an earlier one.
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchboard_plugin::{Failure, Output};
    /// # fn main() -> Result<(), Failure> {
    /// let timeout = Output::json("saga.timeout", &serde_json::json!({ "order_id": "o-1" }))?
    ///     .after(Duration::from_secs(30));
    /// assert_eq!(timeout.delay(), Some(Duration::from_secs(30)));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn after(mut self, delay: std::time::Duration) -> Self {
        self.headers
            .retain(|(k, _)| !k.eq_ignore_ascii_case(DELAY_HEADER));
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.headers.push((DELAY_HEADER.to_owned(), ms.to_string()));
        self
    }

    /// The delay [`Output::after`] set, if any (`None` too when the header does
    /// not hold a number of milliseconds).
    pub fn delay(&self) -> Option<std::time::Duration> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(DELAY_HEADER))
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .map(std::time::Duration::from_millis)
    }

    /// Parses the output's data as JSON; for tests and for plugins that inspect
    /// what they built.
    pub fn data_json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn json_outputs_carry_the_content_type_and_the_serialized_value() {
        let out = Output::json("bill.paid", &json!({"bill_id": "b-1", "amount": 10})).unwrap();
        assert_eq!(out.kind, "bill.paid");
        assert_eq!(out.content_type.as_deref(), Some(JSON));
        assert_eq!(
            out.data_json::<Value>().unwrap(),
            json!({"bill_id": "b-1", "amount": 10})
        );
        assert_eq!(out.exchange, None);
        assert!(out.headers.is_empty());
    }

    #[test]
    fn values_json_cannot_represent_are_rejected() {
        let mut map = std::collections::BTreeMap::new();
        map.insert((1, 2), "tuple keys");
        let err = Output::json("x.y", &map).unwrap_err();
        assert!(err.is_reject());
        assert!(err.message().contains("x.y"), "{err}");
    }

    #[test]
    fn builders_chain() {
        let out = Output::bytes("report.csv", "text/csv", b"a,b\n".to_vec())
            .to_exchange("reports")
            .with_header("x-a", "1")
            .with_header("x-b", "2");
        assert_eq!(out.content_type.as_deref(), Some("text/csv"));
        assert_eq!(out.exchange.as_deref(), Some("reports"));
        assert_eq!(
            out.headers,
            vec![("x-a".into(), "1".into()), ("x-b".into(), "2".into())]
        );
    }
}
