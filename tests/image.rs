//! The container image, built from `deploy/Dockerfile` by `make image` and run
//! with podman the way `deploy/README.md` and the Kubernetes manifests run it:
//! on the host network, against this machine's RabbitMQ (a vhost per test) and
//! Redis (a key prefix per test), as UID 10001 with a read-only root file
//! system, every capability dropped, and only the state volume and `/tmp`
//! writable.
//!
//! - It gets ready, runs the README demo (bill, then payment: `bill.paid` and
//!   `notification.email` on RabbitMQ, the bill's state in Redis), and loads a
//!   plugin dropped into its plugins folder.
//! - `podman stop` drains it while a service keeps publishing: it exits 0, and
//!   every event the broker confirmed is handled (by it, or by the next start).
//! - Bad input: a missing router.toml and a broken plugin refuse to start, with
//!   one line saying why; a wrong RabbitMQ password keeps `/readyz` at 503 with
//!   the reason in the log and the password nowhere.
//!
//! The image is built once per run of this file (`make image`; its layers and
//! cache mounts make a rebuild after a small change quick).
//! `SWITCHBOARD_TEST_IMAGE=<name>` tests an existing image instead. Without
//! podman the tests are skipped with a notice, unless `CI` is set: there they
//! fail.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard_tests::broker::{Amqp, Confirmed, Publish, TestVhost, free_port, require_broker};
use switchboard_tests::redis::{RedisNamespace, require_redis};
use switchboard_tests::wait_until;

/// What `make image` tags (its default `IMAGE`).
const IMAGE: &str = "switchboard:latest";

/// The admin token the containers get (ingress needs it).
const TOKEN: &str = "image-test-token-0123456789abcdef";

/// The drain the containers are given, and how long `podman stop` waits before
/// it kills: longer, as the Kubernetes manifests and Compose file have it.
const DRAIN: &str = "20s";
const STOP_GRACE_SECONDS: u64 = 45;

/// The consumer prefetch of `deploy/compose/router.toml`: at most this many
/// deliveries per plugin can be redelivered after a stop.
const PREFETCH: usize = 64;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Held by each test for its whole run: the containers share the machine's
/// cores with the broker, and each compiles the plugins when it starts.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

fn have(command: &str) -> bool {
    Command::new(command)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `podman <args>`, with runc as the OCI runtime when it is installed (crun
/// fails on hosts with hybrid cgroups).
fn podman(args: &[&str]) -> Output {
    static RUNC: OnceLock<bool> = OnceLock::new();
    let mut command = Command::new("podman");
    if *RUNC.get_or_init(|| have("runc")) {
        command.args(["--runtime", "runc"]);
    }
    command
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run podman: {e}"))
}

/// `podman <args>`, which must succeed; its stdout.
fn podman_ok(args: &[&str]) -> String {
    let output = podman(args);
    assert!(
        output.status.success(),
        "`podman {}` failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The image under test, built on first use; `None` (after a notice) when
/// podman is not installed and this is not CI.
fn image() -> Option<&'static str> {
    static BUILT: OnceLock<Result<String, String>> = OnceLock::new();
    if !have("podman") {
        let message = "podman is not installed; the image tests need it \
                       (apt-get install podman runc debootstrap)";
        assert!(!on_ci(), "{message}");
        let bar = "!".repeat(78);
        let _ = writeln!(
            std::io::stderr().lock(),
            "\n{bar}\nSKIPPED (no podman): {message}\n{bar}"
        );
        return None;
    }
    let built = BUILT.get_or_init(|| {
        if let Some(name) = std::env::var("SWITCHBOARD_TEST_IMAGE")
            .ok()
            .filter(|n| !n.trim().is_empty())
        {
            return Ok(name);
        }
        let started = Instant::now();
        let output = Command::new("make")
            .arg("-C")
            .arg(repo())
            .args(["--no-print-directory", "image", "ENGINE=podman"])
            .arg(format!("IMAGE={IMAGE}"))
            .output()
            .map_err(|e| format!("cannot run make: {e}"))?;
        if !output.status.success() {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "`make image` failed ({}):\n{}",
                output.status,
                tail.join("\n")
            ));
        }
        let _ = writeln!(
            std::io::stderr().lock(),
            "make image: {IMAGE} ready in {:.0?}",
            started.elapsed()
        );
        Ok(IMAGE.to_string())
    });
    match built {
        Ok(name) => Some(name.as_str()),
        Err(e) => panic!("{e}"),
    }
}

/// The seed plugins as the image ships them: (file name, bytes).
fn shipped_plugins(image: &str) -> &'static [(String, Vec<u8>)] {
    static PLUGINS: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    PLUGINS.get_or_init(|| {
        let dir = readable_dir();
        let name = unique("sbt-image-seed");
        let copied = podman(&[
            "run",
            "--rm",
            "--name",
            &name,
            "--network",
            "none",
            "--user",
            "0:0",
            "--volume",
            &format!("{}:/out", dir.path().display()),
            "--entrypoint",
            "cp",
            image,
            "-R",
            "/etc/switchboard/plugins/.",
            "/out/",
        ]);
        assert!(
            copied.status.success(),
            "cannot copy the image's plugins: {}",
            String::from_utf8_lossy(&copied.stderr)
        );
        let mut plugins: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| {
                let path = e.unwrap().path();
                let file = path.file_name().unwrap().to_string_lossy().into_owned();
                (file, std::fs::read(&path).unwrap())
            })
            .collect();
        plugins.sort();
        let names: Vec<&str> = plugins.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            names,
            [
                "analytics.wasm",
                "billing.wasm",
                "notification.wasm",
                "orders.wasm"
            ],
            "the image ships the four seed plugins"
        );
        plugins
    })
}

