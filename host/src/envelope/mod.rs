//! Messages on the wire ⇄ the [`Event`] a plugin sees, and plugin outputs ⇄ the
//! messages published for them.
//!
//! Three doors, one per direction a message takes:
//!
//! - [`decode`]: a [`Message`] a bus delivered → the [`Event`] for a plugin.
//! - [`encode_output`]: an [`Output`] a plugin returned → the [`Message`] to publish.
//! - [`ingress_message`]: a body posted to `POST /events/{exchange}/{routing_key}`
//!   → the [`Message`] to publish.
//!
//! # Formats
//!
//! - **Seed envelope** (`seed.rs`): the JSON object services already publish,
//!   `{id, type, source, timestamp, tenant_id, correlation_id, causation_id, hops,
//!   data, metadata}`. A missing `timestamp` becomes now.
//! - **CloudEvents 1.0, structured mode** (`cloudevents.rs`): content type
//!   `application/cloudevents+json`, the whole event as JSON in the body.
//! - **CloudEvents 1.0, binary mode** (`cloudevents.rs`): the body is the event's
//!   data, the AMQP content type its `datacontenttype`, every other attribute an
//!   AMQP header named `cloudEvents_<name>` (AMQP binding 1.0.3) or
//!   `cloudEvents:<name>` (1.0.2); both are accepted.
//! - **Raw** (`raw.rs`): any bytes. The routing key is the kind.
//!
//! # Identity
//!
//! An event's id is stable across deliveries: the envelope's (or CloudEvent's)
//! `id`; else the AMQP `message-id`; else one derived from the message itself
//! ([`derived_id`]), never a fresh random id per delivery. Output ids are
//! derived from it ([`output_id`]), so a redelivered input yields the same
//! outputs.
//!
//! Outputs are always published as seed envelopes, with the fields the host owns
//! filled in (see [`output_envelope`]): consumers of the router's outputs read one
//! format, whatever format the input came in.
//!
//! # Detection
//!
//! [`decode`] tries, in this order, and the first that matches decides:
//!
//! 1. The AMQP content type is `application/cloudevents+json` (parameters such as
//!    `; charset=utf-8` allowed) → structured CloudEvent. Other CloudEvents content
//!    types (`application/cloudevents-batch+json`, `application/cloudevents+avro`…)
//!    are errors, not raw bodies. This comes first because the content type is the
//!    producer's explicit statement, and because a structured CloudEvent has a
//!    string `type` and would otherwise pass for a seed envelope.
//! 2. Any header starts with `cloudEvents_` or `cloudEvents:` (ASCII case ignored)
//!    → binary-mode CloudEvent. Before the seed check because in binary mode the
//!    body is the event's data, which may well be a JSON object with a `type` of its
//!    own; the headers say whose attributes are whose.
//! 3. The body is a JSON object with a string `type` → seed envelope. The AMQP
//!    content type is not consulted: producers leave it empty or label JSON
//!    `text/plain` (Spring's `SimpleMessageConverter` does). A body that claims to
//!    be an envelope this way but is not a valid one is an error, not a raw body:
//!    silently turning it into raw would change its kind and its data.
//! 4. Anything else → raw.
//!
//! # Memory
//!
//! An input's `data` (and seed metadata, CloudEvents extensions) is passed on as
//! the JSON text it arrived as, never parsed into a tree: a tree of a 16 MiB array
//! of small numbers takes over 600 MiB, so one such message could take a replica's
//! memory. Bodies are read one level deep (`RawObject`).
//!
//! # Headers and hops
//!
//! Whatever the format, the event's headers are the format's own metadata (seed
//! `metadata`, CloudEvents extensions and `subject`/`dataschema`) followed by the
//! message's AMQP headers, less the `cloudEvents` ones and any that repeat a
//! (name, value) pair already there. The hop count the loop guard reads
//! ([`hops`]) is the `switchboard-hops` message header when there is one (the
//! host sets it on every output it publishes), else the envelope's own (`hops`,
//! or the `switchboardhops` CloudEvents extension); it appears once, as the
//! `switchboard-hops` event header.

mod cloudevents;
mod raw;
mod seed;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::de::IgnoredAny;
use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

pub use seed::{Envelope, output_envelope};

use crate::bus::Message;
use crate::runtime::{Event, Output};

/// Content type of JSON payloads.
pub const JSON: &str = "application/json";

/// Content type of payloads nobody described.
const OCTET_STREAM: &str = "application/octet-stream";

