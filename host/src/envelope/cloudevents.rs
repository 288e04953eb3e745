//! CloudEvents 1.0 over AMQP, in both modes of the AMQP protocol binding.
//!
//! - Structured: content type `application/cloudevents+json`, the whole event as
//!   one JSON object in the body (the CloudEvents JSON event format).
//! - Binary: the body is the event's data, the AMQP content type its
//!   `datacontenttype`, and each other attribute a header `cloudEvents_<name>`
//!   (binding 1.0.3, since `:` is not valid in JMS property names) or
//!   `cloudEvents:<name>` (1.0.2). Producers use both, so both are accepted, and
//!   so is `ce-<name>`, the prefix of the CloudEvents SDKs' RabbitMQ bindings.
//!   `time` may be an RFC 3339 string or, as the AMQP binding allows, an AMQP
//!   timestamp: the AMQP side renders that one as RFC 3339 (see
//!   [`is_time_header`]).
//!
//! Attributes map onto the [`Event`] as follows: `id`, `source`, `type` (→ kind),
//! `time`, `datacontenttype` (→ content type) to their fields; the extensions
//! `correlationid`, `causationid`, `tenantid` (names compared ignoring ASCII case)
//! to the correlation, causation and tenant ids; `switchboardhops` to the hop
//! count. `subject`, `dataschema` and every other extension become event headers
//! under their own names.

use base64::Engine as _;

use super::{
    CloudEventsMode, Decoded, EnvelopeError, JSON, OCTET_STREAM, essence, is_json, is_null,
    now_rfc3339, parse_hops, raw, raw_object, raw_text, raw_type,
};
use crate::bus::Message;
use crate::runtime::Event;

/// The only version of the specification understood here.
const SPEC_VERSION: &str = "1.0";

/// Header prefixes of binary mode: AMQP binding 1.0.3, then 1.0.2, then the
/// one the SDKs' RabbitMQ bindings use (the HTTP binding's).
const PREFIXES: [&str; 3] = ["cloudEvents_", "cloudEvents:", "ce-"];

/// Content type of structured mode with the JSON event format.
const STRUCTURED: &str = "application/cloudevents+json";

/// Attributes that the specification types as strings: any other JSON type is an
/// error rather than something to stringify.
const STRING_ATTRIBUTES: [&str; 8] = [
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "datacontenttype",
    "dataschema",
    "subject",
];

/// Whether `content_type` announces a structured CloudEvent. Other CloudEvents
/// content types (batch mode, event formats other than JSON) are errors: treating
/// them as raw bodies would hand plugins a batch or an Avro record as one event.
pub(super) fn is_structured(content_type: &str) -> Result<bool, EnvelopeError> {
    let essence = essence(content_type).to_ascii_lowercase();
    if essence == STRUCTURED {
        Ok(true)
    } else if essence.starts_with("application/cloudevents-batch") {
        Err(EnvelopeError::BatchUnsupported)
    } else if essence.starts_with("application/cloudevents") {
        Err(EnvelopeError::UnsupportedFormat(essence))
    } else {
        Ok(false)
    }
}

/// The attribute a binary-mode header carries (`cloudEvents_id` → `id`), or `None`
/// when the header is not a CloudEvents one. Prefixes match ignoring ASCII case.
pub(super) fn attribute_name(header: &str) -> Option<&str> {
    PREFIXES
        .iter()
        .find_map(|prefix| {
            let head = header.get(..prefix.len())?;
            if head.eq_ignore_ascii_case(prefix) {
                header.get(prefix.len()..)
            } else {
                None
            }
        })
        .filter(|name| !name.is_empty())
}

/// Whether header `name` makes a message a binary-mode CloudEvent: any
/// `cloudEvents_*` or `cloudEvents:*` header, but of the `ce-` prefix (common
/// enough elsewhere) only `ce-specversion`, which every CloudEvent has.
pub(super) fn marks_binary(name: &str) -> bool {
    match attribute_name(name) {
        Some(attribute) if name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ce-")) => {
            attribute.eq_ignore_ascii_case("specversion")
        }
        Some(_) => true,
        None => false,
    }
}

/// Whether header `name` carries the `time` attribute in binary mode: its value
/// may come as an AMQP timestamp rather than as text.
pub(super) fn is_time_header(name: &str) -> bool {
    attribute_name(name).is_some_and(|attribute| attribute.eq_ignore_ascii_case("time"))
}

