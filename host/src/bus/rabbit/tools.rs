//! Broker operations outside the event path, for the admin API and the CLI:
//! queue depth, looking at and re-driving dead letters, tapping an exchange.
//! Each takes a connection and opens the channels it needs (a refused
//! operation closes its channel, never a shared one).

use std::time::Duration;

use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Confirmation, Connection};

use super::{Names, amqp};
use crate::bus::{DeadLetter, Delivered, FailureInfo, Published};

/// Ready messages and consumers of `queue`, or `None` if it does not exist.
pub async fn depth(connection: &Connection, queue: &str) -> Result<Option<(u32, u32)>, String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let result = channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await;
    match result {
        Ok(q) => {
            let _ = channel.close(200, "done".into()).await;
            Ok(Some((q.message_count(), q.consumer_count())))
        }
        // A passive declare of a missing queue closes the channel with 404.
        Err(e) if e.to_string().contains("NOT_FOUND") || e.to_string().contains("404") => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Up to `limit` messages of a dead-letter queue, oldest first, left in place:
/// fetched unacknowledged, then returned by closing the channel.
pub async fn peek(
    connection: &Connection,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    let mut letters = Vec::new();
    while letters.len() < limit {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| format!("cannot read {queue:?}: {e}"))?;
        let Some(got) = got else { break };
        let d = got.delivery;
        let message = amqp::message(d.data, &d.properties);
        let failure = amqp::failure_of(&message);
        let at = message
            .header(amqp::DEAD_LETTERED_AT)
            .unwrap_or_default()
            .to_string();
        letters.push(DeadLetter {
            // The DLQ's content is the router's own writing.
            delivered: amqp::delivered(d.exchange.as_str(), d.routing_key.as_str(), message, true),
            failure,
            at,
        });
    }
    // Closing the channel puts every unacknowledged message back.
    let _ = channel.close(200, "peeked".into()).await;
    Ok(letters)
}

/// Moves up to `limit` dead letters of `plugin` back to its queue as first
/// attempts: each is published (confirmed) before it is removed from the DLQ.
pub async fn redrive(
    connection: &Connection,
    names: &Names,
    plugin: &str,
    limit: usize,
    timeout: Duration,
) -> Result<usize, String> {
    let queue = names.queue(plugin);
    if depth(connection, &queue).await?.is_none() {
        return Err(format!("queue {queue:?} does not exist"));
    }
    move_messages(connection, &names.dlq(plugin), limit, timeout, |d| {
        let message = amqp::redriven(&amqp::message(d.data, &d.properties));
        (String::new(), queue.clone(), message)
    })
    .await
}

/// Moves the dead letters of `plugin` whose [`DeadLetter::id`] is one of
/// `ids` back to its queue as first attempts; each is published (confirmed)
/// before it is removed from the DLQ. Reads the DLQ once through (as many
/// letters as it held when asked); the others go back to it. Returns the ids
/// of the letters moved, one per letter.
pub async fn redrive_ids(
    connection: &Connection,
    names: &Names,
    plugin: &str,
    ids: &std::collections::BTreeSet<String>,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let queue = names.queue(plugin);
    if depth(connection, &queue).await?.is_none() {
        return Err(format!("queue {queue:?} does not exist"));
    }
    let dlq = names.dlq(plugin);
    let Some((held, _)) = depth(connection, &dlq).await? else {
        return Ok(Vec::new());
    };
    let held = usize::try_from(held).unwrap_or(usize::MAX);
    let chosen = std::sync::Mutex::new(Vec::new());
    let moved = move_some(connection, &dlq, usize::MAX, held, timeout, |d| {
        let message = amqp::message(d.data, &d.properties);
        let delivered = amqp::delivered(d.exchange.as_str(), d.routing_key.as_str(), message, true);
        let id = delivered.event_id();
        ids.contains(&id).then(|| {
            chosen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(id);
            let message = amqp::redriven(&delivered.message);
            (String::new(), queue.clone(), message)
        })
    })
    .await?;
    let mut chosen = chosen
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    chosen.truncate(moved);
    Ok(chosen)
}

/// A channel of its own in confirm mode, for publishes this module makes.
async fn confirming_channel(connection: &Connection) -> Result<lapin::Channel, String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(channel)
}

/// Puts `messages` (each with the exchange and routing key it was first
/// published with) in `plugin`'s queue, as first attempts from there: each
/// is published to the queue itself, all confirmed before this returns.
pub async fn deliver(
    connection: &Connection,
    names: &Names,
    plugin: &str,
    messages: Vec<Delivered>,
    timeout: Duration,
) -> Result<usize, String> {
    let queue = names.queue(plugin);
    if depth(connection, &queue).await?.is_none() {
        return Err(format!("queue {queue:?} does not exist"));
    }
    let channel = confirming_channel(connection).await?;
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let mut confirms = Vec::with_capacity(messages.len());
    for delivered in &messages {
        let message = amqp::redriven(&delivered.message);
        let origin = [
            (amqp::EXCHANGE, delivered.exchange.clone()),
            (amqp::ROUTING_KEY, delivered.routing_key.clone()),
        ];
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                options,
                &message.body,
                amqp::properties(&message, &origin),
            )
            .await
            .map_err(|e| e.to_string())?;
        confirms.push(confirm);
    }
    let count = confirms.len();
    for confirm in confirms {
        match tokio::time::timeout(timeout, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => {}
            Ok(Ok(other)) => return Err(format!("{queue:?} did not take a message: {other:?}")),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no confirm from {queue:?} within {timeout:?}")),
        }
    }
    let _ = channel.close(200, "delivered".into()).await;
    Ok(count)
}

