//! `switchboard-bench archive`: the event archive of the embedded bus.
//!
//! - append: events/s into the log, fsynced before `append` returns; one
//!   thread with batches of 64 (ingress and bulk publishes), and 8 threads
//!   publishing one event at a time (plugin outputs), which share fsyncs;
//! - read: events/s read back in order (what a replay or `switchboard events`
//!   reads), by scan and by aggregate;
//! - replay: events/s read from the archive and run offline through the
//!   no-op plugin (`switchboard replay --dry-run`: decode, handle, outcome);
//! - the embedded bus itself, publishing one event at a time from 8 threads
//!   into a drained queue, as ingress does (each publish returns once fsynced),
//!   with the archive off and on, rounds alternating.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard::archive::{Archive, Query};
use switchboard::bus::embedded::EmbeddedBus;
use switchboard::bus::{Bus, ExchangeSpec, Message, Outgoing, QueueSpec, Settlement, Topology};
use switchboard::config::{AggregateRule, ArchiveConfig, RouterConfig};
use switchboard::replay::{self, Offline};
use switchboard::route::{Binding, ExchangeKind};
use switchboard::runtime::Runtime;

use crate::median;

/// Alternating rounds per row (odd, for a median).
const ROUNDS: usize = 5;

#[derive(Debug, clap::Args)]
pub struct ArchiveArgs {
    /// Events per round.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
}

fn config() -> ArchiveConfig {
    ArchiveConfig {
        enabled: true,
        aggregates: vec![AggregateRule {
            pattern: "order.*".into(),
            field: "data.order_id".into(),
        }],
        ..ArchiveConfig::default()
    }
}

/// An `order.created` envelope of about 250 bytes, as services publish them.
fn order(i: usize) -> Outgoing {
    let body = json!({"id": format!("evt-{i}"), "type": "order.created", "source": "shop",
                      "correlation_id": format!("flow-{}", i / 4),
                      "data": {"order_id": format!("order-{}", i % 1000), "amount": 42.5,
                               "currency": "EUR", "items": [{"sku": "A-1", "qty": 2}]}});
    Outgoing {
        exchange: "events".into(),
        routing_key: "order.created".into(),
        message: Message {
            body: body.to_string().into_bytes().into(),
            content_type: Some("application/json".into()),
            message_id: None,
            headers: Vec::new(),
        },
    }
}

/// Events/s appending `n` events, `threads` threads, `batch` per append
/// (`synced`: each append waits for its fsync; else written only).
fn append_rate(
    archive: &Arc<Archive>,
    n: usize,
    threads: usize,
    batch: usize,
    synced: bool,
) -> f64 {
    let per_thread = n / threads;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let archive = archive.clone();
            s.spawn(move || {
                let events: Vec<Outgoing> =
                    (0..per_thread).map(|i| order(t * per_thread + i)).collect();
                for chunk in events.chunks(batch) {
                    if synced {
                        archive.append(chunk).expect("append");
                    } else {
                        archive.write(chunk).expect("write");
                    }
                }
            });
        }
    });
    (per_thread * threads) as f64 / start.elapsed().as_secs_f64()
}

fn bus(archive: Option<Arc<Archive>>) -> anyhow::Result<EmbeddedBus> {
    let bus = EmbeddedBus::with_archive(archive);
    bus.apply(&Topology {
        exchanges: vec![ExchangeSpec {
            name: "events".into(),
            kind: ExchangeKind::Topic,
            durable: true,
        }],
        queues: vec![QueueSpec {
            plugin: "sink".into(),
            capacity: usize::MAX,
            prefetch: 16,
            ordered: false,
            retry_delays: Vec::new(),
        }],
        bindings: vec![Binding {
            exchange: "events".into(),
            kind: ExchangeKind::Topic,
            pattern: "#".into(),
            plugin: "sink".into(),
        }],
    })?;
    Ok(bus)
}

/// Events/s published one at a time from 8 threads, a thread taking them off.
fn publish_rate(bus: &EmbeddedBus, n: usize) -> anyhow::Result<f64> {
    let rx = bus.consume("sink")?;
    let threads = 8;
    let per_thread = n / threads;
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..per_thread * threads {
                let Ok(delivery) = rx.recv() else { return };
                let handled = Settlement::Handled {
                    outputs: Vec::new(),
                    delayed: Vec::new(),
                    timeout: Duration::from_secs(1),
                };
                delivery
                    .settle
                    .settle(delivery.delivered, handled, Box::new(|_| {}));
            }
        });
        for t in 0..threads {
            s.spawn(move || {
                for i in 0..per_thread {
                    bus.publish(vec![order(t * per_thread + i)], Duration::from_secs(10))
                        .expect("publish");
                }
            });
        }
    });
    Ok((per_thread * threads) as f64 / start.elapsed().as_secs_f64())
}

