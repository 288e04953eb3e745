//! The three doors together: detection, every format through [`decode`], outputs
//! through [`encode_output`] and back, the ingress, and decode on hostile input.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

const CE_JSON: &str = "application/cloudevents+json";

fn message(body: impl Into<Bytes>, content_type: Option<&str>) -> Message {
    Message {
        body: body.into(),
        content_type: content_type.map(Into::into),
        message_id: None,
        headers: Vec::new(),
    }
}

fn with_headers(mut message: Message, headers: &[(&str, &str)]) -> Message {
    message.headers = headers
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    message
}

fn json_body(value: Value) -> Bytes {
    Bytes::from(value.to_string())
}

fn header<'a>(event: &'a Event, name: &str) -> Option<&'a str> {
    event
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn count(event: &Event, name: &str) -> usize {
    event.headers.iter().filter(|(k, _)| k == name).count()
}

fn data(event: &Event) -> Value {
    serde_json::from_slice(&event.data).unwrap()
}

fn is_v7(id: &str) -> bool {
    Uuid::parse_str(id).is_ok_and(|id| id.get_version_num() == 7)
}

fn is_v5(id: &str) -> bool {
    Uuid::parse_str(id).is_ok_and(|id| id.get_version_num() == 5)
}

fn seed_body() -> Bytes {
    json_body(json!({
        "id": "evt-1", "type": "payment.success", "source": "payments-api",
        "timestamp": "2026-11-22T10:00:00Z", "tenant_id": "acme",
        "correlation_id": "flow-9", "data": {"bill_id": "b1"},
        "metadata": {"trace": "abc"}
    }))
}

fn structured_body() -> Value {
    json!({
        "specversion": "1.0", "id": "ce-1", "source": "/payments",
        "type": "payment.success", "time": "2026-11-22T10:00:00Z",
        "subject": "bill/b1", "dataschema": "https://example.com/payment.json",
        "correlationid": "flow-9", "CausationId": "evt-0", "tenantid": "acme",
        "region": "eu", "priority": 3,
        "data": {"bill_id": "b1"}
    })
}

fn decode_err(message: &Message) -> EnvelopeError {
    decode("payments", "payment.success", message, 1).unwrap_err()
}

// --- Seed envelopes ---------------------------------------------------------------

#[test]
fn seed_envelope_decodes_with_exchange_attempt_and_message_headers() {
    let msg = with_headers(
        message(seed_body(), Some(JSON)),
        &[("x-trace", "t1"), ("trace", "abc")],
    );
    let event = decode("payments", "payment.any", &msg, 3).unwrap();
    assert_eq!(event.id, "evt-1");
    assert_eq!(
        event.kind, "payment.success",
        "the kind is the envelope's type"
    );
    assert_eq!(event.exchange, "payments");
    assert_eq!(event.attempt, 3);
    assert_eq!(event.source, "payments-api");
    assert_eq!(event.time, "2026-11-22T10:00:00Z");
    assert_eq!(event.tenant_id.as_deref(), Some("acme"));
    assert_eq!(event.correlation_id.as_deref(), Some("flow-9"));
    assert_eq!(event.content_type, JSON);
    assert_eq!(data(&event), json!({"bill_id": "b1"}));
    assert_eq!(header(&event, "x-trace"), Some("t1"));
    assert_eq!(
        count(&event, "trace"),
        1,
        "an AMQP header repeating metadata is not doubled"
    );
    assert_eq!(hops(&event), 0);
    assert_eq!(count(&event, HOPS_HEADER), 0);
}

#[test]
fn seed_envelope_is_detected_whatever_the_content_type_says() {
    for content_type in [None, Some("text/plain"), Some("application/octet-stream")] {
        let event = decode("e", "k", &message(seed_body(), content_type), 1).unwrap();
        assert_eq!(event.id, "evt-1", "content type {content_type:?}");
    }
}

#[test]
fn seed_envelope_without_id_or_timestamp_gets_them() {
    let body = json_body(json!({"type": "a.b", "data": 1}));
    let event = decode("e", "k", &message(body.clone(), None), 1).unwrap();
    assert!(is_v5(&event.id), "derived from the message: {:?}", event.id);
    assert!(chrono::DateTime::parse_from_rfc3339(&event.time).is_ok());
    assert_eq!(event.kind, "a.b");
    // The same message delivered again (or retried: attempt 3) is the same event.
    let again = decode("e", "k", &message(body.clone(), None), 3).unwrap();
    assert_eq!(again.id, event.id);
    // An AMQP message-id comes before a derived id.
    let mut with_id = message(body, None);
    with_id.message_id = Some("m-7".into());
    assert_eq!(decode("e", "k", &with_id, 1).unwrap().id, "m-7");
}

