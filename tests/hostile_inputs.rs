//! Hostile input: what producers (buggy or malicious) can put on the bus or post
//! to the ingress, and what becomes of it.
//!
//! On RabbitMQ: a real `switchboard run` process, a vhost of its own, and the
//! shipped `notification` plugin behind one route (it validates what it gets:
//! data that is not JSON, or has no recipient, is rejected). A thousand inputs
//! crafted to break a decoder go in among healthy events: malformed JSON, 16 MiB
//! bodies, invalid UTF-8, wrong field types, missing fields, ten thousand
//! headers, nesting 100,000 deep, unknown content types, bad CloudEvents
//! attributes, bad hop counts. Each hostile one must come out of the plugin's
//! dead-letter queue, found by its message id, with the failure kind and a
//! reason; every healthy one must be handled; and the process must be the same
//! process, healthy, with a bounded peak memory.
//!
//! On the embedded bus: the same kinds of garbage posted over HTTP are refused
//! with a 4xx, and nothing is enqueued.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard::runtime::MAX_REASON;
use switchboard_tests::broker::{Amqp, Confirmed, Publish, Received, TestVhost, require_broker};
use switchboard_tests::process::Replica;
use switchboard_tests::wait_until;

/// 16 MiB: the size of the largest bodies sent.
const HUGE: usize = 16 << 20;

/// Failure kinds, as the dead-letter headers name them.
const UNDECODABLE: &str = "undecodable";
const REJECT: &str = "reject";
const OUT_OF_MEMORY: &str = "out_of_memory";
const LOOP: &str = "loop";

fn router_toml(url: &str) -> String {
    format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[broker]
url = "{url}"
timeout = "20s"
[defaults]
concurrency = 2
max_attempts = 2
[defaults.backoff]
initial = "50ms"
max = "100ms"
jitter = 0.0
[[exchanges]]
name = "events"
[[exchanges]]
name = "notifications"
[plugins.notification]
output_exchange = "notifications"
[[routes]]
exchange = "events"
pattern = "#"
plugin = "notification"
"##
    )
}

/// One hostile message, and the failure kinds it may be dead-lettered with.
struct Hostile {
    category: &'static str,
    message: Publish,
    expect: &'static [&'static str],
}

/// Builds the hostile messages of one category, numbering their ids.
struct Category {
    name: &'static str,
    made: Vec<Hostile>,
}

impl Category {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            made: Vec::new(),
        }
    }

    /// The id the next message gets.
    fn next_id(&self) -> String {
        format!("h-{}-{:04}", self.name, self.made.len())
    }

    /// A message to the route's exchange with `key` and `body`.
    fn add(
        &mut self,
        key: &str,
        body: impl Into<Vec<u8>>,
        expect: &'static [&'static str],
        dress: impl FnOnce(Publish) -> Publish,
    ) {
        let id = self.next_id();
        let message = dress(Publish::new("events", key, body).message_id(&id));
        self.made.push(Hostile {
            category: self.name,
            message,
            expect,
        });
    }

    /// A seed envelope (as text) routed with `payment.success`.
    fn envelope(&mut self, text: impl Into<Vec<u8>>, expect: &'static [&'static str]) {
        self.add("payment.success", text, expect, |p| p);
    }

    /// A structured CloudEvent (as text).
    fn structured(&mut self, text: impl Into<Vec<u8>>) {
        self.add("payment.success", text, &[UNDECODABLE], |p| {
            p.content_type("application/cloudevents+json")
        });
    }
}

/// A payment as the payments service publishes it: notification emails the
/// customer.
fn healthy(id: &str) -> Value {
    json!({"id": id, "type": "payment.success", "source": "payments-api",
           "timestamp": "2026-11-22T09:05:00Z", "tenant_id": "acme",
           "correlation_id": format!("corr-{id}"),
           "data": {"payment_id": format!("pay-{id}"), "amount": 12.5, "currency": "EUR",
                    "customer": {"name": "Ada", "email": "ada@example.com"}}})
}

/// A healthy payment's text with `data` replaced by `data` (raw JSON text).
fn with_data(id: &str, data: &str) -> String {
    format!(
        r#"{{"id":"{id}","type":"payment.success","source":"payments-api","tenant_id":"acme","data":{data}}}"#
    )
}

/// Deterministic bytes that are neither JSON nor UTF-8 (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    // Not JSON whatever follows, and not UTF-8.
    out[0] = 0xff;
    out
}

/// Seed text: `healthy` with `"12.5"` swapped for `number` (`NaN`, …).
fn with_amount(id: &str, number: &str) -> String {
    healthy(id).to_string().replace("12.5", number)
}

