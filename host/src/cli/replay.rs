//! `switchboard replay`: archived events run again through a plugin
//! ([`crate::replay`]).
//!
//! - `--dry-run`: through the plugin (or `--file`) offline, on a scratch copy
//!   of its state; prints each event's outputs or failure. Publishes nothing.
//! - `--diff`: through the configured version and the `--file` candidate, each
//!   on its own scratch copy; prints the events whose outcomes differ, then a
//!   summary. Publishes nothing.
//! - `--rebuild`: one aggregate's events, from empty state, through the
//!   plugin; what it wrote replaces those keys in the live state.
//! - `--publish`: the events go to the plugin's queue again, marked with a
//!   `switchboard-replay` header, through the running appliance.
//!
//! Exit codes: 0 all well; 1 some event failed (dry run, rebuild) or the two
//! versions differ (diff); 2 the replay could not run.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::archive::ArchivedEvent;
use crate::config::{KvBackend, RouterConfig};
use crate::kv::{EmbeddedStore, KvStore};
use crate::replay::{self, Changes, Offline};
use crate::runtime::{Runtime, RuntimeConfig};

/// `switchboard replay`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("mode").required(true)
    .args(["dry_run", "diff", "publish", "rebuild"])))]
pub struct ReplayArgs {
    /// The configured plugin whose routes select the events.
    pub plugin: String,
    /// The configuration file: its `state_dir` holds the archive.
    #[arg(long, default_value = "router.toml", env = "SWITCHBOARD_CONFIG")]
    pub config: PathBuf,
    /// A candidate component to run instead of the configured file (with
    /// --diff: to compare with it).
    #[arg(long, conflicts_with = "publish")]
    pub file: Option<PathBuf>,
    /// The running appliance's address, for --publish and for --rebuild while
    /// it holds the embedded store (default: `[http] listen` of the config).
    #[arg(long, env = "SWITCHBOARD_URL")]
    pub url: Option<String>,
    #[command(flatten)]
    pub select: super::events::Selection,
    /// At most this many events (the oldest).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Run offline and print each event's outputs or failure.
    #[arg(long)]
    pub dry_run: bool,
    /// Run the configured version and the --file candidate; print where they differ.
    #[arg(long, requires = "file")]
    pub diff: bool,
    /// Deliver the events to the plugin's queue again (the appliance must run).
    #[arg(long)]
    pub publish: bool,
    /// Rebuild one aggregate's state from its history (needs --aggregate).
    #[arg(long, requires = "aggregate")]
    pub rebuild: bool,
}

pub fn run(args: &ReplayArgs, out: &mut impl Write, err: &mut impl Write) -> anyhow::Result<i32> {
    let config = RouterConfig::load(&args.config)
        .with_context(|| format!("cannot use {}", args.config.display()))?;
    let events = select(&config, args)?;
    if args.publish {
        return publish(
            &Api::of(&config, args.url.as_deref()),
            &args.plugin,
            &events,
            out,
            err,
        );
    }
    let offline = Replay {
        runtime: Runtime::new(RuntimeConfig {
            pooling: false,
            ..config.runtime_config()
        })?,
        config: &config,
        args,
        events: &events,
    };
    if args.rebuild {
        return offline.rebuild(out, err);
    }
    let state = LiveState::open(&config, err)?;
    match &args.file {
        Some(candidate) if args.diff => offline.diff(candidate, &state, out, err),
        file => offline.dry_run(file.as_deref(), &state, out, err),
    }
}

/// What the offline modes work with.
struct Replay<'a> {
    runtime: Runtime,
    config: &'a RouterConfig,
    args: &'a ReplayArgs,
    events: &'a [ArchivedEvent],
}

