//! Why an event was not handled: the plugin's own verdict, or what the sandbox
//! saw. Dispatch needs one thing from this (retry or dead-letter now); people
//! need the rest (a reason that says what happened).

use std::time::Duration;

use serde::Serialize;

/// The failure of one event in one plugin. Never the failure of the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "reason", rename_all = "snake_case")]
pub enum Failure {
    /// The plugin asked for the event to be retried later.
    Retry(String),
    /// The plugin declared the event unprocessable.
    Reject(String),
    /// The event took longer than the plugin's wall-time limit.
    Timeout(String),
    /// The instance tried to grow its memory past the plugin's limit.
    OutOfMemory(String),
    /// The guest exhausted its stack (usually unbounded recursion).
    StackOverflow(String),
    /// The guest aborted: a Rust `panic!`, a C `abort()`, an `unreachable`.
    Panic(String),
    /// Any other trap (division by zero, out-of-bounds access, ...).
    Trap(String),
    /// The key-value store could not be reached during the event.
    KvUnavailable(String),
    /// The plugin returned outputs the host will not publish.
    InvalidOutput(String),
}

impl Failure {
    pub(crate) fn timeout(limit: Duration) -> Self {
        Self::Timeout(format!(
            "exceeded the {} ms wall-time limit",
            limit.as_millis()
        ))
    }

    pub(crate) fn out_of_memory(limit: u64, wanted: usize) -> Self {
        Self::OutOfMemory(format!(
            "tried to grow linear memory to {wanted} bytes, over the {limit}-byte limit"
        ))
    }

    /// Whether dispatch should try the event again (with backoff, up to the
    /// plugin's `max_attempts`) rather than dead-letter it at once. Everything
    /// transient is retried, including traps; only the plugin's own `reject` and
    /// outputs that can never be published go straight to the dead-letter queue.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Reject(_) | Self::InvalidOutput(_))
    }

    /// A short, stable name for metrics and dead-letter headers.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Retry(_) => "retry",
            Self::Reject(_) => "reject",
            Self::Timeout(_) => "timeout",
            Self::OutOfMemory(_) => "out_of_memory",
            Self::StackOverflow(_) => "stack_overflow",
            Self::Panic(_) => "panic",
            Self::Trap(_) => "trap",
            Self::KvUnavailable(_) => "kv_unavailable",
            Self::InvalidOutput(_) => "invalid_output",
        }
    }

    /// The human part: what happened.
    pub fn reason(&self) -> &str {
        match self {
            Self::Retry(r)
            | Self::Reject(r)
            | Self::Timeout(r)
            | Self::OutOfMemory(r)
            | Self::StackOverflow(r)
            | Self::Panic(r)
            | Self::Trap(r)
            | Self::KvUnavailable(r)
            | Self::InvalidOutput(r) => r,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind(), self.reason())
    }
}
