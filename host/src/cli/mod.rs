//! The `switchboard` command's subcommands. `main.rs` parses arguments; each
//! module here does one subcommand's work and returns its exit code.

pub mod broker;
pub mod check;
pub mod events;
pub mod kv;
pub mod new;
pub mod replay;
pub mod run;
pub mod test;

/// Parses `key=value`, for `--config` flags.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

/// The log filter of every command: `switchboard_log` (`SWITCHBOARD_LOG`), else
/// `rust_log` (`RUST_LOG`), else `info`, whichever is first set and valid.
///
/// The AMQP library (lapin) logs on its own: an `ERROR` for every channel the
/// broker closes, a trio of them for every failed connection attempt, a `WARN`
/// with the whole message for every return. Switchboard says the same in one
/// sentence of its own, so lapin's lines are off at any level unless the filter
/// names `lapin` itself (`SWITCHBOARD_LOG=info,lapin=debug` shows them; a
/// directive for one of its modules, `lapin::io_loop=debug`, shows that one).
pub fn log_filter(
    switchboard_log: Option<&str>,
    rust_log: Option<&str>,
) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    let (spec, filter) = [switchboard_log, rust_log]
        .into_iter()
        .flatten()
        .find_map(|spec| Some((spec, EnvFilter::try_new(spec).ok()?)))
        .unwrap_or_else(|| ("info", EnvFilter::new("info")));
    match "lapin=off".parse() {
        Ok(off) if !names_target(spec, "lapin") => filter.add_directive(off),
        _ => filter,
    }
}

/// Whether a filter (`target[span{field}]=level`, comma-separated) has a
/// directive for exactly `target`.
fn names_target(spec: &str, target: &str) -> bool {
    spec.split(',')
        .any(|directive| directive.split(['[', '=']).next().map(str::trim) == Some(target))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a subscriber with `filter` prints for one lapin `ERROR` (as from
    /// its `io_loop`), one lapin `INFO`, and one `INFO` of Switchboard's.
    fn printed(filter: tracing_subscriber::EnvFilter) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::error_span!(target: "lapin::io_loop", "io_loop");
            let _entered = span.enter();
            tracing::error!(target: "lapin::channel", "Channel closed");
            tracing::info!(target: "lapin::channels", "lapin info");
            tracing::info!(target: "switchboard::bus", "ours");
        });
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn lapin_is_quiet_at_every_level_unless_named() {
        for (switchboard_log, rust_log) in [
            (None, None),
            (Some("info"), None),
            (None, Some("info")),
            (Some("debug"), Some("lapin=debug")),
            (Some("trace"), None),
            (Some("switchboard=loud"), Some("info")),
            (Some("info,lapinx=debug"), None),
        ] {
            let out = printed(log_filter(switchboard_log, rust_log));
            assert!(
                out.contains("ours"),
                "{switchboard_log:?} {rust_log:?}: {out}"
            );
            assert!(
                !out.contains("lapin"),
                "{switchboard_log:?} {rust_log:?}: {out}"
            );
            assert!(!out.contains("Channel closed"), "{out}");
        }
    }

    #[test]
    fn naming_lapin_turns_its_lines_back_on() {
        let out = printed(log_filter(Some("info,lapin=debug"), None));
        assert!(
            out.contains("Channel closed") && out.contains("lapin info"),
            "{out}"
        );
        assert!(out.contains("ours"), "{out}");
        let out = printed(log_filter(None, Some("warn,lapin=error")));
        assert!(out.contains("Channel closed"), "{out}");
        assert!(
            !out.contains("lapin info") && !out.contains("ours"),
            "{out}"
        );
        // One module of it: that one only.
        let out = printed(log_filter(Some("info,lapin::channel=error"), None));
        assert!(out.contains("Channel closed"), "{out}");
        assert!(!out.contains("lapin info"), "{out}");
    }
}
