//! `switchboard-bench kv`: what one kv call costs, on the embedded store and on
//! Redis, side by side in one run.
//!
//! Three views: the store call alone (host side, no WebAssembly); one call made
//! by a plugin, as the difference between an event that makes it and an event
//! that does not (the `scripted` guest, one output either way); and billing's
//! real work per event (a bill, then its payment: claim, compare-and-set).
//! For each row the two backends are measured in alternating rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use switchboard::config::Secret;
use switchboard::kv::{EmbeddedStore, KvStore, RedisSettings, RedisStore};
use switchboard::runtime::{Limits, Plugin, PluginSpec, Runtime, RuntimeConfig};

use crate::{event, us, wasm};

/// Alternating rounds per row (odd, for a median).
const ROUNDS: usize = 7;

#[derive(Debug, clap::Args)]
pub struct KvArgs {
    /// The Redis to measure (a prefix of its own is used, then removed).
    #[arg(long, default_value = "redis://127.0.0.1:6379/0")]
    redis: String,
    /// Calls (or events) per round.
    #[arg(long, default_value_t = 2_000)]
    calls: usize,
}

struct Backend {
    label: &'static str,
    store: Arc<dyn KvStore>,
}

/// Median per-call time of `f(backend, i)` for each backend, rounds alternating
/// between them.
fn side_by_side(
    backends: &[Backend],
    n: usize,
    mut f: impl FnMut(&Backend, usize) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Duration>> {
    for b in backends {
        for i in 0..n.min(100) {
            f(b, i)?;
        }
    }
    let mut times = vec![Vec::with_capacity(ROUNDS); backends.len()];
    for round in 0..ROUNDS {
        for (which, b) in backends.iter().enumerate() {
            let start = Instant::now();
            for i in 0..n {
                f(b, (round + 1) * 1_000_000 + i)?;
            }
            times[which].push(start.elapsed() / u32::try_from(n).unwrap_or(u32::MAX));
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort();
            t[ROUNDS / 2]
        })
        .collect())
}

fn row(label: &str, times: &[Duration]) {
    let ratio = times[1].as_secs_f64() / times[0].as_secs_f64().max(1e-12);
    println!(
        "| {label} | {} | {} | {ratio:.2}× |",
        us(times[0]),
        us(times[1])
    );
}

fn load(
    runtime: &Runtime,
    store: &Arc<dyn KvStore>,
    name: &str,
    component: &str,
) -> anyhow::Result<Plugin> {
    let mut spec = PluginSpec::from_file(name, &wasm(component)?, store.clone())?;
    spec.limits = Limits {
        instance_reuse: 1000,
        ..Limits::default()
    };
    Ok(runtime.load(spec)?.0)
}

