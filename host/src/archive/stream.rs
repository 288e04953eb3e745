//! The event archive on RabbitMQ: a stream queue, `<prefix>.archive`, that the
//! topology declares with `[archive]` and binds to every archived exchange
//! (`bus/rabbit/topology.rs`), so that the broker itself keeps every message
//! published there — what services publish and what plugins output, from
//! whichever replica. Retention is the stream's (`x-max-age`,
//! `x-max-length-bytes`); any replica, and `switchboard events`, read the same
//! history.
//!
//! [`read`] replays the stream over AMQP 0-9-1 and makes each delivery the
//! record the embedded archive would have made ([`super::record`]), selected by
//! the same [`Query`]:
//!
//! - **Position**: `seq` is the delivery's `x-stream-offset` + 1 (numbering
//!   starts at 1, as on the embedded archive), the same for every reader. The
//!   reads' end marks (below) take positions too, so `seq` has gaps.
//! - **Time**: the message's AMQP `timestamp` (the router stamps what it
//!   publishes), else the envelope's `timestamp` / CloudEvents `time`, else
//!   the time of reading.
//! - **Where a read starts**: at `query.after` (an offset) when paging, else
//!   at the first chunk written since `query.since` (less [`CLOCK_SKEW`]), else
//!   at the first message kept; the broker skips what comes before. (On
//!   3.10.8 a time past the end starts at the end; an offset past the end
//!   waits until that offset is written.)
//!
//! # The end of the stream
//!
//! A stream consumer gets no end-of-stream signal over AMQP 0-9-1: at the end
//! it simply waits for more. The queue's message count (a passive
//! `queue.declare`) is not the end: on RabbitMQ 3.10.8 it is a statistic —
//! 0 right after five confirmed publishes to a new stream, right only after
//! the next statistics refresh (`collect_statistics_interval`), and it counts
//! messages, not offsets (retention and end marks make them differ); its
//! consumer count is always 0. Stopping after a quiet spell (no delivery for
//! some hundreds of milliseconds) cuts a read short whenever the broker
//! pauses longer than that mid-stream (a cold segment read from disk, a busy
//! node: silently missing history), and costs the whole wait on every read
//! that selects nothing. So a read marks its own end: once its consumer is attached, it
//! publishes an empty message carrying [`END_MARK`] (a fresh id) to the
//! stream, confirmed, and reads until that mark comes back. A stream is one
//! ordered log, so everything written before the mark — every event
//! confirmed to its publisher before the read began — comes before it: a
//! read is an exact snapshot, however slowly the broker delivers. Marks are
//! skipped by every reader; each takes a position and a few bytes until
//! retention removes it. Reading thus needs the right to publish to the
//! stream, which the router's own account has.

use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use super::{ArchivedEvent, Query, Rule, record, rules};
use crate::bus::Outgoing;
use crate::bus::rabbit::{Names, RabbitSettings, amqp, connect};
use crate::config::RouterConfig;

/// Deliveries the broker may send ahead of the acks: a stream consumer needs
/// a prefetch (RabbitMQ refuses one without), and acks only move this credit.
const PREFETCH: u16 = 1000;
/// Acks go out once for this many deliveries (`multiple`), well within the
/// prefetch so that the broker never stops for credit.
const ACK_EVERY: u64 = 250;
/// How much earlier than `--since` a read starts: the broker dates a chunk by
/// its own clock, an event by its publisher's, in whole seconds. What comes
/// before `since` is then filtered out here.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The header of a read's end mark (see the module's documentation).
pub const END_MARK: &str = "switchboard-archive-end";
/// The header each stream delivery carries: its offset in the stream.
const OFFSET: &str = "x-stream-offset";

/// Reads the archive stream of `config`'s broker: the records `query`
/// selects, oldest first. Blocking: it opens its own connection (as the CLI's
/// broker commands do) on its own runtime and closes it when done.
pub fn read(config: &RouterConfig, query: &Query) -> anyhow::Result<Vec<ArchivedEvent>> {
    let settings = RabbitSettings::from_config(config)
        .context("no broker is configured: the archive stream lives on RabbitMQ")?;
    if config.plugins.contains_key("archive") {
        bail!(
            "plugin \"archive\" and the [archive] stream share the queue name {:?}: rename \
             the plugin, or use another [broker] prefix",
            Names::new(&settings.prefix).archive_stream()
        );
    }
    let rules = rules(&config.archive)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let connection = connect(&settings, "switchboard archive reader")
            .await
            .map_err(anyhow::Error::msg)?;
        let stream = Names::new(&settings.prefix).archive_stream();
        let read = read_stream(&connection, &stream, settings.timeout, &rules, query).await;
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            connection.close(200, "archive read".into()),
        )
        .await;
        // One sentence with its causes, never the broker's credentials.
        read.map_err(|e| anyhow::anyhow!("{}", settings.url.scrub(&format!("{e:#}"))))
    })
}

