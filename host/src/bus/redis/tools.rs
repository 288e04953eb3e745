//! Dead letters (peek, redrive), replays, removing a plugin's streams, and
//! what the CLI does on this bus (`publish`, `tail`, `dlq`), each with a
//! pooled connection and no consumer of its own.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::Value;

use super::entry::{self, Entry};
use super::link::{self, Link};
use super::settle::add_dead_letter;
use super::{Inner, Keys};
use crate::bus::rabbit::amqp;
use crate::bus::{BusError, DeadLetter, Delivered, FailureInfo, Message, Published};
use crate::route::{ExchangeKind, TopicPattern};

/// Entries read per `XRANGE` by a redrive.
const REDRIVE_BATCH: usize = 500;

/// Moves one dead letter: KEYS[1] the dead-letter stream, KEYS[2] the plugin's
/// stream; ARGV: 1 = the letter's id, 2 = MAXLEN, then XADD's field-value
/// pairs. Only the caller that deletes the letter adds it, so two redrives
/// never move one letter twice. Returns 1 if moved.
const MOVE_LETTER: &str = r"
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  local args = {KEYS[2], 'MAXLEN', '~', ARGV[2], '*'}
  for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
  redis.call('XADD', unpack(args))
  return 1
end
return 0
";

fn dead_letter(e: &Entry) -> DeadLetter {
    let (exchange, routing_key, message) = match entry::decode(e) {
        Ok(d) => (d.exchange.unwrap_or_default(), d.routing_key, d.message),
        Err(why) => (
            String::new(),
            String::new(),
            Message {
                body: bytes::Bytes::from(format!("undecodable dead letter {}: {why}", e.id)),
                ..Message::default()
            },
        ),
    };
    let failure = amqp::failure_of(&message);
    let at = message
        .header(amqp::DEAD_LETTERED_AT)
        .unwrap_or_default()
        .to_string();
    DeadLetter {
        // The dead-letter stream is the router's own writing.
        delivered: amqp::delivered(&exchange, &routing_key, message, true),
        failure,
        at,
    }
}

/// Up to `limit` dead letters of `plugin`, oldest first; they stay.
pub fn peek(
    link: &Link,
    keys: &Keys,
    plugin: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, BusError> {
    let key = keys.dlq(plugin);
    let reply: Value = link.run(|con| {
        redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .query(con)
    })?;
    Ok(link::entries(&reply)
        .iter()
        .take(limit)
        .map(dead_letter)
        .collect())
}

/// The fields of `delivered` as a first attempt in a plugin's stream.
fn first_attempt(delivered: &Delivered) -> Vec<(&'static str, Vec<u8>)> {
    let message = amqp::redriven(&delivered.message);
    entry::fields(Some(&delivered.exchange), &delivered.routing_key, &message)
}

fn xadd(key: &str, max: u64, fields: &[(&str, Vec<u8>)]) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("MAXLEN").arg("~").arg(max).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(v.as_slice());
    }
    cmd
}

/// Moves up to `limit` dead letters of `plugin` to its stream as first
/// attempts, oldest first. Returns how many moved.
pub fn redrive(
    link: &Link,
    keys: &Keys,
    plugin: &str,
    limit: usize,
    max: u64,
) -> Result<usize, BusError> {
    Ok(redrive_where(link, keys, plugin, limit, max, |_| true)?.len())
}

/// Moves the dead letters of `plugin` whose [`DeadLetter::id`] is one of
/// `ids` to its stream as first attempts; the others stay. Returns the ids
/// moved, one per letter.
pub fn redrive_ids(
    link: &Link,
    keys: &Keys,
    plugin: &str,
    ids: &std::collections::BTreeSet<String>,
    max: u64,
) -> Result<Vec<String>, BusError> {
    redrive_where(link, keys, plugin, usize::MAX, max, |l| {
        ids.contains(&l.id())
    })
}

