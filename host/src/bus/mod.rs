//! Buses: where messages come from, where outputs go, and how a delivery is
//! settled. The dispatcher only knows this seam; the embedded bus and RabbitMQ
//! both implement it with the same semantics:
//!
//! - Every plugin has its own queue, bound to (exchange, pattern) pairs.
//! - A [`Delivery`] is one message in one plugin's queue. It is settled exactly
//!   once: [`Settlement::Ack`] (handled), [`Settlement::Retry`] (deliver again to
//!   the same plugin after a delay, attempt + 1) or [`Settlement::DeadLetter`] (kept
//!   in the plugin's dead-letter queue with the reason).
//! - [`Bus::publish`] is all-or-nothing and returns once every message is
//!   confirmed; only then does the dispatcher ack the input.
//!
//! Deliveries reach the plugin's worker threads through a channel
//! ([`crossbeam_channel::Receiver`]); workers call the bus from their own
//! threads, so every method here is blocking and bounds its own time.

pub mod embedded;
mod message;
pub mod rabbit;

use std::time::Duration;

pub use message::Message;

use crate::route::{Binding, ExchangeKind};

/// A message as stream watchers see it.
#[derive(Debug, Clone)]
pub struct Published {
    pub exchange: String,
    pub routing_key: String,
    pub message: Message,
}

/// A dead-lettered message and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub delivered: Delivered,
    pub failure: FailureInfo,
    /// When it was dead-lettered, RFC 3339.
    pub at: String,
}

impl DeadLetter {
    /// The dead letter as the admin API and `switchboard dlq list` show it;
    /// a body that is not JSON is shown as base64.
    pub fn to_json(&self) -> serde_json::Value {
        use base64::Engine as _;
        let body = &self.delivered.message.body;
        let message = serde_json::from_slice::<serde_json::Value>(body).unwrap_or_else(|_| {
            serde_json::json!({"body_base64": base64::engine::general_purpose::STANDARD.encode(body)})
        });
        serde_json::json!({
            "exchange": self.delivered.exchange,
            "routing_key": self.delivered.routing_key,
            "kind": self.failure.kind,
            "reason": self.failure.reason,
            "attempts": self.failure.attempts,
            "plugin_version": self.failure.plugin_version,
            "first_failure": self.failure.first_failure,
            "dead_lettered_at": self.at,
            "message": message,
        })
    }
}

/// An exchange to declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: ExchangeKind,
    /// Survives a broker restart (RabbitMQ).
    pub durable: bool,
}

/// A plugin queue to declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// The plugin that consumes it.
    pub plugin: String,
    /// Most messages waiting (embedded bus); the broker's own limits otherwise.
    pub capacity: usize,
    /// Unacknowledged deliveries one consumer may hold (RabbitMQ `basic.qos`).
    pub prefetch: u16,
    /// One consumer at a time across replicas (RabbitMQ single active consumer).
    pub ordered: bool,
    /// Distinct retry delays (RabbitMQ: one TTL queue each).
    pub retry_delays: Vec<Duration>,
}

/// Everything a bus must have declared: the desired state, applied idempotently.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    pub exchanges: Vec<ExchangeSpec>,
    pub queues: Vec<QueueSpec>,
    pub bindings: Vec<Binding>,
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub message: Message,
}

/// Why a message went to a dead-letter queue; also what the retry path carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureInfo {
    /// Failure kind: `retry`, `reject`, `timeout`, …, `undecodable`, `loop`.
    pub kind: String,
    /// What happened, in one sentence.
    pub reason: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// Version (content hash) of the plugin that failed.
    pub plugin_version: String,
    /// When the first attempt failed, RFC 3339.
    pub first_failure: String,
}

/// How a delivery ends (or continues).
#[derive(Debug, Clone)]
pub enum Settlement {
    /// Handled; forget it.
    Ack,
    /// Deliver it again to the same plugin after `delay`, as attempt + 1.
    Retry {
        delay: Duration,
        failure: FailureInfo,
    },
    /// Keep it in the plugin's dead-letter queue.
    DeadLetter { failure: FailureInfo },
}

