//! Security checks, end to end: secrets stay out of logs, error messages,
//! `switchboard check` and the HTTP API; plugins get no host files,
//! environment or network in a real process; the compiled-plugin cache loads
//! no machine code it did not write.
//!
//! Covered elsewhere, and not repeated here:
//! - the admin token guarding ingress and every POST, `protect_reads`, probes
//!   left open, rotation on reload: `tests/operations.rs`
//!   (`the_admin_api_answers_and_the_token_guards_it`); the token from
//!   `SWITCHBOARD_ADMIN_TOKEN`, its minimum length and the shipped placeholder
//!   refused: `host/src/config/tests.rs`, `tests/deploy.rs`;
//! - `Secret`'s redaction and scrubbing (`host/src/config/secret.rs`), the
//!   broker password in config errors and `Debug` (`host/src/config/tests.rs`),
//!   in `switchboard dlq` errors (`tests/rabbit_faults.rs`), the Redis password
//!   in `check` and in kv errors (`host/src/cli/check.rs`,
//!   `host/src/kv/redis.rs`);
//! - files, environment, sockets and clocks denied at the runtime level, and
//!   limits on time, memory, stack, outputs and logs: `tests/hostile_plugins.rs`;
//! - tampered cache artifacts: `tests/plugin_loading.rs`
//!   (`compiled_artifacts_are_cached_and_checked`) and the unit tests of
//!   `host/src/runtime/cache.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard::runtime::{CacheOutcome, RuntimeConfig};
use switchboard_tests::broker::free_port;
use switchboard_tests::process::Replica;
use switchboard_tests::{Harness, event, wait_until};

const BROKER_PASSWORD: &str = "Br0ker-pw-7f3a9c";
const REDIS_PASSWORD: &str = "R3dis-pw-2b8e41";
const ADMIN_TOKEN: &str = "admin-token-5d1c0e9a7b3f4e21";
/// In the router's environment, where no plugin may read it.
const PLUGIN_SECRET: &str = "env-secret-93ad5e7c";