#[test]
fn an_id_less_event_is_identified_by_its_exchange_key_content_type_and_body() {
    let body = || json_body(json!({"type": "payment.success", "data": {"bill": 1}}));
    let id = |exchange: &str, key: &str, m: &Message| decode(exchange, key, m, 1).unwrap().id;
    let base = id("e", "k", &message(body(), None));
    assert_eq!(base, derived_id("e", "k", &message(body(), None)));
    assert_ne!(base, id("other", "k", &message(body(), None)));
    assert_ne!(base, id("e", "other", &message(body(), None)));
    assert_ne!(base, id("e", "k", &message(body(), Some("text/plain"))));
    let other_body = json_body(json!({"type": "payment.success", "data": {"bill": 2}}));
    assert_ne!(base, id("e", "k", &message(other_body, None)));
}

#[test]
fn seed_envelope_with_an_empty_id_gets_one() {
    // An empty id is no id: kept, the dedupe window would take every such event
    // for a duplicate of the last, and their outputs would all share one id.
    let first = decode(
        "e",
        "k",
        &message(json_body(json!({"id": "", "type": "a.b", "data": 1})), None),
        1,
    )
    .unwrap();
    let second = decode(
        "e",
        "k",
        &message(json_body(json!({"id": "", "type": "a.b", "data": 2})), None),
        1,
    )
    .unwrap();
    assert!(is_v5(&first.id), "{:?}", first.id);
    assert!(is_v5(&second.id), "{:?}", second.id);
    assert_ne!(first.id, second.id);
}

#[test]
fn a_body_claiming_to_be_an_envelope_must_be_a_valid_one() {
    let err = decode_err(&message(json_body(json!({"type": "a.b", "id": 42})), None));
    assert!(matches!(err, EnvelopeError::Malformed(_)), "{err}");
    let err = decode_err(&message(json_body(json!({"type": ""})), None));
    assert_eq!(err, EnvelopeError::EmptyKind);
    let err = decode_err(&message(
        json_body(json!({"type": "a.b", "data_base64": "!!"})),
        None,
    ));
    assert!(matches!(err, EnvelopeError::BadBase64(_)), "{err}");
}

#[test]
fn hop_header_wins_over_the_envelope_and_appears_once() {
    let body = json_body(json!({"type": "a.b", "hops": 2, "metadata": {HOPS_HEADER: "7"}}));
    let event = decode("e", "k", &message(body.clone(), None), 1).unwrap();
    assert_eq!(
        hops(&event),
        2,
        "the envelope's hops field wins over metadata"
    );
    assert_eq!(count(&event, HOPS_HEADER), 1);

    let msg = with_headers(message(body, None), &[(HOPS_HEADER, "5")]);
    let event = decode("e", "k", &msg, 1).unwrap();
    assert_eq!(hops(&event), 5);
    assert_eq!(count(&event, HOPS_HEADER), 1);

    let body = json_body(json!({"type": "a.b", "metadata": {HOPS_HEADER: "7"}}));
    let event = decode("e", "k", &message(body, None), 1).unwrap();
    assert_eq!(hops(&event), 7, "metadata counts when nothing else does");
}

#[test]
fn a_hop_count_that_is_not_a_number_is_refused() {
    let msg = with_headers(message(seed_body(), None), &[(HOPS_HEADER, "many")]);
    assert_eq!(decode_err(&msg), EnvelopeError::BadHops("many".into()));
    let msg = with_headers(message(&b"raw"[..], None), &[(HOPS_HEADER, "-1")]);
    assert_eq!(decode_err(&msg), EnvelopeError::BadHops("-1".into()));
}

// --- CloudEvents, structured mode -------------------------------------------------

#[test]
fn structured_cloudevent_maps_attributes_and_extensions() {
    let msg = with_headers(
        message(json_body(structured_body()), Some(CE_JSON)),
        &[("x-amqp", "yes")],
    );
    let event = decode("payments", "payment.success", &msg, 2).unwrap();
    assert_eq!(event.id, "ce-1");
    assert_eq!(event.kind, "payment.success");
    assert_eq!(event.source, "/payments");
    assert_eq!(event.time, "2026-11-22T10:00:00Z");
    assert_eq!(event.exchange, "payments");
    assert_eq!(event.attempt, 2);
    assert_eq!(event.correlation_id.as_deref(), Some("flow-9"));
    assert_eq!(
        event.causation_id.as_deref(),
        Some("evt-0"),
        "well-known extensions match ignoring case"
    );
    assert_eq!(event.tenant_id.as_deref(), Some("acme"));
    assert_eq!(event.content_type, JSON);
    assert_eq!(data(&event), json!({"bill_id": "b1"}));
    assert_eq!(header(&event, "subject"), Some("bill/b1"));
    assert_eq!(
        header(&event, "dataschema"),
        Some("https://example.com/payment.json")
    );
    assert_eq!(header(&event, "region"), Some("eu"));
    assert_eq!(header(&event, "priority"), Some("3"));
    assert_eq!(header(&event, "x-amqp"), Some("yes"));
    for mapped in [
        "correlationid",
        "CausationId",
        "tenantid",
        "specversion",
        "id",
    ] {
        assert_eq!(header(&event, mapped), None, "{mapped} is not a header");
    }
}

