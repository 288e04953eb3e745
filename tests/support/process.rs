//! A router as its own process: `switchboard run` on a folder of its own, the
//! way a replica runs in production (each with its own state folder and HTTP
//! port, sharing the broker and the kv store).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::broker::free_port;
use crate::wasm;

/// A running `switchboard run`; stopped with SIGTERM (drained) on drop.
pub struct Replica {
    child: Option<Child>,
    /// Its HTTP interface, `http://127.0.0.1:<port>`.
    pub url: String,
    dir: tempfile::TempDir,
    port: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Replica {
    /// Writes `router_toml` and copies the named components (`(file name,
    /// component)`) into a new folder's `plugins/`, then starts the process
    /// there and waits until `/readyz` says it is ready.
    pub fn start(router_toml: &str, plugins: &[(&str, &str)]) -> Self {
        Self::start_with(router_toml, plugins, &[], &[])
    }

    /// [`Replica::start`] with extra arguments to `switchboard run` and extra
    /// environment variables.
    pub fn start_with(
        router_toml: &str,
        plugins: &[(&str, &str)],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let replica = Self::launch(router_toml, plugins, args, env);
        replica.wait_ready(Duration::from_secs(60));
        replica
    }

    /// [`Replica::start_with`] without waiting for anything: for a process
    /// that is not meant to get ready (say, its broker is unreachable). The
    /// environment has no `RABBITMQ_URL` or `REDIS_URL` but those in `env`.
    pub fn launch(
        router_toml: &str,
        plugins: &[(&str, &str)],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
        for (file, component) in plugins {
            std::fs::copy(wasm(component), dir.path().join("plugins").join(file)).unwrap();
        }
        std::fs::write(dir.path().join("router.toml"), router_toml).unwrap();
        let port = free_port();
        let mut replica = Self {
            child: None,
            url: format!("http://127.0.0.1:{port}"),
            dir,
            port,
            args: args.iter().map(ToString::to_string).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        };
        replica.spawn();
        replica
    }

    /// Starts `switchboard run` in this replica's folder, appending to its log.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(crate::target_dir().join("release/switchboard"))
            .arg("run")
            .arg("--config")
            .arg(self.dir.path().join("router.toml"))
            .args(&self.args)
            .env_remove("RABBITMQ_URL")
            .env_remove("REDIS_URL")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "SWITCHBOARD_HTTP_LISTEN",
                format!("127.0.0.1:{}", self.port),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The most memory the process has held so far (`VmHWM`, resident set
    /// high-water mark), in bytes; `None` once it has exited or off Linux.
    pub fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// The folder it runs in (`router.toml`, `plugins/`, `state/`, the log).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// `kill -9`: no drain, no goodbye to the broker.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again in the same folder, on the same port (after
    /// [`Replica::kill`] or [`Replica::stop`]), and waits until it is ready.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the replica first");
        self.spawn();
        self.wait_ready(Duration::from_secs(60));
    }

    /// Waits until `/healthz` answers (the process serves HTTP).
    pub fn wait_alive(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        while !self.is_healthy() {
            assert!(
                Instant::now() < until,
                "the replica never answered /healthz; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether `/healthz` answers 200 now.
    pub fn is_healthy(&self) -> bool {
        ureq::get(format!("{}/healthz", self.url))
            .call()
            .is_ok_and(|r| r.status() == 200)
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        ureq::get(format!("{}/readyz", self.url))
            .call()
            .is_ok_and(|r| r.status() == 200)
    }

    fn wait_ready(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        loop {
            if self.is_ready() {
                return;
            }
            assert!(
                Instant::now() < until,
                "the replica did not get ready; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET path` as JSON.
    pub fn get(&self, path: &str) -> Value {
        let mut response = ureq::get(format!("{}{path}", self.url)).call().unwrap();
        serde_json::from_reader(response.body_mut().as_reader()).unwrap()
    }

    /// `plugin`'s entry in `/api/plugins` (content hash, loads, status, ...).
    pub fn plugin(&self, plugin: &str) -> Value {
        let plugins = self.get("/api/plugins");
        let list = plugins.as_array().cloned().unwrap_or_default();
        list.into_iter()
            .find(|p| p["name"] == plugin)
            .unwrap_or(Value::Null)
    }

    /// What this process's workers did with `plugin`'s events (`/plugins`).
    pub fn dispatch(&self, plugin: &str) -> Value {
        let plugins = self.get("/plugins");
        let list = plugins.as_array().cloned().unwrap_or_default();
        list.into_iter()
            .find(|p| p["name"] == plugin)
            .map(|p| p["dispatch"].clone())
            .unwrap_or(Value::Null)
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("switchboard.log")
    }

    /// SIGTERM, then waits for the process to drain and exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::terminate(&mut child, Duration::from_secs(30));
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop();
    }
}