pub fn run(args: &KvArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let prefix = format!("sb-bench-{}", std::process::id());
    let redis = RedisStore::new(&RedisSettings {
        url: Secret::new(&args.redis),
        prefix: prefix.clone(),
        pool_size: 16,
        timeout: Duration::from_secs(2),
    })?;
    redis.ping().with_context(|| {
        format!(
            "Redis must answer at {}",
            Secret::new(&args.redis).redacted()
        )
    })?;
    let backends = [
        Backend {
            label: "embedded (redb, fsync per write)",
            store: Arc::new(EmbeddedStore::open(&dir.path().join("kv.redb"))?),
        },
        Backend {
            label: "redis (same machine, TCP)",
            store: Arc::new(redis),
        },
    ];
    let n = args.calls;
    println!("### kv call cost: embedded vs Redis (µs, median of {ROUNDS} alternating rounds)\n");
    println!(
        "Backends: {} / {}. {n} calls (events) per round.\n",
        backends[0].label, backends[1].label
    );
    println!("| what | embedded | redis | redis / embedded |");
    println!("|---|---:|---:|---:|");

    // The store alone.
    for b in &backends {
        b.store
            .set("bench", "k", b"a value of some thirty bytes..", None)?;
        b.store.set("bench", "n", b"0", None)?;
    }
    row(
        "store `get` (host side)",
        &side_by_side(&backends, n, |b, _| {
            b.store.get("bench", "k").map(drop).map_err(Into::into)
        })?,
    );
    row(
        "store `set`",
        &side_by_side(&backends, n, |b, i| {
            b.store
                .set(
                    "bench",
                    &format!("s{}", i % 64),
                    b"a value of some thirty bytes..",
                    None,
                )
                .map_err(Into::into)
        })?,
    );
    row(
        "store `incr`",
        &side_by_side(&backends, n, |b, _| {
            b.store.incr("bench", "n", 1).map(drop).map_err(Into::into)
        })?,
    );
    row(
        "store `set-if-absent` (new key each call)",
        &side_by_side(&backends, n, |b, i| {
            b.store
                .set_if_absent(
                    "bench",
                    &format!("claim-{i}"),
                    b"e",
                    Some(Duration::from_secs(60)),
                )
                .map(drop)
                .map_err(Into::into)
        })?,
    );
    row(
        "store `compare-and-set` (succeeds)",
        &side_by_side(&backends, n, |b, i| {
            let (old, new) = (i.to_string(), (i + 1).to_string());
            b.store.set("bench", "cas", old.as_bytes(), None)?;
            let swapped = b.store.compare_and_set(
                "bench",
                "cas",
                Some(old.as_bytes()),
                new.as_bytes(),
                None,
            )?;
            anyhow::ensure!(swapped, "compare-and-set lost a race it had alone");
            Ok(())
        })?,
    );

    // One call as a plugin makes it: event with the call minus event without.
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let scripted: Vec<Plugin> = backends
        .iter()
        .map(|b| load(&runtime, &b.store, "scripted", "scripted_guest"))
        .collect::<anyhow::Result<_>>()?;
    let which = |b: &Backend| usize::from(b.label.starts_with("redis"));
    let baseline = side_by_side(&backends, n, |b, i| {
        scripted[which(b)]
            .handle(&event(&format!("e{i}"), "config", json!({"key": "none"})))
            .map(drop)
            .map_err(|f| anyhow::anyhow!("{f}"))
    })?;
    row("plugin event without kv (baseline, one output)", &baseline);
    for (label, op) in [
        (
            "plugin event with one `get`",
            json!({"op": "get", "key": "k"}),
        ),
        (
            "plugin event with one `incr`",
            json!({"op": "incr", "key": "n"}),
        ),
        (
            "plugin event with one `set-if-absent` (key taken: a duplicate's path)",
            json!({"op": "set-if-absent", "key": "once", "value": "v"}),
        ),
    ] {
        let with = side_by_side(&backends, n, |b, i| {
            scripted[which(b)]
                .handle(&event(&format!("e{i}"), "kv", op.clone()))
                .map(drop)
                .map_err(|f| anyhow::anyhow!("{f}"))
        })?;
        row(label, &with);
        let cost: Vec<Duration> = with
            .iter()
            .zip(&baseline)
            .map(|(w, b)| w.saturating_sub(*b))
            .collect();
        row(
            &format!("↳ the call's own cost ({label} − baseline)"),
            &cost,
        );
    }

    // Billing's real work: bill.created (set-if-absent), then its payment
    // (get, set-if-absent claim, get, compare-and-set, set).
    let billing: Vec<Plugin> = backends
        .iter()
        .map(|b| load(&runtime, &b.store, "billing", "billing"))
        .collect::<anyhow::Result<_>>()?;
    let flow = side_by_side(&backends, n / 2, |b, i| {
        let plugin = &billing[which(b)];
        let bill = format!("B-{i}");
        let event_for = |kind: &str, data| event(&format!("{kind}-{i}"), kind, data);
        plugin
            .handle(&event_for(
                "bill.created",
                json!({"bill_id": bill, "amount": 10, "currency": "EUR"}),
            ))
            .map_err(|f| anyhow::anyhow!("{f}"))?;
        let outputs = plugin
            .handle(&event_for(
                "payment.success",
                json!({"bill_id": bill, "payment_id": format!("P-{i}")}),
            ))
            .map_err(|f| anyhow::anyhow!("{f}"))?;
        anyhow::ensure!(
            outputs.len() == 1,
            "billing emitted {} outputs",
            outputs.len()
        );
        Ok(())
    })?;
    row("billing: bill + its payment (7 kv calls)", &flow);

    let removed = backends_redis_cleanup(&args.redis, &prefix)?;
    println!("\n({removed} benchmark keys removed from Redis.)");
    Ok(())
}

fn backends_redis_cleanup(url: &str, prefix: &str) -> anyhow::Result<u64> {
    let store = RedisStore::new(&RedisSettings {
        url: Secret::new(url),
        prefix: prefix.to_string(),
        pool_size: 1,
        timeout: Duration::from_secs(5),
    })?;
    Ok(store.remove_all()?)
}