#[test]
fn structured_content_type_may_carry_parameters() {
    let msg = message(
        json_body(structured_body()),
        Some("application/cloudevents+json; charset=UTF-8"),
    );
    assert_eq!(decode("e", "k", &msg, 1).unwrap().id, "ce-1");
}

#[test]
fn structured_cloudevent_wins_over_cloudevents_headers_which_are_dropped() {
    let msg = with_headers(
        message(json_body(structured_body()), Some(CE_JSON)),
        &[("cloudEvents_id", "other"), ("cloudEvents:type", "other")],
    );
    let event = decode("e", "k", &msg, 1).unwrap();
    assert_eq!(event.id, "ce-1");
    assert!(
        event
            .headers
            .iter()
            .all(|(k, _)| !k.to_ascii_lowercase().starts_with("cloudevents"))
    );
}

#[test]
fn structured_data_follows_its_content_type() {
    let decode_with = |fields: Value| {
        let mut body = json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t"});
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        decode("e", "k", &message(json_body(body), Some(CE_JSON)), 1).unwrap()
    };
    let event = decode_with(json!({"datacontenttype": "text/plain", "data": "hello"}));
    assert_eq!(
        (event.content_type.as_str(), event.data.as_slice()),
        ("text/plain", &b"hello"[..])
    );

    let event = decode_with(json!({"data": "hello"}));
    assert_eq!(event.content_type, JSON);
    assert_eq!(event.data, br#""hello""#, "a JSON string stays JSON");

    let event = decode_with(json!({"datacontenttype": "application/vnd.x+json", "data": [1]}));
    assert_eq!(event.content_type, "application/vnd.x+json");
    assert_eq!(event.data, b"[1]");

    let event = decode_with(json!({"data_base64": "AP8=", "datacontenttype": "image/png"}));
    assert_eq!(event.content_type, "image/png");
    assert_eq!(event.data, vec![0x00, 0xff]);

    let event = decode_with(json!({"data_base64": "AP8="}));
    assert_eq!(event.content_type, OCTET_STREAM);

    let event = decode_with(json!({}));
    assert!(event.data.is_empty());
    assert!(
        chrono::DateTime::parse_from_rfc3339(&event.time).is_ok(),
        "a missing time is now"
    );

    let event = decode_with(json!({"switchboardhops": "4"}));
    assert_eq!(hops(&event), 4);
    let event = decode_with(json!({"switchboardhops": 4}));
    assert_eq!(
        hops(&event),
        4,
        "numbers are accepted for the hop extension"
    );
}

#[test]
fn malformed_structured_cloudevents_say_what_is_wrong() {
    let structured = |body: &[u8]| decode_err(&message(body.to_vec(), Some(CE_JSON)));
    let without = |name: &str| {
        let mut body = structured_body();
        body.as_object_mut().unwrap().remove(name);
        structured(body.to_string().as_bytes())
    };
    let with = |name: &str, value: Value| {
        let mut body = structured_body();
        body[name] = value;
        structured(body.to_string().as_bytes())
    };
    for name in ["id", "source", "type", "specversion"] {
        assert!(
            matches!(without(name), EnvelopeError::MissingAttribute { mode: CloudEventsMode::Structured, name: n } if n == name),
            "{name}"
        );
    }
    assert_eq!(
        with("specversion", json!("0.3")),
        EnvelopeError::UnsupportedSpecVersion("0.3".into())
    );
    assert!(matches!(
        structured(b"{not json"),
        EnvelopeError::NotAnObject(_)
    ));
    assert_eq!(
        structured(b"[1, 2]"),
        EnvelopeError::NotAnObject("the body is an array".into())
    );
    let mut body = structured_body();
    body.as_object_mut().unwrap().remove("data");
    body["data_base64"] = json!("not base64!");
    assert!(matches!(
        structured(body.to_string().as_bytes()),
        EnvelopeError::BadBase64(_)
    ));
    assert_eq!(
        with("data_base64", json!("AA==")),
        EnvelopeError::BadAttribute {
            name: "data_base64".into(),
            problem: "cannot be given together with \"data\"".into()
        }
    );
    assert!(matches!(
        with("time", json!("yesterday")),
        EnvelopeError::BadAttribute { name, .. } if name == "time"
    ));
    assert_eq!(
        with("id", json!(7)),
        EnvelopeError::BadAttribute {
            name: "id".into(),
            problem: "must be a string, not a number".into()
        }
    );
    assert_eq!(
        with("source", json!("")),
        EnvelopeError::BadAttribute {
            name: "source".into(),
            problem: "is empty".into()
        }
    );
    assert_eq!(
        with("switchboardhops", json!("x")),
        EnvelopeError::BadHops("x".into())
    );
}

#[test]
fn batches_and_other_event_formats_are_refused() {
    let body = json_body(json!([structured_body()]));
    assert_eq!(
        decode_err(&message(
            body.clone(),
            Some("application/cloudevents-batch+json")
        )),
        EnvelopeError::BatchUnsupported
    );
    assert!(matches!(
        decode_err(&message(body, Some("application/cloudevents+avro"))),
        EnvelopeError::UnsupportedFormat(_)
    ));
}

// --- CloudEvents, binary mode -----------------------------------------------------

#[test]
fn binary_cloudevents_with_any_header_prefix() {
    // AMQP binding 1.0.3 and 1.0.2, and the SDKs' RabbitMQ binding.
    for prefix in ["cloudEvents_", "cloudEvents:", "ce-"] {
        let h = |name: &str| format!("{prefix}{name}");
        let headers = [
            (h("specversion"), "1.0"),
            (h("id"), "ce-2"),
            (h("source"), "/orders"),
            (h("type"), "order.placed"),
            (h("time"), "2026-11-22T10:00:00+01:00"),
            (h("correlationid"), "flow-1"),
            (h("tenantid"), "acme"),
            (h("switchboardhops"), "2"),
            (h("region"), "eu"),
            ("x-amqp".to_string(), "yes"),
        ];
        let msg = Message {
            body: Bytes::from_static(br#"{"type":"not-the-kind","order":1}"#),
            content_type: Some(JSON.into()),
            message_id: Some("amqp-id".into()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.clone(), (*v).into()))
                .collect(),
        };
        let event = decode("orders", "order.placed", &msg, 1).unwrap();
        assert_eq!(
            event.id, "ce-2",
            "{prefix}: the CloudEvents id, not message-id"
        );
        assert_eq!(
            event.kind, "order.placed",
            "{prefix}: headers win over the body's type"
        );
        assert_eq!(event.source, "/orders");
        assert_eq!(event.time, "2026-11-22T10:00:00+01:00");
        assert_eq!(event.correlation_id.as_deref(), Some("flow-1"));
        assert_eq!(event.tenant_id.as_deref(), Some("acme"));
        assert_eq!(event.content_type, JSON);
        assert_eq!(event.data, br#"{"type":"not-the-kind","order":1}"#);
        assert_eq!(hops(&event), 2);
        assert_eq!(header(&event, "region"), Some("eu"));
        assert_eq!(header(&event, "x-amqp"), Some("yes"));
        assert!(
            event.headers.iter().all(|(k, _)| !k.starts_with(prefix)),
            "{prefix}: attribute headers are not event headers"
        );
    }
}

#[test]
fn binary_cloudevent_content_type_falls_back_to_header_then_inference() {
    let base = [
        ("cloudEvents_specversion", "1.0"),
        ("cloudEvents_id", "1"),
        ("cloudEvents_source", "s"),
        ("cloudEvents_type", "t"),
    ];
    let event = decode(
        "e",
        "k",
        &with_headers(message(&b"\x00\x01"[..], None), &base),
        1,
    )
    .unwrap();
    assert_eq!(event.content_type, OCTET_STREAM);
    let event = decode(
        "e",
        "k",
        &with_headers(message(&b"[1]"[..], None), &base),
        1,
    )
    .unwrap();
    assert_eq!(event.content_type, JSON);
    let mut headers = base.to_vec();
    headers.push(("cloudEvents_datacontenttype", "text/csv"));
    let event = decode(
        "e",
        "k",
        &with_headers(message(&b"a,b"[..], None), &headers),
        1,
    )
    .unwrap();
    assert_eq!(event.content_type, "text/csv");
}

#[test]
fn malformed_binary_cloudevents_say_what_is_wrong() {
    let msg = with_headers(
        message(&b"{}"[..], None),
        &[
            ("cloudEvents:specversion", "1.0"),
            ("cloudEvents:id", "1"),
            ("cloudEvents:source", "s"),
        ],
    );
    assert_eq!(
        decode_err(&msg),
        EnvelopeError::MissingAttribute {
            mode: CloudEventsMode::Binary,
            name: "type"
        }
    );
    let msg = with_headers(message(&b"{}"[..], None), &[("cloudEvents_id", "1")]);
    assert!(matches!(
        decode_err(&msg),
        EnvelopeError::MissingAttribute {
            name: "specversion",
            ..
        }
    ));
    let msg = with_headers(
        message(&b"{}"[..], None),
        &[("cloudEvents_specversion", "0.3"), ("cloudEvents_id", "1")],
    );
    assert_eq!(
        decode_err(&msg),
        EnvelopeError::UnsupportedSpecVersion("0.3".into())
    );
}

// --- Raw bodies -------------------------------------------------------------------

#[test]
fn raw_binary_body_takes_kind_from_routing_key_and_id_from_message_id() {
    let msg = Message {
        body: Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef]),
        content_type: Some("image/png".into()),
        message_id: Some("m-1".into()),
        headers: vec![("x-origin".into(), "camera".into())],
    };
    let event = decode("images", "image.captured", &msg, 1).unwrap();
    assert_eq!(event.kind, "image.captured");
    assert_eq!(event.id, "m-1");
    assert_eq!(event.exchange, "images");
    assert_eq!(event.content_type, "image/png");
    assert_eq!(event.data, vec![0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(event.source, "");
    assert_eq!(event.correlation_id, None);
    assert!(chrono::DateTime::parse_from_rfc3339(&event.time).is_ok());
    assert_eq!(event.headers, vec![("x-origin".into(), "camera".into())]);
}

#[test]
fn raw_bodies_without_labels_or_ids() {
    let event = decode(
        "e",
        "order.placed",
        &message(&br#"{"order":1}"#[..], None),
        1,
    )
    .unwrap();
    assert_eq!(event.kind, "order.placed");
    assert_eq!(event.content_type, JSON, "an unlabelled JSON body is JSON");
    assert!(is_v5(&event.id), "derived from the message");
    assert_eq!(data(&event), json!({"order": 1}));

    let event = decode("e", "k", &message(&b"plain words"[..], None), 1).unwrap();
    assert_eq!(event.content_type, OCTET_STREAM);
    assert_eq!(event.data, b"plain words");

    // A JSON object whose `type` is not a string is a payload, not an envelope.
    let event = decode("e", "k", &message(json_body(json!({"type": 3})), None), 1).unwrap();
    assert_eq!(event.kind, "k");
    assert_eq!(data(&event), json!({"type": 3}));

    let event = decode("e", "k", &message(Bytes::new(), None), 1).unwrap();
    assert!(event.data.is_empty());
}

#[test]
fn raw_body_needs_a_routing_key() {
    let err = decode("e", "", &message(&b"x"[..], None), 1).unwrap_err();
    assert_eq!(err, EnvelopeError::EmptyRoutingKey);
}

// --- Outputs ----------------------------------------------------------------------

fn output(kind: &str, data: &[u8], headers: &[(&str, &str)]) -> Output {
    Output {
        kind: kind.into(),
        content_type: None,
        data: data.to_vec(),
        exchange: None,
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
    }
}

#[test]
fn encoded_output_decodes_back_with_host_fields() {
    let input = decode(
        "payments",
        "payment.success",
        &message(seed_body(), None),
        1,
    )
    .unwrap();
    let out = output("bill.paid", br#"{"bill_id":"b1"}"#, &[("k", "v")]);
    let msg = encode_output("billing", &input, 0, &out).unwrap();
    assert_eq!(msg.content_type.as_deref(), Some(JSON));
    let id = output_id("evt-1", "billing", 0);
    assert_eq!(msg.message_id.as_deref(), Some(id.as_str()));
    assert_eq!(msg.header(HOPS_HEADER), Some("1"));
    assert_eq!(msg.header(SOURCE_HEADER), Some("billing"));
    assert_eq!(msg.header("k"), Some("v"));

    let next = decode("billing", "bill.paid", &msg, 1).unwrap();
    assert_eq!(next.id, id);
    assert_eq!(next.kind, "bill.paid");
    assert_eq!(next.source, "billing");
    assert_eq!(data(&next), json!({"bill_id": "b1"}));
    assert_eq!(next.correlation_id.as_deref(), Some("flow-9"));
    assert_eq!(next.causation_id.as_deref(), Some("evt-1"));
    assert_eq!(next.tenant_id.as_deref(), Some("acme"));
    assert_eq!(hops(&next), 1);
    assert_eq!(
        count(&next, "k"),
        1,
        "metadata and AMQP header are not doubled"
    );
    assert_eq!(count(&next, HOPS_HEADER), 1);
    assert_eq!(header(&next, SOURCE_HEADER), Some("billing"));

    // And on: hops count up, the flow keeps its correlation id.
    let third = encode_output("notification", &next, 0, &out).unwrap();
    let third = decode("notification", "bill.paid", &third, 1).unwrap();
    assert_eq!(hops(&third), 2);
    assert_eq!(third.correlation_id.as_deref(), Some("flow-9"));
    assert_eq!(third.causation_id.as_deref(), Some(id.as_str()));
}

#[test]
fn a_replay_mark_follows_the_input_and_cannot_be_forged_by_a_plugin() {
    let replayed = decode(
        "payments",
        "payment.success",
        &with_headers(message(seed_body(), None), &[(REPLAY_HEADER, "r-1")]),
        1,
    )
    .unwrap();
    let out = output(
        "bill.paid",
        br#"{"bill_id":"b1"}"#,
        &[(REPLAY_HEADER, "forged")],
    );
    let msg = encode_output("billing", &replayed, 0, &out).unwrap();
    let marks: Vec<_> = msg
        .headers
        .iter()
        .filter(|(k, _)| k == REPLAY_HEADER)
        .collect();
    assert_eq!(marks, [&(REPLAY_HEADER.to_string(), "r-1".to_string())]);
    // The same id as the first time: consumers dedupe, or tell by the mark.
    let fresh = decode(
        "payments",
        "payment.success",
        &message(seed_body(), None),
        1,
    )
    .unwrap();
    let first = encode_output("billing", &fresh, 0, &out).unwrap();
    assert_eq!(first.message_id, msg.message_id);
    assert_eq!(
        first.header(REPLAY_HEADER),
        None,
        "a plugin cannot mark a replay"
    );
}

#[test]
fn trace_context_flows_from_input_to_outputs() {
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let input = decode(
        "payments",
        "payment.success",
        &with_headers(
            message(seed_body(), None),
            &[("traceparent", parent), ("tracestate", "vendor=1")],
        ),
        1,
    )
    .unwrap();
    let out = output("bill.paid", br#"{}"#, &[]);
    let msg = encode_output("billing", &input, 0, &out).unwrap();
    assert_eq!(msg.header("traceparent"), Some(parent));
    assert_eq!(msg.header("tracestate"), Some("vendor=1"));
    // Through a second plugin, still the same trace.
    let next = decode("billing", "bill.paid", &msg, 1).unwrap();
    let third = encode_output("notification", &next, 0, &out).unwrap();
    assert_eq!(third.header("traceparent"), Some(parent));
    // An output that sets its own (a new span) keeps it.
    let own = "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01";
    let out = output("bill.paid", br#"{}"#, &[("traceparent", own)]);
    let msg = encode_output("billing", &input, 0, &out).unwrap();
    assert_eq!(msg.header("traceparent"), Some(own));
    assert_eq!(
        msg.headers
            .iter()
            .filter(|(k, _)| k == "traceparent")
            .count(),
        1
    );
}

#[test]
fn outputs_of_cloudevents_and_raw_inputs_are_seed_envelopes() {
    let ce = decode(
        "e",
        "k",
        &message(json_body(structured_body()), Some(CE_JSON)),
        1,
    )
    .unwrap();
    let raw = decode("e", "k", &message(&b"\x01\x02"[..], None), 1).unwrap();
    for input in [ce, raw] {
        let msg = encode_output("p", &input, 1, &output("x.y", b"[1]", &[])).unwrap();
        let body: Value = serde_json::from_slice(&msg.body).unwrap();
        assert_eq!(body["type"], json!("x.y"));
        assert_eq!(body["causation_id"], json!(input.id));
        let next = decode("e", "x.y", &msg, 1).unwrap();
        assert_eq!(next.tenant_id, input.tenant_id);
        assert_eq!(next.data, b"[1]");
    }
}

#[test]
fn binary_outputs_round_trip() {
    let input = decode("e", "k", &message(seed_body(), None), 1).unwrap();
    let mut out = output("blob", &[0xff, 0x00], &[]);
    out.content_type = Some("application/octet-stream".into());
    let next = decode(
        "e",
        "blob",
        &encode_output("p", &input, 0, &out).unwrap(),
        1,
    )
    .unwrap();
    assert_eq!(next.data, vec![0xff, 0x00]);
    assert_eq!(next.content_type, "application/octet-stream");
}

#[test]
fn plugins_cannot_set_host_owned_or_cloudevents_headers() {
    let mut input = decode("e", "k", &message(seed_body(), None), 1).unwrap();
    input.headers.push((HOPS_HEADER.into(), "3".into()));
    let out = output(
        "x.y",
        b"{}",
        &[
            (HOPS_HEADER, "0"),
            (SOURCE_HEADER, "someone-else"),
            ("cloudEvents_id", "spoof"),
            ("keep", "me"),
        ],
    );
    let msg = encode_output("p", &input, 0, &out).unwrap();
    assert_eq!(
        msg.headers,
        vec![
            (HOPS_HEADER.into(), "4".into()),
            (SOURCE_HEADER.into(), "p".into()),
            ("keep".into(), "me".into()),
        ]
    );
    let next = decode("e", "x.y", &msg, 1).unwrap();
    assert_eq!(hops(&next), 4);
    assert_eq!(header(&next, SOURCE_HEADER), Some("p"));
}

#[test]
fn output_declared_json_that_is_not_is_an_error() {
    let input = decode("e", "k", &message(seed_body(), None), 1).unwrap();
    let err = encode_output("p", &input, 2, &output("x.y", b"not json", &[])).unwrap_err();
    assert!(matches!(err, EnvelopeError::OutputNotJson { index: 2, .. }));
}

// --- Ingress ----------------------------------------------------------------------

#[test]
fn ingress_completes_seed_envelopes() {
    let (msg, id) = ingress_message(
        "payment.success",
        br#"{"type":"payment.success","data":{"a":1},"extra":"kept"}"#,
        Some(JSON),
    )
    .unwrap();
    assert!(is_v7(&id));
    assert_eq!(msg.message_id.as_deref(), Some(id.as_str()));
    assert_eq!(msg.content_type.as_deref(), Some(JSON));
    let body: Value = serde_json::from_slice(&msg.body).unwrap();
    assert_eq!(body["id"], json!(id));
    assert_eq!(body["extra"], json!("kept"));
    assert!(body["timestamp"].is_string());
    let event = decode("e", "payment.success", &msg, 1).unwrap();
    assert_eq!(event.id, id);
    assert_eq!(data(&event), json!({"a": 1}));

    // An id and a timestamp of its own are kept; the type need not be the key.
    let (msg, id) = ingress_message("other.key", &seed_body(), None).unwrap();
    assert_eq!(id, "evt-1");
    let event = decode("e", "other.key", &msg, 1).unwrap();
    assert_eq!(event.kind, "payment.success");
    assert_eq!(event.time, "2026-11-22T10:00:00Z");
}

#[test]
fn ingress_publishes_structured_cloudevents_as_they_are() {
    let body = structured_body().to_string();
    let (msg, id) = ingress_message("k", body.as_bytes(), Some(CE_JSON)).unwrap();
    assert_eq!(id, "ce-1");
    assert_eq!(msg.body, body.as_bytes());
    assert_eq!(msg.content_type.as_deref(), Some(CE_JSON));
    assert_eq!(msg.message_id.as_deref(), Some("ce-1"));

    let mut body = structured_body();
    body.as_object_mut().unwrap().remove("id");
    let err = ingress_message("k", body.to_string().as_bytes(), Some(CE_JSON)).unwrap_err();
    assert!(matches!(
        err,
        EnvelopeError::MissingAttribute { name: "id", .. }
    ));
    let err = ingress_message("k", b"[]", Some("application/cloudevents-batch+json"));
    assert_eq!(err.unwrap_err(), EnvelopeError::BatchUnsupported);
}

#[test]
fn ingress_wraps_other_json_values() {
    for value in [json!([1, 2]), json!("text"), json!(42), json!({"type": 1})] {
        let (msg, id) =
            ingress_message("order.placed", value.to_string().as_bytes(), None).unwrap();
        assert!(is_v7(&id));
        let event = decode("e", "order.placed", &msg, 1).unwrap();
        assert_eq!(event.id, id);
        assert_eq!(event.kind, "order.placed");
        assert_eq!(data(&event), value);
    }
    assert_eq!(
        ingress_message("", b"[1]", None).unwrap_err(),
        EnvelopeError::EmptyRoutingKey
    );
}

#[test]
fn ingress_publishes_labelled_non_json_raw() {
    let (msg, id) = ingress_message("img.new", &[0x89, 0x50], Some("image/png")).unwrap();
    assert!(is_v7(&id));
    assert_eq!(msg.message_id.as_deref(), Some(id.as_str()));
    assert_eq!(msg.content_type.as_deref(), Some("image/png"));
    let event = decode("e", "img.new", &msg, 1).unwrap();
    assert_eq!(
        (event.id, event.kind, event.data),
        (id, "img.new".into(), vec![0x89, 0x50])
    );

    assert_eq!(
        ingress_message("k", b"not json", None).unwrap_err(),
        EnvelopeError::NoContentType
    );
    assert!(matches!(
        ingress_message("k", b"{oops", Some("application/json")).unwrap_err(),
        EnvelopeError::NotJson { .. }
    ));
    assert!(matches!(
        ingress_message("k", br#"{"type":"a","id":1}"#, None).unwrap_err(),
        EnvelopeError::Malformed(_)
    ));
}

#[test]
fn error_messages_are_one_sentence_naming_what_is_wrong() {
    let cases = [
        (
            EnvelopeError::MissingAttribute {
                mode: CloudEventsMode::Structured,
                name: "id",
            },
            "CloudEvent (structured mode, application/cloudevents+json) has no \"id\" attribute, which is required",
        ),
        (
            EnvelopeError::UnsupportedSpecVersion("0.3".into()),
            "CloudEvents specversion \"0.3\" is not supported; only \"1.0\" is",
        ),
        (
            EnvelopeError::BadHops("many".into()),
            "the hop count \"many\" is not a non-negative integer",
        ),
    ];
    for (err, text) in cases {
        assert_eq!(err.to_string(), text);
    }
}

// --- Hostile input ----------------------------------------------------------------

fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "type",
            "id",
            "specversion",
            "source",
            "time",
            "timestamp",
            "data",
            "data_base64",
            "datacontenttype",
            "content_type",
            "hops",
            "metadata",
            "correlationid",
            "switchboardhops",
            HOPS_HEADER,
        ])
        .prop_map(String::from),
        "\\PC{0,6}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec!["1.0", "0.3", "", "AP8=", "2026-11-22T10:00:00Z", "3"])
            .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        json_value().prop_map(|value| value.to_string().into_bytes()),
        // Valid JSON, then cut or corrupted.
        (json_value(), any::<prop::sample::Index>()).prop_map(|(value, at)| {
            let mut bytes = value.to_string().into_bytes();
            let cut = at.index(bytes.len() + 1);
            bytes.truncate(cut);
            bytes
        }),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "1.0",
            "0.3",
            "",
            "0",
            "4294967296",
            "-1",
            "x",
            "2026-11-22T10:00:00Z",
            JSON,
            CE_JSON,
            "application/cloudevents-batch+json; charset=utf-8",
            "text/plain",
        ])
        .prop_map(String::from),
        any::<String>(),
    ]
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "cloudEvents_specversion",
            "cloudEvents:specversion",
            "cloudEvents_id",
            "cloudEvents:id",
            "cloudEvents_source",
            "cloudEvents_type",
            "cloudEvents_time",
            "cloudEvents_switchboardhops",
            "cloudEvents_tenantid",
            "cloudEvents_datacontenttype",
            HOPS_HEADER,
            SOURCE_HEADER,
            "trace",
        ])
        .prop_map(String::from),
        any::<String>(),
    ]
}

