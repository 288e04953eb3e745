//! Where events travel: the embedded bus or RabbitMQ, and what the appliance
//! asks of either beyond the dispatcher's [`Bus`] seam.

use std::sync::Arc;

use crate::bus::embedded::EmbeddedBus;
use crate::bus::rabbit::RabbitBus;
use crate::bus::redis::RedisBus;
use crate::bus::{Bus, BusError, DeadLetter, Delivered, Published};

/// Where events travel: the in-process bus, RabbitMQ when `[broker] url`
/// (or `RABBITMQ_URL`) names one, or Redis Streams with `[broker] kind =
/// "redis-streams"`.
#[derive(Debug, Clone)]
pub enum Transport {
    Embedded(EmbeddedBus),
    Rabbit(RabbitBus),
    Redis(RedisBus),
}

impl Transport {
    /// The bus as the dispatcher sees it.
    pub fn bus(&self) -> Arc<dyn Bus> {
        match self {
            Self::Embedded(b) => Arc::new(b.clone()),
            Self::Rabbit(b) => Arc::new(b.clone()),
            Self::Redis(b) => Arc::new(b.clone()),
        }
    }

    pub(super) fn as_bus(&self) -> &dyn Bus {
        match self {
            Self::Embedded(b) => b,
            Self::Rabbit(b) => b,
            Self::Redis(b) => b,
        }
    }

    /// The embedded bus, if that is the transport.
    pub fn embedded(&self) -> Option<&EmbeddedBus> {
        match self {
            Self::Embedded(b) => Some(b),
            Self::Rabbit(_) | Self::Redis(_) => None,
        }
    }

    /// The RabbitMQ bus, if that is the transport.
    pub fn rabbit(&self) -> Option<&RabbitBus> {
        match self {
            Self::Rabbit(b) => Some(b),
            Self::Embedded(_) | Self::Redis(_) => None,
        }
    }

    /// The Redis Streams bus, if that is the transport.
    pub fn redis(&self) -> Option<&RedisBus> {
        match self {
            Self::Redis(b) => Some(b),
            Self::Embedded(_) | Self::Rabbit(_) => None,
        }
    }

    /// Every message this process publishes (outputs and ingress).
    pub fn subscribe_stream(&self) -> tokio::sync::broadcast::Receiver<Arc<Published>> {
        match self {
            Self::Embedded(b) => b.subscribe_stream(),
            Self::Rabbit(b) => b.subscribe_stream(),
            Self::Redis(b) => b.subscribe_stream(),
        }
    }

    /// Published messages no queue was bound for.
    pub fn unroutable(&self) -> u64 {
        match self {
            Self::Embedded(b) => b.unroutable(),
            Self::Rabbit(b) => b.unroutable(),
            Self::Redis(b) => b.unroutable(),
        }
    }

    /// Up to `limit` dead letters of `plugin`, oldest first.
    pub fn dead_letters(&self, plugin: &str, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        match self {
            Self::Embedded(b) => Ok(b.dead_letters(plugin).into_iter().take(limit).collect()),
            Self::Rabbit(b) => b.dead_letters(plugin, limit),
            Self::Redis(b) => b.dead_letters(plugin, limit),
        }
    }

    /// Puts `messages` in `plugin`'s queue again as first attempts (a
    /// replay); how many it took (the embedded bus stops at a full queue).
    pub fn deliver(&self, plugin: &str, messages: Vec<Delivered>) -> Result<usize, BusError> {
        match self {
            Self::Embedded(b) => b.deliver(plugin, messages),
            Self::Rabbit(b) => b.deliver(plugin, messages),
            Self::Redis(b) => b.deliver(plugin, messages),
        }
    }

    /// Moves up to `limit` dead letters of `plugin` back to its queue.
    pub fn redrive(&self, plugin: &str, limit: usize) -> Result<usize, BusError> {
        match self {
            Self::Embedded(b) => b.redrive(plugin, limit),
            Self::Rabbit(b) => b.redrive(plugin, limit),
            Self::Redis(b) => b.redrive(plugin, limit),
        }
    }

    /// Moves the dead letters of `plugin` whose id is one of `ids` back to
    /// its queue; the others stay. Returns the ids of the letters moved, one
    /// per letter.
    pub fn redrive_ids(
        &self,
        plugin: &str,
        ids: &std::collections::BTreeSet<String>,
    ) -> Result<Vec<String>, BusError> {
        match self {
            Self::Embedded(b) => b.redrive_ids(plugin, ids),
            Self::Rabbit(b) => b.redrive_ids(plugin, ids),
            Self::Redis(b) => b.redrive_ids(plugin, ids),
        }
    }

    /// Whether the transport can take events: always for the embedded bus;
    /// connected with the topology declared for RabbitMQ.
    pub fn is_ready(&self) -> bool {
        match self {
            Self::Embedded(_) => true,
            Self::Rabbit(b) => b.is_ready(),
            Self::Redis(b) => b.is_ready(),
        }
    }

    /// Whether `plugin`'s queue still holds or hands out messages.
    pub(super) fn queue_busy(&self, plugin: &str) -> bool {
        match self {
            Self::Embedded(b) => b
                .stats()
                .get(plugin)
                .is_some_and(|q| q.depth > 0 || q.in_flight > 0),
            Self::Rabbit(b) => b
                .queue_stats(plugin)
                .is_ok_and(|q| q.messages > 0 || q.in_flight > 0),
            Self::Redis(b) => b
                .queue_stats(plugin)
                .is_ok_and(|q| q.messages > 0 || q.in_flight > 0),
        }
    }
}