/// Reads the dead-letter stream once through, oldest first, moving up to
/// `limit` letters that `pick` chooses (each by [`MOVE_LETTER`]); the ids of
/// the events moved.
fn redrive_where(
    link: &Link,
    keys: &Keys,
    plugin: &str,
    limit: usize,
    max: u64,
    pick: impl Fn(&DeadLetter) -> bool,
) -> Result<Vec<String>, BusError> {
    let (dlq, queue) = (keys.dlq(plugin), keys.queue(plugin));
    // Once through what the stream holds now: a letter moved, failing again
    // and dead-lettered anew lands after this end and is not moved twice.
    let newest: Value = link.run(|con| {
        redis::cmd("XREVRANGE")
            .arg(&dlq)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(con)
    })?;
    let Some(end) = link::entries(&newest).pop().map(|e| e.id) else {
        return Ok(Vec::new());
    };
    let mut moved = Vec::new();
    let mut from = "-".to_string();
    while moved.len() < limit {
        let reply: Value = link.run(|con| {
            redis::cmd("XRANGE")
                .arg(&dlq)
                .arg(&from)
                .arg(&end)
                .arg("COUNT")
                .arg(REDRIVE_BATCH)
                .query(con)
        })?;
        let letters = link::entries(&reply);
        let Some(last) = letters.last() else { break };
        from = format!("({}", last.id);
        let chosen: Vec<(DeadLetter, &Entry)> = letters
            .iter()
            .map(|e| (dead_letter(e), e))
            .filter(|(l, _)| pick(l))
            .take(limit - moved.len())
            .collect();
        if chosen.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        for (letter, e) in &chosen {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(MOVE_LETTER)
                .arg(2)
                .arg(&dlq)
                .arg(&queue)
                .arg(&e.id)
                .arg(max);
            for (k, v) in first_attempt(&letter.delivered) {
                cmd.arg(k).arg(v);
            }
            pipe.add_command(cmd);
        }
        let done: Vec<i64> = link.run(|con| pipe.query(con))?;
        for ((letter, _), n) in chosen.iter().zip(done) {
            if n == 1 {
                moved.push(letter.id());
            }
        }
    }
    Ok(moved)
}

/// Puts `messages` in `plugin`'s stream as first attempts (a replay), in one
/// `MULTI`.
pub fn deliver(
    link: &Link,
    keys: &Keys,
    plugin: &str,
    messages: Vec<Delivered>,
    max: u64,
) -> Result<usize, BusError> {
    if messages.is_empty() {
        return Ok(0);
    }
    let queue = keys.queue(plugin);
    let mut pipe = redis::pipe();
    pipe.atomic();
    for d in &messages {
        pipe.add_command(xadd(&queue, max, &first_attempt(d)))
            .ignore();
    }
    link.run(|con| pipe.query::<Value>(con))?;
    Ok(messages.len())
}

/// Deletes a removed plugin's streams and groups: retries waiting go to its
/// dead-letter stream (`plugin_removed`), and with `force` so do entries its
/// groups have not settled; without `force`, unsettled entries keep it.
pub(super) fn delete_queue(inner: &Inner, plugin: &str, force: bool) -> Result<(), BusError> {
    let keys = &inner.keys;
    let queue = keys.queue(plugin);
    // Every exchange stream this plugin's group may be on: as declared now
    // and as the routes hash says.
    let mut streams: Vec<String> = vec![queue.clone()];
    let routes: HashMap<String, String> = inner
        .link
        .run(|con| redis::cmd("HGETALL").arg(keys.routes()).query(con))?;
    for exchange in routes.keys() {
        streams.push(keys.exchange(exchange));
    }
    streams.extend(inner.streams_of(plugin));
    streams.sort();
    streams.dedup();
    let removed = |reason: &str| FailureInfo {
        kind: "plugin_removed".into(),
        reason: reason.into(),
        attempts: 1,
        plugin_version: String::new(),
        first_failure: crate::envelope::now_rfc3339(),
    };
    let mut moved = 0usize;
    // Retries waiting.
    let retries = keys.retries(plugin);
    let members: Vec<Vec<u8>> = inner
        .link
        .run(|con| redis::cmd("ZRANGE").arg(&retries).arg(0).arg(-1).query(con))?;
    if !members.is_empty() {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for m in &members {
            if let Some((_, e)) = entry::unpacked_entry(m)
                && let Ok(d) = entry::decode(&e)
            {
                let delivered = amqp::delivered(
                    d.exchange.as_deref().unwrap_or_default(),
                    &d.routing_key,
                    d.message,
                    true,
                );
                add_dead_letter(
                    inner,
                    &mut pipe,
                    plugin,
                    &delivered,
                    &removed(&format!(
                        "plugin {plugin:?} was removed while this retry waited"
                    )),
                );
                moved += 1;
            }
        }
        pipe.cmd("DEL").arg(&retries).ignore();
        inner.link.run(|con| pipe.query::<Value>(con))?;
    }
    // Entries its groups have not settled.
    let mut busy = 0u64;
    for s in &streams {
        let groups = inner.link.run(|con| link::info_groups(con, s))?;
        if let Some(group) = groups.iter().find(|g| g.name == plugin) {
            busy += group.waiting();
        }
    }
    if busy > 0 && !force {
        return Err(BusError::Unavailable(format!(
            "the streams of plugin {plugin:?} still hold {busy} entries; kept"
        )));
    }
    if busy > 0 {
        moved += drain_to_dlq(inner, plugin, &streams, &removed("plugin removed (forced)"))?;
    }
    inner.link.run(|con| {
        for s in &streams {
            let destroyed = redis::cmd("XGROUP")
                .arg("DESTROY")
                .arg(s)
                .arg(plugin)
                .query::<Value>(con);
            if let Err(e) = destroyed
                && !link::is_reply(&e)
            {
                return Err(e);
            }
        }
        redis::cmd("DEL").arg(&queue).query::<Value>(con)?;
        let dead: u64 = redis::cmd("XLEN").arg(keys.dlq(plugin)).query(con)?;
        if dead == 0 {
            redis::cmd("DEL")
                .arg(keys.dlq(plugin))
                .query::<Value>(con)?;
        } else {
            tracing::info!(plugin = %plugin, dead, "the removed plugin's dead letters are kept");
        }
        Ok(())
    })?;
    if moved > 0 {
        tracing::warn!(plugin = %plugin, moved, "events of a removed plugin dead-lettered (plugin_removed)");
    }
    Ok(())
}

