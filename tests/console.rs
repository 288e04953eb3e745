//! The console in a real browser: Debian's `chromium` driven by `playwright-core`
//! (tests/console/console.test.mjs) against an appliance running here. Each test
//! sets the scene (events flowing, dead letters, a broken plugin file, a token)
//! and runs one scenario of the script.
//!
//! Needs `node` and `/usr/bin/chromium`; the npm dependency is installed with
//! `npm ci` in tests/console when missing. Without node or chromium the tests
//! say so loudly and pass, except under `CI=true`, where they fail.
//! `make console-screenshots` saves the README's pictures in docs/console/.
//! One test runs on the local RabbitMQ (a vhost of its own); without a broker
//! it is skipped, except under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard_tests::broker::{TestVhost, require_broker};
use switchboard_tests::running::{Running, start};
use switchboard_tests::wasm;

const TOKEN: &str = "console-test-token-0123456789";

fn console_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("console")
}

/// One browser at a time (CPU is shared with the rest of the suite), and `npm
/// ci` once. `Ok(false)`: skip (no node or chromium, outside CI).
static READY: Mutex<Option<bool>> = Mutex::new(None);

fn ensure_ready() -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let missing = |what: &str| {
        assert!(
            !ci,
            "{what} is missing, and CI=true: the console tests must run"
        );
        eprintln!(
            "\n*** SKIPPING the console browser tests: {what} is missing \
             (apt-get install chromium nodejs npm) ***\n"
        );
        false
    };
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return missing(&chromium);
    }
    if Command::new("node").arg("--version").output().is_err() {
        return missing("node");
    }
    if !console_dir().join("node_modules/playwright-core").exists() {
        let output = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(console_dir())
            .output();
        match output {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "npm ci in tests/console failed:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(_) => return missing("npm"),
        }
    }
    true
}

/// Runs one scenario of console.test.mjs against `r`, one browser at a time;
/// false when skipped.
fn scenario(name: &str, r: &Running, extra: Option<&str>) -> bool {
    scenario_with(name, r, extra.as_slice())
}

/// [`scenario`] with any number of extra arguments.
fn scenario_with(name: &str, r: &Running, extra: &[&str]) -> bool {
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    if !*ready.get_or_insert_with(ensure_ready) {
        return false;
    }
    let started = Instant::now();
    let output = Command::new("node")
        .arg(console_dir().join("console.test.mjs"))
        .args([name, &r.url])
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "scenario {name} failed:\n{text}");
    eprintln!("{} ({:.1?})", text.trim(), started.elapsed());
    true
}

/// The component at `path` with the text `from` replaced by `to` (as long).
fn patched(path: &Path, from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from:?} is not in {}", path.display()));
    bytes[at..at + from.len()].copy_from_slice(to.as_bytes());
    bytes
}

