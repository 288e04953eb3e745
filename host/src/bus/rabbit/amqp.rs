//! Messages between AMQP and the bus: properties and headers in, properties
//! and headers out, and the headers the router itself writes when it moves a
//! message to a retry tier or a dead-letter queue.

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::bus::{Delivered, FailureInfo, Message};

/// Attempt the message is on, for the plugin whose queue it is in (1 = first).
pub const ATTEMPT: &str = "switchboard-attempt";
/// When the first attempt failed, RFC 3339.
pub const FIRST_FAILURE: &str = "switchboard-first-failure";
/// The last failure's kind (`retry`, `timeout`, `undecodable`, …).
pub const ERROR_KIND: &str = "switchboard-error-kind";
/// The last failure, in one sentence.
pub const ERROR: &str = "switchboard-error";
/// Version (content hash) of the plugin that failed.
pub const PLUGIN_VERSION: &str = "switchboard-plugin-version";
/// When the message was dead-lettered, RFC 3339.
pub const DEAD_LETTERED_AT: &str = "switchboard-dead-lettered-at";
/// The exchange and routing key the event was first published with: a retried
/// or re-driven copy arrives through the default exchange.
pub const EXCHANGE: &str = "switchboard-exchange";
pub const ROUTING_KEY: &str = "switchboard-routing-key";
/// How many of the message's own headers a moved copy left out, because with
/// the router's headers added they no longer fitted in one AMQP frame.
pub const DROPPED_HEADERS: &str = "switchboard-dropped-headers";

/// Frame size assumed when the connection has not negotiated one (RabbitMQ's
/// default `frame_max`).
pub const DEFAULT_FRAME_MAX: u32 = 131_072;

/// Bytes of a frame that are not payload: type, channel, size, end marker.
const FRAME_OVERHEAD: usize = 8;

/// The headers the router writes when it moves a message (retry, dead letter).
const MOVE_HEADERS: [&str; 9] = [
    ATTEMPT,
    FIRST_FAILURE,
    ERROR_KIND,
    ERROR,
    PLUGIN_VERSION,
    DEAD_LETTERED_AT,
    EXCHANGE,
    ROUTING_KEY,
    DROPPED_HEADERS,
];

/// Headers the router owns: replaced, not accumulated, on every move. The
/// broker's own `x-death` history is dropped too, since the router's headers
/// say what happened and the history would grow with every retry.
fn owned(name: &str) -> bool {
    MOVE_HEADERS.contains(&name)
        || name.starts_with("x-death")
        || name == "x-delivery-count"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

/// The most bytes a message's properties and headers may take with a
/// negotiated `frame_max` (0: none negotiated). AMQP cannot split a content
/// header across frames, and a broker that receives a larger one closes the
/// whole connection.
pub fn header_limit(frame_max: u32) -> usize {
    let frame_max = if frame_max == 0 {
        DEFAULT_FRAME_MAX
    } else {
        frame_max
    };
    usize::try_from(frame_max)
        .unwrap_or(usize::MAX)
        .saturating_sub(FRAME_OVERHEAD)
}

/// Bytes of the content header (class, body size, property flags, properties)
/// that [`properties`] makes for `message`: every header a long string.
pub fn header_len(message: &Message) -> usize {
    // class, weight, body size, property flags, delivery mode, timestamp,
    // table length
    const FIXED: usize = 2 + 2 + 8 + 2 + 1 + 8 + 4;
    let short = |s: &Option<String>| s.as_ref().map_or(0, |s| 1 + s.len());
    FIXED
        + short(&message.content_type)
        + short(&message.message_id)
        + message
            .headers
            .iter()
            .map(|(k, v)| entry_len(k, v))
            .sum::<usize>()
}

/// Bytes of one header table entry: name, type tag, length, value.
fn entry_len(name: &str, value: &str) -> usize {
    1 + name.len() + 1 + 4 + value.len()
}

/// A header value as text: strings as they are, numbers and booleans printed,
/// tables and arrays as JSON.
pub fn value_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        other => value_json(other).to_string(),
    }
}

