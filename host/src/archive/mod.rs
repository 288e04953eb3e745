//! The event archive on the embedded bus: every message published to an
//! archived exchange (what services publish and what plugins output), kept in
//! an append-only, segmented log in `state_dir/archive/`, queryable by
//! exchange, routing-key pattern, aggregate id and time.
//!
//! ```text
//! state_dir/archive/00000000000000000001.log   records 1 ..
//! state_dir/archive/00000000000000052311.log   records 52311 .. (the one appended to)
//! ```
//!
//! - **A record** is `length (u32 LE) | CRC-32 of the payload (u32 LE) | payload`,
//!   the payload one [`ArchivedEvent`] as JSON. Its body is kept byte for byte
//!   (as JSON text when it is JSON, else base64), so a replay delivers exactly
//!   what was published.
//! - **Durability.** [`Archive::append`] writes a batch's records and returns
//!   once an fsync covers them. Appenders that arrive while an fsync runs share
//!   the next one (group commit): one fsync per batch of concurrent appends, not
//!   per event. Ingress answers 202 only after that, so an acknowledged event is
//!   in the archive; a write or fsync that fails is the publisher's error (503).
//!   Plugin outputs are written ([`Archive::write`]) before their input is
//!   settled, which a `kill -9` cannot undo, and fsynced by a flusher thread
//!   within 10 ms, so that a worker never waits for the disk.
//! - **Recovery.** Opening reads every segment. A record cut short or failing
//!   its checksum (a `kill -9` during a write, a torn page) ends its segment:
//!   the file is truncated to the last good record and the recovery is logged.
//! - **Retention.** Whole segments go, oldest first, once the archive is larger
//!   than `max_size` or a segment's newest record is older than `max_age`. The
//!   segment being appended to is never deleted.
//! - **Aggregates.** Each record may carry an aggregate id, taken from a
//!   configured field for the routing keys matching a pattern; an in-memory
//!   index (rebuilt on open) finds an aggregate's records without a scan.
//!
//! On RabbitMQ the archive is a stream queue on the broker instead, read by
//! [`stream::read`]; both make their records with the same [`record`] and
//! select them with the same [`Query`].

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::bus::{Message, Outgoing};
use crate::config::ArchiveConfig;
use crate::route::TopicPattern;

pub mod stream;
#[cfg(test)]
mod tests;

/// Bytes before each record's payload: its length and its CRC-32.
const FRAME: usize = 8;
/// The largest payload a record may have; anything longer is a corrupt length.
const MAX_RECORD: usize = 64 << 20;
/// How long what [`Archive::write`] wrote may wait for its fsync.
const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// How often, at most, retention looks at the segments while appending.
const RETENTION_EVERY: Duration = Duration::from_secs(1);

/// One archived event, as stored and as `switchboard events` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchivedEvent {
    /// Position in the archive: 1, 2, 3, … in publishing order.
    pub seq: u64,
    /// When it was archived (published), RFC 3339 with milliseconds.
    pub time: DateTime<Utc>,
    pub exchange: String,
    pub routing_key: String,
    /// The event's id (the envelope's, the message id, or the derived one).
    pub id: String,
    /// The envelope's `type` (the routing key for raw bodies); empty when the
    /// message is not a decodable event.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The aggregate it is indexed under, if a rule matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// The body when it is JSON, as the exact text published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Box<RawValue>>,
    /// The body when it is not JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

impl ArchivedEvent {
    /// The message as it was published, byte for byte.
    pub fn message(&self) -> Message {
        let body = match (&self.body, &self.body_base64) {
            (Some(raw), _) => raw.get().as_bytes().to_vec(),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_default(),
            (None, None) => Vec::new(),
        };
        Message {
            body: body.into(),
            content_type: self.content_type.clone(),
            message_id: self.message_id.clone(),
            headers: self.headers.clone(),
        }
    }
}

/// What [`Archive::query`] and [`read`] select. Empty fields select everything.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub exchange: Option<String>,
    /// A topic pattern the routing key must match (`order.*`, `#`).
    pub pattern: Option<TopicPattern>,
    pub aggregate: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only records after this position (paging).
    pub after: Option<u64>,
    /// At most this many records.
    pub limit: Option<usize>,
}