/// Reads what `plugin`'s groups hold (pending in any consumer's name, and
/// unread) and dead-letters what its routes take.
fn drain_to_dlq(
    inner: &Inner,
    plugin: &str,
    streams: &[String],
    failure: &FailureInfo,
) -> Result<usize, BusError> {
    let mut moved = 0;
    let me = format!("{}-remove", inner.consumer);
    for s in streams {
        let exchange = inner.keys.exchange_of(s).map(str::to_string);
        loop {
            let (claimed, fresh) = inner.link.run(|con| {
                let claimed: Value = redis::cmd("XAUTOCLAIM")
                    .arg(s)
                    .arg(plugin)
                    .arg(&me)
                    .arg(0)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(500)
                    .query(con)?;
                let fresh: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(plugin)
                    .arg(&me)
                    .arg("COUNT")
                    .arg(500)
                    .arg("STREAMS")
                    .arg(s)
                    .arg(">")
                    .query(con)?;
                Ok((claimed, fresh))
            })?;
            let mut got = link::autoclaim(&claimed).1;
            for (_, entries, _) in link::streams(&fresh) {
                got.extend(entries);
            }
            if got.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            pipe.atomic();
            for e in &got {
                if let Ok(d) = entry::decode(e) {
                    let ours = exchange
                        .as_ref()
                        .is_none_or(|x| inner.takes(x, &d.routing_key, plugin));
                    if ours {
                        let x = exchange.clone().or(d.exchange).unwrap_or_default();
                        let delivered =
                            amqp::delivered(&x, &d.routing_key, d.message, exchange.is_none());
                        add_dead_letter(inner, &mut pipe, plugin, &delivered, failure);
                        moved += 1;
                    }
                }
                pipe.cmd("XACK").arg(s).arg(plugin).arg(&e.id).ignore();
            }
            inner.link.run(|con| pipe.query::<Value>(con))?;
        }
    }
    Ok(moved)
}

/// (plugin, pattern, kind) of each binding on an exchange.
type Bindings = Vec<(String, String, ExchangeKind)>;

// --- The CLI ------------------------------------------------------------------------

/// The bindings on `exchange` as the running routers declared them; `None`
/// when the exchange is not declared.
fn bindings(link: &Link, keys: &Keys, exchange: &str) -> Result<Option<Bindings>, BusError> {
    let json: Option<String> = link.run(|con| {
        redis::cmd("HGET")
            .arg(keys.routes())
            .arg(exchange)
            .query(con)
    })?;
    let Some(json) = json else { return Ok(None) };
    let list: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap_or_default();
    Ok(Some(
        list.iter()
            .filter_map(|b| {
                Some((
                    b["plugin"].as_str()?.to_string(),
                    b["pattern"].as_str()?.to_string(),
                    b["kind"].as_str()?.parse().ok()?,
                ))
            })
            .collect(),
    ))
}

