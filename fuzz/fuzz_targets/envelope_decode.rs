//! The envelope decoder on hostile messages, and the output encoder on what it
//! decodes.
//!
//! The input is a message written out like an AMQP delivery, so that seeds and
//! crash files can be read and edited: header lines `name: value`, a blank line,
//! then the body's bytes. The names `routing-key`, `exchange`, `attempt`,
//! `content-type` and `message-id` set those; every other line is an AMQP header
//! (any number, repeats kept in order). Input without a blank line is all body,
//! delivered with routing key `fuzz.key`.
//!
//! Checked: [`decode`] never panics. An error says something. An event keeps
//! what the decoder promises: the exchange and attempt it was given, a kind and
//! an id, at most one hop header, which is the message's own when it has one,
//! every plain message header, and for a raw body the routing key as kind, the
//! body as data and the message id as id. Then the event is handed back as a
//! plugin output: [`encode_output`] succeeds unless JSON data is not JSON, and
//! what it publishes decodes to the same kind, content type, data and headers,
//! with the host's fields (id, source, causation, correlation, hops) filled in.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use switchboard::bus::Message;
use switchboard::envelope::{
    EnvelopeError, HOPS_HEADER, SOURCE_HEADER, decode, encode_output, hops, output_id,
};
use switchboard::runtime::{Event, Output};

/// One delivery: what [`decode`] is given.
struct Delivery {
    exchange: String,
    routing_key: String,
    attempt: u32,
    message: Message,
}

fuzz_target!(|data: &[u8]| {
    let delivery = delivery(data);
    let Delivery {
        exchange,
        routing_key,
        attempt,
        message,
    } = &delivery;
    match decode(exchange, routing_key, message, *attempt) {
        Ok(event) => {
            check_event(&delivery, &event);
            check_output_round_trip(&event);
        }
        Err(error) => assert!(!error.to_string().is_empty(), "{error:?}"),
    }
});

fn delivery(data: &[u8]) -> Delivery {
    let mut delivery = Delivery {
        exchange: "events".into(),
        routing_key: "fuzz.key".into(),
        attempt: 1,
        message: Message::default(),
    };
    let Some(blank) = data.windows(2).position(|w| w == b"\n\n") else {
        delivery.message.body = Bytes::copy_from_slice(data);
        return delivery;
    };
    let (head, body) = (&data[..blank], &data[blank + 2..]);
    delivery.message.body = Bytes::copy_from_slice(body);
    for line in String::from_utf8_lossy(head).split('\n') {
        let (name, value) = line.split_once(": ").unwrap_or((line, ""));
        let value = value.to_owned();
        match name {
            "routing-key" => delivery.routing_key = value,
            "exchange" => delivery.exchange = value,
            "attempt" => delivery.attempt = value.trim().parse().unwrap_or(u32::MAX),
            "content-type" => delivery.message.content_type = Some(value),
            "message-id" => delivery.message.message_id = Some(value),
            _ => delivery.message.headers.push((name.to_owned(), value)),
        }
    }
    delivery
}

/// The attribute a binary-mode CloudEvents header names (`cloudEvents_id`,
/// `cloudEvents:id`, prefix in any ASCII case), as the decoder reads them.
fn is_cloudevents_header(name: &str) -> bool {
    ["cloudEvents_", "cloudEvents:"].iter().any(|prefix| {
        name.len() > prefix.len()
            && name
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    })
}