impl Query {
    /// A query from its textual parts, as the CLI and the HTTP API take them.
    pub fn parse(
        exchange: Option<&str>,
        pattern: Option<&str>,
        aggregate: Option<&str>,
        since: Option<&str>,
        until: Option<&str>,
    ) -> Result<Self, String> {
        Ok(Self {
            exchange: exchange.map(str::to_string),
            pattern: pattern
                .map(TopicPattern::parse)
                .transpose()
                .map_err(|e| e.to_string())?,
            aggregate: aggregate.map(str::to_string),
            since: since.map(parse_time).transpose()?,
            until: until.map(parse_time).transpose()?,
            after: None,
            limit: None,
        })
    }

    fn selects(&self, e: &ArchivedEvent) -> bool {
        self.exchange.as_ref().is_none_or(|x| *x == e.exchange)
            && self
                .pattern
                .as_ref()
                .is_none_or(|p| p.matches(&e.routing_key))
            && self
                .aggregate
                .as_ref()
                .is_none_or(|a| e.aggregate.as_ref() == Some(a))
            && self.since.is_none_or(|t| e.time >= t)
            && self.until.is_none_or(|t| e.time <= t)
            && self.after.is_none_or(|s| e.seq > s)
    }
}

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
#[error("the event archive cannot store events: {0}")]
pub struct ArchiveError(String);

/// One aggregate rule: routing keys matching `pattern` are indexed under the
/// value at `field` (a dotted path into the event: `data.order_id`).
#[derive(Debug, Clone)]
struct Rule {
    pattern: TopicPattern,
    field: Vec<String>,
}

/// The `[[archive.aggregates]]` rules of `config`, in order (the first that
/// matches wins).
fn rules(config: &ArchiveConfig) -> anyhow::Result<Vec<Rule>> {
    config
        .aggregates
        .iter()
        .map(|r| {
            Ok(Rule {
                pattern: TopicPattern::parse(&r.pattern)?,
                field: r.field.split('.').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// The aggregate an event published with `routing_key` is indexed under: the
/// first rule matching the key names the field, a path into the event's
/// envelope (`id`, `type`, `source`, `correlation_id`, `causation_id`,
/// `tenant_id`) or into its `data` (`data.order_id`). A non-empty string or a
/// number is an aggregate id. `data` is read only as far as the path goes.
fn aggregate(rules: &[Rule], routing_key: &str, event: &crate::runtime::Event) -> Option<String> {
    let rule = rules.iter().find(|r| r.pattern.matches(routing_key))?;
    let (first, rest) = rule.field.split_first()?;
    let top = match first.as_str() {
        "data" => return field_at(&event.data, rest),
        "id" => Some(event.id.as_str()),
        "type" => Some(event.kind.as_str()),
        "source" => Some(event.source.as_str()),
        "correlation_id" => event.correlation_id.as_deref(),
        "causation_id" => event.causation_id.as_deref(),
        "tenant_id" => event.tenant_id.as_deref(),
        _ => None,
    };
    // The envelope's fields are strings: nothing is below them.
    top.filter(|s| rest.is_empty() && !s.is_empty())
        .map(str::to_string)
}

/// The aggregate id at `path` in the JSON text `json`.
fn field_at(json: &[u8], path: &[String]) -> Option<String> {
    let mut at: &RawValue = serde_json::from_slice(json).ok()?;
    for part in path {
        at = member(at, part)?;
    }
    match serde_json::from_str::<serde_json::Value>(at.get()).ok()? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Member `name` of the JSON object `object`, unparsed (the last one, if the
/// name repeats, as a parsed object would keep); `None` when it is not an
/// object or has no such member. The other members are skipped, not built.
fn member<'a>(object: &'a RawValue, name: &str) -> Option<&'a RawValue> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

    /// Whether a key is `name`, without keeping it.
    struct KeyIs<'n>(&'n str);
    impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
        type Value = bool;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl Visitor<'_> for KeyIs<'_> {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a key")
        }
        fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<bool, E> {
            Ok(key == self.0)
        }
    }
    struct Member<'n>(&'n str);
    impl<'de> Visitor<'de> for Member<'_> {
        type Value = Option<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
            let mut found = None;
            while let Some(hit) = map.next_key_seed(KeyIs(self.0))? {
                if hit {
                    found = Some(map.next_value::<&'de RawValue>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_str(object.get());
    de.deserialize_map(Member(name)).ok().flatten()
}

/// The record of one published message, at position `seq`, archived at
/// `time`: its id, kind, causation and correlation as the envelope says (the
/// message id or the derived id when it is not a decodable event), its
/// aggregate by `rules`, and its body byte for byte.
fn record(rules: &[Rule], seq: u64, time: DateTime<Utc>, out: &Outgoing) -> ArchivedEvent {
    let message = &out.message;
    let decoded = crate::envelope::decode(&out.exchange, &out.routing_key, message, 1);
    let (id, kind, causation_id, correlation_id, aggregate) = match &decoded {
        Ok(event) => (
            event.id.clone(),
            event.kind.clone(),
            event.causation_id.clone(),
            event.correlation_id.clone(),
            aggregate(rules, &out.routing_key, event),
        ),
        Err(_) => (
            message.message_id.clone().unwrap_or_else(|| {
                crate::envelope::derived_id(&out.exchange, &out.routing_key, message)
            }),
            String::new(),
            None,
            None,
            None,
        ),
    };
    let (body, body_base64) = match serde_json::from_slice::<Box<RawValue>>(&message.body) {
        Ok(raw) if raw.get().len() == message.body.len() => (Some(raw), None),
        _ => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(&message.body)),
        ),
    };
    ArchivedEvent {
        seq,
        time,
        exchange: out.exchange.clone(),
        routing_key: out.routing_key.clone(),
        id,
        kind,
        causation_id,
        correlation_id,
        aggregate,
        content_type: message.content_type.clone(),
        message_id: message.message_id.clone(),
        headers: message.headers.clone(),
        body,
        body_base64,
    }
}

#[derive(Debug, Clone)]
struct Segment {
    first: u64,
    path: PathBuf,
    bytes: u64,
    newest: Option<DateTime<Utc>>,
}

/// Where a record is: its segment's first position and its offset there.
type Position = (u64, u64);

struct Writer {
    file: Arc<File>,
    next: u64,
    /// When retention last looked at the segments.
    retention_at: Instant,
}

struct Index {
    segments: Vec<Segment>,
    aggregates: HashMap<String, Vec<(u64, Position)>>,
}

struct Sync {
    /// Last position written to the current file.
    written: u64,
    /// Last position an fsync covers.
    synced: u64,
    syncing: bool,
    failed: Option<String>,
}

/// The archive of one process's embedded bus.
pub struct Archive {
    dir: PathBuf,
    exchanges: Vec<String>,
    rules: Vec<Rule>,
    max_age: Duration,
    max_size: u64,
    segment_size: u64,
    writer: Mutex<Writer>,
    index: RwLock<Index>,
    sync: Mutex<Sync>,
    synced: Condvar,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.log")
}

/// The segments in `dir`, oldest first.
fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            found.push((first, path));
        }
    }
    found.sort();
    Ok(found)
}

