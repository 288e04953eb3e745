//! Redis Streams throughput: one job, two consumers, the same Redis, one run.
//!
//! The job: take a ~400-byte JSON `order.created` envelope from the stream of
//! exchange `bench.in` (`<prefix>:x:bench.in`, read through a consumer group),
//! `XADD` one `notification.email` (recipient, subject, body) to the stream of
//! exchange `bench.out` (`<prefix>:x:bench.out`), then `XACK` the input. Inputs
//! and outputs carry the fields Switchboard's Redis bus reads and writes
//! (`routing_key`, `body`, `headers`, `content_type`, `message_id`; see
//! host/src/bus/redis/entry.rs), and every `XADD` is `MAXLEN ~ 1000000` as the
//! bus's. The consumers, each a child process:
//!
//! - **hand-written** (the baseline): `switchboard-bench redis-consumer`, as one
//!   writes it by hand with the `redis` crate: `XREADGROUP COUNT <batch> BLOCK`,
//!   parse each entry's JSON, build the email, and per batch one `MULTI` of the
//!   batch's `XADD`s and one `XACK` of its ids (outputs and acks atomic, as
//!   Switchboard's settle makes them), one connection, one thread.
//! - **Switchboard**: `switchboard run` with `[broker] kind = "redis-streams"`
//!   and the shipped `notification` plugin, routed `order.created` from
//!   `bench.in`, `output_exchange = "bench.out"`, `prefetch = <batch>`.
//!
//! Each measurement gets a fresh key prefix (its keys are removed afterwards
//! with `SCAN MATCH <prefix>:*` and `UNLINK`; nothing else on the shared Redis
//! is touched): create the consumer group, preload N events while nothing
//! consumes, start the consumer, poll `XLEN` of the output stream until it
//! holds N. Events/s, CPU (the consumer's and `redis-server`'s: their threads'
//! time on a CPU, `/proc/<pid>/task/*/schedstat`) and the commands the server
//! processed (`INFO stats`) are counted from the first output to the N-th, so
//! process startup is left out. Runs are interleaved (hand-written,
//! Switchboard, hand-written, ...) and the table shows medians.
//!
//! Switchboard creates its consumer groups itself, at `$` (a group sees only
//! what is published after it exists), so it is started once on the empty
//! prefix, stopped with SIGTERM after `/readyz` answers 200, and only then is
//! the input preloaded.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ::redis::{Connection, Value};
use anyhow::{Context, bail};
use switchboard::bus::redis::{Keys, Link, tools};
use switchboard::config::Secret;

use crate::{median, process};

const INPUT_EXCHANGE: &str = "bench.in";
const OUTPUT_EXCHANGE: &str = "bench.out";
/// The plugin Switchboard runs: its consumer group is named after it.
const PLUGIN: &str = "notification";
/// The hand-written consumer's group.
const HAND_GROUP: &str = "handwritten";
const INPUT_KIND: &str = "order.created";
const OUTPUT_KIND: &str = "notification.email";
/// `MAXLEN ~` of every `XADD`, as Switchboard's default `stream_max_length`.
const MAX_LENGTH: u64 = 1_000_000;
/// `XADD`s per pipeline while preloading.
const PRELOAD_CHUNK: usize = 1000;
const POLL: Duration = Duration::from_millis(5);

/// `switchboard-bench redis`.
#[derive(Debug, clap::Args)]
pub struct RedisArgs {
    /// Events per measurement.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Measurements per consumer (interleaved; medians shown).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Consumers to measure.
    #[arg(long, value_delimiter = ',', default_value = "handwritten,switchboard")]
    consumers: Vec<Consumer>,
    /// Entries per `XREADGROUP` of the hand-written consumer, and Switchboard's
    /// `prefetch`.
    #[arg(long, default_value_t = 100)]
    batch: u16,
    /// Switchboard's `concurrency` (workers of the plugin).
    #[arg(long, default_value_t = 2)]
    concurrency: u16,
    /// The Redis server (its `redis-server` must run on this machine: its CPU
    /// is read from /proc).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    url: String,
    /// Give up on a measurement after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// The `switchboard` binary. Default: target/release/switchboard.
    #[arg(long)]
    switchboard: Option<PathBuf>,
}