impl Replay<'_> {
    /// The plugin (or `file`), on a scratch copy of `base`.
    fn load(
        &self,
        file: Option<&std::path::Path>,
        base: Option<Arc<dyn KvStore>>,
    ) -> anyhow::Result<Offline> {
        Offline::load(&self.runtime, self.config, &self.args.plugin, file, base)
    }

    /// `--dry-run`: each event through the plugin (or `file`), offline.
    fn dry_run(
        &self,
        file: Option<&std::path::Path>,
        state: &LiveState,
        out: &mut impl Write,
        err: &mut impl Write,
    ) -> anyhow::Result<i32> {
        let (args, events) = (self.args, self.events);
        let plugin = self.load(file, state.base())?;
        let mut failed = 0;
        for event in events {
            let line = plugin.run(event);
            failed += usize::from(line.get("failure").is_some());
            writeln!(out, "{line}")?;
        }
        writeln!(
            err,
            "{} events replayed through {} ({}): {} handled, {failed} failed; nothing published",
            events.len(),
            args.plugin,
            plugin.version(),
            events.len() - failed
        )?;
        Ok(i32::from(failed > 0))
    }

    /// `--diff`: each event through the configured version and `candidate`.
    fn diff(
        &self,
        candidate: &std::path::Path,
        state: &LiveState,
        out: &mut impl Write,
        err: &mut impl Write,
    ) -> anyhow::Result<i32> {
        let events = self.events;
        let running = self.load(None, state.base())?;
        let candidate = self.load(Some(candidate), state.base())?;
        let report = replay::diff(&running, &candidate, events);
        for line in &report.differing {
            writeln!(out, "{line}")?;
        }
        let summary = &report.summary;
        writeln!(out, "{}", json!({"summary": summary}))?;
        writeln!(
            err,
            "{} events: {} same, {} differ, {} fail only in the running version, {} only in \
             the candidate; nothing published",
            events.len(),
            summary["same"],
            summary["differ"],
            summary["fails_only_in_running"],
            summary["fails_only_in_candidate"],
        )?;
        Ok(i32::from(!report.all_same))
    }

    /// `--rebuild`: the aggregate's events from empty state, retries included
    /// ([`replay::run_history`]); the keys the plugin wrote (or deleted) replace
    /// those in the live state.
    fn rebuild(&self, out: &mut impl Write, err: &mut impl Write) -> anyhow::Result<i32> {
        let (config, args, events) = (self.config, self.args, self.events);
        let aggregate = args.select.aggregate.as_deref().unwrap_or_default();
        let offline = self.load(args.file.as_deref(), None)?;
        let max_attempts = config
            .plugin_settings(&args.plugin)
            .map_or(1, |s| s.max_attempts);
        let failed = replay::run_history(&offline, events, max_attempts)
            .map_err(|why| anyhow::anyhow!("{why}: nothing written"))?;
        for line in &failed {
            writeln!(err, "{}: {}", line["input"], line["failure"])?;
        }
        let failed = failed.len();
        let changes = offline.changes();
        apply(config, args.url.as_deref(), &args.plugin, &changes)?;
        for (key, value) in &changes {
            let line = match value {
                Some(value) => crate::admin::api::kv_value_json(&args.plugin, key, value),
                None => json!({"plugin": args.plugin, "key": key, "deleted": true}),
            };
            writeln!(out, "{line}")?;
        }
        writeln!(
            err,
            "rebuilt aggregate {aggregate:?} of {} from {} events ({failed} settled as failures): \
             keys written: {}, deleted: {}",
            args.plugin,
            events.len(),
            changes.values().filter(|v| v.is_some()).count(),
            changes.values().filter(|v| v.is_none()).count(),
        )?;
        Ok(0)
    }
}

/// The archived events the arguments and the plugin's routes select.
fn select(config: &RouterConfig, args: &ReplayArgs) -> anyhow::Result<Vec<ArchivedEvent>> {
    if !config.plugins.contains_key(&args.plugin) {
        bail!(
            "no plugin {:?} is configured in {}",
            args.plugin,
            args.config.display()
        );
    }
    let query = args.select.query()?;
    let events = super::events::read(config, &args.config, &query)?;
    let mut events = replay::routed_to(config, &args.plugin, events)?;
    if let Some(limit) = args.limit {
        events.truncate(limit);
    }
    Ok(events)
}

/// The live plugin state an offline replay starts from, read only: Redis
/// itself, or a copy of the embedded store's file (the appliance may hold
/// the file itself, and must keep it).
struct LiveState {
    base: Option<Arc<dyn KvStore>>,
    _copy: Option<tempfile::TempDir>,
}

impl LiveState {
    fn open(config: &RouterConfig, err: &mut impl Write) -> anyhow::Result<Self> {
        if config.kv.backend != KvBackend::Embedded {
            let store = config.open_kv().context("cannot read the plugin state")?;
            return Ok(Self {
                base: Some(store),
                _copy: None,
            });
        }
        let live = config.kv_path();
        if !live.exists() {
            return Ok(Self {
                base: None,
                _copy: None,
            });
        }
        let dir = tempfile::tempdir().context("cannot create a scratch folder")?;
        let copy = dir.path().join("kv.redb");
        let opened = std::fs::copy(&live, &copy)
            .map_err(|e| e.to_string())
            .and_then(|_| EmbeddedStore::open(&copy).map_err(|e| e.to_string()));
        match opened {
            Ok(store) => Ok(Self {
                base: Some(Arc::new(store)),
                _copy: Some(dir),
            }),
            Err(why) => {
                writeln!(
                    err,
                    "note: cannot copy the plugin state in {} ({why}): replaying from empty state",
                    live.display()
                )?;
                Ok(Self {
                    base: None,
                    _copy: None,
                })
            }
        }
    }

    fn base(&self) -> Option<Arc<dyn KvStore>> {
        self.base.clone()
    }
}

/// Puts a rebuild's changes into the live store: directly when this process
/// can open it, else through the running appliance that holds it.
fn apply(
    config: &RouterConfig,
    url: Option<&str>,
    plugin: &str,
    changes: &Changes,
) -> anyhow::Result<()> {
    let store = match config.open_kv() {
        Ok(store) => store,
        Err(open) if config.kv.backend == KvBackend::Embedded => {
            let api = Api::of(config, url);
            for (key, value) in changes {
                api.put_kv(plugin, key, value.as_deref()).with_context(|| {
                    format!(
                        "cannot open the kv store ({open}) nor write through {}",
                        api.base
                    )
                })?;
            }
            return Ok(());
        }
        Err(e) => return Err(e).context("cannot open the kv store"),
    };
    for (key, value) in changes {
        match value {
            Some(value) => store.set(plugin, key, value, None)?,
            None => {
                store.delete(plugin, key)?;
            }
        }
    }
    crate::kv::wait_durable(&*store, Duration::from_secs(30))?;
    Ok(())
}

