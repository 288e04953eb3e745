//! `switchboard check`: everything `run` would refuse, found before deploying.
//!
//! Reads and validates `router.toml` (with the environment applied, as `run`
//! would), compiles and type-checks every enabled plugin, and prints the route
//! table and each plugin's file, version and limits. Every problem is printed —
//! a bad route does not stop the plugins from being checked, a broken plugin does
//! not stop the others. Exit code: 0 all good, 1 any problem, 2 when the file
//! cannot be read or parsed.
//!
//! Check never touches the configured state folder: plugins get a throw-away
//! key-value store and no compiled-artifact cache.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use crate::config::{ConfigError, PluginSettings, RouterConfig, duration_text, size_text};
use crate::kv::{EmbeddedStore, KvStore};
use crate::runtime::{LoadError, PluginSpec, Runtime, RuntimeConfig};

/// What to check (the `switchboard check` arguments).
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The configuration file.
    #[arg(long, default_value = "router.toml", env = "SWITCHBOARD_CONFIG")]
    pub config: PathBuf,
}

/// Runs the check. The report goes to `out`, problems to `err` as `error: …`
/// lines; the result is the exit code. `Err` is for failures of the check itself
/// (no temporary folder, a closed output).
pub fn run(args: &CheckArgs, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<i32> {
    let path = &args.config;
    let config = match RouterConfig::load_unvalidated(path) {
        Ok(config) => config,
        Err(e @ (ConfigError::Read { .. } | ConfigError::Parse { .. })) => {
            writeln!(err, "error: {e}")?;
            return Ok(2);
        }
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(1);
        }
    };
    let mut problems = 0;
    if let Err(errors) = config.validate() {
        for e in &errors {
            writeln!(err, "error: {}: {e}", path.display())?;
        }
        problems += errors.len();
    }

    writeln!(out, "config   {}", path.display())?;
    match &config.broker.url {
        Some(url) => writeln!(
            out,
            "broker   {url} ({}, prefix {:?})",
            config.broker.bus_kind().map_or("?", |kind| kind.as_str()),
            config.broker.prefix
        )?,
        None => writeln!(out, "broker   embedded bus")?,
    }
    match config.redis_settings() {
        // Reachability is reported, not counted as a problem: the router starts
        // without Redis and retries the events that need it until it answers.
        Some(settings) => {
            let reach = match crate::kv::RedisStore::new(&settings).and_then(|s| s.ping()) {
                Ok(()) => "reachable".to_string(),
                Err(e) => format!("NOT reachable now ({e}); events that use kv will be retried"),
            };
            writeln!(
                out,
                "kv       redis {} (keys {}:<plugin>:<key>): {reach}",
                settings.url, settings.prefix
            )?;
        }
        None => writeln!(out, "kv       embedded ({})", config.kv_path().display())?,
    }
    writeln!(out, "http     {}", config.http.listen)?;
    writeln!(out, "plugins  {}", config.plugins_dir.display())?;
    print_routes(&config, out)?;

    writeln!(out, "\nplugins")?;
    if config.plugins.is_empty() {
        writeln!(out, "  (none)")?;
    }
    let state = tempfile::tempdir().context("cannot create a temporary state folder")?;
    let kv: Arc<dyn KvStore> = Arc::new(EmbeddedStore::open(&state.path().join("kv.redb"))?);
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: None,
        pooling: false,
        ..config.runtime_config()
    });
    let runtime = match runtime {
        Ok(runtime) => Some(runtime),
        Err(e) => {
            writeln!(err, "error: {e}; plugins were not compiled")?;
            problems += 1;
            None
        }
    };
    for name in config.plugins.keys() {
        let Some(settings) = config.plugin_settings(name) else {
            continue;
        };
        let status = if !settings.enabled {
            "disabled, not compiled".to_string()
        } else if let Some(runtime) = &runtime {
            match compile(runtime, &settings, kv.clone()) {
                Ok(status) => status,
                Err(e) => {
                    writeln!(err, "error: {e}")?;
                    problems += 1;
                    "FAILED".to_string()
                }
            }
        } else {
            "not compiled".to_string()
        };
        print_plugin(&config, &settings, &status, out)?;
    }

    writeln!(out)?;
    if problems == 0 {
        writeln!(
            out,
            "ok: {} plugins, {} routes",
            config.plugins.len(),
            config.routes.len()
        )?;
        Ok(0)
    } else {
        writeln!(
            err,
            "{}: {problems} problem{}",
            path.display(),
            if problems == 1 { "" } else { "s" }
        )?;
        Ok(1)
    }
}

