//! Switchboard benchmarks. `cargo run --release -p switchboard-bench -- runtime`
//! (or `make bench`) prints a Markdown table for BENCHMARKS.md; `-- broker`
//! (`make bench-broker`) compares consumers against the real RabbitMQ; `-- redis`
//! (`make bench-redis`) against a hand-written consumer on Redis Streams;
//! `-- appliance`, `-- growth` and `-- delays` run the `switchboard` binary as a
//! user does.
//!
//! Every number is a median over rounds measured back to back in one process, so
//! that ratios between rows are fair on a noisy machine.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use switchboard::envelope;
use switchboard::kv::EmbeddedStore;
use switchboard::runtime::{
    CacheOutcome, Event, Limits, Plugin, PluginSpec, Runtime, RuntimeConfig,
};

mod appliance;
mod archive;
mod broker;
mod delays;
mod embedded;
mod growth;
mod hostile;
mod ingress;
mod kv;
mod languages;
mod process;
mod redis;

const ROUNDS: usize = 7;

fn wasm(name: &str) -> anyhow::Result<PathBuf> {
    built("wasm32-wasip2/release", name, "make plugins guests")
}

/// `target/<folder>/<name>.wasm`, or an error saying which `make` builds it.
fn built(folder: &str, name: &str, make: &str) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(folder)
        .join(format!("{name}.wasm"));
    if !path.exists() {
        bail!("{} is missing: run `{make}` first", path.display());
    }
    Ok(path)
}

fn event(id: &str, kind: &str, data: Value) -> Event {
    let envelope = json!({"id": id, "type": kind, "source": "bench", "tenant_id": "acme",
        "timestamp": "2026-11-22T10:00:00.000Z", "correlation_id": "c", "data": data});
    envelope::decode_recorded("events", envelope.to_string().as_bytes(), None)
        .unwrap_or_else(|e| panic!("bench event: {e}"))
}

/// Median time per call of `f` over `ROUNDS` rounds of `n` calls, after a warm-up.
fn per_call(n: usize, mut f: impl FnMut(usize)) -> Duration {
    for i in 0..n.min(200) {
        f(i);
    }
    let mut rounds: Vec<Duration> = (0..ROUNDS)
        .map(|r| {
            let start = Instant::now();
            for i in 0..n {
                f(r * n + i + 1_000_000);
            }
            start.elapsed() / u32::try_from(n).unwrap_or(u32::MAX)
        })
        .collect();
    rounds.sort();
    rounds[ROUNDS / 2]
}

/// The median of `v` (the upper one of an even count); NaN when empty.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `p` quantile (0 to 1) of `sorted`, nearest rank; NaN when empty.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.max(1) - 1).copied().unwrap_or(f64::NAN)
}

fn us(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e6)
}

struct Setup {
    runtime: Runtime,
    kv: Arc<EmbeddedStore>,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn new(pooling: bool) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let kv = Arc::new(EmbeddedStore::open(&dir.path().join("kv.redb"))?);
        let runtime = Runtime::new(RuntimeConfig {
            pooling,
            ..RuntimeConfig::default()
        })?;
        Ok(Self {
            runtime,
            kv,
            _dir: dir,
        })
    }

    fn load(&self, name: &str, component: &str, reuse: u32) -> anyhow::Result<Plugin> {
        let mut spec = PluginSpec::from_file(name, &wasm(component)?, self.kv.clone())?;
        spec.limits = Limits {
            instance_reuse: reuse,
            ..Limits::default()
        };
        Ok(self.runtime.load(spec)?.0)
    }
}

/// What a workload sends: event `i` for a plugin.
type Workload = fn(usize) -> Event;

fn noop_events(i: usize) -> Event {
    event(&format!("e{i}"), "order.created", json!({"order_id": i}))
}

fn notification_events(i: usize) -> Event {
    event(
        &format!("e{i}"),
        "payment.success",
        json!({"amount": 129.9, "currency": "EUR", "bill_id": format!("B-{i}"),
               "customer": {"name": "Ann Lee", "email": "ann@example.com", "phone": "+33612345678"}}),
    )
}

/// The same payment, delivered again and again: billing's idempotency path (reads).
fn billing_duplicate_events(i: usize) -> Event {
    event(
        &format!("e{i}"),
        "payment.success",
        json!({"bill_id": "B-1", "payment_id": "P-1", "amount": 1}),
    )
}