/// `switchboard-bench redis-consumer`: the hand-written consumer, run as a child.
#[derive(Debug, clap::Args)]
pub struct ConsumerArgs {
    #[arg(long)]
    url: String,
    /// The key prefix: input `<prefix>:x:bench.in`, output `<prefix>:x:bench.out`.
    #[arg(long)]
    prefix: String,
    #[arg(long, default_value = HAND_GROUP)]
    group: String,
    #[arg(long, default_value_t = 100)]
    batch: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Consumer {
    Handwritten,
    Switchboard,
}

impl fmt::Display for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Handwritten => "handwritten",
            Self::Switchboard => "switchboard",
        })
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Outputs counted (first output to last).
    events: usize,
    seconds: f64,
    consumer_cpu: f64,
    redis_cpu: f64,
    /// Commands the server processed meanwhile (`INFO stats`; `MULTI` and
    /// `EXEC` count, and so do this program's polls and anyone else's).
    commands: u64,
    /// From starting the consumer to the N-th output, startup included.
    wall: f64,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }

    fn consumer_us(&self) -> f64 {
        self.consumer_cpu * 1e6 / self.events as f64
    }

    fn redis_us(&self) -> f64 {
        self.redis_cpu * 1e6 / self.events as f64
    }

    fn total_us(&self) -> f64 {
        self.consumer_us() + self.redis_us()
    }

    fn commands_per_event(&self) -> f64 {
        self.commands as f64 / self.events as f64
    }
}

/// What one benchmark run needs everywhere.
struct Bench {
    args: RedisArgs,
    client: ::redis::Client,
    redis_pid: u32,
    redis_version: String,
}

pub fn run(args: RedisArgs) -> anyhow::Result<()> {
    if args.events == 0 || args.rounds == 0 || args.batch == 0 || args.concurrency == 0 {
        bail!("--events, --rounds, --batch and --concurrency must be at least 1");
    }
    let client = ::redis::Client::open(args.url.as_str()).context("--url")?;
    let mut con = client
        .get_connection()
        .with_context(|| format!("connecting to {} (is Redis running?)", args.url))?;
    let (redis_pid, redis_version) = server_info(&mut con)?;
    drop(con);
    let bench = Bench {
        args,
        client,
        redis_pid,
        redis_version,
    };
    // The server's CPU is read from /proc: it must be this machine's.
    bench
        .cpu(bench.redis_pid)
        .context("redis-server's pid (INFO server) is not readable in /proc: run Redis locally")?;
    if bench.args.consumers.contains(&Consumer::Switchboard) {
        bench.switchboard_binary()?;
        crate::wasm(PLUGIN)?;
    }

    let mut samples: Vec<(Consumer, Vec<Sample>)> = bench
        .args
        .consumers
        .iter()
        .map(|&c| (c, Vec::new()))
        .collect();
    let mut failures: Vec<(Consumer, String)> = Vec::new();
    for round in 1..=bench.args.rounds {
        for (consumer, done) in &mut samples {
            if failures.iter().any(|(c, _)| c == consumer) {
                continue;
            }
            match bench.measure(*consumer) {
                Ok(sample) => {
                    eprintln!(
                        "round {round}/{}: {consumer}: {} events in {:.2} s = {:.0}/s \
                         (wall {:.2} s), consumer {:.3} s CPU, redis-server {:.3} s CPU, \
                         {:.2} Redis commands per event",
                        bench.args.rounds,
                        sample.events,
                        sample.seconds,
                        sample.rate(),
                        sample.wall,
                        sample.consumer_cpu,
                        sample.redis_cpu,
                        sample.commands_per_event()
                    );
                    done.push(sample);
                }
                Err(e) => {
                    eprintln!("{consumer}: failed: {e:#}");
                    failures.push((*consumer, format!("{e:#}")));
                }
            }
        }
    }
    bench.print_table(&samples, &failures);
    Ok(())
}

