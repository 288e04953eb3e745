//! Broker operations outside the event path, for the admin API and the CLI:
//! queue depth, looking at and re-driving dead letters, tapping an exchange.
//! Each takes a connection and opens the channels it needs (a refused
//! operation closes its channel, never a shared one).

use std::time::Duration;

use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Confirmation, Connection};

use super::{Names, amqp};
use crate::bus::{DeadLetter, Published};

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
            delivered: amqp::delivered(d.exchange.as_str(), d.routing_key.as_str(), message),
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
    let dlq = names.dlq(plugin);
    let queue = names.queue(plugin);
    if depth(connection, &queue).await?.is_none() {
        return Err(format!("queue {queue:?} does not exist"));
    }
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut moved = 0;
    while moved < limit {
        let got = channel
            .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| format!("cannot read {dlq:?}: {e}"))?;
        let Some(got) = got else { break };
        let d = got.delivery;
        let message = amqp::redriven(&amqp::message(d.data, &d.properties));
        let properties = amqp::properties(&message, &[]);
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                options,
                &message.body,
                properties,
            )
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(timeout, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => {}
            Ok(Ok(other)) => {
                let _ = channel.close(200, "redrive stopped".into()).await;
                return Err(format!(
                    "{queue:?} did not take a re-driven message ({other:?}); {moved} moved"
                ));
            }
            Ok(Err(e)) => return Err(format!("{e}; {moved} moved")),
            Err(_) => return Err(format!("no confirm within {timeout:?}; {moved} moved")),
        }
        d.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| format!("{e}; {moved} moved"))?;
        moved += 1;
    }
    let _ = channel.close(200, "redriven".into()).await;
    Ok(moved)
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
        .map_err(|e| format!("cannot bind to exchange {exchange:?}: {e}"))?;
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
