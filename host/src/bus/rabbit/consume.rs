//! Consuming: one consumer (its own channel, `basic.qos` prefetch, manual
//! acks) per plugin, feeding the plugin's worker threads. It follows the
//! sessions, and declares the topology again and resumes when the broker
//! cancels it (its queue was deleted).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crossbeam_channel::Sender;
use futures::StreamExt as _;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::FieldTable;
use tokio::sync::watch;

use super::publish::soft_error;
use super::session::{Session, declare};
use super::settle::RabbitSettle;
use super::{RabbitBus, amqp};
use crate::bus::Delivery;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConsumerMode {
    Run,
    /// No new deliveries (basic.cancel); the channel stays open so that what was
    /// delivered can still be acknowledged.
    Cancel,
    /// Close the channel: unacknowledged deliveries go back to the queue.
    Close,
}

/// One plugin's consumer.
pub(super) struct ConsumerTask {
    pub(super) bus: RabbitBus,
    pub(super) plugin: String,
    pub(super) tx: Sender<Delivery>,
    pub(super) prefetch: watch::Receiver<u16>,
    pub(super) mode: watch::Receiver<ConsumerMode>,
    pub(super) outstanding: Arc<watch::Sender<u64>>,
}

enum Ended {
    Closed,
    Cancelled,
    Failed(String),
}

impl ConsumerTask {
    pub(super) async fn run(mut self) {
        let inner = self.bus.inner.clone();
        let mut sessions = inner.sessions.subscribe();
        loop {
            if *self.mode.borrow() == ConsumerMode::Close || inner.closing.load(Ordering::SeqCst) {
                return;
            }
            let Some(session) = inner.session.load_full().filter(|s| s.live()) else {
                tokio::select! {
                    _ = sessions.changed() => {}
                    _ = self.mode.changed() => {}
                }
                continue;
            };
            match self.consume(&session).await {
                Ended::Closed => return,
                Ended::Cancelled => {
                    tracing::warn!(plugin = %self.plugin, "the broker cancelled the consumer (queue deleted?); declaring again");
                    if let Err(e) = declare(&inner, &session).await {
                        tracing::error!(plugin = %self.plugin, error = %e, "cannot declare the queue again");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ended::Failed(why) => {
                    tracing::debug!(plugin = %self.plugin, error = %why, "consumer stopped; resuming on the next connection");
                    tokio::select! {
                        _ = sessions.changed() => {}
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    async fn consume(&mut self, session: &Arc<Session>) -> Ended {
        let inner = &self.bus.inner;
        let queue = inner.names.queue(&self.plugin);
        let channel = match session.connection.create_channel().await {
            Ok(c) => c,
            Err(e) => return Ended::Failed(e.to_string()),
        };
        let prefetch = *self.prefetch.borrow_and_update();
        if let Err(e) = channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
        {
            return Ended::Failed(e.to_string());
        }
        let mut consumer = match channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(c) => c,
            // The queue is gone: declare it again.
            Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => return Ended::Cancelled,
            Err(e) => return Ended::Failed(e.to_string()),
        };
        let mut cancelled = false;
        loop {
            tokio::select! {
                next = consumer.next(), if !cancelled => match next {
                    Some(Ok(d)) => {
                        let message = amqp::message(d.data, &d.properties);
                        // Only the router's own paths (a retry tier dead-lettering
                        // back, a re-drive) reach the queue through the default
                        // exchange by its name: only there are its headers believed.
                        let trusted = d.exchange.as_str().is_empty() && d.routing_key.as_str() == queue;
                        let delivered = amqp::delivered(d.exchange.as_str(), d.routing_key.as_str(), message, trusted);
                        self.outstanding.send_modify(|n| *n += 1);
                        let settle = RabbitSettle::new(
                            self.bus.inner.clone(),
                            self.plugin.clone(),
                            d.acker,
                            self.outstanding.clone(),
                        );
                        if self.tx.send(Delivery { delivered, settle: Box::new(settle) }).is_err() {
                            let _ = channel.close(200, "stopped".into()).await;
                            return Ended::Closed;
                        }
                    }
                    Some(Err(e)) => return Ended::Failed(e.to_string()),
                    None => {
                        return if session.live() && channel.status().connected() {
                            Ended::Cancelled
                        } else {
                            Ended::Failed("channel closed".into())
                        };
                    }
                },
                changed = self.prefetch.changed() => {
                    if changed.is_ok() {
                        let prefetch = *self.prefetch.borrow_and_update();
                        if let Err(e) = channel.basic_qos(prefetch, BasicQosOptions::default()).await {
                            return Ended::Failed(e.to_string());
                        }
                    }
                }
                changed = self.mode.changed() => {
                    let mode = if changed.is_ok() { *self.mode.borrow_and_update() } else { ConsumerMode::Close };
                    match mode {
                        ConsumerMode::Run => {}
                        ConsumerMode::Cancel => {
                            let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
                            cancelled = true;
                        }
                        ConsumerMode::Close => {
                            let _ = channel.close(200, "consumer stopped".into()).await;
                            return Ended::Closed;
                        }
                    }
                }
            }
        }
    }
}