impl Bench {
    /// One measurement of `consumer` on a fresh prefix.
    fn measure(&self, consumer: Consumer) -> anyhow::Result<Sample> {
        let mut con = self.client.get_connection()?;
        let namespace = Namespace::new(&self.client, &format!("sbb-redis-{consumer}"))?;
        let keys = Keys::new(&namespace.prefix);
        let input = keys.exchange(INPUT_EXCHANGE);
        let output = keys.exchange(OUTPUT_EXCHANGE);
        let n = self.args.events;

        let (switchboard, group) = match consumer {
            Consumer::Switchboard => {
                let dir = SwitchboardDir::new(self, &namespace.prefix)?;
                dir.create_groups(self)?;
                let groups = group_names(&mut con, &input)?;
                if !groups.iter().any(|g| g == PLUGIN) {
                    bail!("Switchboard left no group {PLUGIN:?} on {input} (groups: {groups:?})");
                }
                (Some(dir), PLUGIN)
            }
            Consumer::Handwritten => {
                ::redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&input)
                    .arg(HAND_GROUP)
                    .arg("$")
                    .arg("MKSTREAM")
                    .query::<Value>(&mut con)?;
                (None, HAND_GROUP)
            }
        };
        preload(&mut con, &input, n)?;
        let depth: usize = ::redis::cmd("XLEN").arg(&input).query(&mut con)?;
        if depth != n {
            bail!("{input} holds {depth} entries after preloading {n}");
        }
        check_readable(&self.args.url, &keys)?;
        // Let the server settle (and its allocator) before measuring it.
        std::thread::sleep(Duration::from_millis(500));