/// Moves up to `limit` messages out of `from`, one at a time: each is read,
/// published (mandatory, confirmed) where `to` says — exchange, routing key,
/// message — and only then removed from `from`. Returns how many moved.
async fn move_messages(
    connection: &Connection,
    from: &str,
    limit: usize,
    timeout: Duration,
    to: impl Fn(lapin::message::Delivery) -> (String, String, crate::bus::Message),
) -> Result<usize, String> {
    move_some(connection, from, limit, usize::MAX, timeout, |d| {
        Some(to(d))
    })
    .await
}

/// [`move_messages`], reading at most `scan` messages of `from` and moving
/// those `to` gives a destination; the others are left unacknowledged, so
/// closing the channel puts them back in `from`.
async fn move_some(
    connection: &Connection,
    from: &str,
    limit: usize,
    scan: usize,
    timeout: Duration,
    to: impl Fn(lapin::message::Delivery) -> Option<(String, String, crate::bus::Message)>,
) -> Result<usize, String> {
    let channel = confirming_channel(connection).await?;
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let (mut moved, mut seen) = (0, 0);
    while moved < limit && seen < scan {
        let got = channel
            .basic_get(from.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| format!("cannot read {from:?}: {e}"))?;
        let Some(got) = got else { break };
        seen += 1;
        let acker = got.delivery.acker.clone();
        let Some((exchange, key, message)) = to(got.delivery) else {
            continue;
        };
        let confirm = channel
            .basic_publish(
                exchange.as_str().into(),
                key.as_str().into(),
                options,
                &message.body,
                amqp::properties(&message, &[]),
            )
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(timeout, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => {}
            Ok(Ok(other)) => {
                let _ = channel.close(200, "move stopped".into()).await;
                return Err(format!(
                    "no queue took a message moved from {from:?} to {exchange:?} with key \
                     {key:?} ({other:?}); {moved} moved"
                ));
            }
            Ok(Err(e)) => return Err(format!("{e}; {moved} moved")),
            Err(_) => return Err(format!("no confirm within {timeout:?}; {moved} moved")),
        }
        acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| format!("{e}; {moved} moved"))?;
        moved += 1;
    }
    let _ = channel.close(200, "moved".into()).await;
    Ok(moved)
}

/// Deletes `queue` if it holds no message; true if it is gone (or was never
/// there). Checks the count first rather than asking for `if-empty`: RabbitMQ
/// 3.10 refuses `if-empty` on quorum queues with a connection error.
pub async fn delete_if_empty(connection: &Connection, queue: &str) -> Result<bool, String> {
    match depth(connection, queue).await? {
        None => return Ok(true),
        Some((0, _)) => {}
        Some(_) => return Ok(false),
    }
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    let deleted = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = channel.close(200, "done".into()).await;
    deleted
        .map(|_| true)
        .map_err(|e| format!("cannot delete {queue:?}: {e}"))
}

/// Moves every message of `queue` (a removed plugin's queue or retry tier) to
/// the plugin's dead-letter queue with kind `plugin_removed`: each is
/// published (confirmed) before it is removed. Returns how many moved.
pub async fn dead_letter_all(
    connection: &Connection,
    names: &Names,
    plugin: &str,
    queue: &str,
    timeout: Duration,
) -> Result<usize, String> {
    if depth(connection, queue).await?.is_none() {
        return Ok(0);
    }
    move_messages(connection, queue, usize::MAX, timeout, |d| {
        let message = amqp::message(d.data, &d.properties);
        let delivered = amqp::delivered(d.exchange.as_str(), d.routing_key.as_str(), message, true);
        let failure = FailureInfo {
            kind: "plugin_removed".into(),
            reason: format!(
                "plugin {plugin:?} was removed from the configuration while the event waited"
            ),
            attempts: delivered.attempt.saturating_sub(1),
            plugin_version: delivered
                .message
                .header(amqp::PLUGIN_VERSION)
                .unwrap_or_default()
                .to_string(),
            first_failure: delivered.first_failure.clone().unwrap_or_default(),
        };
        let copy = amqp::moved(&delivered, &failure, None, amqp::header_limit(0));
        (names.dlx(), plugin.to_string(), copy)
    })
    .await
}

/// Taps `exchange`: a private queue bound with `pattern` (every binding key
/// for a fanout exchange), deleted when the connection closes. Yields what is
/// published there from now on.
pub async fn tail(
    connection: &Connection,
    exchange: &str,
    pattern: &str,
) -> Result<impl futures::Stream<Item = Result<Published, String>> + use<>, String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare("".into(), options, FieldTable::default())
        .await
        .map_err(|e| format!("cannot declare a tap queue: {e}"))?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            if super::is_not_found(&e) {
                format!("exchange {exchange:?} does not exist on the broker")
            } else {
                format!(
                    "cannot bind to exchange {exchange:?}: {}",
                    super::describe(&e)
                )
            }
        })?;
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(consumer.map(move |d| {
        let _keep = &channel;
        d.map(|d| Published {
            exchange: d.exchange.as_str().to_string(),
            routing_key: d.routing_key.as_str().to_string(),
            message: amqp::message(d.data, &d.properties),
        })
        .map_err(|e| e.to_string())
    }))
}
