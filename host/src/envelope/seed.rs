//! The seed envelope: the JSON shape services already publish,
//! `{id, type, source, timestamp, tenant_id, correlation_id, causation_id, hops,
//! data, metadata}`, and the shape every plugin output is published in.
//!
//! Outputs get the fields the host owns filled in: an id derived from (input id,
//! plugin, output index) so that a redelivered input yields the same output ids, the
//! plugin as `source`, the time, the input's tenant and correlation ids,
//! `causation_id` = the input's id, and a hop count that the loop guard reads.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use serde_json::value::RawValue;

use super::{
    Decoded, EnvelopeError, JSON, OCTET_STREAM, hops, is_json, now_rfc3339, output_id, raw_object,
    raw_text,
};
use crate::runtime::{Event, Output};

/// The JSON envelope, as services publish it and as outputs are published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique event id; assigned on ingress and on delivery when absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// What happened, e.g. `payment.success`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Who produced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// When, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// The tenant the event belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Ties together every event of one business flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The id of the event that caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// Plugin hops behind this event (0 or absent for events from services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hops: Option<u32>,
    /// MIME type of a payload that is not JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The payload: JSON, or text when `content_type` says so.
    #[serde(default)]
    pub data: Value,
    /// Binary payloads that are not UTF-8, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// Anything else; values that are not strings are passed on as JSON text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, Value>,
}

impl Envelope {
    /// Parses one envelope from JSON bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let envelope: Self =
            serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        envelope.checked()
    }

    /// Parses one envelope from an already parsed JSON value.
    fn from_value(value: Value) -> Result<Self, EnvelopeError> {
        let envelope: Self =
            serde_json::from_value(value).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        envelope.checked()
    }

    fn checked(self) -> Result<Self, EnvelopeError> {
        if self.kind.is_empty() {
            return Err(EnvelopeError::EmptyKind);
        }
        Ok(self)
    }
}

/// Whether a JSON object is (meant to be) a seed envelope: it has a string `type`.
pub(super) fn is_envelope(object: &Map<String, Value>) -> bool {
    object.get("type").is_some_and(Value::is_string)
}

/// Whether a body looks like a seed envelope: UTF-8 JSON, an object, with a
/// string `type`. Its values are skipped, not built.
pub(super) fn probe(body: &[u8]) -> bool {
    std::str::from_utf8(body).is_ok()
        && raw_object(body).is_ok_and(|object| {
            object
                .get("type")
                .is_some_and(|kind| kind.get().starts_with('"'))
        })
}

/// A seed envelope as it arrives on a bus: the fields of [`Envelope`], with
/// `data` and the `metadata` values kept as the JSON text they arrived as (see
/// `RawObject` in the module above: they may be large).
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    causation_id: Option<String>,
    #[serde(default)]
    hops: Option<u32>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    data_base64: Option<String>,
    #[serde(default, borrow)]
    metadata: BTreeMap<String, &'a RawValue>,
}

/// The event for the seed envelope in `body`, delivered on a bus. JSON data and
/// metadata values that are not strings are passed on as the text they arrived
/// as, never re-serialized. The
/// envelope's `hops` is handed back apart so that a `switchboard-hops` message
/// header can override it.
pub(super) fn decode(body: &[u8], exchange: &str, attempt: u32) -> Result<Decoded, EnvelopeError> {
    let envelope: Incoming<'_> =
        serde_json::from_slice(body).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    if envelope.kind.is_empty() {
        return Err(EnvelopeError::EmptyKind);
    }
    let malformed = |e: serde_json::Error| EnvelopeError::Malformed(e.to_string());
    let (content_type, data) = match (envelope.data_base64, envelope.content_type) {
        (Some(b64), content_type) => (
            content_type.unwrap_or_else(|| OCTET_STREAM.into()),
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| EnvelopeError::BadBase64(e.to_string()))?,
        ),
        (None, Some(content_type)) if !is_json(&content_type) => {
            let data = match envelope.data {
                Some(data) => raw_text(data).map_err(malformed)?.into_bytes(),
                None => b"null".to_vec(),
            };
            (content_type, data)
        }
        (None, content_type) => (
            content_type.unwrap_or_else(|| JSON.into()),
            envelope
                .data
                .map_or("null", RawValue::get)
                .as_bytes()
                .to_vec(),
        ),
    };
    let headers = envelope
        .metadata
        .into_iter()
        .map(|(k, v)| Ok((k, raw_text(v).map_err(malformed)?)))
        .collect::<Result<Vec<_>, EnvelopeError>>()?;
    Ok(Decoded {
        event: Event {
            // None (or empty) yet: `envelope::decode` takes the message id, or
            // derives one from the message (the same on every delivery).
            id: envelope.id.unwrap_or_default(),
            kind: envelope.kind,
            exchange: exchange.into(),
            attempt,
            source: envelope.source.unwrap_or_default(),
            time: envelope.timestamp.unwrap_or_else(now_rfc3339),
            correlation_id: envelope.correlation_id,
            causation_id: envelope.causation_id,
            tenant_id: envelope.tenant_id,
            content_type,
            data,
            headers,
        },
        hops: envelope.hops,
    })
}

