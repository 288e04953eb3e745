//! `switchboard-bench growth`: what each plugin adds. `switchboard run` on the
//! embedded bus with N copies of the notification plugin (one component file
//! declared under N names: N queues, N sets of workers and instances), each
//! routed `order.*` from exchange `events`, for each N of `--plugins`. Per N:
//!
//! - **start-up**: from spawning the process to `/readyz` answering 200, with
//!   the compile cache warm (a first start has filled it), median of `--starts`;
//!   with the time its threads spent on a CPU and waiting for one meanwhile
//!   (each summed over the threads), which tell its own work from the shared
//!   cores' other tenants;
//! - **throughput**: `order.created` events POSTed by `--connections` clients
//!   for `--seconds` (a client refused with 503 waits its `Retry-After`), then
//!   until every copy has handled every accepted event (their
//!   `notification.email` outputs are routed nowhere). Input events/s =
//!   accepted ÷ (first POST → last copy done);
//! - **memory**: the process's resident set (`VmRSS`) once ready, and after the
//!   load, when each copy holds its instances (as many as ran at once, up to
//!   `concurrency` = 2, kept idle between events).
//!
//! What one more plugin costs is the difference between the smallest and the
//! largest N, divided by the plugins added.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::ingress::{self, FLOW};
use crate::process::{self, Running};
use crate::{median, wasm};

/// Options of `switchboard-bench growth`.
#[derive(clap::Args)]
pub(crate) struct GrowthArgs {
    /// Plugin counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,3,10,30")]
    plugins: Vec<usize>,
    /// Seconds of load per count.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Starts per count; the median start-up time is shown.
    #[arg(long, default_value_t = 5)]
    starts: usize,
    /// Client connections of the load.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Longest wait, in seconds, for the copies to handle what was accepted.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// The `switchboard` binary. Default: target/release/switchboard.
    #[arg(long)]
    switchboard: Option<PathBuf>,
}

/// One plugin count's figures.
struct Row {
    plugins: usize,
    /// Per start, in order: ms to ready, ms on a CPU, ms waiting for one.
    starts: Vec<[f64; 3]>,
    /// Input events/s, every copy handling each.
    rate: f64,
    refused: u64,
    rss_ready: u64,
    rss_loaded: u64,
}

/// `router.toml` with `n` copies of the notification plugin.
fn config(n: usize) -> String {
    let mut toml = String::from(
        "plugins_dir = \"plugins\"\nstate_dir = \"state\"\n\n\
         [[exchanges]]\nname = \"events\"\nkind = \"topic\"\n",
    );
    for i in 1..=n {
        let _ = write!(
            toml,
            "\n[plugins.notification-{i:02}]\nfile = \"notification.wasm\"\n\n\
             [[routes]]\nexchange = \"events\"\npattern = \"order.*\"\nplugin = \"notification-{i:02}\"\n"
        );
    }
    toml
}

pub(crate) fn run(args: &GrowthArgs) -> anyhow::Result<()> {
    let binary = process::binary(args.switchboard.as_deref())?;
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("plugins"))?;
    std::fs::copy(
        wasm("notification")?,
        dir.path().join("plugins/notification.wasm"),
    )?;
    let router_toml = dir.path().join("router.toml");
    // Fill the compile cache: every start measured below loads from it.
    std::fs::write(&router_toml, config(1))?;
    Running::start(&binary, dir.path(), &[])?.stop()?;

    let mut rows = Vec::new();
    for &n in &args.plugins {
        std::fs::write(&router_toml, config(n))?;
        let mut starts = Vec::new();
        let running = loop {
            let running = Running::start(&binary, dir.path(), &[])?;
            let cpu = &running.ready_cpu;
            starts.push(
                [running.ready_after, cpu.running, cpu.waiting].map(|d| d.as_secs_f64() * 1e3),
            );
            if starts.len() >= args.starts.max(1) {
                break running;
            }
            running.stop()?;
        };
        let row = measure(args, n, &running, starts)
            .with_context(|| format!("{n} plugins: its log ends: {}", running.log_tail()))?;
        running.stop()?;
        eprintln!(
            "{n} plugins: start-up {:.0} ms, {:.0} events/s, RSS {:.1} → {:.1} MiB",
            row.start(0),
            row.rate,
            mib(row.rss_ready),
            mib(row.rss_loaded)
        );
        rows.push(row);
    }
    print_table(args, &rows);
    Ok(())
}