fn value_json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Float(f) => serde_json::json!(f),
        AMQPValue::Double(f) => serde_json::json!(f),
        AMQPValue::DecimalValue(d) => Value::String(format!("{d:?}")),
        AMQPValue::ShortString(s) => Value::String(s.as_str().into()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        AMQPValue::Timestamp(t) => (*t).into(),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), value_json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => Value::String(format!("{b:?}")),
        AMQPValue::Void => Value::Null,
    }
}

/// A CloudEvents `time` header that is not text, as RFC 3339 (UTC, fractional
/// seconds only when there are some): an AMQP 0-9-1 timestamp is seconds since
/// the epoch; an integer is milliseconds, the AMQP 1.0 timestamp the CloudEvents
/// SDKs' AMQP bindings write (and that a 0-9-1 client passes on as a number).
/// `None` for any other value, or one out of range.
fn timestamp_text(value: &AMQPValue) -> Option<String> {
    let at = match value {
        AMQPValue::Timestamp(seconds) => {
            chrono::DateTime::from_timestamp(i64::try_from(*seconds).ok()?, 0)?
        }
        AMQPValue::LongLongInt(ms) => chrono::DateTime::from_timestamp_millis(*ms)?,
        AMQPValue::LongInt(ms) => chrono::DateTime::from_timestamp_millis(i64::from(*ms))?,
        AMQPValue::LongUInt(ms) => chrono::DateTime::from_timestamp_millis(i64::from(*ms))?,
        _ => return None,
    };
    Some(at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

/// The message carried by an AMQP delivery.
pub fn message(data: Vec<u8>, properties: &BasicProperties) -> Message {
    let headers = properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .map(|(k, v)| {
                    let name = k.as_str();
                    let text = crate::envelope::is_cloudevents_time_header(name)
                        .then(|| timestamp_text(v))
                        .flatten()
                        .unwrap_or_else(|| value_text(v));
                    (name.to_string(), text)
                })
                .collect()
        })
        .unwrap_or_default();
    Message {
        body: Bytes::from(data),
        content_type: properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str().to_string()),
        message_id: properties
            .message_id()
            .as_ref()
            .map(|c| c.as_str().to_string()),
        headers,
    }
}

/// What a delivery from `exchange` with `routing_key` is, for the dispatcher:
/// the original exchange and key when the router moved it, and the attempt.
///
/// The router's move headers (attempt, origin, failure) are believed only when
/// `trusted`: the message came by one of the router's own paths (back from a
/// retry tier, re-driven, or read from a DLQ). On anything else, say a service
/// that sets `switchboard-attempt` or a plugin output that copied its input's
/// headers, they are removed: the delivery is a first attempt from where it
/// was published.
pub fn delivered(
    exchange: &str,
    routing_key: &str,
    mut message: Message,
    trusted: bool,
) -> Delivered {
    if !trusted {
        message
            .headers
            .retain(|(k, _)| !MOVE_HEADERS.contains(&k.as_str()));
    }
    let attempt = message
        .header(ATTEMPT)
        .and_then(|a| a.trim().parse::<u32>().ok())
        .filter(|a| *a >= 1)
        .unwrap_or(1);
    let first_failure = message.header(FIRST_FAILURE).map(str::to_string);
    let exchange = message.header(EXCHANGE).unwrap_or(exchange).to_string();
    let routing_key = message
        .header(ROUTING_KEY)
        .unwrap_or(routing_key)
        .to_string();
    Delivered {
        exchange,
        routing_key,
        message,
        attempt,
        first_failure,
    }
}

