//! Replay: archived events ([`crate::archive`]) run again through a plugin.
//!
//! - Offline ([`Offline`]): the plugin (the configured file, or a candidate)
//!   runs in this process on a [`ScratchStore`] over the live state, so nothing
//!   it writes or outputs reaches anyone. `switchboard replay --dry-run`,
//!   `--diff` (two of them side by side, [`compare`]) and `--rebuild` (from
//!   empty state; what it wrote is then put in the live store) use it.
//! - Re-delivered (`--publish`): the events go to the plugin's queue again
//!   with a [`REPLAY_HEADER`](crate::envelope::REPLAY_HEADER), through the
//!   running appliance ([`crate::admin`]).
//!
//! Which events: those the archive query selects that the plugin's routes in
//! router.toml would deliver to it, in archive order.

pub mod scratch;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde_json::{Value, json};

use crate::archive::ArchivedEvent;
use crate::config::RouterConfig;
use crate::envelope::{self, output_envelope};
use crate::kv::KvStore;
use crate::route::RouteTable;
use crate::runtime::{Event, Failure, LoadError, Output, Plugin, PluginSpec, Runtime};

pub use scratch::{Changes, ScratchStore};

/// The events of `events` that `plugin`'s routes deliver to it, in order.
/// Errors when no plugin of that name is configured.
pub fn routed_to(
    config: &RouterConfig,
    plugin: &str,
    events: Vec<ArchivedEvent>,
) -> anyhow::Result<Vec<ArchivedEvent>> {
    if !config.plugins.contains_key(plugin) {
        anyhow::bail!("no plugin {plugin:?} is configured");
    }
    let bindings = crate::appliance::topology(config)
        .bindings
        .into_iter()
        .filter(|b| b.plugin == plugin);
    let routes = RouteTable::new(bindings).context("the plugin's routes")?;
    Ok(events
        .into_iter()
        .filter(|e| {
            let mut hit = false;
            routes.for_each_destination(&e.exchange, &e.routing_key, |_| hit = true);
            hit
        })
        .collect())
}

/// One plugin loaded for an offline replay, with its own scratch state.
pub struct Offline {
    name: String,
    plugin: Plugin,
    kv: Arc<ScratchStore>,
}

impl Offline {
    /// Loads configured plugin `name` (its settings, configuration and limits
    /// from router.toml) from `file`, or from its configured file, on a scratch
    /// copy of `base`. A component that is not a Switchboard plugin is refused
    /// with one sentence.
    pub fn load(
        runtime: &Runtime,
        config: &RouterConfig,
        name: &str,
        file: Option<&Path>,
        base: Option<Arc<dyn KvStore>>,
    ) -> anyhow::Result<Self> {
        let settings = config
            .plugin_settings(name)
            .with_context(|| format!("no plugin {name:?} is configured"))?;
        let path = file.unwrap_or(&settings.wasm);
        let kv = Arc::new(ScratchStore::over(base));
        let mut spec = PluginSpec::from_file(name, path, kv.clone())?;
        spec.config = settings.config.clone();
        spec.limits = settings.limits();
        let plugin = match runtime.load(spec) {
            Ok((plugin, _)) => plugin,
            Err(LoadError::WrongWorld { .. } | LoadError::CoreModule { .. }) => anyhow::bail!(
                "{} is not a Switchboard plugin: it does not implement the \
                 switchboard:plugin/handler world",
                path.display()
            ),
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            name: name.to_string(),
            plugin,
            kv,
        })
    }

    /// The plugin's version (content hash).
    pub fn version(&self) -> &str {
        self.plugin.version()
    }

    /// Runs one archived event, decoded as the bus decodes a delivery; the
    /// result as an [`outcome`] line.
    pub fn run(&self, archived: &ArchivedEvent) -> Value {
        match envelope::decode(
            &archived.exchange,
            &archived.routing_key,
            &archived.message(),
            1,
        ) {
            Ok(event) => outcome(&self.name, &event, self.plugin.handle(&event)),
            Err(e) => json!({
                "input": archived.id,
                "kind": archived.kind,
                "failure": {"kind": "undecodable", "reason": e.to_string()},
            }),
        }
    }

    /// What the replay wrote to (or deleted from) the plugin's state.
    pub fn changes(&self) -> Changes {
        self.kv.changes(&self.name)
    }
}

/// What `plugin` did with `event`, as one JSON line: `{"input", "kind",
/// "outputs": [envelope…]}` (each with its `exchange` when the output names
/// one, and its `delay_ms` when it is delayed) or `{"input", "kind",
/// "failure": {"kind", "reason"}}`.
pub fn outcome(plugin: &str, event: &Event, result: Result<Vec<Output>, Failure>) -> Value {
    let outputs = match result {
        Ok(outputs) => outputs,
        Err(failure) => return json!({"input": event.id, "kind": event.kind, "failure": failure}),
    };
    let envelopes: Result<Vec<Value>, _> = outputs
        .iter()
        .enumerate()
        .map(|(i, output)| {
            let env = output_envelope(plugin, event, i, output)?;
            let mut value = serde_json::to_value(env).unwrap_or(Value::Null);
            if let (Some(obj), Some(exchange)) = (value.as_object_mut(), &output.exchange) {
                obj.insert("exchange".into(), json!(exchange));
            }
            // Checked against max_delay when the plugin returned.
            if let (Some(obj), Ok(Some(delay))) = (
                value.as_object_mut(),
                envelope::output_delay(output, std::time::Duration::MAX),
            ) {
                obj.insert("delay_ms".into(), json!(delay.as_millis()));
            }
            Ok::<_, envelope::EnvelopeError>(value)
        })
        .collect();
    match envelopes {
        Ok(outputs) => json!({"input": event.id, "kind": event.kind, "outputs": outputs}),
        Err(e) => json!({"input": event.id, "kind": event.kind,
            "failure": {"kind": "invalid_output", "reason": e.to_string()}}),
    }
}