/// A name no other container, volume or test uses.
fn unique(label: &str) -> String {
    format!(
        "{label}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A folder the container's user (10001) can read: mounted as the plugins
/// folder or the configuration folder.
fn readable_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn write_readable(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    // Written aside and renamed in, as a deploy tool would: the watcher sees
    // one complete file.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes).unwrap();
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

/// `deploy/compose/router.toml` (the seed plugins on RabbitMQ with quorum
/// queues, plugin state in Redis) with the test's Redis key prefix, and
/// `extra` appended.
fn router_toml(kv_prefix: &str, extra: &str) -> String {
    let text = std::fs::read_to_string(repo().join("deploy/compose/router.toml")).unwrap();
    let mut section = String::new();
    let mut replaced = false;
    let mut out = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            section = trimmed.to_string();
        }
        if section == "[kv]" && trimmed.starts_with("prefix") {
            out.push_str(&format!("prefix = \"{kv_prefix}\"\n"));
            replaced = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(replaced, "deploy/compose/router.toml has a [kv] prefix");
    out.push_str(extra);
    out
}

/// One container's setup: the image's own plugins folder and configuration
/// unless replaced, a named state volume, the hardening of the Kubernetes
/// manifests.
struct Spec {
    env: Vec<(String, String)>,
    /// The folder mounted as /etc/switchboard/plugins.
    plugins: Option<PathBuf>,
    /// The folder mounted read-only as /etc/switchboard/config.
    config: Option<PathBuf>,
    /// The named volume at /var/lib/switchboard (made on first use).
    state: String,
    /// What follows the image name (the command and its arguments).
    args: Vec<String>,
}

impl Spec {
    fn new(state: &str) -> Self {
        Self {
            env: Vec::new(),
            plugins: None,
            config: None,
            state: state.to_string(),
            args: Vec::new(),
        }
    }

    fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// `run --config /etc/switchboard/config/router.toml --drain-timeout DRAIN`.
    fn run_mounted_config(mut self, config: &Path) -> Self {
        self.config = Some(config.to_path_buf());
        self.args = [
            "run",
            "--config",
            "/etc/switchboard/config/router.toml",
            "--drain-timeout",
            DRAIN,
        ]
        .map(String::from)
        .to_vec();
        self
    }
}

/// A container (and its state volume), removed on drop whatever happened.
struct Container {
    name: String,
    port: u16,
    agent: ureq::Agent,
}

impl Container {
    /// `podman run -d` with `spec`; listens on 127.0.0.1:<a free port>.
    fn start(label: &str, image: &str, spec: Spec) -> Self {
        let name = unique(&format!("sbt-image-{label}"));
        let port = free_port();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let container = Self {
            name: name.clone(),
            port,
            agent,
        };
        let mut args: Vec<String> = [
            "run",
            "--detach",
            "--name",
            &name,
            "--network",
            "host",
            // As deploy/k8s/deployment.yaml: UID and GID 10001, a read-only root
            // file system with the state volume and /tmp writable, every
            // capability dropped, no privilege escalation.
            "--user",
            "10001:10001",
            "--read-only",
            "--read-only-tmpfs=false",
            "--tmpfs",
            "/tmp:rw,size=64m",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--stop-signal",
            "SIGTERM",
        ]
        .map(String::from)
        .to_vec();
        args.push("--volume".into());
        args.push(format!("{}:/var/lib/switchboard", spec.state));
        if let Some(plugins) = &spec.plugins {
            args.push("--volume".into());
            args.push(format!("{}:/etc/switchboard/plugins", plugins.display()));
        }
        if let Some(config) = &spec.config {
            args.push("--volume".into());
            args.push(format!("{}:/etc/switchboard/config:ro", config.display()));
        }
        args.push("--env".into());
        args.push(format!("SWITCHBOARD_HTTP_LISTEN=127.0.0.1:{port}"));
        for (k, v) in &spec.env {
            args.push("--env".into());
            args.push(format!("{k}={v}"));
        }
        args.push(image.to_string());
        args.extend(spec.args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        podman_ok(&args);
        container
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The status of `GET path`, `None` when nothing answers.
    fn status(&self, path: &str) -> Option<u16> {
        self.agent
            .get(&self.url(path))
            .call()
            .ok()
            .map(|r| r.status().as_u16())
    }

    fn get_json(&self, path: &str) -> Value {
        let mut response = self.agent.get(&self.url(path)).call().unwrap();
        assert_eq!(response.status().as_u16(), 200, "GET {path}");
        serde_json::from_reader(response.body_mut().as_reader()).unwrap()
    }

    /// POSTs an event to the ingress, with the admin token; the status.
    fn post(&self, exchange: &str, key: &str, body: &Value) -> u16 {
        let mut response = self
            .agent
            .post(&self.url(&format!("/events/{exchange}/{key}")))
            .header("content-type", "application/json")
            .header("authorization", &format!("Bearer {TOKEN}"))
            .send(body.to_string())
            .unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        assert_eq!(status, 202, "POST {exchange}/{key}: {text}");
        status
    }

    /// The container's state: `running`, `exited`, ...
    fn state(&self) -> String {
        podman_ok(&["inspect", "--format", "{{.State.Status}}", &self.name])
            .trim()
            .to_string()
    }

    fn exit_code(&self) -> i32 {
        podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &self.name])
            .trim()
            .parse()
            .unwrap()
    }

    /// Everything it wrote, stdout and stderr.
    fn logs(&self) -> String {
        let output = podman(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// Waits until it has exited; its exit code.
    fn wait_exit(&self, timeout: Duration) -> i32 {
        wait_until(&format!("{} to exit", self.name), timeout, || {
            self.state() != "running"
        });
        self.exit_code()
    }

    /// Waits until `/readyz` answers 200.
    fn wait_ready(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        while self.status("/readyz") != Some(200) {
            assert!(
                Instant::now() < until && self.state() == "running",
                "{} did not get ready (state {}); its log:\n{}",
                self.name,
                self.state(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `podman exec <name> <args>`: (exit code, stdout and stderr).
    fn exec(&self, args: &[&str]) -> (i32, String) {
        let mut all = vec!["exec", self.name.as_str()];
        all.extend_from_slice(args);
        let output = podman(&all);
        (
            output.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    }

    /// `plugin`'s entry in `/api/plugins`.
    fn plugin(&self, plugin: &str) -> Value {
        let plugins = self.get_json("/api/plugins");
        plugins
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == plugin)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Removes the container, keeping its state volume (for a restart).
    fn remove(&self) {
        let _ = podman(&["rm", "--force", "--volumes", "--time", "0", &self.name]);
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A named volume, removed on drop (after the containers using it).
struct Volume(String);

impl Volume {
    fn new(label: &str) -> Self {
        Self(unique(&format!("sbt-image-{label}")))
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = podman(&["volume", "rm", "--force", &self.0]);
    }
}

/// Everything a test needs on the machine; `None` when a test should skip.
fn prerequisites() -> Option<&'static str> {
    let image = image()?;
    if !require_broker() || !require_redis() {
        return None;
    }
    Some(image)
}

/// A plugins folder holding the image's seed plugins.
fn seeded_plugins(image: &str) -> tempfile::TempDir {
    let dir = readable_dir();
    for (file, bytes) in shipped_plugins(image) {
        write_readable(&dir.path().join(file), bytes);
    }
    dir
}

/// A configuration folder holding `router_toml`.
fn config_dir(router_toml: &str) -> tempfile::TempDir {
    let dir = readable_dir();
    write_readable(&dir.path().join("router.toml"), router_toml.as_bytes());
    dir
}

/// The envelope of every message in `queue`, taken until `done` holds or
/// `timeout` passes.
fn collect(
    amqp: &Amqp,
    queue: &str,
    timeout: Duration,
    mut done: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let until = Instant::now() + timeout;
    let mut seen = Vec::new();
    while !done(&seen) && Instant::now() < until {
        for message in amqp.get(queue, 500, Duration::from_millis(200)) {
            seen.push(message.json());
        }
    }
    seen
}

#[test]
fn the_image_runs_the_demo_on_rabbitmq_and_redis_locked_down_and_hot_loads_plugins() {
    let _serial = serial();
    let Some(image) = prerequisites() else {
        return;
    };
    let vhost = TestVhost::new("image-demo");
    let redis = RedisNamespace::shared("image-demo");
    let state = Volume::new("demo-state");
    let plugins = seeded_plugins(image);
    // `mailer` is the notification component under another name, declared
    // with a route before its file is there: it loads when the file arrives.
    let config = config_dir(&router_toml(
        &redis.prefix,
        "\n[plugins.mailer]\n\n[[routes]]\nexchange = \"events\"\n\
         patterns = [\"ticket.purchased\"]\nplugin = \"mailer\"\n",
    ));
    let spec = Spec::new(&state.0)
        .env("RABBITMQ_URL", &vhost.url())
        .env("REDIS_URL", "redis://127.0.0.1:6379/0")
        .env("SWITCHBOARD_ADMIN_TOKEN", TOKEN)
        .run_mounted_config(config.path());
    let router = Container::start(
        "demo",
        image,
        Spec {
            plugins: Some(plugins.path().to_path_buf()),
            ..spec
        },
    );

    // Ready: connected to RabbitMQ with its topology declared.
    router.wait_ready(Duration::from_secs(120));
    assert_eq!(router.status("/healthz"), Some(200));
    assert_eq!(router.plugin("mailer")["status"], "missing");
    for plugin in ["billing", "notification", "analytics", "orders"] {
        assert_eq!(
            router.plugin(plugin)["status"],
            "serving",
            "{plugin}: {}",
            router.plugin(plugin)
        );
    }

    // Locked down as the Kubernetes manifests run it.
    assert_eq!(
        podman_ok(&[
            "inspect",
            "--format",
            "{{.HostConfig.ReadonlyRootfs}}",
            &router.name
        ])
        .trim(),
        "true"
    );
    let (_, status) = router.exec(&["cat", "/proc/1/status"]);
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no {name} in /proc/1/status:\n{status}"))
    };
    assert_eq!(field("Uid:"), ["10001"; 4], "the router runs as UID 10001");
    assert_eq!(field("Gid:"), ["10001"; 4], "the router runs as GID 10001");
    assert_eq!(field("CapEff:"), ["0000000000000000"], "no capabilities");
    let (_, comm) = router.exec(&["cat", "/proc/1/comm"]);
    assert_eq!(
        comm.trim(),
        "switchboard",
        "the router is the container's PID 1"
    );
    for path in [
        "/etc/switchboard/probe",
        "/usr/local/bin/probe",
        "/etc/switchboard/plugins/probe",
        "/etc/switchboard/config/probe",
        "/probe",
    ] {
        let (code, out) = router.exec(&["touch", path]);
        assert_ne!(code, 0, "{path} is writable: {out}");
    }
    for path in ["/var/lib/switchboard/probe", "/tmp/probe"] {
        let (code, out) = router.exec(&["touch", path]);
        assert_eq!(code, 0, "{path} is not writable: {out}");
        router.exec(&["rm", path]);
    }
    let (code, listing) = router.exec(&["ls", "-A", "/var/lib/switchboard"]);
    assert!(
        code == 0 && !listing.trim().is_empty(),
        "the router keeps its state in the volume: {listing}"
    );

    // The README demo: a bill, then its payment.
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    let sink = amqp.sink("events", "bill.paid");
    amqp.bind(&sink, "events", "notification.email");
    router.post(
        "events",
        "bill.created",
        &json!({"bill_id":"B-1","amount":42,"currency":"EUR",
                "customer":{"name":"Ann","email":"ann@example.com"}}),
    );
    router.post(
        "events",
        "payment.success",
        &json!({"bill_id":"B-1","payment_id":"P-1"}),
    );
    let has = |seen: &[Value], kind: &str| seen.iter().any(|m| m["type"] == kind);
    let seen = collect(&amqp, &sink, Duration::from_secs(60), |seen| {
        has(seen, "bill.paid") && has(seen, "notification.email")
    });
    let paid = seen
        .iter()
        .find(|m| m["type"] == "bill.paid")
        .unwrap_or_else(|| panic!("no bill.paid; got {seen:?}\n{}", router.logs()));
    assert_eq!(paid["source"], "billing");
    assert_eq!(paid["data"]["status"], "paid");
    assert_eq!(paid["data"]["payment_id"], "P-1");
    let email = seen
        .iter()
        .find(|m| m["type"] == "notification.email")
        .unwrap_or_else(|| panic!("no notification.email; got {seen:?}\n{}", router.logs()));
    assert_eq!(email["source"], "notification");
    assert_eq!(email["data"]["recipient"], "ann@example.com");
    assert_eq!(email["data"]["subject"], "Payment received for bill B-1");
    assert_eq!(email["causation_id"], paid["id"]);
    // Billing's state is in Redis, under the configured prefix.
    let bill = redis
        .get("billing", "bill:B-1")
        .expect("billing keeps bill:B-1 in Redis");
    let bill: Value = serde_json::from_slice(&bill).unwrap();
    assert_eq!(bill["status"], "paid", "{bill}");

    // Hot load: the mailer's file dropped into the mounted plugins folder.
    let notification = &shipped_plugins(image)
        .iter()
        .find(|(f, _)| f == "notification.wasm")
        .unwrap()
        .1;
    write_readable(&plugins.path().join("mailer.wasm"), notification);
    wait_until(
        "the dropped plugin to be serving",
        Duration::from_secs(60),
        || router.plugin("mailer")["status"] == "serving",
    );
    let mailer = router.plugin("mailer");
    assert_eq!(mailer["loads"], 1, "{mailer}");
    assert_eq!(
        mailer["content_hash"],
        router.plugin("notification")["content_hash"],
        "same component, same content hash"
    );
    router.post(
        "events",
        "ticket.purchased",
        &json!({"ticket_id":"T-1","event_name":"Gala","email":"bo@example.com"}),
    );
    let seen = collect(&amqp, &sink, Duration::from_secs(60), |seen| {
        seen.iter().any(|m| m["source"] == "mailer")
    });
    let from_mailer = seen
        .iter()
        .find(|m| m["source"] == "mailer")
        .unwrap_or_else(|| panic!("nothing from the hot-loaded plugin; got {seen:?}"));
    assert_eq!(from_mailer["type"], "notification.email");
    assert_eq!(from_mailer["data"]["recipient"], "bo@example.com");

    // Nothing failed on the way.
    let logs = router.logs();
    assert!(!logs.contains("ERROR"), "errors in the log:\n{logs}");
}

/// The `notification.email` outputs seen: how many per input (causation id),
/// and how many copies of each output id.
#[derive(Default)]
struct Outputs {
    by_cause: BTreeMap<String, usize>,
    by_id: BTreeMap<String, usize>,
}

impl Outputs {
    fn take(&mut self, amqp: &Amqp, queue: &str, wait: Duration) {
        for message in amqp.get(queue, 1000, wait) {
            let envelope = message.json();
            let cause = envelope["causation_id"].as_str().unwrap_or_default();
            *self.by_cause.entry(cause.to_string()).or_default() += 1;
            *self
                .by_id
                .entry(message.message_id.clone().unwrap_or_default())
                .or_default() += 1;
        }
    }
}

#[test]
fn podman_stop_drains_while_a_service_publishes_and_loses_nothing() {
    let _serial = serial();
    let Some(image) = prerequisites() else {
        return;
    };
    let vhost = TestVhost::new("image-drain");
    let redis = RedisNamespace::shared("image-drain");
    let state = Volume::new("drain-state");
    let config = config_dir(&router_toml(&redis.prefix, ""));
    let spec = || {
        Spec::new(&state.0)
            .env("RABBITMQ_URL", &vhost.url())
            .env("REDIS_URL", "redis://127.0.0.1:6379/0")
            .env("SWITCHBOARD_ADMIN_TOKEN", TOKEN)
            .run_mounted_config(config.path())
    };
    let first = Container::start("drain-1", image, spec());
    first.wait_ready(Duration::from_secs(120));

    // notification answers each order.created with one notification.email,
    // whose causation_id is the order event's id.
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    let sink = amqp.sink("events", "notification.email");

    // A service publishing with confirms until told to stop: what the broker
    // routed is published.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        let url = vhost.url();
        std::thread::spawn(move || {
            let service = Amqp::connect(&url).unwrap();
            let mut published = BTreeSet::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<(String, Publish)> = (0..10)
                    .map(|_| {
                        n += 1;
                        let id = format!("order-{n:06}");
                        let event = json!({
                            "id": id, "type": "order.created", "source": "shop",
                            "data": {"order_id": id, "total": 42, "email": "buyer@example.com"},
                        });
                        let message =
                            Publish::json("events", "order.created", &event).message_id(&id);
                        (id, message)
                    })
                    .collect();
                let messages: Vec<Publish> = batch.iter().map(|(_, m)| m.clone()).collect();
                for ((id, _), confirmed) in batch.iter().zip(service.publish_all(&messages)) {
                    if confirmed == Confirmed::Routed {
                        published.insert(id.clone());
                    }
                }
                std::thread::sleep(Duration::from_millis(40));
            }
            published
        })
    };

    // Handling under load, then the stop.
    let mut outputs = Outputs::default();
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        outputs.take(&amqp, &sink, Duration::from_millis(200));
        if outputs.by_cause.len() >= 300 {
            break;
        }
    }
    assert!(
        outputs.by_cause.len() >= 300,
        "only {} orders handled in a minute; log:\n{}",
        outputs.by_cause.len(),
        first.logs()
    );
    let stopping = Instant::now();
    podman_ok(&[
        "stop",
        "--time",
        &STOP_GRACE_SECONDS.to_string(),
        &first.name,
    ]);
    let took = stopping.elapsed();
    let code = first.wait_exit(Duration::from_secs(10));
    let logs = first.logs();
    assert_eq!(code, 0, "exit code after podman stop; log:\n{logs}");
    assert!(
        took < Duration::from_secs(STOP_GRACE_SECONDS),
        "the stop took {took:?}, the whole grace period: killed, not drained"
    );
    assert!(
        logs.contains("shutting down") && logs.contains("stopped"),
        "the router drained and said so:\n{logs}"
    );
    // The service goes on publishing a little while nothing consumes.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let published = publisher.join().unwrap();
    let handled_by_first = outputs.by_cause.len();
    first.remove();

    // The next start, on the same state volume, handles what was queued.
    let second = Container::start("drain-2", image, spec());
    second.wait_ready(Duration::from_secs(120));
    let until = Instant::now() + Duration::from_secs(120);
    while Instant::now() < until && !published.iter().all(|id| outputs.by_cause.contains_key(id)) {
        outputs.take(&amqp, &sink, Duration::from_millis(200));
    }
    // Late duplicates, if any, arrive in this time.
    outputs.take(&amqp, &sink, Duration::from_secs(1));

    let lost: Vec<&String> = published
        .iter()
        .filter(|id| !outputs.by_cause.contains_key(*id))
        .collect();
    let strangers = outputs
        .by_cause
        .keys()
        .filter(|id| !published.contains(*id))
        .count();
    let duplicates: usize = outputs.by_id.values().map(|n| n - 1).sum();
    let account = format!(
        "published {}, handled {} ({} before the stop in {took:.1?}), lost {}, duplicates {duplicates}",
        published.len(),
        published.len() - lost.len(),
        handled_by_first,
        lost.len()
    );
    let _ = writeln!(std::io::stderr().lock(), "ACCOUNT image drain: {account}");
    assert!(
        lost.is_empty(),
        "{account}; lost e.g. {:?}; second router's log:\n{}",
        &lost[..lost.len().min(10)],
        second.logs()
    );
    assert_eq!(
        strangers, 0,
        "outputs for orders nobody published: {account}"
    );
    assert!(duplicates <= PREFETCH, "{account}");
}

/// Runs `args` in a container of its own (no broker needed) and waits for it
/// to exit: (exit code, every line it wrote).
fn run_to_exit(label: &str, image: &str, config: Option<&Path>, args: &[&str]) -> (i32, String) {
    let state = Volume::new(label);
    let mut spec = Spec::new(&state.0);
    spec.config = config.map(Path::to_path_buf);
    spec.args = args.iter().map(|a| a.to_string()).collect();
    let container = Container::start(label, image, spec);
    let code = container.wait_exit(Duration::from_secs(60));
    (code, container.logs())
}

#[test]
fn a_missing_or_invalid_router_toml_refuses_to_start_saying_why() {
    let _serial = serial();
    let Some(image) = image() else {
        return;
    };
    // No file: one line naming it.
    let (code, logs) = run_to_exit(
        "missing-config",
        image,
        None,
        &["run", "--config", "/nope.toml"],
    );
    assert_ne!(code, 0, "{logs}");
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line says why:\n{logs}");
    assert!(
        lines[0].starts_with("switchboard: cannot read /nope.toml"),
        "the line names the file: {}",
        lines[0]
    );

    // A route to a plugin nobody declared: the file and the problem, nothing
    // started.
    let text = std::fs::read_to_string(repo().join("deploy/compose/router.toml"))
        .unwrap()
        .replacen("plugin = \"billing\"", "plugin = \"biling\"", 1);
    let config = config_dir(&text);
    let (code, logs) = run_to_exit(
        "invalid-config",
        image,
        Some(config.path()),
        &["run", "--config", "/etc/switchboard/config/router.toml"],
    );
    assert_ne!(code, 0, "{logs}");
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines[0].starts_with("switchboard: /etc/switchboard/config/router.toml is not valid"),
        "the first line names the file:\n{logs}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("routes[0].plugin: unknown plugin \"biling\"")),
        "a line names the problem:\n{logs}"
    );
    assert!(
        !logs.contains("switchboard is running"),
        "nothing started:\n{logs}"
    );
}

#[test]
fn a_broken_plugin_is_refused_by_check_and_by_run() {
    let _serial = serial();
    let Some(image) = prerequisites() else {
        return;
    };
    let vhost = TestVhost::new("image-broken");
    let redis = RedisNamespace::shared("image-broken");
    let state = Volume::new("broken-state");
    let plugins = seeded_plugins(image);
    write_readable(
        &plugins.path().join("billing.wasm"),
        b"this is not a WebAssembly component",
    );
    let config = config_dir(&router_toml(&redis.prefix, ""));
    let spec = || {
        let spec = Spec::new(&state.0)
            .env("RABBITMQ_URL", &vhost.url())
            .env("REDIS_URL", "redis://127.0.0.1:6379/0")
            .env("SWITCHBOARD_ADMIN_TOKEN", TOKEN)
            .env("SWITCHBOARD_CONFIG", "/etc/switchboard/config/router.toml")
            .run_mounted_config(config.path());
        Spec {
            plugins: Some(plugins.path().to_path_buf()),
            ..spec
        }
    };

    // `switchboard check`, as `kubectl exec` or a deploy pipeline runs it:
    // exit 1, one line for the problem.
    let mut check = spec();
    check.args = vec!["check".into()];
    let checked = Container::start("broken-check", image, check);
    let code = checked.wait_exit(Duration::from_secs(120));
    let logs = checked.logs();
    assert_eq!(code, 1, "{logs}");
    let problems: Vec<&str> = logs.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        problems,
        ["error: plugin \"billing\": not a WebAssembly file (it does not start with \"\\0asm\")"],
        "{logs}"
    );
    drop(checked);

    // `switchboard run` refuses to start: one line naming the plugin and why,
    // a non-zero exit, nothing served.
    let router = Container::start("broken-run", image, spec());
    let code = router.wait_exit(Duration::from_secs(120));
    let logs = router.logs();
    assert_ne!(code, 0, "{logs}");
    let last = logs
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or_default();
    assert!(
        last.starts_with("switchboard: plugin \"billing\"")
            && last.contains("not a WebAssembly file")
            && last.contains("not starting with a broken plugin"),
        "the last line names the plugin and why:\n{logs}"
    );
    assert!(
        !logs.contains("switchboard is running"),
        "nothing served:\n{logs}"
    );
}

#[test]
fn a_wrong_rabbitmq_password_keeps_it_unready_and_says_why_without_the_password() {
    let _serial = serial();
    let Some(image) = prerequisites() else {
        return;
    };
    let redis = RedisNamespace::shared("image-wrong-password");
    let state = Volume::new("wrong-password");
    let config = config_dir(&router_toml(&redis.prefix, ""));
    let password = format!("wrongpw{}", std::process::id());
    let spec = Spec::new(&state.0)
        .env(
            "RABBITMQ_URL",
            &format!("amqp://guest:{password}@127.0.0.1:5672/%2f"),
        )
        .env("REDIS_URL", "redis://127.0.0.1:6379/0")
        .env("SWITCHBOARD_ADMIN_TOKEN", TOKEN)
        .run_mounted_config(config.path());
    let router = Container::start("wrong-password", image, spec);
    wait_until("/healthz", Duration::from_secs(120), || {
        router.status("/healthz") == Some(200) || router.state() != "running"
    });
    assert_eq!(router.state(), "running", "{}", router.logs());
    // Not ready, for as long as the password is wrong.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        assert_eq!(router.status("/readyz"), Some(503), "{}", router.logs());
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut response = router.agent.get(&router.url("/readyz")).call().unwrap();
    let reason = response.body_mut().read_to_string().unwrap();
    assert!(
        reason.contains("authentication refused"),
        "/readyz says why: {reason}"
    );
    let logs = router.logs();
    assert!(
        logs.contains("authentication refused (check the user name and password)"),
        "the log says the broker refused the login:\n{logs}"
    );
    assert!(
        !reason.contains(&password),
        "the password is in /readyz: {reason}"
    );
    assert!(
        !logs.contains(&password),
        "the password is in the log:\n{logs}"
    );
}
