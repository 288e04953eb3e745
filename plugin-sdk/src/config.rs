//! The plugin's configuration: the string values given to it in `router.toml`.
//!
//! Read-only, and the same for every event until the operator edits `router.toml`
//! (the host then reloads the plugin with the new values).

use crate::host;

/// The value for `key`, if the plugin's configuration has one.
pub fn get(key: &str) -> Option<String> {
    host::config_get(key)
}

/// The value for `key`, or `default` when the configuration has none.
pub fn get_or(key: &str, default: impl Into<String>) -> String {
    get(key).unwrap_or_else(|| default.into())
}