fn hostile_message() -> impl Strategy<Value = Message> {
    (
        body(),
        prop::option::of(text()),
        prop::option::of(text()),
        prop::collection::vec((header_name(), text()), 0..8),
    )
        .prop_map(|(body, content_type, message_id, headers)| Message {
            body: Bytes::from(body),
            content_type,
            message_id,
            headers,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn decode_never_panics_and_keeps_its_promises(
        message in hostile_message(),
        routing_key in "\\PC{0,12}",
        attempt in any::<u32>(),
    ) {
        match decode("ex", &routing_key, &message, attempt) {
            Ok(event) => {
                prop_assert_eq!(event.exchange.as_str(), "ex");
                prop_assert_eq!(event.attempt, attempt);
                prop_assert!(!event.kind.is_empty());
                prop_assert!(!event.id.is_empty());
                prop_assert!(count(&event, HOPS_HEADER) <= 1);
                if let Some(sent) = message.header(HOPS_HEADER) {
                    prop_assert_eq!(
                        header(&event, HOPS_HEADER).map(String::from),
                        sent.trim().parse::<u32>().ok().map(|n| n.to_string()),
                        "the message's hop header wins"
                    );
                }
            }
            Err(err) => prop_assert!(!err.to_string().is_empty()),
        }
    }

    #[test]
    fn ingress_publishes_only_what_decode_accepts(
        body in body(),
        routing_key in "\\PC{0,12}",
        content_type in prop::option::of(text()),
    ) {
        if let Ok((message, id)) = ingress_message(&routing_key, &body, content_type.as_deref()) {
            let event = decode("ex", &routing_key, &message, 1);
            prop_assert!(event.is_ok(), "{:?}", event.err());
            prop_assert_eq!(event.map(|e| e.id).ok(), Some(id));
        }
    }
}

// --- Input quoted in errors is cut short ---------------------------------------

#[test]
fn errors_quote_at_most_an_excerpt_of_the_input() {
    let long = "9".repeat(1 << 20);
    let short = |err: EnvelopeError| {
        let text = err.to_string();
        assert!(text.len() < 400, "{} bytes: {}", text.len(), &text[..200]);
        assert!(text.contains("more bytes)"), "{text}");
    };
    short(decode_err(&with_headers(
        message(seed_body(), None),
        &[(HOPS_HEADER, &long)],
    )));
    let structured = json!({"specversion": long, "id": "a", "source": "s", "type": "t"});
    short(decode_err(&message(json_body(structured), Some(CE_JSON))));
    let late = json!({"specversion": "1.0", "id": "a", "source": "s", "type": "t", "time": long});
    short(decode_err(&message(json_body(late), Some(CE_JSON))));
    // serde quotes the offending value too.
    let seed = json!({"type": "t", "hops": long, "data": {}});
    short(decode_err(&message(json_body(seed), None)));
    let err = ingress_message(
        "k",
        long.as_bytes(),
        Some(&format!("application/cloudevents+{long}")),
    )
    .unwrap_err();
    short(err);
    // Short input is quoted whole.
    assert_eq!(
        decode_err(&with_headers(
            message(seed_body(), None),
            &[(HOPS_HEADER, "many")]
        )),
        EnvelopeError::BadHops("many".into())
    );
}

#[test]
fn outputs_carry_no_router_header_a_plugin_copied_from_its_input() {
    let input = decode("e", "k", &message(seed_body(), None), 1).unwrap();
    let output = Output {
        kind: "done".into(),
        content_type: None,
        data: b"{}".to_vec(),
        exchange: None,
        headers: vec![
            ("switchboard-attempt".into(), "3".into()),
            ("switchboard-routing-key".into(), "other".into()),
            ("x-mine".into(), "kept".into()),
        ],
    };
    let message = encode_output("p", &input, 0, &output).unwrap();
    let names: Vec<&str> = message.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, vec![HOPS_HEADER, SOURCE_HEADER, "x-mine"]);
}