/// Fails if `text` (what `what` shows) holds any of the secrets.
fn assert_hidden(what: &str, text: &str) {
    for secret in [BROKER_PASSWORD, REDIS_PASSWORD, ADMIN_TOKEN, PLUGIN_SECRET] {
        assert!(
            !text.contains(secret),
            "{what} shows the secret {secret:?}:\n{text}"
        );
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// `method path` on `replica` with an optional bearer token and JSON body:
/// (status, body). Every answer is checked for secrets.
fn call(
    replica: &Replica,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let url = format!("{}{path}", replica.url);
    let agent = agent();
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut response = match method {
        "GET" => {
            let mut request = agent.get(&url);
            if let Some(auth) = &auth {
                request = request.header("authorization", auth);
            }
            request.call()
        }
        _ => {
            let mut request = agent.post(&url).header("content-type", "application/json");
            if let Some(auth) = &auth {
                request = request.header("authorization", auth);
            }
            request.send(body.unwrap_or(json!({})).to_string())
        }
    }
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    assert_hidden(&format!("{method} {path} ({status})"), &text);
    (status, text)
}

/// `switchboard check` on `replica`'s router.toml with `env`: (exit code,
/// stdout + stderr). It must finish within a minute: it once deadlocked when
/// plugins were compiled with debug logging on.
fn check(replica: &Replica, env: &[(&str, &str)]) -> (i32, String) {
    let out = tempfile::tempdir().unwrap();
    let file = |name: &str| std::fs::File::create(out.path().join(name)).unwrap();
    let mut child = Command::new(switchboard_tests::target_dir().join("release/switchboard"))
        .arg("check")
        .arg("--config")
        .arg(replica.dir().join("router.toml"))
        .env_remove("RABBITMQ_URL")
        .env_remove("REDIS_URL")
        .envs(env.iter().copied())
        .stdout(file("stdout"))
        .stderr(file("stderr"))
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("switchboard check did not finish within a minute");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |name: &str| std::fs::read_to_string(out.path().join(name)).unwrap_or_default();
    (
        status.code().unwrap_or(-1),
        format!("{}{}", read("stdout"), read("stderr")),
    )
}

/// A router whose broker (a dead port) and Redis both have passwords, with an
/// admin token from the environment, logging at debug level: none of the three
/// shows in its log, in its HTTP answers or in what `switchboard check` prints,
/// while it fails and retries.
#[test]
fn broker_and_redis_passwords_and_the_admin_token_never_show() {
    let dead = free_port();
    let broker_url = format!("amqp://app:{BROKER_PASSWORD}@127.0.0.1:{dead}/%2f");
    let router_toml = format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[broker]
timeout = "1s"
[kv]
backend = "redis"
url = "redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"
[[exchanges]]
name = "events"
[plugins.worker]
[[routes]]
exchange = "events"
pattern = "#"
plugin = "worker"
"##
    );
    let env = [
        ("RABBITMQ_URL", broker_url.as_str()),
        ("SWITCHBOARD_ADMIN_TOKEN", ADMIN_TOKEN),
        ("SWITCHBOARD_LOG", "debug"),
    ];
    let mut replica = Replica::launch(
        &router_toml,
        &[("worker.wasm", "scripted_guest")],
        &[],
        &env,
    );
    replica.wait_alive(Duration::from_secs(60));
    // Let it fail to connect a few times (100 ms, 200 ms, 400 ms, … apart).
    wait_until("a few failed connections", Duration::from_secs(20), || {
        replica.log().matches("broker connection failed").count() >= 3
    });

    let (status, ready) = call(&replica, "GET", "/readyz", None, None);
    assert_eq!(status, 503, "{ready}");
    assert!(
        ready.contains("amqp://***@127.0.0.1"),
        "the broker is named, redacted: {ready}"
    );
    for path in [
        "/healthz",
        "/plugins",
        "/metrics",
        "/api/plugins",
        "/api/routes",
        "/dlq/worker",
        "/api/dlq/worker",
    ] {
        call(&replica, "GET", path, None, None);
    }
    let event = json!({"id": "e1", "type": "ok", "data": {}});
    for token in [None, Some("wrong-token-wrong-token-wrong")] {
        let (status, body) = call(
            &replica,
            "POST",
            "/events/events/ok",
            token,
            Some(event.clone()),
        );
        assert_eq!(status, 401, "{body}");
    }
    // With the token: the broker cannot take it, and says so without the URL's secrets.
    let (status, body) = call(
        &replica,
        "POST",
        "/events/events/ok",
        Some(ADMIN_TOKEN),
        Some(event),
    );
    assert_eq!(status, 503, "{body}");
    call(
        &replica,
        "POST",
        "/api/plugins/worker/reload",
        Some(ADMIN_TOKEN),
        None,
    );
    call(
        &replica,
        "POST",
        "/dlq/worker/redrive",
        Some(ADMIN_TOKEN),
        None,
    );

    let (code, checked) = check(&replica, &env);
    assert_hidden("switchboard check", &checked);
    assert!(checked.contains("amqp://***@127.0.0.1"), "{checked}");
    assert!(
        checked.contains("redis://***@127.0.0.1:6379/0"),
        "{checked}"
    );
    assert_eq!(code, 0, "{checked}");

    replica.stop();
    let log = replica.log();
    assert_hidden("the router's log", &log);
    assert!(
        log.contains("amqp://***@127.0.0.1"),
        "the log names the broker, redacted:\n{log}"
    );
    assert!(log.contains("stopped"), "{log}");
}

/// A real process with a secret in its environment and Redis behind a
/// password: a plugin that tries to read a host file, its environment or a
/// socket is refused each time, and nothing it could reach shows anywhere.
#[test]
fn plugins_in_a_real_process_get_no_host_files_environment_or_network() {
    let router_toml = format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[defaults]
max_attempts = 1
[kv]
backend = "redis"
url = "redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"
timeout = "1s"
[[exchanges]]
name = "events"
[plugins.worker]
[[routes]]
exchange = "events"
pattern = "#"
plugin = "worker"
"##
    );
    let env = [
        ("SWITCHBOARD_ADMIN_TOKEN", ADMIN_TOKEN),
        ("SWITCHBOARD_TEST_SECRET", PLUGIN_SECRET),
        ("HOME", "/root"),
    ];
    let mut replica = Replica::start_with(
        &router_toml,
        &[("worker.wasm", "scripted_guest")],
        &[],
        &env,
    );
    let kinds = ["read-file", "read-env", "socket", "kv"];
    for kind in kinds {
        let data = if kind == "kv" {
            json!({"op": "set", "key": "k", "value": "v"})
        } else {
            json!({})
        };
        let body = json!({"id": format!("try-{kind}"), "type": kind, "data": data});
        let (status, reply) = call(
            &replica,
            "POST",
            &format!("/events/events/{kind}"),
            Some(ADMIN_TOKEN),
            Some(body),
        );
        assert_eq!(status, 202, "{reply}");
    }
    let letters = || -> Vec<Value> {
        let (_, text) = call(&replica, "GET", "/dlq/worker", None, None);
        serde_json::from_str(&text).unwrap_or_default()
    };
    wait_until("four dead letters", Duration::from_secs(20), || {
        letters().len() == 4
    });
    let letters = letters();
    let reason = |id: &str| -> (String, String) {
        let letter = letters
            .iter()
            .find(|l| l.to_string().contains(id))
            .unwrap_or_else(|| panic!("no letter for {id}: {letters:?}"));
        (
            letter["kind"].as_str().unwrap_or("").to_string(),
            letter["reason"].as_str().unwrap_or("").to_string(),
        )
    };
    for kind in ["read-file", "read-env", "socket"] {
        let (failure, why) = reason(&format!("try-{kind}"));
        assert_eq!(failure, "reject", "{kind}: {why}");
        assert!(why.starts_with("denied"), "{kind}: {why}");
    }
    let (failure, why) = reason("try-kv");
    assert_eq!(failure, "kv_unavailable", "{why}");
    let (_, api) = call(&replica, "GET", "/api/dlq/worker", None, None);
    assert!(!api.contains("root:x:0:0"), "{api}");
    call(&replica, "GET", "/metrics", None, None);

    let (_, checked) = check(&replica, &env);
    assert_hidden("switchboard check", &checked);
    replica.stop();
    let log = replica.log();
    assert_hidden("the router's log", &log);
    assert!(!log.contains("root:x:0:0"), "{log}");
}

