//! [`Failure`]: why a handler could not handle an event, and what the host should
//! do about it.

use std::fmt;

/// Why [`Plugin::handle`](crate::Plugin::handle) could not handle an event.
///
/// The variant is the plugin's verdict on the *event*, and it decides what the host
/// does next:
///
/// - [`Failure::Retry`]: transient (a dependency is not ready, the event arrived
///   before the one it depends on). The host retries the same event later with
///   backoff, up to the plugin's `max_attempts`, then dead-letters it.
/// - [`Failure::Reject`]: permanent (malformed data, a missing field). Retrying
///   cannot help; the host dead-letters the event at once.
///
/// The message ends up in the dead-letter headers and the host's log: make it one
/// sentence that names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Failure {
    /// Transient: try the same event again later.
    Retry(String),
    /// Permanent: this event can never succeed here; dead-letter it now.
    Reject(String),
}

impl Failure {
    /// A transient failure: the host retries the event later.
    pub fn retry(message: impl Into<String>) -> Self {
        Failure::Retry(message.into())
    }

    /// A permanent failure: the host dead-letters the event now.
    pub fn reject(message: impl Into<String>) -> Self {
        Failure::Reject(message.into())
    }

    /// The message, whichever the variant.
    pub fn message(&self) -> &str {
        match self {
            Failure::Retry(m) | Failure::Reject(m) => m,
        }
    }

    /// True for [`Failure::Retry`].
    pub fn is_retry(&self) -> bool {
        matches!(self, Failure::Retry(_))
    }

    /// True for [`Failure::Reject`].
    pub fn is_reject(&self) -> bool {
        matches!(self, Failure::Reject(_))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Retry(m) => write!(f, "retry: {m}"),
            Failure::Reject(m) => write!(f, "reject: {m}"),
        }
    }
}

impl std::error::Error for Failure {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_pick_the_variant() {
        assert_eq!(Failure::retry("later"), Failure::Retry("later".into()));
        assert_eq!(
            Failure::reject(String::from("never")),
            Failure::Reject("never".into())
        );
        assert!(Failure::retry("x").is_retry());
        assert!(Failure::reject("x").is_reject());
        assert_eq!(Failure::reject("bad data").message(), "bad data");
        assert_eq!(Failure::retry("not yet").to_string(), "retry: not yet");
    }
}
