//! Settling one delivery: the one path by which a delivery ends.
//!
//! - Handled: publish the outputs (confirmed), then ack. Outputs the broker
//!   refuses (a nack), cannot route under `unroutable = "dead-letter"` or
//!   cannot take hand the delivery back to the dispatcher, which fails the
//!   event (retry with backoff through a tier, or dead letter). Outputs not
//!   confirmed in time (a resource alarm, a lost connection) requeue the
//!   input after a pause instead: the broker is the trouble, not the event.
//! - Retry and dead letter are done by the router, not by a nack to a DLX
//!   (which cannot add headers): it publishes a copy with its headers (attempt,
//!   error, first failure, plugin version, origin) to the retry tier or the
//!   DLQ, waits for the confirm, then acks the original.
//! - A settlement that cannot be carried out never leaves the delivery held: a
//!   dead-letter copy nobody takes (the DLQ deleted, or refusing under a
//!   max-length policy) goes through the longest retry tier instead and comes
//!   back later; failing that, and for a retry copy that fails, the delivery is
//!   requeued after a pause. A copy no queue took also makes the router declare
//!   its topology again, which puts a deleted queue back.
//!
//! The work runs on the bus's I/O thread; the worker that handed it over has
//! moved on, and hears what became of it through the callback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::watch;

use super::publish::{Returns, publish_confirmed, record_published};
use super::{Inner, Names, amqp, delays, session};
use crate::bus::{
    BusError, Delayed, Delivered, Delivery, FailureInfo, OnSettled, Outgoing, Settle, Settled,
    Settlement,
};
use crate::config::Unroutable;

/// How long a delivery whose settlement failed is held before it is requeued:
/// long enough not to spin on a broker that refuses, short against the
/// consumer timeout.
const GIVE_BACK_PAUSE: Duration = Duration::from_secs(1);

/// Settles one RabbitMQ delivery. Dropped unsettled (a worker gave up on it),
/// it requeues the delivery rather than hold it.
pub(super) struct RabbitSettle {
    inner: Arc<Inner>,
    plugin: String,
    acker: Option<lapin::Acker>,
    outstanding: Arc<watch::Sender<u64>>,
}

impl RabbitSettle {
    pub(super) fn new(
        inner: Arc<Inner>,
        plugin: String,
        acker: lapin::Acker,
        outstanding: Arc<watch::Sender<u64>>,
    ) -> Self {
        Self {
            inner,
            plugin,
            acker: Some(acker),
            outstanding,
        }
    }

    /// The plugin's retry tier nearest to `delay` (`None`: the longest).
    fn tier(&self, delay: Option<Duration>) -> Option<Duration> {
        // A plugin removed from the configuration keeps its tiers (bound)
        // while it drains: its failures still wait there.
        let delays = self.inner.retry_delays(&self.plugin)?;
        match delay {
            Some(delay) => delays
                .iter()
                .min_by_key(|d| d.as_millis().abs_diff(delay.as_millis()))
                .copied(),
            None => delays.iter().max().copied(),
        }
    }

    async fn ack(&mut self) -> Result<(), String> {
        let acker = self.acker.take().ok_or("already settled")?;
        match tokio::time::timeout(
            self.inner.settings.timeout,
            acker.ack(BasicAckOptions::default()),
        )
        .await
        {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(
                "the channel the delivery came on is closed; the broker delivers it again".into(),
            ),
            Ok(Err(e)) => Err(format!("ack failed: {e}")),
            Err(_) => Err("ack timed out".into()),
        }
    }

    /// Requeues the delivery after a pause; reports why it came to that.
    async fn give_back(mut self: Box<Self>, why: String, then: OnSettled) {
        tracing::warn!(plugin = %self.plugin, reason = %why, "settlement failed; the delivery goes back to its queue");
        tokio::time::sleep(GIVE_BACK_PAUSE).await;
        let Some(acker) = self.acker.take() else {
            return then(Settled::Lost(why));
        };
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        match tokio::time::timeout(self.inner.settings.timeout, acker.nack(requeue)).await {
            Ok(Ok(true)) => then(Settled::Returned(why)),
            _ => then(Settled::Lost(why)),
        }
    }

    /// Publishes a copy of the delivery; `Err` says why no queue has it.
    async fn copy(&self, copy: Outgoing) -> Result<(), String> {
        let deadline = Instant::now() + self.inner.settings.timeout;
        let (exchange, key) = (copy.exchange.clone(), copy.routing_key.clone());
        let one = std::slice::from_ref(&copy);
        let routed = publish_confirmed(&self.inner, one, deadline, Returns::Decide)
            .await
            .map_err(|e| e.to_string())?;
        if routed.first() == Some(&true) {
            return Ok(());
        }
        session::redeclare(&self.inner, "a retry or dead-letter queue was missing");
        Err(format!(
            "no queue took the copy sent to {exchange:?} with key {key:?}"
        ))
    }