/// The files of the cache entry in `dir` whose names end with `suffix`.
fn entries(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect()
}

fn cached_runtime(dir: &Path) -> Harness {
    Harness::with_config(RuntimeConfig {
        cache_dir: Some(dir.to_path_buf()),
        ..RuntimeConfig::default()
    })
}

/// Someone who can write the cache folder plants native code: a real artifact
/// compiled by another cache (another key), under the name of the plugin to be
/// loaded, with a matching plain checksum and a MAC under that other key. It is
/// refused and the plugin compiled from its own `.wasm`.
#[test]
fn the_compile_cache_refuses_an_artifact_it_did_not_write() {
    let theirs = tempfile::tempdir().unwrap();
    let ours = tempfile::tempdir().unwrap();
    // Ours holds the real noop plugin, compiled and authenticated by us.
    let h = cached_runtime(ours.path());
    let (_, outcome) = h.runtime.load(h.spec("noop", "noop_guest")).unwrap();
    assert_eq!(outcome, CacheOutcome::Compiled);
    let artifact = entries(ours.path(), ".cwasm").remove(0);
    let mac = entries(ours.path(), ".cwasm.hmac").remove(0);

    // Theirs: the scripted guest (which echoes) compiled by another cache.
    let attacker = cached_runtime(theirs.path());
    attacker
        .runtime
        .load(attacker.spec("x", "scripted_guest"))
        .unwrap();
    let planted = entries(theirs.path(), ".cwasm").remove(0);
    let planted_mac = entries(theirs.path(), ".cwasm.hmac").remove(0);
    std::fs::copy(&planted, &artifact).unwrap();
    std::fs::copy(&planted_mac, &mac).unwrap();
    let sum = Command::new("sha256sum").arg(&artifact).output().unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout);
    std::fs::write(
        format!("{}.sha256", artifact.display()),
        sum.split_whitespace().next().unwrap(),
    )
    .unwrap();

    // A new process (runtime) on our cache: the planted code is not loaded.
    let h = cached_runtime(ours.path());
    let (plugin, outcome) = h.runtime.load(h.spec("noop", "noop_guest")).unwrap();
    assert_eq!(
        outcome,
        CacheOutcome::Compiled,
        "the planted artifact was loaded"
    );
    let outputs = plugin.handle(&event("e1", "echo", json!({}))).unwrap();
    assert!(outputs.is_empty(), "the planted echo ran: {outputs:?}");
    // Its own artifact is back, and used from now on.
    let (_, outcome) = h.runtime.load(h.spec("noop", "noop_guest")).unwrap();
    assert_eq!(outcome, CacheOutcome::Hit);

    // The same with the very bytes we would have written, authenticated by the
    // other key: refused all the same.
    let theirs_noop = cached_runtime(theirs.path());
    theirs_noop
        .runtime
        .load(theirs_noop.spec("noop", "noop_guest"))
        .unwrap();
    let their_mac = entries(theirs.path(), ".cwasm.hmac")
        .into_iter()
        .find(|p| p.file_name() == mac.file_name())
        .unwrap();
    std::fs::copy(their_mac, &mac).unwrap();
    let h = cached_runtime(ours.path());
    let (_, outcome) = h.runtime.load(h.spec("noop", "noop_guest")).unwrap();
    assert_eq!(outcome, CacheOutcome::Compiled);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = ours.path().join("cache.key");
        let mode = std::fs::metadata(key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key is the owner's alone");
    }
}

