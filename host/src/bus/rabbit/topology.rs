//! Declaring the configured topology on the broker, idempotently: exchanges,
//! each plugin's queue, retry tiers and dead-letter queue, and the routes'
//! bindings. The topology always comes from the configuration, never from what
//! has loaded: a plugin whose `.wasm` is missing or broken keeps its queue and
//! bindings, and its events wait. What an earlier configuration bound and this
//! one does not is unbound (only that, never a route still configured); retry
//! tiers no longer used are deleted once empty, checked by count (RabbitMQ
//! 3.10 refuses `if-empty` deletes of quorum queues with a connection error).
//! The tiers of a plugin that left the configuration but still drains stay
//! bound: its retries must still reach them until the plugin is retired
//! (`Bus::delete_queue` moves what waits there to its dead-letter queue).
//! Queues holding messages are never deleted here.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde::{Deserialize, Serialize};

use super::names::Names;
use crate::bus::Topology;
use crate::config::QueueType;
use crate::route::ExchangeKind;

/// What a topology put on the broker that a later one may have to take back:
/// bindings (queue, exchange, key) and retry tiers (queue, exchange key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Declared {
    pub bindings: BTreeSet<(String, String, String)>,
    pub tiers: BTreeSet<(String, String)>,
}

impl Declared {
    /// Reads what the last run declared (`None` when unknown).
    pub fn load(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Records it for the next run (best effort: a missing record only means
    /// bindings removed while stopped are not unbound).
    pub fn save(&self, path: &Path) {
        let write = || -> std::io::Result<()> {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
            std::fs::rename(tmp, path)
        };
        if let Err(e) = write() {
            tracing::warn!(file = %path.display(), error = %e, "cannot record the declared topology");
        }
    }
}

/// What `topology` asks for, by name.
pub fn wanted(names: &Names, topology: &Topology) -> Declared {
    let mut d = Declared::default();
    for b in &topology.bindings {
        let key = match b.kind {
            ExchangeKind::Fanout => String::new(),
            _ => b.pattern.clone(),
        };
        d.bindings
            .insert((names.queue(&b.plugin), b.exchange.clone(), key));
    }
    for q in &topology.queues {
        for delay in &q.retry_delays {
            d.tiers.insert((
                names.retry_queue(&q.plugin, *delay),
                Names::retry_key(&q.plugin, *delay),
            ));
        }
    }
    d
}

fn lapin_kind(kind: ExchangeKind) -> lapin::ExchangeKind {
    match kind {
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
    }
}

/// Says what a refused declaration means: RabbitMQ refuses to redeclare a
/// queue or exchange with other arguments (`PRECONDITION_FAILED`).
fn refused(what: &str, e: &lapin::Error) -> String {
    let text = e.to_string();
    if text.contains("PRECONDITION_FAILED") || text.contains("406") {
        format!(
            "{what} already exists on the broker with other settings (queue type, `ordered`, \
             exchange kind or durability changed?): RabbitMQ keeps the settings a queue or \
             exchange was created with; delete it (after draining it) or use another \
             [broker] prefix. The broker said: {text}"
        )
    } else {
        format!("cannot declare {what}: {text}")
    }
}

/// Declares `topology` (with the prefix's names and queue type) and takes back
/// what `previous` declared that it no longer asks for, except the retry tiers
/// of `draining` plugins (plugin → its retry delays). Uses its own channel: a
/// refused declaration closes the channel it was made on.
pub async fn declare(
    connection: &Connection,
    names: &Names,
    queue_type: QueueType,
    topology: &Topology,
    draining: &HashMap<String, Vec<Duration>>,
    previous: &Declared,
) -> Result<Declared, String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    let result = declare_on(
        connection, &channel, names, queue_type, topology, draining, previous,
    )
    .await;
    let _ = channel.close(200, "topology declared".into()).await;
    result
}

async fn declare_on(
    connection: &Connection,
    channel: &Channel,
    names: &Names,
    queue_type: QueueType,
    topology: &Topology,
    draining: &HashMap<String, Vec<Duration>>,
    previous: &Declared,
) -> Result<Declared, String> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for e in &topology.exchanges {
        let options = ExchangeDeclareOptions {
            durable: e.durable,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                e.name.as_str().into(),
                lapin_kind(e.kind),
                options,
                FieldTable::default(),
            )
            .await
            .map_err(|err| refused(&format!("exchange {:?}", e.name), &err))?;
    }
    for name in [names.retry_exchange(), names.dlx()] {
        channel
            .exchange_declare(
                name.as_str().into(),
                lapin::ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(|err| refused(&format!("exchange {name:?}"), &err))?;
    }
    let queue_options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for q in &topology.queues {
        let dlq = names.dlq(&q.plugin);
        channel
            .queue_declare(
                dlq.as_str().into(),
                queue_options,
                Names::dlq_args(queue_type),
            )
            .await
            .map_err(|e| refused(&format!("queue {dlq:?}"), &e))?;
        channel
            .queue_bind(
                dlq.as_str().into(),
                names.dlx().as_str().into(),
                q.plugin.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| refused(&format!("the binding of {dlq:?}"), &e))?;
        let queue = names.queue(&q.plugin);
        channel
            .queue_declare(
                queue.as_str().into(),
                queue_options,
                names.queue_args(&q.plugin, queue_type, q.ordered),
            )
            .await
            .map_err(|e| refused(&format!("queue {queue:?}"), &e))?;
        for delay in &q.retry_delays {
            let tier = names.retry_queue(&q.plugin, *delay);
            channel
                .queue_declare(
                    tier.as_str().into(),
                    queue_options,
                    names.retry_args(&q.plugin, queue_type, *delay),
                )
                .await
                .map_err(|e| refused(&format!("queue {tier:?}"), &e))?;
            let key = Names::retry_key(&q.plugin, *delay);
            channel
                .queue_bind(
                    tier.as_str().into(),
                    names.retry_exchange().as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| refused(&format!("the binding of {tier:?}"), &e))?;
        }
    }
    let mut wanted = wanted(names, topology);
    for (plugin, delays) in draining {
        for delay in delays {
            wanted.tiers.insert((
                names.retry_queue(plugin, *delay),
                Names::retry_key(plugin, *delay),
            ));
        }
    }
    for (queue, exchange, key) in &wanted.bindings {
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                refused(
                    &format!("the binding of {queue:?} to {exchange:?} ({key:?})"),
                    &e,
                )
            })?;
    }
    for (queue, exchange, key) in previous.bindings.difference(&wanted.bindings) {
        // Unbinding what does not exist (any more) is not an error in RabbitMQ.
        channel
            .queue_unbind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("cannot unbind {queue:?} from {exchange:?} ({key:?}): {e}"))?;
        tracing::info!(queue = %queue, exchange = %exchange, key = %key, "route unbound");
    }
    let mut recorded = wanted.clone();
    for (tier, key) in previous.tiers.difference(&wanted.tiers) {
        // Unbound first: nothing new arrives, and what waits still comes back.
        let _ = channel
            .queue_unbind(
                tier.as_str().into(),
                names.retry_exchange().as_str().into(),
                key.as_str().into(),
                FieldTable::default(),
            )
            .await;
        match super::tools::delete_if_empty(connection, tier).await {
            Ok(true) => tracing::info!(queue = %tier, "retry tier no longer used; deleted"),
            Ok(false) => {
                tracing::info!(queue = %tier, "retry tier no longer used but not empty; kept until its messages have come back");
                recorded.tiers.insert((tier.clone(), key.clone()));
            }
            Err(e) => {
                tracing::warn!(queue = %tier, error = %e, "retry tier no longer used; not deleted");
                recorded.tiers.insert((tier.clone(), key.clone()));
            }
        }
    }
    Ok(recorded)
}