/// Where the read starts, as the `x-stream-offset` consumer argument.
fn start(query: &Query) -> AMQPValue {
    if let Some(after) = query.after {
        // Position `after` is offset `after - 1`: the next one is `after`.
        return AMQPValue::LongLongInt(i64::try_from(after).unwrap_or(i64::MAX));
    }
    let Some(since) = query.since else {
        return AMQPValue::LongString(LongString::from("first"));
    };
    // Never later than now (less the skew): a time past the end starts at
    // the end, and the end mark, written as the read starts, must not fall
    // before that.
    let skew = i64::try_from(CLOCK_SKEW.as_secs()).unwrap_or(0);
    let at = since.timestamp().min(Utc::now().timestamp()) - skew;
    AMQPValue::Timestamp(u64::try_from(at).unwrap_or(0))
}

fn not_found(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)
    )
}

/// Consumes `stream` from where `query` starts up to this read's end mark.
async fn read_stream(
    connection: &Connection,
    stream: &str,
    timeout: Duration,
    rules: &[Rule],
    query: &Query,
) -> anyhow::Result<Vec<ArchivedEvent>> {
    let channel = connection
        .create_channel()
        .await
        .context("cannot open a channel")?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .context("cannot set the prefetch")?;
    let mut arguments = FieldTable::default();
    arguments.insert(ShortString::from(OFFSET), start(query));
    let consumer = channel
        .basic_consume(
            stream.into(),
            "".into(),
            BasicConsumeOptions::default(),
            arguments,
        )
        .await;
    let mut consumer = match consumer {
        Ok(consumer) => consumer,
        // Not declared yet (no appliance has run with [archive]): nothing is
        // archived, as on the embedded bus before its first start.
        Err(e) if not_found(&e) => return Ok(Vec::new()),
        Err(e) => bail!("cannot read the archive stream {stream:?}: {e}"),
    };
    let mark = uuid::Uuid::now_v7().to_string();
    mark_end(connection, stream, &mark, timeout).await?;

    let limit = query.limit.unwrap_or(usize::MAX);
    let mut found = Vec::new();
    let mut seen = 0u64;
    let mut unacked = 0u64;
    let mut last = None;
    while found.len() < limit {
        // The end mark is on its way: a wait this long is a broker that
        // stopped, not the end of the stream...
        let delivery = match tokio::time::timeout(timeout, consumer.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(Some(Err(e))) => bail!("reading the archive stream {stream:?} failed: {e}"),
            Ok(None) => {
                bail!("the broker ended the read of the archive stream {stream:?} (deleted?)")
            }
            // ...or a page that starts past the end: given an offset not
            // written yet, the broker waits for it to be written (it does not
            // start at the end, as for a time past the end), so the mark,
            // written before, never comes. Nothing is after that position.
            Err(_) if seen == 0 && query.after.is_some() => break,
            Err(_) => bail!(
                "the archive stream {stream:?} delivered nothing for {timeout:?} before the \
                 read's end mark came back"
            ),
        };
        seen += 1;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let Some(offset) = headers.inner().get(OFFSET).and_then(integer) else {
            // Not a stream: leave what it holds unacknowledged (closing the
            // channel puts it back).
            let _ = channel.close(200, "not a stream".into()).await;
            bail!("queue {stream:?} is not a stream (its deliveries carry no {OFFSET})");
        };
        let mark_of = headers.inner().get(END_MARK).map(amqp::value_text);
        unacked += 1;
        if unacked >= ACK_EVERY {
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .context("cannot acknowledge archive deliveries")?;
            unacked = 0;
            last = None;
        } else {
            last = Some(delivery.acker.clone());
        }
        match mark_of {
            Some(m) if m == mark => break,
            // Another read's end.
            Some(_) => continue,
            None => {}
        }
        let event = archived(rules, offset, delivery);
        if query.selects(&event) {
            found.push(event);
        }
    }
    if let Some(acker) = last {
        let _ = acker.ack(BasicAckOptions { multiple: true }).await;
    }
    finish(&channel, consumer.tag()).await;
    Ok(found)
}

/// Cancels the consumer and closes its channel, each bounded: the result is
/// already read.
async fn finish(channel: &Channel, tag: ShortString) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await;
        let _ = channel.close(200, "archive read".into()).await;
    })
    .await;
}

/// Publishes this read's end mark to `stream` and waits for the broker's
/// confirm: once confirmed, it is in the log after everything before it.
async fn mark_end(
    connection: &Connection,
    stream: &str,
    mark: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let channel = connection
        .create_channel()
        .await
        .context("cannot open a channel")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("cannot ask for publisher confirms")?;
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(END_MARK),
        AMQPValue::LongString(LongString::from(mark)),
    );
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = channel
        .basic_publish(
            "".into(),
            stream.into(),
            options,
            b"",
            BasicProperties::default().with_headers(headers),
        )
        .await
        .with_context(|| format!("cannot mark the end of a read of {stream:?}"))?;
    let confirmed = tokio::time::timeout(timeout, confirm).await;
    let _ = channel.close(200, "marked".into()).await;
    match confirmed {
        Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => Ok(()),
        Ok(Ok(other)) => {
            bail!("the archive stream {stream:?} did not take a read's end mark: {other:?}")
        }
        Ok(Err(e)) => bail!("cannot mark the end of a read of {stream:?}: {e}"),
        Err(_) => bail!("the broker did not confirm a read's end mark within {timeout:?}"),
    }
}

