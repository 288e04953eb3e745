//! Redis for the tests: the shared server at 127.0.0.1:6379 (each test under a
//! key prefix of its own, removed afterwards), and throwaway servers on their
//! own ports for the tests that stop one. The shared server is never stopped.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use switchboard::config::Secret;
use switchboard::kv::{KvStore, RedisSettings, RedisStore};

use crate::broker::{free_port, on_ci};

const SHARED: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 6379);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Whether the shared Redis accepts connections; as
/// [`require_broker`](crate::broker::require_broker): skipped with a visible
/// notice locally, a failure in CI.
pub fn require_redis() -> bool {
    if TcpStream::connect_timeout(&SHARED, Duration::from_secs(2)).is_ok() {
        return true;
    }
    let message = "Redis is not reachable at 127.0.0.1:6379; start it with \
                   `redis-server --daemonize yes`";
    if on_ci() {
        panic!("{message}");
    }
    let bar = "!".repeat(78);
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n{bar}\nSKIPPED (no Redis): {message}\n{bar}"
    );
    false
}

/// A key prefix of the shared Redis for one test: what the routers under test
/// are configured with, a store to look at their state, and cleanup on drop.
pub struct RedisNamespace {
    pub url: String,
    pub prefix: String,
    store: RedisStore,
}

impl RedisNamespace {
    /// A fresh prefix on the server at `url`.
    pub fn new(url: &str, label: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("sbt-{label}-{}-{n}", std::process::id());
        let store = RedisStore::new(&RedisSettings {
            url: Secret::new(url),
            prefix: prefix.clone(),
            pool_size: 4,
            timeout: Duration::from_secs(5),
        })
        .unwrap();
        Self {
            url: url.to_string(),
            prefix,
            store,
        }
    }

    /// On the shared server.
    pub fn shared(label: &str) -> Self {
        Self::new("redis://127.0.0.1:6379/0", label)
    }

    /// The `[kv]` table that points a router at this namespace.
    pub fn kv_table(&self, timeout: &str) -> String {
        format!(
            "[kv]\nbackend = \"redis\"\nurl = \"{}\"\nprefix = \"{}\"\ntimeout = \"{timeout}\"\n",
            self.url, self.prefix
        )
    }

    /// `plugin`'s value under `key`. A pooled connection that a Redis restart
    /// closed fails once (and is dropped), so this asks up to five times.
    pub fn get(&self, plugin: &str, key: &str) -> Option<Vec<u8>> {
        let mut last = None;
        for _ in 0..5 {
            match self.store.get(plugin, key) {
                Ok(value) => return value,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("cannot read {plugin}/{key}: {last:?}");
    }
}

impl Drop for RedisNamespace {
    fn drop(&mut self) {
        // Best effort: the server may be a throwaway one, already stopped.
        let _ = self.store.remove_all();
    }
}

/// A `redis-server` of the test's own, on its own port, persisting every write
/// (append-only file, fsync always) in a temporary folder, so that it can be
/// stopped and started again without losing what the routers stored.
pub struct ThrowawayRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ThrowawayRedis {
    /// Starts it and waits until it answers.
    pub fn start() -> Self {
        let mut redis = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        redis.launch();
        redis
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (Debian package redis-server)");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_err() {
            assert!(Instant::now() < until, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGTERM: it finishes the append-only file and exits)
    /// and waits until it has.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::terminate(&mut child, Duration::from_secs(30));
        }
    }

    /// Starts it after [`ThrowawayRedis::stop`].
    pub fn start_again(&mut self) {
        self.launch();
    }
}

impl Drop for ThrowawayRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
