use super::*;

fn archived(seq: u64, exchange: &str, routing_key: &str) -> ArchivedEvent {
    ArchivedEvent {
        seq,
        time: chrono::Utc::now(),
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        id: format!("e{seq}"),
        kind: routing_key.into(),
        causation_id: None,
        correlation_id: None,
        aggregate: None,
        content_type: Some("application/json".into()),
        message_id: None,
        headers: Vec::new(),
        body: Some(
            serde_json::value::RawValue::from_string(format!(
                r#"{{"id":"e{seq}","type":"{routing_key}","data":{{}}}}"#
            ))
            .unwrap(),
        ),
        body_base64: None,
    }
}

const CONFIG: &str = r##"
[[exchanges]]
name = "events"
kind = "topic"

[[exchanges]]
name = "audit"
kind = "fanout"

[plugins.orders]
[plugins.other]

[[routes]]
exchange = "events"
patterns = ["order.*"]
plugin = "orders"

[[routes]]
exchange = "audit"
patterns = ["#"]
plugin = "orders"

[[routes]]
exchange = "events"
patterns = ["#"]
plugin = "other"
"##;

#[test]
fn only_what_the_plugins_routes_deliver_is_replayed() {
    let config = RouterConfig::parse(CONFIG, Path::new(".")).unwrap();
    let events = vec![
        archived(1, "events", "order.created"),
        archived(2, "events", "bill.created"),
        archived(3, "audit", "anything.at.all"),
        archived(4, "elsewhere", "order.created"),
        archived(5, "events", "order.created.late"),
    ];
    let seqs = |events: Vec<ArchivedEvent>| events.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(routed_to(&config, "orders", events.clone()).unwrap()),
        [1, 3]
    );
    assert_eq!(
        seqs(routed_to(&config, "other", events.clone()).unwrap()),
        [1, 2, 5]
    );
    let unknown = routed_to(&config, "nobody", events).unwrap_err();
    assert_eq!(unknown.to_string(), "no plugin \"nobody\" is configured");
}

#[test]
fn outcomes_compare_without_timestamps() {
    let out = |data: Value, at: &str| json!({"input": "e1", "kind": "k", "outputs": [{"type": "x", "data": data, "timestamp": at}]});
    let fail =
        |kind: &str| json!({"input": "e1", "kind": "k", "failure": {"kind": kind, "reason": "r"}});
    assert_eq!(
        compare(&out(json!(1), "t1"), &out(json!(1), "t2")),
        Verdict::Same
    );
    assert_eq!(
        compare(&out(json!(1), "t1"), &out(json!(2), "t1")),
        Verdict::Differ
    );
    assert_eq!(
        compare(&fail("reject"), &out(json!(1), "t1")),
        Verdict::FailsOnlyInRunning
    );
    assert_eq!(
        compare(&out(json!(1), "t1"), &fail("trap")),
        Verdict::FailsOnlyInCandidate
    );
    assert_eq!(compare(&fail("reject"), &fail("reject")), Verdict::Same);
    assert_eq!(compare(&fail("reject"), &fail("retry")), Verdict::Differ);
}

#[test]
fn a_rebuild_goes_past_settled_failures_only() {
    let fail = |kind: &str| json!({"input": "e1", "failure": {"kind": kind, "reason": "r"}});
    assert!(!stops_rebuild(&json!({"input": "e1", "outputs": []})));
    for kind in SETTLED_FAILURES {
        assert!(!stops_rebuild(&fail(kind)), "{kind}");
    }
    assert!(!stops_rebuild(&fail("retry")), "tried again");
    for kind in [
        "timeout",
        "trap",
        "panic",
        "kv_unavailable",
        "out_of_memory",
    ] {
        assert!(stops_rebuild(&fail(kind)), "{kind}");
    }
}

#[test]
fn a_delayed_output_shows_its_delay() {
    let event = crate::envelope::decode(
        "events",
        "order.created",
        &crate::bus::Message {
            body: bytes::Bytes::from_static(br#"{"id":"e1","type":"order.created","data":{}}"#),
            content_type: Some("application/json".into()),
            message_id: None,
            headers: Vec::new(),
        },
        1,
    )
    .unwrap();
    let output = |headers: Vec<(String, String)>| Output {
        kind: "saga.timeout".into(),
        content_type: None,
        data: b"{}".to_vec(),
        exchange: None,
        headers,
    };
    let delayed = output(vec![(crate::envelope::DELAY_HEADER.into(), "30000".into())]);
    let line = outcome("saga", &event, Ok(vec![delayed, output(Vec::new())]));
    assert_eq!(line["outputs"][0]["delay_ms"], 30_000);
    assert_eq!(line["outputs"][0]["type"], "saga.timeout");
    assert!(line["outputs"][1].get("delay_ms").is_none());
}