/// Compiles and type-checks one plugin; `Ok` is its status line.
fn compile(
    runtime: &Runtime,
    settings: &PluginSettings,
    kv: Arc<dyn KvStore>,
) -> Result<String, String> {
    let mut spec = match PluginSpec::from_file(&settings.name, &settings.wasm, kv) {
        Ok(spec) => spec,
        Err(LoadError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "plugin {:?}: file not found: {}",
                settings.name,
                settings.wasm.display()
            ));
        }
        Err(e) => return Err(e.to_string()),
    };
    spec.limits = settings.limits();
    spec.config = settings.config.clone();
    let started = Instant::now();
    let (plugin, _) = runtime.load(spec).map_err(|e| e.to_string())?;
    Ok(format!(
        "ok, version {}, compiled in {}ms",
        plugin.version(),
        started.elapsed().as_millis()
    ))
}

/// The route table: one line per (exchange, pattern) → plugin.
fn print_routes(config: &RouterConfig, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "\nroutes")?;
    let rows: Vec<[String; 4]> = config
        .routes
        .iter()
        .flat_map(|route| {
            let kind = config
                .exchange(&route.exchange)
                .map_or_else(|| "?".to_string(), |e| e.kind.to_string());
            let plugin = match config.plugins.get(&route.plugin) {
                Some(p) if !p.enabled => format!("{} (disabled)", route.plugin),
                Some(_) => route.plugin.clone(),
                None => format!("{} (unknown)", route.plugin),
            };
            route.patterns.iter().map(move |pattern| {
                [
                    route.exchange.clone(),
                    kind.clone(),
                    if pattern.is_empty() {
                        "\"\"".to_string()
                    } else {
                        pattern.clone()
                    },
                    plugin.clone(),
                ]
            })
        })
        .collect();
    if rows.is_empty() {
        return writeln!(out, "  (none)");
    }
    let header = ["EXCHANGE", "KIND", "PATTERN", "PLUGIN"].map(String::from);
    let width = |i: usize| {
        rows.iter()
            .chain([&header])
            .map(|r| r[i].chars().count())
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (width(0), width(1), width(2));
    for (i, [exchange, kind, pattern, plugin]) in std::iter::once(&header).chain(&rows).enumerate()
    {
        let arrow = if i == 0 { " " } else { "→" };
        writeln!(
            out,
            "  {exchange:w0$}  {kind:w1$}  {pattern:w2$}  {arrow} {plugin}"
        )?;
    }
    for name in config.plugins.keys() {
        if !config.routes.iter().any(|r| &r.plugin == name) {
            writeln!(out, "  (plugin {name} has no routes: it receives nothing)")?;
        }
    }
    Ok(())
}

