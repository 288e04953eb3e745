use std::io::Write as _;

use bytesize::ByteSize;
use serde_json::{Value, json};

use super::*;
use crate::config::AggregateRule;

fn config() -> ArchiveConfig {
    ArchiveConfig {
        enabled: true,
        aggregates: vec![
            AggregateRule {
                pattern: "order.*".into(),
                field: "data.order_id".into(),
            },
            AggregateRule {
                pattern: "bill.*".into(),
                field: "data.bill_id".into(),
            },
        ],
        ..ArchiveConfig::default()
    }
}

fn out(exchange: &str, key: &str, body: &[u8]) -> Outgoing {
    Outgoing {
        exchange: exchange.into(),
        routing_key: key.into(),
        message: Message {
            body: body.to_vec().into(),
            content_type: Some("application/json".into()),
            message_id: None,
            headers: vec![("x-tenant".into(), "t1".into())],
        },
    }
}

fn order(id: &str, kind: &str, order_id: &str) -> Outgoing {
    let body = json!({"id": id, "type": kind, "source": "shop", "correlation_id": "c-1",
                      "data": {"order_id": order_id}});
    out("events", kind, body.to_string().as_bytes())
}

fn all(archive: &Archive) -> Vec<ArchivedEvent> {
    archive.query(&Query::default()).unwrap()
}

#[test]
fn events_come_back_in_order_byte_for_byte_with_their_ids_and_aggregates() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Archive::open(dir.path(), &config()).unwrap();
    let spaced = br#"{ "id": "e-1", "type": "order.created",  "data": {"order_id": "o-1"} }"#;
    let binary = [0u8, 159, 146, 150];
    archive
        .append(&[
            out("events", "order.created", spaced),
            out("events", "blob", &binary),
        ])
        .unwrap();
    archive
        .append(&[
            order("e-3", "order.paid", "o-1"),
            order("e-4", "order.created", "o-2"),
        ])
        .unwrap();
    let events = all(&archive);
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert_eq!(&events[0].message().body[..], spaced);
    assert_eq!(&events[1].message().body[..], binary);
    assert_eq!(events[0].id, "e-1");
    assert_eq!(events[0].kind, "order.created");
    assert_eq!(events[0].aggregate.as_deref(), Some("o-1"));
    assert_eq!(events[1].aggregate, None);
    assert_eq!(events[2].correlation_id.as_deref(), Some("c-1"));
    assert_eq!(
        events[2].message().headers,
        [("x-tenant".to_string(), "t1".to_string())]
    );

    let o1 = archive
        .query(&Query {
            aggregate: Some("o-1".into()),
            ..Query::default()
        })
        .unwrap();
    let ids: Vec<&str> = o1.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["e-1", "e-3"]);
    // The same answer without the index (how the CLI reads).
    let scanned = read(
        archive.dir(),
        &Query {
            aggregate: Some("o-1".into()),
            ..Query::default()
        },
    )
    .unwrap();
    assert_eq!(scanned.len(), 2);
    let paid = archive
        .query(&Query::parse(None, Some("order.paid"), None, None, None).unwrap())
        .unwrap();
    assert_eq!(paid.len(), 1);
    let none = archive
        .query(&Query {
            aggregate: Some("nobody".into()),
            ..Query::default()
        })
        .unwrap();
    assert!(none.is_empty());
    let page = archive
        .query(&Query {
            after: Some(2),
            limit: Some(1),
            ..Query::default()
        })
        .unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
}

#[test]
fn only_the_configured_exchanges_are_archived() {
    let dir = tempfile::tempdir().unwrap();
    let config = ArchiveConfig {
        exchanges: vec!["events".into()],
        ..config()
    };
    let archive = Archive::open(dir.path(), &config).unwrap();
    archive
        .append(&[order("a", "order.created", "o"), out("audit", "x", b"{}")])
        .unwrap();
    let events = all(&archive);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].exchange, "events");
}

