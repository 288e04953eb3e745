//! `switchboard run` as a process: SIGTERM stops it after the events it had
//! accepted are handled, and it exits 0.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

use switchboard::kv::{EmbeddedStore, KvStore};

const EVENTS: usize = 200;

fn scripted_wasm() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm32-wasip2/release/scripted_guest.wasm");
    assert!(
        path.exists(),
        "{} is missing: run `make guests` first",
        path.display()
    );
    path
}

/// `switchboard run --config <config>` at info level, its log read until the
/// line saying where it listens: the process, the rest of its log, the log so
/// far, and the address.
#[cfg(test)]
fn run_until_listening(config: &Path) -> (Child, BufReader<ChildStderr>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["run", "--config"])
        .arg(config)
        .env("SWITCHBOARD_LOG", "info")
        .env_remove("RABBITMQ_URL")
        .env_remove("RABBITMQ_HOST")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let address = loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "exited early:\n{log}"
        );
        log.push_str(&line);
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest.trim().to_string();
        }
    };
    (child, stderr, log, address)
}

#[test]
fn sigterm_drains_accepted_events_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::copy(scripted_wasm(), dir.path().join("plugins/worker.wasm")).unwrap();
    std::fs::write(
        dir.path().join("router.toml"),
        "plugins_dir = \"plugins\"\nstate_dir = \"state\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
         [defaults]\nconcurrency = 1\n[[exchanges]]\nname = \"events\"\n[plugins.worker]\n\
         [[routes]]\nexchange = \"events\"\npattern = \"sleep\"\nplugin = \"worker\"\n",
    )
    .unwrap();
    let (mut child, mut stderr, mut log, address) =
        run_until_listening(&dir.path().join("router.toml"));

    // 200 events of 5 ms each on one worker: about a second of work, most of it
    // still queued when the signal arrives (posting takes far less).
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    for i in 0..EVENTS {
        let body = format!(r#"{{"id":"e{i}","type":"sleep","data":{{"ms":5,"record":"e{i}"}}}}"#);
        let response = agent
            .post(&format!("http://{address}/events/events/sleep"))
            .header("content-type", "application/json")
            .send(body)
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
    }
    let plugins = agent
        .get(&format!("http://{address}/plugins"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        !plugins.contains("\"depth\":0,"),
        "a backlog must be waiting: {plugins}"
    );
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    log.push_str(&rest);
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(log.contains("stopped"), "{log}");

    // Every accepted event was handled before the process exited.
    let store = EmbeddedStore::open(&dir.path().join("state/kv.redb")).unwrap();
    let missing: Vec<usize> = (0..EVENTS)
        .filter(|i| store.get("worker", &format!("e{i}")).unwrap().is_none())
        .collect();
    assert!(missing.is_empty(), "events lost: {missing:?}");
    assert!(
        !dir.path().join("state/spool.jsonl").exists(),
        "nothing was left to spool"
    );
}

/// A plugin whose file is there but does not load stops the start: one line
/// names the plugin and why, the exit status is not 0, and nothing is served.
/// A plugin whose file is not there yet does not: it is waited for.
#[test]
fn a_broken_plugin_refuses_the_start_and_a_missing_one_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::copy(scripted_wasm(), dir.path().join("plugins/worker.wasm")).unwrap();
    std::fs::write(dir.path().join("plugins/broken.wasm"), b"not a component").unwrap();
    let config = |plugins: &str| {
        format!(
            "plugins_dir = \"plugins\"\nstate_dir = \"state\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [[exchanges]]\nname = \"events\"\n{plugins}\
             [[routes]]\nexchange = \"events\"\npattern = \"#\"\nplugin = \"worker\"\n"
        )
    };
    std::fs::write(
        dir.path().join("router.toml"),
        config("[plugins.worker]\n[plugins.broken]\n"),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["run", "--config"])
        .arg(dir.path().join("router.toml"))
        .env_remove("RABBITMQ_URL")
        .env_remove("RABBITMQ_HOST")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let last = stderr
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or_default();
    assert!(
        last.starts_with("switchboard: plugin \"broken\": not a WebAssembly file")
            && last.contains("not starting with a broken plugin"),
        "{stderr}"
    );
    assert!(!stderr.contains("switchboard is running"), "{stderr}");

    // Declared but not there yet: it starts, and waits for the file.
    std::fs::write(
        dir.path().join("router.toml"),
        config("[plugins.worker]\n[plugins.later]\n"),
    )
    .unwrap();
    let (mut child, _stderr, log, _) = run_until_listening(&dir.path().join("router.toml"));
    assert!(log.contains("waiting for it"), "{log}");
    child.kill().unwrap();
    child.wait().unwrap();
}
