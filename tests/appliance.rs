//! The appliance end to end on the embedded bus: HTTP ingress, the live stream,
//! backpressure, hot reload under load, live routing changes and graceful
//! shutdown — with the real plugins, as `switchboard run` runs them.

use std::time::Duration;

use serde_json::{Value, json};
use switchboard::appliance::PluginState;
use switchboard_tests::running::{Running, start, start_in};
use switchboard_tests::{cli, epoch_ms, wasm};

const SEED: &str = r#"
plugins_dir = "plugins"
state_dir = "state"
[defaults]
concurrency = 2
[defaults.backoff]
initial = "10ms"
max = "50ms"
jitter = 0.0
[[exchanges]]
name = "events"
[plugins.billing]
[plugins.notification]
[[routes]]
exchange = "events"
patterns = ["bill.created", "payment.*"]
plugin = "billing"
[[routes]]
exchange = "events"
pattern = "bill.paid"
plugin = "notification"
"#;

fn seed() -> Running {
    start(
        SEED,
        &[
            ("billing.wasm", "billing"),
            ("notification.wasm", "notification"),
        ],
    )
}

/// A config with one plugin, `worker`, on `worker.wasm`.
fn worker_config(extra: &str, routes: &[&str]) -> String {
    let routes: String = routes
        .iter()
        .map(|p| {
            format!("[[routes]]\nexchange = \"events\"\npattern = \"{p}\"\nplugin = \"worker\"\n")
        })
        .collect();
    format!(
        "plugins_dir = \"plugins\"\nstate_dir = \"state\"\n[[exchanges]]\nname = \"events\"\n\
         [defaults.backoff]\ninitial = \"10ms\"\nmax = \"50ms\"\njitter = 0.0\n\
         [plugins.worker]\n{extra}\n{routes}"
    )
}

fn counters(r: &Running, plugin: &str) -> (u64, u64, u64) {
    let q = r.status(plugin).queue.unwrap();
    (q.received, q.acked, q.dead_lettered)
}

