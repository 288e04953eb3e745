//! Broker faults that need a broker of their own: a throwaway RabbitMQ node
//! on its own ports, stopped and started under load (the shared broker is never
//! touched). And the `switchboard` commands that talk to the broker.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard_tests::broker::{
    Amqp, Confirmed, Publish, SinkLife, TestVhost, ThrowawayNode, require_broker,
};
use switchboard_tests::process::Replica;
use switchboard_tests::running::start;
use switchboard_tests::wait_until;

fn config(url: &str) -> String {
    format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[broker]
url = "{url}"
timeout = "3s"
[defaults]
concurrency = 2
max_attempts = 3
[defaults.backoff]
initial = "200ms"
max = "400ms"
jitter = 0.0
[[exchanges]]
name = "events"
[[exchanges]]
name = "out"
[plugins.worker]
output_exchange = "out"
[[routes]]
exchange = "events"
pattern = "#"
plugin = "worker"
"##
    )
}

fn envelope(id: &str, kind: &str) -> Value {
    json!({"id": id, "type": kind, "source": "tests", "data": {"ms": 2}})
}

#[test]
fn a_broker_restart_under_load_loses_nothing() {
    if !require_broker() {
        return;
    }
    let node = ThrowawayNode::start();
    let r = start(&config(&node.url()), &[("worker.wasm", "scripted_guest")]);
    assert!(r.appliance.is_ready());
    {
        let amqp = Amqp::connect(&node.url()).unwrap();
        amqp.declare_sink(Some("observed"), SinkLife::Durable, "out", "#");
        for i in 0..100 {
            let c = amqp.publish(&Publish::json(
                "events",
                "echo",
                &envelope(&format!("a-{i}"), "echo"),
            ));
            assert_eq!(c, Confirmed::Routed);
        }
    }
    // Restart while the router works through them.
    node.restart();
    let rabbit = r.appliance.transport().rabbit().unwrap().clone();
    wait_until("the router to reconnect", Duration::from_secs(60), || {
        rabbit.status().reconnects >= 1 && r.appliance.is_ready()
    });
    let amqp = Amqp::connect(&node.url()).unwrap();
    for i in 0..100 {
        let c = amqp.publish(&Publish::json(
            "events",
            "echo",
            &envelope(&format!("b-{i}"), "echo"),
        ));
        assert_eq!(c, Confirmed::Routed);
    }
    let mut seen = HashSet::new();
    let until = Instant::now() + Duration::from_secs(60);
    while seen.len() < 200 && Instant::now() < until {
        for m in amqp.get("observed", 200, Duration::from_millis(500)) {
            seen.insert(m.header("echo-of").unwrap().to_string());
        }
    }
    assert_eq!(
        seen.len(),
        200,
        "every event published before and after the restart was handled"
    );
    drop(r);
}

