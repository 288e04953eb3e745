//! `switchboard-bench appliance`: the appliance as a user runs it. The real
//! `switchboard run` with the shipped `router.toml` and plugins (copied into a
//! temporary folder; HTTP on a free port), on the embedded bus or on the local
//! RabbitMQ (a fresh vhost per run, through `RABBITMQ_URL`), loaded through its
//! HTTP ingress with `order.created` events: `notification` renders a
//! `notification.email` for each, `analytics` counts both. Per bus:
//!
//! 1. **Throughput.** Clients POST back to back for `--seconds` (a client
//!    refused with 503 waits its `Retry-After`), then the appliance finishes
//!    what it accepted: every event handled by every plugin its routing key is
//!    routed to (`/api/routes`), counted by `/api/plugins`. Fully handled
//!    events/s = accepted ÷ (first POST → last of them handled).
//! 2. **Latency** at half that rate (or `--rate`), open loop: per event, from
//!    when it was due to its `202` (the ingress alone: decode, route, enqueue;
//!    on RabbitMQ also the publish confirm) and to its `notification.email`
//!    seen by a watcher (the `/events/stream` on the embedded bus; a queue of
//!    its own bound to the exchange on RabbitMQ).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use switchboard::config::RouterConfig;

use crate::broker::Vhost;
use crate::ingress::{self, FLOW};
use crate::percentile;
use crate::process::{self, Running};

/// Clients of the paced phase: enough that a slow answer never holds up the
/// schedule at these rates.
const PACED_CLIENTS: usize = 32;
/// Where the outputs are watched for (the last output of each event).
const OUTPUT_PATTERN: &str = "notification.#";

/// Options of `switchboard-bench appliance`.
#[derive(clap::Args)]
pub(crate) struct ApplianceArgs {
    /// Buses to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "embedded")]
    bus: Vec<BusKind>,
    /// Seconds of load in each phase.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Client connections of the throughput phase.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Events/s of the latency phase (default: half the fully handled rate).
    #[arg(long)]
    rate: Option<f64>,
    /// The broker for `--bus rabbitmq` (guest/guest; the vhost is created with
    /// `rabbitmqctl`, so it must be the local node).
    #[arg(long, default_value = "127.0.0.1:5672")]
    broker: String,
    /// Longest wait, in seconds, for the appliance to handle what it accepted.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// The `switchboard` binary. Default: target/release/switchboard.
    #[arg(long)]
    switchboard: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BusKind {
    Embedded,
    /// The embedded bus with the shipped `[archive]` turned off.
    EmbeddedNoArchive,
    Rabbitmq,
    /// RabbitMQ with the shipped `[archive]` turned off (no archive stream).
    RabbitmqNoArchive,
}

impl BusKind {
    fn label(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::EmbeddedNoArchive => "embedded, archive off",
            Self::Rabbitmq => "RabbitMQ (quorum queues)",
            Self::RabbitmqNoArchive => "RabbitMQ (quorum queues), archive off",
        }
    }

    fn archived(self) -> bool {
        matches!(self, Self::Embedded | Self::Rabbitmq)
    }

    fn rabbitmq(self) -> bool {
        matches!(self, Self::Rabbitmq | Self::RabbitmqNoArchive)
    }
}

/// One bus's figures.
struct Row {
    bus: BusKind,
    flood: ingress::Flood,
    /// Fully handled events/s.
    handled: f64,
    retried: u64,
    rate: f64,
    accepted: usize,
    refused: usize,
    /// Milliseconds from due to `202`, and to the output, sorted.
    answer_ms: Vec<f64>,
    output_ms: Vec<f64>,
}