/// Header carrying the hop count on events that plugins produced.
pub const HOPS_HEADER: &str = "switchboard-hops";

/// Header naming the plugin that produced a published output.
pub const SOURCE_HEADER: &str = "switchboard-source";

/// Header marking a re-delivery by `switchboard replay --publish` (its value
/// names the replay): carried from the input to every output it causes, so
/// consumers can tell a replay from new traffic (the output ids repeat).
pub const REPLAY_HEADER: &str = "switchboard-replay";

/// Output header asking for the output to be published later: a decimal number
/// of milliseconds (the SDK's `Output::after`). The host reads it, checks it
/// against the plugin's `max_delay`, and does not publish it.
pub const DELAY_HEADER: &str = "switchboard-delay-ms";

/// The delay an output asks for with [`DELAY_HEADER`]: `Ok(None)` when it asks
/// for none, `Err` with one sentence when the value is not a whole number of
/// milliseconds up to `max` (a negative delay, a fraction, a word, too long).
/// The last such header counts, as a later `Output::after` replaces an earlier.
pub fn output_delay(
    output: &Output,
    max: std::time::Duration,
) -> Result<Option<std::time::Duration>, String> {
    let Some((_, value)) = output
        .headers
        .iter()
        .rev()
        .find(|(k, _)| k.eq_ignore_ascii_case(DELAY_HEADER))
    else {
        return Ok(None);
    };
    let text = value.trim();
    if text.starts_with('-') {
        return Err(format!("a negative delay ({DELAY_HEADER}: {text:?})"));
    }
    let ms = text
        .parse::<u64>()
        .map_err(|_| format!("{DELAY_HEADER} {text:?} is not a whole number of milliseconds"))?;
    let delay = std::time::Duration::from_millis(ms);
    if delay > max {
        return Err(format!(
            "a delay of {ms} ms is longer than max_delay ({} ms)",
            max.as_millis()
        ));
    }
    Ok((ms > 0).then_some(delay))
}

/// Whether header `name` carries a binary-mode CloudEvent's `time` attribute
/// (`cloudEvents_time`, `cloudEvents:time`, `ce-time`): the one header whose
/// AMQP timestamp the bus renders as RFC 3339 rather than as a number.
pub fn is_cloudevents_time_header(name: &str) -> bool {
    cloudevents::is_time_header(name)
}

/// Whether the host owns header `name`: every `switchboard-*` header.
pub fn is_host_header(name: &str) -> bool {
    name.get(..12)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case("switchboard-"))
}

/// Namespace of the name-based (v5) UUIDs given to outputs.
const OUTPUT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x8f6c_2d1e_5b3a_4c7d_9e0f_1a2b_3c4d_5e6f);

/// Why a message, a posted body or an output could not become an event or a message.
///
/// Each message is one sentence saying what is wrong with the input; the caller
/// adds which message it was (exchange, routing key, message id).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// A seed envelope that is not valid JSON of the envelope's shape.
    #[error("not a JSON envelope: {0}")]
    Malformed(String),
    /// A seed envelope whose `type` is the empty string.
    #[error("envelope has an empty \"type\"")]
    EmptyKind,
    /// A raw body (or a JSON value posted to the ingress) with no routing key to
    /// use as its kind.
    #[error("the routing key is empty, and a raw message takes its kind from it")]
    EmptyRoutingKey,
    /// `data_base64` (seed or structured CloudEvent) that does not decode.
    #[error("\"data_base64\" is not base64: {0}")]
    BadBase64(String),
    /// A `switchboard-hops` header or hop attribute that is not a count.
    #[error("the hop count {0:?} is not a non-negative integer")]
    BadHops(String),
    /// `application/cloudevents-batch+json`.
    #[error(
        "CloudEvents batch mode (application/cloudevents-batch+json) is not supported; \
         publish one event per message"
    )]
    BatchUnsupported,
    /// A CloudEvents event format other than JSON, e.g. `application/cloudevents+avro`.
    #[error(
        "CloudEvents format {0:?} is not supported; use application/cloudevents+json \
         or binary mode"
    )]
    UnsupportedFormat(String),
    /// A structured CloudEvent whose body is not a JSON object.
    #[error("a structured CloudEvent must be a JSON object: {0}")]
    NotAnObject(String),
    /// A CloudEvent with a `specversion` other than 1.0.
    #[error("CloudEvents specversion {0:?} is not supported; only \"1.0\" is")]
    UnsupportedSpecVersion(String),
    /// A CloudEvent without one of its required attributes.
    #[error("CloudEvent ({mode}) has no {name:?} attribute, which is required")]
    MissingAttribute {
        /// Which mode carried the event.
        mode: CloudEventsMode,
        /// The attribute, e.g. `id`.
        name: &'static str,
    },
    /// A CloudEvent attribute with a value it cannot have.
    #[error("CloudEvent attribute {name:?} {problem}")]
    BadAttribute {
        /// The attribute, e.g. `time`.
        name: String,
        /// What is wrong with it, e.g. `is empty`.
        problem: String,
    },
    /// A body posted to the ingress with a JSON content type that is not JSON.
    #[error("the body is labelled {content_type} but is not JSON: {error}")]
    NotJson {
        /// The content type the request gave.
        content_type: String,
        /// serde's message.
        error: String,
    },
    /// A body posted to the ingress that is neither JSON nor labelled.
    #[error("the body is not JSON and no content type says what it is")]
    NoContentType,
    /// An output declared JSON whose data is not JSON.
    #[error("output {index} ({kind}) is declared JSON but its data is not: {error}")]
    OutputNotJson {
        /// The output's position in the plugin's result.
        index: usize,
        /// The output's kind.
        kind: String,
        /// serde's message.
        error: String,
    },
    /// JSON serialization failed (cannot happen for the values built here; kept so
    /// that it is an error rather than a panic if it ever does).
    #[error("cannot serialize the envelope: {0}")]
    Unserializable(String),
}

