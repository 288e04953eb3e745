//! Events on the wire ⇄ the [`Event`] a plugin sees, and plugin outputs ⇄ the
//! envelopes published for them.
//!
//! The wire format here is the envelope services already publish:
//! `{id, type, source, timestamp, tenant_id, correlation_id, data, metadata}`,
//! with `data` any JSON value. Outputs get the same shape, with the fields the host
//! owns filled in: an id derived from (input id, plugin, output index) so that a
//! redelivered input yields the same output ids, the plugin as `source`, the time,
//! the input's tenant and correlation ids, `causation_id` = the input's id, and a
//! hop count that the loop guard reads.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::runtime::{Event, Output};

/// Content type of JSON payloads.
pub const JSON: &str = "application/json";

/// Namespace of the name-based (v5) UUIDs given to outputs.
const OUTPUT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x8f6c_2d1e_5b3a_4c7d_9e0f_1a2b_3c4d_5e6f);

/// The JSON envelope, as services publish it and as outputs are published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique event id; assigned on ingress when absent.
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
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

/// Why bytes or an output could not become an envelope or event.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("not a JSON envelope: {0}")]
    Malformed(String),
    #[error("envelope has an empty \"type\"")]
    EmptyKind,
    #[error("\"data_base64\" is not base64: {0}")]
    BadBase64(String),
    #[error("output {index} ({kind}) is declared JSON but its data is not: {error}")]
    OutputNotJson {
        index: usize,
        kind: String,
        error: String,
    },
}

impl Envelope {
    /// Parses one envelope from JSON bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let envelope: Self =
            serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if envelope.kind.is_empty() {
            return Err(EnvelopeError::EmptyKind);
        }
        Ok(envelope)
    }

    /// The event a plugin sees for this envelope, published to `exchange`, on
    /// delivery `attempt`. A missing id or timestamp is filled in here.
    pub fn into_event(self, exchange: &str, attempt: u32) -> Result<Event, EnvelopeError> {
        let (content_type, data) = match (self.data_base64, self.content_type) {
            (Some(b64), content_type) => (
                content_type.unwrap_or_else(|| "application/octet-stream".into()),
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| EnvelopeError::BadBase64(e.to_string()))?,
            ),
            (None, Some(content_type)) if !is_json(&content_type) => {
                let data = match self.data {
                    Value::String(text) => text.into_bytes(),
                    other => other.to_string().into_bytes(),
                };
                (content_type, data)
            }
            (None, content_type) => (
                content_type.unwrap_or_else(|| JSON.into()),
                self.data.to_string().into_bytes(),
            ),
        };
        let mut headers: Vec<(String, String)> = self
            .metadata
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect();
        if let Some(hops) = self.hops {
            headers.push((HOPS_HEADER.into(), hops.to_string()));
        }
        Ok(Event {
            id: self.id.unwrap_or_else(|| Uuid::now_v7().to_string()),
            kind: self.kind,
            exchange: exchange.into(),
            attempt,
            source: self.source.unwrap_or_default(),
            time: self.timestamp.unwrap_or_else(now_rfc3339),
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            tenant_id: self.tenant_id,
            content_type,
            data,
            headers,
        })
    }
}

/// Header carrying the hop count on events that plugins produced.
pub const HOPS_HEADER: &str = "switchboard-hops";

/// Hops behind an event (0 for events that came from services).
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

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case(JSON) || essence.to_ascii_lowercase().ends_with("+json")
}

/// The envelope to publish for output `index` that `plugin` produced from `input`.
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
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    })
}

/// Interim wire codec (seed JSON envelope, else raw bytes); the full version
/// adds CloudEvents.
pub fn decode(
    exchange: &str,
    routing_key: &str,
    message: &crate::bus::Message,
    attempt: u32,
) -> Result<Event, EnvelopeError> {
    match Envelope::from_json(&message.body) {
        Ok(envelope) => envelope.into_event(exchange, attempt),
        Err(_) => Ok(Event {
            id: message
                .message_id
                .clone()
                .unwrap_or_else(|| Uuid::now_v7().to_string()),
            kind: routing_key.into(),
            exchange: exchange.into(),
            attempt,
            source: String::new(),
            time: now_rfc3339(),
            correlation_id: None,
            causation_id: None,
            tenant_id: None,
            content_type: message
                .content_type
                .clone()
                .unwrap_or_else(|| "application/octet-stream".into()),
            data: message.body.to_vec(),
            headers: message.headers.clone(),
        }),
    }
}

/// The message to publish for output `index` of `plugin` (seed JSON envelope).
pub fn encode_output(
    plugin: &str,
    input: &Event,
    index: usize,
    output: &Output,
) -> Result<crate::bus::Message, EnvelopeError> {
    let envelope = output_envelope(plugin, input, index, output)?;
    let hops = envelope.hops.unwrap_or(1);
    let mut headers = vec![(HOPS_HEADER.to_string(), hops.to_string())];
    headers.extend(output.headers.iter().cloned());
    Ok(crate::bus::Message {
        message_id: envelope.id.clone(),
        body: serde_json::to_vec(&envelope)
            .map_err(|e| EnvelopeError::Malformed(e.to_string()))?
            .into(),
        content_type: Some(JSON.into()),
        headers,
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

    #[test]
    fn seed_envelope_becomes_an_event() {
        let event = Envelope::from_json(&seed())
            .unwrap()
            .into_event("payments", 1)
            .unwrap();
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
        let event = Envelope::from_json(br#"{"type":"x.y","data":1}"#)
            .unwrap()
            .into_event("e", 1)
            .unwrap();
        assert_eq!(Uuid::parse_str(&event.id).unwrap().get_version_num(), 7);
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
        let input = Envelope::from_json(&seed())
            .unwrap()
            .into_event("payments", 1)
            .unwrap();
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
        let next = env.into_event("billing", 1).unwrap();
        assert_eq!(hops(&next), 1);
        let env2 = output_envelope("notification", &next, 0, &output).unwrap();
        assert_eq!(env2.hops, Some(2));
        assert_eq!(env2.correlation_id.as_deref(), Some("flow-9"));
    }

    #[test]
    fn non_json_outputs_are_text_or_base64() {
        let input = Envelope::from_json(&seed())
            .unwrap()
            .into_event("p", 1)
            .unwrap();
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
        let back = env.into_event("p", 1).unwrap();
        assert_eq!(back.data, b"hello");
        output.data = vec![0xff, 0x00];
        output.content_type = Some("application/octet-stream".into());
        let env = output_envelope("p", &input, 0, &output).unwrap();
        assert_eq!(env.into_event("p", 1).unwrap().data, vec![0xff, 0x00]);
        output.content_type = None;
        assert!(matches!(
            output_envelope("p", &input, 3, &output),
            Err(EnvelopeError::OutputNotJson { index: 3, .. })
        ));
    }
}