        let started = Instant::now();
        let mut child = match &switchboard {
            Some(dir) => dir.start(&self.switchboard_binary()?)?,
            None => self.start_handwritten(&namespace.prefix)?,
        };
        let result = self.watch(&mut con, &output, &mut child, started);
        let _ = child.kill();
        let _ = child.wait();
        let sample = match (result, &switchboard) {
            (Ok(sample), _) => sample,
            (Err(e), Some(dir)) => bail!("{e:#}; Switchboard's log ends: {}", dir.log_tail()),
            (Err(e), None) => return Err(e),
        };
        // Outputs and acks go in one MULTI: every input is acked by now.
        let pending = pending(&mut con, &input, group)?;
        if pending != 0 {
            eprintln!("note: {pending} inputs still pending in group {group} after {n} outputs");
        }
        drop(namespace);
        Ok(sample)
    }

    /// Polls `XLEN` of the output stream until it holds every output; reads
    /// the CPU counters at the first output and at the last.
    fn watch(
        &self,
        con: &mut Connection,
        output: &str,
        child: &mut Child,
        started: Instant,
    ) -> anyhow::Result<Sample> {
        let n = self.args.events;
        let deadline = started + Duration::from_secs(self.args.timeout);
        let pid = child.id();
        let mut first: Option<(Instant, usize, f64, f64, u64)> = None;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("the consumer exited early ({status})");
            }
            let count: usize = ::redis::cmd("XLEN").arg(output).query(con)?;
            let now = Instant::now();
            if first.is_none() && count > 0 {
                first = Some((
                    now,
                    count,
                    self.cpu(pid)?,
                    self.cpu(self.redis_pid)?,
                    commands_processed(con)?,
                ));
            }
            if count >= n {
                let consumer_cpu = self.cpu(pid)?;
                let redis_cpu = self.cpu(self.redis_pid)?;
                let commands = commands_processed(con)?;
                let (t0, c0, consumer0, redis0, commands0) = first.unwrap_or((now, 0, 0.0, 0.0, 0));
                if count > n {
                    eprintln!("note: the output stream holds {count} outputs for {n} events");
                }
                if count == c0 {
                    bail!("all {n} outputs appeared within one poll: use more --events");
                }
                return Ok(Sample {
                    events: count - c0,
                    seconds: now.duration_since(t0).as_secs_f64(),
                    consumer_cpu: consumer_cpu - consumer0,
                    redis_cpu: redis_cpu - redis0,
                    commands: commands.saturating_sub(commands0),
                    wall: now.duration_since(started).as_secs_f64(),
                });
            }
            if now > deadline {
                bail!(
                    "timed out after {} s with {count} of {n} outputs",
                    self.args.timeout
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// CPU seconds a process has used so far: its threads' time on a CPU,
    /// summed (`/proc/<pid>/task/*/schedstat`, in nanoseconds; the utime and
    /// stime of `/proc/<pid>/stat` count 10 ms ticks, too coarse for the
    /// hand-written consumer's half-second runs). A thread that ends between
    /// the two readings is not counted: the consumers' and the server's
    /// threads live through a measurement.
    fn cpu(&self, pid: u32) -> anyhow::Result<f64> {
        let mut ns = 0u64;
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("reading /proc/{pid}/task"))?;
        for task in tasks {
            // A thread may end between the listing and the read.
            let Ok(text) = std::fs::read_to_string(task?.path().join("schedstat")) else {
                continue;
            };
            if let Some(running) = text.split_whitespace().next() {
                ns += running.parse::<u64>()?;
            }
        }
        Ok(ns as f64 / 1e9)
    }

    /// This program's hand-written consumer, as a child.
    fn start_handwritten(&self, prefix: &str) -> anyhow::Result<Child> {
        Command::new(std::env::current_exe()?)
            .args([
                "redis-consumer",
                "--url",
                &self.args.url,
                "--prefix",
                prefix,
            ])
            .args(["--group", HAND_GROUP])
            .args(["--batch", &self.args.batch.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .context("starting `switchboard-bench redis-consumer`")
    }

    fn switchboard_binary(&self) -> anyhow::Result<PathBuf> {
        process::binary(self.args.switchboard.as_deref())
    }

    fn print_table(&self, samples: &[(Consumer, Vec<Sample>)], failures: &[(Consumer, String)]) {
        let a = &self.args;
        println!(
            "\n### Redis Streams round trip ({} events, median of {} runs, Redis {})\n",
            a.events, a.rounds, self.redis_version
        );
        println!(
            "| consumer | events/s | × hand-written | consumer CPU µs/event | × hand-written \
             | redis-server CPU µs/event | × hand-written | both, µs/event | × hand-written \
             | Redis commands/event |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let median_of = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
        let base = samples
            .iter()
            .find(|(c, v)| *c == Consumer::Handwritten && !v.is_empty())
            .map(|(_, v)| v.as_slice());
        let ratio = |v: &[Sample], f: fn(&Sample) -> f64| {
            base.map_or("–".to_string(), |b| {
                format!("{:.2}×", median_of(v, f) / median_of(b, f))
            })
        };
        for (consumer, runs) in samples {
            let label = match consumer {
                Consumer::Handwritten => format!(
                    "hand-written redis-rs: XREADGROUP COUNT {}, one MULTI of XADDs + XACK per batch",
                    a.batch
                ),
                Consumer::Switchboard => format!(
                    "Switchboard, {PLUGIN} plugin (concurrency {}, prefetch {})",
                    a.concurrency, a.batch
                ),
            };
            if let Some((_, why)) = failures.iter().find(|(c, _)| c == consumer) {
                let why = why.lines().next().unwrap_or_default().replace('|', "/");
                println!("| {label} | not measured: {why} | | | | | | | | |");
                continue;
            }
            println!(
                "| {label} | {:.0} | {} | {:.1} | {} | {:.1} | {} | {:.1} | {} | {:.2} |",
                median_of(runs, Sample::rate),
                ratio(runs, Sample::rate),
                median_of(runs, Sample::consumer_us),
                ratio(runs, Sample::consumer_us),
                median_of(runs, Sample::redis_us),
                ratio(runs, Sample::redis_us),
                median_of(runs, Sample::total_us),
                ratio(runs, Sample::total_us),
                median_of(runs, Sample::commands_per_event),
            );
        }
        for (consumer, runs) in samples {
            let rates: Vec<String> = runs.iter().map(|s| format!("{:.0}", s.rate())).collect();
            println!(
                "\n{consumer}: events/s per round: {}",
                if rates.is_empty() {
                    "–".to_string()
                } else {
                    rates.join(", ")
                }
            );
        }
    }
}

// --- Redis administration -----------------------------------------------------------

static PREFIXES: AtomicUsize = AtomicUsize::new(0);

/// A key prefix of its own for one measurement; its keys are removed on drop
/// (`SCAN MATCH <prefix>:*` and `UNLINK`, never a flush: the server is shared).
struct Namespace {
    client: ::redis::Client,
    prefix: String,
}

impl Namespace {
    fn new(client: &::redis::Client, label: &str) -> anyhow::Result<Self> {
        let prefix = format!(
            "{label}-{}-{}",
            std::process::id(),
            PREFIXES.fetch_add(1, Ordering::Relaxed)
        );
        let namespace = Self {
            client: client.clone(),
            prefix,
        };
        // A leftover of an earlier run with the same pid would skew this one.
        namespace.remove()?;
        Ok(namespace)
    }

    fn remove(&self) -> anyhow::Result<()> {
        let mut con = self.client.get_connection()?;
        let pattern = format!("{}:*", self.prefix);
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut con)?;
            if !keys.is_empty() {
                ::redis::cmd("UNLINK").arg(&keys).query::<Value>(&mut con)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("removing the keys {}:* failed: {e:#}", self.prefix);
        }
    }
}

/// `redis-server`'s pid and version, from `INFO server`.
fn server_info(con: &mut Connection) -> anyhow::Result<(u32, String)> {
    let info: String = ::redis::cmd("INFO").arg("server").query(con)?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    };
    let pid = field("process_id")
        .context("INFO server shows no process_id")?
        .parse()
        .context("redis-server's process_id")?;
    Ok((pid, field("redis_version").unwrap_or_default()))
}

/// Commands the server has processed since it started (`INFO stats`).
fn commands_processed(con: &mut Connection) -> anyhow::Result<u64> {
    let info: String = ::redis::cmd("INFO").arg("stats").query(con)?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .context("INFO stats shows no total_commands_processed")?
        .trim()
        .parse()
        .context("total_commands_processed")
}

/// Entries of `key` delivered to `group` and not acked.
fn pending(con: &mut Connection, key: &str, group: &str) -> anyhow::Result<u64> {
    let reply: Value = ::redis::cmd("XPENDING").arg(key).arg(group).query(con)?;
    Ok(items(&reply).first().and_then(int).unwrap_or(0))
}

/// The consumer groups on `key`.
fn group_names(con: &mut Connection, key: &str) -> anyhow::Result<Vec<String>> {
    let reply: Value = ::redis::cmd("XINFO").arg("GROUPS").arg(key).query(con)?;
    Ok(items(&reply)
        .iter()
        .filter_map(|g| {
            let fields = pairs(g);
            fields
                .iter()
                .find(|(k, _)| *k == b"name")
                .and_then(|(_, v)| text(v))
        })
        .collect())
}

/// A seed envelope of about 400 bytes: an `order.created` whose customer has an
/// email and no phone, so the notification plugin renders one email for it.
fn seed_event(i: usize) -> Vec<u8> {
    serde_json::json!({
        "id": format!("evt-{i:08}"), "type": INPUT_KIND, "source": "checkout-api",
        "timestamp": "2026-11-22T10:00:00.000Z", "tenant_id": "acme",
        "correlation_id": format!("order-{i:08}"),
        "data": {
            "order_id": format!("O-{i:08}"), "amount": 129.9, "currency": "EUR",
            "customer": {"name": "Ann Lee", "email": "ann@example.com"},
            "items": [{"sku": "SKU-1001", "qty": 1, "price": 99.9},
                      {"sku": "SKU-2002", "qty": 2, "price": 15.0}],
            "shipping": {"method": "standard", "city": "Lyon", "country": "FR"}
        }
    })
    .to_string()
    .into_bytes()
}

/// `XADD <key> MAXLEN ~ 1000000 * <fields>` with the fields Switchboard's
/// publisher writes on an exchange's stream (host/src/bus/redis/entry.rs):
/// routing key, body, headers (a JSON array of `[name, value]`), content type
/// and message id.
fn xadd(key: &str, routing_key: &str, body: &[u8], message_id: Option<&str>) -> ::redis::Cmd {
    let mut cmd = ::redis::cmd("XADD");
    cmd.arg(key)
        .arg("MAXLEN")
        .arg("~")
        .arg(MAX_LENGTH)
        .arg("*")
        .arg("routing_key")
        .arg(routing_key)
        .arg("body")
        .arg(body)
        .arg("headers")
        .arg("[]")
        .arg("content_type")
        .arg("application/json");
    if let Some(id) = message_id {
        cmd.arg("message_id").arg(id);
    }
    cmd
}

/// Appends `n` seed events to `input`, `PRELOAD_CHUNK` per pipeline.
fn preload(con: &mut Connection, input: &str, n: usize) -> anyhow::Result<()> {
    let mut i = 0;
    while i < n {
        let mut pipe = ::redis::pipe();
        for j in i..(i + PRELOAD_CHUNK).min(n) {
            pipe.add_command(xadd(
                input,
                INPUT_KIND,
                &seed_event(j),
                Some(&format!("evt-{j:08}")),
            ))
            .ignore();
        }
        pipe.query::<Value>(con)?;
        i += PRELOAD_CHUNK;
    }
    Ok(())
}

/// Reads the first preloaded entry back through Switchboard's own decoder:
/// the field layout is the one its bus reads.
fn check_readable(url: &str, keys: &Keys) -> anyhow::Result<()> {
    let link =
        Link::new(&Secret::new(url), Duration::from_secs(5), 1).map_err(anyhow::Error::msg)?;
    let first = tools::range(&link, keys, INPUT_EXCHANGE, "-", 1)?;
    match first.first() {
        Some((_, p)) if p.routing_key == INPUT_KIND && p.message.body == seed_event(0) => Ok(()),
        Some((id, p)) => bail!(
            "Switchboard reads entry {id} as routing key {:?}, {} bytes: not the seed event",
            p.routing_key,
            p.message.body.len()
        ),
        None => bail!("Switchboard's decoder reads no entry on {INPUT_EXCHANGE}"),
    }
}

// --- Reading replies -----------------------------------------------------------------

fn items(value: &Value) -> &[Value] {
    match value {
        Value::Array(v) | Value::Set(v) => v,
        _ => &[],
    }
}

fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    bytes(value).map(|b| String::from_utf8_lossy(b).into_owned())
}