fn matches(kind: ExchangeKind, pattern: &str, routing_key: &str) -> bool {
    match kind {
        ExchangeKind::Fanout => true,
        ExchangeKind::Direct => pattern == routing_key,
        ExchangeKind::Topic => TopicPattern::parse(pattern).is_ok_and(|p| p.matches(routing_key)),
    }
}

/// Publishes one message (`switchboard publish`); whether a route takes it.
pub fn publish_one(
    link: &Link,
    keys: &Keys,
    exchange: &str,
    routing_key: &str,
    message: &Message,
    max: u64,
) -> Result<bool, BusError> {
    let Some(bindings) = bindings(link, keys, exchange)? else {
        return Err(BusError::NoSuchExchange(exchange.into()));
    };
    let size = entry::size(routing_key, message);
    if size > entry::MAX_ENTRY {
        return Err(BusError::TooLarge(format!(
            "the message takes {size} bytes, more than a stream entry may ({})",
            entry::MAX_ENTRY
        )));
    }
    let fields = entry::fields(None, routing_key, message);
    let cmd = xadd(&keys.exchange(exchange), max, &fields);
    link.run(|con| cmd.query::<Value>(con))?;
    Ok(bindings
        .iter()
        .any(|(_, pattern, kind)| matches(*kind, pattern, routing_key)))
}

/// Watches `exchange` (`switchboard tail`) from now on: calls `each` with
/// every message whose routing key `pattern` (a topic pattern) matches, until
/// it returns false or `until` passes.
pub fn tail(
    link: &Link,
    keys: &Keys,
    exchange: &str,
    pattern: &str,
    until: Option<Instant>,
    mut each: impl FnMut(Published) -> bool,
) -> Result<(), BusError> {
    let pattern = TopicPattern::parse(pattern)
        .map_err(|e| BusError::Topology(format!("pattern {pattern:?}: {e}")))?;
    let key = keys.exchange(exchange);
    let block = Duration::from_millis(500);
    let mut con = link
        .dedicated(link.timeout + block)
        .map_err(BusError::Unavailable)?;
    let mut last = "$".to_string();
    loop {
        if until.is_some_and(|u| Instant::now() >= u) {
            return Ok(());
        }
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(100)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&key)
            .arg(&last)
            .query(&mut con)
            .map_err(|e| BusError::Unavailable(link.describe(&e)))?;
        for (_, entries, _) in link::streams(&reply) {
            for e in entries {
                last.clone_from(&e.id);
                let Ok(d) = entry::decode(&e) else { continue };
                if pattern.matches(&d.routing_key)
                    && !each(Published {
                        exchange: exchange.to_string(),
                        routing_key: d.routing_key,
                        message: d.message,
                    })
                {
                    return Ok(());
                }
            }
        }
    }
}

/// Whether `plugin` has a dead-letter stream or a group (for `dlq` to say
/// "no such plugin" rather than "no dead letters").
pub fn knows_plugin(link: &Link, keys: &Keys, plugin: &str) -> Result<bool, BusError> {
    link.run(|con| {
        let exists: u64 = redis::cmd("EXISTS")
            .arg(keys.dlq(plugin))
            .arg(keys.queue(plugin))
            .query(con)?;
        Ok(exists > 0)
    })
}

/// Up to `count` entries of `exchange`'s stream after entry `after` (`"-"`:
/// from the start), with their ids: what was published there, as a stream
/// watcher would see it (undecodable entries left out).
pub fn range(
    link: &Link,
    keys: &Keys,
    exchange: &str,
    after: &str,
    count: usize,
) -> Result<Vec<(String, Published)>, BusError> {
    let from = if after == "-" {
        "-".to_string()
    } else {
        format!("({after}")
    };
    let reply: Value = link.run(|con| {
        redis::cmd("XRANGE")
            .arg(keys.exchange(exchange))
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(count.max(1))
            .query(con)
    })?;
    Ok(link::entries(&reply)
        .into_iter()
        .filter_map(|e| {
            let d = entry::decode(&e).ok()?;
            Some((
                e.id,
                Published {
                    exchange: exchange.to_string(),
                    routing_key: d.routing_key,
                    message: d.message,
                },
            ))
        })
        .collect())
}
