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
