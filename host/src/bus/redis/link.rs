//! Connections to Redis, and reading its replies.
//!
//! Short commands (publish, settle, the mover, the tools) take a connection
//! from a pool; each consumer thread keeps one connection of its own for its
//! blocking `XREADGROUP`. Every connection has read and write timeouts; one on
//! which a command failed other than by Redis answering with an error is
//! dropped, never reused (a late reply must not be read as the next answer),
//! and the next command connects again: that is the reconnect. Loops that
//! fail back off ([`Backoff`]).

use std::time::Duration;

use redis::{RedisError, Value};

use super::entry::Entry;
use crate::bus::BusError;
use crate::config::Secret;
use crate::redis_pool;

/// The pool and how to open a dedicated connection.
pub struct Link {
    pool: r2d2::Pool<redis_pool::Connector>,
    dedicated: redis_pool::Connector,
    pub url: Secret,
    pub timeout: Duration,
}

impl Link {
    pub fn new(url: &Secret, timeout: Duration, size: u32) -> Result<Self, String> {
        let (pool, dedicated) = redis_pool::open(url, size, timeout, "redis bus")
            .map_err(|why| format!("broker.url {why}"))?;
        Ok(Self {
            pool,
            dedicated,
            url: url.clone(),
            timeout,
        })
    }

    /// A connection of its own, whose reads wait at most `read_timeout`
    /// (longer than any `BLOCK` it is used for).
    pub fn dedicated(&self, read_timeout: Duration) -> Result<redis::Connection, String> {
        self.dedicated
            .connect(read_timeout)
            .map_err(|e| self.describe(&e))
    }

    /// Runs `f` on a pooled connection.
    pub fn run<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, BusError> {
        let mut conn = self.pool.get().map_err(|e| {
            BusError::Unavailable(format!(
                "cannot connect to Redis at {}: {}",
                self.url.redacted(),
                self.url.scrub(&e.to_string())
            ))
        })?;
        conn.run(f)
            .map_err(|e| BusError::Unavailable(self.describe(&e)))
    }

    /// An error as one sentence, without the password.
    pub fn describe(&self, e: &RedisError) -> String {
        format!(
            "redis {}: {}",
            self.url.redacted(),
            self.url.scrub(&e.to_string())
        )
    }
}

pub use crate::redis_pool::is_reply;

/// Whether `error` is Redis saying the group already exists.
pub fn is_busy_group(error: &RedisError) -> bool {
    error.code() == Some("BUSYGROUP")
}

/// Whether `error` is Redis saying the stream or group does not exist.
pub fn is_no_group(error: &RedisError) -> bool {
    error.code() == Some("NOGROUP")
}

/// Exponential backoff for loops that reconnect: 100 ms doubling to 5 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub fn new() -> Self {
        Self {
            next: Duration::from_millis(100),
        }
    }

    /// The pause before the next try (and doubles the one after).
    pub fn pause(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        now
    }

    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
}

// --- Replies -------------------------------------------------------------------------

pub fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

pub fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn items(value: &Value) -> &[Value] {
    match value {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// A flat `[k, v, k, v…]` reply (or a map) as pairs.
pub fn pairs(value: &Value) -> Vec<(String, Value)> {
    match value {
        Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, v.clone())))
            .collect(),
        other => items(other)
            .chunks(2)
            .filter_map(|c| match c {
                [k, v] => Some((text(k)?, v.clone())),
                _ => None,
            })
            .collect(),
    }
}

/// One entry: `[id, [field, value, …]]`; `None` for an entry deleted while
/// pending (its fields nil).
pub fn entry(value: &Value) -> Option<Entry> {
    let [id, fields] = items(value) else {
        return None;
    };
    let id = text(id)?;
    let fields = match fields {
        Value::Nil => return None,
        f => items(f)
            .chunks(2)
            .filter_map(|c| match c {
                [Value::BulkString(k), Value::BulkString(v)] => {
                    Some((String::from_utf8_lossy(k).into_owned(), v.clone()))
                }
                _ => None,
            })
            .collect(),
    };
    Some(Entry { id, fields })
}

/// Entries of an `XRANGE` reply.
pub fn entries(value: &Value) -> Vec<Entry> {
    items(value).iter().filter_map(entry).collect()
}