fn malformed_json(into: &mut Vec<Hostile>) {
    let mut c = Category::new("malformed-json");
    let content_types = [None, Some("application/json"), Some("text/plain")];
    // Truncated, at every sort of place (never whole).
    for i in 0..100 {
        let text = healthy(&c.next_id()).to_string();
        let cut = (i * 7919) % (text.len() - 1);
        let ct = content_types[i % 3];
        c.add("payment.success", &text[..cut], &[REJECT], |p| match ct {
            Some(ct) => p.content_type(ct),
            None => p,
        });
    }
    // Trailing garbage after a complete envelope.
    let tails = [
        "}",
        " x",
        ",{}",
        "\0",
        " {\"a\":1}",
        "]",
        "\n\n--",
        "garbage",
    ];
    for i in 0..80 {
        let text = format!("{}{}", healthy(&c.next_id()), tails[i % tails.len()]);
        c.envelope(text, &[REJECT]);
    }
    // Numbers JSON does not have.
    let numbers = [
        "NaN",
        "Infinity",
        "-Infinity",
        "0x10",
        "01",
        ".5",
        "+1",
        "1e999999",
        "1.",
        "--1",
    ];
    for i in 0..60 {
        let text = with_amount(&c.next_id(), numbers[i % numbers.len()]);
        c.envelope(text, &[REJECT]);
    }
    // Lone UTF-16 surrogates in escapes.
    let surrogates = [
        r"\ud800",
        r"\udfff",
        r"\ud800\u0041",
        r"\ud83d",
        r"\udc00\ud800",
        r"\ud800\ud800",
    ];
    for i in 0..60 {
        let id = c.next_id();
        let email = format!("ada{}@example.com", surrogates[i % surrogates.len()]);
        let text = with_data(&id, &format!(r#"{{"customer":{{"email":"{email}"}}}}"#));
        c.envelope(text, &[REJECT]);
    }
    into.extend(c.made);
}

fn huge_bodies(into: &mut Vec<Hostile>) {
    let mut c = Category::new("16mib");
    // Valid JSON, 16 MiB to the byte: `data` is `open`, `fill` repeated, `close`.
    let envelope = |id: &str, open: &str, fill: &[u8], close: &str| {
        let text = with_data(id, "@");
        let (head, tail) = text.split_once('@').unwrap();
        let mut body = format!("{head}{open}").into_bytes();
        let end = format!("{close}{tail}");
        while body.len() + fill.len() + end.len() <= HUGE {
            body.extend_from_slice(fill);
        }
        body.resize(HUGE - end.len(), b' ');
        body.extend_from_slice(end.as_bytes());
        body
    };
    // A 16 MiB string in the data, and no recipient.
    let text = envelope(&c.next_id(), r#"{"blob":""#, b"a", r#""}"#);
    c.envelope(text, &[REJECT, OUT_OF_MEMORY]);
    // 16 MiB of numbers: eight million values to build.
    let text = envelope(&c.next_id(), "[0", b",0", "]");
    c.envelope(text, &[REJECT, OUT_OF_MEMORY]);
    // Garbage, unlabelled (a raw body) and labelled as a structured CloudEvent.
    c.add(
        "payment.success",
        noise(HUGE, 1),
        &[REJECT, OUT_OF_MEMORY],
        |p| p,
    );
    c.structured(noise(HUGE, 2));
    for hostile in &c.made {
        assert_eq!(hostile.message.body.len(), HUGE);
    }
    into.extend(c.made);
}

fn invalid_utf8(into: &mut Vec<Hostile>) {
    let mut c = Category::new("invalid-utf8");
    let sequences: [&[u8]; 8] = [
        &[0xff],
        &[0xc3, 0x28],
        &[0xe2, 0x28, 0xa1],
        &[0xf0, 0x28, 0x8c, 0xbc],
        &[0xc0, 0xaf],                   // overlong '/'
        &[0xed, 0xa0, 0x80],             // a surrogate, UTF-8 encoded
        &[0xf8, 0x88, 0x80, 0x80, 0x80], // five bytes
        &[0xe2, 0x82],                   // cut short
    ];
    for i in 0..60 {
        // Inside a JSON string of an otherwise valid envelope.
        let text = with_data(&c.next_id(), r#"{"customer":{"email":"ada@example.com"}}"#);
        let (head, tail) = text.split_at(text.find("@example").unwrap());
        let mut body = head.as_bytes().to_vec();
        body.extend_from_slice(sequences[i % sequences.len()]);
        body.extend_from_slice(tail.as_bytes());
        c.envelope(body, &[REJECT]);
    }
    for i in 0..25 {
        // A raw body that says it is UTF-8 text.
        let mut body = b"payment ok for ".to_vec();
        body.extend_from_slice(sequences[i % sequences.len()]);
        c.add("payment.success", body, &[REJECT], |p| {
            p.content_type("text/plain; charset=utf-8")
        });
    }
    for i in 0..15 {
        // A structured CloudEvent whose type is not UTF-8.
        let mut body = br#"{"specversion":"1.0","id":"x","source":"s","type":"pay"#.to_vec();
        body.extend_from_slice(sequences[i % sequences.len()]);
        body.extend_from_slice(br#""}"#);
        c.structured(body);
    }
    into.extend(c.made);
}

fn wrong_types(into: &mut Vec<Hostile>) {
    let mut c = Category::new("wrong-types");
    // Envelope fields of the wrong JSON type: the decoder refuses the envelope.
    let fields = [
        ("id", "42"),
        ("id", "true"),
        ("id", "{}"),
        ("id", "[\"a\"]"),
        ("timestamp", "1700000000"),
        ("source", "[\"a\"]"),
        ("tenant_id", "7"),
        ("correlation_id", "{}"),
        ("causation_id", "1.5"),
        ("content_type", "5"),
        ("data_base64", "5"),
        ("metadata", "[]"),
        ("metadata", "\"x\""),
        ("hops", "\"2\""),
        ("hops", "true"),
    ];
    for i in 0..90 {
        let (field, value) = fields[i % fields.len()];
        let mut envelope = healthy(&c.next_id());
        envelope[field] = serde_json::from_str(value).unwrap();
        c.envelope(envelope.to_string(), &[UNDECODABLE]);
    }
    // Data of the wrong shape: the plugin finds no recipient.
    let data = [
        r#"{"customer":{"email":42}}"#,
        r#"{"customer":{"email":["ada@example.com"]}}"#,
        r#"{"customer":{"email":{}}}"#,
        r#"{"email":true}"#,
        r#"{"customer":"ada@example.com"}"#,
        r#"{"customer":["ada@example.com"]}"#,
        r#""ada@example.com""#,
        "42",
        "[1,2]",
        "null",
    ];
    for i in 0..50 {
        let text = with_data(&c.next_id(), data[i % data.len()]);
        c.envelope(text, &[REJECT]);
    }
    // A `type` that is not a string: not an envelope, so a raw body whose
    // data (the whole object) has no recipient where the plugin looks.
    for _ in 0..10 {
        let mut envelope = healthy(&c.next_id());
        envelope["type"] = json!(5);
        c.envelope(envelope.to_string(), &[REJECT]);
    }
    into.extend(c.made);
}

fn missing_fields(into: &mut Vec<Hostile>) {
    let mut c = Category::new("missing-fields");
    for i in 0..90 {
        let id = c.next_id();
        match i % 6 {
            0 => {
                let mut envelope = healthy(&id);
                envelope.as_object_mut().unwrap().remove("data");
                c.envelope(envelope.to_string(), &[REJECT]);
            }
            1 => c.envelope(with_data(&id, "{}"), &[REJECT]),
            2 => c.envelope(with_data(&id, r#"{"customer":{}}"#), &[REJECT]),
            3 => c.envelope(with_data(&id, r#"{"customer":{"email":"  "}}"#), &[REJECT]),
            4 => {
                let mut envelope = healthy(&id);
                envelope["type"] = json!("");
                c.envelope(envelope.to_string(), &[UNDECODABLE]);
            }
            _ => {
                // No `type`: a raw body, with no recipient at the top.
                let mut envelope = healthy(&id);
                envelope.as_object_mut().unwrap().remove("type");
                c.envelope(envelope.to_string(), &[REJECT]);
            }
        }
    }
    // No recipient, and an id of a mebibyte, which the rejection quotes.
    for _ in 0..10 {
        let long_id = format!("{}-{}", c.next_id(), "x".repeat(1 << 20));
        c.envelope(with_data(&long_id, "{}"), &[REJECT]);
    }
    into.extend(c.made);
}

fn many_headers(into: &mut Vec<Hostile>) {
    let mut c = Category::new("10k-headers");
    let headers = |mut p: Publish| {
        for i in 0..10_000 {
            p = p.header(&format!("x{i:04}"), "v");
        }
        p
    };
    // No recipient: rejected by the plugin, with all its headers.
    let text = with_data(&c.next_id(), "{}");
    c.add("payment.success", text, &[REJECT], headers);
    // A healthy payment, but one of the headers is a bad hop count.
    let text = healthy(&c.next_id()).to_string();
    c.add("payment.success", text, &[UNDECODABLE], |p| {
        headers(p).header("switchboard-hops", "many")
    });
    // Headers filling the broker's frame (131,072 bytes) all but 100 bytes: the
    // router's failure headers do not fit beside them in the dead letter.
    let id = c.next_id();
    let text = with_data(&id, "{}");
    let mut filling = headers(Publish::new("events", "payment.success", text).message_id(&id));
    let used = header_bytes(&filling);
    let filler = FRAME_PAYLOAD - 100 - used - (1 + "filler".len() + 1 + 4);
    filling = filling.header("filler", &"f".repeat(filler));
    assert_eq!(header_bytes(&filling), FRAME_PAYLOAD - 100);
    c.made.push(Hostile {
        category: c.name,
        message: filling,
        expect: &[REJECT],
    });
    for hostile in &c.made {
        assert!(hostile.message.headers.len() >= 10_000);
    }
    into.extend(c.made);
}

/// Most bytes of properties and headers one message may have: RabbitMQ's
/// default `frame_max` less the frame's own 8 bytes (AMQP cannot split them).
const FRAME_PAYLOAD: usize = 131_072 - 8;

/// Bytes of the content header `Amqp::publish` sends for `message` (every
/// header a long string).
fn header_bytes(message: &Publish) -> usize {
    let short = |s: &Option<String>| s.as_ref().map_or(0, |s| 1 + s.len());
    (2 + 2 + 8 + 2 + 1 + 4)
        + short(&message.content_type)
        + short(&message.message_id)
        + message
            .headers
            .iter()
            .map(|(k, v)| 1 + k.len() + 1 + 4 + v.len())
            .sum::<usize>()
}

fn deep_nesting(into: &mut Vec<Hostile>) {
    let mut c = Category::new("deep-nesting");
    for i in 0..20 {
        let body = match i % 4 {
            0 => "[".repeat(100_000),
            1 => format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
            2 => format!(
                r#"{{"type":"payment.success","data":{}"#,
                "[".repeat(100_000)
            ),
            _ => format!("{}1{}", r#"{"a":"#.repeat(50_000), "}".repeat(50_000)),
        };
        c.envelope(body, &[REJECT]);
    }
    into.extend(c.made);
}

fn unknown_content_types(into: &mut Vec<Hostile>) {
    let mut c = Category::new("content-type");
    // CloudEvents formats that are not supported: refused, whatever the body.
    let cloudevents = [
        "application/cloudevents+avro",
        "application/cloudevents+protobuf",
        "application/cloudevents-batch+json",
        "APPLICATION/CLOUDEVENTS+XML; charset=utf-8",
    ];
    for i in 0..40 {
        let text = healthy(&c.next_id()).to_string();
        let ct = cloudevents[i % cloudevents.len()];
        c.add("payment.success", text, &[UNDECODABLE], |p| {
            p.content_type(ct)
        });
    }
    // Anything else is a raw body for the plugin, which wants JSON.
    let others = [
        "application/x-unknown-format",
        "application/vnd.acme.payment.v9+protobuf",
        "image/png",
        "x",
        "",
        ";;;",
        "application/json; charset=ebcdic",
        "text/xml",
    ];
    for i in 0..60 {
        let body = format!(r#"<payment id="{}" amount="12.5"/>"#, c.next_id());
        let ct = others[i % others.len()];
        c.add("payment.success", body, &[REJECT], |p| p.content_type(ct));
    }
    into.extend(c.made);
}

fn bad_cloudevents(into: &mut Vec<Hostile>) {
    let mut c = Category::new("cloudevents");
    let structured = [
        r#"{"specversion":"0.3","id":"a","source":"s","type":"payment.success"}"#,
        r#"{"specversion":"2.0","id":"a","source":"s","type":"payment.success"}"#,
        r#"{"specversion":1.0,"id":"a","source":"s","type":"payment.success"}"#,
        r#"{"id":"a","source":"s","type":"payment.success"}"#,
        r#"{"specversion":"1.0","source":"s","type":"payment.success"}"#,
        r#"{"specversion":"1.0","id":"a","type":"payment.success"}"#,
        r#"{"specversion":"1.0","id":"a","source":"s"}"#,
        r#"{"specversion":"1.0","id":"","source":"s","type":"payment.success"}"#,
        r#"{"specversion":"1.0","id":"a","source":"s","type":""}"#,
        r#"{"specversion":"1.0","id":"a","source":"s","type":5}"#,
        r#"{"specversion":"1.0","id":"a","source":"s","type":"payment.success","time":"yesterday"}"#,
        r#"{"specversion":"1.0","id":"a","source":"s","type":"payment.success","time":5}"#,
        r#"{"specversion":"1.0","id":"a","source":"s","type":"payment.success","data":{},"data_base64":"e30="}"#,
        r#"{"specversion":"1.0","id":"a","source":"s","type":"payment.success","data_base64":"!!!"}"#,
        r#"{"specversion":"1.0","id":"a","source":"s","type":"payment.success","data_base64":5}"#,
        r#"[{"specversion":"1.0","id":"a","source":"s","type":"payment.success"}]"#,
        r#""payment.success""#,
        "null",
        "",
    ];
    for i in 0..114 {
        c.structured(structured[i % structured.len()]);
    }
    // A specversion of a mebibyte, quoted by the refusal.
    for _ in 0..4 {
        let version = "9".repeat(1 << 20);
        c.structured(format!(
            r#"{{"specversion":"{version}","id":"a","source":"s","type":"payment.success"}}"#
        ));
    }
    // Binary mode: attributes in headers (both prefixes), data in the body.
    let binary: [&[(&str, &str)]; 6] = [
        &[("cloudEvents_specversion", "0.3")],
        &[("cloudEvents_specversion", "1.0")],
        &[
            ("cloudEvents:specversion", "1.0"),
            ("cloudEvents:id", "a"),
            ("cloudEvents:source", "s"),
        ],
        &[
            ("cloudEvents_specversion", "1.0"),
            ("cloudEvents_id", "a"),
            ("cloudEvents_source", "s"),
            ("cloudEvents_type", "payment.success"),
            ("cloudEvents_time", "garbage"),
        ],
        &[
            ("cloudEvents_specversion", "1.0"),
            ("cloudEvents_id", ""),
            ("cloudEvents_source", "s"),
            ("cloudEvents_type", "payment.success"),
        ],
        &[
            ("cloudEvents_id", "a"),
            ("cloudEvents_source", "s"),
            ("cloudEvents_type", "payment.success"),
        ],
    ];
    for i in 0..32 {
        let data = json!({"customer": {"email": "ada@example.com"}}).to_string();
        let attributes = binary[i % binary.len()];
        c.add("payment.success", data, &[UNDECODABLE], |mut p| {
            for (name, value) in attributes {
                p = p.header(name, value);
            }
            p.content_type("application/json")
        });
    }
    into.extend(c.made);
}

fn bad_hops(into: &mut Vec<Hostile>) {
    let mut c = Category::new("hops");
    let headers = [
        "abc",
        "-1",
        "1.5",
        "",
        "99999999999999999999",
        "1 2",
        "0x10",
        "\u{661}",
    ];
    for i in 0..40 {
        let text = healthy(&c.next_id()).to_string();
        let hops = headers[i % headers.len()];
        c.add("payment.success", text, &[UNDECODABLE], |p| {
            p.header("switchboard-hops", hops)
        });
    }
    // A hop count of 100,000 digits, quoted by the refusal.
    for _ in 0..2 {
        let text = healthy(&c.next_id()).to_string();
        let hops = "9".repeat(100_000);
        c.add("payment.success", text, &[UNDECODABLE], |p| {
            p.header("switchboard-hops", &hops)
        });
    }
    // The envelope's own hop count, or one in its metadata.
    let envelope_hops = [json!(-1), json!("x"), json!(1.5), json!(4_294_967_296u64)];
    for i in 0..16 {
        let mut envelope = healthy(&c.next_id());
        envelope["hops"] = envelope_hops[i % envelope_hops.len()].clone();
        c.envelope(envelope.to_string(), &[UNDECODABLE]);
    }
    for _ in 0..4 {
        let mut envelope = healthy(&c.next_id());
        envelope["metadata"] = json!({"switchboard-hops": "lots"});
        c.envelope(envelope.to_string(), &[UNDECODABLE]);
    }
    // Too many hops: the loop guard (max_hops = 10).
    for hops in ["10", "11", "4294967295"] {
        let text = healthy(&c.next_id()).to_string();
        c.add("payment.success", text, &[LOOP], |p| {
            p.header("switchboard-hops", hops)
        });
    }
    for _ in 0..8 {
        let mut envelope = healthy(&c.next_id());
        envelope["hops"] = json!(10);
        c.envelope(envelope.to_string(), &[LOOP]);
    }
    into.extend(c.made);
}

/// The thousand hostile messages, category by category.
fn hostile_messages() -> Vec<Hostile> {
    let mut all = Vec::new();
    malformed_json(&mut all);
    huge_bodies(&mut all);
    invalid_utf8(&mut all);
    wrong_types(&mut all);
    missing_fields(&mut all);
    many_headers(&mut all);
    deep_nesting(&mut all);
    unknown_content_types(&mut all);
    bad_cloudevents(&mut all);
    bad_hops(&mut all);
    all
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Peak resident memory the router may reach in these runs. Measured on a
/// 2-vCPU VM: 170–210 MiB for the thousand inputs (four 16 MiB bodies among
/// them), 260 MiB with eight 16 MiB bodies prefetched at once. Each body is
/// held a few times over while it is decoded, handed to the plugin and moved
/// to the dead-letter queue; the bound leaves twice that room. It is what
/// catches a decoder that builds a JSON tree of a body again: one 16 MiB array
/// of numbers took the process to 658 MiB that way.
const PEAK_RSS_BOUND: u64 = 512 << 20;

#[test]
fn a_thousand_hostile_inputs_are_dead_lettered_with_reasons_and_healthy_events_still_flow() {
    if !require_broker() {
        return;
    }
    let started = Instant::now();
    let vhost = TestVhost::new("hostile-inputs");
    let mut replica = Replica::start(
        &router_toml(&vhost.url()),
        &[("notification.wasm", "notification")],
    );
    let pid = replica.pid();
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    let emails = amqp.sink("notifications", "#");

    let hostile = hostile_messages();
    assert_eq!(hostile.len(), 1000, "the suite sends a thousand");
    let mut sent = BTreeMap::new();
    let mut healthy_ids = BTreeSet::new();
    for (i, h) in hostile.iter().enumerate() {
        if i % 20 == 0 {
            let id = format!("ok-{:03}", i / 20);
            let event = healthy(&id);
            let confirmed = amqp.publish(&Publish::json("events", "payment.success", &event));
            assert_eq!(confirmed, Confirmed::Routed, "{id}");
            healthy_ids.insert(id);
        }
        let id = h.message.message_id.clone().unwrap();
        assert_eq!(
            amqp.publish(&h.message),
            Confirmed::Routed,
            "{id} was not routed"
        );
        assert!(sent.insert(id, h).is_none(), "ids are unique");
    }
    let published = started.elapsed();

    let dlq = "switchboard.notification.dlq";
    let until = Instant::now() + Duration::from_secs(90);
    while amqp.queue_state(dlq).is_none_or(|q| q.messages < 1000) {
        if Instant::now() > until {
            let log = replica.log();
            let tail: String = log
                .chars()
                .rev()
                .take(6000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!(
                "not every hostile input reached the dead-letter queue: dlq {:?}, queue {:?}, dispatch {}, log tail:\n{tail}",
                amqp.queue_state(dlq),
                amqp.queue_state("switchboard.notification"),
                replica.dispatch("notification"),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let outputs = amqp.get(&emails, healthy_ids.len(), Duration::from_secs(30));
    let handled_at = started.elapsed();

    // Every healthy event was handled: one email each, for that event.
    let causes: BTreeSet<String> = outputs
        .iter()
        .map(|m| m.json()["causation_id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(causes, healthy_ids, "one email per healthy payment");
    assert!(
        amqp.get(&emails, 1, Duration::from_millis(500)).is_empty(),
        "no hostile input produced an output"
    );

    // Every hostile input is in the dead-letter queue, once, with its reason.
    let letters: Vec<Received> = amqp.get(dlq, 1000, Duration::from_secs(30));
    assert!(
        amqp.get(dlq, 1, Duration::from_millis(300)).is_empty(),
        "nothing else was dead-lettered"
    );
    let mut found: BTreeMap<&str, (String, String)> = BTreeMap::new();
    for letter in &letters {
        let id = letter
            .message_id
            .as_deref()
            .unwrap_or_else(|| panic!("a dead letter without a message id: {:?}", letter.headers));
        let Some(h) = sent.get(id) else {
            panic!("{id} is not a hostile input, yet it was dead-lettered");
        };
        let kind = letter.header("switchboard-error-kind").unwrap_or_default();
        let reason = letter.header("switchboard-error").unwrap_or_default();
        assert!(
            h.expect.contains(&kind),
            "{id} ({}) dead-lettered as {kind:?}, expected one of {:?}: {reason}",
            h.category,
            h.expect
        );
        assert!(!reason.trim().is_empty(), "{id}: no reason");
        assert!(
            reason.len() <= MAX_REASON + 64,
            "{id}: a reason of {} bytes",
            reason.len()
        );
        if h.message.headers.iter().any(|(k, _)| k == "filler") {
            // Its failure headers would not fit beside its own: the largest went.
            assert_eq!(
                letter.header("switchboard-dropped-headers"),
                Some("1"),
                "{id}"
            );
            assert_eq!(letter.header("filler"), None);
            assert_eq!(letter.header("x9999"), Some("v"));
        }
        assert_eq!(
            letter.body.len(),
            h.message.body.len(),
            "{id}: the body is kept as it came"
        );
        let previous = found.insert(id, (kind.to_string(), reason.to_string()));
        assert!(previous.is_none(), "{id} dead-lettered twice");
    }
    let missing: Vec<&String> = sent
        .keys()
        .filter(|id| !found.contains_key(id.as_str()))
        .collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert_eq!(letters.len(), 1000);

    // Nothing left behind: the plugin's queue and its retry tiers are empty.
    let queue = amqp.queue_state("switchboard.notification").unwrap();
    assert_eq!(queue.messages, 0);
    let dispatch = replica.dispatch("notification");
    assert_eq!(dispatch["handled"], healthy_ids.len(), "{dispatch}");
    assert_eq!(dispatch["dead_lettered"], 1000, "{dispatch}");
    assert_eq!(dispatch["settle_errors"], 0, "{dispatch}");

    // The same process, alive and healthy, that never panicked.
    assert!(
        replica.is_running(),
        "the router exited:\n{}",
        replica.log()
    );
    assert_eq!(replica.pid(), pid);
    assert!(replica.is_healthy());
    let log = replica.log();
    assert!(
        !log.contains("panicked") && !log.contains("RUST_BACKTRACE"),
        "{log}"
    );
    // The broker never closed the connection on it (FRAME_ERROR and the like).
    assert!(!log.contains("connection lost"), "{log}");
    let peak = replica.peak_rss().unwrap();

    // The record: per category, how many and how each was dead-lettered.
    let mut table: BTreeMap<(&str, &str), (usize, &str)> = BTreeMap::new();
    for (id, (kind, reason)) in &found {
        let h = sent[*id];
        let row = table
            .entry((h.category, kind.as_str()))
            .or_insert((0, reason.as_str()));
        row.0 += 1;
    }
    eprintln!("category | count | kind | sample reason");
    for ((category, kind), (count, reason)) in &table {
        let sample: String = reason.chars().take(120).collect();
        eprintln!("{category} | {count} | {kind} | {sample}");
    }
    eprintln!(
        "healthy handled: {} of {}; published in {:.1} s, all settled at {:.1} s, total {:.1} s",
        causes.len(),
        healthy_ids.len(),
        published.as_secs_f64(),
        handled_at.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    eprintln!("router peak RSS (VmHWM): {:.1} MiB", mib(peak));
    assert!(
        peak < PEAK_RSS_BOUND,
        "peak RSS {:.1} MiB is over the {:.0} MiB bound",
        mib(peak),
        mib(PEAK_RSS_BOUND)
    );
}

/// Waits until the notification plugin's dead-letter queue holds `count`
/// letters (the router answering all along); returns them by message id.
fn dead_letters_of(amqp: &Amqp, replica: &Replica, count: usize) -> BTreeMap<String, Received> {
    let dlq = "switchboard.notification.dlq";
    wait_until("the dead letters", Duration::from_secs(60), || {
        assert!(replica.is_healthy(), "the router stopped answering");
        amqp.queue_state(dlq)
            .is_some_and(|q| q.messages as usize >= count)
    });
    amqp.get(dlq, count, Duration::from_secs(30))
        .into_iter()
        .map(|m| (m.message_id.clone().unwrap_or_default(), m))
        .collect()
}

#[test]
fn sixteen_mebibyte_bodies_prefetched_together_are_dead_lettered_within_a_memory_bound() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("hostile-prefetch");
    let toml = router_toml(&vhost.url());
    let plugins = [("notification.wasm", "notification")];
    // A first process declares the queues and goes: the bodies wait in the
    // queue, and the next process is handed all of them at once (prefetch 64).
    Replica::start(&toml, &plugins).stop();
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    let mut huge = Vec::new();
    huge_bodies(&mut huge);
    let mut sent = BTreeMap::new();
    for round in 0..2 {
        for h in &huge {
            let id = format!("{}-{round}", h.message.message_id.as_deref().unwrap());
            let message = h.message.clone().message_id(&id);
            assert_eq!(amqp.publish(&message), Confirmed::Routed);
            sent.insert(id, h.expect);
        }
    }
    let queued = amqp.queue_state("switchboard.notification").unwrap();
    assert_eq!(queued.messages as usize, sent.len());

    let replica = Replica::start(&toml, &plugins);
    let letters = dead_letters_of(&amqp, &replica, sent.len());
    let ids: BTreeSet<&String> = letters.keys().collect();
    assert_eq!(ids, sent.keys().collect(), "every body dead-lettered");
    for (id, letter) in &letters {
        let kind = letter.header("switchboard-error-kind").unwrap_or_default();
        assert!(sent[id].contains(&kind), "{id}: {kind}");
        assert_eq!(letter.body.len(), HUGE);
    }
    let peak = replica.peak_rss().unwrap();
    eprintln!(
        "router peak RSS with {} bodies of 16 MiB prefetched at once: {:.1} MiB",
        sent.len(),
        mib(peak)
    );
    // The bodies themselves (128 MiB, all buffered at once: prefetch counts
    // messages, not bytes) and working copies of the two being handled.
    assert!(
        peak < PEAK_RSS_BOUND,
        "peak RSS {:.1} MiB is over the {:.0} MiB bound",
        mib(peak),
        mib(PEAK_RSS_BOUND)
    );
    assert!(!replica.log().contains("panicked"));
}

/// Sends `request` over a socket of its own and reads the answer until the
/// server closes or goes quiet: (status, text); status 0 when there was no
/// answer.
fn raw_request(addr: &str, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The server may answer and hang up before it has read everything.
    let _ = stream.write_all(request.as_bytes());
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = stream.read(&mut chunk) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.len() > 64 {
            // The head is in; the body (if any) is short: one more read.
            stream
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// One plugin, `worker` (the scripted guest), on every key of `events`; its
/// outputs go to `out`.
fn worker_toml(url: &str) -> String {
    format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[broker]
url = "{url}"
timeout = "10s"
[defaults]
concurrency = 2
max_attempts = 2
[defaults.backoff]
initial = "50ms"
max = "50ms"
jitter = 0.0
[[exchanges]]
name = "events"
[[exchanges]]
name = "out"
[plugins.worker]
output_exchange = "out"
[[routes]]
exchange = "events"
pattern = "#"
plugin = "worker"
"##
    )
}

/// The regression behind the headers check: a dead-letter copy or an output
/// whose headers do not fit in one AMQP frame made RabbitMQ close the
/// connection (FRAME_ERROR); the delivery came back and did it again, and every
/// plugin of the process stalled.
#[test]
fn what_would_overflow_an_amqp_frame_is_dead_lettered_and_the_connection_stays_up() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("hostile-frame");
    let r = switchboard_tests::running::start(
        &worker_toml(&vhost.url()),
        &[("worker.wasm", "scripted_guest")],
    );
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    let out = amqp.sink("out", "#");
    let publish = |p: Publish| assert_eq!(amqp.publish(&p), Confirmed::Routed);

    // An echo whose output would carry a 200 KB header (the event id).
    let long_id = format!("long-{}", "i".repeat(200_000));
    let echo = json!({"id": long_id, "type": "echo", "data": {}}).to_string();
    publish(Publish::new("events", "echo", echo).message_id("echo-long-id"));
    // A reject whose failure headers cannot join its own in one frame.
    let mut full = Publish::new("events", "reject", "{}").message_id("reject-full");
    for i in 0..10_000 {
        full = full.header(&format!("x{i:04}"), "v");
    }
    let filler = FRAME_PAYLOAD - 100 - header_bytes(&full) - (1 + "filler".len() + 1 + 4);
    full = full.header("filler", &"f".repeat(filler));
    publish(full);
    // A refusal that quotes a mebibyte of input.
    let version = "9".repeat(1 << 20);
    let event = format!(r#"{{"specversion":"{version}","id":"a","source":"s","type":"t"}}"#);
    publish(
        Publish::new("events", "t", event)
            .content_type("application/cloudevents+json")
            .message_id("huge-specversion"),
    );
    // And a healthy one after them.
    let ok = json!({"id": "fine", "type": "echo", "data": {}});
    publish(Publish::json("events", "echo", &ok));

    let got = amqp.get(&out, 1, Duration::from_secs(20));
    assert_eq!(got.len(), 1, "the healthy echo went through");
    assert_eq!(got[0].header("echo-of"), Some("fine"));
    let dlq = "switchboard.worker.dlq";
    wait_until("three dead letters", Duration::from_secs(20), || {
        amqp.queue_state(dlq).is_some_and(|q| q.messages == 3)
    });
    let letters: BTreeMap<String, Received> = amqp
        .get(dlq, 3, Duration::from_secs(10))
        .into_iter()
        .map(|m| (m.message_id.clone().unwrap_or_default(), m))
        .collect();
    let kind = |id: &str| letters[id].header("switchboard-error-kind").unwrap_or("");
    let reason = |id: &str| letters[id].header("switchboard-error").unwrap_or("");
    assert_eq!(
        kind("echo-long-id"),
        "invalid_output",
        "permanent: never retried"
    );
    assert!(
        reason("echo-long-id").contains("more than one AMQP frame holds"),
        "{}",
        reason("echo-long-id")
    );
    assert_eq!(kind("reject-full"), "reject");
    assert_eq!(
        letters["reject-full"].header("switchboard-dropped-headers"),
        Some("1")
    );
    assert_eq!(kind("huge-specversion"), "undecodable");
    assert!(
        reason("huge-specversion").len() < 600,
        "{}",
        reason("huge-specversion")
    );
    let rabbit = r.appliance.transport().rabbit().unwrap();
    assert_eq!(
        rabbit.status().reconnects,
        0,
        "the connection never dropped"
    );
}

#[test]
fn the_ingress_refuses_garbage_with_a_4xx_and_enqueues_nothing() {
    let toml = "plugins_dir = \"plugins\"\nstate_dir = \"state\"\n\
                [[exchanges]]\nname = \"events\"\n[plugins.worker]\n\
                [[routes]]\nexchange = \"events\"\npattern = \"#\"\nplugin = \"worker\"\n";
    let r = switchboard_tests::running::start(toml, &[("worker.wasm", "scripted_guest")]);
    let mut published = r.appliance.transport().subscribe_stream();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{}/events/events/echo", r.url);
    // (status, body) for a POST of `body` with `content_type` and `headers`.
    let post = |body: Vec<u8>, content_type: Option<&str>, headers: usize| {
        let mut request = agent.post(&url);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        for i in 0..headers {
            request = request.header(format!("x-h{i}"), "v");
        }
        match request.send(&body[..]) {
            Ok(mut response) => (
                response.status().as_u16(),
                response.body_mut().read_to_string().unwrap_or_default(),
            ),
            // The server may hang up while a huge request is still going out.
            Err(e) => (0, e.to_string()),
        }
    };
    let json = Some("application/json");
    // Ten thousand headers, on a socket of its own: the server answers once it
    // has read a hundred, and may reset the connection while the rest still
    // comes. Either way nothing gets in.
    let addr = r.url.trim_start_matches("http://").to_string();
    let headers: String = (0..10_000).map(|i| format!("x-h{i}: v\r\n")).collect();
    let head = format!(
        "POST /events/events/echo HTTP/1.1\r\nhost: {addr}\r\n\
         content-type: application/json\r\n{headers}content-length: 2\r\n\r\n{{}}"
    );
    let (status, reply) = raw_request(&addr, &head);
    eprintln!("ingress: 10,000 headers → {status}");
    assert!(
        status == 431 || status == 0,
        "10,000 headers: {status} {reply}"
    );

    // Too large or too many: refused before the handler runs.
    let over = post(vec![b' '; (2 << 20) + 1], json, 0);
    eprintln!("ingress: 2 MiB + 1 byte → {} {}", over.0, over.1);
    assert_eq!(over.0, 413, "one byte over the 2 MiB limit, sent whole");
    assert!(over.1.contains("length limit"), "{}", over.1);
    // Refused after 2 MiB; the client may still be writing when it hangs up.
    let huge = post(vec![b'['; HUGE], json, 0);
    eprintln!("ingress: 16 MiB → {} {}", huge.0, huge.1);
    assert!(huge.0 == 413 || huge.0 == 0, "{huge:?}");
    let many = post(b"{}".to_vec(), json, 200);
    eprintln!("ingress: 200 headers → {}", many.0);
    assert_eq!(many.0, 431, "more headers than the server reads");

    // Not an event: 400, with one short sentence saying why.
    let ce = |format: &'static str| Some(format);
    let bad: [(&str, Vec<u8>, Option<&str>, &str); 10] = [
        (
            "malformed JSON",
            b"{\"type\":\"echo\",".to_vec(),
            json,
            "not JSON",
        ),
        ("JSON with NaN", b"{\"a\":NaN}".to_vec(), json, "not JSON"),
        (
            "invalid UTF-8, labelled JSON",
            vec![b'"', 0xff, b'"'],
            json,
            "not JSON",
        ),
        (
            "invalid UTF-8, unlabelled",
            vec![0xc3, 0x28],
            None,
            "no content type",
        ),
        (
            "deep nesting",
            "[".repeat(100_000).into_bytes(),
            json,
            "not JSON",
        ),
        (
            "CloudEvents in Avro",
            b"\x00\x01".to_vec(),
            ce("application/cloudevents+avro"),
            "not supported",
        ),
        (
            "CloudEvents batch",
            b"[]".to_vec(),
            ce("application/cloudevents-batch+json"),
            "batch",
        ),
        (
            "CloudEvent without an id",
            br#"{"specversion":"1.0","source":"s","type":"echo"}"#.to_vec(),
            ce("application/cloudevents+json"),
            "has no",
        ),
        (
            "CloudEvent with a specversion of a mebibyte",
            format!(
                r#"{{"specversion":"{}","id":"a","source":"s","type":"echo"}}"#,
                "9".repeat(1 << 20)
            )
            .into_bytes(),
            ce("application/cloudevents+json"),
            "",
        ),
        (
            "bad hop count",
            br#"{"type":"echo","hops":"many"}"#.to_vec(),
            json,
            "not a JSON envelope",
        ),
    ];
    for (what, body, content_type, says) in bad {
        let (status, reply) = post(body, content_type, 0);
        eprintln!(
            "ingress: {what} → {status} {}",
            reply.chars().take(140).collect::<String>()
        );
        assert_eq!(status, 400, "{what}: {reply}");
        assert!(reply.contains(says), "{what}: {reply}");
        let error: Value = serde_json::from_str(&reply).unwrap();
        let sentence = error["error"].as_str().unwrap();
        assert!(
            sentence.len() < 600,
            "{what}: one short sentence: {sentence}"
        );
    }
    // Nothing was published or queued, and the appliance still serves.
    assert!(published.try_recv().is_err(), "something was published");
    let queue = r.status("worker").queue.unwrap();
    assert_eq!(queue.received, 0);
    let (status, _) = post(br#"{"type":"echo","data":{}}"#.to_vec(), json, 0);
    assert_eq!(status, 202);
    r.wait_idle();
    assert_eq!(r.status("worker").queue.unwrap().acked, 1);
}
