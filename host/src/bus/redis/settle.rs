//! Settling one delivery: the one path by which it ends, each in one `MULTI`
//! with the ack, so that the ack never happens without what it stands for:
//!
//! - Handled: delayed outputs into the delay set, outputs `XADD`ed to their
//!   exchanges' streams, the input `XACK`ed. An output to an undeclared
//!   exchange, too large, or (with `unroutable = "dead-letter"`) unroutable
//!   hands the delivery back to the dispatcher (`Settled::Refused`), which
//!   fails the event.
//! - Retry: a copy with the router's headers (attempt, error, first failure,
//!   origin: the same as on RabbitMQ) into the plugin's retry set, due after
//!   the delay; the mover puts it in the plugin's stream then.
//! - Dead letter: the copy into the plugin's dead-letter stream.
//!
//! A `MULTI` that fails (Redis unreachable) leaves the entry pending: it is
//! claimed again after `claim_idle` (`Settled::Returned`). Settling runs on the
//! worker's thread: one round trip.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redis::Value;

use super::consume::ConsumerState;
use super::{Inner, entry};
use crate::bus::rabbit::amqp;
use crate::bus::{
    BusError, Delayed, Delivered, Delivery, FailureInfo, OnSettled, Outgoing, Settle, Settled,
    Settlement,
};

/// Bytes the router's headers may take on a moved copy: Redis has no frame
/// limit, so only the reason is cut (to `MAX_REASON`).
const HEADER_LIMIT: usize = entry::MAX_ENTRY;

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Adds to `pipe` the `XADD` of `delivered` into `plugin`'s dead-letter
/// stream, trimmed by `[broker] dlq_max_length` and `dlq_ttl`.
pub(super) fn add_dead_letter(
    inner: &Inner,
    pipe: &mut redis::Pipeline,
    plugin: &str,
    delivered: &Delivered,
    failure: &FailureInfo,
) {
    let key = inner.keys.dlq(plugin);
    let message = amqp::moved(delivered, failure, None, HEADER_LIMIT);
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&key);
    if let Some(max) = inner.settings.dlq.max_length {
        cmd.arg("MAXLEN").arg("~").arg(max);
    }
    cmd.arg("*");
    for (k, v) in entry::fields(Some(&delivered.exchange), &delivered.routing_key, &message) {
        cmd.arg(k).arg(v);
    }
    pipe.add_command(cmd).ignore();
    if let Some(ttl) = inner.settings.dlq.ttl {
        let oldest = now_ms().saturating_sub(u64::try_from(ttl.as_millis()).unwrap_or(0));
        pipe.cmd("XTRIM")
            .arg(&key)
            .arg("MINID")
            .arg("~")
            .arg(format!("{oldest}-0"))
            .ignore();
    }
}

/// Settles one Redis delivery. Dropped unsettled (a worker gave up on it), it
/// stays pending and is claimed again after `claim_idle`.
pub(super) struct RedisSettle {
    inner: Arc<Inner>,
    plugin: String,
    stream: String,
    id: String,
    state: Arc<ConsumerState>,
    released: bool,
}

impl RedisSettle {
    pub(super) fn new(
        inner: Arc<Inner>,
        plugin: String,
        stream: String,
        id: String,
        state: Arc<ConsumerState>,
    ) -> Self {
        Self {
            inner,
            plugin,
            stream,
            id,
            state,
            released: false,
        }
    }

    fn release(&mut self) {
        if !self.released {
            self.released = true;
            self.state.release(&self.stream, &self.id);
        }
    }

    fn ack(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("XACK")
            .arg(&self.stream)
            .arg(&self.plugin)
            .arg(&self.id)
            .ignore();
    }

