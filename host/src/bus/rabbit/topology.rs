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
//!
//! With `[archive]`, the archive stream is declared too and bound to every
//! archived exchange ([`archive_bindings`]). Its bindings are recorded and
//! diffed like the routes' (an exchange that stops being archived is
//! unbound), but the stream itself is never deleted here: it is the history.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde::{Deserialize, Serialize};

use super::names::Names;
use super::publish::soft_error;
use crate::bus::Topology;
use crate::config::{DlqRetention, QueueType};
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
    if let Some(archive) = names.archive() {
        let stream = names.archive_stream();
        for (exchange, key) in archive_bindings(&archive.exchanges, topology) {
            d.bindings.insert((stream.clone(), exchange, key));
        }
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

/// The bindings (exchange, key) that bring every message published to an
/// archived exchange into the archive stream: `archived` names them, or is
/// empty for every exchange of `topology`; names it lists that the topology
/// does not declare are left out (their kind is unknown).
///
/// - topic: one binding, `#` (every routing key, the empty one included);
/// - fanout: one binding, `""` (the key is ignored);
/// - direct: one binding per distinct key that the topology's routes bind on
///   that exchange. A direct exchange matches keys exactly and has no
///   "everything" binding, so **an event published to a direct exchange with a
///   key that no route binds is not archived** (it reaches no queue at all).
///   Keys bound only by a disabled plugin's routes are not in the topology
///   either, and are not archived while it stays disabled.
pub fn archive_bindings(archived: &[String], topology: &Topology) -> BTreeSet<(String, String)> {
    let mut bindings = BTreeSet::new();
    for e in &topology.exchanges {
        if !archived.is_empty() && !archived.contains(&e.name) {
            continue;
        }
        match e.kind {
            ExchangeKind::Topic => {
                bindings.insert((e.name.clone(), "#".to_string()));
            }
            ExchangeKind::Fanout => {
                bindings.insert((e.name.clone(), String::new()));
            }
            ExchangeKind::Direct => {
                for b in topology.bindings.iter().filter(|b| b.exchange == e.name) {
                    bindings.insert((e.name.clone(), b.pattern.clone()));
                }
            }
        }
    }
    bindings
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

/// A dead-letter queue the broker already holds with other arguments: almost
/// always `dlq_ttl` or `dlq_max_length` set or changed after it was created.
fn refused_dlq(queue: &str, retention: DlqRetention, e: &lapin::Error) -> String {
    if soft_error(e) != Some(AMQPSoftError::PRECONDITIONFAILED) {
        return format!("cannot declare queue {queue:?}: {e}");
    }
    let mut policy = Vec::new();
    if let Some(ttl) = retention.ttl {
        policy.push(format!("\"message-ttl\":{}", ttl.as_millis()));
    }
    if let Some(n) = retention.max_length {
        policy.push(format!("\"max-length\":{n},\"overflow\":\"drop-head\""));
    }
    format!(
        "the dead-letter queue {queue:?} already exists on the broker with other arguments \
         ([broker] dlq_ttl or dlq_max_length, or the queue type, changed since it was created): \
         RabbitMQ keeps the arguments a queue was created with. Either drain it \
         (`switchboard dlq redrive` or `purge`) and delete it, so that the next start declares it \
         with the new retention, or put the old values back and apply the retention with a \
         policy: rabbitmqctl set_policy --apply-to queues <name> '^{}$' '{{{}}}'. The broker \
         said: {e}",
        regex_escape(queue),
        policy.join(",")
    )
}

fn regex_escape(name: &str) -> String {
    name.chars()
        .flat_map(|c| {
            let special = ".^$*+?()[]{}|\\".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// The delay ladder ([`Names::delay_queue`]) and the queue its steps
/// dead-letter to, where the router picks up what is due.
async fn declare_delays(
    channel: &Channel,
    names: &Names,
    queue_type: QueueType,
    options: QueueDeclareOptions,
) -> Result<(), String> {
    let due = names.delay_due();
    channel
        .queue_declare(due.as_str().into(), options, Names::dlq_args(queue_type))
        .await
        .map_err(|e| refused(&format!("queue {due:?}"), &e))?;
    for k in 0..super::names::DELAY_STEPS {
        let step = names.delay_queue(k);
        channel
            .queue_declare(
                step.as_str().into(),
                options,
                names.delay_args(queue_type, k),
            )
            .await
            .map_err(|e| refused(&format!("queue {step:?}"), &e))?;
    }
    Ok(())
}

/// Says what a refused declaration of the archive stream means: its retention
/// arguments are part of its identity, so an edited `[archive]` (`max_age`,
/// `max_size`, `segment_size`) cannot be applied by declaring it again.
fn refused_archive(stream: &str, e: &lapin::Error) -> String {
    let text = e.to_string();
    if soft_error(e) == Some(AMQPSoftError::PRECONDITIONFAILED) {
        format!(
            "the archive stream {stream:?} already exists on the broker with other arguments \
             ([archive] max_age, max_size or segment_size changed?): RabbitMQ keeps the \
             arguments a stream was created with. To apply the new retention, either delete \
             the stream (its history goes with it) or put back the old values and change the \
             retention with a policy (`rabbitmqctl set_policy` with max-age / \
             max-length-bytes applied to {stream:?}). The broker said: {text}"
        )
    } else {
        format!("cannot declare the archive stream {stream:?}: {text}")
    }
}

/// What the router's queues are declared with: `[broker] queue_type`, and the
/// dead-letter queues' retention.
#[derive(Debug, Clone, Copy)]
pub struct QueueSettings {
    pub queue_type: QueueType,
    pub dlq: DlqRetention,
}

/// Declares `topology` (with the prefix's names and queue settings) and takes back
/// what `previous` declared that it no longer asks for, except the retry tiers
/// of `draining` plugins (plugin → its retry delays). Uses its own channel: a
/// refused declaration closes the channel it was made on.
pub async fn declare(
    connection: &Connection,
    names: &Names,
    queues: QueueSettings,
    topology: &Topology,
    draining: &HashMap<String, Vec<Duration>>,
    previous: &Declared,
) -> Result<Declared, String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    let result = declare_on(
        connection, &channel, names, queues, topology, draining, previous,
    )
    .await;
    let _ = channel.close(200, "topology declared".into()).await;
    result
}

async fn declare_on(
    connection: &Connection,
    channel: &Channel,
    names: &Names,
    queues: QueueSettings,
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
    let QueueSettings {
        queue_type,
        dlq: retention,
    } = queues;
    for q in &topology.queues {
        let dlq = names.dlq(&q.plugin);
        channel
            .queue_declare(
                dlq.as_str().into(),
                queue_options,
                Names::dead_letter_queue_args(queue_type, retention),
            )
            .await
            .map_err(|e| refused_dlq(&dlq, retention, &e))?;
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
    declare_delays(channel, names, queue_type, queue_options).await?;
    if let Some(archive) = names.archive() {
        let stream = names.archive_stream();
        if topology
            .queues
            .iter()
            .any(|q| names.queue(&q.plugin) == stream)
        {
            return Err(format!(
                "plugin \"archive\" and the [archive] stream would share the queue {stream:?}: \
                 rename the plugin, or use another [broker] prefix"
            ));
        }
        // Durable, never exclusive or auto-deleted: what RabbitMQ requires of
        // a stream. Arguments from the configuration alone, so that replicas
        // and restarts declare the same ones.
        channel
            .queue_declare(
                stream.as_str().into(),
                queue_options,
                Names::archive_args(archive),
            )
            .await
            .map_err(|e| refused_archive(&stream, &e))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::ExchangeSpec;
    use crate::config::ArchiveConfig;
    use crate::route::Binding;

    fn exchange(name: &str, kind: ExchangeKind) -> ExchangeSpec {
        ExchangeSpec {
            name: name.into(),
            kind,
            durable: true,
        }
    }

    fn route(exchange: &str, kind: ExchangeKind, pattern: &str, plugin: &str) -> Binding {
        Binding {
            exchange: exchange.into(),
            kind,
            pattern: pattern.into(),
            plugin: plugin.into(),
        }
    }

    /// The commerce bus's shape: a topic, a fanout and two direct exchanges,
    /// one of them with no route.
    fn commerce() -> Topology {
        use ExchangeKind::{Direct, Fanout, Topic};
        Topology {
            exchanges: vec![
                exchange("payments", Topic),
                exchange("analytics", Fanout),
                exchange("deadletter", Direct),
                exchange("audit", Direct),
            ],
            queues: Vec::new(),
            bindings: vec![
                route("payments", Topic, "bill.*", "billing"),
                route("analytics", Fanout, "#", "analytics"),
                route("deadletter", Direct, "dead", "analytics"),
                route("deadletter", Direct, "dead", "billing"),
                route("deadletter", Direct, "lost.#", "billing"),
            ],
        }
    }

    fn pairs(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
        list.iter()
            .map(|(e, k)| (e.to_string(), k.to_string()))
            .collect()
    }

    #[test]
    fn a_direct_exchange_is_archived_under_each_key_its_routes_bind_and_no_other() {
        let all = archive_bindings(&[], &commerce());
        assert_eq!(
            all,
            pairs(&[
                ("payments", "#"),
                ("analytics", ""),
                // Once per key, whichever routes share it; `#` is an ordinary
                // character on a direct exchange.
                ("deadletter", "dead"),
                ("deadletter", "lost.#"),
            ]),
            "`audit` has no route, so no key to bind: nothing published there is archived"
        );
        // Only the exchanges `[archive] exchanges` names; one the topology
        // does not declare is left out.
        let some = archive_bindings(&["deadletter".into(), "nowhere".into()], &commerce());
        assert_eq!(
            some,
            pairs(&[("deadletter", "dead"), ("deadletter", "lost.#")])
        );
    }

    #[test]
    fn the_archive_streams_bindings_are_wanted_only_with_the_archive() {
        let plain = Names::new("sb");
        assert!(
            wanted(&plain, &commerce())
                .bindings
                .iter()
                .all(|(queue, _, _)| queue != "sb.archive")
        );
        let names = Names::new("sb").with_archive(Some(ArchiveConfig {
            enabled: true,
            ..ArchiveConfig::default()
        }));
        let archived: BTreeSet<(String, String)> = wanted(&names, &commerce())
            .bindings
            .into_iter()
            .filter(|(queue, _, _)| queue == "sb.archive")
            .map(|(_, exchange, key)| (exchange, key))
            .collect();
        assert_eq!(archived, archive_bindings(&[], &commerce()));
    }
}