/// The event in a structured-mode body.
///
/// `data` is the JSON text of the value when `datacontenttype` is JSON or absent,
/// the string's bytes when it names another type and the value is a string;
/// `data_base64` is decoded. A `null` attribute counts as absent (JSON format §2.3).
/// Extension attributes that are not strings become their JSON text, as sent.
pub(super) fn structured(
    body: &[u8],
    exchange: &str,
    attempt: u32,
) -> Result<Decoded, EnvelopeError> {
    let mut object = raw_object(body).map_err(EnvelopeError::NotAnObject)?;
    let data = object.remove("data").filter(|v| !is_null(v));
    let data_base64 = object.remove("data_base64").filter(|v| !is_null(v));
    let mut attributes = Vec::with_capacity(object.len());
    for (name, value) in object {
        if is_null(value) {
            continue;
        }
        if STRING_ATTRIBUTES.contains(&name.as_str()) && !value.get().starts_with('"') {
            return Err(EnvelopeError::BadAttribute {
                problem: format!("must be a string, not {}", raw_type(value)),
                name,
            });
        }
        let text = raw_text(value).map_err(|e| EnvelopeError::BadAttribute {
            name: name.clone(),
            problem: format!("is not a valid JSON string: {e}"),
        })?;
        attributes.push((name, text));
    }
    let context = Context::parse(CloudEventsMode::Structured, attributes)?;
    let declared = context.datacontenttype.clone();
    let (content_type, data) = match (data, data_base64) {
        (Some(_), Some(_)) => {
            return Err(EnvelopeError::BadAttribute {
                name: "data_base64".into(),
                problem: "cannot be given together with \"data\"".into(),
            });
        }
        (None, Some(b64)) if b64.get().starts_with('"') => {
            let b64 = raw_text(b64).map_err(|e| EnvelopeError::BadBase64(e.to_string()))?;
            (
                declared.unwrap_or_else(|| OCTET_STREAM.into()),
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| EnvelopeError::BadBase64(e.to_string()))?,
            )
        }
        (None, Some(other)) => {
            return Err(EnvelopeError::BadAttribute {
                name: "data_base64".into(),
                problem: format!("must be a string, not {}", raw_type(other)),
            });
        }
        (Some(value), None) => {
            let content_type = declared.unwrap_or_else(|| JSON.into());
            let data = if value.get().starts_with('"') && !is_json(&content_type) {
                raw_text(value)
                    .map_err(|e| EnvelopeError::BadAttribute {
                        name: "data".into(),
                        problem: format!("is not a valid JSON string: {e}"),
                    })?
                    .into_bytes()
            } else {
                value.get().as_bytes().to_vec()
            };
            (content_type, data)
        }
        (None, None) => (declared.unwrap_or_else(|| JSON.into()), Vec::new()),
    };
    Ok(context.into_decoded(exchange, attempt, content_type, data))
}

/// The event in a binary-mode message: attributes from its `cloudEvents` headers
/// (the first of a name wins when both prefixes carry it), data from its body.
///
/// The content type is the AMQP one, else a `datacontenttype` header, else
/// inferred as for raw bodies.
pub(super) fn binary(
    message: &Message,
    exchange: &str,
    attempt: u32,
) -> Result<Decoded, EnvelopeError> {
    let mut attributes: Vec<(String, String)> = Vec::new();
    for (header, value) in &message.headers {
        if let Some(name) = attribute_name(header) {
            let name = name.to_ascii_lowercase();
            if !attributes.iter().any(|(seen, _)| *seen == name) {
                attributes.push((name, value.clone()));
            }
        }
    }
    let context = Context::parse(CloudEventsMode::Binary, attributes)?;
    let content_type = message
        .content_type
        .clone()
        .filter(|ct| !ct.trim().is_empty())
        .or_else(|| context.datacontenttype.clone())
        .unwrap_or_else(|| raw::infer_content_type(&message.body).into());
    Ok(context.into_decoded(exchange, attempt, content_type, message.body.to_vec()))
}

/// The context attributes of one CloudEvent, checked, whichever mode carried them.
struct Context {
    id: String,
    source: String,
    kind: String,
    time: String,
    datacontenttype: Option<String>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    tenant_id: Option<String>,
    hops: Option<u32>,
    /// `subject`, `dataschema` and the extensions that have no field of their own.
    headers: Vec<(String, String)>,
}

