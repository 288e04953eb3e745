//! `switchboard events`: the event archive (`[archive]`), read from
//! `state_dir/archive/` as JSON lines, oldest first. It reads the files
//! directly, so it works whether or not the appliance is running.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::archive::{self, Query};
use crate::config::RouterConfig;

/// `switchboard events`.
#[derive(Debug, Clone, clap::Args)]
pub struct EventsArgs {
    /// The configuration file: its `state_dir` holds the archive.
    #[arg(long, default_value = "router.toml", env = "SWITCHBOARD_CONFIG")]
    pub config: PathBuf,
    /// Only events published to this exchange.
    #[arg(long)]
    pub exchange: Option<String>,
    /// Only routing keys matching this topic pattern (`order.*`, `#`).
    #[arg(long = "match")]
    pub pattern: Option<String>,
    /// Only the events of this aggregate (see `[[archive.aggregates]]`).
    #[arg(long)]
    pub aggregate: Option<String>,
    /// Only events archived since then: RFC 3339, or a duration back (`1h`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only events archived until then: RFC 3339, or a duration back.
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many events.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// Prints the selected events; 0 when all went well (no event is no error).
pub fn run(args: &EventsArgs, out: &mut impl Write) -> anyhow::Result<i32> {
    let config = RouterConfig::load(&args.config)
        .with_context(|| format!("cannot use {}", args.config.display()))?;
    if !config.archive.enabled {
        bail!(
            "the event archive is not enabled in {} (add `[archive]` with `enabled = true`)",
            args.config.display()
        );
    }
    let mut query = Query::parse(
        args.exchange.as_deref(),
        args.pattern.as_deref(),
        args.aggregate.as_deref(),
        args.since.as_deref(),
        args.until.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    query.limit = args.limit;
    let dir = config.state_dir.join("archive");
    let events = archive::read(&dir, &query)
        .with_context(|| format!("cannot read the archive in {}", dir.display()))?;
    for event in events {
        serde_json::to_writer(&mut *out, &event)?;
        writeln!(out)?;
    }
    Ok(0)
}
