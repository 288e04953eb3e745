//! Delayed outputs on RabbitMQ, built from TTL queues (no plugin needed).
//!
//! The ladder is one queue per power of two, `<prefix>.delay.1ms` to
//! `<prefix>.delay.8589934592ms` (2^33 ms), each with that per-queue TTL, so
//! its messages expire in order, and each dead-lettering to
//! `<prefix>.delay.due`. A delayed output is published, confirmed, to the
//! step of the largest power of two not beyond its remaining delay, carrying
//! where it goes and when it is due ([`DUE_HEADER`], [`EXCHANGE_HEADER`],
//! [`KEY_HEADER`]). Every replica consumes `<prefix>.delay.due`: a message
//! still early goes on down the ladder, one that is due is published to its
//! exchange with its routing key and the router's headers removed, and only
//! then acked. Each hop at least halves what remains, so a message makes at
//! most 34 hops and is never early; it is late only by the last hop's time.
//!
//! The broker holds every waiting message (durable queues, persistent
//! messages), so delays survive restarts of the router and of the broker.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;

use super::publish::{Returns, publish_confirmed, record_published};
use super::{Inner, amqp, names::DELAY_STEPS, session};
use crate::bus::timers::now_ms;
use crate::bus::{BusError, Delayed, Message, Outgoing};
use crate::config::Unroutable;

/// When the delayed output is due, ms since the Unix epoch.
pub const DUE_HEADER: &str = "switchboard-delay-due";
/// The exchange it is published to when due.
pub const EXCHANGE_HEADER: &str = "switchboard-delay-exchange";
/// The routing key it is published with when due.
pub const KEY_HEADER: &str = "switchboard-delay-key";

/// Deliveries of `<prefix>.delay.due` one replica holds at once.
const PREFETCH: u16 = 256;

/// The ladder step for `remaining` ms: the largest power of two not beyond it.
pub fn step_for(remaining: u64) -> u32 {
    (63 - remaining.max(1).leading_zeros()).min(DELAY_STEPS - 1)
}

