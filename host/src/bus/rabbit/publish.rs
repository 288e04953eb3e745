//! Publishing: persistent, mandatory and confirmed. A batch is sent whole, then
//! its confirms are awaited together. If the connection drops before every
//! confirm arrived, the whole batch is published again on the next session
//! (output ids are deterministic, so a duplicate is recognisable), within the
//! deadline.
//!
//! **Returns credited exactly where they decide something.** A broker returns
//! an unroutable mandatory message (`basic.return`) before it confirms it, but
//! lapin hands each return to whichever confirm of the channel completes next,
//! and a multiple-ack completes several at once in no set order: on a channel
//! shared by concurrent batches, a return can be credited to another batch.
//! Where a return decides what happens ([`Returns::Decide`]: retry and
//! dead-letter copies, and outputs under `unroutable = "dead-letter"`), the
//! batch gets a channel lent to it alone until its confirms are in, so every
//! return on it is its own, matched to its message by exchange and routing
//! key. Where a return is only counted ([`Returns::Count`]: outputs and ingress
//! under `unroutable = "drop"`), batches share one channel, whose confirms the
//! broker acknowledges several at a time: the count stays exact, only which
//! batch saw a return may be another's.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::{Channel, Confirmation};

use super::session::{Session, wait_session};
use super::{Inner, amqp, lock};
use crate::bus::{BusError, Outgoing, Published};

/// Batches in flight at once on one connection (one channel each).
const CHANNELS: usize = 64;

/// What a batch's returns (unroutable messages) are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Returns {
    /// They decide the outcome: credited to exactly the right message.
    Decide,
    /// They are only counted.
    Count,
}

/// The publishing channels of one session: the shared one, idle ones to lend,
/// and permits for lending.
pub(super) struct Publishers {
    shared: tokio::sync::Mutex<Option<Channel>>,
    idle: Mutex<Vec<Channel>>,
    permits: tokio::sync::Semaphore,
}

impl Default for Publishers {
    fn default() -> Self {
        Self {
            shared: tokio::sync::Mutex::new(None),
            idle: Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(CHANNELS),
        }
    }
}

/// The channel-level error a broker closed a channel with, if that is what
/// `e` is (e.g. `NOT_FOUND` for a publish to an exchange that does not exist).
pub(super) fn soft_error(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// `e` in one sentence, for an error message or a log line. For what the
/// broker said, its own words: lapin's `Display` adds its kind ("protocol error:
/// AMQP soft error: NOT-FOUND: NOT_FOUND - …"), and an error chain printed
/// whole repeats it, from the source.
pub fn describe(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(_) => {
                format!("the broker closed the channel: {}", amqp.get_message())
            }
            AMQPErrorKind::Hard(_) => {
                format!("the broker closed the connection: {}", amqp.get_message())
            }
        },
        _ => e.to_string(),
    }
}

/// Whether the broker closed the channel because what the operation named (an
/// exchange, a queue) does not exist.
pub fn is_not_found(e: &lapin::Error) -> bool {
    matches!(soft_error(e), Some(AMQPSoftError::NOTFOUND))
}

pub(super) enum PublishError {
    /// The broker said no (nack): trying again now would not help.
    Refused(String),
    /// A message the broker could not take at all (nothing was sent).
    TooLarge(String),
    /// The broker closed the channel: an exchange the batch names is missing.
    NoExchange(String),
    /// No answer (connection or channel lost, timeout): publish again.
    Lost(String),
}

