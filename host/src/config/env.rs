//! The environment's part of the configuration: secrets and deployment-specific
//! addresses, which do not belong in a file that is committed.
//!
//! - `RABBITMQ_URL` replaces `[broker] url`.
//! - Without it, `RABBITMQ_HOST` (with `RABBITMQ_PORT` = 5672, `RABBITMQ_USER` =
//!   guest, `RABBITMQ_PASSWORD` = guest, `RABBITMQ_VHOST` = `/`) builds the URL,
//!   the way the official RabbitMQ images and most platforms hand them out.
//! - `REDIS_URL` replaces `[kv] url` (used with `[kv] backend = "redis"`).
//! - `SWITCHBOARD_HTTP_LISTEN` replaces `[http] listen`.
//! - `SWITCHBOARD_ADMIN_TOKEN` replaces `[http] token`.
//!
//! An empty variable counts as unset. A malformed one is reported by `validate`,
//! naming the variable.

use super::{RouterConfig, Secret, Token};

impl RouterConfig {
    /// Applies the environment, read through `lookup` (the process environment
    /// in production, a map in tests).
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        if let Some(url) = var("RABBITMQ_URL") {
            self.broker.url = Some(Secret::new(url.trim()));
        } else if let Some(host) = var("RABBITMQ_HOST") {
            let port = var("RABBITMQ_PORT").unwrap_or_else(|| "5672".into());
            if port.trim().parse::<u16>().is_err() {
                self.env_errors
                    .push(format!("RABBITMQ_PORT: not a port number: {port:?}"));
            }
            let user = var("RABBITMQ_USER").unwrap_or_else(|| "guest".into());
            let password = var("RABBITMQ_PASSWORD").unwrap_or_else(|| "guest".into());
            let vhost = var("RABBITMQ_VHOST").unwrap_or_else(|| "/".into());
            let host = host.trim();
            // An IPv6 literal needs brackets before the port.
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            self.broker.url = Some(Secret::new(format!(
                "amqp://{}:{}@{host}:{}/{}",
                percent_encode(&user),
                percent_encode(&password),
                port.trim(),
                percent_encode(&vhost),
            )));
        }
        // Only where Redis is chosen: a REDIS_URL meant for something else in
        // the same environment does not switch the backend, nor is it an error.
        if let Some(url) = var("REDIS_URL")
            && self.kv.backend == super::KvBackend::Redis
        {
            self.kv.url = Some(Secret::new(url.trim()));
        }
        if let Some(token) = var("SWITCHBOARD_ADMIN_TOKEN") {
            self.http.token = Some(Token::new(token.trim()));
        }
        if let Some(listen) = var("SWITCHBOARD_HTTP_LISTEN") {
            match listen.trim().parse() {
                Ok(addr) => self.http.listen = addr,
                Err(e) => self.env_errors.push(format!(
                    "SWITCHBOARD_HTTP_LISTEN: {listen:?} is not an address such as 0.0.0.0:8080 ({e})"
                )),
            }
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so that a
/// user, password or vhost (`/` → `%2f`) is one URL component.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}
