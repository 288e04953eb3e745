//! A healthy plugin's throughput while a hostile one runs beside it: the
//! notification plugin's events/s on the embedded bus, alone and with the
//! scripted guest misbehaving on the same bus at the same time (its own queue
//! kept full of hostile events), measured side by side in alternating rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};
use switchboard::bus::embedded::EmbeddedBus;
use switchboard::bus::{Bus, BusError, ExchangeSpec, Message, Outgoing, QueueSpec, Topology};
use switchboard::dispatch::{DispatchSettings, PluginWorkers};
use switchboard::kv::EmbeddedStore;
use switchboard::route::{Binding, ExchangeKind};
use switchboard::runtime::{PluginSpec, Runtime, RuntimeConfig};

use crate::{median, wasm};

#[derive(clap::Args)]
pub(crate) struct HostileArgs {
    /// Seconds measured per run, from the moment the hostile plugin starts.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Alternating rounds (alone, beside each hostile kind) per row.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Only the hostile kinds named (loop, oom, recurse, panic, ...).
    #[arg(long)]
    only: Vec<String>,
    /// For the infinite loop, a second row measured from this many seconds
    /// after it starts (once its cool-down has grown), over as many seconds,
    /// one round.
    #[arg(long, default_value_t = 60)]
    steady: u64,
}

/// (label, scripted kind, data).
fn hostile_kinds() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        ("infinite loop", "loop", json!({})),
        ("memory bomb", "oom", json!({})),
        ("stack overflow", "recurse", json!({})),
        ("panic", "panic", json!({})),
        (
            "100,000 outputs from one event",
            "many-outputs",
            json!({"count": 100_000}),
        ),
        (
            "one 64 MiB output",
            "big-output",
            json!({"bytes": 64 << 20}),
        ),
        ("reads a host file", "read-file", json!({})),
        ("reads the environment", "read-env", json!({})),
        ("opens a socket", "socket", json!({})),
    ]
}

fn message(i: usize, kind: &str, data: &Value) -> Outgoing {
    let body = json!({"id": format!("{kind}-{i}"), "type": kind, "source": "bench", "data": data});
    Outgoing {
        exchange: "events".into(),
        routing_key: kind.into(),
        message: Message {
            body: serde_json::to_vec(&body).unwrap_or_default().into(),
            content_type: Some("application/json".into()),
            ..Message::default()
        },
    }
}

/// Publishes `messages`, waiting for room while the queue is full.
fn publish(bus: &EmbeddedBus, messages: &[Outgoing]) -> anyhow::Result<()> {
    for chunk in messages.chunks(64) {
        loop {
            match bus.publish(chunk.to_vec(), Duration::from_secs(10)) {
                Ok(()) => break,
                Err(BusError::Full { .. }) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => bail!("publish failed: {e}"),
            }
        }
    }
    Ok(())
}