/// Headers a waiting message carries that are not the output's own: the
/// router's delay headers, and those the broker adds when it dead-letters.
fn is_waiting_header(name: &str) -> bool {
    [DUE_HEADER, EXCHANGE_HEADER, KEY_HEADER].contains(&name)
        || name == "x-death"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

/// The message that waits on the ladder for `out`, due at `due_ms`.
fn waiting(inner: &Inner, out: &Outgoing, due_ms: u64, now: u64) -> Outgoing {
    let mut message = out.message.clone();
    message.headers.retain(|(k, _)| !is_waiting_header(k));
    message
        .headers
        .push((DUE_HEADER.into(), due_ms.to_string()));
    message
        .headers
        .push((EXCHANGE_HEADER.into(), out.exchange.clone()));
    message
        .headers
        .push((KEY_HEADER.into(), out.routing_key.clone()));
    Outgoing {
        exchange: String::new(),
        routing_key: inner
            .names
            .delay_queue(step_for(due_ms.saturating_sub(now))),
        message,
    }
}

/// Puts `delayed` on the ladder, confirmed. A step no queue took (deleted by
/// hand) makes the router declare its topology again, and fails the batch.
pub(super) async fn schedule(
    inner: &Arc<Inner>,
    delayed: Vec<Delayed>,
    deadline: Instant,
) -> Result<(), BusError> {
    let now = now_ms();
    let batch: Vec<Outgoing> = delayed
        .iter()
        .map(|d| {
            let due = now.saturating_add(u64::try_from(d.after.as_millis()).unwrap_or(u64::MAX));
            waiting(inner, &d.output, due, now)
        })
        .collect();
    let routed = publish_confirmed(inner, &batch, deadline, Returns::Decide).await?;
    if routed.iter().all(|r| *r) {
        return Ok(());
    }
    session::redeclare(inner, "a delay queue was missing");
    Err(BusError::Unavailable(
        "a delay queue did not take a delayed output (declaring the topology again)".into(),
    ))
}

/// What to do with a message from `<prefix>.delay.due`.
enum Next {
    /// Back on the ladder (still early).
    Wait(Outgoing),
    /// Due: publish it.
    Publish(Outgoing),
    /// Not a delayed output: why.
    Bad(String),
}

fn next(inner: &Inner, message: Message, now: u64) -> Next {
    let header = |name: &str| {
        message
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let (Some(due), Some(exchange), Some(key)) = (
        header(DUE_HEADER).and_then(|d| d.parse::<u64>().ok()),
        header(EXCHANGE_HEADER),
        header(KEY_HEADER),
    ) else {
        return Next::Bad(format!(
            "a message in the delay queues without {DUE_HEADER}, {EXCHANGE_HEADER} and {KEY_HEADER}"
        ));
    };
    let out = Outgoing {
        exchange,
        routing_key: key,
        message,
    };
    if due > now {
        return Next::Wait(waiting(inner, &out, due, now));
    }
    let mut out = out;
    out.message.headers.retain(|(k, _)| !is_waiting_header(k));
    Next::Publish(out)
}

/// Consumes `<prefix>.delay.due` on every session until the bus closes.
pub(super) async fn serve(inner: Arc<Inner>) {
    let mut sessions = inner.sessions.subscribe();
    while !inner.closing.load(Ordering::SeqCst) {
        let Some(session) = inner.session.load_full().filter(|s| s.live()) else {
            if sessions.changed().await.is_err() {
                return;
            }
            continue;
        };
        if let Err(why) = consume(&inner, &session).await {
            tracing::debug!(error = %why, "delay consumer stopped; resuming");
        }
        tokio::select! {
            _ = sessions.changed() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn consume(inner: &Arc<Inner>, session: &session::Session) -> Result<(), String> {
    let channel = session
        .connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let queue = inner.names.delay_due();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "switchboard-delays".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    while let Some(delivery) = consumer.next().await {
        if inner.closing.load(Ordering::SeqCst) {
            break;
        }
        let delivery = delivery.map_err(|e| e.to_string())?;
        let message = amqp::message(delivery.data, &delivery.properties);
        let inner = inner.clone();
        // Each in its own task: a publish waiting for its confirm must not
        // hold up the messages behind it.
        inner.handle.clone().spawn(async move {
            let acker = delivery.acker;
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            match forward(&inner, message).await {
                Ok(()) => {
                    let _ = acker.ack(BasicAckOptions::default()).await;
                }
                Err(why) => {
                    tracing::warn!(reason = %why, "a delayed output could not be moved on; it goes back to the delay queue");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = acker.nack(requeue).await;
                }
            }
        });
    }
    Ok(())
}

/// Moves one message from `<prefix>.delay.due` on: down the ladder, or to its
/// exchange. `Err` puts it back.
async fn forward(inner: &Arc<Inner>, message: Message) -> Result<(), String> {
    let deadline = Instant::now() + inner.settings.timeout;
    match next(inner, message, now_ms()) {
        Next::Wait(out) => {
            let routed =
                publish_confirmed(inner, std::slice::from_ref(&out), deadline, Returns::Decide)
                    .await
                    .map_err(|e| e.to_string())?;
            if routed.first() == Some(&true) {
                Ok(())
            } else {
                session::redeclare(inner, "a delay queue was missing");
                Err(format!("no delay queue took it ({:?})", out.routing_key))
            }
        }
        Next::Publish(out) => {
            let known = inner
                .exchanges
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&out.exchange);
            if !known {
                return dead_letter(
                    inner,
                    out,
                    "the exchange it names is no longer declared",
                    deadline,
                )
                .await;
            }
            let routed =
                publish_confirmed(inner, std::slice::from_ref(&out), deadline, Returns::Decide)
                    .await
                    .map_err(|e| e.to_string())?;
            let copy = out.clone();
            let unrouted = record_published(inner, vec![out], &routed).is_some();
            if unrouted && inner.settings.unroutable == Unroutable::DeadLetter {
                return dead_letter(
                    inner,
                    copy,
                    "no queue is bound for it ([broker] unroutable = \"dead-letter\")",
                    deadline,
                )
                .await;
            }
            Ok(())
        }
        Next::Bad(why) => {
            // Only the router publishes to the ladder: someone else's message.
            tracing::error!(reason = %why, "dropped from the delay queues");
            Ok(())
        }
    }
}

/// A due output that cannot be published goes to the dead-letter queue of the
/// plugin that produced it (its `switchboard-source`), with the reason.
async fn dead_letter(
    inner: &Arc<Inner>,
    out: Outgoing,
    why: &str,
    deadline: Instant,
) -> Result<(), String> {
    let plugin = out
        .message
        .headers
        .iter()
        .find(|(k, _)| k == crate::envelope::SOURCE_HEADER)
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let failure = crate::bus::FailureInfo {
        kind: "invalid_output".into(),
        reason: format!(
            "a delayed output to exchange {:?} with routing key {:?} was due, but {why}",
            out.exchange, out.routing_key
        ),
        attempts: 1,
        plugin_version: String::new(),
        first_failure: crate::envelope::now_rfc3339(),
    };
    tracing::warn!(plugin, reason = %failure.reason, "delayed output dead-lettered");
    let delivered = crate::bus::Delivered {
        exchange: out.exchange,
        routing_key: out.routing_key,
        message: out.message,
        attempt: 1,
        first_failure: None,
    };
    let copy = Outgoing {
        exchange: inner.names.dlx(),
        routing_key: plugin,
        message: amqp::moved(&delivered, &failure, None, inner.header_limit()),
    };
    let routed = publish_confirmed(
        inner,
        std::slice::from_ref(&copy),
        deadline,
        Returns::Decide,
    )
    .await
    .map_err(|e| e.to_string())?;
    if routed.first() == Some(&true) {
        Ok(())
    } else {
        Err("no dead-letter queue took it".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_step_is_the_largest_power_of_two_not_beyond_what_remains() {
        assert_eq!(step_for(0), 0);
        assert_eq!(step_for(1), 0);
        assert_eq!(step_for(2), 1);
        assert_eq!(step_for(3), 1);
        assert_eq!(step_for(1024), 10);
        assert_eq!(step_for(1500), 10);
        assert_eq!(step_for(u64::MAX), DELAY_STEPS - 1);
        // Never beyond what remains: never early.
        for remaining in [1u64, 7, 999, 30_000, 604_800_000] {
            assert!(1u64 << step_for(remaining) <= remaining);
            assert!(remaining < 2u64 << step_for(remaining));
        }
    }
}