/// Longest piece of an input that an [`EnvelopeError`] quotes, in bytes.
const QUOTE_MAX: usize = 200;

impl EnvelopeError {
    /// The same error with every piece of input it quotes cut to [`QUOTE_MAX`]
    /// bytes: a hop count or a `specversion` may be a mebibyte long, and the
    /// error goes to logs, dead-letter headers and HTTP replies.
    fn bounded(self) -> Self {
        let cut = |text: String| match crate::runtime::excerpt(&text, QUOTE_MAX) {
            std::borrow::Cow::Borrowed(_) => text,
            std::borrow::Cow::Owned(cut) => cut,
        };
        match self {
            Self::Malformed(e) => Self::Malformed(cut(e)),
            Self::BadBase64(e) => Self::BadBase64(cut(e)),
            Self::BadHops(text) => Self::BadHops(cut(text)),
            Self::UnsupportedFormat(ct) => Self::UnsupportedFormat(cut(ct)),
            Self::NotAnObject(e) => Self::NotAnObject(cut(e)),
            Self::UnsupportedSpecVersion(v) => Self::UnsupportedSpecVersion(cut(v)),
            Self::BadAttribute { name, problem } => Self::BadAttribute {
                name: cut(name),
                problem: cut(problem),
            },
            Self::NotJson {
                content_type,
                error,
            } => Self::NotJson {
                content_type: cut(content_type),
                error: cut(error),
            },
            Self::OutputNotJson { index, kind, error } => Self::OutputNotJson {
                index,
                kind: cut(kind),
                error: cut(error),
            },
            Self::Unserializable(e) => Self::Unserializable(cut(e)),
            other @ (Self::EmptyKind
            | Self::EmptyRoutingKey
            | Self::BatchUnsupported
            | Self::MissingAttribute { .. }
            | Self::NoContentType) => other,
        }
    }
}

/// How a CloudEvent was carried, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudEventsMode {
    /// `application/cloudevents+json`: the whole event is the body.
    Structured,
    /// Attributes in `cloudEvents_*` / `cloudEvents:*` / `ce-*` headers, data in
    /// the body.
    Binary,
}

impl std::fmt::Display for CloudEventsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Structured => "structured mode, application/cloudevents+json",
            Self::Binary => "binary mode, cloudEvents_* or ce-* headers",
        })
    }
}

/// An event a format produced, with the hop count its envelope carried kept
/// apart: a `switchboard-hops` message header overrides it.
struct Decoded {
    event: Event,
    hops: Option<u32>,
}

