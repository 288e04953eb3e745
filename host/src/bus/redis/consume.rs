//! One consumer thread per plugin: reads the plugin's groups, hands
//! deliveries to its workers, and claims what dead replicas left pending.
//!
//! The thread reads at most `prefetch` less what its workers hold
//! (`XREADGROUP … COUNT`, blocking a moment so that it also sees routes
//! added and a stop), from the exchange streams the plugin's routes read and
//! from the plugin's own stream. An exchange entry the plugin's patterns do not
//! match is acked and skipped; an entry that is not a message is
//! dead-lettered (`undecodable`) at once.
//!
//! Every third of `claim_idle` it renews its claim on what its workers still
//! hold (`XCLAIM … JUSTID`, which resets the idle time, so a slow event is not
//! taken from a live replica) and takes over entries pending longer than
//! `claim_idle` in any consumer's name (`XAUTOCLAIM`): a crashed replica's.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use redis::Value;

use super::entry::{self, Entry};
use super::link::{self, Backoff};
use super::settle::{self, RedisSettle};
use super::{Inner, lock};
use crate::bus::rabbit::amqp;
use crate::bus::{Delivery, FailureInfo};

/// How long one `XREADGROUP` blocks: the longest a stop or a new route waits.
const BLOCK: Duration = Duration::from_millis(500);

/// What a consumer thread shares with its deliveries and the bus.
#[derive(Debug)]
pub struct ConsumerState {
    prefetch: u16,
    /// Deliveries handed out and not settled.
    outstanding: Mutex<u64>,
    settled: Condvar,
    /// (stream, id) of every delivery handed out and not settled.
    held: Mutex<HashSet<(String, String)>>,
    cancelled: AtomicBool,
    stopped: AtomicBool,
}

impl ConsumerState {
    pub fn new(prefetch: u16) -> Self {
        Self {
            prefetch,
            outstanding: Mutex::new(0),
            settled: Condvar::new(),
            held: Mutex::new(HashSet::new()),
            cancelled: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        }
    }

    pub fn outstanding(&self) -> u64 {
        *lock(&self.outstanding)
    }

    /// Stop reading new entries (deliveries out can still be settled).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.settled.notify_all();
    }

    /// Stop the thread.
    pub fn stop(&self) {
        self.cancel();
        self.stopped.store(true, Ordering::SeqCst);
        self.settled.notify_all();
    }

    /// Waits until nothing handed out is unsettled, at most until `until`.
    pub fn wait_settled(&self, until: Instant) -> bool {
        let mut n = lock(&self.outstanding);
        while *n > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            n = self
                .settled
                .wait_timeout(n, left)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
        true
    }

    fn hand_out(&self, stream: &str, id: &str) {
        *lock(&self.outstanding) += 1;
        lock(&self.held).insert((stream.to_string(), id.to_string()));
    }

    /// A delivery is settled (or given up): no longer held by this process.
    pub(super) fn release(&self, stream: &str, id: &str) {
        lock(&self.held).remove(&(stream.to_string(), id.to_string()));
        let mut n = lock(&self.outstanding);
        *n = n.saturating_sub(1);
        drop(n);
        self.settled.notify_all();
    }

    fn holds(&self, stream: &str, id: &str) -> bool {
        lock(&self.held).contains(&(stream.to_string(), id.to_string()))
    }

    /// How many more may be handed out now.
    fn room(&self) -> u64 {
        u64::from(self.prefetch).saturating_sub(self.outstanding())
    }

    /// Waits (a moment at most) for room.
    fn wait_room(&self, at_most: Duration) {
        let n = lock(&self.outstanding);
        if *n >= u64::from(self.prefetch) && !self.stopped.load(Ordering::SeqCst) {
            let _ = self.settled.wait_timeout(n, at_most);
        }
    }
}

struct Consumer {
    inner: Arc<Inner>,
    plugin: String,
    tx: Sender<Delivery>,
    state: Arc<ConsumerState>,
}