/// A seed envelope posted to the ingress, given an id and a timestamp when it has
/// none (or an empty one). Fields this module does not know are kept.
pub(super) fn complete(mut object: Map<String, Value>) -> Result<Vec<u8>, EnvelopeError> {
    let envelope = Envelope::from_value(Value::Object(object.clone()))?;
    if envelope.id.is_none_or(|id| id.is_empty()) {
        object.insert("id".into(), Value::String(Uuid::now_v7().to_string()));
    }
    if envelope.timestamp.is_none() {
        object.insert("timestamp".into(), Value::String(now_rfc3339()));
    }
    serde_json::to_vec(&object).map_err(|e| EnvelopeError::Unserializable(e.to_string()))
}

/// A JSON value posted to the ingress that is not an envelope, wrapped as the `data`
/// of a new one of type `kind`.
pub(super) fn wrap(kind: &str, data: Value) -> Result<Vec<u8>, EnvelopeError> {
    if kind.is_empty() {
        return Err(EnvelopeError::EmptyRoutingKey);
    }
    let envelope = Envelope {
        id: Some(Uuid::now_v7().to_string()),
        kind: kind.into(),
        source: None,
        timestamp: Some(now_rfc3339()),
        tenant_id: None,
        correlation_id: None,
        causation_id: None,
        hops: None,
        content_type: None,
        data,
        data_base64: None,
        metadata: BTreeMap::new(),
    };
    serde_json::to_vec(&envelope).map_err(|e| EnvelopeError::Unserializable(e.to_string()))
}

