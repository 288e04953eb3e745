//! `switchboard run` as its own process, the way a user runs it: a folder with
//! its `router.toml`, a log file, the HTTP interface on a free port, ready when
//! `/readyz` answers 200, stopped with SIGTERM. The benchmarks that measure the
//! whole appliance (`broker`, `appliance`, `growth`) start it through here.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The `switchboard` binary: `path` if given, else target/release/switchboard.
pub(crate) fn binary(path: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match path {
        Some(path) => path.to_path_buf(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/switchboard"),
    };
    if !path.exists() {
        bail!(
            "{} is missing: `cargo build --release -p switchboard` first",
            path.display()
        );
    }
    Ok(path)
}

/// `127.0.0.1:<port>`, a port free right now.
pub(crate) fn free_listen() -> anyhow::Result<String> {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    Ok(format!("127.0.0.1:{port}"))
}

/// `binary run --config <config>`, its output appended to `log`. The variables
/// that override the file come from `env` only, never from this shell.
pub(crate) fn spawn(
    binary: &Path,
    config: &Path,
    log: &Path,
    env: &[(&str, &str)],
) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut command = Command::new(binary);
    command
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdout(log.try_clone()?)
        .stderr(log);
    for var in [
        "RABBITMQ_URL",
        "RABBITMQ_HOST",
        "RABBITMQ_PORT",
        "RABBITMQ_USER",
        "RABBITMQ_PASSWORD",
        "RABBITMQ_VHOST",
        "REDIS_URL",
        "REDIS_BUS_URL",
        "SWITCHBOARD_HTTP_LISTEN",
        "SWITCHBOARD_ADMIN_TOKEN",
    ] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    command.spawn().context("starting switchboard run")
}

/// Polls `/readyz` on `listen` every millisecond until it answers 200.
pub(crate) fn wait_ready(child: &mut Child, listen: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("switchboard run exited before it was ready ({status})");
        }
        if http_status(listen, "/readyz").ok() == Some(200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("/readyz did not answer 200 within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// SIGTERM, then up to 30 s for a clean exit (SIGKILL after that).
pub(crate) fn terminate(child: &mut Child) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("kill -TERM {} failed", child.id());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return if status.success() {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "switchboard run exited with {status} on SIGTERM"
                ))
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    bail!("switchboard run did not exit within 30 s of SIGTERM")
}

/// The status code of `GET path` on `addr`.
fn http_status(addr: &str, path: &str) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    // "HTTP/1.1 200"
    Ok(std::str::from_utf8(&head[9..12])?.parse()?)
}

/// The last lines of a log, on one line, for an error message.
pub(crate) fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" ⏎ ")
}

/// Time a process's threads have spent on a CPU and waiting for one, so far,
/// each summed over its threads (`/proc/<pid>/task/*/schedstat`; threads that
/// have ended are not counted). On shared cores, the waiting says how much
/// other processes held them up.
pub(crate) struct CpuTime {
    pub(crate) running: Duration,
    pub(crate) waiting: Duration,
}

impl CpuTime {
    fn of(pid: u32) -> anyhow::Result<Self> {
        let mut ns = [0u64; 2];
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            // A thread may end between the listing and the read.
            let Ok(text) = std::fs::read_to_string(task?.path().join("schedstat")) else {
                continue;
            };
            for (total, field) in ns.iter_mut().zip(text.split_whitespace()) {
                *total += field.parse::<u64>()?;
            }
        }
        Ok(Self {
            running: Duration::from_nanos(ns[0]),
            waiting: Duration::from_nanos(ns[1]),
        })
    }
}

/// A `switchboard run` in a folder of its own (`router.toml` there, the log
/// beside it), started and ready; killed if dropped while running.
pub(crate) struct Running {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub(crate) url: String,
    log: PathBuf,
    /// From spawning the process to `/readyz` answering 200.
    pub(crate) ready_after: Duration,
    /// Its threads' time on and waiting for a CPU until then.
    pub(crate) ready_cpu: CpuTime,
}

impl Running {
    /// Starts `binary` on `dir/router.toml` with a free HTTP port (through
    /// `SWITCHBOARD_HTTP_LISTEN`) and `env`, and waits until it is ready.
    pub(crate) fn start(binary: &Path, dir: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let listen = free_listen()?;
        let log = dir.join("switchboard.log");
        let mut env = env.to_vec();
        env.push(("SWITCHBOARD_HTTP_LISTEN", &listen));
        let started = Instant::now();
        let mut child = spawn(binary, &dir.join("router.toml"), &log, &env)?;
        let ready = wait_ready(&mut child, &listen, Duration::from_secs(60))
            .and_then(|()| Ok((started.elapsed(), CpuTime::of(child.id())?)));
        let (ready_after, ready_cpu) = match ready {
            Ok(ready) => ready,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{e:#}; its log ends: {}", log_tail(&log));
            }
        };
        Ok(Self {
            ready_after,
            ready_cpu,
            child,
            url: format!("http://{listen}"),
            log,
        })
    }

    /// Resident memory now (`VmRSS`), in bytes.
    pub(crate) fn rss(&self) -> anyhow::Result<u64> {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .context("no VmRSS in /proc/<pid>/status")?
            .parse()?;
        Ok(kib * 1024)
    }

    /// What its log ends with, for an error message.
    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// SIGTERM and a clean exit (queued events finish first).
    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        terminate(&mut self.child)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