fn switchboard(vhost: &TestVhost, args: &[&str]) -> (i32, String, String) {
    let binary = switchboard_tests::target_dir().join("release/switchboard");
    let output = Command::new(binary)
        .args(args)
        .args(["--config", "/nonexistent/router.toml"])
        .env("RABBITMQ_URL", vhost.url())
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_cli_publishes_tails_lists_and_redrives_dead_letters() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("cli");
    let r = start(&config(&vhost.url()), &[("worker.wasm", "scripted_guest")]);

    // tail: watches the output exchange while events are published.
    let binary = switchboard_tests::target_dir().join("release/switchboard");
    let tail = Command::new(binary)
        .args(["tail", "out", "echoed", "--limit", "2", "--duration", "30s"])
        .args(["--config", "/nonexistent/router.toml"])
        .env("RABBITMQ_URL", vhost.url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));

    // publish: the id is printed, the event routed.
    for id in ["cli-1", "cli-2"] {
        let body = envelope(id, "echo").to_string();
        let (code, out, err) = switchboard(&vhost, &["publish", "events", "echo", &body]);
        assert_eq!(code, 0, "{err}");
        let reply: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(reply, json!({"id": id, "routed": true}));
    }
    let tailed = tail.wait_with_output().unwrap();
    assert!(
        tailed.status.success(),
        "{}",
        String::from_utf8_lossy(&tailed.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&tailed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let echoed: HashSet<&str> = lines
        .iter()
        .map(|l| l["headers"]["echo-of"].as_str().unwrap())
        .collect();
    assert_eq!(echoed, HashSet::from(["cli-1", "cli-2"]));

    // An unroutable publish says so.
    let (code, out, err) = switchboard(&vhost, &["publish", "out", "nobody.listens", "{}"]);
    assert_eq!(code, 1);
    assert!(out.contains("\"routed\":false"), "{out}");
    assert!(err.contains("no queue is bound"), "{err}");

    // dlq list / redrive.
    for id in ["dead-1", "dead-2", "dead-3"] {
        let body = envelope(id, "reject").to_string();
        assert_eq!(
            switchboard(&vhost, &["publish", "events", "reject", &body]).0,
            0
        );
    }
    let listed = || {
        let (code, out, err) = switchboard(&vhost, &["dlq", "list", "worker"]);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    wait_until("three dead letters", Duration::from_secs(20), || {
        listed().len() == 3
    });
    let letters = listed();
    assert!(
        letters
            .iter()
            .all(|l| l["kind"] == "reject" && l["reason"] == "asked to reject")
    );
    let (code, out, _) = switchboard(&vhost, &["dlq", "redrive", "worker", "--limit", "2"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap(),
        json!({"redriven": 2})
    );
    // They are rejected again (from attempt 1) and come back.
    wait_until(
        "the re-driven letters to come back",
        Duration::from_secs(20),
        || listed().len() == 3,
    );
    let (code, _, err) = switchboard(&vhost, &["dlq", "list", "nosuchplugin"]);
    assert_eq!(code, 2);
    assert!(err.contains("no dead-letter queue"), "{err}");

    // Credentials never show in what the commands print.
    let (code, _, err) = {
        let binary = switchboard_tests::target_dir().join("release/switchboard");
        let output = Command::new(binary)
            .args([
                "dlq",
                "list",
                "worker",
                "--config",
                "/nonexistent/router.toml",
            ])
            .env(
                "RABBITMQ_URL",
                "amqp://guest:wr0ng-s3cret@127.0.0.1:5672/nope",
            )
            .output()
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::new(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert_eq!(code, 2);
    assert!(!err.contains("wr0ng-s3cret"), "{err}");
    assert!(err.contains("amqp://***@127.0.0.1:5672/nope"), "{err}");
    drop(r);
}

/// What the AMQP library logs on its own (its targets, its span, its words):
/// none of it may reach the user at `info`, whichever variable set the level.
const LIBRARY_WORDS: [&str; 5] = [
    "lapin",
    "io_loop",
    "AMQPError",
    "Exponential backoff",
    "ShortString",
];

/// The ways a user runs at `info`: the default, `SWITCHBOARD_LOG=info` (as the
/// deployment files set it) and `RUST_LOG=info`.
const INFO_LEVELS: [&[(&str, &str)]; 3] =
    [&[], &[("SWITCHBOARD_LOG", "info")], &[("RUST_LOG", "info")]];

#[test]
fn a_publish_to_a_missing_exchange_says_so_in_one_sentence() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("cli-missing-exchange");
    let binary = switchboard_tests::target_dir().join("release/switchboard");
    for env in INFO_LEVELS {
        let output = Command::new(&binary)
            .args(["publish", "nope", "x", "{}"])
            .args(["--config", "/nonexistent/router.toml"])
            .env_remove("SWITCHBOARD_LOG")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .env("RABBITMQ_URL", vhost.url())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        let code = output.status.code().unwrap_or(-1);
        assert!(code != 0 && code != 1, "{env:?}: exit {code}: {err}");
        assert!(output.stdout.is_empty(), "{env:?}: nothing was published");
        assert_eq!(err.lines().count(), 1, "{env:?}: one line: {err}");
        assert!(
            err.contains(r#"exchange "nope" does not exist on the broker"#),
            "{env:?}: {err}"
        );
        for word in LIBRARY_WORDS {
            assert!(!err.contains(word), "{env:?}: {word:?} in {err}");
        }
    }
}

#[test]
fn run_with_a_wrong_password_logs_only_its_own_warning() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("cli-wrong-password");
    let password = "wr0ng-pa55word";
    let url = vhost
        .url()
        .replace("guest:guest@", &format!("guest:{password}@"));
    assert!(url.contains(password), "{url}");
    let config = format!("[broker]\nurl = \"{url}\"\n");
    // Side by side: each retries (100 ms, 200 ms, 400 ms, ...) for 3 s.
    let mut replicas: Vec<_> = INFO_LEVELS
        .iter()
        .map(|env| (env, Replica::launch(&config, &[], &[], env)))
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    for (env, replica) in &mut replicas {
        replica.stop();
        let log = replica.log();
        for word in LIBRARY_WORDS.iter().chain([&password]) {
            assert!(!log.contains(word), "{env:?}: {word:?} in\n{log}");
        }
        assert!(!log.contains(" ERROR "), "{env:?}:\n{log}");
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
        assert!(
            warnings.len() >= 3,
            "{env:?}: one warning per attempt:\n{log}"
        );
        for warning in &warnings {
            assert!(
                warning.contains("authentication refused")
                    && warning.contains("check the user name and password"),
                "{env:?}: {warning}"
            );
            assert!(warning.contains("amqp://***@127.0.0.1:5672/"), "{warning}");
        }
    }
}