/// One plugin: status, file, limits and delivery settings, as `router.toml`
/// names them.
fn print_plugin(
    config: &RouterConfig,
    s: &PluginSettings,
    status: &str,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    writeln!(out, "  {}: {status}", s.name)?;
    writeln!(out, "    file      {}", s.wasm.display())?;
    writeln!(
        out,
        "    limits    timeout {}, memory {}, instance_reuse {}",
        duration_text(s.timeout),
        size_text(s.memory),
        s.instance_reuse
    )?;
    writeln!(
        out,
        "    delivery  concurrency {}, prefetch {}, max_attempts {}, max_hops {}, queue_capacity {}{}",
        s.concurrency,
        s.prefetch,
        s.max_attempts,
        s.max_hops,
        s.queue_capacity,
        if s.ordered { ", ordered" } else { "" }
    )?;
    writeln!(
        out,
        "    backoff   {} to {}, multiplier {}, jitter {}",
        duration_text(s.backoff.initial),
        duration_text(s.backoff.max),
        s.backoff.multiplier,
        s.backoff.jitter
    )?;
    if let Some(window) = s.dedupe {
        writeln!(out, "    dedupe    {}", duration_text(window))?;
    }
    writeln!(
        out,
        "    outputs   {}",
        s.output_exchange.as_deref().map_or_else(
            || "to the input's exchange".to_string(),
            |e| format!("to {e}")
        )
    )?;
    if !s.config.is_empty() {
        let keys: Vec<&str> = s.config.keys().map(String::as_str).collect();
        writeln!(out, "    config    {}", keys.join(", "))?;
    }
    writeln!(out, "    queue     {}.{}", config.broker.prefix, s.name)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Where `make plugins` puts the seed plugins.
    const WASM_DIR: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/wasm32-wasip2/release"
    );

    fn wasm_dir(plugins: &[&str]) -> &'static Path {
        for name in plugins {
            let path = Path::new(WASM_DIR).join(format!("{name}.wasm"));
            assert!(
                path.exists(),
                "{} is missing: run `make plugins` first",
                path.display()
            );
        }
        Path::new(WASM_DIR)
    }

    struct Checked {
        code: i32,
        out: String,
        err: String,
    }

    /// Writes `body` as a router.toml in a temporary folder and checks it.
    fn check(body: &str) -> Checked {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("router.toml");
        std::fs::write(&path, body).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run(&CheckArgs { config: path }, &mut out, &mut err).unwrap();
        Checked {
            code,
            out: String::from_utf8(out).unwrap(),
            err: String::from_utf8(err).unwrap(),
        }
    }

    fn toml_path(path: &Path) -> String {
        format!("{:?}", path.display().to_string())
    }

    #[test]
    fn the_seed_plugins_check_clean() {
        let dir = wasm_dir(&["billing", "notification", "analytics", "orders"]);
        let shipped = include_str!("../../../router.toml").replace(
            "plugins_dir = \"plugins\"",
            &format!("plugins_dir = {}", toml_path(dir)),
        );
        let checked = check(&shipped);
        assert_eq!(checked.err, "", "no problems expected");
        assert_eq!(checked.code, 0, "{}", checked.out);
        let out = &checked.out;
        for line in [
            "events    topic  bill.created         → billing",
            "events    topic  order.*              → notification",
            "events    topic  #                    → analytics",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
        for name in ["billing", "notification", "analytics", "orders"] {
            assert!(out.contains(&format!("  {name}: ok, version ")), "{out}");
            assert!(out.contains(&dir.join(format!("{name}.wasm")).display().to_string()));
        }
        assert!(out.contains("limits    timeout 5s, memory 64MiB, instance_reuse 1000"));
        assert!(out.contains("config    bill.paid.subject"), "{out}");
        assert!(out.contains("ok: 4 plugins, 4 routes"), "{out}");
    }

    #[test]
    fn the_kv_store_is_shown_and_an_unreachable_redis_is_reported_not_counted() {
        let checked = check("");
        assert!(
            checked.out.contains("kv       embedded ("),
            "{}",
            checked.out
        );

        // A port nobody listens on, with a password that must not show.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let checked = check(&format!(
            "[kv]\nbackend = \"redis\"\nurl = \"redis://:hunter22@127.0.0.1:{port}/0\"\n\
             timeout = \"200ms\"\n"
        ));
        assert_eq!(checked.code, 0, "{}{}", checked.out, checked.err);
        let line = checked
            .out
            .lines()
            .find(|l| l.starts_with("kv "))
            .unwrap_or_default();
        assert!(
            line.starts_with(&format!(
                "kv       redis redis://***@127.0.0.1:{port}/0 (keys switchboard:<plugin>:<key>): NOT reachable now"
            )),
            "{line}"
        );
        assert!(!checked.out.contains("hunter22"), "{}", checked.out);
    }

    #[test]
    fn an_unknown_key_exits_2_with_line_column_and_key() {
        let checked = check("[defaults]\ntimeout = \"5s\"\nconcurency = 4\n");
        assert_eq!(checked.code, 2);
        assert!(checked.err.starts_with("error: "), "{}", checked.err);
        assert!(
            checked
                .err
                .contains("router.toml:3:1: unknown field `concurency`"),
            "{}",
            checked.err
        );
        assert_eq!(
            checked.out, "",
            "nothing to report on a file that does not parse"
        );
    }

    #[test]
    fn an_unreadable_file_exits_2() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let args = CheckArgs {
            config: PathBuf::from("/nonexistent/router.toml"),
        };
        assert_eq!(run(&args, &mut out, &mut err).unwrap(), 2);
        let err = String::from_utf8(err).unwrap();
        assert!(
            err.contains("cannot read /nonexistent/router.toml"),
            "{err}"
        );
    }

    #[test]
    fn every_semantic_error_is_listed_and_exits_1() {
        let checked = check(
            r#"
            [defaults]
            max_attempts = 0
            [[exchanges]]
            name = "events"
            [plugins.billing]
            enabled = false
            timeout = "0s"
            [plugins.notification]
            enabled = false
            [[routes]]
            exchange = "payments"
            pattern = "payment.*"
            plugin = "billing"
            [[routes]]
            exchange = "events"
            pattern = "bill.*"
            plugin = "biling"
            "#,
        );
        assert_eq!(checked.code, 1);
        for problem in [
            "defaults.max_attempts: must be at least 1, got 0",
            "plugins.billing.timeout: must be between 1ms and 10m, got 0s",
            "routes[0].exchange: unknown exchange \"payments\" (declared: events)",
            "routes[1].plugin: unknown plugin \"biling\" (declared: billing, notification)",
        ] {
            assert!(
                checked.err.contains(&format!("router.toml: {problem}\n")),
                "missing {problem:?} in\n{}",
                checked.err
            );
        }
        assert!(checked.err.ends_with(": 4 problems\n"), "{}", checked.err);
        assert!(
            checked.out.contains("payment.*  → billing (disabled)"),
            "{}",
            checked.out
        );
        assert!(
            checked.out.contains("bill.*     → biling (unknown)"),
            "{}",
            checked.out
        );
        assert!(checked.out.contains("  billing: disabled, not compiled"));
    }

    #[test]
    fn a_broken_plugin_is_named_and_the_others_still_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("garbage.wasm"), b"this is not wasm").unwrap();
        std::fs::copy(
            wasm_dir(&["analytics"]).join("analytics.wasm"),
            dir.path().join("analytics.wasm"),
        )
        .unwrap();
        let checked = check(&format!(
            "plugins_dir = {}\n[plugins.garbage]\n[plugins.analytics]\n[plugins.ghost]\n",
            toml_path(dir.path())
        ));
        assert_eq!(checked.code, 1);
        assert!(
            checked
                .err
                .contains("error: plugin \"garbage\": not a WebAssembly file"),
            "{}",
            checked.err
        );
        assert!(
            checked.err.contains(&format!(
                "error: plugin \"ghost\": file not found: {}",
                dir.path().join("ghost.wasm").display()
            )),
            "{}",
            checked.err
        );
        assert!(checked.err.ends_with(": 2 problems\n"), "{}", checked.err);
        assert!(checked.out.contains("  garbage: FAILED"), "{}", checked.out);
        assert!(
            checked.out.contains("  analytics: ok, version "),
            "{}",
            checked.out
        );
    }
}
