//! `logging.log`: a plugin's log lines go into the host's `tracing` output,
//! tagged with the plugin and the event being handled. A guest cannot flood the
//! log: lines are cut at [`MAX_LINE`] bytes and at most [`MAX_LINES_PER_EVENT`]
//! are kept per event, with one warning saying how many were dropped.

use crate::runtime::bindings::switchboard::plugin::logging::{Host, Level};
use crate::runtime::store::InstanceState;

pub(crate) const MAX_LINE: usize = 4096;
pub(crate) const MAX_LINES_PER_EVENT: u32 = 100;

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
        let message = truncate(&message);
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
    fn truncates_on_a_char_boundary() {
        let long = "é".repeat(MAX_LINE);
        let cut = truncate(&long);
        assert!(cut.len() <= MAX_LINE && cut.len() >= MAX_LINE - 1);
        assert_eq!(truncate("short"), "short");
    }
}
