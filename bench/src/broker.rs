//! Broker throughput: one job, three consumers, the same RabbitMQ, one run.
//!
//! The job: take a persistent ~400-byte JSON event from a queue bound to topic
//! exchange `bench.in`, publish one persistent output with a publisher confirm to
//! topic exchange `bench.out` (bound to a sink queue that counts outputs), then
//! acknowledge the input. The consumers, each a child process:
//!
//! - **pipelined lapin** (the headline baseline): `switchboard-bench
//!   pipelined-consumer`, a consumer as one writes it by hand with lapin: for
//!   each delivery, parse the JSON, build one small event, publish it and move
//!   on; a task per delivery awaits its confirm and then acks (so up to
//!   `prefetch` events are in flight, their confirms pipelined).
//! - **raw lapin, one at a time**: `switchboard-bench raw-passthrough`: consume →
//!   publish → await the confirm → ack, one message at a time; the floor.
//! - **Node.js amqplib**: `bench/node/consumer.js`, as services commonly write one
//!   (confirm channel, `JSON.parse`, a handler, publish with a confirm callback that
//!   acks).
//! - **Switchboard**: `switchboard run` with the shipped `notification` plugin
//!   (one `notification.email` per `order.created`), or with `--plugin
//!   passthrough` the scripted guest (its `emit` script returns one small output
//!   per event).
//! - **baseline** (with `--baseline <binary>`): the same with another
//!   `switchboard` binary, an earlier build, so that a change is measured
//!   before and after in one run.
//!
//! Each measurement gets a fresh vhost: declare, preload N events with confirms
//! while nothing consumes, start the consumer, wait until the sink holds N
//! outputs. Events/s and CPU (the consumer's and the broker's `beam.smp`, from
//! `/proc/<pid>/stat`) are counted from the first output to the N-th, so process
//! startup is left out. Runs are interleaved (raw, node, switchboard, raw, ...)
//! and the table shows medians.
//!
//! Switchboard declares its own queue (`switchboard.passthrough`, with its own
//! arguments), so it is started once on the empty vhost, stopped with SIGTERM
//! after `/readyz` answers 200, and only then is the input preloaded.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};

use crate::{median, process, wasm};

const INPUT_EXCHANGE: &str = "bench.in";
const OUTPUT_EXCHANGE: &str = "bench.out";
/// The input queue of the raw and Node consumers (Switchboard declares its own).
const INPUT_QUEUE: &str = "bench.input";
/// Switchboard's input queue: `switchboard.<plugin>`.
const SWITCHBOARD_PREFIX: &str = "switchboard";
const SINK_QUEUE: &str = "bench.sink";
/// Publishes in flight (unconfirmed) while preloading.
const PRELOAD_WINDOW: usize = 1000;
const POLL: Duration = Duration::from_millis(20);

/// `switchboard-bench broker`.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// Events per measurement.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Measurements per consumer and queue type (interleaved; medians shown).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Input (and sink) queue types, in order.
    #[arg(long, value_delimiter = ',', default_value = "quorum,classic")]
    queue_types: Vec<QueueType>,
    /// Consumers to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "pipelined,switchboard,node,raw"
    )]
    consumers: Vec<Consumer>,
    /// The plugin Switchboard runs.
    #[arg(long, default_value = "notification")]
    plugin: BenchPlugin,
    /// Prefetch of every consumer.
    #[arg(long, default_value_t = 100)]
    prefetch: u16,
    /// The broker (guest/guest; a vhost per measurement is created with
    /// `rabbitmqctl`, so it must be the local node).
    #[arg(long, default_value = "127.0.0.1:5672")]
    broker: String,
    /// Give up on a measurement after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// The `switchboard` binary. Default: target/release/switchboard.
    #[arg(long)]
    switchboard: Option<PathBuf>,
    /// Another `switchboard` binary (an earlier build), measured as consumer
    /// `baseline` (add it to `--consumers`).
    #[arg(long)]
    baseline: Option<PathBuf>,
}

/// `switchboard-bench raw-passthrough`: the raw lapin consumer, run as a child.
#[derive(Debug, clap::Args)]
pub struct RawArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    queue: String,
    #[arg(long, default_value_t = 100)]
    prefetch: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    Quorum,
    Classic,
}

