//! What the router declares on the broker, by name and arguments. Everything
//! starts with the configured prefix (`switchboard` below):
//!
//! ```text
//! user exchange --route pattern--> switchboard.billing            (the plugin's queue)
//! switchboard.retry (direct) --"billing.5s"--> switchboard.billing.retry.5s
//!     x-message-ttl = 5000, dead-letters via the default exchange back to switchboard.billing
//! switchboard.dlx (direct) --"billing"--> switchboard.billing.dlq
//! archived exchange --"#" | "" | each routed key--> switchboard.archive   (a stream, with [archive])
//! (default exchange) --> switchboard.delay.<2^k>ms, k = 0..=33      (delayed outputs)
//!     x-message-ttl = 2^k ms, dead-letters via the default exchange to switchboard.delay.due,
//!     which the router consumes: published to their exchange when due, else on down the ladder
//! ```
//!
//! Queue arguments are part of a queue's identity in RabbitMQ: declaring an
//! existing queue with other arguments is refused (`PRECONDITION_FAILED`). The
//! arguments below therefore depend only on things that name a new queue when
//! they change (the retry delay is in the tier's name) or that the operator
//! changes deliberately (`queue_type`, `ordered`), and the refusal is reported
//! as such.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::config::{ArchiveConfig, DlqRetention, QueueType};

/// Deliveries of one message (redeliveries after a lost connection or a
/// crash included) after which a quorum queue dead-letters it by itself
/// (`x-death` reason `delivery_limit`): a guard against a message that takes
/// the process down every time, never reached by ordinary retries (those are
/// new messages).
pub const DELIVERY_LIMIT: i64 = 20;

/// The largest `x-stream-max-segment-size-bytes` RabbitMQ accepts (3 GB); a
/// larger `[archive] segment_size` is declared as this.
pub const MAX_STREAM_SEGMENT: u64 = 3_000_000_000;

/// The delay ladder's highest step: 2^33 ms (99 days), above the longest
/// `max_delay` allowed (90 days).
pub const DELAY_STEPS: u32 = 34;

/// Names of everything declared for one prefix.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
    /// `[archive]`, when enabled: the archive stream is declared and bound.
    archive: Option<ArchiveConfig>,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            archive: None,
        }
    }

    /// The same names, with the archive stream declared as `archive` says
    /// (`None`: no archive).
    pub fn with_archive(mut self, archive: Option<ArchiveConfig>) -> Self {
        self.archive = archive;
        self
    }

    /// `[archive]`, if the archive stream is declared.
    pub fn archive(&self) -> Option<&ArchiveConfig> {
        self.archive.as_ref()
    }

    /// The archive stream: `<prefix>.archive`. A plugin named `archive` would
    /// have the same queue name: the declaration refuses that pair.
    pub fn archive_stream(&self) -> String {
        format!("{}.archive", self.prefix)
    }

    /// The plugin's queue: `<prefix>.<plugin>`.
    pub fn queue(&self, plugin: &str) -> String {
        format!("{}.{plugin}", self.prefix)
    }

    /// The plugin's dead-letter queue: `<prefix>.<plugin>.dlq`.
    pub fn dlq(&self, plugin: &str) -> String {
        format!("{}.{plugin}.dlq", self.prefix)
    }

    /// The exchange retry tiers are bound to: `<prefix>.retry` (direct).
    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }

    /// The exchange dead-letter queues are bound to: `<prefix>.dlx` (direct).
    pub fn dlx(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    /// Step `k` of the delay ladder: `<prefix>.delay.<2^k>ms`, where delayed
    /// outputs wait 2^k ms.
    pub fn delay_queue(&self, k: u32) -> String {
        format!("{}.delay.{}ms", self.prefix, 1u64 << k.min(DELAY_STEPS - 1))
    }

    /// Where the ladder's steps dead-letter to, for the router to publish
    /// what is due or send it on down the ladder: `<prefix>.delay.due`.
    pub fn delay_due(&self) -> String {
        format!("{}.delay.due", self.prefix)
    }

    /// The retry tier of `plugin` for `delay`: `<prefix>.<plugin>.retry.<delay>`.
    pub fn retry_queue(&self, plugin: &str, delay: Duration) -> String {
        format!("{}.{plugin}.retry.{}", self.prefix, delay_text(delay))
    }

    /// The routing key of that tier on the retry exchange: `<plugin>.<delay>`.
    pub fn retry_key(plugin: &str, delay: Duration) -> String {
        format!("{plugin}.{}", delay_text(delay))
    }
}