/// An `XREADGROUP` reply: per stream, its entries (and the ids of entries
/// deleted while pending, whose fields are nil).
pub fn streams(value: &Value) -> Vec<(String, Vec<Entry>, Vec<String>)> {
    let per_stream: Vec<(String, &Value)> = match value {
        Value::Map(m) => m.iter().filter_map(|(k, v)| Some((text(k)?, v))).collect(),
        other => items(other)
            .iter()
            .filter_map(|s| match items(s) {
                [k, v] => Some((text(k)?, v)),
                _ => None,
            })
            .collect(),
    };
    per_stream
        .into_iter()
        .map(|(key, list)| {
            let mut got = Vec::new();
            let mut gone = Vec::new();
            for e in items(list) {
                match entry(e) {
                    Some(e) => got.push(e),
                    None => {
                        if let Some(id) = items(e).first().and_then(text) {
                            gone.push(id);
                        }
                    }
                }
            }
            (key, got, gone)
        })
        .collect()
}

/// An `XAUTOCLAIM` reply: the next cursor, the claimed entries, the ids of
/// pending entries that no longer exist (trimmed).
pub fn autoclaim(value: &Value) -> (String, Vec<Entry>, Vec<String>) {
    let parts = items(value);
    let cursor = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
    let claimed = parts.get(1).map(entries).unwrap_or_default();
    let deleted = parts
        .get(2)
        .map(|d| items(d).iter().filter_map(text).collect())
        .unwrap_or_default();
    (cursor, claimed, deleted)
}

/// One consumer group as `XINFO GROUPS` describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    pub consumers: u64,
    /// Delivered and not acknowledged.
    pub pending: u64,
    /// Not delivered yet (`None` when Redis cannot tell, after deletions).
    pub lag: Option<u64>,
}

impl GroupInfo {
    /// Entries the group holds: unread and unsettled.
    pub fn waiting(&self) -> u64 {
        self.pending + self.lag.unwrap_or(0)
    }
}

/// `XINFO GROUPS`.
pub fn groups(value: &Value) -> Vec<GroupInfo> {
    items(value)
        .iter()
        .filter_map(|g| {
            let fields = pairs(g);
            let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v);
            let count = |k: &str| get(k).and_then(int).and_then(|n| u64::try_from(n).ok());
            Some(GroupInfo {
                name: text(get("name")?)?,
                consumers: count("consumers").unwrap_or(0),
                pending: count("pending").unwrap_or(0),
                lag: count("lag"),
            })
        })
        .collect()
}

/// Runs `XINFO GROUPS` on `key`; no groups when the stream does not exist.
pub fn info_groups(con: &mut redis::Connection, key: &str) -> redis::RedisResult<Vec<GroupInfo>> {
    match redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(key)
        .query::<Value>(con)
    {
        Ok(v) => Ok(groups(&v)),
        Err(e) if is_reply(&e) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn replies_of_xreadgroup_xautoclaim_and_xinfo_are_read() {
        let entry = Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![
                bulk("routing_key"),
                bulk("a.b"),
                bulk("body"),
                bulk("{}"),
            ]),
        ]);
        let deleted = Value::Array(vec![bulk("2-0"), Value::Nil]);
        let read = Value::Array(vec![Value::Array(vec![
            bulk("sb:x:events"),
            Value::Array(vec![entry.clone(), deleted]),
        ])]);
        let streams = streams(&read);
        assert_eq!(streams.len(), 1);
        let (key, got, gone) = &streams[0];
        assert_eq!(key, "sb:x:events");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "1-0");
        assert_eq!(got[0].field("routing_key"), Some(&b"a.b"[..]));
        assert_eq!(gone, &["2-0".to_string()]);

        let claimed = Value::Array(vec![
            bulk("5-0"),
            Value::Array(vec![entry]),
            Value::Array(vec![bulk("3-0")]),
        ]);
        let (cursor, claimed, trimmed) = autoclaim(&claimed);
        assert_eq!(cursor, "5-0");
        assert_eq!(claimed.len(), 1);
        assert_eq!(trimmed, ["3-0"]);

        let info = Value::Array(vec![Value::Array(vec![
            bulk("name"),
            bulk("billing"),
            bulk("consumers"),
            Value::Int(2),
            bulk("pending"),
            Value::Int(3),
            bulk("last-delivered-id"),
            bulk("9-0"),
            bulk("entries-read"),
            Value::Nil,
            bulk("lag"),
            Value::Nil,
        ])]);
        let groups = groups(&info);
        assert_eq!(
            groups,
            [GroupInfo {
                name: "billing".into(),
                consumers: 2,
                pending: 3,
                lag: None,
            }]
        );
        assert_eq!(groups[0].waiting(), 3);
    }

    #[test]
    fn backoff_doubles_to_five_seconds_and_resets() {
        let mut b = Backoff::new();
        let pauses: Vec<u128> = (0..8).map(|_| b.pause().as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.pause(), Duration::from_millis(100));
    }
}
