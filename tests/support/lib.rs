//! Shared pieces of the end-to-end tests: where the built components are, a
//! runtime with a throwaway state folder, and events in the services' envelope.
//!
//! Components are built by `make test` (`cargo build --target wasm32-wasip2`)
//! before the suite runs; a missing one fails the test with that instruction.

pub mod account;
pub mod broker;
pub mod process;
pub mod redis;
pub mod running;

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use switchboard::envelope;
use switchboard::kv::EmbeddedStore;
use switchboard::runtime::{Event, Limits, Plugin, PluginSpec, Runtime, RuntimeConfig};

/// The workspace's target folder.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The release `switchboard` binary run as `switchboard <args…> --config
/// <dir>/router.toml` (with no `RABBITMQ_URL` from the environment: the
/// file says which bus): (exit code, stdout as JSON lines, stderr).
pub fn cli(dir: &std::path::Path, args: &[&str]) -> (i32, Vec<Value>, String) {
    let output = std::process::Command::new(target_dir().join("release/switchboard"))
        .args(args)
        .arg("--config")
        .arg(dir.join("router.toml"))
        .env_remove("RABBITMQ_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (
        output.status.code().unwrap_or(-1),
        lines,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Now, in milliseconds since the Unix epoch: the clock archived events and
/// plugin timestamps are read against.
pub fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Path of a built component, e.g. `wasm("billing")` or `wasm("scripted_guest")`.
pub fn wasm(name: &str) -> PathBuf {
    let path = target_dir()
        .join("wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the components first (`make test` does)",
        path.display()
    );
    path
}

/// Path of a plugin built from another language by `make lang-plugins` (which
/// `make test` runs), e.g. `lang_wasm("notification-py")`.
pub fn lang_wasm(name: &str) -> PathBuf {
    let path = target_dir().join("lang").join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build it first (`make lang-plugins`; `make test` does)",
        path.display()
    );
    path
}

/// A runtime and a state folder that lives as long as this value.
pub struct Harness {
    pub runtime: Runtime,
    pub kv: Arc<EmbeddedStore>,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub fn new() -> Self {
        Self::with_config(RuntimeConfig::default())
    }

    pub fn with_config(config: RuntimeConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(EmbeddedStore::open(&dir.path().join("kv.redb")).unwrap());
        let runtime = Runtime::new(config).unwrap();
        Self { runtime, kv, dir }
    }

    pub fn spec(&self, name: &str, component: &str) -> PluginSpec {
        PluginSpec::from_file(name, &wasm(component), self.kv.clone()).unwrap()
    }

    /// Loads `component` as plugin `name` with `config` and `limits`.
    pub fn load(
        &self,
        name: &str,
        component: &str,
        config: &[(&str, &str)],
        limits: Limits,
    ) -> Plugin {
        let mut spec = self.spec(name, component);
        spec.config = config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        spec.limits = limits;
        self.runtime.load(spec).unwrap().0
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

/// An event as services publish it: `{id, type, source, timestamp, tenant_id,
/// correlation_id, data}`.
pub fn event(id: &str, kind: &str, data: Value) -> Event {
    let envelope = serde_json::json!({
        "id": id, "type": kind, "source": "test-service",
        "timestamp": "2026-11-22T10:00:00.000Z", "tenant_id": "acme",
        "correlation_id": "flow-1", "data": data,
    });
    envelope::decode_recorded("events", envelope.to_string().as_bytes(), None).unwrap()
}

/// The JSON data of an output.
pub fn data(output: &switchboard::runtime::Output) -> Value {
    serde_json::from_slice(&output.data).unwrap()
}

/// Asks `child` to stop as a service manager would (SIGTERM), waits up to
/// `grace` for it to exit, then kills it.
pub fn terminate(child: &mut std::process::Child, grace: std::time::Duration) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let until = std::time::Instant::now() + grace;
    while child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `component` with a custom section appended: the same code, other bytes (a
/// new content hash, so a new version to the watcher and the cache).
pub fn with_custom_section(component: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut content = Vec::new();
    leb128(name.len(), &mut content);
    content.extend_from_slice(name.as_bytes());
    content.extend_from_slice(payload);
    let mut bytes = component.to_vec();
    bytes.push(0); // custom section id
    leb128(content.len(), &mut bytes);
    bytes.extend_from_slice(&content);
    bytes
}

/// Waits until `check` holds, polling every 50 ms; fails naming `what` after
/// `timeout`.
pub fn wait_until(what: &str, timeout: std::time::Duration, mut check: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + timeout;
    while !check() {
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