#[test]
fn a_torn_or_corrupt_tail_is_cut_at_the_last_good_record_and_appends_go_on() {
    let dir = tempfile::tempdir().unwrap();
    {
        let archive = Archive::open(dir.path(), &config()).unwrap();
        for i in 0..3 {
            archive
                .append(&[order(&format!("e-{i}"), "order.created", "o")])
                .unwrap();
        }
    }
    let segment = list_segments(&dir.path().join("archive")).unwrap()[0]
        .1
        .clone();
    let whole = std::fs::metadata(&segment).unwrap().len();
    // A write cut short: half of a fourth record.
    let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
    file.write_all(&200u32.to_le_bytes()).unwrap();
    file.write_all(&[7u8; 50]).unwrap();
    drop(file);
    {
        let archive = Archive::open(dir.path(), &config()).unwrap();
        assert_eq!(std::fs::metadata(&segment).unwrap().len(), whole);
        assert_eq!(all(&archive).len(), 3);
        archive.append(&[order("e-3", "order.paid", "o")]).unwrap();
        let events = all(&archive);
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
    }
    // A flipped byte inside the last record: its checksum fails.
    let mut bytes = std::fs::read(&segment).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x55;
    std::fs::write(&segment, &bytes).unwrap();
    let archive = Archive::open(dir.path(), &config()).unwrap();
    let events = all(&archive);
    assert_eq!(
        events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["e-0", "e-1", "e-2"]
    );
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), whole);
    archive.append(&[order("e-4", "order.paid", "o")]).unwrap();
    assert_eq!(all(&archive).last().map(|e| e.seq), Some(4));
}

#[test]
fn retention_by_size_deletes_the_oldest_segments_never_the_current_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = ArchiveConfig {
        segment_size: ByteSize::kib(4),
        max_size: ByteSize::kib(12),
        ..config()
    };
    let archive = Archive::open(dir.path(), &config).unwrap();
    for i in 0..300 {
        archive
            .append(&[order(
                &format!("e-{i}"),
                "order.created",
                &format!("o-{}", i % 3),
            )])
            .unwrap();
    }
    archive.enforce_retention();
    let segments = list_segments(archive.dir()).unwrap();
    let size: u64 = segments
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(segments.len() >= 2, "{segments:?}");
    assert!(size <= 12 * 1024 + 4 * 1024, "{size} bytes kept");
    let events = all(&archive);
    // What is left is the newest, contiguous, ending with the last append.
    assert_eq!(events.last().map(|e| e.seq), Some(300));
    assert!(events.first().unwrap().seq > 1);
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    // The index forgot the deleted records.
    let o0 = archive
        .query(&Query {
            aggregate: Some("o-0".into()),
            ..Query::default()
        })
        .unwrap();
    assert_eq!(
        o0.len(),
        events
            .iter()
            .filter(|e| e.aggregate.as_deref() == Some("o-0"))
            .count()
    );
    // A reopened archive numbers on from where it was.
    drop(archive);
    let archive = Archive::open(dir.path(), &config).unwrap();
    archive
        .append(&[order("e-300", "order.created", "o-0")])
        .unwrap();
    assert_eq!(all(&archive).last().map(|e| e.seq), Some(301));
}

#[test]
fn retention_by_age_deletes_segments_whose_newest_event_is_too_old() {
    let dir = tempfile::tempdir().unwrap();
    let config = ArchiveConfig {
        segment_size: ByteSize::kib(4),
        max_age: Duration::from_millis(300),
        ..config()
    };
    let archive = Archive::open(dir.path(), &config).unwrap();
    for i in 0..60 {
        archive
            .append(&[order(&format!("old-{i}"), "order.created", "o")])
            .unwrap();
    }
    assert!(list_segments(archive.dir()).unwrap().len() >= 2);
    archive.enforce_retention();
    assert!(
        all(&archive).iter().any(|e| e.id == "old-0"),
        "nothing is old yet"
    );
    std::thread::sleep(Duration::from_millis(400));
    archive
        .append(&[order("new", "order.created", "o")])
        .unwrap();
    archive.enforce_retention();
    let left = all(&archive);
    // Only the segment appended to may still hold old events.
    assert_eq!(list_segments(archive.dir()).unwrap().len(), 1);
    assert_eq!(left.last().map(|e| e.id.as_str()), Some("new"));
    assert!(!left.iter().any(|e| e.id == "old-0"));
}

#[test]
fn concurrent_appends_get_distinct_contiguous_positions() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(Archive::open(dir.path(), &config()).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let archive = archive.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    archive
                        .append(&[
                            order(&format!("t{t}-{i}-a"), "order.created", "o"),
                            order(&format!("t{t}-{i}-b"), "order.paid", "o"),
                        ])
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let events = all(&archive);
    assert_eq!(events.len(), 400);
    assert!(
        events
            .iter()
            .enumerate()
            .all(|(i, e)| e.seq == i as u64 + 1)
    );
    // Each batch is contiguous.
    for pair in events.chunks(2) {
        assert_eq!(
            pair[0].id.trim_end_matches("-a"),
            pair[1].id.trim_end_matches("-b")
        );
    }
}