/// The envelope to publish for output `index` that `plugin` produced from `input`.
///
/// The output's headers become `metadata`, except the ones the host owns (every
/// `switchboard-*` header): a plugin that copies its input's headers onto an
/// output must not carry a stale hop count, source, attempt or origin along.
pub fn output_envelope(
    plugin: &str,
    input: &Event,
    index: usize,
    output: &Output,
) -> Result<Envelope, EnvelopeError> {
    let content_type = output.content_type.clone().unwrap_or_else(|| JSON.into());
    let (data, data_base64, content_type) = if is_json(&content_type) {
        let data =
            serde_json::from_slice(&output.data).map_err(|e| EnvelopeError::OutputNotJson {
                index,
                kind: output.kind.clone(),
                error: e.to_string(),
            })?;
        (data, None, (content_type != JSON).then_some(content_type))
    } else {
        match String::from_utf8(output.data.clone()) {
            Ok(text) => (Value::String(text), None, Some(content_type)),
            Err(_) => (
                Value::Null,
                Some(base64::engine::general_purpose::STANDARD.encode(&output.data)),
                Some(content_type),
            ),
        }
    };
    Ok(Envelope {
        id: Some(output_id(&input.id, plugin, index)),
        kind: output.kind.clone(),
        source: Some(plugin.into()),
        timestamp: Some(now_rfc3339()),
        tenant_id: input.tenant_id.clone(),
        // A flow that did not name itself is correlated by its first event.
        correlation_id: Some(
            input
                .correlation_id
                .clone()
                .unwrap_or_else(|| input.id.clone()),
        ),
        causation_id: Some(input.id.clone()),
        hops: Some(hops(input).saturating_add(1)),
        content_type,
        data,
        data_base64,
        metadata: output
            .headers
            .iter()
            .filter(|(k, _)| !super::is_host_header(k))
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seed() -> Vec<u8> {
        json!({
            "id": "evt-1", "type": "payment.success", "source": "payments-api",
            "timestamp": "2026-11-22T10:00:00Z", "tenant_id": "acme",
            "correlation_id": "flow-9", "data": {"bill_id": "b1", "amount": 12.5},
            "metadata": {"trace": "abc", "retries": 2}
        })
        .to_string()
        .into_bytes()
    }

    /// The event the bus delivers for a recorded envelope: the production decoder.
    fn recorded(body: &[u8], exchange: &str) -> Event {
        super::super::decode_recorded(exchange, body, None).unwrap()
    }

    #[test]
    fn seed_envelope_becomes_an_event() {
        let event = recorded(&seed(), "payments");
        assert_eq!(event.id, "evt-1");
        assert_eq!(event.kind, "payment.success");
        assert_eq!(event.exchange, "payments");
        assert_eq!(event.attempt, 1);
        assert_eq!(event.tenant_id.as_deref(), Some("acme"));
        assert_eq!(event.correlation_id.as_deref(), Some("flow-9"));
        assert_eq!(event.content_type, JSON);
        let data: Value = serde_json::from_slice(&event.data).unwrap();
        assert_eq!(data, json!({"bill_id": "b1", "amount": 12.5}));
        assert!(event.headers.contains(&("trace".into(), "abc".into())));
        assert!(event.headers.contains(&("retries".into(), "2".into())));
        assert_eq!(hops(&event), 0);
    }

    #[test]
    fn missing_id_and_time_are_filled_in() {
        let event = recorded(br#"{"type":"x.y","data":1}"#, "e");
        assert_eq!(Uuid::parse_str(&event.id).unwrap().get_version_num(), 5);
        assert!(chrono::DateTime::parse_from_rfc3339(&event.time).is_ok());
    }

    #[test]
    fn malformed_envelopes_say_why() {
        assert!(matches!(
            Envelope::from_json(b"{not json"),
            Err(EnvelopeError::Malformed(_))
        ));
        assert!(matches!(
            Envelope::from_json(br#"{"data":1}"#),
            Err(EnvelopeError::Malformed(_))
        ));
        assert_eq!(
            Envelope::from_json(br#"{"type":""}"#),
            Err(EnvelopeError::EmptyKind)
        );
    }

    #[test]
    fn outputs_get_host_fields_and_stable_ids() {
        let input = recorded(&seed(), "payments");
        let output = Output {
            kind: "bill.paid".into(),
            content_type: None,
            data: br#"{"bill_id":"b1"}"#.to_vec(),
            exchange: None,
            headers: vec![("k".into(), "v".into())],
        };
        let env = output_envelope("billing", &input, 0, &output).unwrap();
        assert_eq!(
            env.id.as_deref(),
            Some(output_id("evt-1", "billing", 0).as_str())
        );
        assert_eq!(
            env.id,
            output_envelope("billing", &input, 0, &output).unwrap().id
        );
        assert_ne!(
            env.id.as_deref(),
            Some(output_id("evt-1", "billing", 1).as_str())
        );
        assert_ne!(
            env.id.as_deref(),
            Some(output_id("evt-1", "notification", 0).as_str())
        );
        assert_eq!(env.source.as_deref(), Some("billing"));
        assert_eq!(env.causation_id.as_deref(), Some("evt-1"));
        assert_eq!(env.correlation_id.as_deref(), Some("flow-9"));
        assert_eq!(env.tenant_id.as_deref(), Some("acme"));
        assert_eq!(env.hops, Some(1));
        assert_eq!(env.data, json!({"bill_id": "b1"}));
        // The next hop counts on.
        let next = recorded(&serde_json::to_vec(&env).unwrap(), "billing");
        assert_eq!(hops(&next), 1);
        let env2 = output_envelope("notification", &next, 0, &output).unwrap();
        assert_eq!(env2.hops, Some(2));
        assert_eq!(env2.correlation_id.as_deref(), Some("flow-9"));
    }

    #[test]
    fn outputs_do_not_carry_host_owned_headers_as_metadata() {
        let input = recorded(&seed(), "payments");
        let output = Output {
            kind: "bill.paid".into(),
            content_type: None,
            data: b"{}".to_vec(),
            exchange: None,
            headers: vec![
                (super::super::HOPS_HEADER.into(), "0".into()),
                (super::super::SOURCE_HEADER.into(), "payments".into()),
                // Copied from a retried input: an output must not carry it on.
                ("switchboard-attempt".into(), "4".into()),
                ("Switchboard-Exchange".into(), "elsewhere".into()),
                ("trace".into(), "abc".into()),
            ],
        };
        let env = output_envelope("billing", &input, 0, &output).unwrap();
        assert_eq!(
            env.metadata.keys().collect::<Vec<_>>(),
            vec!["trace"],
            "only the plugin's own headers become metadata"
        );
        assert_eq!(env.hops, Some(1));
    }

    #[test]
    fn non_json_outputs_are_text_or_base64() {
        let input = recorded(&seed(), "p");
        let mut output = Output {
            kind: "k".into(),
            content_type: Some("text/plain".into()),
            data: b"hello".to_vec(),
            exchange: None,
            headers: vec![],
        };
        let env = output_envelope("p", &input, 0, &output).unwrap();
        assert_eq!(env.data, json!("hello"));
        assert_eq!(env.content_type.as_deref(), Some("text/plain"));
        let back = recorded(&serde_json::to_vec(&env).unwrap(), "p");
        assert_eq!(back.data, b"hello");
        output.data = vec![0xff, 0x00];
        output.content_type = Some("application/octet-stream".into());
        let env = output_envelope("p", &input, 0, &output).unwrap();
        assert_eq!(
            recorded(&serde_json::to_vec(&env).unwrap(), "p").data,
            vec![0xff, 0x00]
        );
        output.content_type = None;
        assert!(matches!(
            output_envelope("p", &input, 3, &output),
            Err(EnvelopeError::OutputNotJson { index: 3, .. })
        ));
    }

    #[test]
    fn probe_only_takes_objects_with_a_string_type() {
        assert!(probe(br#"  {"type":"a.b","data":1}"#));
        assert!(!probe(br#"{"type":1}"#));
        assert!(!probe(br#"{"kind":"a.b"}"#));
        assert!(!probe(br#"[{"type":"a.b"}]"#));
        assert!(!probe(b"{not json"));
        assert!(!probe(b""));
        // The last of a repeated name counts, as in any JSON object.
        assert!(probe(br#"{"type":1,"type":"a.b"}"#));
        assert!(!probe(br#"{"type":"a.b","type":null}"#));
        // Not UTF-8: not JSON, so not an envelope (a raw body).
        assert!(!probe(b"{\"type\":\"a.b\",\"data\":\"\xff\"}"));
    }

    #[test]
    fn data_and_metadata_are_passed_on_as_they_arrived_without_building_them() {
        // Eight million numbers: as `Value`s they would take hundreds of MiB.
        let mut body = br#"{"type":"a.b","metadata":{"n":[1, 2],"s":"t\u00e9"},"data":[0"#.to_vec();
        for _ in 0..(8 << 20) / 2 {
            body.extend_from_slice(b",0");
        }
        body.extend_from_slice(b"]}");
        assert!(probe(&body));
        let event = decode(&body, "ex", 1).unwrap().event;
        assert_eq!(event.content_type, JSON);
        assert_eq!(
            event.data.len(),
            body.len()
                - br#"{"type":"a.b","metadata":{"n":[1, 2],"s":"t\u00e9"},"data":"#.len()
                - 1
        );
        assert!(event.data.starts_with(b"[0,0,") && event.data.ends_with(b",0]"));
        assert_eq!(
            event.headers,
            [
                ("n".to_string(), "[1, 2]".to_string()),
                ("s".to_string(), "t\u{e9}".to_string())
            ]
        );
        // Text data for a declared non-JSON type is the string itself.
        let text = decode(
            br#"{"type":"a","content_type":"text/plain","data":"h\u00e9"}"#,
            "ex",
            1,
        )
        .unwrap();
        assert_eq!(text.event.data, "h\u{e9}".as_bytes());
        let absent = decode(br#"{"type":"a"}"#, "ex", 1).unwrap();
        assert_eq!(absent.event.data, b"null");
    }

    #[test]
    fn ingress_completion_keeps_unknown_fields_and_fills_id_and_time() {
        let object = |value: Value| value.as_object().unwrap().clone();
        let body = complete(object(json!({"type": "a.b", "data": 1, "extra": true}))).unwrap();
        let value: Value = serde_json::from_slice(&body).unwrap();
        let id = value["id"].as_str().unwrap();
        assert_eq!(Uuid::parse_str(id).unwrap().get_version_num(), 7);
        assert_eq!(value["extra"], json!(true));
        assert!(chrono::DateTime::parse_from_rfc3339(value["timestamp"].as_str().unwrap()).is_ok());

        let body = complete(object(
            json!({"id": "mine", "type": "a.b", "timestamp": "2026-01-01T00:00:00Z"}),
        ))
        .unwrap();
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["id"], json!("mine"));
        assert_eq!(value["timestamp"], json!("2026-01-01T00:00:00Z"));
    }
}