/// The event a plugin sees for `message`, delivered from `exchange` with
/// `routing_key` on delivery `attempt` (1 the first time).
///
/// The format is detected as the [module docs](self) describe. `event.exchange`
/// and `event.attempt` are the arguments; the kind is the envelope's `type`
/// (routing key for raw bodies), which need not equal the routing key. Malformed
/// input is an [`EnvelopeError`], never a panic: such a message can never be
/// handled and belongs in the dead-letter queue at once. The error quotes at most
/// a short excerpt of any input value.
pub fn decode(
    exchange: &str,
    routing_key: &str,
    message: &Message,
    attempt: u32,
) -> Result<Event, EnvelopeError> {
    decode_unbounded(exchange, routing_key, message, attempt).map_err(EnvelopeError::bounded)
}

fn decode_unbounded(
    exchange: &str,
    routing_key: &str,
    message: &Message,
    attempt: u32,
) -> Result<Event, EnvelopeError> {
    let decoded = if let Some(content_type) = &message.content_type
        && cloudevents::is_structured(content_type)?
    {
        cloudevents::structured(&message.body, exchange, attempt)?
    } else if message
        .headers
        .iter()
        .any(|(name, _)| cloudevents::marks_binary(name))
    {
        cloudevents::binary(message, exchange, attempt)?
    } else if seed::probe(&message.body) {
        seed::decode(&message.body, exchange, attempt)?
    } else {
        raw::decode(routing_key, message, exchange, attempt)?
    };
    let mut event = with_message_headers(decoded, message)?;
    if event.id.is_empty() {
        event.id = match message.message_id.as_deref().filter(|id| !id.is_empty()) {
            Some(id) => id.to_string(),
            None => derived_id(exchange, routing_key, message),
        };
    }
    Ok(event)
}

/// The event the bus delivers for a recorded body (one line of a JSONL file of
/// envelopes: `switchboard test`, golden files, benchmarks), decoded by
/// [`decode`] exactly as a message published to `exchange` with no AMQP
/// properties but `message_id`, with the envelope's `type` as its routing key.
/// Whatever decides what plugins see in production decides it here too.
pub fn decode_recorded(
    exchange: &str,
    body: &[u8],
    message_id: Option<&str>,
) -> Result<Event, EnvelopeError> {
    #[derive(serde::Deserialize)]
    struct Kind {
        #[serde(rename = "type")]
        kind: Option<Value>,
    }
    let routing_key = serde_json::from_slice::<Kind>(body)
        .ok()
        .and_then(|k| match k.kind {
            Some(Value::String(kind)) => Some(kind),
            _ => None,
        })
        .unwrap_or_default();
    let message = Message {
        body: Bytes::copy_from_slice(body),
        content_type: None,
        message_id: message_id.map(str::to_string),
        headers: Vec::new(),
    };
    decode(exchange, &routing_key, &message, 1)
}

/// Namespace of the name-based (v5) UUIDs derived for events that carry no id.
const DERIVED_ID_NAMESPACE: Uuid = Uuid::from_u128(0x3a1f_6c2e_8d4b_4e5f_a607_1b2c_3d4e_5f60);

/// The id of an event that has none (no envelope `id`, no AMQP `message-id`):
/// a UUIDv5 of the exchange and routing key it was published with, its content
/// type and its body, the same on every delivery, retry and dead-letter copy
/// (they keep all four), so that plugins that claim work by event id (billing
/// does) see a redelivery as itself. Two such messages alike in all four are
/// one event to the router: producers that can publish the same body twice on
/// purpose give their events ids.
pub fn derived_id(exchange: &str, routing_key: &str, message: &Message) -> String {
    let content_type = message.content_type.as_deref().unwrap_or("");
    let mut name = Vec::with_capacity(
        exchange.len() + routing_key.len() + content_type.len() + message.body.len() + 3,
    );
    for part in [
        exchange.as_bytes(),
        routing_key.as_bytes(),
        content_type.as_bytes(),
    ] {
        name.extend_from_slice(part);
        name.push(0);
    }
    name.extend_from_slice(&message.body);
    Uuid::new_v5(&DERIVED_ID_NAMESPACE, &name).to_string()
}

