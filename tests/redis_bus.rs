//! The Redis Streams bus end to end (issue 21), on the shared Redis at
//! 127.0.0.1:6379, each test under a key prefix of its own (removed when it
//! ends): the seed plugins, retries and dead letters with the same headers
//! and reasons as on RabbitMQ, redrive, replicas sharing the work, a replica
//! killed with SIGKILL, the CLI, and a Redis restart (a throwaway server).

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard::bus::redis::{Keys, Link, tools};
use switchboard::bus::{Message, Published};
use switchboard::config::Secret;
use switchboard_tests::process::Replica;
use switchboard_tests::redis::{RedisNamespace, ThrowawayRedis, require_redis};
use switchboard_tests::running::{Running, start};
use switchboard_tests::wait_until;

/// A publisher and reader on one prefix, as a service would be.
struct Client {
    link: Link,
    keys: Keys,
}

impl Client {
    fn new(url: &str, prefix: &str) -> Self {
        Self {
            link: Link::new(&Secret::new(url), Duration::from_secs(5), 4).unwrap(),
            keys: Keys::new(prefix),
        }
    }

    /// Publishes a JSON event; whether a route takes it.
    fn publish(&self, exchange: &str, key: &str, body: &Value) -> bool {
        let message = Message {
            body: body.to_string().into_bytes().into(),
            content_type: Some("application/json".into()),
            ..Message::default()
        };
        tools::publish_one(&self.link, &self.keys, exchange, key, &message, 1_000_000).unwrap()
    }

    /// Everything on `exchange`'s stream.
    fn all(&self, exchange: &str) -> Vec<Published> {
        self.try_all(exchange).unwrap()
    }

    /// Everything on `exchange`'s stream, or why Redis did not answer (a
    /// pooled connection a restart closed fails once).
    fn try_all(&self, exchange: &str) -> Result<Vec<Published>, switchboard::bus::BusError> {
        let mut out = Vec::new();
        let mut after = "-".to_string();
        loop {
            let got = tools::range(&self.link, &self.keys, exchange, &after, 1000)?;
            let Some((last, _)) = got.last() else {
                return Ok(out);
            };
            after = last.clone();
            out.extend(got.into_iter().map(|(_, p)| p));
        }
    }