/// Starts `plugin`'s consumer thread.
pub(super) fn spawn(
    inner: Arc<Inner>,
    plugin: String,
    tx: Sender<Delivery>,
    state: Arc<ConsumerState>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let name = format!("sb-redis-{plugin}");
    let consumer = Consumer {
        inner,
        plugin,
        tx,
        state,
    };
    std::thread::Builder::new()
        .name(name)
        .spawn(move || consumer.run())
}

impl Consumer {
    fn streams(&self) -> Vec<String> {
        let mut streams = self.inner.streams_of(&self.plugin);
        streams.push(self.inner.keys.queue(&self.plugin));
        streams
    }

    fn run(self) {
        let claim_every = (self.inner.settings.claim_idle / 3).max(Duration::from_millis(300));
        let mut last_claim: Option<Instant> = None;
        let mut con: Option<redis::Connection> = None;
        let mut backoff = Backoff::new();
        let read_timeout = self.inner.settings.timeout + BLOCK;
        while !self.state.stopped.load(Ordering::SeqCst) {
            if self.state.cancelled.load(Ordering::SeqCst) {
                self.state.wait_room(Duration::from_millis(100));
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let connection = match con.as_mut() {
                Some(c) => c,
                None => match self.inner.link.dedicated(read_timeout) {
                    Ok(c) => con.insert(c),
                    Err(why) => {
                        self.inner.record(Err(&why));
                        std::thread::sleep(backoff.pause());
                        continue;
                    }
                },
            };
            let streams = self.streams();
            let step = if last_claim.is_none_or(|t| t.elapsed() >= claim_every) {
                last_claim = Some(Instant::now());
                self.claim(connection, &streams)
            } else {
                self.read(connection, &streams)
            };
            match step {
                Ok(()) => backoff.reset(),
                Err(e) if link::is_no_group(&e) => {
                    // The stream or group went (deleted, Redis restarted
                    // empty): declare again.
                    tracing::info!(plugin = %self.plugin, "consumer group missing; declaring again");
                    let _ = self.inner.declare(None);
                    std::thread::sleep(backoff.pause());
                }
                Err(e) => {
                    let why = self.inner.link.describe(&e);
                    tracing::warn!(plugin = %self.plugin, error = %why, "reading the plugin's streams failed; reconnecting");
                    self.inner.record(Err(&why));
                    con = None;
                    std::thread::sleep(backoff.pause());
                }
            }
        }
    }

    /// One `XREADGROUP` of new entries, as many as there is room for.
    fn read(&self, con: &mut redis::Connection, streams: &[String]) -> redis::RedisResult<()> {
        let room = self.state.room();
        if room == 0 {
            self.state.wait_room(BLOCK);
            return Ok(());
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.plugin)
            .arg(&self.inner.consumer)
            .arg("COUNT")
            .arg(room)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS");
        for s in streams {
            cmd.arg(s);
        }
        for _ in streams {
            cmd.arg(">");
        }
        let reply: Value = cmd.query(con)?;
        for (stream, entries, _) in link::streams(&reply) {
            for e in entries {
                self.take(con, &stream, e)?;
            }
        }
        Ok(())
    }

    /// Renews the claims on what this process holds, then takes over entries
    /// pending too long in any consumer's name.
    fn claim(&self, con: &mut redis::Connection, streams: &[String]) -> redis::RedisResult<()> {
        let held: Vec<(String, String)> = lock(&self.state.held).iter().cloned().collect();
        if !held.is_empty() {
            let mut pipe = redis::pipe();
            for stream in streams {
                let ids: Vec<&String> = held
                    .iter()
                    .filter(|(s, _)| s == stream)
                    .map(|(_, id)| id)
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                pipe.cmd("XCLAIM")
                    .arg(stream)
                    .arg(&self.plugin)
                    .arg(&self.inner.consumer)
                    .arg(0)
                    .arg(ids)
                    .arg("JUSTID")
                    .ignore();
            }
            pipe.query::<Value>(con)?;
        }
        let idle = self.inner.settings.claim_idle.as_millis() as u64;
        for stream in streams {
            let mut cursor = "0-0".to_string();
            // A few rounds at most per pass: the rest waits for the next one.
            for _ in 0..10 {
                let room = self.state.room();
                if room == 0 {
                    return Ok(());
                }
                let reply: Value = redis::cmd("XAUTOCLAIM")
                    .arg(stream)
                    .arg(&self.plugin)
                    .arg(&self.inner.consumer)
                    .arg(idle)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(room)
                    .query(con)?;
                let (next, claimed, deleted) = link::autoclaim(&reply);
                for id in deleted {
                    tracing::error!(plugin = %self.plugin, stream = %stream, id = %id,
                        "a pending entry was trimmed before it was acknowledged (stream_max_length too small?): it is lost");
                }
                for e in claimed {
                    if self.state.holds(stream, &e.id) {
                        continue;
                    }
                    tracing::info!(plugin = %self.plugin, stream = %stream, id = %e.id, "claimed an entry a consumer left pending");
                    self.take(con, stream, e)?;
                }
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }

    /// Hands `e` (read from `stream`) to a worker, or settles it here: skipped
    /// (not this plugin's routing key) or dead-lettered (not a message).
    fn take(&self, con: &mut redis::Connection, stream: &str, e: Entry) -> redis::RedisResult<()> {
        let keys = &self.inner.keys;
        let on_exchange = keys.exchange_of(stream).map(str::to_string);
        let decoded = entry::decode(&e).and_then(|d| {
            let size = e.size();
            if size > entry::MAX_ENTRY {
                Err(format!(
                    "the entry takes {size} bytes, more than {} (refused)",
                    entry::MAX_ENTRY
                ))
            } else {
                Ok(d)
            }
        });
        let d = match decoded {
            Ok(d) => d,
            Err(why) => return self.undecodable(con, stream, &e, &why),
        };
        if let Some(exchange) = &on_exchange
            && !self.inner.takes(exchange, &d.routing_key, &self.plugin)
        {
            return redis::cmd("XACK")
                .arg(stream)
                .arg(&self.plugin)
                .arg(&e.id)
                .query::<Value>(con)
                .map(drop);
        }
        let (exchange, trusted) = match on_exchange {
            Some(x) => (x, false),
            None => (d.exchange.clone().unwrap_or_default(), true),
        };
        let delivered = amqp::delivered(&exchange, &d.routing_key, d.message, trusted);
        self.state.hand_out(stream, &e.id);
        let settle = RedisSettle::new(
            self.inner.clone(),
            self.plugin.clone(),
            stream.to_string(),
            e.id,
            self.state.clone(),
        );
        // A closed channel (no worker any more) drops the delivery, which
        // releases it: claimed again after claim_idle.
        let _ = self.tx.send(Delivery {
            delivered,
            settle: Box::new(settle),
        });
        Ok(())
    }

    /// An entry that is not a message: into the dead-letter stream with why,
    /// acked in the same `MULTI`.
    fn undecodable(
        &self,
        con: &mut redis::Connection,
        stream: &str,
        e: &Entry,
        why: &str,
    ) -> redis::RedisResult<()> {
        tracing::warn!(plugin = %self.plugin, stream = %stream, id = %e.id, reason = %why, "undecodable entry dead-lettered");
        let now = crate::envelope::now_rfc3339();
        let failure = FailureInfo {
            kind: "undecodable".into(),
            reason: format!("stream entry {} of {stream}: {why}", e.id),
            attempts: 1,
            plugin_version: String::new(),
            first_failure: now,
        };
        let exchange = self
            .inner
            .keys
            .exchange_of(stream)
            .unwrap_or_default()
            .to_string();
        let routing_key = e
            .field(entry::ROUTING_KEY)
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        let body = e.field(entry::BODY).unwrap_or_default();
        let body = &body[..body.len().min(entry::MAX_ENTRY)];
        let delivered = amqp::delivered(
            &exchange,
            &routing_key,
            crate::bus::Message {
                body: bytes::Bytes::copy_from_slice(body),
                ..crate::bus::Message::default()
            },
            false,
        );
        let mut pipe = redis::pipe();
        pipe.atomic();
        settle::add_dead_letter(&self.inner, &mut pipe, &self.plugin, &delivered, &failure);
        pipe.cmd("XACK")
            .arg(stream)
            .arg(&self.plugin)
            .arg(&e.id)
            .ignore();
        pipe.query::<Value>(con).map(drop)
    }
}