/// Adds the message's headers to a decoded event and settles its hop count.
fn with_message_headers(decoded: Decoded, message: &Message) -> Result<Event, EnvelopeError> {
    let Decoded {
        mut event,
        mut hops,
    } = decoded;
    // A `switchboard-hops` entry in seed metadata or a CloudEvents extension counts
    // as the envelope's own hop count when it has no other.
    if let Some(at) = event.headers.iter().position(|(k, _)| k == HOPS_HEADER) {
        let (_, stray) = event.headers.remove(at);
        if hops.is_none() {
            hops = Some(parse_hops(&stray)?);
        }
        event.headers.retain(|(k, _)| k != HOPS_HEADER);
    }
    if let Some(header) = message.header(HOPS_HEADER) {
        hops = Some(parse_hops(header)?);
    }
    for (name, value) in &message.headers {
        let repeated = event.headers.iter().any(|(k, v)| k == name && v == value);
        if name != HOPS_HEADER && cloudevents::attribute_name(name).is_none() && !repeated {
            event.headers.push((name.clone(), value.clone()));
        }
    }
    if let Some(hops) = hops {
        event.headers.push((HOPS_HEADER.into(), hops.to_string()));
    }
    Ok(event)
}

fn parse_hops(text: &str) -> Result<u32, EnvelopeError> {
    text.trim()
        .parse()
        .map_err(|_| EnvelopeError::BadHops(text.into()))
}

/// W3C trace context headers: carried from an input to every output it causes
/// (unless the output sets its own), so that a trace follows a flow through
/// plugins and the broker.
pub const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// The message to publish for output `index` that `plugin` produced from `input`.
///
/// Outputs are always published as seed envelopes (the body is the JSON of
/// [`output_envelope`]), whatever format the input came in, with content type
/// `application/json` and the output's deterministic id ([`output_id`]) as
/// `message_id`. Headers: `switchboard-hops` (the input's hops + 1),
/// `switchboard-source` (the plugin), `switchboard-replay` when the input has it,
/// then the output's own headers, less any that
/// the host owns (every `switchboard-*` header: hop count, source, and the attempt,
/// origin and failure headers of moved messages, which a plugin copying its
/// input's headers would otherwise pass on) or that would make the message look
/// like a binary-mode CloudEvent
/// (`cloudEvents_*`, `cloudEvents:*`), then the input's W3C `traceparent` and
/// `tracestate` where the output did not set them. Where to publish
/// (`output.exchange`) is the caller's business.
pub fn encode_output(
    plugin: &str,
    input: &Event,
    index: usize,
    output: &Output,
) -> Result<Message, EnvelopeError> {
    let envelope = output_envelope(plugin, input, index, output)?;
    let mut headers = Vec::with_capacity(output.headers.len() + 2);
    if let Some(hops) = envelope.hops {
        headers.push((HOPS_HEADER.to_owned(), hops.to_string()));
    }
    headers.push((SOURCE_HEADER.to_owned(), plugin.to_owned()));
    headers.extend(
        output
            .headers
            .iter()
            .filter(|(k, _)| !is_host_header(k) && cloudevents::attribute_name(k).is_none())
            .cloned(),
    );
    if let Some((_, replay)) = input.headers.iter().find(|(k, _)| k == REPLAY_HEADER) {
        headers.push((REPLAY_HEADER.to_owned(), replay.clone()));
    }
    for name in TRACE_HEADERS {
        if headers.iter().any(|(k, _)| k == name) {
            continue;
        }
        if let Some((_, value)) = input.headers.iter().find(|(k, _)| k == name) {
            headers.push((name.to_owned(), value.clone()));
        }
    }
    let message_id = envelope.id.clone();
    let body =
        serde_json::to_vec(&envelope).map_err(|e| EnvelopeError::Unserializable(e.to_string()))?;
    Ok(Message {
        body: Bytes::from(body),
        content_type: Some(JSON.into()),
        message_id,
        headers,
    })
}

/// The message to publish for a body posted to `POST /events/{exchange}/{routing_key}`
/// with the request's `content_type`, and the event id to answer with.
///
/// - `application/cloudevents+json`: published as is, once it has passed the
///   checks [`decode`] will make (so a bad event is a 400 now, not a dead letter
///   later); the id is its `id`.
/// - A JSON object with a string `type` (a seed envelope, whatever the content
///   type says): checked likewise, then given a UUIDv7 `id` and a `timestamp` if it
///   has none, and re-serialized; fields it does not know are kept. Its `type` may
///   differ from the routing key: routing uses the key.
/// - Any other JSON value: wrapped as the `data` of a new seed envelope whose
///   `type` is the routing key.
/// - Anything else, when a content type says what it is: published raw, with a
///   new UUIDv7 as `message_id`. Without a content type, or with a JSON one, it is
///   refused.
pub fn ingress_message(
    routing_key: &str,
    body: &[u8],
    content_type: Option<&str>,
) -> Result<(Message, String), EnvelopeError> {
    ingress_unbounded(routing_key, body, content_type).map_err(EnvelopeError::bounded)
}

