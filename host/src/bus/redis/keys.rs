//! Where everything lives in Redis, for one prefix.
//!
//! - `<prefix>:x:<exchange>`: an exchange's stream. Every plugin bound to the
//!   exchange is a consumer group on it (named after the plugin); the router
//!   matches routing keys itself, with the same matcher as everywhere.
//! - `<prefix>:q:<plugin>`: the plugin's own stream, read only by its group:
//!   retries that are due, redriven dead letters, replays.
//! - `<prefix>:retry:<plugin>`: a sorted set of retries waiting, scored by the
//!   time (ms) they are due; moved to the plugin's stream when due.
//! - `<prefix>:delay`: a sorted set of delayed outputs, scored by when due;
//!   published to their exchange's stream when due.
//! - `<prefix>:dlq:<plugin>`: the plugin's dead letters, a stream.
//! - `<prefix>:routes`: a hash, exchange → the bindings on it (JSON), as the
//!   last router that applied a configuration declared them: what
//!   `switchboard publish` decides "routed" by, and which groups a
//!   configuration no longer names are removed.

/// The key names for one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The stream of `exchange`.
    pub fn exchange(&self, exchange: &str) -> String {
        format!("{}:x:{exchange}", self.prefix)
    }

    /// The exchange whose stream `key` is, if it is one.
    pub fn exchange_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(self.prefix.as_str())?.strip_prefix(":x:")
    }

    /// The stream only `plugin`'s group reads (retries, redrives, replays).
    pub fn queue(&self, plugin: &str) -> String {
        format!("{}:q:{plugin}", self.prefix)
    }

    /// Retries of `plugin` waiting, by due time.
    pub fn retries(&self, plugin: &str) -> String {
        format!("{}:retry:{plugin}", self.prefix)
    }

    /// Delayed outputs waiting, by due time (every plugin's).
    pub fn delayed(&self) -> String {
        format!("{}:delay", self.prefix)
    }

    /// `plugin`'s dead letters.
    pub fn dlq(&self, plugin: &str) -> String {
        format!("{}:dlq:{plugin}", self.prefix)
    }

    /// The bindings as last declared, by exchange.
    pub fn routes(&self) -> String {
        format!("{}:routes", self.prefix)
    }
}

/// This process's consumer name in every group: host, pid and a random
/// suffix, so that two processes never share one (a restarted process is a
/// new consumer; what the old one held is claimed after `claim_idle`).
pub fn consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    // A v7 UUID ends in random bits.
    let uuid = uuid::Uuid::now_v7().simple().to_string();
    let random = &uuid[uuid.len() - 8..];
    format!("{host}-{}-{random}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_and_exchange_streams_are_recognised() {
        let keys = Keys::new("sb");
        assert_eq!(keys.exchange("payments"), "sb:x:payments");
        assert_eq!(keys.exchange_of("sb:x:payments"), Some("payments"));
        assert_eq!(keys.exchange_of("sb:q:billing"), None);
        assert_eq!(keys.exchange_of("other:x:payments"), None);
        assert_eq!(keys.queue("billing"), "sb:q:billing");
        assert_eq!(keys.retries("billing"), "sb:retry:billing");
        assert_eq!(keys.dlq("billing"), "sb:dlq:billing");
        assert_eq!(keys.delayed(), "sb:delay");
        let (a, b) = (consumer_name(), consumer_name());
        assert_ne!(a, b, "unique per call");
        assert!(a.contains(&format!("-{}-", std::process::id())), "{a}");
    }
}