    /// Waits until `exchange` holds `n` messages whose key `key` matches; them.
    fn wait(&self, exchange: &str, pred: impl Fn(&Published) -> bool, n: usize) -> Vec<Published> {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let got: Vec<Published> = self.all(exchange).into_iter().filter(|p| pred(p)).collect();
            if got.len() >= n || Instant::now() > until {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn json_of(p: &Published) -> Value {
    serde_json::from_slice(&p.message.body).unwrap()
}

fn seed(file: &str, ns: &RedisNamespace) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("rabbit")
        .join(file);
    let text = std::fs::read_to_string(path).unwrap();
    let at = text.find("[broker]\n").unwrap();
    let end = at + text[at..].find("\n\n").unwrap();
    format!(
        "{}[broker]\nkind = \"redis-streams\"\nurl = \"{}\"\nprefix = \"{}\"\n{}",
        &text[..at],
        ns.url,
        ns.prefix,
        &text[end..]
    )
}

fn handled(r: &Running, plugin: &str) -> u64 {
    r.appliance
        .statuses()
        .into_iter()
        .find(|s| s.name == plugin)
        .and_then(|s| s.dispatch)
        .map_or(0, |d| d.handled.load(std::sync::atomic::Ordering::SeqCst))
}

fn worker_config(ns: &RedisNamespace, extra: &str) -> String {
    format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[broker]
kind = "redis-streams"
url = "{url}"
prefix = "{prefix}"
timeout = "3s"
{extra}
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
"##,
        url = ns.url,
        prefix = ns.prefix,
    )
}

fn envelope(id: &str, kind: &str) -> Value {
    json!({"id": id, "type": kind, "source": "tests", "data": {"ms": 2}})
}

/// The ids the worker echoed on `out`, with how many times each.
fn echoed(client: &Client) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    // Asked again when a connection the Redis restart closed fails.
    let all = (0..5)
        .find_map(|_| client.try_all("out").ok())
        .expect("Redis answers");
    for p in all {
        if let Some(id) = p.message.header("echo-of") {
            *seen.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    seen
}

#[test]
fn the_commerce_bus_bills_notifies_and_counts_on_redis() {
    if !require_redis() {
        return;
    }
    let ns = RedisNamespace::shared("rbus-commerce");
    let r = start(
        &seed("commerce.toml", &ns),
        &[
            ("billing.wasm", "billing"),
            ("notification.wasm", "notification"),
            ("analytics.wasm", "analytics"),
        ],
    );
    assert!(r.appliance.transport().redis().is_some());
    wait_until("the bus to be ready", Duration::from_secs(10), || {
        r.appliance.is_ready()
    });
    let c = Client::new(&ns.url, &ns.prefix);
    let customer = json!({"name": "Ann Lee", "email": "ann@example.com", "phone": "+33612345678"});
    let bill = json!({"id": "evt-1001", "type": "bill.created", "source": "billing-api",
        "timestamp": "2026-11-22T09:00:00Z", "tenant_id": "acme", "correlation_id": "order-77",
        "data": {"bill_id": "B-1001", "amount": 129.9, "currency": "EUR", "customer": customer}});
    assert!(c.publish("payments", "bill.created", &bill));
    let payment = json!({"id": "evt-1002", "type": "payment.success", "source": "payments-api",
        "timestamp": "2026-11-22T09:05:00Z", "tenant_id": "acme", "correlation_id": "order-77",
        "data": {"bill_id": "B-1001", "payment_id": "PAY-1", "amount": 129.9, "currency": "EUR",
                 "customer": customer}});
    std::thread::sleep(Duration::from_millis(300));
    assert!(c.publish("payments", "payment.success", &payment));
    let shipped = json!({"id": "evt-1003", "type": "order.shipped", "source": "orders-api",
        "tenant_id": "acme", "correlation_id": "order-77",
        "data": {"order_id": "O-77", "carrier": "DHL", "tracking": "JD0146", "customer": customer}});
    assert!(c.publish("orders", "order.shipped", &shipped));
    let signup = json!({"id": "evt-1004", "type": "user.created", "source": "accounts-api",
        "tenant_id": "acme", "data": {"user_id": "U-1", "user": {"name": "Ann Lee", "email": "ann@example.com"}}});
    assert!(c.publish("customers", "user.created", &signup));
    // Declared, nobody routes it.
    let product = json!({"id": "evt-1005", "type": "product.updated", "data": {}});
    assert!(!c.publish("products", "product.updated", &product));

    let paid = c.wait("payments", |p| p.routing_key == "bill.paid", 1);
    assert_eq!(paid.len(), 1);
    let paid = json_of(&paid[0]);
    assert_eq!(paid["source"], "billing");
    assert_eq!(paid["correlation_id"], "order-77");
    assert_eq!(paid["causation_id"], "evt-1002");

    // bill.paid and order.shipped (email + SMS: the customer has a phone),
    // user.created (email).
    c.wait(
        "notifications",
        |p| p.routing_key.starts_with("notification."),
        5,
    );
    std::thread::sleep(Duration::from_millis(300));
    let mails: Vec<Published> = c
        .all("notifications")
        .into_iter()
        .filter(|p| p.routing_key.starts_with("notification."))
        .collect();
    let mut kinds: Vec<(String, String)> = mails
        .iter()
        .map(|m| {
            let template = json_of(m)["data"]["template_id"]
                .as_str()
                .unwrap_or("")
                .to_string();
            (template, m.routing_key.clone())
        })
        .collect();
    kinds.sort();
    let expected: Vec<(String, String)> = [
        ("bill.paid", "notification.email"),
        ("bill.paid", "notification.sms"),
        ("order.shipped", "notification.email"),
        ("order.shipped", "notification.sms"),
        ("user.created", "notification.email"),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
    .collect();
    assert_eq!(kinds, expected, "each event notified once");
    assert!(mails.iter().all(|m| {
        let j = json_of(m);
        j["correlation_id"] == "order-77" || j["causation_id"] == "evt-1004"
    }));
    assert!(mails.iter().any(|m| m.routing_key == "notification.sms"));

    // Analytics: a copy on the fanout (any key) and one on the direct exchange;
    // "dead.letter" on the direct exchange matches no binding key.
    let copy =
        json!({"id": "evt-2001", "type": "page.viewed", "source": "web", "data": {"path": "/"}});
    assert!(c.publish("analytics", "page.viewed", &copy));
    let dead =
        json!({"id": "evt-2002", "type": "order.failed", "source": "orders-api", "data": {}});
    assert!(c.publish("deadletter", "dead", &dead));
    assert!(!c.publish("deadletter", "dead.letter", &dead));
    wait_until("analytics to handle two", Duration::from_secs(20), || {
        handled(&r, "analytics") >= 2
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(handled(&r, "analytics"), 2, "the unmatched key was skipped");
    assert_eq!(handled(&r, "billing"), 2);
    for plugin in ["billing", "notification", "analytics"] {
        let dead = r.appliance.transport().dead_letters(plugin, 10).unwrap();
        assert!(dead.is_empty(), "{plugin}: {dead:?}");
    }
    drop(r);
}

#[test]
fn retries_then_dead_letter_with_reasons_and_redrive() {
    if !require_redis() {
        return;
    }
    let ns = RedisNamespace::shared("rbus-retry");
    let r = start(
        &worker_config(&ns, ""),
        &[("worker.wasm", "scripted_guest")],
    );
    let c = Client::new(&ns.url, &ns.prefix);
    assert!(c.publish("events", "retry", &envelope("r-1", "retry")));
    assert!(c.publish("events", "reject", &envelope("j-1", "reject")));
    assert!(c.publish("events", "echo", &envelope("e-1", "echo")));
    // An entry that is not a message (no body): dead-lettered as undecodable.
    let raw = Command::new("redis-cli")
        .args([
            "-u",
            &ns.url,
            "XADD",
            &format!("{}:x:events", ns.prefix),
            "*",
        ])
        .args(["routing_key", "odd.entry", "noise", "x"])
        .output()
        .unwrap();
    assert!(raw.status.success());

    let transport = r.appliance.transport();
    wait_until("three dead letters", Duration::from_secs(30), || {
        transport.dead_letters("worker", 10).unwrap().len() == 3
    });
    let letters = transport.dead_letters("worker", 10).unwrap();
    let by_kind: HashMap<&str, &switchboard::bus::DeadLetter> = letters
        .iter()
        .map(|l| (l.failure.kind.as_str(), l))
        .collect();
    let retried = by_kind["retry"];
    assert_eq!(retried.failure.attempts, 3, "max_attempts = 3");
    assert_eq!(retried.failure.reason, "asked to retry");
    assert!(!retried.failure.plugin_version.is_empty());
    assert!(!retried.failure.first_failure.is_empty());
    assert!(!retried.at.is_empty());
    assert_eq!(retried.delivered.exchange, "events");
    assert_eq!(retried.delivered.routing_key, "retry");
    assert_eq!(
        retried.delivered.message.header("switchboard-error-kind"),
        Some("retry")
    );
    let rejected = by_kind["reject"];
    assert_eq!(rejected.failure.attempts, 1);
    assert_eq!(rejected.failure.reason, "asked to reject");
    let odd = by_kind["undecodable"];
    assert!(
        odd.failure.reason.contains("no body field"),
        "{:?}",
        odd.failure
    );
    assert_eq!(odd.delivered.routing_key, "odd.entry");
    // The echo went through once.
    assert_eq!(echoed(&c).get("e-1"), Some(&1));
    let json = letters[0].to_json();
    for key in [
        "kind",
        "reason",
        "attempts",
        "plugin_version",
        "first_failure",
        "dead_lettered_at",
    ] {
        assert!(!json[key].is_null(), "{key} in {json}");
    }

    // Redrive the rejected one's kind: all three go back as first attempts;
    // they fail again the same way (the retry one after three attempts again).
    let moved = transport.redrive("worker", 10).unwrap();
    assert_eq!(moved, 3);
    assert!(transport.dead_letters("worker", 10).unwrap().len() < 3);
    wait_until("three dead letters again", Duration::from_secs(30), || {
        transport.dead_letters("worker", 10).unwrap().len() == 3
    });
    let again = transport.dead_letters("worker", 10).unwrap();
    let retried_again = again.iter().find(|l| l.failure.kind == "retry").unwrap();
    assert_eq!(
        retried_again.failure.attempts, 3,
        "attempts reset by the redrive"
    );
    assert_ne!(
        retried_again.failure.first_failure, retried.failure.first_failure,
        "a new first failure"
    );
    drop(r);
}

#[test]
fn two_replicas_share_the_work_without_duplicates_or_losses() {
    if !require_redis() {
        return;
    }
    let ns = RedisNamespace::shared("rbus-replicas");
    let config = worker_config(&ns, "");
    let a = start(&config, &[("worker.wasm", "scripted_guest")]);
    let b = start(&config, &[("worker.wasm", "scripted_guest")]);
    let c = Client::new(&ns.url, &ns.prefix);
    let n = 300;
    for i in 0..n {
        let event = json!({"id": format!("w-{i}"), "type": "echo", "data": {"sleep_ms": 3}});
        assert!(c.publish("events", "echo", &event));
    }
    wait_until("every event echoed", Duration::from_secs(60), || {
        echoed(&c).len() == n
    });
    std::thread::sleep(Duration::from_millis(500));
    let seen = echoed(&c);
    assert_eq!(seen.len(), n, "none lost");
    let twice: Vec<_> = seen.iter().filter(|(_, k)| **k > 1).collect();
    assert!(twice.is_empty(), "duplicates: {twice:?}");
    let (ha, hb) = (handled(&a, "worker"), handled(&b, "worker"));
    assert_eq!(ha + hb, n as u64);
    assert!(ha > 0 && hb > 0, "both replicas worked: {ha} and {hb}");
    let (ca, cb) = (
        a.appliance
            .transport()
            .redis()
            .unwrap()
            .consumer()
            .to_string(),
        b.appliance
            .transport()
            .redis()
            .unwrap()
            .consumer()
            .to_string(),
    );
    assert_ne!(ca, cb, "one consumer name per replica");
    drop(a);
    drop(b);
}

#[test]
fn a_replica_killed_with_sigkill_loses_nothing() {
    if !require_redis() {
        return;
    }
    let ns = RedisNamespace::shared("rbus-kill");
    let config = worker_config(&ns, "claim_idle = \"2s\"");
    let mut first = Replica::start(&config, &[("worker.wasm", "scripted_guest")]);
    let c = Client::new(&ns.url, &ns.prefix);
    let n = 400;
    let publisher = {
        let (url, prefix) = (ns.url.clone(), ns.prefix.clone());
        std::thread::spawn(move || {
            let c = Client::new(&url, &prefix);
            for i in 0..n {
                let event =
                    json!({"id": format!("k-{i}"), "type": "echo", "data": {"sleep_ms": 10}});
                assert!(c.publish("events", "echo", &event));
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // Kill it mid-way, with deliveries in its workers' hands.
    wait_until("some events handled", Duration::from_secs(30), || {
        echoed(&c).len() >= 50
    });
    first.kill();
    let at_kill = echoed(&c).len();
    assert!(at_kill < n, "killed before the end ({at_kill})");
    // A new process (a new consumer) while the publisher keeps going.
    let second = Replica::start(&config, &[("worker.wasm", "scripted_guest")]);
    publisher.join().unwrap();
    wait_until("every event echoed", Duration::from_secs(90), || {
        echoed(&c).len() == n
    });
    let seen = echoed(&c);
    assert_eq!(seen.len(), n, "0 lost");
    for i in 0..n {
        assert!(seen.contains_key(&format!("k-{i}")), "k-{i} lost");
    }
    drop(second);
}

fn switchboard(ns: &RedisNamespace, args: &[&str]) -> (i32, String, String) {
    let binary = switchboard_tests::target_dir().join("release/switchboard");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("router.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nkind = \"redis-streams\"\nprefix = \"{}\"\n",
            ns.prefix
        ),
    )
    .unwrap();
    let output = Command::new(binary)
        .args(args)
        .arg("--config")
        .arg(&config)
        .env_remove("RABBITMQ_URL")
        .env("REDIS_BUS_URL", &ns.url)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_cli_publishes_tails_lists_and_redrives_on_redis() {
    if !require_redis() {
        return;
    }
    let ns = RedisNamespace::shared("rbus-cli");
    let r = start(
        &worker_config(&ns, ""),
        &[("worker.wasm", "scripted_guest")],
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("router.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nkind = \"redis-streams\"\nprefix = \"{}\"\n",
            ns.prefix
        ),
    )
    .unwrap();
    let tail = Command::new(switchboard_tests::target_dir().join("release/switchboard"))
        .args([
            "tail",
            "out",
            "echoed",
            "--limit",
            "2",
            "--duration",
            "30s",
            "--config",
        ])
        .arg(&config)
        .env("REDIS_BUS_URL", &ns.url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    for id in ["cli-1", "cli-2"] {
        let body = envelope(id, "echo").to_string();
        let (code, out, err) = switchboard(&ns, &["publish", "events", "echo", &body]);
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
    let tailed_ids: HashSet<&str> = lines
        .iter()
        .map(|l| l["headers"]["echo-of"].as_str().unwrap())
        .collect();
    assert_eq!(tailed_ids, HashSet::from(["cli-1", "cli-2"]));

    let (code, out, _) = switchboard(&ns, &["publish", "out", "nobody.listens", "{}"]);
    assert_eq!(code, 1);
    assert!(out.contains("\"routed\":false"), "{out}");
    let (code, _, err) = switchboard(&ns, &["publish", "nowhere", "k", "{}"]);
    assert_ne!(code, 0);
    assert!(err.contains("\"nowhere\" is not declared"), "{err}");

    for id in ["dead-1", "dead-2", "dead-3"] {
        let body = envelope(id, "reject").to_string();
        assert_eq!(
            switchboard(&ns, &["publish", "events", "reject", &body]).0,
            0
        );
    }
    let listed = || {
        let (code, out, err) = switchboard(&ns, &["dlq", "list", "worker"]);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    wait_until("three dead letters", Duration::from_secs(20), || {
        listed().len() == 3
    });
    assert!(
        listed().iter().all(|l| l["kind"] == "reject"
            && l["reason"] == "asked to reject"
            && l["attempts"] == 1)
    );
    let (code, out, _) = switchboard(&ns, &["dlq", "redrive", "worker", "--limit", "2"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap(),
        json!({"redriven": 2})
    );
    // Redriven, rejected again: three letters once more, one untouched.
    wait_until("the redriven ones back", Duration::from_secs(20), || {
        r.appliance
            .transport()
            .dead_letters("worker", 10)
            .unwrap()
            .len()
            == 3
            && handled_or_failed(&r) >= 5
    });
    drop(r);
}

/// Events the worker finished (handled or failed for good).
fn handled_or_failed(r: &Running) -> u64 {
    r.appliance
        .statuses()
        .into_iter()
        .find(|s| s.name == "worker")
        .and_then(|s| s.dispatch)
        .map_or(0, |d| {
            d.handled.load(std::sync::atomic::Ordering::SeqCst)
                + d.dead_lettered.load(std::sync::atomic::Ordering::SeqCst)
        })
}

#[test]
fn ingress_beyond_queue_capacity_is_refused_as_full() {
    if !require_redis() {
        return;
    }
    let ns = RedisNamespace::shared("rbus-full");
    let mut config = worker_config(&ns, "");
    config = config.replace(
        "[plugins.worker]\n",
        "[plugins.worker]\nqueue_capacity = 5\nconcurrency = 1\nprefetch = 1\n",
    );
    let r = start(&config, &[("worker.wasm", "scripted_guest")]);
    let mut accepted = 0;
    let mut refused = 0;
    for i in 0..20 {
        let event = json!({"id": format!("f-{i}"), "type": "echo", "data": {"sleep_ms": 500}});
        let (status, _, _) = r.post("events", "echo", &event);
        match status {
            202 | 200 => accepted += 1,
            503 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(refused > 0, "some refused (accepted {accepted})");
    assert!(
        (5..=8).contains(&accepted),
        "about the capacity: {accepted}"
    );
    drop(r);
}

#[test]
fn a_redis_restart_loses_nothing_persisted() {
    if !require_redis() {
        return;
    }
    let mut server = ThrowawayRedis::start();
    let ns = RedisNamespace::new(&server.url(), "rbus-restart");
    let r = start(
        &worker_config(&ns, ""),
        &[("worker.wasm", "scripted_guest")],
    );
    let c = Client::new(&ns.url, &ns.prefix);
    // A service publishing all along, before, during and after the restart:
    // an event counts once Redis answered its XADD (every write is fsynced),
    // and one that failed is published again.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (url, prefix, stop) = (ns.url.clone(), ns.prefix.clone(), stop.clone());
        std::thread::spawn(move || {
            let c = Client::new(&url, &prefix);
            let mut confirmed = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("p-{}", confirmed.len());
                let message = Message {
                    body: envelope(&id, "echo").to_string().into_bytes().into(),
                    content_type: Some("application/json".into()),
                    ..Message::default()
                };
                match tools::publish_one(&c.link, &c.keys, "events", "echo", &message, 1_000_000) {
                    Ok(routed) => {
                        assert!(routed, "{id} not routed");
                        confirmed.push(id);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            confirmed
        })
    };
    wait_until("events flowing", Duration::from_secs(30), || {
        echoed(&c).len() >= 50
    });
    server.stop();
    std::thread::sleep(Duration::from_millis(500));
    server.start_again();
    let bus = r.appliance.transport().redis().unwrap().clone();
    wait_until("the router to reconnect", Duration::from_secs(30), || {
        bus.status().reconnects >= 1 && r.appliance.is_ready()
    });
    let after = echoed(&c).len();
    wait_until("events flowing again", Duration::from_secs(30), || {
        echoed(&c).len() >= after + 50
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let confirmed = publisher.join().unwrap();
    wait_until(
        "every confirmed event echoed",
        Duration::from_secs(60),
        || {
            let seen = echoed(&c);
            confirmed.iter().all(|id| seen.contains_key(id))
        },
    );
    drop(r);
    drop(ns);
}

#[test]
fn delayed_outputs_wait_in_redis_and_are_published_when_due() {
    if !require_redis() {
        return;
    }
    let ns = RedisNamespace::shared("rbus-delay");
    let r = start(
        &worker_config(&ns, ""),
        &[("worker.wasm", "scripted_guest")],
    );
    let c = Client::new(&ns.url, &ns.prefix);
    let bus = r.appliance.transport().redis().unwrap().clone();
    let sent = Instant::now();
    let event = json!({"id": "d-1", "type": "emit", "data": {"count": 2, "delay_ms": 1500, "step_ms": 500, "tag": "later"}});
    assert!(c.publish("events", "emit", &event));
    wait_until("the input handled", Duration::from_secs(10), || {
        handled(&r, "worker") == 1
    });
    let emitted = |c: &Client| {
        c.all("out")
            .into_iter()
            .filter(|p| p.routing_key.starts_with("emitted."))
            .count()
    };
    assert_eq!(emitted(&c), 0, "not before they are due");
    assert_eq!(bus.delayed_waiting().unwrap(), 2, "both kept in Redis");
    wait_until("the first output", Duration::from_secs(10), || {
        emitted(&c) >= 1
    });
    assert!(sent.elapsed() >= Duration::from_millis(1400));
    wait_until("both outputs", Duration::from_secs(10), || emitted(&c) == 2);
    assert!(sent.elapsed() >= Duration::from_millis(1900));
    assert_eq!(bus.delayed_waiting().unwrap(), 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(emitted(&c), 2, "each published once");
    drop(r);
}

#[test]
fn oversize_messages_are_refused_and_nothing_is_published() {
    if !require_redis() {
        return;
    }
    let ns = RedisNamespace::shared("rbus-big");
    let r = start(
        &worker_config(&ns, ""),
        &[("worker.wasm", "scripted_guest")],
    );
    let c = Client::new(&ns.url, &ns.prefix);
    let big = Message {
        body: vec![b'x'; 17 * 1024 * 1024].into(),
        ..Message::default()
    };
    let small = Message {
        body: envelope("s-1", "echo").to_string().into_bytes().into(),
        content_type: Some("application/json".into()),
        ..Message::default()
    };
    let refused =
        tools::publish_one(&c.link, &c.keys, "events", "echo", &big, 1_000_000).unwrap_err();
    assert!(
        matches!(refused, switchboard::bus::BusError::TooLarge(_)),
        "{refused:?}"
    );
    // Through the bus seam: all or nothing.
    let batch = vec![
        switchboard::bus::Outgoing {
            exchange: "events".into(),
            routing_key: "echo".into(),
            message: small,
        },
        switchboard::bus::Outgoing {
            exchange: "events".into(),
            routing_key: "echo".into(),
            message: big,
        },
    ];
    let refused = r
        .appliance
        .transport()
        .bus()
        .publish(batch, Duration::from_secs(1))
        .unwrap_err();
    assert!(
        matches!(refused, switchboard::bus::BusError::TooLarge(_)),
        "{refused:?}"
    );
    assert!(c.all("events").is_empty(), "nothing published");
    drop(r);
}

#[test]
fn a_removed_plugin_dead_letters_the_retries_that_waited_for_it() {
    if !require_redis() {
        return;
    }
    let ns = RedisNamespace::shared("rbus-remove");
    let config = worker_config(&ns, "")
        .replace("initial = \"200ms\"", "initial = \"30s\"")
        .replace("max = \"400ms\"", "max = \"60s\"");
    let r = start(&config, &[("worker.wasm", "scripted_guest")]);
    let c = Client::new(&ns.url, &ns.prefix);
    let bus = r.appliance.transport().redis().unwrap().clone();
    assert!(c.publish("events", "retry", &envelope("gone-1", "retry")));
    wait_until("a retry waiting", Duration::from_secs(10), || {
        bus.queue_stats("worker")
            .is_ok_and(|s| s.waiting_retries == 1)
    });
    let without = config
        .replace("[plugins.worker]\noutput_exchange = \"out\"\n", "")
        .replace(
            "[[routes]]\nexchange = \"events\"\npattern = \"#\"\nplugin = \"worker\"\n",
            "",
        );
    r.write_config(&without);
    wait_until("the retry dead-lettered", Duration::from_secs(20), || {
        r.appliance
            .transport()
            .dead_letters("worker", 10)
            .unwrap()
            .iter()
            .any(|l| l.failure.kind == "plugin_removed")
    });
    let letters = r.appliance.transport().dead_letters("worker", 10).unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0].failure.reason.contains("removed"),
        "{:?}",
        letters[0].failure
    );
    assert_eq!(letters[0].delivered.routing_key, "retry");
    // Nothing routes to it any more; its retry set is gone.
    assert!(!c.publish("events", "retry", &envelope("gone-2", "retry")));
    wait_until("its retry set removed", Duration::from_secs(10), || {
        bus.queue_stats("worker")
            .is_ok_and(|s| s.waiting_retries == 0)
    });
    drop(r);
}

#[test]
fn replays_and_picked_redrives_reach_the_plugin_as_first_attempts() {
    if !require_redis() {
        return;
    }
    let ns = RedisNamespace::shared("rbus-replay");
    let r = start(
        &worker_config(&ns, ""),
        &[("worker.wasm", "scripted_guest")],
    );
    let c = Client::new(&ns.url, &ns.prefix);
    let transport = r.appliance.transport();
    // A replay: straight into the worker's own stream.
    let replayed: Vec<switchboard::bus::Delivered> = ["p-1", "p-2"]
        .iter()
        .map(|id| switchboard::bus::Delivered {
            exchange: "events".into(),
            routing_key: "echo".into(),
            message: Message {
                body: envelope(id, "echo").to_string().into_bytes().into(),
                content_type: Some("application/json".into()),
                ..Message::default()
            },
            attempt: 1,
            first_failure: None,
        })
        .collect();
    assert_eq!(transport.deliver("worker", replayed).unwrap(), 2);
    wait_until(
        "both replayed events echoed",
        Duration::from_secs(20),
        || {
            let seen = echoed(&c);
            seen.get("p-1") == Some(&1) && seen.get("p-2") == Some(&1)
        },
    );

    // Three rejected; only the one picked by id goes back.
    for id in ["x-1", "x-2", "x-3"] {
        assert!(c.publish("events", "reject", &envelope(id, "reject")));
    }
    wait_until("three dead letters", Duration::from_secs(20), || {
        transport.dead_letters("worker", 10).unwrap().len() == 3
    });
    let picked = std::collections::BTreeSet::from(["x-2".to_string()]);
    assert_eq!(transport.redrive_ids("worker", &picked).unwrap(), ["x-2"]);
    // Rejected again, on its first attempt: a new letter, after the two
    // that stayed (the dead-letter stream keeps the order they came in).
    wait_until("x-2 dead-lettered again", Duration::from_secs(20), || {
        transport.dead_letters("worker", 10).unwrap().len() == 3
    });
    let again = transport.dead_letters("worker", 10).unwrap();
    let order: Vec<String> = again.iter().map(switchboard::bus::DeadLetter::id).collect();
    assert_eq!(order, ["x-1", "x-3", "x-2"]);
    let x2 = again.iter().find(|l| l.id() == "x-2").unwrap();
    assert_eq!(x2.failure.attempts, 1);
    // A redrive without a limit goes once through what the stream held:
    // letters rejected again meanwhile are not moved a second time.
    for _ in 0..5 {
        assert_eq!(transport.redrive("worker", usize::MAX).unwrap(), 3);
        wait_until("three dead letters again", Duration::from_secs(20), || {
            transport.dead_letters("worker", 10).unwrap().len() == 3
        });
    }
    drop(r);
}

#[test]
fn a_router_started_while_redis_is_down_declares_once_it_answers() {
    if !require_redis() {
        return;
    }
    let mut server = ThrowawayRedis::start();
    let ns = RedisNamespace::new(&server.url(), "rbus-late");
    server.stop();
    let r = start(
        &worker_config(&ns, ""),
        &[("worker.wasm", "scripted_guest")],
    );
    assert!(!r.appliance.is_ready(), "not ready without Redis");
    let bus = r.appliance.transport().redis().unwrap().clone();
    assert!(bus.status().error.is_some(), "{:?}", bus.status());
    server.start_again();
    wait_until("the router to declare", Duration::from_secs(30), || {
        r.appliance.is_ready()
    });
    let c = Client::new(&ns.url, &ns.prefix);
    for i in 0..20 {
        assert!(c.publish("events", "echo", &envelope(&format!("l-{i}"), "echo")));
    }
    wait_until("every event echoed", Duration::from_secs(30), || {
        echoed(&c).len() == 20
    });
    drop(r);
    drop(ns);
}

/// The notification plugin's golden events (tests/golden/notification),
/// published through ingress on the embedded bus, on RabbitMQ and on Redis
/// Streams: what each bus publishes (and dead-letters) for each event, as
/// `switchboard test` lines, matches the golden file, and the three buses
/// give the very same lines.
#[test]
fn the_golden_outputs_are_the_same_on_every_bus() {
    if !require_redis() | !switchboard_tests::broker::require_broker() {
        return;
    }
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/notification");
    let lines = |file: &str| -> Vec<Value> {
        std::fs::read_to_string(golden.join(file))
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (events, expected) = (lines("events.jsonl"), lines("expected.jsonl"));
    let ns = RedisNamespace::shared("golden");
    let vhost = switchboard_tests::broker::TestVhost::new("golden");
    let buses = [
        ("embedded", String::new()),
        (
            "rabbitmq",
            format!("[broker]\nurl = \"{}\"\ntimeout = \"5s\"\n", vhost.url()),
        ),
        (
            "redis-streams",
            format!(
                "[broker]\nkind = \"redis-streams\"\nurl = \"{}\"\nprefix = \"{}\"\n",
                ns.url, ns.prefix
            ),
        ),
    ];
    let mut by_bus = Vec::new();
    for (bus, broker) in buses {
        let config = format!(
            "plugins_dir = \"plugins\"\nstate_dir = \"state\"\n{broker}\
             [defaults]\nmax_attempts = 1\n\
             [[exchanges]]\nname = \"events\"\n[[exchanges]]\nname = \"out\"\n\
             [plugins.notification]\noutput_exchange = \"out\"\n\
             [[routes]]\nexchange = \"events\"\npattern = \"#\"\nplugin = \"notification\"\n"
        );
        let r = start(&config, &[("notification.wasm", "notification")]);
        let mut stream = r.appliance.transport().subscribe_stream();
        for event in &events {
            let key = event["type"].as_str().unwrap();
            let (status, reply, _) = r.post("events", key, event);
            assert_eq!(status, 202, "{bus}: {reply}");
        }
        let settled = |r: &Running| {
            let s = r.status("notification");
            s.dispatch.map_or(0, |d| {
                d.handled.load(std::sync::atomic::Ordering::SeqCst)
                    + d.dead_lettered.load(std::sync::atomic::Ordering::SeqCst)
            })
        };
        r.wait_for("every golden event settled", |r| {
            settled(r) == events.len() as u64
        });
        // Outputs by the event that caused them, in the order published.
        let mut outputs: HashMap<String, Vec<Value>> = HashMap::new();
        while let Ok(published) = stream.try_recv() {
            if published.exchange == "out" {
                let output = json_of(&published);
                let cause = output["causation_id"].as_str().unwrap().to_string();
                outputs.entry(cause).or_default().push(output);
            }
        }
        let letters = r
            .appliance
            .transport()
            .dead_letters("notification", 1000)
            .unwrap();
        let actual: Vec<Value> = events
            .iter()
            .map(|event| {
                let id = event["id"].as_str().unwrap();
                let line = json!({"input": id, "kind": event["type"]});
                match letters.iter().find(|l| l.id() == id) {
                    Some(letter) => json!({"input": id, "kind": event["type"], "failure":
                        {"kind": letter.failure.kind, "reason": letter.failure.reason}}),
                    None => {
                        let mut line = line;
                        line["outputs"] = json!(outputs.remove(id).unwrap_or_default());
                        line
                    }
                }
            })
            .collect();
        assert!(
            outputs.is_empty(),
            "{bus}: outputs of no golden event: {outputs:?}"
        );
        let mismatches = switchboard::cli::test::compare(&expected, &actual);
        assert!(mismatches.is_empty(), "{bus}:\n{}", mismatches.join("\n"));
        let mut actual = actual;
        actual
            .iter_mut()
            .for_each(switchboard::replay::strip_volatile);
        by_bus.push((bus, actual));
    }
    let (first, lines) = &by_bus[0];
    for (bus, other) in &by_bus[1..] {
        for (a, b) in lines.iter().zip(other) {
            assert_eq!(a, b, "{first} and {bus} differ");
        }
    }
}
