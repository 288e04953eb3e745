//! `switchboard events`: the event archive (`[archive]`) as JSON lines,
//! oldest first. On the embedded bus it reads the files in
//! `state_dir/archive/` directly; on RabbitMQ (`[broker] url` or
//! `RABBITMQ_URL`), the archive stream on the broker. Either way it works
//! whether or not the appliance is running.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::archive::{self, ArchivedEvent, Query};
use crate::config::RouterConfig;

/// `switchboard events`.
#[derive(Debug, Clone, clap::Args)]
pub struct EventsArgs {
    /// The configuration file: its `state_dir` holds the archive, or its
    /// `[broker]` says where the archive stream is.
    #[arg(long, default_value = "router.toml", env = "SWITCHBOARD_CONFIG")]
    pub config: PathBuf,
    #[command(flatten)]
    pub select: Selection,
    /// At most this many events.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// Which archived events: what `switchboard events` and `switchboard replay`
/// both take.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Selection {
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
}

impl Selection {
    /// The archive query, or one sentence saying which argument is wrong.
    pub fn query(&self) -> anyhow::Result<Query> {
        Query::parse(
            self.exchange.as_deref(),
            self.pattern.as_deref(),
            self.aggregate.as_deref(),
            self.since.as_deref(),
            self.until.as_deref(),
        )
        .map_err(anyhow::Error::msg)
    }
}

/// The archived events `query` selects, oldest first, from wherever `config`
/// keeps them: the files of the embedded bus, or the stream on the broker.
/// `path` names the configuration in errors.
pub fn read(
    config: &RouterConfig,
    path: &Path,
    query: &Query,
) -> anyhow::Result<Vec<ArchivedEvent>> {
    if !config.archive.enabled {
        bail!(
            "the event archive is not enabled in {} (add `[archive]` with `enabled = true`)",
            path.display()
        );
    }
    if config.broker.url.is_some() {
        archive::stream::read(config, query).context("cannot read the archive stream on the broker")
    } else {
        let dir = config.state_dir.join("archive");
        archive::read(&dir, query)
            .with_context(|| format!("cannot read the archive in {}", dir.display()))
    }
}

/// Prints the selected events; 0 when all went well (no event is no error).
pub fn run(args: &EventsArgs, out: &mut impl Write) -> anyhow::Result<i32> {
    let config = RouterConfig::load(&args.config)
        .with_context(|| format!("cannot use {}", args.config.display()))?;
    let mut query = args.select.query()?;
    query.limit = args.limit;
    for event in read(&config, &args.config, &query)? {
        serde_json::to_writer(&mut *out, &event)?;
        writeln!(out)?;
    }
    Ok(0)
}
