//! `config.get`: the plugin's own configuration values from `router.toml`,
//! read-only. Values are shared by every instance of one plugin version.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::runtime::bindings::switchboard::plugin::config::Host;
use crate::runtime::store::InstanceState;

/// Configuration values of one plugin.
pub type PluginConfig = Arc<BTreeMap<String, String>>;

impl Host for InstanceState {
    fn get(&mut self, key: String) -> Option<String> {
        self.plugin.config.get(&key).cloned()
    }
}
