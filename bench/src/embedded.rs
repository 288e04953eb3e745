//! Embedded-bus throughput (events/s through bus, dispatch and runtime, no HTTP)
//! and hot-swap time (file written → new version serving).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use switchboard::appliance::Appliance;
use switchboard::bus::embedded::EmbeddedBus;
use switchboard::bus::{Bus, BusError, ExchangeSpec, Message, Outgoing, QueueSpec, Topology};
use switchboard::config::RouterConfig;
use switchboard::dispatch::{DispatchSettings, PluginWorkers};
use switchboard::kv::EmbeddedStore;
use switchboard::route::{Binding, ExchangeKind};
use switchboard::runtime::{PluginSpec, Runtime, RuntimeConfig};

use crate::{median, wasm};

fn message(i: usize, kind: &str, data: &serde_json::Value) -> Outgoing {
    let body = json!({"id": format!("e{i}"), "type": kind, "source": "bench", "tenant_id": "acme",
                      "correlation_id": "c", "data": data});
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

/// Publishes `n` events (`event(i)`) in batches of 64 as fast as the bus takes
/// them, with `plugins` (name, component, pattern) consuming; events/s until
/// every queue is idle (every event settled: outputs published, kv writes
/// durable).
fn throughput(
    plugins: &[(&str, &str, &str)],
    event: &dyn Fn(usize) -> Outgoing,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let kv = Arc::new(EmbeddedStore::open(&dir.path().join("kv.redb"))?);
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let bus = EmbeddedBus::new();
    bus.apply(&Topology {
        exchanges: vec![ExchangeSpec {
            name: "events".into(),
            kind: ExchangeKind::Topic,
            durable: true,
        }],
        queues: plugins
            .iter()
            .map(|(p, _, _)| QueueSpec {
                plugin: (*p).into(),
                capacity: 65_536,
                prefetch: 16,
                ordered: false,
                retry_delays: Vec::new(),
            })
            .collect(),
        bindings: plugins
            .iter()
            .map(|(p, _, pattern)| Binding {
                exchange: "events".into(),
                kind: ExchangeKind::Topic,
                pattern: (*pattern).into(),
                plugin: (*p).into(),
            })
            .collect(),
    })?;
    let mut workers = Vec::new();
    for (name, component, _) in plugins {
        let spec = PluginSpec::from_file(*name, &wasm(component)?, kv.clone())?;
        let plugin = Arc::new(runtime.load(spec)?.0);
        let settings = DispatchSettings {
            concurrency,
            ..DispatchSettings::default()
        };
        let metrics = switchboard::metrics::Metrics::new().plugin(plugin.name());
        workers.push(PluginWorkers::start(
            Arc::new(bus.clone()),
            plugin,
            settings,
            metrics,
        )?);
    }
    let messages: Vec<Outgoing> = (0..n).map(event).collect();
    let start = Instant::now();
    for chunk in messages.chunks(64) {
        loop {
            match bus.publish(chunk.to_vec(), Duration::from_secs(10)) {
                Ok(()) => break,
                Err(BusError::Full { .. }) => continue,
                Err(e) => bail!("publish failed: {e}"),
            }
        }
    }
    while !bus.is_idle() {
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = start.elapsed();
    let stats = bus.stats();
    for (plugin, q) in &stats {
        if q.dead_lettered > 0 || q.retried > 0 {
            bail!(
                "{plugin}: {} dead-lettered, {} retried",
                q.dead_lettered,
                q.retried
            );
        }
    }
    for w in workers {
        w.stop();
    }
    Ok(n as f64 / elapsed.as_secs_f64())
}

/// A plugin to run: (name, component, route pattern).
type PluginRow<'a> = (&'a str, &'a str, &'a str);

/// A throughput row: (label, plugins, the events, how many).
type Row<'a> = (
    &'a str,
    &'a [PluginRow<'a>],
    Box<dyn Fn(usize) -> Outgoing>,
    usize,
);

/// Bills published in billing's row, then one payment each.
const BILLS: usize = 20_000;