fn ingress_unbounded(
    routing_key: &str,
    body: &[u8],
    content_type: Option<&str>,
) -> Result<(Message, String), EnvelopeError> {
    let content_type = content_type.map(str::trim).filter(|ct| !ct.is_empty());
    let structured = match content_type {
        Some(ct) => cloudevents::is_structured(ct)?,
        None => false,
    };
    let message = if structured {
        Message {
            body: Bytes::copy_from_slice(body),
            content_type: content_type.map(Into::into),
            ..Message::default()
        }
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(value) => {
                let body = match value {
                    Value::Object(object) if seed::is_envelope(&object) => seed::complete(object)?,
                    value => seed::wrap(routing_key, value)?,
                };
                Message {
                    body: Bytes::from(body),
                    content_type: Some(JSON.into()),
                    ..Message::default()
                }
            }
            Err(error) => match content_type {
                None => return Err(EnvelopeError::NoContentType),
                Some(ct) if is_json(ct) => {
                    return Err(EnvelopeError::NotJson {
                        content_type: ct.into(),
                        error: error.to_string(),
                    });
                }
                Some(ct) => Message {
                    body: Bytes::copy_from_slice(body),
                    content_type: Some(ct.into()),
                    message_id: Some(Uuid::now_v7().to_string()),
                    headers: Vec::new(),
                },
            },
        }
    };
    // Refuse now what every consumer would dead-letter later; the id is the one
    // they will see.
    let event = decode("", routing_key, &message, 1)?;
    let message = Message {
        message_id: Some(event.id.clone()),
        ..message
    };
    Ok((message, event.id))
}

/// Hops behind an event (0 for events that came from services): the
/// `switchboard-hops` header that [`decode`] sets.
pub fn hops(event: &Event) -> u32 {
    event
        .headers
        .iter()
        .find(|(k, _)| k == HOPS_HEADER)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The id of output `index` of `plugin` for input `input_id`: the same inputs
/// always give the same id, so consumers can drop duplicates of a redelivery.
pub fn output_id(input_id: &str, plugin: &str, index: usize) -> String {
    let name = format!("{input_id}\u{1f}{plugin}\u{1f}{index}");
    Uuid::new_v5(&OUTPUT_ID_NAMESPACE, name.as_bytes()).to_string()
}

/// The current time, RFC 3339 in UTC with milliseconds.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The members of a JSON object, each value kept as the JSON text it arrived as.
///
/// Bodies are read one level deep and no further: the values that can be large
/// (`data`, metadata, extensions) are passed on as text, and parsing them into
/// `serde_json::Value` trees only to print them again would cost up to forty
/// times their size — a 16 MiB array of small numbers takes over 600 MiB.
/// Duplicate names: the last one counts, as with `Value`.
type RawObject<'a> = BTreeMap<String, &'a RawValue>;

/// The object in `body`; `Err` says why it is none: it is not JSON (serde's
/// message), or it is JSON of another kind (`"the body is an array"`).
fn raw_object(body: &[u8]) -> Result<RawObject<'_>, String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return match serde_json::from_slice::<IgnoredAny>(body) {
            Ok(_) => {
                let kind = first.map_or("null", |b| first_byte_type(*b));
                Err(format!("the body is {kind}"))
            }
            Err(e) => Err(e.to_string()),
        };
    }
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// What kind of JSON value `raw` is, for error messages.
fn raw_type(raw: &RawValue) -> &'static str {
    raw.get().bytes().next().map_or("null", first_byte_type)
}

fn first_byte_type(first: u8) -> &'static str {
    match first {
        b'{' => "an object",
        b'[' => "an array",
        b'"' => "a string",
        b't' | b'f' => "a boolean",
        b'n' => "null",
        _ => "a number",
    }
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// A string's text, unescaped; any other value's JSON text as it arrived.
fn raw_text(raw: &RawValue) -> Result<String, serde_json::Error> {
    if raw.get().starts_with('"') {
        serde_json::from_str(raw.get())
    } else {
        Ok(raw.get().to_owned())
    }
}

/// A content type without its parameters: `text/plain; charset=utf-8` → `text/plain`.
fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

/// Whether a content type is JSON: `application/json` or any `+json` type.
fn is_json(content_type: &str) -> bool {
    let essence = essence(content_type);
    essence.eq_ignore_ascii_case(JSON) || essence.to_ascii_lowercase().ends_with("+json")
}