/// Events/s of `switchboard replay --dry-run` over the whole of `archive`
/// through the no-op plugin, per round: reading the archive, selecting by
/// route, decoding, running the plugin, rendering each outcome.
fn replay_rates(archive: &Archive, dir: &std::path::Path) -> anyhow::Result<Vec<f64>> {
    let noop = crate::wasm("noop_guest")?;
    let text = format!(
        "plugins_dir = {:?}\nstate_dir = {:?}\n[runtime]\npooling = false\n\
         [plugins.noop]\nfile = \"noop_guest.wasm\"\n\
         [[exchanges]]\nname = \"events\"\n\
         [[routes]]\nexchange = \"events\"\npattern = \"#\"\nplugin = \"noop\"\n",
        noop.parent().unwrap_or(dir),
        dir.join("replay-state"),
    );
    let config = RouterConfig::parse(&text, dir)?;
    let runtime = Runtime::new(config.runtime_config())?;
    let plugin = Offline::load(&runtime, &config, "noop", None, None)?;
    let mut rates = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let events = replay::routed_to(&config, "noop", archive.query(&Query::default())?)?;
        let mut handled = 0usize;
        for event in &events {
            let line = plugin.run(event);
            handled += usize::from(line.get("outputs").is_some());
        }
        anyhow::ensure!(handled == events.len(), "the no-op plugin failed an event");
        rates.push(events.len() as f64 / start.elapsed().as_secs_f64());
    }
    Ok(rates)
}

pub fn run(args: &ArchiveArgs) -> anyhow::Result<()> {
    let n = args.events;
    let dir = tempfile::tempdir()?;
    println!("Event archive, {n} events of ~250 bytes per round, median of {ROUNDS} rounds");
    println!();
    println!("| what | events/s |");
    println!("|---|---|");
    let mut one_thread = Vec::new();
    let mut eight_threads = Vec::new();
    let mut unsynced = Vec::new();
    let open = |name: String| Archive::open(&dir.path().join(name), &config()).map(Arc::new);
    for round in 0..ROUNDS {
        one_thread.push(append_rate(&open(format!("a{round}"))?, n, 1, 64, true));
        eight_threads.push(append_rate(&open(format!("b{round}"))?, n / 10, 8, 1, true));
        unsynced.push(append_rate(&open(format!("c{round}"))?, n, 1, 64, false));
    }
    println!(
        "| append, 1 thread, batches of 64, fsync per batch | {:.0} |",
        median(one_thread)
    );
    println!(
        "| write without waiting for an fsync (plugin outputs), 1 thread, batches of 64 | {:.0} |",
        median(unsynced)
    );
    println!(
        "| append, 8 threads, 1 event per append, shared fsyncs ({} events) | {:.0} |",
        n / 10,
        median(eight_threads)
    );
    let full = Archive::open(&dir.path().join("a0"), &config())?;
    let mut scans = Vec::new();
    let mut by_aggregate = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let read = full.query(&Query::default())?.len();
        scans.push(read as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        let mut read = 0;
        for order in 0..20 {
            read += full
                .query(&Query {
                    aggregate: Some(format!("order-{order}")),
                    ..Query::default()
                })?
                .len();
        }
        by_aggregate.push(read as f64 / start.elapsed().as_secs_f64());
    }
    println!(
        "| read back in order, whole archive ({n} events) | {:.0} |",
        median(scans)
    );
    println!(
        "| read by aggregate (20 aggregates, 1 in 1000 events each) | {:.0} |",
        median(by_aggregate)
    );
    let replays = replay_rates(&full, dir.path())?;
    println!(
        "| replay through the no-op plugin, dry run, 1 thread ({n} events) | {:.0} |",
        median(replays)
    );
    let mut off = Vec::new();
    let mut on = Vec::new();
    for round in 0..ROUNDS {
        off.push(publish_rate(&bus(None)?, n / 10)?);
        let archive = Archive::open(&dir.path().join(format!("bus{round}")), &config())?;
        on.push(publish_rate(&bus(Some(Arc::new(archive)))?, n / 10)?);
    }
    let (off, on) = (median(off), median(on));
    println!(
        "| embedded bus, ingress-style publish (8 threads, 1 event each), archive off | {off:.0} |"
    );
    println!(
        "| embedded bus, ingress-style publish (8 threads, 1 event each), archive on | {on:.0} ({:.2}×) |",
        on / off
    );
    Ok(())
}