impl Context {
    fn parse(
        mode: CloudEventsMode,
        attributes: Vec<(String, String)>,
    ) -> Result<Self, EnvelopeError> {
        let mut specversion = None;
        let (mut id, mut source, mut kind, mut time) = (None, None, None, None);
        let mut context = Self {
            id: String::new(),
            source: String::new(),
            kind: String::new(),
            time: String::new(),
            datacontenttype: None,
            correlation_id: None,
            causation_id: None,
            tenant_id: None,
            hops: None,
            headers: Vec::new(),
        };
        for (name, value) in attributes {
            match name.as_str() {
                "specversion" => specversion = Some(value),
                "id" => id = Some(value),
                "source" => source = Some(value),
                "type" => kind = Some(value),
                "time" => time = Some(value),
                "datacontenttype" => context.datacontenttype = Some(value),
                other if other.eq_ignore_ascii_case("correlationid") => {
                    context.correlation_id = Some(value);
                }
                other if other.eq_ignore_ascii_case("causationid") => {
                    context.causation_id = Some(value);
                }
                other if other.eq_ignore_ascii_case("tenantid") => context.tenant_id = Some(value),
                other if other.eq_ignore_ascii_case("switchboardhops") => {
                    context.hops = Some(parse_hops(&value)?);
                }
                _ => context.headers.push((name, value)),
            }
        }
        // The version first: the other rules are the ones of 1.0.
        match specversion {
            None => {
                return Err(EnvelopeError::MissingAttribute {
                    mode,
                    name: "specversion",
                });
            }
            Some(version) if version != SPEC_VERSION => {
                return Err(EnvelopeError::UnsupportedSpecVersion(version));
            }
            Some(_) => {}
        }
        context.id = required(mode, "id", id)?;
        context.source = required(mode, "source", source)?;
        context.kind = required(mode, "type", kind)?;
        context.time = match time {
            Some(time) => {
                chrono::DateTime::parse_from_rfc3339(&time).map_err(|e| {
                    EnvelopeError::BadAttribute {
                        name: "time".into(),
                        problem: format!("is not an RFC 3339 timestamp ({time:?}: {e})"),
                    }
                })?;
                time
            }
            None => now_rfc3339(),
        };
        Ok(context)
    }

    fn into_decoded(
        self,
        exchange: &str,
        attempt: u32,
        content_type: String,
        data: Vec<u8>,
    ) -> Decoded {
        Decoded {
            event: Event {
                id: self.id,
                kind: self.kind,
                exchange: exchange.into(),
                attempt,
                source: self.source,
                time: self.time,
                correlation_id: self.correlation_id,
                causation_id: self.causation_id,
                tenant_id: self.tenant_id,
                content_type,
                data,
                headers: self.headers,
            },
            hops: self.hops,
        }
    }
}

/// A required attribute's value: present and not empty (CloudEvents 1.0 §3.1).
fn required(
    mode: CloudEventsMode,
    name: &'static str,
    value: Option<String>,
) -> Result<String, EnvelopeError> {
    match value {
        None => Err(EnvelopeError::MissingAttribute { mode, name }),
        Some(value) if value.is_empty() => Err(EnvelopeError::BadAttribute {
            name: name.into(),
            problem: "is empty".into(),
        }),
        Some(value) => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_choose_structured_mode_or_refuse() {
        assert_eq!(is_structured("application/cloudevents+json"), Ok(true));
        assert_eq!(
            is_structured("Application/CloudEvents+JSON; charset=utf-8"),
            Ok(true)
        );
        assert_eq!(is_structured("application/json"), Ok(false));
        assert_eq!(is_structured(""), Ok(false));
        assert_eq!(
            is_structured("application/cloudevents-batch+json"),
            Err(EnvelopeError::BatchUnsupported)
        );
        assert_eq!(
            is_structured("application/cloudevents+avro"),
            Err(EnvelopeError::UnsupportedFormat(
                "application/cloudevents+avro".into()
            ))
        );
    }

    #[test]
    fn header_prefixes_of_both_binding_versions_name_attributes() {
        assert_eq!(attribute_name("cloudEvents_id"), Some("id"));
        assert_eq!(attribute_name("cloudEvents:id"), Some("id"));
        assert_eq!(attribute_name("cloudevents_type"), Some("type"));
        assert_eq!(attribute_name("ce-id"), Some("id"));
        assert_eq!(attribute_name("CE-Source"), Some("Source"));
        assert_eq!(attribute_name("ce-"), None);
        assert_eq!(attribute_name("ce_id"), None);
        assert!(is_time_header("cloudEvents_time"));
        assert!(is_time_header("cloudEvents:Time"));
        assert!(is_time_header("ce-time"));
        assert!(!is_time_header("time"));
        assert!(!is_time_header("ce-timeout"));
        assert!(marks_binary("cloudEvents_source"));
        assert!(marks_binary("ce-specversion"));
        assert!(marks_binary("CE-SpecVersion"));
        assert!(
            !marks_binary("ce-trace"),
            "a ce- header alone is not a CloudEvent"
        );
        assert!(!marks_binary("traceparent"));
        assert_eq!(attribute_name("cloudEvents_"), None);
        assert_eq!(attribute_name("cloudEvent"), None);
        assert_eq!(attribute_name("x-cloudEvents_id"), None);
        // Never slices inside a character.
        assert_eq!(attribute_name("cloudEvents\u{e9}id"), None);
        assert_eq!(
            attribute_name("\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}"),
            None
        );
    }
}