/// New bills and their payments, alternately: billing's write path.
fn billing_flow_events(i: usize) -> Event {
    let bill = format!("B-{}", i / 2);
    if i.is_multiple_of(2) {
        event(
            &format!("e{i}"),
            "bill.created",
            json!({"bill_id": bill, "amount": 10, "currency": "EUR"}),
        )
    } else {
        event(
            &format!("e{i}"),
            "payment.success",
            json!({"bill_id": bill, "payment_id": format!("P-{i}")}),
        )
    }
}

fn runtime_bench() -> anyhow::Result<()> {
    let workloads: [(&str, &str, &str, Workload, usize); 5] = [
        ("no-op", "noop", "noop_guest", noop_events, 20_000),
        (
            "notification",
            "notification",
            "notification",
            notification_events,
            10_000,
        ),
        (
            "billing, duplicate payment (kv reads)",
            "billing",
            "billing",
            billing_duplicate_events,
            5_000,
        ),
        (
            "billing, bill + payment (kv writes)",
            "billing",
            "billing",
            billing_flow_events,
            200,
        ),
        (
            "analytics (claim, 3 counters, record: 5 kv calls)",
            "analytics",
            "analytics",
            noop_events,
            100,
        ),
    ];
    println!("### Per-event runtime cost (µs per event, median of {ROUNDS} rounds)\n");
    println!("| plugin / workload | reused instance | fresh, pooling | fresh, on demand |");
    println!("|---|---:|---:|---:|");
    for (label, name, component, workload, n) in workloads {
        let mut cells = Vec::new();
        for (pooling, reuse) in [(true, 1000), (true, 1), (false, 1)] {
            let setup = Setup::new(pooling)?;
            let plugin = setup.load(name, component, reuse)?;
            if name == "billing" {
                // The bill the duplicate payments refer to, paid once.
                plugin
                    .handle(&event(
                        "setup-1",
                        "bill.created",
                        json!({"bill_id": "B-1", "amount": 1}),
                    ))
                    .ok();
                plugin
                    .handle(&event(
                        "setup-2",
                        "payment.success",
                        json!({"bill_id": "B-1", "payment_id": "P-1"}),
                    ))
                    .ok();
            }
            let mut failures = 0usize;
            let t = per_call(n, |i| {
                if plugin.handle(&workload(i)).is_err() {
                    failures += 1;
                }
            });
            if failures > 0 {
                bail!("{label}: {failures} events failed during the benchmark");
            }
            cells.push(us(t));
        }
        println!("| {label} | {} | {} | {} |", cells[0], cells[1], cells[2]);
    }

    // The same notification logic compiled natively, through the SDK's native
    // host, against the WASM plugin with a reused instance.
    let setup = Setup::new(true)?;
    let plugin = setup.load("notification", "notification", 1000)?;
    let wasm_t = per_call(20_000, |i| {
        black_box(
            plugin
                .handle(&notification_events(i))
                .map(|o| o.len())
                .unwrap_or(0),
        );
    });
    let native_t = per_call(20_000, |i| {
        let e = notification_events(i);
        let sdk_event = switchboard_plugin::Event {
            id: e.id,
            kind: e.kind,
            exchange: e.exchange,
            attempt: e.attempt,
            source: e.source,
            time: e.time,
            correlation_id: e.correlation_id,
            causation_id: e.causation_id,
            tenant_id: e.tenant_id,
            content_type: e.content_type,
            data: e.data,
            headers: e.headers,
        };
        let out = <notification::Notification as switchboard_plugin::Plugin>::handle(sdk_event);
        black_box(out.map(|o| o.len()).unwrap_or(0));
    });
    println!("\n### WASM vs native (notification, reused instance)\n");
    println!("| | µs per event |");
    println!("|---|---:|");
    println!(
        "| native (same logic, SDK native host) | {} |",
        us(native_t)
    );
    println!("| WASM (host runtime, end to end) | {} |", us(wasm_t));
    println!(
        "| **ratio WASM / native** | **{:.2}×** |",
        wasm_t.as_secs_f64() / native_t.as_secs_f64()
    );

    println!("\n### Loading (ms): compile vs compiled-artifact cache hit\n");
    println!("| component | size | compile | cache hit |");
    println!("|---|---:|---:|---:|");
    for component in ["noop_guest", "notification", "billing", "analytics"] {
        let dir = tempfile::tempdir()?;
        let kv: Arc<EmbeddedStore> = Arc::new(EmbeddedStore::open(&dir.path().join("kv.redb"))?);
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: Some(dir.path().join("cache")),
            ..RuntimeConfig::default()
        })?;
        let path = wasm(component)?;
        let spec = || PluginSpec::from_file(component, &path, kv.clone());
        let start = Instant::now();
        let (_, outcome) = runtime.load(spec()?)?;
        let compile = start.elapsed();
        if outcome != CacheOutcome::Compiled {
            bail!("expected a compilation");
        }
        let start = Instant::now();
        let (_, outcome) = runtime.load(spec()?)?;
        let hit = start.elapsed();
        if outcome != CacheOutcome::Hit {
            bail!("expected a cache hit");
        }
        let size = std::fs::metadata(&path).context("size")?.len();
        println!(
            "| {component} | {} KB | {:.1} | {:.1} |",
            size / 1024,
            compile.as_secs_f64() * 1e3,
            hit.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

#[derive(Parser)]
#[command(about = "Switchboard benchmarks (results and how to run them: BENCHMARKS.md)")]
struct Cli {
    /// Without one, `runtime` then `embedded`.
    #[command(subcommand)]
    command: Option<Bench>,
}

#[derive(Subcommand)]
enum Bench {
    /// Per-event cost of the plugin runtime, no bus.
    Runtime,
    /// The event archive: append, read back, and the embedded bus with it on
    /// and off.
    Archive(archive::ArchiveArgs),
    /// Throughput of the embedded bus, and hot-swap time.
    Embedded,
    /// Consume, publish one output with a confirm, ack: raw lapin, Node.js
    /// amqplib and Switchboard against the same RabbitMQ.
    Broker(broker::BrokerArgs),
    /// Consume (XREADGROUP), publish one output (XADD), ack (XACK): a
    /// hand-written redis-rs consumer and Switchboard on the same Redis.
    Redis(redis::RedisArgs),
    /// One kv call's cost, embedded store vs Redis, side by side.
    Kv(kv::KvArgs),
    /// A healthy plugin's throughput alone and beside each hostile plugin.
    Hostile(hostile::HostileArgs),
    /// The notification plugin in Rust, Python and JavaScript: size, compile,
    /// cache load and per-event cost.
    Languages(languages::LanguagesArgs),
    /// `switchboard run` with the shipped router.toml and plugins, loaded
    /// through its HTTP ingress: fully handled events/s, then latency from POST
    /// to the last output at half that rate.
    Appliance(appliance::ApplianceArgs),
    /// What each plugin adds: start-up time, throughput and memory with 1 to
    /// 30 copies of the notification plugin.
    Growth(growth::GrowthArgs),
    /// Delayed outputs on the embedded bus: memory with 10,000 waiting, and
    /// a busy plugin's latency while 10,000 fire at once.
    Delays(delays::DelaysArgs),
    /// The raw lapin consumer of `broker`, run as its child process.
    #[command(hide = true)]
    RawPassthrough(broker::RawArgs),
    /// The pipelined hand-written lapin consumer of `broker`, run as its child.
    #[command(hide = true)]
    PipelinedConsumer(broker::RawArgs),
    /// The hand-written Redis Streams consumer of `redis`, run as its child.
    #[command(hide = true)]
    RedisConsumer(redis::ConsumerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Log as `switchboard run` does (info level unless SWITCHBOARD_LOG says
    // otherwise; every event in a span), into a sink: what logging costs is part
    // of what is measured.
    let filter = std::env::var("SWITCHBOARD_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::sink)
        .init();
    match cli.command {
        Some(Bench::Runtime) => runtime_bench(),
        Some(Bench::Archive(args)) => archive::run(&args),
        Some(Bench::Embedded) => embedded::run(),
        Some(Bench::Broker(args)) => broker::run(args),
        Some(Bench::RawPassthrough(args)) => broker::raw_passthrough(args),
        Some(Bench::PipelinedConsumer(args)) => broker::pipelined_consumer(args),
        Some(Bench::Redis(args)) => redis::run(args),
        Some(Bench::RedisConsumer(args)) => redis::consumer(args),
        Some(Bench::Kv(args)) => kv::run(&args),
        Some(Bench::Hostile(args)) => hostile::run_all(&args),
        Some(Bench::Languages(args)) => languages::run(&args),
        Some(Bench::Appliance(args)) => appliance::run(&args),
        Some(Bench::Growth(args)) => growth::run(&args),
        Some(Bench::Delays(args)) => delays::run(&args),
        None => {
            runtime_bench()?;
            embedded::run()
        }
    }
}