fn measure(
    args: &GrowthArgs,
    n: usize,
    running: &Running,
    starts: Vec<[f64; 3]>,
) -> anyhow::Result<Row> {
    let base = &running.url;
    let per_flow = ingress::per_flow(base, "events", &FLOW)?;
    if per_flow.len() != n || per_flow.values().any(|&per| per != 1) {
        bail!("expected each of {n} copies to handle each event once, the routes say {per_flow:?}");
    }
    let rss_ready = running.rss()?;
    let run = ingress::run_id();
    let before = ingress::handled(base)?;
    let start = Instant::now();
    let flood = ingress::flood(
        &format!("{base}/events/events/{}", FLOW[0]),
        args.connections,
        Duration::from_secs(args.seconds),
        &|k| ingress::order(&format!("{run}-{k}")),
    )?;
    let done = ingress::wait_handled(
        base,
        &before,
        &per_flow,
        flood.accepted,
        Duration::from_secs(args.timeout),
    )?;
    Ok(Row {
        plugins: n,
        starts,
        rate: flood.accepted as f64 / done.duration_since(start).as_secs_f64(),
        refused: flood.refused,
        rss_ready,
        rss_loaded: running.rss()?,
    })
}

impl Row {
    /// The median over the starts of one of their figures.
    fn start(&self, figure: usize) -> f64 {
        median(self.starts.iter().map(|s| s[figure]).collect())
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn print_table(args: &GrowthArgs, rows: &[Row]) {
    println!(
        "\n### Cost per plugin: N copies of the notification plugin, all routed `order.*` (embedded bus)\n"
    );
    println!(
        "| plugins | start-up, ms (warm cache, median of {}) | on a CPU, ms | waiting for a CPU, ms | input events/s (each handled by every copy) | handlings/s | µs per input event | 503 refusals | RSS ready, MiB | RSS after load, MiB |",
        args.starts.max(1)
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {:.1} | {:.1} |",
            row.plugins,
            row.start(0),
            row.start(1),
            row.start(2),
            row.rate,
            row.rate * row.plugins as f64,
            1e6 / row.rate,
            row.refused,
            mib(row.rss_ready),
            mib(row.rss_loaded)
        );
    }
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return;
    };
    if last.plugins > first.plugins {
        let added = (last.plugins - first.plugins) as f64;
        let per = |a: u64, b: u64| (mib(b) - mib(a)) / added;
        println!(
            "\nEach plugin more ({} → {}): {:+.1} ms start-up ({:+.1} ms on a CPU), {:+.1} µs per input event, {:+.2} MiB resident once ready, {:+.2} MiB after the load.",
            first.plugins,
            last.plugins,
            (last.start(0) - first.start(0)) / added,
            (last.start(1) - first.start(1)) / added,
            (1e6 / last.rate - 1e6 / first.rate) / added,
            per(first.rss_ready, last.rss_ready),
            per(first.rss_loaded, last.rss_loaded)
        );
    }
    let starts: Vec<String> = last
        .starts
        .iter()
        .map(|[wall, on, waiting]| format!("{wall:.0} ({on:.0} + {waiting:.0})"))
        .collect();
    println!(
        "Start-up with {} plugins, warm cache: {:.0} ms (target ≤ 300 ms); each start, ms (on a CPU + waiting for one): {}.",
        last.plugins,
        last.start(0),
        starts.join(", ")
    );
}