    async fn carry_out(
        mut self: Box<Self>,
        delivered: Delivered,
        settlement: Settlement,
        then: OnSettled,
    ) {
        let names = &self.inner.names;
        let limit = self.inner.header_limit();
        match settlement {
            Settlement::Handled {
                outputs,
                delayed,
                timeout,
            } => {
                let published = self.publish_outputs(outputs, delayed, timeout).await;
                if let Err(BusError::Unavailable(why)) = published {
                    // Not confirmed in time (an alarm, a lost connection): the
                    // broker is the trouble, not the event. A retry copy would
                    // wait just the same and arrive beside the outputs later:
                    // the input goes back, its attempts untouched.
                    return self
                        .give_back(format!("outputs not confirmed: {why}"), then)
                        .await;
                }
                if let Err(error) = published {
                    let delivery = Box::new(Delivery {
                        delivered,
                        settle: self,
                    });
                    return then(Settled::Refused { delivery, error });
                }
                match self.ack().await {
                    Ok(()) => then(Settled::Done),
                    Err(why) => then(Settled::Lost(why)),
                }
            }
            Settlement::Retry { delay, failure } => {
                let Some(tier) = self.tier(Some(delay)) else {
                    let why = format!("plugin {:?} has no retry tier", self.plugin);
                    return self.give_back(why, then).await;
                };
                let copy = Outgoing {
                    exchange: names.retry_exchange(),
                    routing_key: Names::retry_key(&self.plugin, tier),
                    message: amqp::moved(&delivered, &failure, Some(failure.attempts + 1), limit),
                };
                match self.copy(copy).await {
                    Ok(()) => match self.ack().await {
                        Ok(()) => then(Settled::Done),
                        Err(why) => then(Settled::Lost(why)),
                    },
                    Err(why) => {
                        self.give_back(format!("retry copy failed: {why}"), then)
                            .await
                    }
                }
            }
            Settlement::DeadLetter { failure } => {
                let copy = Outgoing {
                    exchange: names.dlx(),
                    routing_key: self.plugin.clone(),
                    message: amqp::moved(&delivered, &failure, None, limit),
                };
                let refused = match self.copy(copy).await {
                    Ok(()) => {
                        return match self.ack().await {
                            Ok(()) => then(Settled::Done),
                            Err(why) => then(Settled::Lost(why)),
                        };
                    }
                    Err(why) => format!("the dead-letter queue did not take it: {why}"),
                };
                self.wait_in_a_tier(delivered, failure, refused, then).await;
            }
        }
    }

    /// A dead letter the DLQ did not take waits in the longest retry tier and
    /// comes back on the same attempt (its failure is decided again then),
    /// leaving room in the plugin's queue for the events behind it.
    async fn wait_in_a_tier(
        mut self: Box<Self>,
        delivered: Delivered,
        failure: FailureInfo,
        refused: String,
        then: OnSettled,
    ) {
        let Some(tier) = self.tier(None) else {
            return self.give_back(refused, then).await;
        };
        let limit = self.inner.header_limit();
        let copy = Outgoing {
            exchange: self.inner.names.retry_exchange(),
            routing_key: Names::retry_key(&self.plugin, tier),
            message: amqp::moved(&delivered, &failure, Some(delivered.attempt), limit),
        };
        match self.copy(copy).await {
            Ok(()) => match self.ack().await {
                Ok(()) => {
                    tracing::warn!(plugin = %self.plugin, reason = %refused, retry_in = ?tier, "dead letter not kept; it comes back from the retry tier");
                    then(Settled::Returned(refused));
                }
                Err(why) => then(Settled::Lost(why)),
            },
            Err(why) => self.give_back(format!("{refused}; {why}"), then).await,
        }
    }

    /// Publishes a handled event's outputs; `Err` fails the event.
    async fn publish_outputs(
        &self,
        outputs: Vec<Outgoing>,
        delayed: Vec<Delayed>,
        timeout: Duration,
    ) -> Result<(), BusError> {
        if outputs.is_empty() && delayed.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        {
            let exchanges = inner
                .exchanges
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let all = outputs.iter().chain(delayed.iter().map(|d| &d.output));
            if let Some(out) = all.into_iter().find(|o| !exchanges.contains(&o.exchange)) {
                return Err(BusError::NoSuchExchange(out.exchange.clone()));
            }
        }
        let deadline = Instant::now() + timeout.min(inner.settings.timeout);
        if !delayed.is_empty() {
            // On the delay ladder, confirmed, before the input is acked.
            delays::schedule(inner, delayed, deadline).await?;
        }
        if outputs.is_empty() {
            return Ok(());
        }
        let returns = match inner.settings.unroutable {
            Unroutable::DeadLetter => Returns::Decide,
            Unroutable::Drop => Returns::Count,
        };
        let routed = publish_confirmed(inner, &outputs, deadline, returns).await?;
        match (
            record_published(inner, outputs, &routed),
            inner.settings.unroutable,
        ) {
            (Some((exchange, routing_key)), Unroutable::DeadLetter) => Err(BusError::Unroutable {
                exchange,
                routing_key,
            }),
            _ => Ok(()),
        }
    }
}

impl Settle for RabbitSettle {
    fn is_live(&self) -> bool {
        self.acker.as_ref().is_some_and(lapin::Acker::usable)
    }

    fn settle(self: Box<Self>, delivered: Delivered, settlement: Settlement, then: OnSettled) {
        let handle = self.inner.handle.clone();
        handle.spawn(self.carry_out(delivered, settlement, then));
    }
}

impl Drop for RabbitSettle {
    fn drop(&mut self) {
        self.outstanding.send_modify(|n| *n = n.saturating_sub(1));
        if let Some(acker) = self.acker.take() {
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            self.inner.handle.spawn(async move {
                let _ = acker.nack(requeue).await;
            });
        }
    }
}
