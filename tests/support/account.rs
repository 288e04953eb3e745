//! Load and account: a reliability test publishes events with unique ids, then
//! accounts for every one of them — handled (an output answering it was seen),
//! dead-lettered (with the reason), or lost. Outputs carry deterministic ids, so
//! a second copy of the same output id is a duplicate, not a second event.
//!
//! `lost = published − handled − dead-lettered`, and the test asserts it is 0.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use crate::broker::{Amqp, Received};

/// What was published and what came of it.
#[derive(Debug, Default)]
pub struct Ledger {
    published: BTreeSet<String>,
    /// Input id → how many copies of its output were seen, per output id.
    outputs: BTreeMap<String, BTreeMap<String, usize>>,
    /// Input id → why it was dead-lettered (`kind: reason`).
    dead: BTreeMap<String, String>,
    /// Outputs or dead letters naming an id that was never published.
    strangers: Vec<String>,
}

/// The ledger's totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub published: usize,
    /// Published ids with at least one output seen.
    pub handled: usize,
    /// Published ids with no output, dead-lettered.
    pub dead_lettered: usize,
    /// Published ids with neither (the first few, for the message).
    pub lost: Vec<String>,
    /// How many published ids were lost in all.
    pub lost_count: usize,
    /// Extra copies of outputs already seen (same deterministic output id).
    pub duplicates: usize,
    /// Dead-letter reasons by failure kind.
    pub reasons: BTreeMap<String, usize>,
    /// Outputs or dead letters for ids nobody published.
    pub strangers: usize,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// `id` was published (and the bus accepted it).
    pub fn published(&mut self, id: impl Into<String>) {
        let id = id.into();
        assert!(self.published.insert(id.clone()), "id {id} published twice");
    }

    /// How many ids were published.
    pub fn published_count(&self) -> usize {
        self.published.len()
    }

    /// `copies` copies of output `output_id`, which answers input `input_id`, were seen.
    pub fn output(&mut self, input_id: &str, output_id: &str, copies: usize) {
        if !self.published.contains(input_id) {
            self.strangers.push(input_id.to_string());
            return;
        }
        *self
            .outputs
            .entry(input_id.to_string())
            .or_default()
            .entry(output_id.to_string())
            .or_default() += copies;
    }

    /// Input `input_id` was dead-lettered: `kind` and `reason` as the letter says.
    pub fn dead_letter(&mut self, input_id: &str, kind: &str, reason: &str) {
        if !self.published.contains(input_id) {
            self.strangers.push(input_id.to_string());
            return;
        }
        assert!(
            !kind.is_empty(),
            "dead letter for {input_id} without a kind"
        );
        assert!(
            !reason.is_empty(),
            "dead letter for {input_id} without a reason"
        );
        self.dead
            .insert(input_id.to_string(), format!("{kind}: {reason}"));
    }

    /// Whether every published id has an output or a dead letter.
    pub fn settled(&self) -> bool {
        self.published
            .iter()
            .all(|id| self.outputs.contains_key(id) || self.dead.contains_key(id))
    }

    /// The totals.
    pub fn account(&self) -> Account {
        let mut account = Account {
            published: self.published.len(),
            handled: 0,
            dead_lettered: 0,
            lost: Vec::new(),
            lost_count: 0,
            duplicates: 0,
            reasons: BTreeMap::new(),
            strangers: self.strangers.len(),
        };
        for id in &self.published {
            if let Some(outputs) = self.outputs.get(id) {
                account.handled += 1;
                account.duplicates += outputs.values().map(|n| n - 1).sum::<usize>();
            } else if let Some(reason) = self.dead.get(id) {
                account.dead_lettered += 1;
                let kind = reason.split(':').next().unwrap_or_default().to_string();
                *account.reasons.entry(kind).or_default() += 1;
            } else {
                account.lost_count += 1;
                if account.lost.len() < 10 {
                    account.lost.push(id.clone());
                }
            }
        }
        account
    }

    /// Takes outputs from `outputs` (a queue bound to where the plugin publishes;
    /// each output names its input in an `echo-of` header) and dead letters from
    /// `dlq` until every published id is settled and then `quiet` passes with
    /// nothing new (late duplicates arrive in that time), or `timeout` passes.
    pub fn collect_rabbit(
        &mut self,
        amqp: &Amqp,
        outputs: &str,
        dlq: &str,
        quiet: Duration,
        timeout: Duration,
    ) {
        let until = Instant::now() + timeout;
        let mut last_news = Instant::now();
        loop {
            let taken = amqp.get(outputs, 500, Duration::from_millis(200));
            let letters = amqp.get(dlq, 500, Duration::from_millis(10));
            if !taken.is_empty() || !letters.is_empty() {
                last_news = Instant::now();
            }
            for m in &taken {
                let input = m
                    .header("echo-of")
                    .unwrap_or_else(|| panic!("an output without echo-of: {m:?}"));
                let output = m
                    .message_id
                    .as_deref()
                    .unwrap_or_else(|| panic!("an output without a message id: {m:?}"));
                self.output(input, output, 1);
            }
            for m in &letters {
                self.dead_letter(
                    &input_id(m),
                    m.header("switchboard-error-kind").unwrap_or_default(),
                    m.header("switchboard-error").unwrap_or_default(),
                );
            }
            if self.settled() && last_news.elapsed() >= quiet {
                return;
            }
            if Instant::now() >= until {
                return;
            }
        }
    }
}

/// The id of a dead-lettered input: its message id, else its envelope's `id`.
fn input_id(m: &Received) -> String {
    if let Some(id) = &m.message_id {
        return id.clone();
    }
    serde_json::from_slice::<serde_json::Value>(&m.body)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("a dead letter with no id: {m:?}"))
}

impl Account {
    /// Nothing lost, nothing foreign; at most `max_duplicates` extra copies.
    pub fn assert_complete(&self, max_duplicates: usize) {
        assert_eq!(
            self.lost_count, 0,
            "lost {} events (e.g. {:?}): {self}",
            self.lost_count, self.lost
        );
        assert_eq!(self.strangers, 0, "outputs for unknown ids: {self}");
        assert!(
            self.duplicates <= max_duplicates,
            "{} duplicates, more than the in-flight window of {max_duplicates}: {self}",
            self.duplicates
        );
        assert_eq!(
            self.published,
            self.handled + self.dead_lettered,
            "published = handled + dead-lettered: {self}"
        );
    }
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "published {}, handled {}, dead-lettered {}, lost {}, duplicates {}",
            self.published, self.handled, self.dead_lettered, self.lost_count, self.duplicates
        )?;
        if !self.reasons.is_empty() {
            write!(f, " (dead-letter kinds: {:?})", self.reasons)?;
        }
        Ok(())
    }
}

/// Prints a scenario's account on one line, tagged so that a run's figures can
/// be picked out of the test output (`make reliability` shows them).
pub fn report(scenario: &str, account: &Account, extra: &str) {
    let line = if extra.is_empty() {
        format!("ACCOUNT {scenario}: {account}")
    } else {
        format!("ACCOUNT {scenario}: {account}; {extra}")
    };
    eprintln!("{line}");
}
