//! The real RabbitMQ, for the tests that run against it.
//!
//! - [`require_broker`] gates a test on the shared broker at `127.0.0.1:5672`:
//!   skipped with a loud notice on a developer machine without it, a failure on CI.
//! - [`TestVhost`] gives each test its own vhost on the shared broker, deleted
//!   (with everything in it) when the value is dropped.
//! - [`ThrowawayNode`] is a second RabbitMQ node on its own ports and data folder,
//!   for the tests that stop, restart or break the broker; the shared one is never
//!   touched.
//! - [`Amqp`] is a plain AMQP client (lapin, blocking calls) to watch the broker
//!   independently of Switchboard: publish with confirms, drain a queue, read a
//!   queue's depth.
//!
//! Everything here shells out to `rabbitmqctl` for administration (the shared
//! broker has no management plugin). As root, the RabbitMQ scripts switch to the
//! `rabbitmq` user, so the throwaway node's folder is made writable for it.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

/// Where the shared test broker listens.
pub const BROKER_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 5672);

/// How long any single broker operation may take before the test fails.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Makes every name built here unique within the test process.
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Whether the shared broker accepts connections. Use as the first line of a
/// real-broker test: `if !require_broker() { return; }`.
///
/// Without a broker the test is skipped with a notice on stderr (shown even
/// though the harness captures test output), unless `CI` is
/// set (and not `false`): there a missing broker is a broken setup, and the test
/// fails rather than pass without having run.
pub fn require_broker() -> bool {
    if TcpStream::connect_timeout(&BROKER_ADDR, Duration::from_secs(2)).is_ok() {
        return true;
    }
    let message = "RabbitMQ is not reachable at 127.0.0.1:5672; \
                   start it with `rabbitmq-server -detached`";
    if on_ci() {
        panic!("{message}");
    }
    // Straight to stderr rather than `eprintln!`, which the test harness
    // captures and only shows for failing tests: a skip must be seen.
    let bar = "!".repeat(78);
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n{bar}\nSKIPPED (no broker): {message}\n{bar}"
    );
    false
}

pub(crate) fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

/// `amqp://guest:guest@<addr>/<vhost>`, the vhost percent-encoded (`/` is `%2F`).
pub fn amqp_url(addr: SocketAddr, vhost: &str) -> String {
    const VHOST: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    format!(
        "amqp://guest:guest@{addr}/{}",
        utf8_percent_encode(vhost, VHOST)
    )
}

// --- rabbitmqctl ---------------------------------------------------------------

