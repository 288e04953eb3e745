//! The shared store: Redis, for replicas that must see the same plugin state.
//!
//! A plugin's key `k` is the Redis key `<prefix>:<plugin>:<k>` (plugin names
//! have no `:`, so namespaces cannot overlap). Values are Redis strings, expiry is
//! Redis's own (`PX`), counters are `INCRBY` (which keeps the expiry), claims are
//! `SET NX` and compare-and-set is a short Lua script — every call is one atomic
//! step on the server, whichever replica makes it.
//!
//! Calls come from the threads that run plugins, so they are synchronous and
//! bounded: connections come from a pool (waiting at most `timeout` for one,
//! connecting included), and each command waits at most `timeout` to be written
//! and `timeout` for its reply. Anything else than an answer from Redis (refused,
//! reset, timed out) is [`KvError::Unavailable`], which fails the event to be
//! retried, and the connection it happened on is dropped rather than reused: a
//! late reply must never be read as the answer to the next command.

use std::time::Duration;

use redis::{ConnectionLike, RedisError, Value};

use super::{KvError, KvStore};
use crate::config::Secret;
use crate::redis_pool;

/// Longest expiry passed to Redis (a hundred years): far beyond any useful ttl,
/// and far from overflowing Redis's clock arithmetic.
const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// Replace the value only if it is what the caller saw. ARGV: 1 = expects a
/// value ("1") or absence ("0"), 2 = the expected value, 3 = the new value,
/// 4 = ttl in ms ("" = none).
const COMPARE_AND_SET: &str = r"
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return 0 end
elseif current then
  return 0
end
if ARGV[4] == '' then
  redis.call('SET', KEYS[1], ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
end
return 1
";

/// How to reach Redis: `[kv]` of router.toml.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://[:password@]host[:port][/db]`, `rediss://` for TLS.
    pub url: Secret,
    /// First part of every key.
    pub prefix: String,
    /// Most connections open at once.
    pub pool_size: u32,
    /// Longest wait for a connection, and for each command's write and reply.
    pub timeout: Duration,
}

/// A [`KvStore`] on a Redis server shared by every replica.
pub struct RedisStore {
    pool: r2d2::Pool<redis_pool::Connector>,
    prefix: String,
    url: Secret,
    compare_and_set: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url.redacted())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store for `settings`. Connects lazily: a Redis that is down now only
    /// fails the calls made while it is (see [`RedisStore::ping`]).
    pub fn new(settings: &RedisSettings) -> Result<Self, KvError> {
        let (pool, _) =
            redis_pool::open(&settings.url, settings.pool_size, settings.timeout, "redis")
                .map_err(|why| KvError::Unavailable(format!("kv.url {why}")))?;
        Ok(Self {
            pool,
            prefix: settings.prefix.clone(),
            url: settings.url.clone(),
            compare_and_set: redis::Script::new(COMPARE_AND_SET),
        })
    }

    /// Whether Redis answers now, or why not.
    pub fn ping(&self) -> Result<(), KvError> {
        self.run("PING", |conn| {
            redis::cmd("PING").query::<String>(conn).map(drop)
        })
    }

    /// Removes every key under this store's prefix (all plugins' state), e.g.
    /// when a router is decommissioned; returns how many. Uses `SCAN`, so Redis
    /// keeps serving others meanwhile.
    pub fn remove_all(&self) -> Result<u64, KvError> {
        let pattern = format!("{}:*", self.prefix);
        let keys: Vec<Vec<u8>> = self.run("SCAN", |conn| {
            let mut keys = Vec::new();
            let mut cursor = 0_u64;
            loop {
                let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(conn)?;
                keys.extend(batch);
                if next == 0 {
                    return Ok(keys);
                }
                cursor = next;
            }
        })?;
        let mut removed = 0;
        for chunk in keys.chunks(500) {
            removed += self.run("DEL", |conn| {
                redis::cmd("DEL").arg(chunk).query::<u64>(conn)
            })?;
        }
        Ok(removed)
    }

    /// Where this store's data lives, without credentials.
    pub fn describe(&self) -> String {
        format!(
            "redis {} (keys {}:<plugin>:<key>)",
            self.url.redacted(),
            self.prefix
        )
    }

    fn key(&self, namespace: &str, key: &str) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + namespace.len() + key.len() + 2);
        full.extend_from_slice(self.prefix.as_bytes());
        full.push(b':');
        full.extend_from_slice(namespace.as_bytes());
        full.push(b':');
        full.extend_from_slice(key.as_bytes());
        full
    }

    /// Runs one command on a pooled connection, mapping failures: Redis's own
    /// error replies go through `reply_error`, everything else is an outage.
    fn run_with<T>(
        &self,
        what: &str,
        reply_error: impl FnOnce(&RedisError) -> Option<KvError>,
        command: impl FnOnce(&mut dyn ConnectionLike) -> Result<T, RedisError>,
    ) -> Result<T, KvError> {
        let mut conn = self.pool.get().map_err(|e| {
            KvError::Unavailable(format!(
                "no connection to redis {}: {}",
                self.url.redacted(),
                self.url.scrub(&e.to_string())
            ))
        })?;
        match conn.run(|c| command(c)) {
            Ok(value) => Ok(value),
            Err(error) => {
                if redis_pool::is_reply(&error)
                    && let Some(mapped) = reply_error(&error)
                {
                    return Err(mapped);
                }
                Err(KvError::Unavailable(format!(
                    "redis {} {what}: {}",
                    self.url.redacted(),
                    self.url.scrub(&error.to_string())
                )))
            }
        }
    }

    fn run<T>(
        &self,
        what: &str,
        command: impl FnOnce(&mut dyn ConnectionLike) -> Result<T, RedisError>,
    ) -> Result<T, KvError> {
        self.run_with(what, |_| None, command)
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_TTL_MS)
}

