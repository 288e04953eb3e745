//! Why an event was not handled: the plugin's own verdict, or what the sandbox
//! saw. Dispatch needs one thing from this (retry or dead-letter now); people
//! need the rest (a reason that says what happened).

use std::borrow::Cow;
use std::time::Duration;

use serde::Serialize;

/// Longest failure reason kept, in bytes. A reason is a sentence for people, and
/// it goes to logs and dead-letter headers (on RabbitMQ the whole header table
/// must fit in one frame), but a guest, or an input a plugin quotes, can make it
/// any length: what is longer is cut (see [`excerpt`]).
pub const MAX_REASON: usize = 1024;

/// `text` cut to at most `max` bytes, on a character boundary, followed by a note
/// of how many bytes were left out; `text` itself when it is short enough.
pub fn excerpt(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!(
        "{}… ({} more bytes)",
        &text[..end],
        text.len() - end
    ))
}

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

    /// The same failure with its reason cut to [`MAX_REASON`] bytes.
    pub(crate) fn bounded(self) -> Self {
        let cut = |reason: String| match excerpt(&reason, MAX_REASON) {
            Cow::Borrowed(_) => reason,
            Cow::Owned(cut) => cut,
        };
        match self {
            Self::Retry(r) => Self::Retry(cut(r)),
            Self::Reject(r) => Self::Reject(cut(r)),
            Self::Timeout(r) => Self::Timeout(cut(r)),
            Self::OutOfMemory(r) => Self::OutOfMemory(cut(r)),
            Self::StackOverflow(r) => Self::StackOverflow(cut(r)),
            Self::Panic(r) => Self::Panic(cut(r)),
            Self::Trap(r) => Self::Trap(cut(r)),
            Self::KvUnavailable(r) => Self::KvUnavailable(cut(r)),
            Self::InvalidOutput(r) => Self::InvalidOutput(cut(r)),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reasons_are_cut_on_a_character_boundary_with_a_note() {
        assert_eq!(excerpt("short", 10), "short");
        let long = format!("{}é{}", "a".repeat(9), "b".repeat(100));
        // Byte 10 is inside the "é": the cut falls before it.
        assert_eq!(
            excerpt(&long, 10),
            format!("{}… (102 more bytes)", "a".repeat(9))
        );
        let huge = Failure::Reject("x".repeat(1 << 20)).bounded();
        assert!(
            huge.reason().len() < MAX_REASON + 32,
            "{}",
            huge.reason().len()
        );
        assert!(
            huge.reason()
                .ends_with(&format!("({} more bytes)", (1 << 20) - MAX_REASON))
        );
        assert_eq!(huge.kind(), "reject");
        assert_eq!(
            Failure::Retry("later".into()).bounded(),
            Failure::Retry("later".into())
        );
    }
}