#[test]
fn a_payment_posted_over_http_comes_out_as_bill_paid_and_an_email() {
    let r = seed();
    let (status, reply, _) = r.post(
        "events",
        "bill.created",
        &json!({"bill_id": "B-7", "amount": 12, "currency": "EUR",
                "customer": {"name": "Ann", "email": "ann@example.com"}}),
    );
    assert_eq!(status, 202, "{reply}");
    assert!(reply["id"].is_string());
    r.wait_idle();
    let mut stream = r.stream("exchange=events&match=%23");
    let (status, reply, _) = r.post(
        "events",
        "payment.success",
        &json!({"id": "pay-evt-1", "type": "payment.success", "correlation_id": "order-7",
                "data": {"bill_id": "B-7", "payment_id": "P-7"}}),
    );
    assert_eq!((status, reply["id"].as_str()), (202, Some("pay-evt-1")));
    let seen: Vec<Value> = stream.by_ref().take(3).collect();
    let keys: Vec<&str> = seen
        .iter()
        .map(|s| s["routing_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["payment.success", "bill.paid", "notification.email"]);
    let paid = &seen[1]["message"];
    assert_eq!(paid["causation_id"], "pay-evt-1");
    assert_eq!(paid["correlation_id"], "order-7");
    let email = &seen[2]["message"];
    assert_eq!(email["data"]["recipient"], "ann@example.com");
    assert_eq!(email["correlation_id"], "order-7");
    assert_eq!(email["causation_id"], paid["id"]);
}

#[test]
fn bad_requests_are_refused_clearly() {
    let r = seed();
    let (status, reply, _) = r.post("nowhere", "x", &json!({}));
    assert_eq!(status, 404);
    assert!(
        reply["error"].as_str().unwrap().contains("\"nowhere\""),
        "{reply}"
    );
    let (status, reply, _) = r.post("events", "x", &json!({"specversion": "0.3", "type": "x"}));
    assert_eq!(
        status, 202,
        "a JSON value without envelope markers is data: {reply}"
    );
    let (status, reply, _) = r.post(
        "events",
        "x",
        &json!({"specversion": "1.0", "id": "c1", "source": "s", "type": "x", "data": {}}),
    );
    assert_eq!(status, 202, "a structured CloudEvent sent as JSON: {reply}");
    assert_eq!(reply["id"], "c1");
}

#[test]
fn a_full_queue_answers_503_and_loses_nothing_accepted() {
    let config = worker_config("queue_capacity = 5\nconcurrency = 1", &["sleep"]);
    let r = start(&config, &[("worker.wasm", "scripted_guest")]);
    let (mut accepted, mut refused) = (0u64, 0u64);
    for i in 0..40 {
        let (status, reply, retry_after) = r.post(
            "events",
            "sleep",
            &json!({"id": format!("e{i}"), "type": "sleep", "data": {"ms": 20}}),
        );
        match status {
            202 => accepted += 1,
            503 => {
                refused += 1;
                assert_eq!(retry_after.as_deref(), Some("1"));
                assert!(reply["error"].as_str().unwrap().contains("full"), "{reply}");
            }
            other => panic!("unexpected {other}: {reply}"),
        }
    }
    assert!(refused > 0, "the queue never filled");
    assert!(accepted >= 5);
    r.wait_idle();
    assert_eq!(
        counters(&r, "worker"),
        (accepted, accepted, 0),
        "every accepted event was handled"
    );
}

#[test]
fn hot_reload_under_load_loses_nothing() {
    let config = worker_config("concurrency = 2", &["ok"]);
    let r = start(&config, &[("worker.wasm", "noop_guest")]);
    let noop = std::fs::read(wasm("noop_guest")).unwrap();
    let scripted = std::fs::read(wasm("scripted_guest")).unwrap();
    let swapping = std::sync::atomic::AtomicBool::new(true);
    let accepted = std::thread::scope(|s| {
        // Events keep coming for as long as versions are being swapped.
        let load = s.spawn(|| {
            let (mut sent, mut accepted) = (0u64, 0u64);
            while swapping.load(std::sync::atomic::Ordering::Relaxed) || sent < 500 {
                let body = json!({"id": format!("e{sent}"), "type": "ok", "data": {}});
                let (status, reply, _) = r.post("events", "ok", &body);
                assert!(status == 202 || status == 503, "{status}: {reply}");
                accepted += u64::from(status == 202);
                sent += 1;
            }
            accepted
        });
        // Each swap waits for the previous one to be serving (changes closer
        // together than the watcher's debounce are applied as one).
        for round in 0..6u64 {
            let next = if round % 2 == 0 { &scripted } else { &noop };
            r.write_plugin("worker.wasm", next);
            r.wait_for("the new version to serve", |r| {
                r.status("worker").loads == round + 2
            });
        }
        swapping.store(false, std::sync::atomic::Ordering::Relaxed);
        load.join().unwrap()
    });
    r.wait_idle();
    let (received, acked, dead) = counters(&r, "worker");
    assert_eq!(received, accepted);
    assert_eq!(
        (acked, dead),
        (accepted, 0),
        "received = handled + dead-lettered, nothing failed"
    );
    assert!(r.status("worker").error.is_none());
}

#[test]
fn a_broken_new_version_leaves_the_old_one_serving() {
    let config = worker_config("", &["echo"]);
    let r = start(&config, &[("worker.wasm", "scripted_guest")]);
    let version = r.status("worker").version.unwrap();
    r.write_plugin("worker.wasm", b"definitely not wasm");
    r.wait_for("the load error", |r| r.status("worker").error.is_some());
    let status = r.status("worker");
    assert_eq!(status.state, PluginState::Serving);
    assert_eq!(status.version.as_deref(), Some(version.as_str()));
    assert!(status.error.unwrap().contains("not a WebAssembly file"));
    assert_eq!(
        r.post("events", "echo", &json!({"type": "echo", "data": {}}))
            .0,
        202
    );
    r.wait_idle();
    assert_eq!(counters(&r, "worker").1, 1, "the old version handled it");
    // The plugin status endpoint says the same.
    let plugins = r.get("/plugins");
    assert!(
        plugins[0]["error"]
            .as_str()
            .unwrap()
            .contains("not a WebAssembly file")
    );
    // Putting a good file back clears the error.
    r.write_plugin(
        "worker.wasm",
        &std::fs::read(wasm("scripted_guest")).unwrap(),
    );
    r.wait_for("the error to clear", |r| r.status("worker").error.is_none());
}

#[test]
fn a_route_added_to_router_toml_applies_live_and_a_bad_edit_is_refused() {
    let r = start(
        &worker_config("", &["echo"]),
        &[("worker.wasm", "scripted_guest")],
    );
    // Nothing is bound to `late.*` yet: accepted, routed nowhere.
    assert_eq!(
        r.post("events", "late.one", &json!({"type": "echo", "data": {}}))
            .0,
        202
    );
    r.wait_idle();
    assert_eq!(counters(&r, "worker").0, 0);
    assert_eq!(r.appliance.transport().unroutable(), 1);

    r.write_config(&worker_config("", &["echo", "late.*"]));
    r.wait_for("the new route", |r| r.appliance.config().routes.len() == 2);
    assert_eq!(
        r.post("events", "late.two", &json!({"type": "echo", "data": {}}))
            .0,
        202
    );
    r.wait_idle();
    assert_eq!(counters(&r, "worker").1, 1);

    // An invalid edit is refused; the running routes stay.
    r.write_config(&format!(
        "{}\n[[routes]]\nexchange = \"events\"\npattern = \"x\"\nplugin = \"ghost\"\n",
        worker_config("", &["echo"])
    ));
    r.wait_for("the refusal", |r| r.appliance.config_error().is_some());
    assert!(
        r.appliance
            .config_error()
            .unwrap()
            .contains("unknown plugin \"ghost\"")
    );
    assert_eq!(r.appliance.config().routes.len(), 2);
    assert_eq!(
        r.post("events", "late.three", &json!({"type": "echo", "data": {}}))
            .0,
        202
    );
    r.wait_idle();
    assert_eq!(counters(&r, "worker").1, 2);
}

/// A Kubernetes ConfigMap volume: `router.toml` → `..data/router.toml`, `..data`
/// → a timestamped folder; an update writes a new folder, swaps `..data` by a
/// rename and deletes the old folder. The router must follow.
#[test]
fn a_configmap_style_symlink_swap_reloads_router_toml() {
    use std::os::unix::fs::symlink;
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    std::fs::copy(wasm("scripted_guest"), dir.join("plugins/worker.wasm")).unwrap();
    let first = "..2026_11_22_19_00_00.1";
    std::fs::create_dir(dir.join(first)).unwrap();
    std::fs::write(
        dir.join(first).join("router.toml"),
        worker_config("", &["echo"]),
    )
    .unwrap();
    symlink(first, dir.join("..data")).unwrap();
    symlink("..data/router.toml", dir.join("router.toml")).unwrap();
    let r = start_in(dir);
    assert_eq!(r.appliance.config().routes.len(), 1);

    let second = "..2026_11_22_19_05_00.2";
    std::fs::create_dir(dir.join(second)).unwrap();
    std::fs::write(
        dir.join(second).join("router.toml"),
        worker_config("", &["echo", "late.*"]),
    )
    .unwrap();
    symlink(second, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join(first)).unwrap();
    r.wait_for("the updated routes", |r| {
        r.appliance.config().routes.len() == 2
    });
    assert_eq!(r.appliance.config_error(), None);

    // And the next update too (the watch did not die with the first folder).
    let third = "..2026_11_22_19_10_00.3";
    std::fs::create_dir(dir.join(third)).unwrap();
    std::fs::write(
        dir.join(third).join("router.toml"),
        worker_config("", &["echo", "late.*", "later.*"]),
    )
    .unwrap();
    symlink(third, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join(second)).unwrap();
    r.wait_for("the second update", |r| {
        r.appliance.config().routes.len() == 3
    });
    drop(r);
}

#[test]
fn a_plugin_starts_when_its_file_arrives() {
    let r = start(&worker_config("", &["echo"]), &[]);
    assert_eq!(r.status("worker").state, PluginState::Missing);
    // Events wait in its queue meanwhile.
    assert_eq!(
        r.post("events", "echo", &json!({"type": "echo", "data": {}}))
            .0,
        202
    );
    r.write_plugin(
        "worker.wasm",
        &std::fs::read(wasm("scripted_guest")).unwrap(),
    );
    r.wait_for("the plugin to serve", |r| {
        r.status("worker").state == PluginState::Serving
    });
    r.wait_idle();
    assert_eq!(counters(&r, "worker"), (1, 1, 0));
}

#[test]
fn shutdown_finishes_accepted_events() {
    let mut r = start(
        &worker_config("concurrency = 1", &["sleep"]),
        &[("worker.wasm", "scripted_guest")],
    );
    for i in 0..20 {
        let body = json!({"id": format!("e{i}"), "type": "sleep", "data": {"ms": 15}});
        assert_eq!(r.post("events", "sleep", &body).0, 202);
    }
    let queue = r.status("worker").queue.unwrap();
    assert!(queue.depth > 0, "events still queued when shutdown begins");
    let spooled = r.stop(Duration::from_secs(10));
    assert_eq!(spooled, 0);
    let q = r.appliance.transport().embedded().unwrap().stats()["worker"].clone();
    assert_eq!(
        (q.received, q.acked),
        (20, 20),
        "all accepted events were handled before exit"
    );
}

#[test]
fn dead_letters_survive_a_restart() {
    let r = start(
        &worker_config("", &["reject"]),
        &[("worker.wasm", "scripted_guest")],
    );
    let body = json!({"id": "poison-1", "type": "reject", "data": {}});
    assert_eq!(r.post("events", "reject", &body).0, 202);
    r.wait_idle();
    assert_eq!(r.get("/dlq/worker")[0]["reason"], "asked to reject");
    let (spooled, dir) = r.stop_and_keep(Duration::from_secs(5));
    assert_eq!(spooled, 0, "dead letters are not events waiting to run");
    let r2 = start_in(dir.path());
    let dead = r2.get("/dlq/worker");
    assert_eq!(dead.as_array().unwrap().len(), 1);
    assert_eq!(dead[0]["message"]["id"], "poison-1");
    assert_eq!(
        (dead[0]["kind"].as_str(), dead[0]["attempts"].as_u64()),
        (Some("reject"), Some(1))
    );
}

/// `[broker] dlq_ttl` and `dlq_max_length` on the embedded bus: the newest
/// `dlq_max_length` dead letters are kept, each for `dlq_ttl`, and what they
/// discard is counted, on the API and in the metrics.
#[test]
fn dead_letters_are_kept_as_long_and_as_many_as_the_retention_says() {
    let config =
        worker_config("", &["reject"]) + "[broker]\ndlq_ttl = \"3s\"\ndlq_max_length = 2\n";
    let r = start(&config, &[("worker.wasm", "scripted_guest")]);
    for id in ["rej-1", "rej-2", "rej-3"] {
        let body = json!({"id": id, "type": "reject", "data": {}});
        assert_eq!(r.post("events", "reject", &body).0, 202);
        r.wait_idle();
    }
    let ids = |r: &Running| -> Vec<String> {
        r.get("/dlq/worker")
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["message"]["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&r), ["rej-2", "rej-3"], "the oldest one made way");
    let q = r.status("worker").queue.unwrap();
    assert_eq!(
        (q.dead_lettered, q.dead_letters, q.dead_letters_overflowed),
        (3, 2, 1)
    );
    r.wait_for("the letters to expire", |r| ids(r).is_empty());
    let q = r.status("worker").queue.unwrap();
    assert_eq!((q.dead_letters_expired, q.dead_letters_overflowed), (2, 1));
    let (_, metrics) = r.request("GET", "/metrics", None, None);
    for line in [
        "switchboard_queue_dead_letters{plugin=\"worker\"} 0",
        "switchboard_queue_dead_letters_discarded{plugin=\"worker\",reason=\"ttl\"} 2",
        "switchboard_queue_dead_letters_discarded{plugin=\"worker\",reason=\"max_length\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}

/// The newest lines a plugin logged are kept for `GET /api/plugins/{name}/logs`
/// (the console's plugin page), with their level and event, whatever the log
/// filter; an unknown plugin is a 404.
#[test]
fn a_plugins_recent_log_lines_are_served() {
    let r = start(
        &worker_config("", &["log"]),
        &[("worker.wasm", "scripted_guest")],
    );
    let body = json!({"id": "logged-1", "type": "log", "data": {}});
    assert_eq!(r.post("events", "log", &body).0, 202);
    r.wait_idle();
    let logs = r.get("/api/plugins/worker/logs");
    let lines = logs["lines"].as_array().unwrap();
    // The script logs one line at each level, then one too long (cut).
    let levels: Vec<&str> = lines.iter().map(|l| l["level"].as_str().unwrap()).collect();
    assert_eq!(
        levels,
        ["trace", "debug", "info", "warn", "error", "info"],
        "{logs}"
    );
    assert_eq!(lines[5]["message"].as_str().unwrap().len(), 4096);
    assert_eq!(lines[2]["message"], "scripted log at info");
    assert_eq!(lines[2]["event_id"], "logged-1");
    assert!(
        lines[2]["at"].as_str().is_some_and(|t| t.contains('T')),
        "{logs}"
    );
    let (status, _) = r.request("GET", "/api/plugins/nope/logs", None, None);
    assert_eq!(status, 404);
}

#[test]
fn retries_waiting_at_shutdown_resume_after_restart() {
    // A long backoff: the retry is still waiting when the appliance stops.
    let config = worker_config(
        "max_attempts = 3\nbackoff = { initial = \"1h\", max = \"1h\", jitter = 0.0 }",
        &["fail-until"],
    );
    let r = start(&config, &[("worker.wasm", "scripted_guest")]);
    let body = json!({"id": "e1", "type": "fail-until", "data": {"succeed_on": 2}});
    assert_eq!(r.post("events", "fail-until", &body).0, 202);
    r.wait_for("the first failure", |r| {
        r.status("worker").queue.unwrap().waiting_retries == 1
    });
    let (spooled, dir) = r.stop_and_keep(Duration::from_secs(5));
    assert_eq!(spooled, 1, "the waiting retry is spooled");
    let r2 = start_in(dir.path());
    r2.wait_idle();
    let q = r2.status("worker").queue.unwrap();
    assert_eq!(
        (q.acked, q.dead_lettered),
        (1, 0),
        "attempt 2 ran after the restart and succeeded"
    );
}

#[test]
fn a_deleted_plugin_file_stops_the_plugin_and_its_queue_keeps_events() {
    let r = start(
        &worker_config("", &["echo"]),
        &[("worker.wasm", "scripted_guest")],
    );
    std::fs::remove_file(r.dir.join("plugins/worker.wasm")).unwrap();
    r.wait_for("the plugin to stop", |r| {
        r.status("worker").state == PluginState::Missing
    });
    assert_eq!(
        r.post("events", "echo", &json!({"type": "echo", "data": {}}))
            .0,
        202
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        r.status("worker").queue.unwrap().depth,
        1,
        "kept, not handled, not lost"
    );
    r.write_plugin(
        "worker.wasm",
        &std::fs::read(wasm("scripted_guest")).unwrap(),
    );
    r.wait_idle();
    assert_eq!(counters(&r, "worker"), (1, 1, 0));
}

#[test]
fn a_limit_changed_in_router_toml_applies_live() {
    let r = start(
        &worker_config("max_attempts = 1", &["sleep"]),
        &[("worker.wasm", "scripted_guest")],
    );
    let slow = json!({"type": "sleep", "data": {"ms": 150}});
    assert_eq!(r.post("events", "sleep", &slow).0, 202);
    r.wait_idle();
    assert_eq!(
        counters(&r, "worker"),
        (1, 1, 0),
        "150 ms is within the default 5 s"
    );

    r.write_config(&worker_config(
        "max_attempts = 1\ntimeout = \"50ms\"",
        &["sleep"],
    ));
    r.wait_for("the new limit", |r| {
        r.appliance.config().plugins["worker"].timeout == Some(Duration::from_millis(50))
    });
    r.wait_for("the reload", |r| r.status("worker").loads == 2);
    assert_eq!(r.post("events", "sleep", &slow).0, 202);
    r.wait_idle();
    let dead = r.get("/dlq/worker");
    assert_eq!(dead[0]["kind"], "timeout", "{dead}");
    assert!(
        dead[0]["reason"].as_str().unwrap().contains("50 ms"),
        "{dead}"
    );
}

/// [`SEED`] with the event archive on, indexed by bill.
fn archived_seed() -> String {
    format!(
        "{SEED}\n[archive]\nenabled = true\n\
         [[archive.aggregates]]\nmatch = \"bill.*\"\nfield = \"data.bill_id\"\n\
         [[archive.aggregates]]\nmatch = \"payment.*\"\nfield = \"data.bill_id\"\n"
    )
}

fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["routing_key"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_archive_keeps_each_bills_history_in_order_for_the_api_and_the_cli() {
    let r = start(
        &archived_seed(),
        &[
            ("billing.wasm", "billing"),
            ("notification.wasm", "notification"),
        ],
    );
    let bill = |id: &str| {
        json!({"bill_id": id, "amount": 12, "currency": "EUR",
               "customer": {"name": "Ann", "email": "ann@example.com"}})
    };
    for (key, body) in [
        ("bill.created", bill("B-7")),
        ("bill.created", bill("B-8")),
        (
            "payment.success",
            json!({"id": "pay-1", "type": "payment.success",
                                    "data": {"bill_id": "B-7", "payment_id": "P-7"}}),
        ),
    ] {
        let (status, reply, _) = r.post("events", key, &body);
        assert_eq!(status, 202, "{reply}");
    }
    r.wait_idle();

    let b7 = r.get("/api/events?aggregate=B-7");
    let b7 = b7["items"].as_array().unwrap();
    assert_eq!(kinds(b7), ["bill.created", "payment.success", "bill.paid"]);
    assert_eq!(b7[1]["id"], "pay-1");
    assert_eq!(b7[2]["causation_id"], "pay-1", "{}", b7[2]);
    assert_eq!(b7[1]["body"]["data"]["payment_id"], "P-7");
    let b8 = r.get("/api/events?aggregate=B-8");
    assert_eq!(kinds(b8["items"].as_array().unwrap()), ["bill.created"]);

    // Everything, a page at a time: the three posted, bill.paid and the email.
    let first = r.get("/api/events?limit=3");
    assert_eq!(first["items"].as_array().unwrap().len(), 3);
    let after = first["next_after"].as_u64().unwrap();
    let rest = r.get(&format!("/api/events?limit=3&after={after}"));
    let rest = rest["items"].as_array().unwrap();
    assert_eq!(kinds(rest), ["bill.paid", "notification.email"]);
    let emails = r.get("/api/events?match=notification.%23");
    assert_eq!(emails["items"].as_array().unwrap().len(), 1);

    // The CLI reads the same history from the files, beside the running appliance.
    let (code, lines, stderr) = cli(&r.dir, &["events", "--aggregate", "B-7"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        kinds(&lines),
        ["bill.created", "payment.success", "bill.paid"]
    );
    let (code, lines, stderr) = cli(&r.dir, &["events", "--aggregate", "nobody"]);
    assert_eq!((code, lines.len()), (0, 0), "{stderr}");
    let (code, lines, _) = cli(
        &r.dir,
        &[
            "events", "--match", "bill.*", "--since", "1h", "--limit", "2",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(kinds(&lines), ["bill.created", "bill.created"]);
    let (code, _, stderr) = cli(&r.dir, &["events", "--since", "last tuesday"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("neither an RFC 3339 time nor a duration"),
        "{stderr}"
    );
    let bad = r.get("/api/events?since=soon");
    assert!(bad["error"].as_str().unwrap().contains("RFC 3339"), "{bad}");
}

/// A service posts bills over HTTP without pause while the router is killed
/// (`kill -9`) twice: every bill that was answered 202 is in the archive after
/// the restart, and the archive numbers on without a gap.
#[test]
fn kill_9_while_archiving_loses_no_acknowledged_event() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use switchboard_tests::process::Replica;

    let mut replica = Replica::start(
        &archived_seed(),
        &[
            ("billing.wasm", "billing"),
            ("notification.wasm", "notification"),
        ],
    );
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let poster = {
        let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
        let url = replica.url.clone();
        std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .into();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("B-{i}");
                let body = json!({"id": format!("evt-{id}"), "type": "bill.created",
                                  "data": {"bill_id": id, "amount": 1}});
                let sent = agent
                    .post(&format!("{url}/events/events/bill.created"))
                    .header("content-type", "application/json")
                    .send(body.to_string());
                match sent {
                    Ok(response) if response.status().as_u16() == 202 => {
                        acknowledged.lock().unwrap().push(format!("evt-{id}"));
                        i += 1;
                    }
                    // Down or refusing: try the same bill again.
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
    };
    for _ in 0..2 {
        let before = acknowledged.lock().unwrap().len();
        switchboard_tests::wait_until("bills acknowledged", Duration::from_secs(30), || {
            acknowledged.lock().unwrap().len() >= before + 200
        });
        replica.kill();
        replica.restart();
        replica.wait_alive(Duration::from_secs(60));
    }
    switchboard_tests::wait_until(
        "bills acknowledged after the restarts",
        Duration::from_secs(30),
        || acknowledged.lock().unwrap().len() >= 600,
    );
    stop.store(true, Ordering::SeqCst);
    poster.join().unwrap();
    let acknowledged = acknowledged.lock().unwrap().clone();
    let (code, lines, stderr) = cli(replica.dir(), &["events", "--match", "bill.created"]);
    assert_eq!(code, 0, "{stderr}");
    let archived: std::collections::BTreeSet<&str> =
        lines.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !archived.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged bills are not in the archive, e.g. {:?}",
        missing.len(),
        acknowledged.len(),
        &missing[..missing.len().min(5)]
    );
    let (_, all, _) = cli(replica.dir(), &["events"]);
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.iter().enumerate().all(|(i, s)| *s == i as u64 + 1),
        "archive positions with gaps or repeats"
    );
    eprintln!(
        "ARCHIVE kill -9 ×2: {} bills acknowledged, {} records archived",
        acknowledged.len(),
        all.len()
    );
}

#[test]
fn a_plugins_state_is_read_over_http_while_running_and_from_the_cli_once_stopped() {
    let r = seed();
    let (status, reply, _) = r.post(
        "events",
        "bill.created",
        &json!({"bill_id": "B-9", "amount": 30, "currency": "EUR",
                "customer": {"name": "Bo", "email": "bo@example.com"}}),
    );
    assert_eq!(status, 202, "{reply}");
    r.wait_idle();
    let bill = r.get("/api/kv/billing/bill:B-9");
    assert_eq!(bill["plugin"], "billing");
    assert_eq!(bill["value"]["bill_id"], "B-9", "{bill}");
    assert_eq!(bill["value"]["amount"], 30, "{bill}");
    let (status, body) = r.request("GET", "/api/kv/billing/bill:nope", None, None);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("keeps nothing under"), "{body}");
    let (status, _) = r.request("GET", "/api/kv/nobody/x", None, None);
    assert_eq!(status, 404);

    // The running appliance holds the embedded store: the CLI says where to ask.
    let held = kv_get_cli(&r.dir, &["billing", "bill:B-9"]);
    assert_eq!(held.status.code(), Some(2));
    let said = String::from_utf8_lossy(&held.stderr);
    assert!(said.contains("GET /api/kv/billing/bill:B-9"), "{said}");

    let dir = r.dir.clone();
    let (_, _temp) = r.stop_and_keep(Duration::from_secs(5));
    let read = |args: &[&str]| kv_get_cli(&dir, args);
    let found = read(&["billing", "bill:B-9"]);
    assert_eq!(
        found.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    let value: Value = serde_json::from_slice(&found.stdout).unwrap();
    assert_eq!(value["value"]["bill_id"], "B-9");
    let missing = read(&["billing", "bill:nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(missing.stdout.is_empty());
}

/// `switchboard kv get` on `dir`'s router.toml.
fn kv_get_cli(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(switchboard_tests::target_dir().join("release/switchboard"))
        .args(["kv", "get", "--config"])
        .arg(dir.join("router.toml"))
        .args(args)
        .output()
        .unwrap()
}

/// Orders (the event-sourcing seed plugin) and notification, with the archive
/// indexed by order.
const ORDERS: &str = r#"
plugins_dir = "plugins"
state_dir = "state"
[[exchanges]]
name = "events"
[plugins.orders]
concurrency = 1
[plugins.notification]
# A replay is not a duplicate: it gets past the window.
dedupe = "10m"
[[routes]]
exchange = "events"
patterns = ["order.created", "order.paid", "order.shipped", "order.delivered", "order.cancelled"]
plugin = "orders"
[[routes]]
exchange = "events"
patterns = ["order.*", "user.created"]
plugin = "notification"
[archive]
enabled = true
[[archive.aggregates]]
match = "order.*"
field = "data.order_id"
"#;

fn orders() -> Running {
    start(
        ORDERS,
        &[
            ("orders.wasm", "orders"),
            ("notification.wasm", "notification"),
        ],
    )
}

/// Posts an order's lifecycle, one event per kind.
fn post_order(r: &Running, id: &str, kinds: &[&str]) {
    for kind in kinds {
        let data = match *kind {
            "order.created" => json!({"order_id": id, "items": [{"sku": "A-1", "qty": 2}],
                                      "total": 40, "currency": "EUR",
                                      "customer": {"email": "ann@example.com"}}),
            "order.paid" => json!({"order_id": id, "amount": 40, "currency": "EUR"}),
            "order.shipped" => json!({"order_id": id, "tracking_number": format!("T-{id}"),
                                      "email": "ann@example.com"}),
            _ => json!({"order_id": id}),
        };
        let (status, reply, _) = r.post("events", kind, &data);
        assert_eq!(status, 202, "{reply}");
        // One at a time: the reducer sees the lifecycle in order.
        r.wait_idle();
    }
}

/// The bytes `plugin` keeps under `key`, read from a stopped appliance's store.
fn stored(dir: &std::path::Path, plugin: &str, key: &str) -> Option<Vec<u8>> {
    use switchboard::kv::KvStore as _;
    let store = switchboard::kv::EmbeddedStore::open(&dir.join("state/kv.redb")).unwrap();
    store.get(plugin, key).unwrap()
}

#[test]
fn an_orders_history_rebuilds_its_state_byte_for_byte_with_or_without_the_appliance() {
    let r = orders();
    let lifecycle = [
        "order.created",
        "order.paid",
        "order.shipped",
        "order.delivered",
    ];
    post_order(&r, "O-1", &lifecycle);
    post_order(&r, "O-2", &["order.created", "order.cancelled"]);
    let state = r.get("/api/kv/orders/order:O-1");
    assert_eq!(state["value"]["status"], "DELIVERED", "{state}");
    assert_eq!(
        r.get("/api/kv/orders/order:O-2")["value"]["status"],
        "CANCELLED"
    );

    // The order's history, in order, from the archive.
    let (code, history, stderr) = cli(&r.dir, &["events", "--aggregate", "O-1"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(kinds(&history), lifecycle, "outputs are not order.* events");

    // Rebuilt through the running appliance (it holds the embedded store).
    let (status, body) = r.request("DELETE", "/api/kv/orders/order:O-1", None, None);
    assert_eq!(status, 204, "{body}");
    let (status, _) = r.request("GET", "/api/kv/orders/order:O-1", None, None);
    assert_eq!(status, 404);
    let (code, written, stderr) = cli(
        &r.dir,
        &[
            "replay",
            "orders",
            "--aggregate",
            "O-1",
            "--rebuild",
            "--url",
            &r.url,
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("from 4 events"), "{stderr}");
    assert_eq!(written.len(), 1, "one key: {written:?}");
    assert_eq!(written[0]["key"], "order:O-1");
    assert_eq!(r.get("/api/kv/orders/order:O-1"), state);

    // A payment archived before its order: production retried it until the
    // order existed, and so does the rebuild.
    for (kind, data) in [
        ("order.paid", json!({"order_id": "O-9", "amount": 5})),
        ("order.created", json!({"order_id": "O-9", "items": []})),
    ] {
        let (status, reply, _) = r.post("events", kind, &data);
        assert_eq!(status, 202, "{reply}");
    }
    r.wait_for("O-9 paid", |r| {
        r.request("GET", "/api/kv/orders/order:O-9", None, None)
            .1
            .contains("PAID")
    });
    let paid = r.get("/api/kv/orders/order:O-9");
    let (status, _) = r.request("DELETE", "/api/kv/orders/order:O-9", None, None);
    assert_eq!(status, 204);
    let (code, _, stderr) = cli(
        &r.dir,
        &[
            "replay",
            "orders",
            "--aggregate",
            "O-9",
            "--rebuild",
            "--url",
            &r.url,
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(r.get("/api/kv/orders/order:O-9"), paid);

    let dir = r.dir.clone();
    let (_, _temp) = r.stop_and_keep(Duration::from_secs(5));
    let original = stored(&dir, "orders", "order:O-1").expect("rebuilt");
    let other = stored(&dir, "orders", "order:O-2").expect("untouched");

    // Rebuilt with no appliance running: straight into the store, byte for byte.
    {
        use switchboard::kv::KvStore as _;
        let store = switchboard::kv::EmbeddedStore::open(&dir.join("state/kv.redb")).unwrap();
        assert!(store.delete("orders", "order:O-1").unwrap());
    }
    let (code, _, stderr) = cli(
        &dir,
        &["replay", "orders", "--aggregate", "O-1", "--rebuild"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stored(&dir, "orders", "order:O-1"), Some(original.clone()));
    assert_eq!(stored(&dir, "orders", "order:O-2"), Some(other));

    // A corrupted state is put right the same way.
    {
        use switchboard::kv::KvStore as _;
        let store = switchboard::kv::EmbeddedStore::open(&dir.join("state/kv.redb")).unwrap();
        store
            .set("orders", "order:O-1", br#"{"status":"BROKEN"}"#, None)
            .unwrap();
    }
    let (code, _, stderr) = cli(
        &dir,
        &["replay", "orders", "--aggregate", "O-1", "--rebuild"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stored(&dir, "orders", "order:O-1"), Some(original));

    // An aggregate with no history: nothing to do, nothing written.
    let (code, written, stderr) = cli(
        &dir,
        &["replay", "orders", "--aggregate", "O-404", "--rebuild"],
    );
    assert_eq!((code, written.len()), (0, 0), "{stderr}");
    let (code, lines, _) = cli(&dir, &["events", "--aggregate", "O-404"]);
    assert_eq!((code, lines.len()), (0, 0));
}

/// `path`'s bytes with `from` replaced by `to` (same length) once: a plugin
/// that differs from the original in one template.
fn patched(path: &std::path::Path, from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from:?} is not in {}", path.display()));
    bytes[at..at + from.len()].copy_from_slice(to.as_bytes());
    bytes
}

#[test]
fn a_candidate_is_diffed_against_history_and_a_replay_is_redelivered_marked() {
    let r = orders();
    post_order(&r, "O-1", &["order.created", "order.paid", "order.shipped"]);
    post_order(&r, "O-2", &["order.created", "order.shipped"]);
    post_order(&r, "O-3", &["order.created", "order.cancelled"]);
    let (status, reply, _) = r.post(
        "events",
        "user.created",
        &json!({"name": "Ann", "email": "ann@example.com"}),
    );
    assert_eq!(status, 202, "{reply}");
    r.wait_idle();
    let (_, archived, _) = cli(&r.dir, &["events"]);
    let shipped: Vec<&Value> = archived
        .iter()
        .filter(|e| e["routing_key"] == "order.shipped")
        .collect();
    assert_eq!(shipped.len(), 2);

    // A copy of notification whose order.shipped subject reads differently.
    let candidate = r.dir.join("notification-candidate.wasm");
    std::fs::write(
        &candidate,
        patched(&wasm("notification"), "has shipped", "was shipped"),
    )
    .unwrap();
    let candidate = candidate.to_str().unwrap();
    let (code, lines, stderr) = cli(
        &r.dir,
        &["replay", "notification", "--diff", "--file", candidate],
    );
    assert_eq!(code, 1, "they differ: {stderr}");
    let (summary, differ) = lines.split_last().unwrap();
    let named: Vec<&Value> = differ.iter().map(|l| &l["input"]).collect();
    let expected: Vec<&Value> = shipped.iter().map(|e| &e["id"]).collect();
    assert_eq!(
        named, expected,
        "exactly the order.shipped events: {differ:?}"
    );
    for line in differ {
        assert_eq!(line["verdict"], "differ");
        assert!(
            line["running"]["outputs"][0]["data"]["subject"]
                .as_str()
                .unwrap()
                .ends_with("has shipped")
        );
        assert!(
            line["candidate"]["outputs"][0]["data"]["subject"]
                .as_str()
                .unwrap()
                .ends_with("was shipped")
        );
    }
    // notification sees every order.* event and user.created: 8.
    let summary = &summary["summary"];
    assert_eq!(summary["events"], 8, "{summary}");
    assert_eq!(summary["same"], 6);
    assert_eq!(summary["differ"], 2);
    assert_eq!(summary["fails_only_in_candidate"], 0);

    // The same copy against itself: all the same, exit 0.
    let (code, lines, stderr) = cli(
        &r.dir,
        &[
            "replay",
            "notification",
            "--diff",
            "--file",
            wasm("notification").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["summary"]["same"], 8);

    // A candidate that fails: each failure reported, nothing published.
    let (code, lines, stderr) = cli(
        &r.dir,
        &[
            "replay",
            "orders",
            "--dry-run",
            "--file",
            wasm("trap_guest").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(lines.len(), 7, "every order.* event");
    assert!(
        lines.iter().all(|l| l["failure"]["kind"].is_string()),
        "{lines:?}"
    );
    // A dry run of the real plugin over a copy of its state: all handled.
    let (code, lines, stderr) = cli(
        &r.dir,
        &["replay", "orders", "--dry-run", "--aggregate", "O-1"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(lines.len(), 3);
    // A component that is not a plugin: one sentence.
    let (code, lines, stderr) = cli(
        &r.dir,
        &[
            "replay",
            "orders",
            "--dry-run",
            "--file",
            wasm("wrong_world_guest").to_str().unwrap(),
        ],
    );
    assert_eq!((code, lines.len()), (2, 0));
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not a Switchboard plugin"), "{stderr}");
    // Nothing above published anything.
    let (_, after, _) = cli(&r.dir, &["events"]);
    assert_eq!(after.len(), archived.len());

    // --publish: the shipped events again, through notification's queue.
    let (code, lines, stderr) = cli(
        &r.dir,
        &[
            "replay",
            "notification",
            "--match",
            "order.shipped",
            "--publish",
            "--url",
            &r.url,
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(lines[0]["delivered"], 2, "{lines:?}");
    let replay = lines[0]["replay"].as_str().unwrap().to_string();
    r.wait_idle();
    let (_, after, _) = cli(&r.dir, &["events", "--match", "notification.#"]);
    let (first, again): (Vec<&Value>, Vec<&Value>) = after.iter().partition(|e| {
        !e["headers"]
            .as_array()
            .is_some_and(|h| h.iter().any(|kv| kv[0] == "switchboard-replay"))
    });
    assert_eq!(again.len(), 2, "{after:?}");
    for output in &again {
        let mark = output["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|kv| kv[0] == "switchboard-replay")
            .unwrap();
        assert_eq!(mark[1], replay.as_str());
        assert!(
            first.iter().any(|f| f["id"] == output["id"]),
            "a replayed output has the id it had the first time: {output}"
        );
    }
    // The plugin saw them as first attempts and handled them.
    assert_eq!(r.status("notification").queue.unwrap().dead_lettered, 0);
}

/// Unmounts a test's tmpfs when the test ends, whatever happened.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A disk that fills up: `state_dir` on a 4 MiB tmpfs. Ingress answers 503
/// with the reason once the archive cannot store an event, and every event
/// answered 202 is in the archive.
#[test]
fn a_full_disk_refuses_ingress_with_503_and_acknowledges_only_what_is_stored() {
    let disk = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(disk.path())
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI runs as root: a tmpfs must mount"
        );
        eprintln!("skipped: filling a disk needs a tmpfs mount (root)");
        return;
    }
    let _unmount = Mounted(disk.path().to_path_buf());
    let config = format!(
        r#"
plugins_dir = "plugins"
state_dir = "{}"
[runtime]
cache = false
[[exchanges]]
name = "events"
[plugins.notification]
[[routes]]
exchange = "events"
pattern = "nothing.routes.here"
plugin = "notification"
[archive]
enabled = true
segment_size = "256KiB"
"#,
        disk.path().join("state").display()
    );
    let r = start(&config, &[("notification.wasm", "notification")]);
    let padding = "x".repeat(16 * 1024);
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..1000 {
        let (status, reply, _) = r.post(
            "events",
            "audit.recorded",
            &json!({"n": i, "padding": padding}),
        );
        match status {
            202 => accepted.push(reply["id"].as_str().unwrap().to_string()),
            503 => {
                refused = Some(reply);
                break;
            }
            other => panic!("{other}: {reply}"),
        }
    }
    let refused = refused.expect("a 4 MiB disk fills up");
    let why = refused["error"].as_str().unwrap();
    assert!(
        why.contains("archive") && why.contains("No space left on device"),
        "{why}"
    );
    assert!(accepted.len() > 100, "{} accepted", accepted.len());
    // The disk stays full: still refused, still said.
    let (status, reply, _) = r.post("events", "audit.recorded", &json!({"padding": padding}));
    assert_eq!(status, 503, "{reply}");

    let (code, archived, stderr) = cli(&r.dir, &["events"]);
    assert_eq!(code, 0, "{stderr}");
    let stored: std::collections::HashSet<&str> =
        archived.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|id| !stored.contains(id.as_str()))
        .collect();
    assert!(missing.is_empty(), "answered 202, not stored: {missing:?}");
    eprintln!(
        "full disk: {} answered 202, all {} in the archive; then 503: {why}",
        accepted.len(),
        accepted.len() - missing.len()
    );
}

/// The archived `emitted.*` outputs tagged `tag`: (i, archived at, ms since the epoch).
fn archived_emits(dir: &std::path::Path, tag: &str) -> Vec<(u64, i64)> {
    let (code, lines, stderr) = cli(dir, &["events", "--match", "emitted.#"]);
    assert_eq!(code, 0, "{stderr}");
    let mut found: Vec<(u64, i64)> = lines
        .iter()
        .filter(|e| e["body"]["data"]["tag"] == tag)
        .map(|e| {
            let at = switchboard::archive::parse_time(e["time"].as_str().unwrap()).unwrap();
            (
                e["body"]["data"]["i"].as_u64().unwrap(),
                at.timestamp_millis(),
            )
        })
        .collect();
    found.sort_unstable();
    found
}

/// Delayed outputs on the embedded bus wait in `state_dir/timers.redb`: they
/// are visible while they wait, survive a `kill -9` of the router, and are
/// published no earlier than asked and at most a second late.
#[test]
fn delayed_outputs_survive_kill_9_and_arrive_on_time() {
    use switchboard_tests::process::Replica;

    let toml = worker_config("", &["emit"])
        + "[archive]\nenabled = true\n[[routes]]\nexchange = \"events\"\npattern = \"never\"\nplugin = \"worker\"\n";
    let mut replica = Replica::start(&toml, &[("worker.wasm", "scripted_guest")]);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    const N: u64 = 8;
    let (first, step) = (5_000, 250);
    let before = epoch_ms();
    let response = agent
        .post(&format!("{}/events/events/emit", replica.url))
        .header("content-type", "application/json")
        .send(json!({"count": N, "delay_ms": first, "step_ms": step, "tag": "k9"}).to_string())
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    // Handled (and so scheduled) once they are counted as waiting.
    switchboard_tests::wait_until(
        "the delayed outputs waiting",
        Duration::from_secs(10),
        || replica.plugin("worker")["queue"]["waiting_delayed"] == N,
    );
    let handled_by = epoch_ms();
    let metrics = agent
        .get(&format!("{}/metrics", replica.url))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        metrics.contains(&format!("switchboard_delayed_outputs_waiting {N}")),
        "{metrics}"
    );
    assert!(
        archived_emits(replica.dir(), "k9").is_empty(),
        "published before their time"
    );
    replica.kill();
    replica.restart();
    replica.wait_alive(Duration::from_secs(60));
    assert!(
        epoch_ms() < before + first,
        "the restart took longer than the first delay: the test shows nothing"
    );
    switchboard_tests::wait_until("every delayed output", Duration::from_secs(30), || {
        archived_emits(replica.dir(), "k9").len() as u64 >= N
    });
    let arrived = archived_emits(replica.dir(), "k9");
    assert_eq!(
        arrived.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..N).collect::<Vec<_>>(),
        "each delayed output published once"
    );
    for (i, at) in &arrived {
        let asked = first + step * *i as i64;
        assert!(
            at - before >= asked,
            "output {i} came {} ms early",
            asked - (at - before)
        );
        let late = at - (handled_by + asked);
        assert!(late <= 1_000, "output {i} came {late} ms late");
    }
    assert_eq!(replica.plugin("worker")["queue"]["waiting_delayed"], 0);
}

/// A delay that is negative, not a number of milliseconds or beyond the
/// plugin's `max_delay` fails the event as `invalid_output`, with the reason,
/// and publishes none of its outputs.
#[test]
fn bad_delays_are_invalid_outputs() {
    let r = start(
        &worker_config("max_delay = \"1m\"", &["emit"]),
        &[("worker.wasm", "scripted_guest")],
    );
    let cases = [
        (json!("-5"), "negative"),
        (json!("soon"), "not a whole number of milliseconds"),
        (json!("1.5"), "not a whole number of milliseconds"),
        (json!(60_001), "longer than max_delay"),
    ];
    for (delay, _) in &cases {
        let (status, _, _) = r.post("events", "emit", &json!({"delay_ms": delay, "tag": "bad"}));
        assert_eq!(status, 202);
    }
    r.wait_for("the dead letters", |r| {
        r.get("/api/dlq/worker")["items"]
            .as_array()
            .is_some_and(|d| d.len() == cases.len())
    });
    let letters = r.get("/api/dlq/worker")["items"].clone();
    for (delay, why) in &cases {
        let letter = letters
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["message"]["data"]["delay_ms"] == *delay)
            .unwrap_or_else(|| panic!("no dead letter for {delay}: {letters}"));
        assert_eq!(letter["kind"], "invalid_output", "{letter}");
        let reason = letter["reason"].as_str().unwrap();
        assert!(reason.contains(why), "{delay}: {reason}");
    }
    let q = r.status("worker").queue.unwrap();
    assert_eq!(q.waiting_delayed, 0, "nothing was scheduled");
}

/// A delayed output whose exchange is gone from router.toml by the time it is
/// due is not lost: it is dead-lettered in the plugin's dead-letter queue with
/// the reason.
#[test]
fn a_delayed_output_whose_exchange_is_gone_when_due_is_dead_lettered() {
    let with_later = worker_config("", &["emit"]) + "[[exchanges]]\nname = \"later\"\n";
    let r = start(&with_later, &[("worker.wasm", "scripted_guest")]);
    let (status, _, _) = r.post(
        "events",
        "emit",
        &json!({"exchange": "later", "delay_ms": 2_000, "tag": "gone"}),
    );
    assert_eq!(status, 202);
    r.wait_for("the delayed output waiting", |r| {
        r.status("worker").queue.unwrap().waiting_delayed == 1
    });
    r.write_config(&worker_config("", &["emit"]));
    r.wait_for("the dead letter", |r| {
        r.get("/api/dlq/worker")["items"]
            .as_array()
            .is_some_and(|d| !d.is_empty())
    });
    let letter = r.get("/api/dlq/worker")["items"][0].clone();
    assert_eq!(letter["kind"], "invalid_output", "{letter}");
    assert_eq!(letter["exchange"], "later");
    assert_eq!(letter["message"]["data"]["tag"], "gone");
    assert!(
        letter["reason"].as_str().unwrap().contains("when due"),
        "{letter}"
    );
    // The timer leaves the store (a durable commit) once its letter is kept.
    r.wait_for("the timer to be gone", |r| {
        r.status("worker").queue.unwrap().waiting_delayed == 0
    });
}