/// `SET key value [NX] [PX ttl]`.
fn set_command(
    key: Vec<u8>,
    value: &[u8],
    only_if_absent: bool,
    ttl: Option<Duration>,
) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg(value);
    if only_if_absent {
        cmd.arg("NX");
    }
    if let Some(ttl) = ttl {
        cmd.arg("PX").arg(ttl_ms(ttl));
    }
    cmd
}

impl KvStore for RedisStore {
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let key = self.key(namespace, key);
        self.run("GET", |conn| redis::cmd("GET").arg(key).query(conn))
    }

    fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), KvError> {
        let cmd = set_command(self.key(namespace, key), value, false, ttl);
        self.run("SET", |conn| cmd.query::<Value>(conn).map(drop))
    }

    fn delete(&self, namespace: &str, key: &str) -> Result<bool, KvError> {
        let key = self.key(namespace, key);
        self.run("DEL", |conn| {
            redis::cmd("DEL").arg(key).query::<i64>(conn).map(|n| n > 0)
        })
    }

    fn incr(&self, namespace: &str, key: &str, delta: i64) -> Result<i64, KvError> {
        let full = self.key(namespace, key);
        self.run_with(
            "INCRBY",
            // "value is not an integer or out of range", "... would overflow".
            |error| {
                let detail = error.detail().unwrap_or_default();
                (detail.contains("not an integer") || detail.contains("overflow")).then(|| {
                    KvError::NotANumber(format!(
                        "value under {key:?} is not a decimal integer, or the counter would overflow"
                    ))
                })
            },
            |conn| redis::cmd("INCRBY").arg(full).arg(delta).query(conn),
        )
    }

    fn set_if_absent(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, KvError> {
        let cmd = set_command(self.key(namespace, key), value, true, ttl);
        self.run("SET NX", |conn| {
            cmd.query::<Value>(conn).map(|reply| reply != Value::Nil)
        })
    }

    fn compare_and_set(
        &self,
        namespace: &str,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, KvError> {
        let mut invocation = self.compare_and_set.key(self.key(namespace, key));
        invocation
            .arg(if expected.is_some() { "1" } else { "0" })
            .arg(expected.unwrap_or_default())
            .arg(value)
            .arg(ttl.map_or_else(String::new, |ttl| ttl_ms(ttl).to_string()));
        self.run("compare-and-set", |conn| {
            invocation.invoke::<i64>(conn).map(|swapped| swapped == 1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Instant;

    /// The local Redis, or `None` (skipped) outside CI; in CI a missing Redis
    /// is a failure, as a missing broker is.
    fn local_store(label: &str) -> Option<RedisStore> {
        let store = RedisStore::new(&RedisSettings {
            url: Secret::new("redis://127.0.0.1:6379/0"),
            prefix: format!("sb-test-{label}-{}", uuid::Uuid::now_v7().simple()),
            pool_size: 16,
            timeout: Duration::from_secs(2),
        })
        .unwrap();
        match store.ping() {
            Ok(()) => Some(store),
            Err(e) if std::env::var_os("CI").is_some() => {
                panic!("Redis must run at 127.0.0.1:6379 in CI: {e}")
            }
            Err(e) => {
                eprintln!("skipped: no Redis at 127.0.0.1:6379 ({e})");
                None
            }
        }
    }

    /// Removes every key the test made.
    fn cleanup(store: &RedisStore) {
        store.remove_all().unwrap();
    }

    #[test]
    fn conforms() {
        let Some(store) = local_store("conformance") else {
            return;
        };
        crate::kv::conformance::all(&store);
        cleanup(&store);
        assert_eq!(
            store.get("c", "n").unwrap(),
            None,
            "remove_all removed it all"
        );
    }

    #[test]
    fn keys_are_prefixed_and_namespaced() {
        let Some(store) = local_store("layout") else {
            return;
        };
        store.set("billing", "bill:1", b"open", None).unwrap();
        let raw: Option<Vec<u8>> = store
            .run("GET", |conn| {
                redis::cmd("GET")
                    .arg(format!("{}:billing:bill:1", store.prefix))
                    .query(conn)
            })
            .unwrap();
        assert_eq!(raw.as_deref(), Some(&b"open"[..]));
        cleanup(&store);
    }

    #[test]
    fn a_silent_server_fails_each_call_within_the_timeout() {
        // Accepts connections, never answers: a Redis that hangs.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = std::thread::spawn(move || {
            let mut open = Vec::new();
            for stream in listener.incoming() {
                open.push(stream);
            }
        });
        let store = RedisStore::new(&RedisSettings {
            url: Secret::new(format!("redis://:hunter22@{addr}/0")),
            prefix: "p".into(),
            pool_size: 2,
            timeout: Duration::from_millis(200),
        })
        .unwrap();
        for _ in 0..3 {
            let started = Instant::now();
            let err = store.get("billing", "k").unwrap_err();
            let took = started.elapsed();
            assert!(matches!(err, KvError::Unavailable(_)), "{err:?}");
            assert!(took < Duration::from_secs(2), "took {took:?}");
            assert!(!err.to_string().contains("hunter22"), "{err}");
        }
    }

    #[test]
    fn a_refused_connection_is_unavailable_and_names_no_password() {
        // A port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = RedisStore::new(&RedisSettings {
            url: Secret::new(format!("redis://app:s3cret-pw@127.0.0.1:{port}/0")),
            prefix: "p".into(),
            pool_size: 2,
            timeout: Duration::from_millis(200),
        })
        .unwrap();
        let err = store.set("billing", "k", b"v", None).unwrap_err();
        assert!(matches!(err, KvError::Unavailable(_)), "{err:?}");
        let text = err.to_string();
        assert!(!text.contains("s3cret-pw"), "{text}");
        assert!(text.contains("redis://***@127.0.0.1"), "{text}");
        assert!(store.ping().is_err());
    }

    #[test]
    fn a_malformed_url_is_refused_up_front() {
        let err = RedisStore::new(&RedisSettings {
            url: Secret::new("http://:pw1234@host"),
            prefix: "p".into(),
            pool_size: 1,
            timeout: Duration::from_millis(200),
        })
        .unwrap_err();
        assert!(err.to_string().contains("not a Redis URL"), "{err}");
        assert!(!err.to_string().contains("pw1234"), "{err}");
    }
}