impl QueueType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

/// What Switchboard runs, and what the seed events are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPlugin {
    /// The shipped notification plugin; seed events are `order.created`.
    Notification,
    /// The scripted test guest; seed events are `emit` (one small output).
    Passthrough,
}

impl BenchPlugin {
    fn name(self) -> &'static str {
        match self {
            Self::Notification => "notification",
            Self::Passthrough => "passthrough",
        }
    }

    fn wasm(self) -> anyhow::Result<PathBuf> {
        match self {
            Self::Notification => wasm("notification"),
            Self::Passthrough => wasm("scripted_guest"),
        }
    }

    /// The seed events' type.
    fn kind(self) -> &'static str {
        match self {
            Self::Notification => "order.created",
            Self::Passthrough => "emit",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Consumer {
    Pipelined,
    Raw,
    Node,
    Switchboard,
    Baseline,
}

impl fmt::Display for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pipelined => "pipelined",
            Self::Raw => "raw",
            Self::Node => "node",
            Self::Switchboard => "switchboard",
            Self::Baseline => "baseline",
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
    broker_cpu: f64,
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

    fn broker_us(&self) -> f64 {
        self.broker_cpu * 1e6 / self.events as f64
    }
}

/// What one benchmark run needs everywhere.
struct Bench {
    args: BrokerArgs,
    runtime: tokio::runtime::Runtime,
    broker_pid: u32,
    ticks_per_second: f64,
    repo: PathBuf,
}

pub fn run(args: BrokerArgs) -> anyhow::Result<()> {
    if args.events == 0 || args.rounds == 0 {
        bail!("--events and --rounds must be at least 1");
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bench = Bench {
        runtime: tokio::runtime::Runtime::new()?,
        broker_pid: broker_pid()?,
        ticks_per_second: ticks_per_second(),
        repo,
        args,
    };
    if bench.args.consumers.contains(&Consumer::Node) {
        bench.ensure_node_modules()?;
    }
    if bench.args.consumers.contains(&Consumer::Switchboard) {
        bench.switchboard_binary()?;
        bench.args.plugin.wasm()?;
    }
    if bench.args.consumers.contains(&Consumer::Baseline) {
        bench.baseline_binary()?;
        bench.args.plugin.wasm()?;
    }

    for &queue_type in &bench.args.queue_types {
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
                match bench.measure(*consumer, queue_type) {
                    Ok(sample) => {
                        eprintln!(
                            "{} round {round}/{}: {consumer}: {} events in {:.2} s = {:.0}/s \
                             (wall {:.2} s), consumer {:.2} s CPU, broker {:.2} s CPU",
                            queue_type.as_str(),
                            bench.args.rounds,
                            sample.events,
                            sample.seconds,
                            sample.rate(),
                            sample.wall,
                            sample.consumer_cpu,
                            sample.broker_cpu
                        );
                        done.push(sample);
                    }
                    Err(e) => {
                        eprintln!("{} {consumer}: failed: {e:#}", queue_type.as_str());
                        failures.push((*consumer, format!("{e:#}")));
                    }
                }
            }
        }
        bench.print_table(queue_type, &samples, &failures);
    }
    Ok(())
}

