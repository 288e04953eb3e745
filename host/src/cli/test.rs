//! `switchboard test`: run one plugin offline over recorded events and compare
//! what it did with a golden file.
//!
//! Input: JSONL, one seed envelope per line. Output: JSONL, one line per input
//! event, `{"input", "kind", "outputs": [envelope…]}` or `{"input", "kind",
//! "failure": {"kind", "reason"}}`. Inputs without an id get `line-<n>`, so runs
//! are repeatable; output timestamps are the only volatile field and are never
//! compared. A golden line matches when every field it names is equal in the
//! actual line (objects may omit fields; arrays must have the same length), and a
//! failure matches only a golden line that expects a failure.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::envelope;
use crate::kv::EmbeddedStore;
use crate::replay::{self, strip_volatile};
use crate::runtime::{Event, Limits, PluginSpec, Runtime, RuntimeConfig};

/// What to run (the `switchboard test` arguments).
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The plugin component (.wasm).
    pub plugin: PathBuf,
    /// Events to feed it, one JSON envelope per line.
    #[arg(long)]
    pub events: PathBuf,
    /// Golden file: the expected lines. Exits 1 on any mismatch.
    #[arg(long)]
    pub expect: Option<PathBuf>,
    /// Write the actual lines to the --expect file instead of comparing.
    #[arg(long, requires = "expect")]
    pub bless: bool,
    /// A configuration value for the plugin (repeatable).
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = super::parse_key_value)]
    pub config: Vec<(String, String)>,
    /// Keep plugin state in this folder (default: a temporary one).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Plugin name (default: the file name without extension).
    #[arg(long)]
    pub name: Option<String>,
    /// Exchange the events are said to come from.
    #[arg(long, default_value = "events")]
    pub exchange: String,
    /// Wall-time limit per event.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Memory limit per instance, e.g. 64MiB.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub memory: u64,
}

/// Parses a size such as `64MiB`.
fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>().map(|b| b.as_u64())
}

/// Runs the test; the exit code is 0 when everything matched (or, without a
/// golden file, nothing failed), 1 otherwise. Errors are for unusable input.
pub fn run(args: &TestArgs, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<i32> {
    let name = match &args.name {
        Some(name) => name.clone(),
        None => args
            .plugin
            .file_stem()
            .and_then(|s| s.to_str())
            .context("cannot take a plugin name from the file name; pass --name")?
            .to_string(),
    };
    let events = read_events(&args.events, &args.exchange)?;
    let expected = match (&args.expect, args.bless) {
        (Some(path), false) => Some(read_jsonl(path)?),
        _ => None,
    };

    let temp_state;
    let state_dir = match &args.state {
        Some(dir) => dir.as_path(),
        None => {
            temp_state = tempfile::tempdir().context("cannot create a temporary state folder")?;
            temp_state.path()
        }
    };
    let kv = Arc::new(EmbeddedStore::open(&state_dir.join("kv.redb"))?);
    let runtime = Runtime::new(RuntimeConfig {
        pooling: false,
        ..RuntimeConfig::default()
    })?;
    let mut spec = PluginSpec::from_file(name.clone(), &args.plugin, kv)?;
    spec.config = args.config.iter().cloned().collect::<BTreeMap<_, _>>();
    spec.limits = Limits {
        timeout: args.timeout,
        memory: args.memory,
        ..Limits::default()
    };
    let (plugin, _) = runtime.load(spec)?;

    let mut actual = Vec::with_capacity(events.len());
    for event in &events {
        let line = replay::outcome(&name, event, plugin.handle(event));
        writeln!(out, "{line}")?;
        actual.push(line);
    }

    let failed = actual.iter().filter(|l| l.get("failure").is_some()).count();
    if args.bless
        && let Some(path) = &args.expect
    {
        write_golden(path, &actual)?;
        writeln!(
            err,
            "wrote {} expected lines to {}",
            actual.len(),
            path.display()
        )?;
    }
    writeln!(
        err,
        "{} events: {} handled, {} failed",
        actual.len(),
        actual.len() - failed,
        failed
    )?;
    let Some(expected) = expected else {
        return Ok(i32::from(failed > 0 && !args.bless));
    };
    let mismatches = compare(&expected, &actual);
    for m in &mismatches {
        writeln!(err, "mismatch: {m}")?;
    }
    if mismatches.is_empty() {
        writeln!(
            err,
            "all {} lines match {}",
            actual.len(),
            args.expect.as_deref().unwrap_or(Path::new("")).display()
        )?;
    }
    Ok(i32::from(!mismatches.is_empty()))
}

fn read_jsonl(path: &Path) -> anyhow::Result<Vec<Value>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut values = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
        values.push(value);
    }
    Ok(values)
}