pub(crate) fn run(args: &ApplianceArgs) -> anyhow::Result<()> {
    let binary = process::binary(args.switchboard.as_deref())?;
    let mut rows = Vec::new();
    for &bus in &args.bus {
        let dir = shipped_folder(bus.archived())?;
        let vhost = if bus.rabbitmq() {
            Some(Vhost::create("sbb-appliance")?)
        } else {
            None
        };
        let amqp = vhost
            .as_ref()
            .map(|v| format!("amqp://guest:guest@{}/{}", args.broker, v.name));
        let env: Vec<(&str, &str)> = amqp.iter().map(|u| ("RABBITMQ_URL", u.as_str())).collect();
        let running = Running::start(&binary, dir.path(), &env)?;
        eprintln!(
            "{}: ready after {:.0} ms",
            bus.label(),
            running.ready_after.as_secs_f64() * 1e3
        );
        let row = measure(args, bus, &running, amqp.as_deref())
            .with_context(|| format!("{}: its log ends: {}", bus.label(), running.log_tail()))?;
        running.stop()?;
        rows.push(row);
    }
    print_tables(args, &rows);
    Ok(())
}

/// A temporary folder with the shipped `router.toml` and the components it
/// declares, unchanged but for `[archive] enabled` when `archive` is false:
/// `plugins_dir` and `state_dir` are relative to the file, so they point into
/// the folder.
fn shipped_folder(archive: bool) -> anyhow::Result<tempfile::TempDir> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = RouterConfig::load(&repo.join("router.toml"))?;
    let dir = tempfile::tempdir()?;
    let mut text = std::fs::read_to_string(repo.join("router.toml"))?;
    if !archive {
        let on = "[archive]\nenabled = true\n";
        if !text.contains(on) {
            bail!("the shipped router.toml has no `{on}` to turn off");
        }
        text = text.replace(on, "[archive]\nenabled = false\n");
    }
    std::fs::write(dir.path().join("router.toml"), text)?;
    for name in config.plugins.keys() {
        let Some(settings) = config.plugin_settings(name) else {
            continue;
        };
        if !settings.wasm.exists() {
            bail!(
                "{} is missing: run `make plugins` first",
                settings.wasm.display()
            );
        }
        let to = dir
            .path()
            .join("plugins")
            .join(settings.wasm.strip_prefix(&config.plugins_dir)?);
        std::fs::create_dir_all(to.parent().context("a plugin file has no folder")?)?;
        std::fs::copy(&settings.wasm, to)?;
    }
    Ok(dir)
}

