//! A real appliance, running: `router.toml` and plugin files in a temporary
//! folder, the HTTP interface on a free port, the watcher on — as `switchboard
//! run` has it, minus the process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use switchboard::appliance::{Appliance, PluginStatus};
use switchboard::config::RouterConfig;

use crate::wasm;

/// A running appliance; stopped (drained) on drop.
pub struct Running {
    pub appliance: Appliance,
    pub url: String,
    pub dir: PathBuf,
    agent: ureq::Agent,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<std::thread::JoinHandle<()>>,
    watcher: Option<switchboard::watch::Watcher>,
    _temp: Option<tempfile::TempDir>,
}

/// Writes `router_toml` into a new folder with `plugins/` holding copies of the
/// named components (`(file name, component)`), and starts the appliance there.
pub fn start(router_toml: &str, plugins: &[(&str, &str)]) -> Running {
    start_at(router_toml, plugins, "127.0.0.1:0")
}

/// [`start`], its HTTP server listening on `bind` (`0.0.0.0:0`: every
/// interface, a free port); `url` still names it by loopback.
pub fn start_at(router_toml: &str, plugins: &[(&str, &str)], bind: &str) -> Running {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    for (file, component) in plugins {
        std::fs::copy(wasm(component), dir.join("plugins").join(file)).unwrap();
    }
    std::fs::write(dir.join("router.toml"), router_toml).unwrap();
    let mut running = start_in_at(&dir, bind);
    running._temp = Some(temp);
    running
}

/// Starts the appliance on an existing folder (after `start` and `stop`).
pub fn start_in(dir: &Path) -> Running {
    start_in_at(dir, "127.0.0.1:0")
}

fn start_in_at(dir: &Path, bind: &str) -> Running {
    let config_path = dir.join("router.toml");
    let config = RouterConfig::load(&config_path).unwrap();
    let appliance = Appliance::start(config).unwrap();
    let watcher = switchboard::watch::start(appliance.clone(), &config_path).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(bind))
        .unwrap();
    let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = appliance.clone();
    let server = std::thread::spawn(move || {
        runtime
            .block_on(switchboard::cli::run::serve(served, listener, async {
                let _ = stopped.await;
            }))
            .unwrap();
    });
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    Running {
        appliance,
        url,
        dir: dir.to_path_buf(),
        agent,
        stop: Some(stop),
        server: Some(server),
        watcher: Some(watcher),
        _temp: None,
    }
}

impl Running {
    /// POSTs `body` as JSON to `/events/{exchange}/{key}`; (status, JSON reply).
    pub fn post(&self, exchange: &str, key: &str, body: &Value) -> (u16, Value, Option<String>) {
        let mut response = self
            .agent
            .post(&format!("{}/events/{exchange}/{key}", self.url))
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap();
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let text = response.body_mut().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            retry_after,
        )
    }

    /// Any request, with an optional bearer token and JSON body: (status, body
    /// as text, and the `www-authenticate` header if any).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, String) {
        let url = format!("{}{path}", self.url);
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut response = match (method, body) {
            ("GET", _) => {
                let mut request = self.agent.get(&url);
                if let Some(auth) = &auth {
                    request = request.header("authorization", auth);
                }
                request.call().unwrap()
            }
            ("POST", body) => {
                let mut request = self
                    .agent
                    .post(&url)
                    .header("content-type", "application/json");
                if let Some(auth) = &auth {
                    request = request.header("authorization", auth);
                }
                request
                    .send(body.map(Value::to_string).unwrap_or_default())
                    .unwrap()
            }
            ("DELETE", _) => {
                let mut request = self.agent.delete(&url);
                if let Some(auth) = &auth {
                    request = request.header("authorization", auth);
                }
                request.call().unwrap()
            }
            (other, _) => panic!("unsupported method {other}"),
        };
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    }

    /// GET a JSON endpoint.
    pub fn get(&self, path: &str) -> Value {
        let mut response = self
            .agent
            .get(&format!("{}{path}", self.url))
            .call()
            .unwrap();
        serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap()
    }

    /// Opens `/events/stream?...`; returns a reader of SSE `data:` lines.
    pub fn stream(&self, query: &str) -> impl Iterator<Item = Value> + use<> {
        let response = self
            .agent
            .get(&format!("{}/events/stream?{query}", self.url))
            .call()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let reader = BufReader::new(response.into_body().into_reader());
        reader.lines().map_while(Result::ok).filter_map(|line| {
            line.strip_prefix("data: ")
                .map(|d| serde_json::from_str(d).unwrap())
        })
    }

    /// The status of one plugin.
    pub fn status(&self, plugin: &str) -> PluginStatus {
        self.appliance
            .statuses()
            .into_iter()
            .find(|s| s.name == plugin)
            .unwrap()
    }

    /// Waits until `check` holds (up to 20 s).
    pub fn wait_for(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let until = Instant::now() + Duration::from_secs(20);
        while !check(self) {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until every queue is empty and nothing is in flight or waiting.
    pub fn wait_idle(&self) {
        self.wait_for("the bus to be idle", |r| {
            r.appliance
                .transport()
                .embedded()
                .is_some_and(|b| b.is_idle())
        });
    }

    /// Replaces router.toml (atomically, as editors do) .
    pub fn write_config(&self, text: &str) {
        let tmp = self.dir.join("router.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, self.dir.join("router.toml")).unwrap();
    }

    /// Replaces a plugin file (atomically) with `component`, or with `bytes`.
    pub fn write_plugin(&self, file: &str, bytes: &[u8]) {
        let tmp = self.dir.join("plugins").join(format!(".{file}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(tmp, self.dir.join("plugins").join(file)).unwrap();
    }

    /// Stops HTTP, drains (at most `deadline`) and stops the appliance; returns
    /// how many events were spooled. The folder is kept for `start_in`.
    pub fn stop(&mut self, deadline: Duration) -> usize {
        self.watcher.take();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.join().unwrap();
        }
        self.appliance.shutdown(deadline).unwrap()
    }
}

impl Running {
    /// Stops like [`Running::stop`], lets go of the appliance (and its state
    /// store), and hands back the folder for [`start_in`].
    pub fn stop_and_keep(mut self, deadline: Duration) -> (usize, tempfile::TempDir) {
        let spooled = self.stop(deadline);
        let temp = self._temp.take().unwrap();
        drop(self);
        (spooled, temp)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.server.is_some() {
            self.stop(Duration::from_secs(10));
        }
    }
}