fn int(value: &Value) -> Option<u64> {
    match value {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => text(other)?.parse().ok(),
    }
}

/// A flat `[k1, v1, k2, v2, ...]` array (RESP2) or a map (RESP3) as pairs.
fn pairs(value: &Value) -> Vec<(&[u8], &Value)> {
    match value {
        Value::Map(m) => m.iter().filter_map(|(k, v)| Some((bytes(k)?, v))).collect(),
        other => items(other)
            .chunks_exact(2)
            .filter_map(|kv| Some((bytes(&kv[0])?, &kv[1])))
            .collect(),
    }
}

/// One stream entry of an `XREADGROUP` reply: its id and fields.
struct Entry<'a> {
    id: &'a [u8],
    fields: Vec<(&'a [u8], &'a Value)>,
}

impl Entry<'_> {
    fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| *k == name.as_bytes())
            .and_then(|(_, v)| bytes(v))
    }
}

/// The entries of an `XREADGROUP` reply on one stream (nil on a timeout).
fn read_entries(reply: &Value) -> Vec<Entry<'_>> {
    let per_stream: Vec<&Value> = match reply {
        Value::Map(m) => m.iter().map(|(_, v)| v).collect(),
        other => items(other)
            .iter()
            .filter_map(|s| items(s).get(1))
            .collect(),
    };
    per_stream
        .into_iter()
        .flat_map(items)
        .filter_map(|e| match items(e) {
            [id, fields] => Some(Entry {
                id: bytes(id)?,
                fields: pairs(fields),
            }),
            _ => None,
        })
        .collect()
}

