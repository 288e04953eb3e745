//! `switchboard kv get`: one value of a plugin's state, read from the store
//! router.toml names (`[kv]`): Redis, or the embedded store in `state_dir`
//! when no appliance holds it (a running one answers `GET /api/kv/…`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use crate::config::RouterConfig;

/// `switchboard kv`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum KvCommand {
    /// Print the value `plugin` keeps under `key` as JSON; exits 1 when there
    /// is none.
    Get(KvGetArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct KvGetArgs {
    /// The configuration file: its `[kv]` table says where the state is.
    #[arg(long, default_value = "router.toml", env = "SWITCHBOARD_CONFIG")]
    pub config: PathBuf,
    /// The plugin whose state to read.
    pub plugin: String,
    /// The key, as the plugin names it.
    pub key: String,
}

pub fn run(command: &KvCommand, out: &mut impl Write, err: &mut impl Write) -> anyhow::Result<i32> {
    let KvCommand::Get(args) = command;
    let config = RouterConfig::load(&args.config)
        .with_context(|| format!("cannot use {}", args.config.display()))?;
    let store = config.open_kv().with_context(|| {
        format!(
            "cannot open the kv store (if a running appliance holds it, ask that one: \
             GET /api/kv/{}/{})",
            args.plugin, args.key
        )
    })?;
    match store.get(&args.plugin, &args.key)? {
        Some(value) => {
            let shown = crate::admin::api::kv_value_json(&args.plugin, &args.key, &value);
            serde_json::to_writer(&mut *out, &shown)?;
            writeln!(out)?;
            Ok(0)
        }
        None => {
            writeln!(
                err,
                "plugin {:?} keeps nothing under {:?}",
                args.plugin, args.key
            )?;
            Ok(1)
        }
    }
}
