//! The environment's part of the configuration: secrets and deployment-specific
//! addresses, which do not belong in a file that is committed.
//!
//! - `RABBITMQ_URL` replaces `[broker] url`.
//! - Without it, `RABBITMQ_HOST` (with `RABBITMQ_PORT` = 5672, `RABBITMQ_USER` =
//!   guest, `RABBITMQ_PASSWORD` or `RABBITMQ_PASS` = guest, `RABBITMQ_VHOST` =
//!   `/`) builds the URL, the way the official RabbitMQ images and most
//!   platforms hand them out.
//! - The consumer settings services already carry set `[defaults]` where the
//!   file sets nothing: `RABBITMQ_PREFETCH` → `prefetch`, `RABBITMQ_RETRY_COUNT`
//!   (retries after the first attempt) → `max_attempts` = count + 1, and
//!   `RABBITMQ_RETRY_DELAY` (ms) → `backoff.initial` (and `backoff.max` when it
//!   is the longer and the file sets no `max`).
//! - `RABBITMQ_DLQ_TTL` (ms) sets `[broker] dlq_ttl`, how long dead letters are
//!   kept, when the file sets none.
//! - `REDIS_BUS_URL` replaces `[broker] url` when `[broker] kind =
//!   "redis-streams"` (and only then; the `RABBITMQ_*` variables apply only
//!   when `kind` is unset or `"rabbitmq"`).
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
        // The bus named by `kind` takes only its own variable: a RABBITMQ_URL
        // left in the environment does not turn a Redis Streams router into a
        // RabbitMQ one, nor does REDIS_BUS_URL choose Redis by itself.
        let kind = self.broker.kind;
        if kind == Some(super::BrokerKind::RedisStreams) {
            if let Some(url) = var("REDIS_BUS_URL") {
                self.broker.url = Some(Secret::new(url.trim()));
            }
        } else if kind == Some(super::BrokerKind::Embedded) {
            // Chosen explicitly: the RabbitMQ variables do not apply.
        } else if let Some(url) = var("RABBITMQ_URL") {
            self.broker.url = Some(Secret::new(url.trim()));
        } else if let Some(host) = var("RABBITMQ_HOST") {
            let port = var("RABBITMQ_PORT").unwrap_or_else(|| "5672".into());
            if port.trim().parse::<u16>().is_err() {
                self.env_errors
                    .push(format!("RABBITMQ_PORT: not a port number: {port:?}"));
            }
            let user = var("RABBITMQ_USER").unwrap_or_else(|| "guest".into());
            let password = var("RABBITMQ_PASSWORD")
                .or_else(|| var("RABBITMQ_PASS"))
                .unwrap_or_else(|| "guest".into());
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
        self.apply_env_defaults(&var);
        if let Some(text) = var("RABBITMQ_DLQ_TTL")
            && self.broker.dlq_ttl.is_none()
        {
            match text.trim().parse::<u64>() {
                Ok(ms) => self.broker.dlq_ttl = Some(std::time::Duration::from_millis(ms)),
                Err(_) => self.env_errors.push(format!(
                    "RABBITMQ_DLQ_TTL: not a whole number of milliseconds: {text:?}"
                )),
            }
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

impl RouterConfig {
    /// `RABBITMQ_PREFETCH`, `RABBITMQ_RETRY_COUNT` and `RABBITMQ_RETRY_DELAY`
    /// onto `[defaults]`, each only where the file sets nothing.
    fn apply_env_defaults(&mut self, var: &impl Fn(&str) -> Option<String>) {
        let unset = |key: &str, file: &std::collections::BTreeSet<String>| !file.contains(key);
        let number = |name: &str, errors: &mut Vec<String>| -> Option<u64> {
            let text = var(name)?;
            match text.trim().parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => {
                    errors.push(format!("{name}: not a whole number: {text:?}"));
                    None
                }
            }
        };
        let file = self.file_defaults.clone();
        if let Some(n) = number("RABBITMQ_PREFETCH", &mut self.env_errors)
            && unset("prefetch", &file)
        {
            match u16::try_from(n) {
                Ok(n) => self.defaults.prefetch = n,
                Err(_) => self
                    .env_errors
                    .push(format!("RABBITMQ_PREFETCH: {n} is more than 65535")),
            }
        }
        if let Some(n) = number("RABBITMQ_RETRY_COUNT", &mut self.env_errors)
            && unset("max_attempts", &file)
        {
            self.defaults.max_attempts = u32::try_from(n.saturating_add(1)).unwrap_or(u32::MAX);
        }
        if let Some(ms) = number("RABBITMQ_RETRY_DELAY", &mut self.env_errors)
            && unset("backoff.initial", &file)
        {
            let delay = std::time::Duration::from_millis(ms);
            self.defaults.backoff.initial = delay;
            if unset("backoff.max", &file) && self.defaults.backoff.max < delay {
                self.defaults.backoff.max = delay;
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