// --- Switchboard ----------------------------------------------------------------------

/// A folder with `router.toml`, the plugin and Switchboard's state.
struct SwitchboardDir {
    dir: tempfile::TempDir,
    listen: String,
    url: String,
}

impl SwitchboardDir {
    fn new(bench: &Bench, prefix: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let plugins = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins)?;
        // `[plugins.<name>]` loads `<name>.wasm` from the plugins folder.
        std::fs::copy(crate::wasm(PLUGIN)?, plugins.join(format!("{PLUGIN}.wasm")))?;
        let listen = process::free_listen()?;
        let url = &bench.args.url;
        let config = format!(
            r##"plugins_dir = "{plugins}"
state_dir = "{state}"

[broker]
kind = "redis-streams"
url = "{url}"
prefix = "{prefix}"

[http]
listen = "{listen}"

[[exchanges]]
name = "{INPUT_EXCHANGE}"
kind = "topic"

[[exchanges]]
name = "{OUTPUT_EXCHANGE}"
kind = "topic"

[plugins.{PLUGIN}]
output_exchange = "{OUTPUT_EXCHANGE}"
concurrency = {concurrency}
prefetch = {prefetch}

[[routes]]
exchange = "{INPUT_EXCHANGE}"
pattern = "{INPUT_KIND}"
plugin = "{PLUGIN}"
"##,
            plugins = plugins.display(),
            state = dir.path().join("state").display(),
            concurrency = bench.args.concurrency,
            prefetch = bench.args.batch,
        );
        std::fs::write(dir.path().join("router.toml"), config)?;
        Ok(Self {
            dir,
            listen,
            url: url.clone(),
        })
    }

    /// `switchboard run` in this folder, its output appended to `switchboard.log`
    /// (`REDIS_BUS_URL` set to the same URL, so that one left in this shell
    /// does not point it elsewhere).
    fn start(&self, binary: &Path) -> anyhow::Result<Child> {
        process::spawn(
            binary,
            &self.dir.path().join("router.toml"),
            &self.log_path(),
            &[("REDIS_BUS_URL", &self.url)],
        )
    }

    /// Starts Switchboard on the empty prefix so that it creates its consumer
    /// groups (at `$`), waits until `/readyz` answers 200, then stops it with
    /// SIGTERM and waits for it to exit.
    fn create_groups(&self, bench: &Bench) -> anyhow::Result<()> {
        let mut child = self.start(&bench.switchboard_binary()?)?;
        let ready = process::wait_ready(&mut child, &self.listen, Duration::from_secs(60));
        let stopped = match child.try_wait()? {
            Some(_) => Ok(()),
            None => process::terminate(&mut child),
        };
        ready.map_err(|e| anyhow::anyhow!("{e:#}; its log ends: {}", self.log_tail()))?;
        stopped
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("switchboard.log")
    }

    /// The last lines Switchboard wrote, on one line, for an error message.
    fn log_tail(&self) -> String {
        process::log_tail(&self.log_path())
    }
}

