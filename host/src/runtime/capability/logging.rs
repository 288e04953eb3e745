//! `logging.log`: a plugin's log lines go into the host's `tracing` output
//! (target `plugin`), tagged with the plugin and the event being handled, inside
//! the event's span (kind, id, correlation id, attempt). A guest cannot flood the
//! log: lines are cut at [`MAX_LINE`] bytes, at most [`MAX_LINES_PER_EVENT`] are
//! kept per event, and each plugin may log at most [`LINES_PER_SECOND`] lines a
//! second on average (bursts of [`BURST`]), across all its instances; what is
//! dropped is counted and reported in one warning per second at most.
//!
//! The newest [`RECENT_LINES`] lines each plugin logged (whatever the log
//! filter lets through) are also kept in memory, for the console's plugin page.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use crate::runtime::bindings::switchboard::plugin::logging::{Host, Level};
use crate::runtime::store::InstanceState;

pub(crate) const MAX_LINE: usize = 4096;
pub(crate) const MAX_LINES_PER_EVENT: u32 = 100;
/// Sustained log lines per second per plugin.
pub(crate) const LINES_PER_SECOND: f64 = 200.0;
/// Lines a plugin may log at once after a quiet spell.
pub(crate) const BURST: f64 = 1000.0;

/// Log lines kept per plugin for [`RecentLogs::recent`].
pub const RECENT_LINES: usize = 200;

/// One line a plugin logged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    /// When, RFC 3339.
    pub at: String,
    pub level: &'static str,
    /// The event being handled.
    pub event_id: String,
    pub message: String,
}

/// The newest lines of every plugin, across its versions and instances.
#[derive(Debug, Default)]
pub struct RecentLogs {
    lines: Mutex<HashMap<String, VecDeque<LogLine>>>,
}

impl RecentLogs {
    fn record(&self, plugin: &str, line: LogLine) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let kept = lines.entry(plugin.to_string()).or_default();
        if kept.len() >= RECENT_LINES {
            kept.pop_front();
        }
        kept.push_back(line);
    }

    /// `plugin`'s newest lines, oldest first.
    pub fn recent(&self, plugin: &str) -> Vec<LogLine> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(plugin)
            .map(|kept| kept.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// A token bucket shared by a plugin's instances.
#[derive(Debug)]
pub(crate) struct RateLimit {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    dropped: u64,
    warned: Option<Instant>,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            state: Mutex::new(Bucket {
                tokens: BURST,
                refilled: Instant::now(),
                dropped: 0,
                warned: None,
            }),
        }
    }
}

impl RateLimit {
    /// Whether one more line may be logged now. When not, the line is counted;
    /// the return value's second part is how many to report as dropped now
    /// (at most once a second).
    fn take(&self, now: Instant) -> (bool, Option<u64>) {
        let mut b = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
        b.tokens = (b.tokens + elapsed * LINES_PER_SECOND).min(BURST);
        b.refilled = now;
        let allowed = b.tokens >= 1.0;
        if allowed {
            b.tokens -= 1.0;
        } else {
            b.dropped += 1;
        }
        let due = b.dropped > 0
            && b.warned
                .is_none_or(|at| now.saturating_duration_since(at).as_secs() >= 1);
        let report = due.then(|| {
            b.warned = Some(now);
            std::mem::take(&mut b.dropped)
        });
        (allowed, report)
    }
}

/// Per-call logging state.
#[derive(Debug, Default)]
pub(crate) struct LogState {
    pub(crate) lines: u32,
}

impl LogState {
    /// Called when a call ends; reports lines dropped during it.
    pub(crate) fn finish(&mut self, plugin: &str, event_id: &str) {
        if self.lines > MAX_LINES_PER_EVENT {
            let dropped = self.lines - MAX_LINES_PER_EVENT;
            tracing::warn!(
                plugin,
                event_id,
                dropped,
                "plugin log lines dropped over the per-event cap"
            );
        }
        self.lines = 0;
    }
}

fn truncate(message: &str) -> &str {
    if message.len() <= MAX_LINE {
        return message;
    }
    let mut end = MAX_LINE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

impl Host for InstanceState {
    fn log(&mut self, level: Level, message: String) {
        self.log.lines += 1;
        if self.log.lines > MAX_LINES_PER_EVENT {
            return;
        }
        let plugin = &*self.plugin.name;
        let event_id = self.event_id.as_str();
        let (allowed, dropped) = self.plugin.log_limit.take(Instant::now());
        if let Some(dropped) = dropped {
            tracing::warn!(
                plugin,
                dropped,
                "plugin log lines dropped: over {LINES_PER_SECOND} lines a second"
            );
        }
        if !allowed {
            return;
        }
        let message = truncate(&message);
        self.plugin.recent.record(
            plugin,
            LogLine {
                at: crate::envelope::now_rfc3339(),
                level: match level {
                    Level::Trace => "trace",
                    Level::Debug => "debug",
                    Level::Info => "info",
                    Level::Warn => "warn",
                    Level::Error => "error",
                },
                event_id: event_id.to_string(),
                message: message.to_string(),
            },
        );
        match level {
            Level::Trace => tracing::trace!(target: "plugin", plugin, event_id, "{message}"),
            Level::Debug => tracing::debug!(target: "plugin", plugin, event_id, "{message}"),
            Level::Info => tracing::info!(target: "plugin", plugin, event_id, "{message}"),
            Level::Warn => tracing::warn!(target: "plugin", plugin, event_id, "{message}"),
            Level::Error => tracing::error!(target: "plugin", plugin, event_id, "{message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_noisy_plugin_is_held_to_its_rate_and_told_once_a_second() {
        let limit = RateLimit::default();
        let start = Instant::now();
        let taken: Vec<(bool, Option<u64>)> = (0..5000).map(|_| limit.take(start)).collect();
        let allowed = taken.iter().filter(|(ok, _)| *ok).count();
        assert_eq!(allowed, BURST as usize, "a burst, then nothing");
        let reports: Vec<u64> = taken.iter().filter_map(|(_, r)| *r).collect();
        assert_eq!(
            reports,
            [1],
            "the first drop is reported at once, then quiet"
        );
        // A second later: refilled by the rate, and the rest reported once.
        let later = start + std::time::Duration::from_secs(1);
        let (ok, reported) = limit.take(later);
        assert!(ok);
        assert_eq!(reported, Some(3999));
        let more = (0..1000).filter(|_| limit.take(later).0).count();
        assert_eq!(more, LINES_PER_SECOND as usize - 1);
        assert_eq!(limit.take(later).1, None, "at most one report a second");
    }

    #[test]
    fn truncates_on_a_char_boundary() {
        let long = "é".repeat(MAX_LINE);
        let cut = truncate(&long);
        assert!(cut.len() <= MAX_LINE && cut.len() >= MAX_LINE - 1);
        assert_eq!(truncate("short"), "short");
    }
}