/// Publishes `batch` (persistent, mandatory) and waits for every confirm,
/// republishing the whole batch on the next session if the connection drops
/// first. Returns, per message, whether a queue took it.
pub(super) async fn publish_confirmed(
    inner: &Arc<Inner>,
    batch: &[Outgoing],
    deadline: Instant,
    returns: Returns,
) -> Result<Vec<bool>, BusError> {
    loop {
        let session = wait_session(inner, deadline).await?;
        let started = Instant::now();
        match publish_on(inner, &session, batch, deadline, returns).await {
            Ok(routed) => {
                if let Some(histogram) = &inner.settings.confirm_seconds {
                    histogram.observe(started.elapsed().as_secs_f64());
                }
                return Ok(routed);
            }
            Err(PublishError::Refused(why)) => return Err(BusError::Refused(why)),
            Err(PublishError::TooLarge(why)) => return Err(BusError::TooLarge(why)),
            Err(PublishError::NoExchange(why)) => {
                // Configured exchanges are the router's to declare: put them
                // back, and let the event be retried (with backoff) meanwhile.
                super::session::redeclare(inner, "an exchange was missing on the broker");
                return Err(BusError::Unavailable(format!(
                    "an exchange is missing on the broker: {why}"
                )));
            }
            Err(PublishError::Lost(why)) => {
                if Instant::now() >= deadline {
                    return Err(BusError::Unavailable(format!(
                        "publish not confirmed: {why}"
                    )));
                }
                if !session.live() {
                    tracing::debug!(error = %why, "connection lost during a publish; publishing again once reconnected");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Counts the messages no queue took and offers every published message to
/// stream watchers; returns the first unroutable (exchange, routing key).
pub(super) fn record_published(
    inner: &Inner,
    batch: Vec<Outgoing>,
    routed: &[bool],
) -> Option<(String, String)> {
    let mut unroutable = None;
    for (out, routed) in batch.into_iter().zip(routed) {
        if !routed {
            inner.unroutable.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(exchange = %out.exchange, routing_key = %out.routing_key, "no queue is bound for a published message");
            unroutable.get_or_insert_with(|| (out.exchange.clone(), out.routing_key.clone()));
        }
        if inner.stream.receiver_count() > 0 {
            let _ = inner.stream.send(Arc::new(Published {
                exchange: out.exchange,
                routing_key: out.routing_key,
                message: out.message,
            }));
        }
    }
    unroutable
}

/// Whether every message of `batch` has properties and headers that fit in one
/// frame (`limit` bytes); `Err` says which does not.
pub(super) fn fits(batch: &[Outgoing], limit: usize) -> Result<(), String> {
    for out in batch {
        let len = amqp::header_len(&out.message);
        if len > limit {
            return Err(format!(
                "a message to exchange {:?} with routing key {:?} has {len} bytes of \
                 properties and headers, more than one AMQP frame holds ({limit})",
                out.exchange, out.routing_key
            ));
        }
    }
    Ok(())
}

/// The session's shared publishing channel (a new one if it was lost).
async fn shared(session: &Session) -> Result<Channel, lapin::Error> {
    let mut shared = session.publishers.shared.lock().await;
    if let Some(channel) = shared.as_ref().filter(|c| c.status().connected()) {
        return Ok(channel.clone());
    }
    let channel = session.publishing.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    *shared = Some(channel.clone());
    Ok(channel)
}

/// A channel in confirm mode lent to one batch: an idle one of the session's,
/// or a new one.
async fn borrow(session: &Session) -> Result<Channel, lapin::Error> {
    loop {
        let idle = lock(&session.publishers.idle).pop();
        match idle {
            Some(channel) if channel.status().connected() => return Ok(channel),
            Some(_) => continue,
            None => break,
        }
    }
    let channel = session.publishing.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

fn lost_or_missing(e: &lapin::Error) -> PublishError {
    match soft_error(e) {
        Some(AMQPSoftError::NOTFOUND) => PublishError::NoExchange(e.to_string()),
        _ => PublishError::Lost(e.to_string()),
    }
}

async fn publish_on(
    inner: &Inner,
    session: &Session,
    batch: &[Outgoing],
    deadline: Instant,
    returns: Returns,
) -> Result<Vec<bool>, PublishError> {
    // Checked before anything is sent: the batch goes whole or not at all, and
    // a header the broker cannot take would close the whole connection.
    let limit = amqp::header_limit(session.publishing.configuration().frame_max());
    fits(batch, limit).map_err(PublishError::TooLarge)?;
    let mut blocked = inner.blocked.subscribe();
    let why = blocked.borrow().clone();
    if let Some(why) = why {
        tokio::time::timeout_at(deadline.into(), blocked.wait_for(Option::is_none))
            .await
            .map_err(|_| PublishError::Lost(format!("the broker blocks publishing: {why}")))?
            .map_err(|_| PublishError::Lost("the session closed".into()))?;
    }
    let mut _permit = None;
    let channel = match returns {
        Returns::Count => tokio::time::timeout_at(deadline.into(), shared(session)).await,
        Returns::Decide => {
            let permit =
                tokio::time::timeout_at(deadline.into(), session.publishers.permits.acquire())
                    .await
                    .map_err(|_| {
                        PublishError::Lost("timed out waiting for a publishing channel".into())
                    })?
                    .map_err(|_| PublishError::Lost("the session closed".into()))?;
            _permit = Some(permit);
            tokio::time::timeout_at(deadline.into(), borrow(session)).await
        }
    }
    .map_err(|_| PublishError::Lost("timed out opening a publishing channel".into()))?
    .map_err(|e| PublishError::Lost(e.to_string()))?;
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let mut confirms = Vec::with_capacity(batch.len());
    for out in batch {
        let properties = amqp::properties(&out.message, &[]);
        let sent = tokio::time::timeout_at(
            deadline.into(),
            channel.basic_publish(
                out.exchange.as_str().into(),
                out.routing_key.as_str().into(),
                options,
                &out.message.body,
                properties,
            ),
        )
        .await;
        match sent {
            Ok(Ok(confirm)) => confirms.push(confirm),
            Ok(Err(e)) => return Err(lost_or_missing(&e)),
            Err(_) => return Err(PublishError::Lost("timed out sending".into())),
        }
    }
    let mut returned = Vec::new();
    for confirm in confirms {
        match tokio::time::timeout_at(deadline.into(), confirm).await {
            Ok(Ok(Confirmation::Ack(message))) => returned.extend(message),
            Ok(Ok(Confirmation::NotRequested)) => {}
            Ok(Ok(Confirmation::Nack(_))) => {
                return Err(PublishError::Refused(
                    "the broker refused the message (nack)".into(),
                ));
            }
            Ok(Err(e)) => return Err(lost_or_missing(&e)),
            Err(_) => {
                return Err(PublishError::Lost(
                    "timed out waiting for the confirm".into(),
                ));
            }
        }
    }
    if returns == Returns::Decide {
        // Every confirm is in, and the broker returns a message before it
        // confirms it: the channel carries nothing more of this batch.
        lock(&session.publishers.idle).push(channel);
    }
    let mut routed = vec![true; batch.len()];
    for message in returned {
        let (exchange, key) = (message.delivery.exchange, message.delivery.routing_key);
        match (0..batch.len()).find(|&i| {
            routed[i]
                && batch[i].exchange == exchange.as_str()
                && batch[i].routing_key == key.as_str()
        }) {
            Some(i) => routed[i] = false,
            // Another batch's, on the shared channel: counted all the same.
            None => {
                inner.unroutable.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(routed)
}
