//! The shutdown spool: events still on the embedded bus when the appliance
//! stops (retries waiting for their delay, queued events if draining ran out of
//! time, and dead letters) are written to `<state_dir>/spool.jsonl`, and put
//! back on the next start — dead letters into the dead-letter queues, the rest
//! into their plugins' queues. With it, a graceful restart loses nothing that
//! was accepted.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::bus::embedded::{DeadLetter, EmbeddedBus};
use crate::bus::{Delivered, FailureInfo, Message};

const FILE: &str = "spool.jsonl";

#[derive(Serialize, Deserialize)]
struct Spooled {
    plugin: String,
    exchange: String,
    routing_key: String,
    attempt: u32,
    first_failure: Option<String>,
    content_type: Option<String>,
    message_id: Option<String>,
    headers: Vec<(String, String)>,
    body_base64: String,
    /// Set for a dead letter: why, and when it was dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dead: Option<SpooledFailure>,
}

#[derive(Serialize, Deserialize)]
struct SpooledFailure {
    kind: String,
    reason: String,
    attempts: u32,
    plugin_version: String,
    first_failure: String,
    at: String,
}

impl Spooled {
    fn new(plugin: &str, d: &Delivered, dead: Option<SpooledFailure>) -> Self {
        Self {
            plugin: plugin.to_string(),
            exchange: d.exchange.clone(),
            routing_key: d.routing_key.clone(),
            attempt: d.attempt,
            first_failure: d.first_failure.clone(),
            content_type: d.message.content_type.clone(),
            message_id: d.message.message_id.clone(),
            headers: d.message.headers.clone(),
            body_base64: base64::engine::general_purpose::STANDARD.encode(&d.message.body),
            dead,
        }
    }
}

/// Writes what is `left` on the bus and the `dead` letters to the spool
/// (replacing it atomically); returns how many events of `left` were spooled.
pub(crate) fn save(
    state_dir: &Path,
    left: &[(String, Delivered)],
    dead: &[(String, DeadLetter)],
) -> anyhow::Result<usize> {
    let path = state_dir.join(FILE);
    if left.is_empty() && dead.is_empty() {
        return Ok(0);
    }
    let mut tmp = tempfile::NamedTempFile::new_in(state_dir)?;
    let lines = left
        .iter()
        .map(|(plugin, d)| Spooled::new(plugin, d, None))
        .chain(dead.iter().map(|(plugin, letter)| {
            let f = &letter.failure;
            let failure = SpooledFailure {
                kind: f.kind.clone(),
                reason: f.reason.clone(),
                attempts: f.attempts,
                plugin_version: f.plugin_version.clone(),
                first_failure: f.first_failure.clone(),
                at: letter.at.clone(),
            };
            Spooled::new(plugin, &letter.delivered, Some(failure))
        }));
    for line in lines {
        serde_json::to_writer(&mut tmp, &line)?;
        tmp.write_all(b"\n")?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(&path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(left.len())
}

/// Puts the spool's events back on `bus` and removes the spool; returns how
/// many went back to queues (dead letters not counted).
pub(crate) fn restore(state_dir: &Path, bus: &EmbeddedBus) -> anyhow::Result<usize> {
    let path = state_dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut restored = 0;
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let s: Spooled = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a spooled event", path.display(), n + 1))?;
        let body = base64::engine::general_purpose::STANDARD
            .decode(&s.body_base64)
            .with_context(|| format!("{}:{}: body is not base64", path.display(), n + 1))?;
        let delivered = Delivered {
            exchange: s.exchange,
            routing_key: s.routing_key,
            message: Message {
                body: body.into(),
                content_type: s.content_type,
                message_id: s.message_id,
                headers: s.headers,
            },
            attempt: s.attempt,
            first_failure: s.first_failure,
        };
        match s.dead {
            Some(f) => {
                let failure = FailureInfo {
                    kind: f.kind,
                    reason: f.reason,
                    attempts: f.attempts,
                    plugin_version: f.plugin_version,
                    first_failure: f.first_failure,
                };
                bus.restore_dead_letter(
                    &s.plugin,
                    DeadLetter {
                        delivered,
                        failure,
                        at: f.at,
                    },
                );
            }
            None => {
                bus.restore(&s.plugin, delivered);
                restored += 1;
            }
        }
    }
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    Ok(restored)
}
