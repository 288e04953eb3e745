//! Pooled Redis connections, shared by the kv store ([`crate::kv::redis`]) and
//! the Redis Streams bus ([`crate::bus::redis`]).
//!
//! Every connection has read and write timeouts. One on which a command
//! failed other than by Redis answering with an error is marked broken and
//! dropped by the pool, never reused: a late reply must not be read as the
//! answer to the next command. The next checkout connects again.

use std::time::Duration;

use redis::{ConnectionLike, ErrorKind, RedisError};

use crate::config::Secret;

/// One pooled connection, and whether it may be reused.
pub struct Conn {
    pub inner: redis::Connection,
    /// Set when a command failed other than by Redis answering with an error:
    /// the connection's state is unknown, so the pool drops it.
    broken: bool,
}

impl Conn {
    /// Runs `f` on the connection; marks it broken when the failure was not
    /// Redis answering.
    pub fn run<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let result = f(&mut self.inner);
        if let Err(e) = &result
            && !is_reply(e)
        {
            self.broken = true;
        }
        result
    }
}

/// Opens connections, each with its timeouts set.
#[derive(Clone)]
pub struct Connector {
    client: redis::Client,
    timeout: Duration,
}

impl Connector {
    /// A connection whose connect and writes wait at most the connector's
    /// timeout, and whose reads wait at most `read_timeout`.
    pub fn connect(&self, read_timeout: Duration) -> Result<redis::Connection, RedisError> {
        let inner = self.client.get_connection_with_timeout(self.timeout)?;
        inner.set_read_timeout(Some(read_timeout))?;
        inner.set_write_timeout(Some(self.timeout))?;
        Ok(inner)
    }
}

impl r2d2::ManageConnection for Connector {
    type Connection = Conn;
    type Error = RedisError;

    fn connect(&self) -> Result<Conn, RedisError> {
        Ok(Conn {
            inner: Connector::connect(self, self.timeout)?,
            broken: false,
        })
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), RedisError> {
        redis::cmd("PING")
            .query::<String>(&mut conn.inner)
            .map(drop)
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.broken || !conn.inner.is_open()
    }
}

/// Connection errors go to the log at debug level: the command that needed
/// the connection reports the outage, once, rather than once per attempt.
#[derive(Debug)]
struct LogErrors {
    url: Secret,
    what: &'static str,
}

impl r2d2::HandleError<RedisError> for LogErrors {
    fn handle_error(&self, error: RedisError) {
        tracing::debug!(
            redis = %self.url.redacted(),
            error = %self.url.scrub(&error.to_string()),
            "{} connection failed", self.what
        );
    }
}

/// The client for `url` and a pool of at most `size` connections (connecting
/// lazily), each waiting at most `timeout`; `what` names the user in logs.
/// `Err` is the URL's problem, without its password.
pub fn open(
    url: &Secret,
    size: u32,
    timeout: Duration,
    what: &'static str,
) -> Result<(r2d2::Pool<Connector>, Connector), String> {
    let client = redis::Client::open(url.expose()).map_err(|e| {
        format!(
            "\"{}\" is not a Redis URL: {}",
            url.redacted(),
            url.scrub(&e.to_string())
        )
    })?;
    let connector = Connector { client, timeout };
    let pool = r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(timeout)
        // A ping per call would double the round trips; a connection that
        // fails a command is dropped instead (`Conn::broken`).
        .test_on_check_out(false)
        .error_handler(Box::new(LogErrors {
            url: url.clone(),
            what,
        }))
        .build_unchecked(connector.clone());
    Ok((pool, connector))
}

/// Redis answered, with an error: the connection is fine.
pub fn is_reply(error: &RedisError) -> bool {
    matches!(error.kind(), ErrorKind::Server(_) | ErrorKind::Extension)
}
