//! Buses: where messages come from, where outputs go, and how a delivery is
//! settled. The dispatcher only knows this seam; the embedded bus and RabbitMQ
//! both implement it with the same semantics:
//!
//! - Every plugin has its own queue, bound to (exchange, pattern) pairs.
//! - A [`Delivery`] is one message in one plugin's queue. The worker hands the
//!   bus one [`Settlement`] for it: [`Settlement::Handled`] (publish the outputs,
//!   then ack), [`Settlement::Retry`] (deliver again to the same plugin after a
//!   delay) or [`Settlement::DeadLetter`] (keep it in the plugin's dead-letter
//!   queue with the reason). The bus acks only after every copy it published is
//!   confirmed, and reports once what became of it ([`Settled`]); counters move
//!   then, not before. A settlement that fails never leaves the delivery held.
//! - [`Bus::publish`] (ingress) is all-or-nothing and returns once every message
//!   is confirmed.
//!
//! Deliveries reach the plugin's worker threads through a channel
//! ([`crossbeam_channel::Receiver`]). The [`Bus`] methods block and bound their
//! own time; settling does not block the worker on a broker (RabbitMQ carries
//! it out on its I/O thread while the worker takes the next delivery).

pub mod embedded;
mod message;
pub mod rabbit;
pub mod redis;
pub mod timers;

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
    /// What names this letter when an operator picks letters to redrive:
    /// the id of the event it carries ([`Delivered::event_id`]).
    pub fn id(&self) -> String {
        self.delivered.event_id()
    }

    /// The dead letter as the admin API and `switchboard dlq list` show it;
    /// a body that is not JSON is shown as base64.
    pub fn to_json(&self) -> serde_json::Value {
        use base64::Engine as _;
        let body = &self.delivered.message.body;
        let message = serde_json::from_slice::<serde_json::Value>(body).unwrap_or_else(|_| {
            serde_json::json!({"body_base64": base64::engine::general_purpose::STANDARD.encode(body)})
        });
        serde_json::json!({
            "id": self.id(),
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

/// An output to publish `after` a delay (`Output::after`): kept by the bus (the
/// embedded bus's timer store, RabbitMQ's delay queues) before the input is
/// acked, like any output, and published when due.
#[derive(Debug, Clone)]
pub struct Delayed {
    pub after: Duration,
    pub output: Outgoing,
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

/// How a delivery ends (or continues): what a worker hands the bus, once per
/// delivery. The bus carries it out and then reports what became of it
/// ([`Settled`]); nothing is acknowledged before every copy it published for the
/// settlement is confirmed.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// Handled: keep the `delayed` outputs for later, publish `outputs` (all
    /// or nothing, confirmed, waiting at most `timeout` for room or confirms),
    /// then ack.
    Handled {
        outputs: Vec<Outgoing>,
        delayed: Vec<Delayed>,
        timeout: Duration,
    },
    /// Deliver it again to the same plugin after `delay`, as attempt
    /// `failure.attempts + 1`.
    Retry {
        delay: Duration,
        failure: FailureInfo,
    },
    /// Keep it in the plugin's dead-letter queue.
    DeadLetter { failure: FailureInfo },
}

/// What became of a settlement, reported once, after the bus is done with it.
pub enum Settled {
    /// Carried out as asked: every copy confirmed, then the delivery acked.
    Done,
    /// The outputs of a [`Settlement::Handled`] could not be published; nothing
    /// was acked. The delivery comes back for the dispatcher to fail it (retry
    /// with backoff, or dead-letter), as any failure of the event.
    Refused {
        delivery: Box<Delivery>,
        error: BusError,
    },
    /// The settlement could not be carried out, so the delivery went back to
    /// the broker (through a retry tier, or requeued after a pause): it will be
    /// delivered again. Says why.
    Returned(String),
    /// The broker had already taken the delivery back (its channel closed): it
    /// will be delivered again, and outputs already published may repeat (with
    /// the same ids).
    Lost(String),
}

impl std::fmt::Debug for Settled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Done => f.write_str("Done"),
            Self::Refused { error, .. } => write!(f, "Refused({error})"),
            Self::Returned(why) => write!(f, "Returned({why})"),
            Self::Lost(why) => write!(f, "Lost({why})"),
        }
    }
}

/// Called once with what became of a settlement, from whichever thread the bus
/// finished it on (a worker's for the embedded bus, the broker I/O thread for
/// RabbitMQ): it must not block.
pub type OnSettled = Box<dyn FnOnce(Settled) + Send>;

/// The bus-specific part of a delivery: how to settle it.
pub trait Settle: Send {
    /// Carries out `settlement` for the delivery, then calls `then` once with
    /// what became of it. Never leaves the delivery held: whatever fails, the
    /// message is either settled as asked or given back to the broker.
    fn settle(self: Box<Self>, delivered: Delivered, settlement: Settlement, then: OnSettled);

    /// Whether settling can still succeed. False when the delivery came on a
    /// broker channel that has since closed: the broker has already put the
    /// message back, so running the plugin on it would only make duplicates.
    fn is_live(&self) -> bool {
        true
    }
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

impl Delivered {
    /// The id of the event this message carries, as the router decodes it
    /// (the envelope's id, else the message id, else the id derived from its
    /// content): the id the stream, the logs and the dead letters show.
    pub fn event_id(&self) -> String {
        match crate::envelope::decode(&self.exchange, &self.routing_key, &self.message, 1) {
            Ok(event) => event.id,
            Err(_) => match self
                .message
                .message_id
                .as_deref()
                .filter(|id| !id.is_empty())
            {
                Some(id) => id.to_string(),
                None => {
                    crate::envelope::derived_id(&self.exchange, &self.routing_key, &self.message)
                }
            },
        }
    }
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

    /// Settles this delivery (consumes it: a delivery is settled once) and
    /// reports the result to `then`.
    pub fn finish(self, settlement: Settlement, then: OnSettled) {
        self.settle.settle(self.delivered, settlement, then);
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
    /// The broker refused a message (a negative confirm: say, a queue at its
    /// `max-length` with `reject-publish`).
    #[error("{0}")]
    Refused(String),
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

    /// Deletes a removed plugin's queue. Retries still waiting for it go to
    /// its dead-letter queue (kind `plugin_removed`), and so, with `force`, do
    /// messages still in the queue; without `force` a queue holding messages
    /// is refused and kept. A dead-letter queue holding letters is kept.
    fn delete_queue(&self, plugin: &str, force: bool) -> Result<(), BusError>;

    /// No worker consumes `plugin`'s queue any more: stop delivering to this
    /// process. Deliveries handed out but not settled go back to the queue.
    fn stop_consuming(&self, _plugin: &str) {}
}
