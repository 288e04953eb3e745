//! `switchboard-bench languages`: the notification plugin in Rust, Python and
//! JavaScript, side by side in one run: component size, cold compile, load from
//! the compile cache, and the per-event cost on a reused and on a fresh instance.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use switchboard::kv::EmbeddedStore;
use switchboard::runtime::{CacheOutcome, Limits, PluginSpec, Runtime, RuntimeConfig};

use crate::{event, per_call, us, wasm};

/// Options of `switchboard-bench languages`.
#[derive(clap::Args)]
pub struct LanguagesArgs {
    /// Events per round on a reused instance.
    #[arg(long, default_value_t = 2000)]
    pub events: usize,
    /// Events per round on fresh instances (each instantiates the component).
    #[arg(long, default_value_t = 100)]
    pub fresh_events: usize,
}

fn lang_wasm(name: &str) -> anyhow::Result<PathBuf> {
    crate::built("lang", name, "make lang-plugins")
}

fn notification_event(i: usize) -> switchboard::runtime::Event {
    event(
        &format!("e{i}"),
        "payment.success",
        json!({"payment_id": format!("P-{i}"), "amount": 129.9, "currency": "EUR",
               "customer": {"name": "Ann Lee", "email": "ann@example.com", "phone": "+33612345678"}}),
    )
}

pub fn run(args: &LanguagesArgs) -> anyhow::Result<()> {
    let components = [
        ("Rust", wasm("notification")?),
        ("Python", lang_wasm("notification-py")?),
        ("JavaScript", lang_wasm("notification-js")?),
    ];
    let dir = tempfile::tempdir()?;
    let kv = Arc::new(EmbeddedStore::open(&dir.path().join("kv.redb"))?);

    let mut rows = Vec::new();
    for (language, path) in &components {
        let size = std::fs::metadata(path).context("size")?.len();
        let cache = tempfile::tempdir()?;
        let runtime = || {
            Runtime::new(RuntimeConfig {
                cache_dir: Some(cache.path().to_path_buf()),
                ..RuntimeConfig::default()
            })
        };
        let spec = |reuse: u32| -> anyhow::Result<PluginSpec> {
            let mut spec = PluginSpec::from_file("notification", path, kv.clone())?;
            spec.limits = Limits {
                instance_reuse: reuse,
                ..Limits::default()
            };
            Ok(spec)
        };

        // Cold compile, then a new runtime (a restart) loading from the cache.
        let start = Instant::now();
        let (_, outcome) = runtime()?.load(spec(1000)?)?;
        let compile = start.elapsed();
        if outcome != CacheOutcome::Compiled {
            bail!("{language}: expected a compilation");
        }
        let warm = runtime()?;
        let start = Instant::now();
        let (plugin, outcome) = warm.load(spec(1000)?)?;
        let hit = start.elapsed();
        if outcome != CacheOutcome::Hit {
            bail!("{language}: expected a cache hit");
        }

        // The first event instantiates; then the instance is reused.
        let start = Instant::now();
        let outputs = plugin
            .handle(&notification_event(0))
            .map_err(|f| anyhow::anyhow!("{language}: the first event failed: {f:?}"))?;
        let first = start.elapsed();
        if outputs.len() != 2 {
            bail!("{language}: {} outputs, expected 2", outputs.len());
        }
        let reused = measure(&plugin, args.events)?;
        let (fresh_plugin, _) = warm.load(spec(1)?)?;
        let fresh = measure(&fresh_plugin, args.fresh_events)?;
        rows.push((*language, size, compile, hit, first, reused, fresh));
    }

    let rust_reused = rows[0].5.as_secs_f64();
    let rust_fresh = rows[0].6.as_secs_f64();
    println!(
        "### The notification plugin per language (median of {} rounds)\n",
        crate::ROUNDS
    );
    println!(
        "| language | component | cold compile | load from cache | first event | per event, reused instance | × Rust | per event, fresh instance | × Rust |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (language, size, compile, hit, first, reused, fresh) in rows {
        println!(
            "| {language} | {:.1} MB | {} ms | {} ms | {} ms | {} µs | {:.1} | {} µs | {:.1} |",
            size as f64 / 1e6,
            ms(compile),
            ms(hit),
            ms(first),
            us(reused),
            reused.as_secs_f64() / rust_reused,
            us(fresh),
            fresh.as_secs_f64() / rust_fresh,
        );
    }
    Ok(())
}

fn measure(plugin: &switchboard::runtime::Plugin, n: usize) -> anyhow::Result<Duration> {
    let mut failures = 0usize;
    let t = per_call(n, |i| {
        if plugin.handle(&notification_event(i)).is_err() {
            failures += 1;
        }
    });
    if failures > 0 {
        bail!("{failures} events failed");
    }
    Ok(t)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}