#[test]
fn times_parse_as_rfc3339_or_as_a_duration_back() {
    let t = parse_time("2026-01-02T03:04:05Z").unwrap();
    assert_eq!(t.to_rfc3339(), "2026-01-02T03:04:05+00:00");
    let hour_ago = parse_time("1h").unwrap();
    let diff = Utc::now() - hour_ago;
    assert!((diff.num_seconds() - 3600).abs() < 5);
    assert!(parse_time("yesterday-ish").is_err());
}

#[test]
fn a_record_encoded_before_its_position_is_the_record_at_that_position() {
    let rules = rules(&config()).unwrap();
    let time: DateTime<Utc> = "2026-12-04T10:11:12.123456Z".parse().unwrap();
    let time_json = serde_json::to_string(&time).unwrap();
    let raw = Outgoing {
        message: Message {
            content_type: Some("text/plain".into()),
            message_id: Some("m-1".into()),
            ..out("audit", "note.added", b"not json").message
        },
        ..out("audit", "note.added", b"")
    };
    for message in [
        order("e-1", "order.created", "o-1"),
        out("events", "bill.created", br#"{"bill_id": 7}"#),
        raw,
        out(
            "ev\"ents",
            "x",
            br#"{"id":"q","type":"t","data":{"exchange":1}}"#,
        ),
    ] {
        let whole = serde_json::to_vec(&record(&rules, 42, time, &message)).unwrap();
        let encoded = Encoded::of(&rules, &message).unwrap();
        assert_eq!(
            String::from_utf8(encoded.payload(42, &time_json)).unwrap(),
            String::from_utf8(whole).unwrap()
        );
    }
}

#[test]
fn aggregates_are_found_along_the_path_and_nowhere_else() {
    let rules = rules(&ArchiveConfig {
        aggregates: vec![
            AggregateRule {
                pattern: "order.*".into(),
                field: "data.order.id".into(),
            },
            AggregateRule {
                pattern: "flow.*".into(),
                field: "correlation_id".into(),
            },
        ],
        ..config()
    })
    .unwrap();
    let of = |key: &str, body: Value| {
        let message = out("events", key, body.to_string().as_bytes());
        record(&rules, 1, Utc::now(), &message).aggregate
    };
    let order = |data: Value| {
        of(
            "order.created",
            json!({"id": "e", "type": "order.created", "data": data}),
        )
    };
    assert_eq!(
        order(json!({"order": {"id": "o-1"}})).as_deref(),
        Some("o-1")
    );
    assert_eq!(order(json!({"order": {"id": 12}})).as_deref(), Some("12"));
    assert_eq!(
        order(json!({"x": [1, {"id": 2}], "order": {"n": {}, "id": "late"}})).as_deref(),
        Some("late")
    );
    let escaped = br#"{"id":"e","type":"order.created","data":{"o\u0072der":{"id":"escaped"}}}"#;
    let message = out("events", "order.created", escaped);
    assert_eq!(
        record(&rules, 1, Utc::now(), &message).aggregate.as_deref(),
        Some("escaped")
    );
    for nothing in [
        json!({"order": {"id": ""}}),
        json!({"order": {"id": null}}),
        json!({"order": {"id": {"deeper": 1}}}),
        json!({"order": ["id"]}),
        json!({"order": "id"}),
        json!({}),
        json!("text"),
    ] {
        assert_eq!(order(nothing.clone()), None, "{nothing}");
    }
    // A repeated name: the last one, as a parsed object keeps.
    let repeated = br#"{"id":"e","type":"order.created","data":{"order":{"id":"a","id":"b"}}}"#;
    let message = out("events", "order.created", repeated);
    assert_eq!(
        record(&rules, 1, Utc::now(), &message).aggregate.as_deref(),
        Some("b")
    );
    // A top-level field, and nothing below it.
    let flow = json!({"id": "e", "type": "flow.step", "correlation_id": "c-9", "data": {}});
    assert_eq!(of("flow.step", flow).as_deref(), Some("c-9"));
    assert_eq!(
        of(
            "other",
            json!({"id": "e", "type": "other", "data": {"order": {"id": "x"}}})
        ),
        None
    );
}