fn header<'a>(event: &'a Event, name: &str) -> Option<&'a str> {
    event
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn check_event(delivery: &Delivery, event: &Event) {
    let message = &delivery.message;
    assert_eq!(event.exchange, delivery.exchange);
    assert_eq!(event.attempt, delivery.attempt);
    assert!(!event.kind.is_empty(), "empty kind: {event:?}");
    assert!(!event.id.is_empty(), "empty id: {event:?}");

    let hop_headers: Vec<&str> = event
        .headers
        .iter()
        .filter(|(k, _)| k == HOPS_HEADER)
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(hop_headers.len() <= 1, "{hop_headers:?}");
    if let Some(hops) = hop_headers.first() {
        assert!(hops.parse::<u32>().is_ok(), "hop header {hops:?}");
    }
    if let Some(sent) = message.header(HOPS_HEADER) {
        let sent = sent.trim().parse::<u32>().ok().map(|n| n.to_string());
        assert_eq!(hop_headers.first().map(|h| h.to_string()), sent);
    }
    for (name, value) in &message.headers {
        if name != HOPS_HEADER && !is_cloudevents_header(name) {
            assert!(
                event.headers.iter().any(|(k, v)| k == name && v == value),
                "message header {name:?} = {value:?} lost: {:?}",
                event.headers
            );
        }
    }

    if is_raw(message) {
        assert_eq!(event.kind, delivery.routing_key);
        assert_eq!(event.data, message.body);
        if let Some(id) = message.message_id.as_deref().filter(|id| !id.is_empty()) {
            assert_eq!(event.id, id);
        }
    }
}

/// Whether the decoder must take `message` as a raw body: no CloudEvents
/// content type or header, and no JSON object with a string `type`.
fn is_raw(message: &Message) -> bool {
    let cloudevents_type = message.content_type.as_deref().is_some_and(|ct| {
        ct.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
            .starts_with("application/cloudevents")
    });
    let cloudevents_headers = message
        .headers
        .iter()
        .any(|(name, _)| is_cloudevents_header(name));
    let envelope = match serde_json::from_slice::<Value>(&message.body) {
        Ok(Value::Object(object)) => object.get("type").is_some_and(Value::is_string),
        _ => false,
    };
    !cloudevents_type && !cloudevents_headers && !envelope
}

/// Whether a content type is JSON, as the encoder decides.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
}

fn check_output_round_trip(event: &Event) {
    let output = Output {
        kind: event.kind.clone(),
        content_type: Some(event.content_type.clone()),
        data: event.data.clone(),
        exchange: None,
        headers: event.headers.clone(),
    };
    let message = match encode_output("fuzz", event, 0, &output) {
        Ok(message) => message,
        Err(EnvelopeError::OutputNotJson { .. }) => {
            assert!(is_json(&event.content_type), "{:?}", event.content_type);
            assert!(serde_json::from_slice::<Value>(&event.data).is_err());
            return;
        }
        Err(error) => panic!("encode_output: {error}"),
    };
    let next = decode("out", &event.kind, &message, 1)
        .unwrap_or_else(|e| panic!("the published output does not decode: {e}"));
    assert_eq!(next.kind, event.kind);
    assert_eq!(next.id, output_id(&event.id, "fuzz", 0));
    assert_eq!(next.source, "fuzz");
    assert_eq!(next.causation_id.as_deref(), Some(event.id.as_str()));
    assert_eq!(
        next.correlation_id.as_deref(),
        Some(event.correlation_id.as_deref().unwrap_or(&event.id))
    );
    assert_eq!(next.tenant_id, event.tenant_id);
    assert_eq!(hops(&next), hops(event).saturating_add(1));
    assert_eq!(header(&next, SOURCE_HEADER), Some("fuzz"));
    assert_eq!(next.content_type, event.content_type);
    if is_json(&event.content_type) {
        let (before, after) = (json(&event.data), json(&next.data));
        assert!(same_json(&before, &after), "{before} became {after}");
    } else {
        assert_eq!(next.data, event.data);
    }
    for (name, value) in &event.headers {
        if name != HOPS_HEADER && name != SOURCE_HEADER && !is_cloudevents_header(name) {
            assert!(
                next.headers.iter().any(|(k, v)| k == name && v == value),
                "output header {name:?} = {value:?} lost: {:?}",
                next.headers
            );
        }
    }
}

fn json(data: &[u8]) -> Value {
    serde_json::from_slice(data).unwrap_or_else(|e| panic!("not JSON ({e}): {data:?}"))
}

/// JSON equality, with floats equal to the last bit or two: serde_json's default
/// float parsing may round a printed float to a neighbour.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x == y || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs(),
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}