impl Bench {
    /// One measurement of `consumer` on a fresh vhost.
    fn measure(&self, consumer: Consumer, queue_type: QueueType) -> anyhow::Result<Sample> {
        let vhost = Vhost::create(&format!("sbb-{consumer}-{}", queue_type.as_str()))?;
        let url = format!("amqp://guest:guest@{}/{}", self.args.broker, vhost.name);
        let n = self.args.events;

        let switchboard = match consumer {
            Consumer::Switchboard | Consumer::Baseline => {
                let setup =
                    SwitchboardDir::new(&url, queue_type, self.args.prefetch, self.args.plugin)?;
                setup.declare_topology(self)?;
                Some(setup)
            }
            Consumer::Pipelined | Consumer::Raw | Consumer::Node => None,
        };
        let switchboard_queue = format!("{SWITCHBOARD_PREFIX}.{}", self.args.plugin.name());
        let input = match consumer {
            Consumer::Switchboard | Consumer::Baseline => switchboard_queue.as_str(),
            Consumer::Pipelined | Consumer::Raw | Consumer::Node => INPUT_QUEUE,
        };
        let connection = self.runtime.block_on(async {
            let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            // Switchboard has declared the exchanges (and its queue) itself.
            if !matches!(consumer, Consumer::Switchboard | Consumer::Baseline) {
                declare_exchanges(&channel).await?;
                declare_queue(&channel, INPUT_QUEUE, queue_type).await?;
                bind(&channel, INPUT_QUEUE, INPUT_EXCHANGE).await?;
            }
            declare_queue(&channel, SINK_QUEUE, queue_type).await?;
            bind(&channel, SINK_QUEUE, OUTPUT_EXCHANGE).await?;
            preload(&channel, n, self.args.plugin.kind()).await?;
            anyhow::Ok(connection)
        })?;
        let depth = self.depth(&connection, input)?;
        if depth != n {
            bail!("{input} holds {depth} events after preloading {n}");
        }
        // Let the broker finish writing the preload before measuring it.
        std::thread::sleep(Duration::from_millis(500));

        let started = Instant::now();
        let mut child = match consumer {
            Consumer::Pipelined => self.start_lapin("pipelined-consumer", &url)?,
            Consumer::Raw => self.start_lapin("raw-passthrough", &url)?,
            Consumer::Node => self.start_node(&url)?,
            Consumer::Switchboard | Consumer::Baseline => {
                let binary = if consumer == Consumer::Baseline {
                    self.baseline_binary()?
                } else {
                    self.switchboard_binary()?
                };
                match &switchboard {
                    Some(dir) => dir.start(&binary)?,
                    None => bail!("no Switchboard folder"),
                }
            }
        };
        let result = self.watch(&connection, &mut child, started);
        let _ = child.kill();
        let _ = child.wait();
        self.runtime
            .block_on(connection.close(200, "bench done".into()))
            .ok();
        let sample = match (result, &switchboard) {
            (Ok(sample), _) => sample,
            (Err(e), Some(dir)) => bail!("{e:#}; Switchboard's log ends: {}", dir.log_tail()),
            (Err(e), None) => return Err(e),
        };
        drop(vhost);
        Ok(sample)
    }

    /// Polls the sink until it holds every output; reads the CPU counters at
    /// the first output and at the last.
    fn watch(
        &self,
        connection: &Connection,
        child: &mut Child,
        started: Instant,
    ) -> anyhow::Result<Sample> {
        let n = self.args.events;
        let deadline = started + Duration::from_secs(self.args.timeout);
        let pid = child.id();
        let mut first: Option<(Instant, usize, f64, f64)> = None;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("the consumer exited early ({status})");
            }
            let count = self.depth(connection, SINK_QUEUE)?;
            let now = Instant::now();
            if first.is_none() && count > 0 {
                first = Some((now, count, self.cpu(pid)?, self.cpu(self.broker_pid)?));
            }
            if count >= n {
                let consumer_cpu = self.cpu(pid)?;
                let broker_cpu = self.cpu(self.broker_pid)?;
                let (t0, c0, consumer0, broker0) = first.unwrap_or((now, 0, 0.0, 0.0));
                if count > n {
                    eprintln!("note: the sink holds {count} outputs for {n} events");
                }
                if count == c0 {
                    bail!("all {n} outputs appeared within one poll: use more --events");
                }
                return Ok(Sample {
                    events: count - c0,
                    seconds: now.duration_since(t0).as_secs_f64(),
                    consumer_cpu: consumer_cpu - consumer0,
                    broker_cpu: broker_cpu - broker0,
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

    /// Messages ready in `queue` (a passive declare on a channel of its own).
    fn depth(&self, connection: &Connection, queue: &str) -> anyhow::Result<usize> {
        self.runtime.block_on(async {
            let channel = connection.create_channel().await?;
            let declared = channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("queue {queue}"))?;
            channel.close(200, "ok".into()).await?;
            Ok(usize::try_from(declared.message_count())?)
        })
    }

    /// CPU seconds (user + system) a process has used so far.
    fn cpu(&self, pid: u32) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces), from field 3.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |i: usize| -> anyhow::Result<f64> {
            Ok(fields
                .get(i)
                .with_context(|| format!("/proc/{pid}/stat is short"))?
                .parse::<f64>()?)
        };
        // utime and stime are fields 14 and 15.
        Ok((field(11)? + field(12)?) / self.ticks_per_second)
    }