/// `5s`, `500ms`, `90s`: whole seconds when exact, else milliseconds.
pub fn delay_text(delay: Duration) -> String {
    let ms = delay.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn put(table: &mut FieldTable, key: &str, value: AMQPValue) {
    table.insert(ShortString::from(key), value);
}

fn base(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    let kind = match queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    put(&mut args, "x-queue-type", text(kind));
    args
}

/// Dead-lettering that the broker does itself, at least once where it can
/// (quorum queues; it needs `reject-publish` overflow).
fn dead_letter_to(args: &mut FieldTable, queue_type: QueueType, exchange: &str, key: &str) {
    put(args, "x-dead-letter-exchange", text(exchange));
    put(args, "x-dead-letter-routing-key", text(key));
    if queue_type == QueueType::Quorum {
        put(args, "x-dead-letter-strategy", text("at-least-once"));
        put(args, "x-overflow", text("reject-publish"));
    }
}

impl Names {
    /// The plugin queue's arguments: what the broker dead-letters by itself
    /// goes to the plugin's DLQ; `ordered` makes it a single-active-consumer
    /// queue.
    pub fn queue_args(&self, plugin: &str, queue_type: QueueType, ordered: bool) -> FieldTable {
        let mut args = base(queue_type);
        dead_letter_to(&mut args, queue_type, &self.dlx(), plugin);
        if queue_type == QueueType::Quorum {
            put(
                &mut args,
                "x-delivery-limit",
                AMQPValue::LongLongInt(DELIVERY_LIMIT),
            );
        }
        if ordered {
            put(
                &mut args,
                "x-single-active-consumer",
                AMQPValue::Boolean(true),
            );
        }
        args
    }

    /// A retry tier: messages wait `delay` (a per-queue TTL, so every message
    /// expires in order), then dead-letter back to the plugin's queue.
    pub fn retry_args(&self, plugin: &str, queue_type: QueueType, delay: Duration) -> FieldTable {
        let mut args = base(queue_type);
        let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        put(&mut args, "x-message-ttl", AMQPValue::LongLongInt(ttl));
        dead_letter_to(&mut args, queue_type, "", &self.queue(plugin));
        args
    }

    /// A step of the delay ladder: messages wait 2^k ms (a per-queue TTL, so
    /// they expire in order), then dead-letter to [`Names::delay_due`].
    pub fn delay_args(&self, queue_type: QueueType, k: u32) -> FieldTable {
        let mut args = base(queue_type);
        let ttl = i64::try_from(1u64 << k.min(DELAY_STEPS - 1)).unwrap_or(i64::MAX);
        put(&mut args, "x-message-ttl", AMQPValue::LongLongInt(ttl));
        dead_letter_to(&mut args, queue_type, "", &self.delay_due());
        args
    }

    /// A plain queue of the configured type (the delay ladder's due queue).
    pub fn dlq_args(queue_type: QueueType) -> FieldTable {
        base(queue_type)
    }

    /// A plugin's dead-letter queue: with `dlq_ttl`, letters expire
    /// (`x-message-ttl`); with `dlq_max_length`, one more letter discards the
    /// oldest (`x-max-length`, `x-overflow = "drop-head"`). Only what is set is
    /// declared, so that a queue created without retention still matches.
    pub fn dead_letter_queue_args(queue_type: QueueType, retention: DlqRetention) -> FieldTable {
        let mut args = base(queue_type);
        if let Some(ttl) = retention.ttl {
            let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            put(&mut args, "x-message-ttl", AMQPValue::LongLongInt(ms));
        }
        if let Some(n) = retention.max_length {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            put(&mut args, "x-max-length", AMQPValue::LongLongInt(n));
            put(&mut args, "x-overflow", text("drop-head"));
        }
        args
    }

    /// The archive stream's arguments, from `[archive]` alone, so that every
    /// replica and every restart declares the same ones: retention by age
    /// (`x-max-age`, in whole seconds, as RabbitMQ writes it: `604800s`) and by
    /// size (`x-max-length-bytes`), and the segment size (retention deletes
    /// whole segments), capped at [`MAX_STREAM_SEGMENT`].
    pub fn archive_args(archive: &ArchiveConfig) -> FieldTable {
        let mut args = FieldTable::default();
        put(&mut args, "x-queue-type", text("stream"));
        let age = archive.max_age.as_secs().max(1);
        put(&mut args, "x-max-age", text(&format!("{age}s")));
        let bytes = |n: u64| AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX));
        put(
            &mut args,
            "x-max-length-bytes",
            bytes(archive.max_size.as_u64()),
        );
        put(
            &mut args,
            "x-stream-max-segment-size-bytes",
            bytes(archive.segment_size.as_u64().min(MAX_STREAM_SEGMENT)),
        );
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let n = Names::new("switchboard");
        assert_eq!(n.queue("billing"), "switchboard.billing");
        assert_eq!(n.dlq("billing"), "switchboard.billing.dlq");
        assert_eq!(
            n.retry_queue("billing", Duration::from_secs(5)),
            "switchboard.billing.retry.5s"
        );
        assert_eq!(
            Names::retry_key("billing", Duration::from_millis(500)),
            "billing.500ms"
        );
        assert_eq!(n.retry_exchange(), "switchboard.retry");
        assert_eq!(n.dlx(), "switchboard.dlx");
        assert_eq!(n.archive_stream(), "switchboard.archive");
        assert_eq!(n.delay_queue(0), "switchboard.delay.1ms");
        assert_eq!(n.delay_queue(10), "switchboard.delay.1024ms");
        assert_eq!(n.delay_due(), "switchboard.delay.due");
    }

    #[test]
    fn delay_steps_wait_their_power_of_two_and_come_back_to_the_router() {
        let n = Names::new("sb");
        let args = n.delay_args(QueueType::Classic, 12);
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(get("x-message-ttl"), Some(AMQPValue::LongLongInt(4096)));
        assert_eq!(get("x-dead-letter-exchange"), Some(text("")));
        assert_eq!(get("x-dead-letter-routing-key"), Some(text("sb.delay.due")));
        // The top step covers the longest max_delay.
        let top = 1u64 << (DELAY_STEPS - 1);
        assert!(u128::from(top) > crate::config::MAX_MAX_DELAY.as_millis());
    }

    #[test]
    fn the_archive_stream_keeps_what_archive_says_within_rabbitmqs_limits() {
        let mut archive = ArchiveConfig {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_size: bytesize::ByteSize::gib(2),
            segment_size: bytesize::ByteSize::mib(64),
            ..ArchiveConfig::default()
        };
        let args = Names::archive_args(&archive);
        let get = |args: &FieldTable, k: &str| args.inner().get(k).cloned();
        assert_eq!(get(&args, "x-queue-type"), Some(text("stream")));
        assert_eq!(get(&args, "x-max-age"), Some(text("604800s")));
        assert_eq!(
            get(&args, "x-max-length-bytes"),
            Some(AMQPValue::LongLongInt(2 << 30))
        );
        assert_eq!(
            get(&args, "x-stream-max-segment-size-bytes"),
            Some(AMQPValue::LongLongInt(64 << 20))
        );
        // The same configuration, the same arguments: a replica's or a
        // restart's declaration is accepted.
        assert_eq!(Names::archive_args(&archive), args);
        archive.segment_size = bytesize::ByteSize::gib(8);
        archive.max_age = Duration::from_millis(300);
        let capped = Names::archive_args(&archive);
        assert_eq!(
            get(&capped, "x-stream-max-segment-size-bytes"),
            Some(AMQPValue::LongLongInt(3_000_000_000))
        );
        assert_eq!(get(&capped, "x-max-age"), Some(text("1s")));
    }

    #[test]
    fn quorum_queues_dead_letter_at_least_once() {
        let n = Names::new("sb");
        let args = n.queue_args("billing", QueueType::Quorum, true);
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(get("x-queue-type"), Some(text("quorum")));
        assert_eq!(get("x-dead-letter-strategy"), Some(text("at-least-once")));
        assert_eq!(get("x-overflow"), Some(text("reject-publish")));
        assert_eq!(get("x-dead-letter-exchange"), Some(text("sb.dlx")));
        assert_eq!(
            get("x-single-active-consumer"),
            Some(AMQPValue::Boolean(true))
        );
        let classic = n.queue_args("billing", QueueType::Classic, false);
        assert!(!classic.contains_key("x-dead-letter-strategy"));
        assert!(!classic.contains_key("x-single-active-consumer"));
        let tier = n.retry_args("billing", QueueType::Classic, Duration::from_secs(2));
        assert_eq!(
            tier.inner().get("x-message-ttl"),
            Some(&AMQPValue::LongLongInt(2000))
        );
        assert_eq!(
            tier.inner().get("x-dead-letter-routing-key"),
            Some(&text("sb.billing"))
        );
    }
}