fn measure(
    args: &ApplianceArgs,
    bus: BusKind,
    running: &Running,
    amqp: Option<&str>,
) -> anyhow::Result<Row> {
    let base = &running.url;
    let url = format!("{base}/events/events/{}", FLOW[0]);
    let per_flow = ingress::per_flow(base, "events", &FLOW)?;
    let run = ingress::run_id();
    let seconds = Duration::from_secs(args.seconds);
    let timeout = Duration::from_secs(args.timeout);

    let before = ingress::handled(base)?;
    let start = Instant::now();
    let flood = ingress::flood(&url, args.connections, seconds, &|k| {
        ingress::order(&format!("{run}-max-{k}"))
    })?;
    let done = ingress::wait_handled(base, &before, &per_flow, flood.accepted, timeout)?;
    let handled = flood.accepted as f64 / done.duration_since(start).as_secs_f64();
    eprintln!(
        "{}: {} accepted in {:.1} s, {} refused; all handled after {:.1} s: {handled:.0} events/s",
        bus.label(),
        flood.accepted,
        flood.elapsed.as_secs_f64(),
        flood.refused,
        done.duration_since(start).as_secs_f64()
    );

    let rate = args.rate.unwrap_or(handled / 2.0);
    if rate.is_nan() || rate <= 0.0 {
        bail!("no rate to pace the latency phase at ({rate} events/s)");
    }
    let (seen_tx, seen) = mpsc::channel();
    match amqp {
        Some(amqp) => watch_exchange(amqp, "events", OUTPUT_PATTERN, seen_tx)?,
        None => ingress::watch_stream(base, "exchange=events&match=notification.%23", seen_tx)?,
    }
    let before = ingress::handled(base)?;
    let prefix = format!("{run}-paced-");
    let sent = ingress::paced(&url, rate, seconds, PACED_CLIENTS, &|k| {
        ingress::order(&format!("{prefix}{k}"))
    })?;
    let accepted: Vec<&ingress::Sent> = sent.iter().filter(|s| s.accepted).collect();
    ingress::wait_handled(base, &before, &per_flow, accepted.len() as u64, timeout)?;
    // The outputs were published before their last handler finished; give the
    // watcher a moment to show the last of them.
    let mut last: HashMap<u64, Instant> = HashMap::new();
    let until = Instant::now() + Duration::from_secs(5);
    while last.len() < accepted.len() {
        let Ok((id, at)) = seen.recv_timeout(until.saturating_duration_since(Instant::now()))
        else {
            break;
        };
        if let Some(k) = id.strip_prefix(&prefix).and_then(|k| k.parse().ok()) {
            let t = last.entry(k).or_insert(at);
            *t = (*t).max(at);
        }
    }
    let ms = |from: Instant, to: Instant| to.duration_since(from).as_secs_f64() * 1e3;
    let mut answer_ms: Vec<f64> = accepted.iter().map(|s| ms(s.due, s.answered)).collect();
    let mut output_ms: Vec<f64> = accepted
        .iter()
        .filter_map(|s| Some(ms(s.due, *last.get(&s.k)?)))
        .collect();
    answer_ms.sort_by(f64::total_cmp);
    output_ms.sort_by(f64::total_cmp);
    Ok(Row {
        bus,
        flood,
        handled,
        retried: ingress::retried(base)?,
        rate,
        accepted: accepted.len(),
        refused: sent.len() - accepted.len(),
        answer_ms,
        output_ms,
    })
}

/// A queue of its own (exclusive, server-named) bound to `exchange` for
/// `pattern` on the broker at `url`; from a thread of its own until the
/// connection closes, sends the `correlation_id` of every message it receives
/// with the moment it arrived.
fn watch_exchange(
    url: &str,
    exchange: &str,
    pattern: &str,
    seen: mpsc::Sender<(String, Instant)>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let (connection, mut consumer) = runtime.block_on(async {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "bench-watch".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        anyhow::Ok((connection, consumer))
    })?;
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let _connection = connection;
            while let Some(Ok(delivery)) = consumer.next().await {
                let at = Instant::now();
                let message: Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
                if let Some(id) = message["correlation_id"].as_str()
                    && seen.send((id.to_string(), at)).is_err()
                {
                    return;
                }
            }
        });
    });
    Ok(())
}

fn print_tables(args: &ApplianceArgs, rows: &[Row]) {
    println!(
        "\n### Throughput: shipped router.toml through HTTP ingress ({} clients, {} s of load)\n",
        args.connections, args.seconds
    );
    println!(
        "| bus | accepted | accepted/s (load window) | 503 refusals | fully handled events/s | retried deliveries |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {} | {:.0} | {} | **{:.0}** | {} |",
            row.bus.label(),
            row.flood.accepted,
            row.flood.accepted as f64 / row.flood.elapsed.as_secs_f64(),
            row.flood.refused,
            row.handled,
            row.retried
        );
    }
    println!(
        "\n### Latency at half that rate (open loop, {} s, ms from when each POST was due)\n",
        args.seconds
    );
    println!(
        "| bus | events/s | accepted | 503 | POST → 202 p50 | p99 | POST → last output p50 | p99 | outputs not seen |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {:.0} | {} | {} | {:.2} | {:.2} | **{:.2}** | **{:.2}** | {} |",
            row.bus.label(),
            row.rate,
            row.accepted,
            row.refused,
            percentile(&row.answer_ms, 0.5),
            percentile(&row.answer_ms, 0.99),
            percentile(&row.output_ms, 0.5),
            percentile(&row.output_ms, 0.99),
            row.accepted - row.output_ms.len()
        );
    }
}