/// How many events one request carries to the appliance.
const PUBLISH_BATCH: usize = 200;
/// How long a publish waits for room in a full queue before giving up.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(60);

/// `--publish`: the events to the plugin's queue, through the appliance.
fn publish(
    api: &Api,
    plugin: &str,
    events: &[ArchivedEvent],
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<i32> {
    let replay_id = uuid::Uuid::now_v7().to_string();
    let mut sent = 0;
    let mut stalled_since = Instant::now();
    while sent < events.len() {
        let batch = &events[sent..(sent + PUBLISH_BATCH).min(events.len())];
        let took = api.replay(plugin, &replay_id, batch)?;
        if took == 0 {
            if stalled_since.elapsed() > PUBLISH_PATIENCE {
                bail!(
                    "the queue of {plugin} stayed full for {PUBLISH_PATIENCE:?}: {sent} of {} \
                     events re-delivered (replay {replay_id})",
                    events.len()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        sent += took;
        stalled_since = Instant::now();
    }
    writeln!(
        out,
        "{}",
        json!({"replay": replay_id, "plugin": plugin, "delivered": sent})
    )?;
    writeln!(
        err,
        "{sent} events re-delivered to {plugin}; its outputs carry switchboard-replay: {replay_id}"
    )?;
    Ok(0)
}

/// The running appliance's admin API, as router.toml says where it listens.
struct Api {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Api {
    fn of(config: &RouterConfig, url: Option<&str>) -> Self {
        let base = match url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                let mut addr = config.http.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{addr}")
            }
        };
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            base,
            token: config.http.token.as_ref().map(|t| t.expose().to_string()),
            agent,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(token) => request.header("authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    /// Sets (or, with `None`, deletes) one key of a plugin's state.
    fn put_kv(&self, plugin: &str, key: &str, value: Option<&[u8]>) -> anyhow::Result<()> {
        let path = format!("/api/kv/{}/{}", encode(plugin), encode(key));
        let response = match value {
            Some(value) => self.authorized(self.agent.put(self.url(&path))).send(value),
            None => self.authorized(self.agent.delete(self.url(&path))).call(),
        }
        .with_context(|| format!("cannot reach the appliance at {}", self.base))?;
        expect_ok(response, &[404]).map(|_| ())
    }

    /// Sends a batch to the plugin's queue; how many it took (0: queue full).
    fn replay(&self, plugin: &str, id: &str, batch: &[ArchivedEvent]) -> anyhow::Result<usize> {
        let path = format!("/api/plugins/{}/replay?id={}", encode(plugin), encode(id));
        let body = serde_json::to_vec(&json!({"events": batch}))?;
        let response = self
            .authorized(self.agent.post(self.url(&path)))
            .content_type("application/json")
            .send(&body[..])
            .with_context(|| {
                format!(
                    "cannot reach the appliance at {} (--publish re-delivers through a running one)",
                    self.base
                )
            })?;
        let value = expect_ok(response, &[503])?;
        Ok(value
            .get("delivered")
            .and_then(Value::as_u64)
            .map_or(0, |n| usize::try_from(n).unwrap_or(0)))
    }
}

/// The JSON body of a 2xx answer (or of one of the `also` statuses); the
/// appliance's error sentence otherwise.
fn expect_ok(
    mut response: ureq::http::Response<ureq::Body>,
    also: &[u16],
) -> anyhow::Result<Value> {
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if (200..300).contains(&status) || also.contains(&status) {
        return Ok(value);
    }
    let why = value
        .get("error")
        .and_then(Value::as_str)
        .map_or(text.as_str(), |e| e);
    bail!("the appliance answered {status}: {why}")
}

/// What a path segment keeps as is: RFC 3986's unreserved characters.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a path segment.
fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("order:42/a b"), "order%3A42%2Fa%20b");
        assert_eq!(encode("B-7_x.y~"), "B-7_x.y~");
    }

    #[test]
    fn a_mode_is_required_and_diff_needs_a_candidate() {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: ReplayArgs,
        }
        assert!(Cli::try_parse_from(["x", "orders"]).is_err());
        assert!(Cli::try_parse_from(["x", "orders", "--diff"]).is_err());
        assert!(Cli::try_parse_from(["x", "orders", "--rebuild"]).is_err());
        assert!(Cli::try_parse_from(["x", "orders", "--dry-run", "--publish"]).is_err());
        assert!(Cli::try_parse_from(["x", "orders", "--publish", "--file", "c.wasm"]).is_err());
        let ok = Cli::try_parse_from(["x", "orders", "--diff", "--file", "c.wasm"]).unwrap();
        assert!(ok.args.diff);
        let ok = Cli::try_parse_from(["x", "orders", "--rebuild", "--aggregate", "o-1"]).unwrap();
        assert!(ok.args.rebuild);
    }
}