/// Removes what differs between two runs of the same thing: output timestamps.
pub fn strip_volatile(line: &mut Value) {
    if let Some(outputs) = line.get_mut("outputs").and_then(Value::as_array_mut) {
        for output in outputs {
            if let Some(obj) = output.as_object_mut() {
                obj.remove("timestamp");
            }
        }
    }
}

/// How two versions' [`outcome`]s of one event compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The same outputs, or the same failure.
    Same,
    /// Both handled it (or both failed) differently.
    Differ,
    /// Only the running version failed.
    FailsOnlyInRunning,
    /// Only the candidate failed.
    FailsOnlyInCandidate,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Same => "same",
            Self::Differ => "differ",
            Self::FailsOnlyInRunning => "fails_only_in_running",
            Self::FailsOnlyInCandidate => "fails_only_in_candidate",
        }
    }
}

/// Compares two outcome lines of one event, timestamps aside.
pub fn compare(running: &Value, candidate: &Value) -> Verdict {
    let failed = |v: &Value| v.get("failure").is_some();
    match (failed(running), failed(candidate)) {
        (true, false) => Verdict::FailsOnlyInRunning,
        (false, true) => Verdict::FailsOnlyInCandidate,
        _ => {
            let (mut a, mut b) = (running.clone(), candidate.clone());
            strip_volatile(&mut a);
            strip_volatile(&mut b);
            if a == b {
                Verdict::Same
            } else {
                Verdict::Differ
            }
        }
    }
}

/// What `--diff` reports: the events whose outcomes differ between the
/// running version and a candidate, then a summary.
#[derive(Debug, Clone)]
pub struct DiffReport {
    /// One line per event whose outcomes differ: `{"input", "kind",
    /// "routing_key", "verdict", "running", "candidate"}`.
    pub differing: Vec<Value>,
    /// `{"events", "same", "differ", "fails_only_in_running",
    /// "fails_only_in_candidate", "running", "candidate"}` (the versions).
    pub summary: Value,
    /// Whether every event came out the same.
    pub all_same: bool,
}

/// Each of `events` through `running` and through `candidate` (each on its
/// own scratch state), compared ([`compare`]).
pub fn diff(running: &Offline, candidate: &Offline, events: &[ArchivedEvent]) -> DiffReport {
    let mut counts = [0usize; 4];
    let mut differing = Vec::new();
    for event in events {
        let before = running.run(event);
        let after = candidate.run(event);
        let verdict = compare(&before, &after);
        counts[verdict as usize] += 1;
        if verdict != Verdict::Same {
            differing.push(json!({
                "input": event.id,
                "kind": event.kind,
                "routing_key": event.routing_key,
                "verdict": verdict.as_str(),
                "running": without_input(before),
                "candidate": without_input(after),
            }));
        }
    }
    let [same, differ, only_running, only_candidate] = counts;
    DiffReport {
        differing,
        summary: json!({
            "events": events.len(),
            "same": same,
            "differ": differ,
            "fails_only_in_running": only_running,
            "fails_only_in_candidate": only_candidate,
            "running": running.version(),
            "candidate": candidate.version(),
        }),
        all_same: same == events.len(),
    }
}

/// An outcome line without what the diff line already says of the event.
fn without_input(mut line: Value) -> Value {
    if let Some(obj) = line.as_object_mut() {
        obj.remove("input");
        obj.remove("kind");
    }
    line
}

/// Failure kinds that belong to an event's history: production settled them
/// the same way (dead-lettered), so a rebuild goes past them. A `retry` is
/// tried again ([`run_history`]); any other failure (a timeout, a trap) stops
/// a rebuild before it writes.
pub const SETTLED_FAILURES: [&str; 3] = ["reject", "invalid_output", "undecodable"];

fn failure_kind(line: &Value) -> Option<&str> {
    line.get("failure")
        .and_then(|f| f.get("kind"))
        .and_then(Value::as_str)
}

/// Whether an outcome line failed in a way a rebuild cannot go past.
pub fn stops_rebuild(line: &Value) -> bool {
    failure_kind(line).is_some_and(|kind| kind != "retry" && !SETTLED_FAILURES.contains(&kind))
}

/// Runs `events` through `plugin` as production settled them: an event that
/// asks for a retry runs again after the events behind it, up to
/// `max_attempts` runs in all, and is then dead-lettered (as production
/// would). Returns the outcome lines of the events that ended failed, for the
/// report; `Err` names the first event whose failure its history does not
/// explain ([`stops_rebuild`]).
pub fn run_history(
    plugin: &Offline,
    events: &[ArchivedEvent],
    max_attempts: u32,
) -> Result<Vec<Value>, String> {
    let mut failed = Vec::new();
    let mut pending: Vec<&ArchivedEvent> = events.iter().collect();
    for attempt in 1..=max_attempts.max(1) {
        let mut again = Vec::new();
        for event in pending {
            let line = plugin.run(event);
            if stops_rebuild(&line) {
                return Err(format!(
                    "event {} failed in a way its history does not explain ({})",
                    event.id, line["failure"]
                ));
            }
            match failure_kind(&line) {
                Some("retry") if attempt < max_attempts => again.push(event),
                Some(_) => failed.push(line),
                None => {}
            }
        }
        if again.is_empty() {
            break;
        }
        pending = again;
    }
    Ok(failed)
}

#[cfg(test)]
mod tests;