/// This machine's address on its outward interface (no packet is sent).
fn outward_ip() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Without `[http] token`, the operator actions (redrive, reload, replay, kv
/// writes) are taken only from this machine: the same request from the
/// machine's outward address is refused with 403 and the reason, while
/// ingress and reads stay open, and `/api/console` tells the page which.
#[test]
fn without_a_token_actions_are_taken_only_from_loopback() {
    let Some(ip) = outward_ip() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "no outward address to test from"
        );
        eprintln!("SKIPPED: this machine has no outward address to test from");
        return;
    };
    let r = switchboard_tests::running::start_at(
        "plugins_dir = \"plugins\"\nstate_dir = \"state\"\n[[exchanges]]\nname = \"events\"\n\
         [plugins.worker]\n[[routes]]\nexchange = \"events\"\npattern = \"#\"\nplugin = \"worker\"\n",
        &[("worker.wasm", "scripted_guest")],
        "0.0.0.0:0",
    );
    let port = r.url.rsplit(':').next().unwrap().to_string();
    let agent = agent();
    let ask = |host: &str, method: &str, path: &str| -> (u16, String) {
        let url = format!("http://{host}:{port}{path}");
        let mut response = match method {
            "GET" => agent.get(&url).call(),
            _ => agent
                .post(&url)
                .header("content-type", "application/json")
                .send("{}"),
        }
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    };
    let outside = ip.to_string();
    let actions = [
        "/api/dlq/worker/redrive",
        "/dlq/worker/redrive",
        "/api/plugins/worker/reload",
    ];
    for path in actions {
        let (status, body) = ask(&outside, "POST", path);
        assert_eq!(status, 403, "{path} from {outside}: {body}");
        assert!(body.contains("only from this machine"), "{body}");
        let (status, body) = ask("127.0.0.1", "POST", path);
        assert_eq!(status, 200, "{path} from loopback: {body}");
    }
    // Ingress and reads stay open from anywhere.
    assert_eq!(ask(&outside, "POST", "/events/events/ok").0, 202);
    assert_eq!(ask(&outside, "GET", "/api/plugins").0, 200);
    let console = |host: &str| -> Value {
        serde_json::from_str(&ask(host, "GET", "/api/console").1).unwrap()
    };
    assert_eq!(console(&outside)["actions_allowed"], false);
    assert_eq!(console("127.0.0.1")["actions_allowed"], true);
    assert_eq!(console("127.0.0.1")["token_required"], false);
}