/// Persistent AMQP properties for `message`, with `extra` headers replacing
/// any of the same name, stamped with the time of publishing (the AMQP
/// `timestamp`, seconds since the epoch: what the archive stream's reader
/// dates an event by).
pub fn properties(message: &Message, extra: &[(&str, String)]) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in &message.headers {
        if extra.iter().any(|(name, _)| name == k) {
            continue;
        }
        table.insert(
            ShortString::from(k.as_str()),
            AMQPValue::LongString(LongString::from(v.as_str())),
        );
    }
    for (k, v) in extra {
        table.insert(
            ShortString::from(*k),
            AMQPValue::LongString(LongString::from(v.as_str())),
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(now)
        .with_headers(table);
    if let Some(ct) = &message.content_type {
        props = props.with_content_type(ShortString::from(ct.as_str()));
    }
    if let Some(id) = &message.message_id {
        props = props.with_message_id(ShortString::from(id.as_str()));
    }
    props
}

/// The message `delivered` as the router re-publishes it after a failure: the
/// headers it owns replaced by `failure` (and `attempt` for the next try).
///
/// The copy must fit where the original did: its properties and headers within
/// `limit` bytes ([`header_limit`]). The reason is cut to
/// [`MAX_REASON`](crate::runtime::MAX_REASON) bytes, and if the router's headers
/// still do not fit beside the message's own, the largest of those are left out
/// (their number in [`DROPPED_HEADERS`]): a copy the broker refuses would close
/// the connection and bring the same message back, forever.
pub fn moved(
    delivered: &Delivered,
    failure: &FailureInfo,
    next_attempt: Option<u32>,
    limit: usize,
) -> Message {
    let mut message = delivered.message.clone();
    // Left out by an earlier move: still missing from this copy.
    let earlier: usize = message
        .header(DROPPED_HEADERS)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    message.headers.retain(|(k, _)| !owned(k));
    let reason = crate::runtime::excerpt(&failure.reason, crate::runtime::MAX_REASON);
    let mut ours: Vec<(String, String)> = Vec::with_capacity(8);
    let mut add = |k: &str, v: String| ours.push((k.to_string(), v));
    add(EXCHANGE, delivered.exchange.clone());
    add(ROUTING_KEY, delivered.routing_key.clone());
    add(FIRST_FAILURE, failure.first_failure.clone());
    add(ERROR_KIND, failure.kind.clone());
    add(ERROR, reason.into_owned());
    add(PLUGIN_VERSION, failure.plugin_version.clone());
    match next_attempt {
        Some(n) => add(ATTEMPT, n.to_string()),
        None => {
            add(ATTEMPT, failure.attempts.to_string());
            add(DEAD_LETTERED_AT, crate::envelope::now_rfc3339());
        }
    }
    let added: usize = ours.iter().map(|(k, v)| entry_len(k, v)).sum::<usize>()
        + entry_len(DROPPED_HEADERS, &message.headers.len().to_string());
    let excess = (header_len(&message) + added).saturating_sub(limit);
    let mut dropped = 0;
    if excess > 0 {
        // Largest first, so that as few as possible go.
        let mut sizes: Vec<(usize, usize)> = message
            .headers
            .iter()
            .enumerate()
            .map(|(i, (k, v))| (entry_len(k, v), i))
            .collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let mut freed = 0;
        let mut drop = vec![false; message.headers.len()];
        for (size, i) in sizes {
            if freed >= excess {
                break;
            }
            freed += size;
            drop[i] = true;
        }
        let mut index = 0;
        message.headers.retain(|_| {
            let keep = !drop[index];
            index += 1;
            keep
        });
        dropped = drop.iter().filter(|d| **d).count();
        tracing::warn!(
            dropped,
            message_id = message.message_id.as_deref().unwrap_or(""),
            "the message's headers and the router's do not fit in one AMQP frame; \
             the largest of its own were left out of the moved copy"
        );
    }
    if earlier + dropped > 0 {
        ours.push((DROPPED_HEADERS.to_string(), (earlier + dropped).to_string()));
    }
    message.headers.extend(ours);
    message
}

/// A dead letter as found in a DLQ: the failure the router recorded, or for a
/// message the broker dead-lettered by itself, what its `x-death` says.
pub fn failure_of(message: &Message) -> FailureInfo {
    let h = |k: &str| message.header(k).map(str::to_string);
    match h(ERROR_KIND) {
        Some(kind) => FailureInfo {
            kind,
            reason: h(ERROR).unwrap_or_default(),
            attempts: h(ATTEMPT).and_then(|a| a.parse().ok()).unwrap_or(1),
            plugin_version: h(PLUGIN_VERSION).unwrap_or_default(),
            first_failure: h(FIRST_FAILURE).unwrap_or_default(),
        },
        None => {
            let reason = h("x-first-death-reason").unwrap_or_else(|| "unknown".into());
            FailureInfo {
                kind: reason.clone(),
                reason: format!(
                    "dead-lettered by the broker ({reason}); x-death: {}",
                    h("x-death").unwrap_or_default()
                ),
                attempts: h(ATTEMPT).and_then(|a| a.parse().ok()).unwrap_or(1),
                plugin_version: String::new(),
                first_failure: String::new(),
            }
        }
    }
}

/// The message of a dead letter as re-driven: the router's failure headers
/// removed, so that it starts again at attempt 1 (origin kept).
pub fn redriven(message: &Message) -> Message {
    let mut message = message.clone();
    message
        .headers
        .retain(|(k, _)| !owned(k) || k == EXCHANGE || k == ROUTING_KEY);
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cloudevents_time_that_is_a_timestamp_arrives_as_rfc_3339() {
        let mut headers = FieldTable::default();
        // AMQP 0-9-1 timestamp: seconds.
        headers.insert(
            "cloudEvents_time".into(),
            AMQPValue::Timestamp(1_714_979_289),
        );
        // The SDKs' AMQP binding: an AMQP 1.0 timestamp, milliseconds.
        headers.insert(
            "cloudEvents:time".into(),
            AMQPValue::LongLongInt(1_714_979_289_250),
        );
        headers.insert("ce-time".into(), AMQPValue::LongString("text".into()));
        // Any other header keeps its number.
        headers.insert("sent-at".into(), AMQPValue::Timestamp(1_714_979_289));
        headers.insert("cloudEvents_count".into(), AMQPValue::LongLongInt(7));
        let properties = BasicProperties::default().with_headers(headers);
        let m = message(Vec::new(), &properties);
        assert_eq!(m.header("cloudEvents_time"), Some("2024-05-06T07:08:09Z"));
        assert_eq!(
            m.header("cloudEvents:time"),
            Some("2024-05-06T07:08:09.250Z")
        );
        assert_eq!(m.header("ce-time"), Some("text"));
        assert_eq!(m.header("sent-at"), Some("1714979289"));
        assert_eq!(m.header("cloudEvents_count"), Some("7"));
    }

    fn failure() -> FailureInfo {
        FailureInfo {
            kind: "retry".into(),
            reason: "later".into(),
            attempts: 2,
            plugin_version: "abc".into(),
            first_failure: "2026-11-22T10:00:00Z".into(),
        }
    }

    #[test]
    fn a_moved_message_keeps_its_origin_and_replaces_the_routers_headers() {
        let message = Message {
            body: Bytes::from_static(b"{}"),
            headers: vec![
                ("tenant".into(), "acme".into()),
                (ATTEMPT.into(), "2".into()),
                ("x-death".into(), "[...]".into()),
                (crate::envelope::HOPS_HEADER.into(), "1".into()),
            ],
            ..Message::default()
        };
        let d = delivered("payments", "payment.success", message, true);
        assert_eq!(d.attempt, 2);
        let copy = moved(&d, &failure(), Some(3), header_limit(0));
        let again = delivered("", "sb.billing", copy.clone(), true);
        assert_eq!(again.exchange, "payments");
        assert_eq!(again.routing_key, "payment.success");
        assert_eq!(again.attempt, 3);
        assert_eq!(again.first_failure.as_deref(), Some("2026-11-22T10:00:00Z"));
        assert_eq!(copy.header("tenant"), Some("acme"));
        assert_eq!(copy.header(crate::envelope::HOPS_HEADER), Some("1"));
        assert_eq!(copy.header("x-death"), None);
        assert_eq!(copy.headers.iter().filter(|(k, _)| k == ATTEMPT).count(), 1);

        let dead = moved(&d, &failure(), None, header_limit(0));
        let info = failure_of(&dead);
        assert_eq!(info, failure());
        let back = delivered("", "sb.billing", redriven(&dead), true);
        assert_eq!(back.attempt, 1);
        assert_eq!(back.first_failure, None);
        assert_eq!(back.exchange, "payments");
    }

    #[test]
    fn a_moved_copy_fits_in_one_frame_whatever_the_original_and_the_reason() {
        let limit = header_limit(0);
        assert_eq!(
            limit, 131_064,
            "RabbitMQ's default frame_max less the frame's own bytes"
        );
        // Headers filling the frame all but a few bytes, as a producer may send.
        let mut headers: Vec<(String, String)> = (0..10_000)
            .map(|i| (format!("x{i:04}"), "v".to_string()))
            .collect();
        let mut message = Message {
            body: Bytes::from_static(b"{}"),
            message_id: Some("m-1".into()),
            content_type: Some("application/json".into()),
            headers: headers.clone(),
        };
        let room = limit - header_len(&message);
        headers.push(("filler".into(), "f".repeat(room - entry_len("filler", ""))));
        message.headers = headers;
        assert_eq!(header_len(&message), limit, "the original fits exactly");
        let d = delivered("events", "payment.success", message.clone(), true);
        let mut failure = failure();
        failure.reason = "r".repeat(1 << 20);

        for next in [Some(2), None] {
            let copy = moved(&d, &failure, next, limit);
            assert!(
                header_len(&copy) <= limit,
                "{} > {limit}",
                header_len(&copy)
            );
            // The filler (the largest) made room; the rest are all there.
            assert_eq!(copy.header("filler"), None);
            assert_eq!(copy.header(DROPPED_HEADERS), Some("1"));
            assert_eq!(copy.header("x9999"), Some("v"));
            let reason = copy.header(ERROR).unwrap();
            assert!(
                reason.len() < crate::runtime::MAX_REASON + 32,
                "{}",
                reason.len()
            );
            assert_eq!(copy.body, message.body);
            assert_eq!(copy.message_id.as_deref(), Some("m-1"));
        }
        // Moved again (re-driven, then failed): what is missing is still said, once.
        let dead = moved(&d, &failure, None, limit);
        let again = moved(&delivered("", "q", dead, true), &failure, None, limit);
        assert!(header_len(&again) <= limit);
        assert_eq!(
            again
                .headers
                .iter()
                .filter(|(k, _)| k == DROPPED_HEADERS)
                .count(),
            1
        );
        assert_eq!(again.header(DROPPED_HEADERS), Some("1"));
        // Room to spare: nothing is left out.
        let small = delivered("events", "k", Message::default(), true);
        let copy = moved(&small, &failure, None, limit);
        assert_eq!(copy.header(DROPPED_HEADERS), None);
    }

    #[test]
    fn header_len_counts_what_properties_encodes() {
        let message = Message {
            body: Bytes::from_static(b"x"),
            content_type: Some("text/plain".into()),
            message_id: Some("id".into()),
            headers: vec![("ab".into(), "cde".into())],
        };
        // 27 fixed + (1 + 10) + (1 + 2) + (1 + 2 + 1 + 4 + 3)
        assert_eq!(header_len(&message), 27 + 11 + 3 + 11);
        assert_eq!(header_limit(4096), 4088);
    }

    #[test]
    fn move_headers_from_anyone_else_are_not_believed() {
        let message = Message {
            body: Bytes::from_static(b"{}"),
            headers: vec![
                (ATTEMPT.into(), "4".into()),
                (EXCHANGE.into(), "elsewhere".into()),
                (ROUTING_KEY.into(), "other.key".into()),
                (FIRST_FAILURE.into(), "2026-01-01T00:00:00Z".into()),
                (crate::envelope::HOPS_HEADER.into(), "2".into()),
                ("tenant".into(), "acme".into()),
            ],
            ..Message::default()
        };
        let d = delivered("payments", "payment.success", message.clone(), false);
        assert_eq!(d.attempt, 1);
        assert_eq!(d.first_failure, None);
        assert_eq!(
            (d.exchange.as_str(), d.routing_key.as_str()),
            ("payments", "payment.success")
        );
        assert_eq!(d.message.header(ATTEMPT), None);
        assert_eq!(d.message.header(EXCHANGE), None);
        assert_eq!(d.message.header("tenant"), Some("acme"));
        assert_eq!(d.message.header(crate::envelope::HOPS_HEADER), Some("2"));
        let moved_back = delivered("", "sb.billing", message, true);
        assert_eq!(moved_back.attempt, 4);
        assert_eq!(moved_back.exchange, "elsewhere");
    }

    #[test]
    fn broker_dead_letters_report_x_death() {
        let message = Message {
            headers: vec![("x-first-death-reason".into(), "delivery_limit".into())],
            ..Message::default()
        };
        let info = failure_of(&message);
        assert_eq!(info.kind, "delivery_limit");
    }
}