// --- The hand-written consumer -------------------------------------------------------

/// The "business logic": the email for an `order.created` envelope, in an
/// envelope of its own (what the notification plugin renders, written by
/// hand: `Order {order_id} confirmed`).
fn handle(input: &[u8]) -> anyhow::Result<Vec<u8>> {
    let event: serde_json::Value = serde_json::from_slice(input)?;
    let id = event["id"].as_str().unwrap_or_default();
    let data = &event["data"];
    let recipient = data["customer"]["email"]
        .as_str()
        .context("no recipient: the order has no customer.email")?;
    let order = data["order_id"].as_str().unwrap_or_default();
    Ok(serde_json::json!({
        "id": format!("{id}:0"), "type": OUTPUT_KIND, "source": "notification",
        "causation_id": id,
        "correlation_id": event["correlation_id"].as_str().unwrap_or(id),
        "tenant_id": event["tenant_id"],
        "timestamp": "2026-11-22T10:00:00.000Z",
        "data": {
            "recipient": recipient,
            "template_id": INPUT_KIND,
            "subject": format!("Order {order} confirmed"),
            "body": format!(
                "Thank you for your order {order}. We will let you know when it ships."
            ),
        },
    })
    .to_string()
    .into_bytes())
}

/// `XREADGROUP COUNT <batch> BLOCK 1000` → handle each entry → one `MULTI` of
/// the batch's `XADD`s and one `XACK` of its ids. An entry that is not an
/// order (no body, bad JSON, no recipient) is acked and skipped. Runs until
/// killed.
pub fn consumer(args: ConsumerArgs) -> anyhow::Result<()> {
    let keys = Keys::new(&args.prefix);
    let input = keys.exchange(INPUT_EXCHANGE);
    let output = keys.exchange(OUTPUT_EXCHANGE);
    let name = format!("handwritten-{}", std::process::id());
    let client = ::redis::Client::open(args.url.as_str())?;
    let mut con = client.get_connection()?;
    loop {
        let reply: Value = ::redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&args.group)
            .arg(&name)
            .arg("COUNT")
            .arg(args.batch)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(&input)
            .arg(">")
            .query(&mut con)?;
        let entries = read_entries(&reply);
        if entries.is_empty() {
            continue;
        }
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        let mut ack = ::redis::cmd("XACK");
        ack.arg(&input).arg(&args.group);
        for e in &entries {
            match e.field("body").map(handle) {
                Some(Ok(email)) => {
                    pipe.add_command(xadd(&output, OUTPUT_KIND, &email, None))
                        .ignore();
                }
                Some(Err(why)) => {
                    eprintln!("entry {} skipped: {why:#}", String::from_utf8_lossy(e.id))
                }
                None => eprintln!("entry {} has no body", String::from_utf8_lossy(e.id)),
            }
            ack.arg(e.id);
        }
        pipe.add_command(ack).ignore();
        pipe.query::<Value>(&mut con)?;
    }
}