/// Healthy events handled per second over `window`, with `hostile` (a
/// scripted kind and its data) running beside it when given; and how many
/// cool-down pauses the hostile plugin took.
fn run(
    skip: Duration,
    window: Duration,
    hostile: Option<(&str, &Value)>,
) -> anyhow::Result<(f64, u64)> {
    let dir = tempfile::tempdir()?;
    let kv = Arc::new(EmbeddedStore::open(&dir.path().join("kv.redb"))?);
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let bus = EmbeddedBus::new();
    let queue = |plugin: &str| QueueSpec {
        plugin: plugin.into(),
        capacity: 1 << 20,
        prefetch: 64,
        ordered: false,
        retry_delays: Vec::new(),
    };
    let binding = |pattern: &str, plugin: &str| Binding {
        exchange: "events".into(),
        kind: ExchangeKind::Topic,
        pattern: pattern.into(),
        plugin: plugin.into(),
    };
    bus.apply(&Topology {
        exchanges: vec![ExchangeSpec {
            name: "events".into(),
            kind: ExchangeKind::Topic,
            durable: true,
        }],
        queues: vec![queue("notification"), queue("hostile")],
        bindings: vec![
            binding("payment.*", "notification"),
            binding("loop", "hostile"),
            binding("oom", "hostile"),
            binding("recurse", "hostile"),
            binding("panic", "hostile"),
            binding("many-outputs", "hostile"),
            binding("big-output", "hostile"),
            binding("read-*", "hostile"),
            binding("socket", "hostile"),
        ],
    })?;
    let metrics = switchboard::metrics::Metrics::new();
    let bus_dyn: Arc<dyn Bus> = Arc::new(bus.clone());
    let healthy_spec = PluginSpec::from_file("notification", &wasm("notification")?, kv.clone())?;
    let healthy = PluginWorkers::start(
        bus_dyn.clone(),
        Arc::new(runtime.load(healthy_spec)?.0),
        DispatchSettings::default(),
        metrics.plugin("notification"),
    )?;
    // The hostile plugin runs with the product's defaults (2 workers, 5 s
    // timeout, 64 MiB, cool-down after 3 broken events) and a queue that never
    // runs dry: every event it is given is hostile.
    let hostile_workers = match hostile {
        Some((kind, data)) => {
            let spec = PluginSpec::from_file("hostile", &wasm("scripted_guest")?, kv.clone())?;
            let workers = PluginWorkers::start(
                bus_dyn.clone(),
                Arc::new(runtime.load(spec)?.0),
                DispatchSettings::default(),
                metrics.plugin("hostile"),
            )?;
            let hostile: Vec<Outgoing> = (0..2000).map(|i| message(i, kind, data)).collect();
            publish(&bus, &hostile)?;
            Some(workers)
        }
        None => None,
    };
    let payment = json!({"amount": 10, "currency": "EUR",
                         "customer": {"email": "a@b.c", "phone": "+331"}});
    let stats = healthy.stats();
    let handled = || stats.handled.load(std::sync::atomic::Ordering::Relaxed);
    let began = Instant::now();
    let mut measuring: Option<(Instant, u64)> = None;
    let mut i = 0;
    loop {
        let now = Instant::now();
        match measuring {
            None if now - began >= skip => measuring = Some((now, handled())),
            Some((start, _)) if now - start >= window => break,
            _ => {}
        }
        // Keep the healthy queue topped up: it must never be the bottleneck.
        let queued = bus.stats().get("notification").map_or(0, |q| q.depth);
        if queued < 5000 {
            let batch: Vec<Outgoing> = (i..i + 2000)
                .map(|n| message(n, "payment.success", &payment))
                .collect();
            publish(&bus, &batch)?;
            i += 2000;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (start, first) = measuring.unwrap_or((began, 0));
    let rate = (handled() - first) as f64 / start.elapsed().as_secs_f64();
    let pauses = hostile_workers.as_ref().map_or(0, |w| {
        w.stats().pauses.load(std::sync::atomic::Ordering::Relaxed)
    });
    healthy.stop();
    if let Some(w) = hostile_workers {
        w.stop();
    }
    Ok((rate, pauses))
}

pub(crate) fn run_all(args: &HostileArgs) -> anyhow::Result<()> {
    let window = Duration::from_secs(args.seconds);
    println!(
        "\n### A healthy plugin beside a hostile one (notification events/s, median of {} alternating rounds)\n",
        args.rounds
    );
    println!("| hostile plugin | alone | beside it | ratio | cool-down pauses |");
    println!("|---|---:|---:|---:|---:|");
    let steady = Duration::from_secs(args.steady);
    let mut rows = Vec::new();
    for (label, kind, data) in hostile_kinds() {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == kind) {
            continue;
        }
        rows.push((
            format!("{label}, first {} s", args.seconds),
            kind,
            data.clone(),
            Duration::ZERO,
            window,
            args.rounds,
        ));
        if kind == "loop" {
            rows.push((
                format!("{label}, {0} s from {0} s on", args.steady),
                kind,
                data,
                steady,
                steady,
                1,
            ));
        }
    }
    for (label, kind, data, skip, window, rounds) in rows {
        let (mut alone, mut beside, mut pauses) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            alone.push(run(Duration::ZERO, window, None)?.0);
            let (rate, p) = run(skip, window, Some((kind, &data)))?;
            beside.push(rate);
            pauses.push(p as f64);
        }
        let (a, b) = (median(alone), median(beside));
        println!(
            "| {label} | {a:.0} | {b:.0} | {:.2} | {:.0} |",
            b / a,
            median(pauses)
        );
    }
    Ok(())
}