/// The bus-specific part of a delivery: how to settle it.
pub trait Settle: Send {
    /// Settles the delivery. An error means the bus could not record the
    /// outcome; the bus then redelivers the message (at-least-once).
    fn settle(
        self: Box<Self>,
        delivered: Delivered,
        settlement: Settlement,
    ) -> Result<(), BusError>;

    /// Whether settling can still succeed. False when the delivery came on a
    /// broker channel that has since closed: the broker has already put the
    /// message back, so running the plugin on it would only make duplicates.
    fn is_live(&self) -> bool {
        true
    }

    /// The concrete settle handle, for the bus that made it.
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send>;
}

/// What was delivered: one message in one plugin's queue.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub exchange: String,
    pub routing_key: String,
    pub message: Message,
    /// 1 on first delivery to this plugin.
    pub attempt: u32,
    /// When the first attempt failed, if one did.
    pub first_failure: Option<String>,
}

/// A delivery: the message, and how to settle it.
pub struct Delivery {
    pub delivered: Delivered,
    pub settle: Box<dyn Settle>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Whether settling can still succeed (see [`Settle::is_live`]).
    pub fn is_live(&self) -> bool {
        self.settle.is_live()
    }

    /// Settles this delivery (consumes it: a delivery is settled once).
    pub fn finish(self, settlement: Settlement) -> Result<(), BusError> {
        self.settle.settle(self.delivered, settlement)
    }
}

/// What a bus can fail at.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BusError {
    #[error("queue of plugin {plugin:?} is full")]
    Full { plugin: String },
    #[error("exchange {0:?} is not declared")]
    NoSuchExchange(String),
    #[error("no queue for plugin {0:?}")]
    NoSuchQueue(String),
    #[error("bus is shutting down")]
    Closed,
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The broker refused a declaration (the message says what to do).
    #[error("{0}")]
    Topology(String),
    /// A message the broker cannot take (say, headers larger than one AMQP
    /// frame): publishing it again would not help.
    #[error("{0}")]
    TooLarge(String),
    /// No queue is bound for a message and the policy says that is a failure.
    #[error("no queue is bound to exchange {exchange:?} for routing key {routing_key:?}")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
}

/// A message bus as the dispatcher sees it.
pub trait Bus: Send + Sync + 'static {
    /// Declares what `topology` names and removes bindings it no longer names.
    /// Queues of removed plugins are kept until [`Bus::delete_queue`].
    fn apply(&self, topology: &Topology) -> Result<(), BusError>;

    /// Deliveries of `plugin`'s queue. Every clone of the receiver is a
    /// competing consumer; the channel closes when the queue is deleted or the
    /// bus shuts down.
    fn consume(&self, plugin: &str) -> Result<crossbeam_channel::Receiver<Delivery>, BusError>;

    /// Publishes every message or none, waiting at most `timeout` for room or
    /// confirms. Messages no binding matches are dropped (as AMQP does) and
    /// counted; they still reach stream watchers.
    fn publish(&self, batch: Vec<Outgoing>, timeout: Duration) -> Result<(), BusError>;

    /// Whether an exchange is declared.
    fn has_exchange(&self, name: &str) -> bool;

    /// Deletes a plugin's queue; refused while it holds messages unless `force`.
    fn delete_queue(&self, plugin: &str, force: bool) -> Result<(), BusError>;

    /// No worker consumes `plugin`'s queue any more: stop delivering to this
    /// process. Deliveries handed out but not settled go back to the queue.
    fn stop_consuming(&self, _plugin: &str) {}

    /// Whether [`Bus::publish_then_ack`] pipelines: the worker hands the
    /// outputs over and moves on while their confirms arrive.
    fn pipelines(&self) -> bool {
        false
    }

    /// Publishes `batch`, then acks `delivery` once every message is confirmed,
    /// after this returns; if the confirms never come, the delivery goes back
    /// to its queue as it was (at-least-once). `Err` hands the delivery back,
    /// nothing published, for the caller to fail it. Only for buses that
    /// [`Bus::pipelines`].
    fn publish_then_ack(
        &self,
        batch: Vec<Outgoing>,
        delivery: Delivery,
        timeout: Duration,
    ) -> Result<(), Box<(Delivery, BusError)>> {
        let _ = (batch, timeout);
        Err(Box::new((
            delivery,
            BusError::Unavailable("this bus does not pipeline publishes".into()),
        )))
    }
}