/// Bill `i` (`i < BILLS`), then the payment of bill `i - BILLS`.
fn bill_then_payment(i: usize) -> Outgoing {
    let bill = format!("bill-{}", i % BILLS);
    if i < BILLS {
        message(
            i,
            "bill.created",
            &json!({"bill_id": bill, "amount": 10, "currency": "EUR",
                    "customer": {"email": "a@b.c"}}),
        )
    } else {
        message(
            i,
            "payment.success",
            &json!({"bill_id": bill, "payment_id": format!("pay-{i}"), "amount": 10}),
        )
    }
}

/// Milliseconds from writing a new version of a plugin file to that version
/// serving, through the watcher (debounce included) and compilation.
fn hot_swap() -> anyhow::Result<Vec<f64>> {
    let temp = tempfile::tempdir()?;
    let dir = temp.path();
    std::fs::create_dir_all(dir.join("plugins"))?;
    let a = std::fs::read(wasm("noop_guest")?)?;
    let b = std::fs::read(wasm("scripted_guest")?)?;
    std::fs::write(dir.join("plugins/worker.wasm"), &a)?;
    let toml = "plugins_dir = \"plugins\"\nstate_dir = \"state\"\n[[exchanges]]\nname = \"events\"\n\
                [plugins.worker]\n[[routes]]\nexchange = \"events\"\npattern = \"#\"\nplugin = \"worker\"\n";
    std::fs::write(dir.join("router.toml"), toml)?;
    let appliance = Appliance::start(RouterConfig::load(&dir.join("router.toml"))?)?;
    let _watcher = switchboard::watch::start(appliance.clone(), &dir.join("router.toml"))?;
    let version = |appliance: &Appliance| {
        appliance
            .statuses()
            .first()
            .and_then(|s| s.version.clone())
            .unwrap_or_default()
    };
    let mut times = Vec::new();
    for round in 0..6 {
        let next = if round % 2 == 0 { &b } else { &a };
        let before = version(&appliance);
        let tmp = dir.join("plugins/.worker.tmp");
        std::fs::write(&tmp, next)?;
        let start = Instant::now();
        std::fs::rename(&tmp, dir.join("plugins/worker.wasm"))?;
        while version(&appliance) == before {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the new version never served");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    appliance.shutdown(Duration::from_secs(5))?;
    Ok(times)
}

pub(crate) fn run() -> anyhow::Result<()> {
    println!("\n### Embedded bus throughput (events/s, median of 3 runs)\n");
    println!("| workload | events | events/s |");
    println!("|---|---:|---:|");
    let noop = [("noop", "noop_guest", "#")];
    let rows: [Row<'_>; 4] = [
        (
            "no-op plugin, 2 workers",
            &noop,
            Box::new(|i| message(i, "order.created", &json!({"order_id": 1}))),
            200_000,
        ),
        (
            "notification (templates, 2 outputs per event), 2 workers",
            &[("notification", "notification", "payment.*")],
            Box::new(|i| {
                message(
                    i,
                    "payment.success",
                    &json!({"amount": 10, "currency": "EUR",
                            "customer": {"email": "a@b.c", "phone": "+331"}}),
                )
            }),
            50_000,
        ),
        (
            "analytics (claim, 3 counters, record: 5 kv calls, 4 writes), 2 workers",
            &[("analytics", "analytics", "#")],
            Box::new(|i| message(i, "order.created", &json!({"order_id": 1}))),
            50_000,
        ),
        (
            "billing: 20,000 bills, then their payments (bill.paid comes back to it), 2 workers",
            &[("billing", "billing", "#")],
            Box::new(bill_then_payment),
            2 * BILLS,
        ),
    ];
    for (label, plugins, event, n) in rows {
        let runs: anyhow::Result<Vec<f64>> =
            (0..3).map(|_| throughput(plugins, &*event, n, 2)).collect();
        println!("| {label} | {n} | {:.0} |", median(runs?));
    }
    let times = hot_swap()?;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    println!("\n### Hot swap (file renamed into plugins/ → new version serving)\n");
    println!(
        "6 swaps, ms: {} — median {:.0} ms (includes the watcher's 200 ms debounce)",
        times
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
        sorted[sorted.len() / 2]
    );
    Ok(())
}