/// What the next bytes of a segment hold.
enum Next {
    /// A whole, good record of this many bytes (frame included).
    Record(Box<ArchivedEvent>, u64),
    /// The end of the segment, at a record boundary.
    End,
    /// Bytes that are not a good record: why.
    Bad(String),
}

/// Reads the record at the reader's position.
fn next_record(reader: &mut impl Read) -> std::io::Result<Next> {
    let mut frame = Vec::with_capacity(FRAME);
    let got = reader.by_ref().take(FRAME as u64).read_to_end(&mut frame)?;
    if got == 0 {
        return Ok(Next::End);
    }
    if got < FRAME {
        return Ok(Next::Bad(format!(
            "a record header cut short ({got} bytes)"
        )));
    }
    let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
    if len > MAX_RECORD {
        return Ok(Next::Bad(format!("a record length of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    if reader.read_exact(&mut payload).is_err() {
        return Ok(Next::Bad("a record cut short".into()));
    }
    if crc32fast::hash(&payload) != crc {
        return Ok(Next::Bad("a record failing its checksum".into()));
    }
    Ok(match serde_json::from_slice::<ArchivedEvent>(&payload) {
        Ok(event) => Next::Record(Box::new(event), (FRAME + len) as u64),
        Err(_) => Next::Bad("a record that is not an archived event".into()),
    })
}

/// Reads the records of one segment, in order, until its end or its first bad
/// record (or until `each` says stop); returns where the good records end and
/// what ended them if it was a bad one.
fn scan(
    path: &Path,
    mut each: impl FnMut(u64, ArchivedEvent) -> bool,
) -> std::io::Result<(u64, Option<String>)> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut offset = 0u64;
    loop {
        match next_record(&mut reader)? {
            Next::Record(event, bytes) => {
                let at = offset;
                offset += bytes;
                if !each(at, *event) {
                    return Ok((offset, None));
                }
            }
            Next::End => return Ok((offset, None)),
            Next::Bad(why) => return Ok((offset, Some(why))),
        }
    }
}

/// A record encoded before its position and time are known (outside the
/// writer's lock): its JSON from the field after `time` on.
struct Encoded {
    /// `,"exchange":…}`: what follows `"seq"` and `"time"`, the record's first
    /// two fields.
    tail: Vec<u8>,
    aggregate: Option<String>,
}

impl Encoded {
    const AFTER_TIME: &'static [u8] = b",\"exchange\":";

    fn of(rules: &[Rule], out: &Outgoing) -> Result<Self, ArchiveError> {
        let archived = record(rules, 0, DateTime::UNIX_EPOCH, out);
        let json = serde_json::to_vec(&archived)
            .map_err(|e| ArchiveError(format!("cannot encode a record: {e}")))?;
        // The first match is the field's: a number and a timestamp come before.
        let cut = json
            .windows(Self::AFTER_TIME.len())
            .position(|w| w == Self::AFTER_TIME)
            .ok_or_else(|| ArchiveError("a record without an exchange".into()))?;
        Ok(Self {
            tail: json[cut..].to_vec(),
            aggregate: archived.aggregate,
        })
    }

    /// The record's JSON at position `seq`, archived at `time_json` (a JSON
    /// string): what encoding the whole record would give.
    fn payload(&self, seq: u64, time_json: &str) -> Vec<u8> {
        let head = format!("{{\"seq\":{seq},\"time\":{time_json}");
        let mut payload = Vec::with_capacity(head.len() + self.tail.len());
        payload.extend_from_slice(head.as_bytes());
        payload.extend_from_slice(&self.tail);
        payload
    }
}

/// Reads the archive in `dir` without opening it for writing (another process
/// may be appending): the records `query` selects, oldest first.
pub fn read(dir: &Path, query: &Query) -> std::io::Result<Vec<ArchivedEvent>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    let limit = query.limit.unwrap_or(usize::MAX);
    for (_, path) in list_segments(dir)? {
        if out.len() >= limit {
            break;
        }
        scan(&path, |_, e| {
            if query.selects(&e) {
                out.push(e);
            }
            out.len() < limit
        })?;
    }
    Ok(out)
}

impl Archive {
    /// Opens (or creates) the archive in `state_dir/archive`, recovering a torn
    /// tail, as `config` describes it.
    pub fn open(state_dir: &Path, config: &ArchiveConfig) -> anyhow::Result<Self> {
        let dir = state_dir.join("archive");
        std::fs::create_dir_all(&dir)?;
        let rules = rules(config)?;
        let mut index = Index {
            segments: Vec::new(),
            aggregates: HashMap::new(),
        };
        let mut next = 1;
        for (first, path) in list_segments(&dir)? {
            let mut newest = None;
            let (good, bad) = scan(&path, |offset, e| {
                next = e.seq + 1;
                newest = Some(e.time);
                if let Some(a) = e.aggregate {
                    index
                        .aggregates
                        .entry(a)
                        .or_default()
                        .push((e.seq, (first, offset)));
                }
                true
            })?;
            if let Some(bad) = bad {
                let len = std::fs::metadata(&path)?.len();
                OpenOptions::new().write(true).open(&path)?.set_len(good)?;
                tracing::warn!(
                    segment = %path.display(),
                    kept_bytes = good,
                    dropped_bytes = len - good,
                    last_record = next - 1,
                    "event archive recovered: {bad} ended the segment; kept every record before it"
                );
            }
            index.segments.push(Segment {
                first,
                path,
                bytes: good,
                newest,
            });
        }
        if index.segments.is_empty() {
            let path = dir.join(segment_name(next));
            File::create(&path)?;
            index.segments.push(Segment {
                first: next,
                path,
                bytes: 0,
                newest: None,
            });
        }
        let current = index
            .segments
            .last()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        let file = OpenOptions::new().append(true).open(&current)?;
        let archive = Self {
            dir,
            exchanges: config.exchanges.clone(),
            rules,
            max_age: config.max_age,
            max_size: config.max_size.as_u64(),
            segment_size: config.segment_size.as_u64().max(1),
            writer: Mutex::new(Writer {
                file: Arc::new(file),
                next,
                retention_at: Instant::now(),
            }),
            index: RwLock::new(index),
            sync: Mutex::new(Sync {
                written: next - 1,
                synced: next - 1,
                syncing: false,
                failed: None,
            }),
            synced: Condvar::new(),
        };
        archive.enforce_retention();
        Ok(archive)
    }

    /// The folder of its segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether messages published to `exchange` are archived.
    pub fn archives(&self, exchange: &str) -> bool {
        self.exchanges.is_empty() || self.exchanges.iter().any(|e| e == exchange)
    }

    /// Archives the messages of `batch` published to archived exchanges;
    /// returns once they are on disk (fsynced).
    pub fn append(&self, batch: &[Outgoing]) -> Result<(), ArchiveError> {
        match self.write(batch)? {
            Some(last) => self.wait_synced(last),
            None => Ok(()),
        }
    }

    /// Writes the messages of `batch` published to archived exchanges to the
    /// log without waiting for an fsync (the [`Archive::start_flusher`] thread
    /// runs one soon); returns the last position written, if any.
    pub fn write(&self, batch: &[Outgoing]) -> Result<Option<u64>, ArchiveError> {
        let wanted: Vec<&Outgoing> = batch
            .iter()
            .filter(|o| self.archives(&o.exchange))
            .collect();
        if wanted.is_empty() {
            return Ok(None);
        }
        // The costly part (decoding each message, encoding its record) runs
        // before the lock, so that appenders on other threads do it at once.
        let encoded = wanted
            .iter()
            .map(|out| Encoded::of(&self.rules, out))
            .collect::<Result<Vec<_>, _>>()?;
        let last = {
            let mut writer = lock(&self.writer);
            let time = Utc::now();
            let time_json = serde_json::to_string(&time)
                .map_err(|e| ArchiveError(format!("cannot encode a time: {e}")))?;
            let mut bytes = Vec::new();
            let mut records = Vec::with_capacity(encoded.len());
            for (i, encoded) in encoded.into_iter().enumerate() {
                let seq = writer.next + i as u64;
                let payload = encoded.payload(seq, &time_json);
                let offset = bytes.len() as u64;
                bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
                bytes.extend_from_slice(&payload);
                records.push((seq, offset, encoded.aggregate));
            }
            let (first, start) = {
                let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
                // Retention never deletes the segment being appended to.
                index
                    .segments
                    .last()
                    .map(|current| (current.first, current.bytes))
                    .ok_or_else(|| ArchiveError("the archive has no segment to append to".into()))?
            };
            if let Err(e) = (&*writer.file).write_all(&bytes) {
                // Leave no partial record behind for the next append to follow.
                let _ = writer.file.set_len(start);
                return Err(ArchiveError(e.to_string()));
            }
            let last = writer.next + wanted.len() as u64 - 1;
            writer.next = last + 1;
            {
                let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
                for (seq, offset, aggregate) in records {
                    if let Some(a) = aggregate {
                        index
                            .aggregates
                            .entry(a)
                            .or_default()
                            .push((seq, (first, start + offset)));
                    }
                }
                if let Some(current) = index.segments.last_mut() {
                    current.bytes += bytes.len() as u64;
                    current.newest = Some(time);
                }
            }
            lock(&self.sync).written = last;
            if start + bytes.len() as u64 >= self.segment_size {
                self.roll(&mut writer)?;
            }
            if writer.retention_at.elapsed() >= RETENTION_EVERY {
                writer.retention_at = Instant::now();
                self.enforce_retention();
            }
            last
        };
        Ok(Some(last))
    }

    /// Starts the thread that fsyncs what [`Archive::write`] left unsynced,
    /// every [`FLUSH_EVERY`]; it ends when the archive is dropped.
    pub fn start_flusher(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("archive-flush".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(FLUSH_EVERY);
                    let Some(archive) = weak.upgrade() else {
                        return;
                    };
                    let written = lock(&archive.sync).written;
                    if let Err(e) = archive.wait_synced(written) {
                        tracing::error!(error = %e, "the event archive cannot fsync");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the archive's flusher");
        }
    }

    /// Starts a new segment after fsyncing the full one.
    fn roll(&self, writer: &mut Writer) -> Result<(), ArchiveError> {
        writer
            .file
            .sync_data()
            .map_err(|e| ArchiveError(e.to_string()))?;
        {
            let mut sync = lock(&self.sync);
            sync.synced = sync.synced.max(writer.next - 1);
        }
        self.synced.notify_all();
        let path = self.dir.join(segment_name(writer.next));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| ArchiveError(e.to_string()))?;
        writer.file = Arc::new(file);
        self.index
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .segments
            .push(Segment {
                first: writer.next,
                path,
                bytes: 0,
                newest: None,
            });
        Ok(())
    }

    /// Waits until an fsync covers position `last`, running it if no one is.
    fn wait_synced(&self, last: u64) -> Result<(), ArchiveError> {
        let mut sync = lock(&self.sync);
        loop {
            if sync.synced >= last {
                return Ok(());
            }
            if let Some(e) = sync.failed.take() {
                return Err(ArchiveError(e));
            }
            if sync.syncing {
                sync = self
                    .synced
                    .wait(sync)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            sync.syncing = true;
            let upto = sync.written;
            drop(sync);
            let file = lock(&self.writer).file.clone();
            let result = file.sync_data();
            sync = lock(&self.sync);
            sync.syncing = false;
            match result {
                Ok(()) => sync.synced = sync.synced.max(upto),
                Err(e) => {
                    self.synced.notify_all();
                    return Err(ArchiveError(format!("fsync failed: {e}")));
                }
            }
            self.synced.notify_all();
        }
    }

    /// Deletes the oldest segments past `max_size` or `max_age` (never the one
    /// being appended to).
    pub fn enforce_retention(&self) {
        let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
        let now = Utc::now();
        let max_age = chrono::Duration::from_std(self.max_age).unwrap_or(chrono::Duration::MAX);
        let mut total: u64 = index.segments.iter().map(|s| s.bytes).sum();
        while index.segments.len() > 1 {
            let oldest = &index.segments[0];
            let too_old = oldest.newest.is_none_or(|t| now - t > max_age);
            if total <= self.max_size && !too_old {
                break;
            }
            if let Err(e) = std::fs::remove_file(&oldest.path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(segment = %oldest.path.display(), error = %e, "cannot delete an expired archive segment");
                break;
            }
            tracing::info!(segment = %oldest.path.display(), bytes = oldest.bytes, "archive segment past retention deleted");
            total -= oldest.bytes;
            let first = oldest.first;
            index.segments.remove(0);
            index.aggregates.retain(|_, at| {
                at.retain(|(_, (segment, _))| *segment != first);
                !at.is_empty()
            });
        }
    }

    /// Archived records `query` selects, oldest first.
    pub fn query(&self, query: &Query) -> std::io::Result<Vec<ArchivedEvent>> {
        let Some(aggregate) = &query.aggregate else {
            return read(&self.dir, query);
        };
        let positions: Vec<(u64, Position)> = {
            let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
            index.aggregates.get(aggregate).cloned().unwrap_or_default()
        };
        let limit = query.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut open: Option<(u64, File)> = None;
        for (seq, (segment, offset)) in positions {
            if out.len() >= limit {
                break;
            }
            if query.after.is_some_and(|a| seq <= a) {
                continue;
            }
            if open.as_ref().is_none_or(|(s, _)| *s != segment) {
                match File::open(self.dir.join(segment_name(segment))) {
                    Ok(f) => open = Some((segment, f)),
                    // Deleted by retention meanwhile.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
            let Some((_, file)) = open.as_mut() else {
                continue;
            };
            if let Some(event) = read_at(file, offset)?
                && query.selects(&event)
            {
                out.push(event);
            }
        }
        Ok(out)
    }
}

/// The record at `offset` of `file`, if a whole, good one is there.
fn read_at(file: &mut File, offset: u64) -> std::io::Result<Option<ArchivedEvent>> {
    file.seek(SeekFrom::Start(offset))?;
    Ok(match next_record(file)? {
        Next::Record(event, _) => Some(*event),
        Next::End | Next::Bad(_) => None,
    })
}

/// Parses `--since` / `--until`: an RFC 3339 time, or a duration back from
/// now (`90s`, `1h`, `2days`).
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(text).map_err(|_| {
        format!("{text:?} is neither an RFC 3339 time nor a duration such as 1h or 30m")
    })?;
    let ago = chrono::Duration::from_std(ago).map_err(|e| e.to_string())?;
    Ok(Utc::now() - ago)
}