    /// One of this program's own lapin consumers, as a child.
    fn start_lapin(&self, subcommand: &str, url: &str) -> anyhow::Result<Child> {
        Command::new(std::env::current_exe()?)
            .args([subcommand, "--url", url, "--queue", INPUT_QUEUE])
            .args(["--prefetch", &self.args.prefetch.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting `switchboard-bench {subcommand}`"))
    }

    fn start_node(&self, url: &str) -> anyhow::Result<Child> {
        Command::new("node")
            .arg(self.repo.join("bench/node/consumer.js"))
            .args(["--url", url, "--queue", INPUT_QUEUE])
            .args(["--prefetch", &self.args.prefetch.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .context("starting `node bench/node/consumer.js` (is Node.js installed?)")
    }

    fn ensure_node_modules(&self) -> anyhow::Result<()> {
        let dir = self.repo.join("bench/node");
        if dir.join("node_modules/amqplib").exists() {
            return Ok(());
        }
        eprintln!("installing the Node consumer's dependencies (npm ci in bench/node)");
        let status = Command::new("npm")
            .arg("ci")
            .current_dir(&dir)
            .stdout(Stdio::null())
            .status()
            .context("running npm ci (is Node.js installed?)")?;
        if !status.success() {
            bail!("npm ci in {} failed: {status}", dir.display());
        }
        Ok(())
    }

    fn baseline_binary(&self) -> anyhow::Result<PathBuf> {
        match &self.args.baseline {
            Some(path) if path.exists() => Ok(path.clone()),
            Some(path) => bail!("{} is missing", path.display()),
            None => bail!("consumer `baseline` needs --baseline <switchboard binary>"),
        }
    }

    fn switchboard_binary(&self) -> anyhow::Result<PathBuf> {
        process::binary(self.args.switchboard.as_deref())
    }

    fn print_table(
        &self,
        queue_type: QueueType,
        samples: &[(Consumer, Vec<Sample>)],
        failures: &[(Consumer, String)],
    ) {
        let prefetch = self.args.prefetch;
        println!(
            "\n### Broker round trip, {} input queue ({} events, median of {} runs)\n",
            queue_type.as_str(),
            self.args.events,
            self.args.rounds
        );
        println!(
            "| consumer | events/s | vs pipelined lapin | consumer CPU µs/event | broker CPU µs/event |"
        );
        println!("|---|---:|---:|---:|---:|");
        let median_of = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
        let baseline_rate = samples
            .iter()
            .find(|(c, v)| *c == Consumer::Pipelined && !v.is_empty())
            .map(|(_, v)| median_of(v, Sample::rate));
        let plugin = self.args.plugin.name();
        for (consumer, runs) in samples {
            let label = match consumer {
                Consumer::Pipelined => format!(
                    "hand-written lapin, confirms pipelined, ack after confirm (prefetch {prefetch})"
                ),
                Consumer::Raw => format!("raw lapin, one at a time (prefetch {prefetch})"),
                Consumer::Node => {
                    format!("Node.js amqplib, confirm callback (prefetch {prefetch})")
                }
                Consumer::Switchboard => {
                    format!("Switchboard, {plugin} plugin (concurrency 2, prefetch {prefetch})")
                }
                Consumer::Baseline => format!(
                    "Switchboard baseline build, same plugin and settings (prefetch {prefetch})"
                ),
            };
            if let Some((_, why)) = failures.iter().find(|(c, _)| c == consumer) {
                let why = why.lines().next().unwrap_or_default().replace('|', "/");
                println!("| {label} | not measured: {why} | | | |");
                continue;
            }
            let rate = median_of(runs, Sample::rate);
            let ratio =
                baseline_rate.map_or("–".to_string(), |base| format!("{:.2}×", rate / base));
            println!(
                "| {label} | {rate:.0} | {ratio} | {:.1} | {:.1} |",
                median_of(runs, Sample::consumer_us),
                median_of(runs, Sample::broker_us)
            );
        }
    }
}

// --- Broker administration ---------------------------------------------------------

static VHOSTS: AtomicUsize = AtomicUsize::new(0);

/// A vhost of its own for one measurement; deleted on drop.
pub(crate) struct Vhost {
    pub(crate) name: String,
}

impl Vhost {
    pub(crate) fn create(label: &str) -> anyhow::Result<Self> {
        let name = format!(
            "{label}-{}-{}",
            std::process::id(),
            VHOSTS.fetch_add(1, Ordering::Relaxed)
        );
        rabbitmqctl(&["add_vhost", &name])?;
        let vhost = Self { name };
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            "guest",
            ".*",
            ".*",
            ".*",
        ])?;
        Ok(vhost)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        if let Err(e) = rabbitmqctl(&["delete_vhost", &self.name]) {
            eprintln!("{e:#}");
        }
    }
}

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .context("running rabbitmqctl (is RabbitMQ installed?)")?;
    if !output.status.success() {
        bail!(
            "`rabbitmqctl {}` failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The OS pid of the broker's `beam.smp`, from `rabbitmqctl status`.
fn broker_pid() -> anyhow::Result<u32> {
    let status = rabbitmqctl(&["status"])?;
    status
        .lines()
        .find_map(|line| line.trim().strip_prefix("OS PID: "))
        .context("`rabbitmqctl status` shows no OS PID")?
        .trim()
        .parse()
        .context("the broker's OS PID")
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

async fn declare_exchanges(channel: &lapin::Channel) -> lapin::Result<()> {
    for name in [INPUT_EXCHANGE, OUTPUT_EXCHANGE] {
        channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

async fn declare_queue(
    channel: &lapin::Channel,
    name: &str,
    queue_type: QueueType,
) -> lapin::Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(queue_type.as_str().into()),
    );
    channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), arguments)
        .await?;
    Ok(())
}

async fn bind(channel: &lapin::Channel, queue: &str, exchange: &str) -> lapin::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// A seed envelope of about 400 bytes, of type `kind`: `order.created` gives
/// one `notification.email` (the customer has an email and no phone); `emit`
/// is the script the scripted guest runs (no `count`: one output).
fn seed_event(i: usize, kind: &str) -> Vec<u8> {
    serde_json::json!({
        "id": format!("evt-{i:08}"), "type": kind, "source": "checkout-api",
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

/// Publishes `n` persistent seed events to the input exchange, up to
/// `PRELOAD_WINDOW` unconfirmed at a time; fails on any nack or unroutable one.
async fn preload(channel: &lapin::Channel, n: usize, kind: &str) -> anyhow::Result<()> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut pending = VecDeque::new();
    for i in 0..n {
        if pending.len() >= PRELOAD_WINDOW
            && let Some(confirm) = pending.pop_front()
        {
            check_confirm(confirm).await?;
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(format!("evt-{i:08}").into());
        let confirm = channel
            .basic_publish(
                INPUT_EXCHANGE.into(),
                kind.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &seed_event(i, kind),
                properties,
            )
            .await?;
        pending.push_back(confirm);
    }
    for confirm in pending {
        check_confirm(confirm).await?;
    }
    Ok(())
}

async fn check_confirm(confirm: lapin::PublisherConfirm) -> anyhow::Result<()> {
    match confirm.await? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("a preloaded event was unroutable"),
        Confirmation::Nack(_) | Confirmation::NotRequested => {
            bail!("the broker did not confirm a preloaded event")
        }
    }
}

// --- Switchboard ----------------------------------------------------------------------

/// A folder with `router.toml`, the plugin and Switchboard's state.
struct SwitchboardDir {
    dir: tempfile::TempDir,
    listen: String,
}

impl SwitchboardDir {
    fn new(
        url: &str,
        queue_type: QueueType,
        prefetch: u16,
        plugin: BenchPlugin,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let plugins = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins)?;
        // `[plugins.<name>]` loads `<name>.wasm` from the plugins folder.
        let name = plugin.name();
        std::fs::copy(plugin.wasm()?, plugins.join(format!("{name}.wasm")))?;
        let listen = process::free_listen()?;
        let config = format!(
            r##"plugins_dir = "{plugins}"
state_dir = "{state}"

[broker]
url = "{url}"
prefix = "switchboard"
queue_type = "{queue_type}"

[http]
listen = "{listen}"

[[exchanges]]
name = "{INPUT_EXCHANGE}"
kind = "topic"

[[exchanges]]
name = "{OUTPUT_EXCHANGE}"
kind = "topic"

[plugins.{name}]
output_exchange = "{OUTPUT_EXCHANGE}"
concurrency = 2
prefetch = {prefetch}

[[routes]]
exchange = "{INPUT_EXCHANGE}"
pattern = "#"
plugin = "{name}"
"##,
            plugins = plugins.display(),
            state = dir.path().join("state").display(),
            queue_type = queue_type.as_str(),
        );
        std::fs::write(dir.path().join("router.toml"), config)?;
        Ok(Self { dir, listen })
    }

    /// `switchboard run` in this folder, its output appended to `switchboard.log`.
    fn start(&self, binary: &Path) -> anyhow::Result<Child> {
        process::spawn(
            binary,
            &self.dir.path().join("router.toml"),
            &self.log_path(),
            &[],
        )
    }

    /// Starts Switchboard on the empty vhost so that it declares its exchanges
    /// and its queue (with its own arguments), waits until `/readyz` answers
    /// 200, then stops it with SIGTERM and waits for it to exit.
    fn declare_topology(&self, bench: &Bench) -> anyhow::Result<()> {
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

// --- The raw lapin consumer ----------------------------------------------------------

/// A confirm channel consuming `args.queue` with `args.prefetch`, as the
/// hand-written consumers start.
async fn consume(
    args: &RawArgs,
    tag: &str,
) -> anyhow::Result<(Connection, lapin::Channel, lapin::Consumer)> {
    let connection = Connection::connect(&args.url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let deliveries = channel
        .basic_consume(
            args.queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel, deliveries))
}

/// Consume → publish the same body to `bench.out` → await the confirm → ack, one
/// message at a time. Runs until killed.
pub fn raw_passthrough(args: RawArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let (_connection, channel, mut deliveries) = consume(&args, "raw-passthrough").await?;
        while let Some(delivery) = deliveries.next().await {
            let delivery = delivery?;
            let confirmation = channel
                .basic_publish(
                    OUTPUT_EXCHANGE.into(),
                    delivery.routing_key.clone(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into()),
                )
                .await?
                .await?;
            if !matches!(confirmation, Confirmation::Ack(_)) {
                bail!("the broker refused an output");
            }
            delivery.ack(BasicAckOptions::default()).await?;
        }
        bail!("the broker cancelled the consumer")
    })
}

// --- The pipelined lapin consumer ----------------------------------------------------

/// The "business logic" of the hand-written consumers: one small event out per
/// event in (as `bench/node/consumer.js` does).
fn handle(input: &[u8]) -> anyhow::Result<Vec<u8>> {
    let event: serde_json::Value = serde_json::from_slice(input)?;
    let id = event["id"].as_str().unwrap_or_default();
    Ok(serde_json::json!({
        "id": format!("{id}:0"), "type": "emitted.0", "source": "pipelined",
        "causation_id": id,
        "correlation_id": event["correlation_id"].as_str().unwrap_or(id),
        "tenant_id": event["tenant_id"],
        "timestamp": "2026-11-22T10:00:00.000Z",
        "data": {"i": 0},
    })
    .to_string()
    .into_bytes())
}

/// Consume → handle → publish, and on to the next delivery; a task per
/// delivery awaits the confirm, then acks (a nack requeues). Runs until killed.
pub fn pipelined_consumer(args: RawArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let (_connection, channel, mut deliveries) = consume(&args, "pipelined").await?;
        while let Some(delivery) = deliveries.next().await {
            let delivery = delivery?;
            let output = handle(&delivery.data)?;
            let confirm = channel
                .basic_publish(
                    OUTPUT_EXCHANGE.into(),
                    "emitted.0".into(),
                    BasicPublishOptions::default(),
                    &output,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into()),
                )
                .await?;
            tokio::spawn(async move {
                match confirm.await {
                    Ok(Confirmation::Ack(_)) => delivery.ack(BasicAckOptions::default()).await,
                    _ => {
                        delivery
                            .nack(lapin::options::BasicNackOptions {
                                requeue: true,
                                ..Default::default()
                            })
                            .await
                    }
                }
            });
        }
        bail!("the broker cancelled the consumer")
    })
}