/// Reads the events file; each line must be an envelope. Lines without an id get
/// `line-<n>` so that output ids are the same on every run.
fn read_events(path: &Path, exchange: &str) -> anyhow::Result<Vec<Event>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut events = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        // Decoded as the bus decodes a delivery (one decoder): what a golden
        // file proves is what production does.
        let line_id = format!("line-{}", n + 1);
        events.push(
            envelope::decode_recorded(exchange, line.as_bytes(), Some(&line_id))
                .with_context(|| format!("{}:{}", path.display(), n + 1))?,
        );
    }
    if events.is_empty() {
        bail!("{} holds no events", path.display());
    }
    Ok(events)
}

fn write_golden(path: &Path, lines: &[Value]) -> anyhow::Result<()> {
    let mut text = String::new();
    for line in lines {
        let mut line = line.clone();
        strip_volatile(&mut line);
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Every difference between the golden lines and the actual ones, as
/// sentences: each golden line must be contained in its actual line (output
/// timestamps aside), one line per input event.
pub fn compare(expected: &[Value], actual: &[Value]) -> Vec<String> {
    let mut mismatches = Vec::new();
    if expected.len() != actual.len() {
        mismatches.push(format!(
            "expected {} lines, got {} (one line per input event)",
            expected.len(),
            actual.len()
        ));
    }
    for (i, (want, got)) in expected.iter().zip(actual).enumerate() {
        let mut got = got.clone();
        strip_volatile(&mut got);
        let id = got.get("input").and_then(Value::as_str).unwrap_or("?");
        if got.get("failure").is_some() && want.get("failure").is_none() {
            mismatches.push(format!(
                "line {} ({id}): unexpected failure {}",
                i + 1,
                got["failure"]
            ));
            continue;
        }
        if let Err(path) = subset(want, &got, String::new()) {
            mismatches.push(format!(
                "line {} ({id}): at {path}: expected {want}, got {got}",
                i + 1
            ));
        }
    }
    mismatches
}

/// Whether `want` is contained in `got`; `Err` names the first differing path.
fn subset(want: &Value, got: &Value, path: String) -> Result<(), String> {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                let p = format!("{path}.{k}");
                match g.get(k) {
                    Some(gv) => subset(wv, gv, p)?,
                    None => return Err(p),
                }
            }
            Ok(())
        }
        (Value::Array(w), Value::Array(g)) => {
            if w.len() != g.len() {
                return Err(format!("{path} (length {} vs {})", w.len(), g.len()));
            }
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                subset(wv, gv, format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        _ if want == got => Ok(()),
        _ => Err(if path.is_empty() { ".".into() } else { path }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn golden_lines_may_name_only_what_matters() {
        let got = json!({"input": "e1", "outputs": [{"type": "a", "data": {"x": 1, "y": 2}}]});
        assert!(
            compare(
                &[json!({"input": "e1", "outputs": [{"type": "a"}]})],
                std::slice::from_ref(&got)
            )
            .is_empty()
        );
        assert!(compare(&[json!({"input": "e1"})], std::slice::from_ref(&got)).is_empty());
        let wrong = compare(
            &[json!({"outputs": [{"data": {"x": 2}}]})],
            std::slice::from_ref(&got),
        );
        assert_eq!(wrong.len(), 1);
        assert!(wrong[0].contains(".outputs[0].data.x"), "{wrong:?}");
        assert_eq!(
            compare(&[json!({"outputs": []})], &[got]).len(),
            1,
            "lengths must agree"
        );
    }

    #[test]
    fn failures_must_be_expected() {
        let got = json!({"input": "e1", "failure": {"kind": "retry", "reason": "later"}});
        assert_eq!(
            compare(&[json!({"input": "e1"})], std::slice::from_ref(&got)).len(),
            1
        );
        assert!(
            compare(
                &[json!({"failure": {"kind": "retry"}})],
                std::slice::from_ref(&got)
            )
            .is_empty()
        );
        assert_eq!(
            compare(&[json!({"failure": {"kind": "reject"}})], &[got]).len(),
            1
        );
        assert_eq!(
            compare(&[json!({}), json!({})], &[json!({})]).len(),
            1,
            "line counts must agree"
        );
    }
}