/// An integer header value (the broker writes offsets as `long long`).
fn integer(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::Timestamp(n) => Some(*n),
        _ => None,
    }
}

/// The record of the delivery at `offset`, as the embedded archive makes it.
fn archived(rules: &[Rule], offset: u64, delivery: lapin::message::Delivery) -> ArchivedEvent {
    let timestamp = *delivery.properties.timestamp();
    let mut message = amqp::message(delivery.data, &delivery.properties);
    // The broker's, added on delivery: not part of what was published.
    message.headers.retain(|(k, _)| k != OFFSET);
    let out = Outgoing {
        exchange: delivery.exchange.as_str().to_string(),
        routing_key: delivery.routing_key.as_str().to_string(),
        message,
    };
    let time = timestamp
        .and_then(|t| DateTime::from_timestamp(i64::try_from(t).ok()?, 0))
        .or_else(|| envelope_time(&out))
        .unwrap_or_else(Utc::now);
    record(rules, offset + 1, time, &out)
}

/// The time the event itself gives: the envelope's `timestamp`, a structured
/// CloudEvent's `time`, or a binary CloudEvent's `time` header.
fn envelope_time(out: &Outgoing) -> Option<DateTime<Utc>> {
    let parse = |text: &str| {
        DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    };
    if let Ok(serde_json::Value::Object(body)) =
        serde_json::from_slice::<serde_json::Value>(&out.message.body)
    {
        let found = ["timestamp", "time"]
            .iter()
            .filter_map(|k| body.get(*k)?.as_str())
            .find_map(parse);
        if found.is_some() {
            return found;
        }
    }
    ["cloudEvents:time", "cloudEvents_time"]
        .iter()
        .filter_map(|k| out.message.header(k))
        .find_map(parse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Message;

    fn out(body: &str, headers: &[(&str, &str)]) -> Outgoing {
        Outgoing {
            exchange: "events".into(),
            routing_key: "bill.created".into(),
            message: Message {
                body: body.as_bytes().to_vec().into(),
                content_type: Some("application/json".into()),
                message_id: None,
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        }
    }

    #[test]
    fn a_read_starts_at_the_page_then_at_since_less_the_skew_then_at_the_first() {
        let mut query = Query::default();
        assert_eq!(start(&query), AMQPValue::LongString("first".into()));
        let since = DateTime::parse_from_rfc3339("2026-11-22T09:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        query.since = Some(since);
        assert_eq!(
            start(&query),
            AMQPValue::Timestamp(since.timestamp() as u64 - 60)
        );
        // A `since` in the future starts no later than now: the end mark,
        // written now, must be read.
        query.since = Some(Utc::now() + chrono::Duration::days(1));
        let AMQPValue::Timestamp(at) = start(&query) else {
            panic!("not a timestamp");
        };
        assert!(at <= Utc::now().timestamp() as u64 - 59);
        query.after = Some(41);
        assert_eq!(start(&query), AMQPValue::LongLongInt(41));
    }

    #[test]
    fn an_event_without_a_timestamp_property_is_dated_by_its_envelope() {
        let envelope = out(
            r#"{"id":"e-1","type":"bill.created","timestamp":"2026-11-22T09:00:00Z"}"#,
            &[],
        );
        assert_eq!(
            envelope_time(&envelope).map(|t| t.to_rfc3339()),
            Some("2026-11-22T09:00:00+00:00".into())
        );
        let cloudevent = out(r#"{"time":"2026-11-22T10:00:00+01:00"}"#, &[]);
        assert_eq!(
            envelope_time(&cloudevent).map(|t| t.to_rfc3339()),
            Some("2026-11-22T09:00:00+00:00".into())
        );
        let binary = out("{}", &[("cloudEvents_time", "2026-11-22T09:00:00Z")]);
        assert!(envelope_time(&binary).is_some());
        assert_eq!(envelope_time(&out(r#"{"timestamp":"soon"}"#, &[])), None);
        assert_eq!(envelope_time(&out("not json", &[])), None);
    }

    #[test]
    fn offsets_are_read_whatever_integer_type_carries_them() {
        assert_eq!(integer(&AMQPValue::LongLongInt(7)), Some(7));
        assert_eq!(integer(&AMQPValue::LongInt(7)), Some(7));
        assert_eq!(integer(&AMQPValue::LongLongInt(-1)), None);
        assert_eq!(integer(&AMQPValue::LongString("7".into())), None);
    }
}