/// Runs `rabbitmqctl` with `args` (and extra environment); panics with its
/// output when it fails.
fn rabbitmqctl(env: &[(String, String)], args: &[&str]) -> String {
    let output = try_rabbitmqctl(env, args);
    if !output.status.success() {
        panic!(
            "`rabbitmqctl {}` failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn try_rabbitmqctl(env: &[(String, String)], args: &[&str]) -> Output {
    Command::new("rabbitmqctl")
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl (is RabbitMQ installed?): {e}"))
}

/// Closes every client connection of `vhost` on the shared broker, or every
/// connection of the node with `None`: a network failure as the clients see it.
pub fn close_all_connections(vhost: Option<&str>, reason: &str) {
    match vhost {
        Some(vhost) => rabbitmqctl(&[], &["close_all_connections", "-p", vhost, reason]),
        None => rabbitmqctl(&[], &["close_all_connections", "--global", reason]),
    };
}

// --- One vhost per test ----------------------------------------------------------

/// A vhost of its own on the shared broker, with `guest` allowed everything;
/// deleted, queues and all, on drop.
pub struct TestVhost {
    name: String,
}

impl TestVhost {
    /// Creates `sbt-<label>-<pid>-<n>`; `label` says which test it is for (any
    /// character outside `[A-Za-z0-9_-]` becomes `-`).
    pub fn new(label: &str) -> Self {
        let label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let name = format!(
            "sbt-{label}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        rabbitmqctl(&[], &["add_vhost", &name]);
        rabbitmqctl(
            &[],
            &["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"],
        );
        Self { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL of this vhost as `guest`.
    pub fn url(&self) -> String {
        amqp_url(BROKER_ADDR, &self.name)
    }

    /// Closes every client connection to this vhost.
    pub fn close_all_connections(&self, reason: &str) {
        close_all_connections(Some(&self.name), reason);
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let output = try_rabbitmqctl(&[], &["delete_vhost", &self.name]);
        if !output.status.success() {
            eprintln!(
                "could not delete vhost {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

// --- A node to break ------------------------------------------------------------

/// A RabbitMQ node of its own (`sbt-<pid>-<n>@localhost`): its own AMQP and
/// distribution ports, data, logs and config in a temporary folder, and no
/// plugins. For tests that stop or restart the broker. Stopped and removed on
/// drop.
pub struct ThrowawayNode {
    node: String,
    port: u16,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl ThrowawayNode {
    /// Starts the node and waits (up to 60 s) until it serves AMQP.
    pub fn start() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let node = format!("sbt-{}-{n}@localhost", std::process::id());
        let port = free_port();
        let dist_port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        // The scripts run the node as the `rabbitmq` user when started by root.
        make_world_writable(base);
        let config = base.join("rabbitmq.conf");
        // Queue figures (`rabbitmqctl list_queues messages`) refreshed every
        // 100 ms rather than 5 s, so that a test sees a count change at once.
        std::fs::write(
            &config,
            format!("listeners.tcp.1 = 127.0.0.1:{port}\ncollect_statistics_interval = 100\n"),
        )
        .unwrap();
        std::fs::write(base.join("enabled_plugins"), "[].\n").unwrap();
        // An empty env file, so that /etc/rabbitmq/rabbitmq-env.conf (the shared
        // node's name and settings) does not apply.
        std::fs::write(base.join("rabbitmq-env.conf"), "").unwrap();
        let path = |p: &Path| p.display().to_string();
        let env = vec![
            ("RABBITMQ_NODENAME".to_string(), node.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS".to_string(), "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT".to_string(), port.to_string()),
            ("RABBITMQ_DIST_PORT".to_string(), dist_port.to_string()),
            (
                "RABBITMQ_MNESIA_BASE".to_string(),
                path(&base.join("mnesia")),
            ),
            ("RABBITMQ_LOG_BASE".to_string(), path(&base.join("log"))),
            (
                "RABBITMQ_PID_FILE".to_string(),
                path(&base.join("node.pid")),
            ),
            ("RABBITMQ_CONFIG_FILE".to_string(), path(&config)),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE".to_string(),
                path(&base.join("enabled_plugins")),
            ),
            (
                "RABBITMQ_CONF_ENV_FILE".to_string(),
                path(&base.join("rabbitmq-env.conf")),
            ),
        ];
        let node = Self {
            node,
            port,
            env,
            dir,
        };
        node.launch();
        node
    }

    /// The node name, for `rabbitmqctl -n`.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Its AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The default vhost (`/`) as `guest`.
    pub fn url(&self) -> String {
        amqp_url(SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)), "/")
    }

    /// Where the node writes its logs.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// Stops the RabbitMQ application (the Erlang node stays up): connections
    /// drop and new ones are refused, as when a broker goes down.
    pub fn stop_app(&self) {
        self.ctl(&["stop_app"]);
    }

    /// Starts the application again after [`ThrowawayNode::stop_app`] and waits
    /// until it serves AMQP.
    pub fn start_app(&self) {
        self.ctl(&["start_app"]);
        self.await_startup();
    }

    /// Stops the whole node (waiting until its process has exited) and starts it
    /// again on the same ports and data: durable queues and persistent messages
    /// survive, as in a real broker restart.
    pub fn restart(&self) {
        self.stop_node();
        self.launch();
    }

    /// Closes every client connection to the node.
    pub fn close_all_connections(&self, reason: &str) {
        self.ctl(&["close_all_connections", "--global", reason]);
    }

    /// `rabbitmqctl -n <node> <args>`; panics when it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.node];
        full.extend_from_slice(args);
        rabbitmqctl(&self.env, &full)
    }

    fn launch(&self) {
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run rabbitmq-server: {e}"));
        assert!(
            status.success(),
            "rabbitmq-server -detached failed: {status}"
        );
        self.await_startup();
    }

    /// Waits until the node runs RabbitMQ; `await_startup` fails at once while
    /// the Erlang node is not up yet, hence the loop.
    fn await_startup(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let output = try_rabbitmqctl(
                &self.env,
                &["-n", &self.node, "await_startup", "--timeout", "30"],
            );
            if output.status.success() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "RabbitMQ node {} did not start within 60 s: {}{}\n(logs in {})",
                    self.node,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr),
                    self.log_dir().display()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `rabbitmqctl stop <pid file>` returns once the OS process has exited, so
    /// the ports are free again.
    fn stop_node(&self) {
        let pid_file = self.dir.path().join("node.pid").display().to_string();
        let output = try_rabbitmqctl(&self.env, &["-n", &self.node, "stop", &pid_file]);
        if !output.status.success() {
            eprintln!(
                "stopping RabbitMQ node {}: {}",
                self.node,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

impl Drop for ThrowawayNode {
    fn drop(&mut self) {
        self.stop_node();
    }
}

/// A port nobody listens on right now (the OS picks it).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn make_world_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
}

// --- A plain AMQP client ----------------------------------------------------------

/// A connection and a confirm-mode channel, with blocking calls: what a test
/// uses to see the broker as any other client does. Closed on drop.
pub struct Amqp {
    runtime: tokio::runtime::Runtime,
    connection: Connection,
    channel: Channel,
}

/// How long a sink queue lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkLife {
    /// Deleted when this connection closes (also by `close_all_connections`).
    Exclusive,
    /// Deleted when its last consumer goes; survives connection closes.
    AutoDelete,
    /// Stays until deleted (or its vhost is); survives broker restarts.
    Durable,
}

/// A message to publish: persistent, `mandatory` (an unroutable one is reported).
#[derive(Debug, Clone, Default)]
pub struct Publish {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub message_id: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl Publish {
    pub fn new(exchange: &str, routing_key: &str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body: body.into(),
            ..Self::default()
        }
    }

    /// A JSON body with `content-type: application/json`.
    pub fn json(exchange: &str, routing_key: &str, body: &Value) -> Self {
        Self::new(exchange, routing_key, body.to_string()).content_type("application/json")
    }

    pub fn content_type(mut self, content_type: &str) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    pub fn message_id(mut self, id: &str) -> Self {
        self.message_id = Some(id.into());
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// What the broker said about a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// Stored in at least one queue.
    Routed,
    /// No queue was bound for it: returned and dropped.
    Unroutable,
    /// The broker refused it (e.g. a full queue with `reject-publish`).
    Nacked,
}

/// A message taken from a queue.
#[derive(Debug, Clone)]
pub struct Received {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub redelivered: bool,
    pub content_type: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    /// 2 for persistent.
    pub delivery_mode: Option<u8>,
    /// Header values as text: strings as they are, anything else (numbers,
    /// `x-death`'s tables) as JSON.
    pub headers: BTreeMap<String, String>,
}

impl Received {
    /// The body as JSON; panics when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "message on {:?} is not JSON ({e}): {}",
                self.routing_key,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A queue's state, from a passive declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    /// Messages ready for delivery (not counting unacknowledged ones).
    pub messages: u32,
    pub consumers: u32,
}

impl Amqp {
    /// Connects to `url`; an error when the broker refuses (or is down).
    pub fn connect(url: &str) -> lapin::Result<Self> {
        // One worker thread keeps lapin's I/O and heartbeats going between calls.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (connection, channel) = runtime.block_on(async {
            let connection = Connection::connect(url, ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            lapin::Result::Ok((connection, channel))
        })?;
        Ok(Self {
            runtime,
            connection,
            channel,
        })
    }

    fn block_on<T>(&self, what: &str, future: impl Future<Output = lapin::Result<T>>) -> T {
        self.runtime.block_on(async {
            match tokio::time::timeout(OPERATION_TIMEOUT, future).await {
                Ok(Ok(value)) => value,
                Ok(Err(e)) => panic!("{what}: {e}"),
                Err(_) => panic!("{what}: no answer from the broker within {OPERATION_TIMEOUT:?}"),
            }
        })
    }

    /// Whether the connection is still open (false once the broker closed it).
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Declares a durable exchange of `kind` (`"topic"`, `"direct"`, `"fanout"`,
    /// `"headers"`).
    pub fn declare_exchange(&self, name: &str, kind: &str) {
        let kind = match kind {
            "topic" => ExchangeKind::Topic,
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            other => ExchangeKind::Custom(other.into()),
        };
        self.block_on(
            &format!("declaring exchange {name}"),
            self.channel.exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        );
    }

    /// Declares a queue that collects what `exchange` routes with `pattern`, and
    /// returns its name. `name: None` lets the broker name it. The exchange must
    /// exist.
    pub fn declare_sink(
        &self,
        name: Option<&str>,
        life: SinkLife,
        exchange: &str,
        pattern: &str,
    ) -> String {
        let options = QueueDeclareOptions {
            durable: life == SinkLife::Durable,
            exclusive: life == SinkLife::Exclusive,
            auto_delete: life == SinkLife::AutoDelete,
            ..QueueDeclareOptions::default()
        };
        let what = format!("declaring a sink for {exchange} / {pattern}");
        let queue = self.block_on(
            &what,
            self.channel.queue_declare(
                name.unwrap_or_default().into(),
                options,
                FieldTable::default(),
            ),
        );
        let queue = queue.name().to_string();
        self.bind(&queue, exchange, pattern);
        queue
    }

    /// A broker-named exclusive sink: the common case.
    pub fn sink(&self, exchange: &str, pattern: &str) -> String {
        self.declare_sink(None, SinkLife::Exclusive, exchange, pattern)
    }

    /// Binds `queue` to `exchange` with `pattern`.
    pub fn bind(&self, queue: &str, exchange: &str, pattern: &str) {
        self.block_on(
            &format!("binding {queue} to {exchange} / {pattern}"),
            self.channel.queue_bind(
                queue.into(),
                exchange.into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        );
    }

    /// Publishes `message` and waits for the broker's confirm.
    pub fn publish(&self, message: &Publish) -> Confirmed {
        self.publish_all(std::slice::from_ref(message))[0]
    }

    /// Publishes every message, then waits for all the broker's confirms (one
    /// round trip's wait for the lot): what each one came to, in order.
    pub fn publish_all(&self, messages: &[Publish]) -> Vec<Confirmed> {
        let what = format!("publishing {} messages", messages.len());
        let confirmations = self.block_on(&what, async {
            let mut pending = Vec::with_capacity(messages.len());
            for message in messages {
                let confirm = self
                    .channel
                    .basic_publish(
                        message.exchange.as_str().into(),
                        message.routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &message.body,
                        properties(message),
                    )
                    .await?;
                pending.push(confirm);
            }
            let mut confirmations = Vec::with_capacity(pending.len());
            for confirm in pending {
                confirmations.push(confirm.await?);
            }
            Ok(confirmations)
        });
        confirmations
            .into_iter()
            .map(|confirmation| match confirmation {
                Confirmation::Ack(None) => Confirmed::Routed,
                Confirmation::Ack(Some(_)) => Confirmed::Unroutable,
                Confirmation::Nack(_) => Confirmed::Nacked,
                Confirmation::NotRequested => unreachable!("the channel is in confirm mode"),
            })
            .collect()
    }

    /// Takes (and acknowledges) messages from `queue` until there are `count`
    /// of them or `timeout` has passed; returns what it got, in queue order.
    pub fn get(&self, queue: &str, count: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut received = Vec::new();
        while received.len() < count {
            let got = self.block_on(
                &format!("basic.get on {queue}"),
                self.channel
                    .basic_get(queue.into(), BasicGetOptions { no_ack: false }),
            );
            match got {
                Some(message) => {
                    let delivery = message.delivery;
                    self.block_on(
                        &format!("acknowledging a message of {queue}"),
                        delivery.ack(BasicAckOptions::default()),
                    );
                    received.push(received_from(delivery));
                }
                None if Instant::now() >= deadline => break,
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        received
    }

    /// Depth and consumers of `queue`; `None` when it does not exist.
    pub fn queue_state(&self, queue: &str) -> Option<QueueState> {
        // A failed passive declare closes its channel: use a channel of its own.
        let what = format!("checking queue {queue}");
        self.runtime.block_on(async {
            let channel = match self.connection.create_channel().await {
                Ok(channel) => channel,
                Err(e) => panic!("{what}: {e}"),
            };
            let declared = tokio::time::timeout(
                OPERATION_TIMEOUT,
                channel.queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await;
            match declared {
                Ok(Ok(q)) => {
                    let _ = channel.close(200, "done".into()).await;
                    Some(QueueState {
                        messages: q.message_count(),
                        consumers: q.consumer_count(),
                    })
                }
                Ok(Err(e)) if is_not_found(&e) => None,
                Ok(Err(e)) => panic!("{what}: {e}"),
                Err(_) => panic!("{what}: no answer within {OPERATION_TIMEOUT:?}"),
            }
        })
    }

    /// Deletes `queue`; returns how many messages it held.
    pub fn delete_queue(&self, queue: &str) -> u32 {
        self.block_on(
            &format!("deleting queue {queue}"),
            self.channel
                .queue_delete(queue.into(), QueueDeleteOptions::default()),
        )
    }
}

impl Drop for Amqp {
    fn drop(&mut self) {
        let close = self.connection.close(200, "test done".into());
        let _ = self
            .runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), close).await });
    }
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(e)
            if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)
    )
}

/// A message's AMQP properties: persistent, with what [`Publish`] sets.
fn properties(message: &Publish) -> BasicProperties {
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(content_type) = &message.content_type {
        properties = properties.with_content_type(content_type.as_str().into());
    }
    if let Some(id) = &message.message_id {
        properties = properties.with_message_id(id.as_str().into());
    }
    if !message.headers.is_empty() {
        let mut headers = FieldTable::default();
        for (name, value) in &message.headers {
            headers.insert(
                name.as_str().into(),
                AMQPValue::LongString(value.as_str().into()),
            );
        }
        properties = properties.with_headers(headers);
    }
    properties
}

fn received_from(delivery: lapin::message::Delivery) -> Received {
    let properties = &delivery.properties;
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.to_string());
    let headers = properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .map(|(k, v)| {
                    let text = match json_of(v) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (k.to_string(), text)
                })
                .collect()
        })
        .unwrap_or_default();
    Received {
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
        redelivered: delivery.redelivered,
        content_type: text(properties.content_type()),
        message_id: text(properties.message_id()),
        correlation_id: text(properties.correlation_id()),
        delivery_mode: *properties.delivery_mode(),
        headers,
        body: delivery.data,
    }
}

/// An AMQP field value as JSON (byte strings as UTF-8, lossily).
fn json_of(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Float(f) => (*f).into(),
        AMQPValue::Double(f) => (*f).into(),
        AMQPValue::DecimalValue(d) => Value::String(format!("{}e-{}", d.value, d.scale)),
        AMQPValue::ShortString(s) => Value::String(s.to_string()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(json_of).collect()),
        AMQPValue::Timestamp(t) => (*t).into(),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), json_of(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::Void => Value::Null,
    }
}
