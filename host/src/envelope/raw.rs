//! Raw bodies: any bytes that are neither a CloudEvent nor a seed envelope, from
//! producers that publish their payload and nothing else.
//!
//! What the envelope would have said comes from the message: the routing key is
//! the kind, the AMQP `message-id` the id (or, when there is none, an id derived
//! from the message itself, the same on every delivery: see
//! [`super::decode`]), the AMQP content type the content type. The source is
//! unknown (empty) and the time is when the router decoded it.

use serde::de::IgnoredAny;

use super::{Decoded, EnvelopeError, JSON, OCTET_STREAM, now_rfc3339};
use crate::bus::Message;
use crate::runtime::Event;

/// The event for a raw message delivered with `routing_key`. Its headers are added
/// by the caller, as for every format.
pub(super) fn decode(
    routing_key: &str,
    message: &Message,
    exchange: &str,
    attempt: u32,
) -> Result<Decoded, EnvelopeError> {
    if routing_key.is_empty() {
        return Err(EnvelopeError::EmptyRoutingKey);
    }
    let content_type = message
        .content_type
        .clone()
        .filter(|ct| !ct.trim().is_empty())
        .unwrap_or_else(|| infer_content_type(&message.body).into());
    Ok(Decoded {
        event: Event {
            // Filled in by `envelope::decode`: the message id, else derived.
            id: String::new(),
            kind: routing_key.into(),
            exchange: exchange.into(),
            attempt,
            source: String::new(),
            time: now_rfc3339(),
            correlation_id: None,
            causation_id: None,
            tenant_id: None,
            content_type,
            data: message.body.to_vec(),
            headers: Vec::new(),
        },
        hops: None,
    })
}

/// The content type of a body nobody labelled: JSON when it parses as JSON (the
/// check allocates nothing), bytes otherwise.
pub(super) fn infer_content_type(body: &[u8]) -> &'static str {
    if serde_json::from_slice::<IgnoredAny>(body).is_ok() {
        JSON
    } else {
        OCTET_STREAM
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlabelled_bodies_are_json_when_they_parse() {
        assert_eq!(infer_content_type(br#"{"a":[1,2]}"#), JSON);
        assert_eq!(infer_content_type(b" 42 "), JSON);
        assert_eq!(infer_content_type(b""), OCTET_STREAM);
        assert_eq!(infer_content_type(b"{\"a\":1} trailing"), OCTET_STREAM);
        assert_eq!(infer_content_type(&[0xff, 0x00, 0x7b]), OCTET_STREAM);
    }
}