/// Posts events from a thread until dropped: `next(i)` gives (routing key, envelope).
struct Feeder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Feeder {
    fn start(
        r: &Running,
        every: Duration,
        next: impl Fn(u64) -> (String, Value) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let url = r.url.clone();
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let mut i = 0;
            while !stopped.load(Ordering::Relaxed) {
                let (key, body) = next(i);
                let _ = agent
                    .post(&format!("{url}/events/events/{key}"))
                    .header("content-type", "application/json")
                    .send(body.to_string());
                i += 1;
                std::thread::sleep(every);
            }
        });
        Feeder {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn envelope(id: &str, kind: &str) -> Value {
    json!({"id": id, "type": kind, "source": "console-test", "correlation_id": format!("corr-{id}"), "data": {}})
}

/// `worker` (on `worker.wasm`) gets `patterns` of exchange `events`.
fn worker_config(extra: &str, patterns: &str) -> String {
    format!(
        "plugins_dir = \"plugins\"\nstate_dir = \"state\"\n{extra}\n\
         [defaults.backoff]\ninitial = \"10ms\"\nmax = \"20ms\"\njitter = 0.0\n\
         [[exchanges]]\nname = \"events\"\n[plugins.worker]\n\
         [[routes]]\nexchange = \"events\"\npatterns = {patterns}\nplugin = \"worker\"\n"
    )
}

#[test]
fn the_overview_shows_rates_moving_while_events_flow() {
    let r = start(
        &worker_config("", r#"["echo"]"#),
        &[("worker.wasm", "scripted_guest")],
    );
    let _feeder = Feeder::start(&r, Duration::from_millis(10), |i| {
        ("echo".into(), envelope(&format!("e-{i}"), "echo"))
    });
    scenario("overview", &r, None);
}

#[test]
fn the_live_stream_shows_only_what_the_filter_matches() {
    let r = start(
        &worker_config("", r#"["ok"]"#),
        &[("worker.wasm", "scripted_guest")],
    );
    let _feeder = Feeder::start(&r, Duration::from_millis(20), |i| {
        let key = format!("{}.{i}", if i % 2 == 0 { "keep" } else { "drop" });
        (key.clone(), envelope(&format!("s-{i}"), &key))
    });
    scenario("stream", &r, None);
}

#[test]
fn a_dead_letter_opened_and_redriven_leaves_the_dlq_and_is_handled() {
    let r = dead_letters_of_a_broken_release("dl", 2);
    scenario("dlq", &r, None);
}

/// A broken release of `worker` dead-letters `count` events, `<prefix>-0`
/// first (one attempt allowed); then the fixed one is hot-reloaded, to handle
/// them when they are redriven.
fn dead_letters_of_a_broken_release(prefix: &str, count: usize) -> Running {
    let r = start(
        &worker_config("[defaults]\nmax_attempts = 1", r#"["ok"]"#),
        &[("worker.wasm", "trap_guest")],
    );
    for i in 0..count {
        let id = format!("{prefix}-{i}");
        let (status, reply, _) = r.post("events", "ok", &envelope(&id, "ok"));
        assert_eq!(status, 202, "{reply}");
        // One at a time, so that they are dead-lettered in order.
        r.wait_for("a dead letter", |r| {
            r.status("worker").queue.unwrap().dead_letters == i + 1
        });
    }
    let broken = r.status("worker").version;
    r.write_plugin(
        "worker.wasm",
        &std::fs::read(wasm("scripted_guest")).unwrap(),
    );
    r.wait_for("the fixed plugin", |r| r.status("worker").version != broken);
    r
}

#[test]
fn chosen_dead_letters_are_redriven_and_the_rest_stay() {
    let r = dead_letters_of_a_broken_release("sel", 3);
    scenario("select", &r, None);
}

#[test]
fn a_candidate_is_diffed_against_the_archive_in_the_history_view() {
    let config = r#"
plugins_dir = "plugins"
state_dir = "state"
[[exchanges]]
name = "events"
[plugins.notification]
[[routes]]
exchange = "events"
patterns = ["order.*"]
plugin = "notification"
[archive]
enabled = true
[[archive.aggregates]]
match = "order.*"
field = "data.order_id"
"#;
    let r = start(config, &[("notification.wasm", "notification")]);
    for (id, kinds) in [
        ("O-1", &["order.created", "order.paid", "order.shipped"][..]),
        ("O-2", &["order.created", "order.shipped"][..]),
    ] {
        for kind in kinds {
            let data = json!({"order_id": id, "items": [{"sku": "A-1", "qty": 2}], "total": 40,
                "amount": 40, "currency": "EUR", "tracking_number": format!("T-{id}"),
                "email": "ann@example.com", "customer": {"email": "ann@example.com"}});
            let (status, reply, _) = r.post("events", kind, &data);
            assert_eq!(status, 202, "{reply}");
        }
    }
    let archived = |r: &Running, aggregate: &str| {
        r.get(&format!("/api/events?aggregate={aggregate}"))["items"]
            .as_array()
            .map_or(0, Vec::len)
    };
    r.wait_for("both orders archived", |r| {
        archived(r, "O-1") == 3 && archived(r, "O-2") == 2
    });
    // A copy of notification whose order.shipped subject reads differently.
    let candidate = r.dir.join("notification-candidate.wasm");
    std::fs::write(
        &candidate,
        patched(&wasm("notification"), "has shipped", "was shipped"),
    )
    .unwrap();
    scenario("diff", &r, Some(candidate.to_str().unwrap()));
}

/// The overview and dead-letter scenarios again, on RabbitMQ (a vhost of its
/// own): the console reads the same API whatever the bus.
#[test]
fn on_rabbitmq_rates_move_and_a_dead_letter_is_redriven() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("console");
    let broker = format!(
        "[broker]\nurl = \"{}\"\ntimeout = \"5s\"\n[defaults]\nmax_attempts = 1",
        vhost.url()
    );
    // As on the embedded bus: a broken release dead-letters two events...
    let r = start(
        &worker_config(&broker, r#"["ok", "echo"]"#),
        &[("worker.wasm", "trap_guest")],
    );
    assert_eq!(
        r.get("/api/console")["bus"],
        "rabbitmq",
        "the page says which bus"
    );
    let dead = |r: &Running| r.appliance.transport().dead_letters("worker", 10).unwrap();
    for i in 0..2 {
        let (status, reply, _) = r.post("events", "ok", &envelope(&format!("dl-{i}"), "ok"));
        assert_eq!(status, 202, "{reply}");
        r.wait_for("a dead letter", |r| dead(r).len() == i + 1);
    }
    // ...the fixed one, hot-reloaded, handles them when redriven...
    let broken = r.status("worker").version;
    r.write_plugin(
        "worker.wasm",
        &std::fs::read(wasm("scripted_guest")).unwrap(),
    );
    r.wait_for("the fixed plugin", |r| r.status("worker").version != broken);
    if !scenario("dlq", &r, None) {
        return;
    }
    // ...and with events flowing, the overview's rates move.
    let _feeder = Feeder::start(&r, Duration::from_millis(10), |i| {
        ("echo".into(), envelope(&format!("e-{i}"), "echo"))
    });
    scenario("overview", &r, None);
}

#[test]
fn a_refused_reload_shows_its_reason() {
    let r = start(
        &worker_config("", r#"["ok"]"#),
        &[("worker.wasm", "scripted_guest")],
    );
    r.write_plugin("worker.wasm", b"this is not a WebAssembly component");
    scenario("reload", &r, None);
}

#[test]
fn with_a_token_an_action_asks_for_it_and_works_with_it() {
    let r = start(
        &worker_config(&format!("[http]\ntoken = \"{TOKEN}\""), r#"["ok"]"#),
        &[("worker.wasm", "scripted_guest")],
    );
    scenario("token", &r, Some(TOKEN));
}

/// Makes the README's pictures, docs/console/<view>.png, with the shipped
/// plugins and router.toml, events flowing: `make console-screenshots`.
#[test]
#[ignore = "makes the README's pictures: make console-screenshots"]
fn screenshots_for_the_readme() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = std::fs::read_to_string(root.join("router.toml"))
        .unwrap()
        .replace("state_dir = \".switchboard\"", "state_dir = \"state\"");
    let r = start(
        &config,
        &[
            ("billing.wasm", "billing"),
            ("orders.wasm", "orders"),
            ("notification.wasm", "notification"),
            ("analytics.wasm", "analytics"),
        ],
    );
    // Bills: created, some paid, some paid without a payment id (dead letters).
    let customer = json!({"name": "Ann", "email": "ann@example.com"});
    let _feeder = Feeder::start(&r, Duration::from_millis(40), move |i| {
        let bill = format!("B-{}", i / 3);
        match i % 3 {
            0 => (
                "bill.created".into(),
                json!({"bill_id": bill, "amount": 12 + i, "currency": "EUR", "customer": customer}),
            ),
            1 => (
                "payment.success".into(),
                json!({"bill_id": bill, "amount": 12 + i - 1, "payment_id": format!("P-{i}")}),
            ),
            _ if i % 30 == 2 => (
                "payment.success".into(),
                json!({"bill_id": bill, "amount": 1}),
            ),
            _ => (
                "order.created".into(),
                json!({"order_id": format!("O-{i}"), "items": [{"sku": "A-1", "qty": 1}]}),
            ),
        }
    });
    // A notification candidate whose bill.paid email shouts its thanks.
    let candidate = r.dir.join("notification-candidate.wasm");
    std::fs::write(
        &candidate,
        patched(&wasm("notification"), "Thank you: bill", "THANK YOU: bill"),
    )
    .unwrap();
    let out = root.join("docs/console");
    std::fs::create_dir_all(&out).unwrap();
    let extra = [out.to_str().unwrap(), candidate.to_str().unwrap()];
    if scenario_with("screenshots", &r, &extra) {
        eprintln!("screenshots in {}", out.display());
    }
}