    /// Runs `pipe` (a `MULTI` ending in the ack); reports the outcome.
    fn commit(&mut self, pipe: &redis::Pipeline, then: OnSettled) -> bool {
        let result = self
            .inner
            .link
            .run(|con| pipe.query::<Value>(con).map(drop));
        match result {
            Ok(()) => {
                self.inner.record(Ok(()));
                self.release();
                then(Settled::Done);
                true
            }
            Err(e) => {
                let why = e.to_string();
                if let BusError::Unavailable(w) = &e {
                    self.inner.record(Err(w));
                }
                tracing::warn!(plugin = %self.plugin, id = %self.id, reason = %why,
                    "settlement failed; the entry stays pending and is claimed again");
                self.release();
                then(Settled::Returned(format!(
                    "{why}; the entry is delivered again after claim_idle ({:?})",
                    self.inner.settings.claim_idle
                )));
                false
            }
        }
    }

    /// A sorted-set member for `delivered`, moved back to the plugin's
    /// stream when due, as attempt `failure.attempts + 1`.
    fn retry_member(&self, delivered: &Delivered, failure: &FailureInfo) -> Vec<u8> {
        let message = amqp::moved(delivered, failure, Some(failure.attempts + 1), HEADER_LIMIT);
        let fields = entry::fields(Some(&delivered.exchange), &delivered.routing_key, &message);
        let uid = format!("r/{}/{}/{}", self.stream, self.id, failure.attempts);
        entry::pack(&uid, &self.inner.keys.queue(&self.plugin), &fields)
    }

    fn delayed_members(&self, delayed: &[Delayed]) -> Vec<(u64, Vec<u8>)> {
        let now = now_ms();
        delayed
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let due = now.saturating_add(u64::try_from(d.after.as_millis()).unwrap_or(0));
                let fields = entry::fields(None, &d.output.routing_key, &d.output.message);
                let uid = format!("d/{}/{}/{i}", self.stream, self.id);
                let target = self.inner.keys.exchange(&d.output.exchange);
                (due, entry::pack(&uid, &target, &fields))
            })
            .collect()
    }

    fn carry_out(
        mut self: Box<Self>,
        delivered: Delivered,
        settlement: Settlement,
        then: OnSettled,
    ) {
        let mut pipe = redis::pipe();
        pipe.atomic();
        match settlement {
            Settlement::Handled {
                outputs, delayed, ..
            } => {
                let all: Vec<&Outgoing> = outputs
                    .iter()
                    .chain(delayed.iter().map(|d| &d.output))
                    .collect();
                if let Err(error) = self.inner.check(&all) {
                    let delivery = Box::new(Delivery {
                        delivered,
                        settle: self,
                    });
                    return then(Settled::Refused { delivery, error });
                }
                for (due, member) in self.delayed_members(&delayed) {
                    pipe.cmd("ZADD")
                        .arg(self.inner.keys.delayed())
                        .arg(due)
                        .arg(member)
                        .ignore();
                }
                self.inner.add_outputs(&mut pipe, &outputs);
                self.ack(&mut pipe);
                let inner = self.inner.clone();
                if self.commit(&pipe, then) {
                    inner.record_published(outputs);
                }
            }
            Settlement::Retry { delay, failure } => {
                let due = now_ms().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(0));
                pipe.cmd("ZADD")
                    .arg(self.inner.keys.retries(&self.plugin))
                    .arg(due)
                    .arg(self.retry_member(&delivered, &failure))
                    .ignore();
                self.ack(&mut pipe);
                self.commit(&pipe, then);
            }
            Settlement::DeadLetter { failure } => {
                add_dead_letter(&self.inner, &mut pipe, &self.plugin, &delivered, &failure);
                self.ack(&mut pipe);
                self.commit(&pipe, then);
            }
        }
    }
}

impl Settle for RedisSettle {
    fn settle(self: Box<Self>, delivered: Delivered, settlement: Settlement, then: OnSettled) {
        self.carry_out(delivered, settlement, then);
    }
}

impl Drop for RedisSettle {
    fn drop(&mut self) {
        self.release();
    }
}
