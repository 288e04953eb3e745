//! The appliance on the real broker, each test in a vhost of its own: what the
//! embedded-bus tests show, on RabbitMQ — confirmed outputs, retries through
//! the TTL tiers, dead letters with their reasons, re-drive, the unroutable
//! policy, live routing changes, a deleted queue, a dropped connection,
//! competing replicas and an ordered plugin.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard::appliance::PluginStatus;
use switchboard::config::RouterConfig;
use switchboard_tests::broker::{
    Amqp, Confirmed, Publish, Received, SinkLife, TestVhost, ThrowawayNode, require_broker,
};
use switchboard_tests::epoch_ms;
use switchboard_tests::running::{Running, start, start_in};

/// One plugin, `worker` (the scripted guest), on every key of `events`; its
/// outputs go to `out`.
fn config(url: &str, extra_broker: &str, extra_plugin: &str) -> String {
    format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[broker]
url = "{url}"
timeout = "5s"
{extra_broker}
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
{extra_plugin}
[[routes]]
exchange = "events"
pattern = "#"
plugin = "worker"
"##
    )
}

fn worker(url: &str, extra_broker: &str, extra_plugin: &str) -> Running {
    start(
        &config(url, extra_broker, extra_plugin),
        &[("worker.wasm", "scripted_guest")],
    )
}

fn envelope(id: &str, kind: &str, data: Value) -> Value {
    json!({"id": id, "type": kind, "source": "tests", "tenant_id": "acme",
           "correlation_id": format!("corr-{id}"), "data": data})
}

fn send(amqp: &Amqp, id: &str, kind: &str, data: Value) {
    let confirmed = amqp.publish(&Publish::json("events", kind, &envelope(id, kind, data)));
    assert_eq!(confirmed, Confirmed::Routed, "{id} was not routed");
}

/// Waits until `check` holds (20 s at most).
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status(r: &Running, plugin: &str) -> PluginStatus {
    r.appliance
        .statuses()
        .into_iter()
        .find(|s| s.name == plugin)
        .unwrap()
}

fn handled(r: &Running) -> u64 {
    status(r, "worker")
        .dispatch
        .map_or(0, |d| d.handled.load(std::sync::atomic::Ordering::SeqCst))
}

fn dead_letters(r: &Running) -> Vec<switchboard::bus::DeadLetter> {
    r.appliance.transport().dead_letters("worker", 100).unwrap()
}

#[test]
fn outputs_are_persistent_with_the_hosts_fields_and_every_input_is_acked() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("outputs");
    let r = worker(&vhost.url(), "", "");
    assert!(r.appliance.is_ready());
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    let sink = amqp.sink("out", "#");
    for i in 0..20 {
        send(&amqp, &format!("e-{i}"), "echo", json!({"i": i}));
    }
    let got = amqp.get(&sink, 20, Duration::from_secs(20));
    assert_eq!(got.len(), 20);
    let ids: BTreeSet<String> = got
        .iter()
        .map(|m| m.json()["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 20, "every output has its own id");
    for m in &got {
        assert_eq!(m.routing_key, "echoed");
        assert_eq!(m.delivery_mode, Some(2), "outputs are persistent");
        let body = m.json();
        assert_eq!(body["source"], "worker");
        let input = m.header("echo-of").unwrap();
        assert_eq!(body["correlation_id"], format!("corr-{input}"));
        assert_eq!(body["causation_id"], input);
    }
    // Every input acknowledged: nothing ready, nothing held.
    wait_until("the queue to empty", || {
        amqp.queue_state("switchboard.worker")
            .is_some_and(|q| q.messages == 0)
            && status(&r, "worker")
                .broker
                .is_some_and(|b| b.in_flight == 0)
    });
    assert_eq!(handled(&r), 20);
    assert!(dead_letters(&r).is_empty());
}

/// Messages (ready and unacknowledged) in `queue` on `node`.
fn held(node: &ThrowawayNode, queue: &str) -> u64 {
    let listing = node.ctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages",
    ]);
    listing
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(queue)).then(|| fields.next()?.parse().ok())?
        })
        .next()
        .unwrap_or_else(|| panic!("no queue {queue} in {listing:?}"))
}

/// The promise delivery rests on, shown where it can fail: under a memory
/// alarm the broker confirms no publish, so no input may be acknowledged.
/// The router consumes and acks on a connection of its own (the alarm blocks
/// only the publishing one), so an ack sent before its outputs' confirm would
/// reach the broker and the queue would shrink. It must not: every input is
/// held or back in its queue for as long as the alarm lasts, no output is
/// counted, and once the alarm is lifted every one is handled.
#[test]
fn outputs_are_confirmed_before_the_input_is_acked() {
    if !require_broker() {
        return;
    }
    const EVENTS: u64 = 20;
    let node = ThrowawayNode::start();
    let url = node.url();
    let toml = config(&url, "", "").replace(r#"timeout = "5s""#, r#"timeout = "1s""#);
    let r = start(&toml, &[("worker.wasm", "scripted_guest")]);
    let amqp = Amqp::connect(&url).unwrap();
    let sink = amqp.sink("out", "#");
    // The events wait in the worker's queue while no router runs...
    let (_, dir) = r.stop_and_keep(Duration::from_secs(10));
    for i in 0..EVENTS {
        send(&amqp, &format!("held-{i}"), "echo", json!({"i": i}));
    }
    wait_until("the events in the queue", || {
        held(&node, "switchboard.worker") == EVENTS
    });
    // ...then a memory alarm, then the router again: it consumes and runs the
    // plugin, but nothing it publishes is confirmed.
    node.ctl(&["set_vm_memory_high_watermark", "0.000001"]);
    wait_until("the memory alarm", || {
        node.ctl(&["eval", "rabbit_alarm:get_alarms()."])
            .contains("memory")
    });
    let r = start_in(dir.path());
    wait_until("the router to take the events", || {
        status(&r, "worker").broker.is_some_and(|b| b.in_flight > 0)
    });
    // Three publish timeouts, each with its retry and give-back: the inputs
    // stay where the broker can deliver them again.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert_eq!(
            held(&node, "switchboard.worker")
                + held(&node, "switchboard.worker.retry.200ms")
                + held(&node, "switchboard.worker.retry.400ms"),
            EVENTS,
            "an input was acknowledged while its outputs could not be confirmed"
        );
        assert_eq!(handled(&r), 0, "handled counted before a confirm");
        std::thread::sleep(Duration::from_millis(200));
    }
    node.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    // Every input handled once the alarm is gone; a publish the broker read
    // late may repeat an output, always under the same id.
    let mut outputs: HashMap<String, String> = HashMap::new();
    let until = Instant::now() + Duration::from_secs(30);
    while (outputs.len() as u64) < EVENTS && Instant::now() < until {
        for m in amqp.get(&sink, EVENTS as usize, Duration::from_millis(500)) {
            let input = m.header("echo-of").unwrap().to_string();
            let id = m.message_id.clone().unwrap();
            let first = outputs.entry(input.clone()).or_insert_with(|| id.clone());
            assert_eq!(*first, id, "a repeated output of {input} under another id");
        }
    }
    assert_eq!(
        outputs.len() as u64,
        EVENTS,
        "every input handled once the alarm is gone"
    );
    wait_until("every input acknowledged", || {
        held(&node, "switchboard.worker") == 0 && handled(&r) == EVENTS
    });
    assert!(dead_letters(&r).is_empty());
}

/// Outputs the broker refuses (the queue bound to the output exchange is full,
/// with `reject-publish`: the publish is nacked) fail their input like any
/// transient failure: retried with backoff through the tiers, then
/// dead-lettered as `publish` after `max_attempts`; never requeued at once in a
/// loop until the broker's own delivery limit.
#[test]
fn refused_outputs_are_retried_with_backoff_then_dead_lettered() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("refused");
    let r = worker(&vhost.url(), "", "");
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    amqp.declare_sink(Some("full"), SinkLife::Durable, "out", "#");
    let policy = std::process::Command::new("rabbitmqctl")
        .args(["set_policy", "-p", vhost.name(), "full", "^full$"])
        .arg(r#"{"max-length": 0, "overflow": "reject-publish"}"#)
        .args(["--apply-to", "queues"])
        .output()
        .unwrap();
    assert!(policy.status.success(), "{policy:?}");
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    send(&amqp, "refused-1", "echo", json!({}));
    wait_until("the dead letter", || dead_letters(&r).len() == 1);
    let letter = &dead_letters(&r)[0];
    assert_eq!(letter.failure.kind, "publish", "{letter:?}");
    assert_eq!(letter.failure.attempts, 3, "max_attempts deliveries in all");
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "two waits in the tiers (200 ms, 400 ms) came before it"
    );
    let stats = status(&r, "worker").dispatch.unwrap();
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        (
            count(&stats.handled),
            count(&stats.retried),
            count(&stats.dead_lettered)
        ),
        (0, 2, 1)
    );
}

#[test]
fn a_transient_failure_waits_in_the_retry_tiers_then_succeeds() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("retry");
    let r = worker(&vhost.url(), "", "");
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    // One tier per distinct delay of the backoff (200ms, 400ms for 3 attempts).
    assert!(amqp.queue_state("switchboard.worker.retry.200ms").is_some());
    assert!(amqp.queue_state("switchboard.worker.retry.400ms").is_some());
    let sink = amqp.sink("out", "#");
    let started = Instant::now();
    send(&amqp, "flaky-1", "fail-until", json!({"succeed_on": 3}));
    let got = amqp.get(&sink, 1, Duration::from_secs(20));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].routing_key, "succeeded");
    assert_eq!(got[0].json()["data"]["attempt"], 3);
    // Two waits in the tiers: 200 ms then 400 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    // The output keeps the input's origin: the retried copy came back through
    // the default exchange, but the event still says where it came from.
    assert_eq!(got[0].json()["correlation_id"], "corr-flaky-1");
    assert!(dead_letters(&r).is_empty());
}

#[test]
fn exhausted_retries_and_rejects_are_dead_lettered_with_reasons_and_redrive_resets_attempts() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("dlq");
    let r = worker(&vhost.url(), "", "");
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    send(&amqp, "always-retry", "retry", json!({}));
    send(&amqp, "rejected", "reject", json!({}));
    // Malformed input: a structured CloudEvent that is not JSON.
    let bad = Publish::new("events", "broken.json", b"{not json".to_vec())
        .content_type("application/cloudevents+json");
    assert_eq!(amqp.publish(&bad), Confirmed::Routed);
    wait_until("three dead letters", || dead_letters(&r).len() == 3);

    let letters = dead_letters(&r);
    let by_kind = |kind: &str| {
        letters
            .iter()
            .find(|l| l.failure.kind == kind)
            .unwrap_or_else(|| panic!("no {kind} letter in {letters:?}"))
    };
    let retried = by_kind("retry");
    assert_eq!(retried.failure.attempts, 3);
    assert_eq!(retried.failure.reason, "asked to retry");
    assert_eq!(retried.delivered.exchange, "events");
    assert_eq!(retried.delivered.routing_key, "retry");
    assert!(!retried.failure.plugin_version.is_empty());
    assert!(!retried.failure.first_failure.is_empty());
    assert!(!retried.at.is_empty());
    let rejected = by_kind("reject");
    assert_eq!(rejected.failure.attempts, 1, "a reject is not retried");
    let undecodable = by_kind("undecodable");
    assert!(
        undecodable.failure.reason.contains("cannot decode"),
        "{}",
        undecodable.failure.reason
    );

    // The headers are on the message itself, for any AMQP client to read.
    let raw: Vec<Received> = amqp.get("switchboard.worker.dlq", 3, Duration::from_secs(5));
    assert_eq!(raw.len(), 3);
    for m in &raw {
        for header in [
            "switchboard-attempt",
            "switchboard-first-failure",
            "switchboard-error",
            "switchboard-error-kind",
            "switchboard-plugin-version",
            "switchboard-dead-lettered-at",
        ] {
            assert!(
                m.header(header).is_some(),
                "{header} missing on {:?}",
                m.headers
            );
        }
    }
    // (Taking them acknowledged them: publish them back to the DLQ as they were.)
    for m in &raw {
        let mut back = Publish::new("switchboard.dlx", "worker", m.body.clone());
        if let Some(ct) = &m.content_type {
            back = back.content_type(ct);
        }
        for (k, v) in &m.headers {
            back = back.header(k, v);
        }
        assert_eq!(amqp.publish(&back), Confirmed::Routed);
    }
    wait_until("the letters to be back", || dead_letters(&r).len() == 3);

    // Re-drive one: it starts again at attempt 1.
    let stats = |r: &Running| status(r, "worker").dispatch.unwrap();
    let before = stats(&r)
        .dead_lettered
        .load(std::sync::atomic::Ordering::SeqCst);
    let moved = r.appliance.transport().redrive("worker", 1).unwrap();
    assert_eq!(moved, 1);
    wait_until("the re-driven letter to be handled", || {
        stats(&r)
            .dead_lettered
            .load(std::sync::atomic::Ordering::SeqCst)
            > before
    });
    wait_until("three letters again", || dead_letters(&r).len() == 3);
    let again = dead_letters(&r);
    // Whatever was re-driven failed again from attempt 1: a reject (1), a
    // retry (3 more attempts) or the undecodable one (1).
    assert!(again.iter().all(|l| l.failure.attempts <= 3));
}

/// `POST /api/dlq/{plugin}/redrive` with `{"ids": [...]}` on RabbitMQ: the
/// chosen letters go back to the queue (the worker rejects them again, so
/// they come back last); the others keep their order; an id no letter has is
/// reported, and a letter without an envelope id is chosen by its derived id.
#[test]
fn chosen_dead_letters_are_redriven_by_event_id_and_the_rest_keep_their_order() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("dlqpick");
    let r = worker(&vhost.url(), "", "");
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    for i in 0..4 {
        send(&amqp, &format!("r-{i}"), "reject", json!({}));
        wait_until("a dead letter", || dead_letters(&r).len() == i + 1);
    }
    let bad = Publish::new("events", "broken.json", b"{not json".to_vec())
        .content_type("application/cloudevents+json");
    assert_eq!(amqp.publish(&bad), Confirmed::Routed);
    wait_until("five dead letters", || dead_letters(&r).len() == 5);
    let ids = |r: &Running| -> Vec<String> { dead_letters(r).iter().map(|l| l.id()).collect() };
    let undecodable = ids(&r)[4].clone();
    assert_eq!(ids(&r)[..4], ["r-0", "r-1", "r-2", "r-3"]);
    let listed = r.get("/api/dlq/worker");
    assert_eq!(
        listed["items"][1]["id"], "r-1",
        "the API shows each letter's id"
    );

    let dead_lettered = |r: &Running| {
        status(r, "worker")
            .dispatch
            .unwrap()
            .dead_lettered
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = dead_lettered(&r);
    let (code, reply) = r.request(
        "POST",
        "/api/dlq/worker/redrive",
        None,
        Some(&json!({"ids": ["r-3", "r-1", "nobody"]})),
    );
    assert_eq!(code, 200, "{reply}");
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply, json!({"redriven": 2, "not_found": ["nobody"]}));
    wait_until("both rejected again", || dead_lettered(&r) == before + 2);
    wait_until("five letters again", || dead_letters(&r).len() == 5);
    let order = ids(&r);
    assert_eq!(
        order[..3],
        ["r-0".to_string(), "r-2".to_string(), undecodable.clone()],
        "the letters not chosen keep their order: {order:?}"
    );
    let mut last: Vec<&String> = order[3..].iter().collect();
    last.sort();
    assert_eq!(last, ["r-1", "r-3"], "the chosen ones came back last");

    // The undecodable letter, by the id derived from its content.
    let (code, reply) = r.request(
        "POST",
        "/api/dlq/worker/redrive",
        None,
        Some(&json!({"ids": [undecodable]})),
    );
    assert_eq!(code, 200, "{reply}");
    assert!(reply.contains(r#""redriven":1"#), "{reply}");
    wait_until("it is dead-lettered again", || {
        dead_lettered(&r) == before + 3
    });
    // Asking for both a count and ids is refused.
    let (code, reply) = r.request(
        "POST",
        "/api/dlq/worker/redrive?limit=1",
        None,
        Some(&json!({"ids": ["r-0"]})),
    );
    assert_eq!(code, 400, "{reply}");
    wait_until("five letters in the end", || dead_letters(&r).len() == 5);
}

/// `[broker] dlq_ttl` and `dlq_max_length` on RabbitMQ: the dead-letter queue
/// is declared with `x-message-ttl` and `x-max-length` (drop-head), so it keeps
/// the newest letters, each for the TTL. A DLQ created with other retention
/// refuses the start, saying what to do; the same retention starts again.
#[test]
fn dead_letters_are_kept_as_long_and_as_many_as_the_retention_says() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("dlq-retention");
    let retention = "dlq_ttl = \"3s\"\ndlq_max_length = 2";
    let r = worker(&vhost.url(), retention, "");
    let arguments = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "-p", vhost.name(), "name", "arguments"])
        .output()
        .unwrap();
    let arguments = String::from_utf8_lossy(&arguments.stdout).to_string();
    let dlq_line = arguments
        .lines()
        .find(|l| l.starts_with("switchboard.worker.dlq"))
        .unwrap_or_else(|| panic!("no DLQ in {arguments}"));
    for arg in [
        "{\"x-message-ttl\",3000}",
        "{\"x-max-length\",2}",
        "{\"x-overflow\",\"drop-head\"}",
    ] {
        assert!(dlq_line.contains(arg), "{arg} not in {dlq_line}");
    }

    let amqp = Amqp::connect(&vhost.url()).unwrap();
    let dead_lettered = |r: &Running| {
        status(r, "worker").dispatch.map_or(0, |d| {
            d.dead_lettered.load(std::sync::atomic::Ordering::SeqCst)
        })
    };
    for (n, id) in ["rej-1", "rej-2", "rej-3"].into_iter().enumerate() {
        send(&amqp, id, "reject", json!({}));
        wait_until("the reject to be dead-lettered", || {
            dead_lettered(&r) == n as u64 + 1
        });
    }
    let ids = |r: &Running| -> BTreeSet<String> {
        dead_letters(r)
            .iter()
            .map(|l| {
                let body: Value = serde_json::from_slice(&l.delivered.message.body).unwrap();
                body["id"].as_str().unwrap().to_string()
            })
            .collect()
    };
    assert_eq!(
        ids(&r),
        BTreeSet::from(["rej-2".to_string(), "rej-3".to_string()]),
        "the oldest one made way"
    );
    wait_until("the letters to expire", || ids(&r).is_empty());
    assert!(r.appliance.is_ready());

    // Retention edited: RabbitMQ keeps a queue's arguments; the start is refused
    // with the way out.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::copy(
        switchboard_tests::wasm("scripted_guest"),
        dir.path().join("plugins/worker.wasm"),
    )
    .unwrap();
    let edited = config(&vhost.url(), "dlq_max_length = 5", "");
    let edited = RouterConfig::parse(&edited, dir.path()).unwrap();
    let refused = switchboard::appliance::Appliance::start(edited)
        .map(|_| ())
        .unwrap_err();
    let why = format!("{refused:#}");
    for part in [
        "switchboard.worker.dlq",
        "dlq_max_length",
        "rabbitmqctl set_policy",
        "\"max-length\":5",
    ] {
        assert!(why.contains(part), "{part} not in: {why}");
    }
    // The same retention: a second replica starts.
    let replica = worker(&vhost.url(), retention, "");
    assert!(replica.appliance.is_ready());
}

#[test]
fn unroutable_outputs_are_dropped_and_counted_or_dead_letter_the_input() {
    if !require_broker() {
        return;
    }
    // Default policy: dropped, counted, the input acked.
    let vhost = TestVhost::new("unroutable");
    let r = worker(&vhost.url(), "", "");
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    send(&amqp, "nobody-listens", "echo", json!({}));
    wait_until("the input to be handled", || handled(&r) == 1);
    assert_eq!(r.appliance.transport().unroutable(), 1);
    assert!(dead_letters(&r).is_empty());
    drop(r);

    // `dead-letter`: the input goes to the DLQ with reason `unroutable`.
    let vhost = TestVhost::new("unroutable-dl");
    let r = worker(&vhost.url(), "unroutable = \"dead-letter\"", "");
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    send(&amqp, "nobody-listens", "echo", json!({}));
    wait_until("a dead letter", || dead_letters(&r).len() == 1);
    let letter = &dead_letters(&r)[0];
    assert_eq!(letter.failure.kind, "unroutable");
    assert!(
        letter.failure.reason.contains("\"out\""),
        "{}",
        letter.failure.reason
    );
}

#[test]
fn routing_changes_bind_and_unbind_live_and_a_disabled_plugin_keeps_its_queue() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("routes");
    let url = vhost.url();
    let text = |pattern: &str, enabled: bool| {
        config(&url, "", &format!("enabled = {enabled}"))
            .replace("pattern = \"#\"", &format!("pattern = \"{pattern}\""))
    };
    let r = start(&text("a.*", true), &[("worker.wasm", "scripted_guest")]);
    let amqp = Amqp::connect(&url).unwrap();
    let probe = |key: &str| {
        amqp.publish(&Publish::json(
            "events",
            key,
            &envelope("p", "ok", json!({})),
        ))
    };
    assert_eq!(probe("a.x"), Confirmed::Routed);
    assert_eq!(probe("b.x"), Confirmed::Unroutable);

    let apply = |toml: String| {
        let config = RouterConfig::parse(&toml, &r.dir).unwrap();
        r.appliance.apply(config).unwrap();
    };
    apply(text("b.*", true));
    assert_eq!(
        probe("a.x"),
        Confirmed::Unroutable,
        "the removed route is unbound"
    );
    assert_eq!(probe("b.x"), Confirmed::Routed, "the new route is bound");

    // Disabled: routes unbound, the queue and what it holds kept.
    wait_until("the queue to be idle", || {
        amqp.queue_state("switchboard.worker")
            .is_some_and(|q| q.messages == 0)
    });
    apply(text("b.*", false));
    assert_eq!(probe("b.x"), Confirmed::Unroutable);
    assert!(amqp.queue_state("switchboard.worker").is_some());
    // Something published to the queue directly waits there.
    let direct = Publish::json(
        "",
        "switchboard.worker",
        &envelope("waiting", "echo", json!({})),
    );
    assert_eq!(amqp.publish(&direct), Confirmed::Routed);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        amqp.queue_state("switchboard.worker").map(|q| q.messages),
        Some(1)
    );
    // Enabled again, it is handled.
    let sink = amqp.sink("out", "#");
    apply(text("b.*", true));
    let got = amqp.get(&sink, 1, Duration::from_secs(20));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("echo-of"), Some("waiting"));
}

#[test]
fn a_deleted_queue_is_declared_again_and_consumption_resumes() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("cancelled");
    let r = worker(&vhost.url(), "", "");
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    amqp.delete_queue("switchboard.worker");
    wait_until("the queue to be back with its consumer", || {
        amqp.queue_state("switchboard.worker")
            .is_some_and(|q| q.consumers == 1)
    });
    let sink = amqp.sink("out", "#");
    send(&amqp, "after-delete", "echo", json!({}));
    assert_eq!(amqp.get(&sink, 1, Duration::from_secs(20)).len(), 1);
    drop(r);
}

#[test]
fn the_router_reconnects_after_the_broker_closes_every_connection() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("reconnect");
    let r = worker(&vhost.url(), "", "");
    // A queue of our own that survives our connection closing.
    let observer = Amqp::connect(&vhost.url()).unwrap();
    observer.declare_sink(Some("observed"), SinkLife::Durable, "out", "#");
    for i in 0..10 {
        send(&observer, &format!("before-{i}"), "echo", json!({}));
    }
    wait_until("ten outputs", || {
        observer
            .queue_state("observed")
            .is_some_and(|q| q.messages == 10)
    });

    vhost.close_all_connections("fault injection");
    let rabbit = r.appliance.transport().rabbit().unwrap().clone();
    wait_until("the router to reconnect", || {
        rabbit.status().reconnects >= 1 && r.appliance.is_ready()
    });
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    for i in 0..10 {
        send(&amqp, &format!("after-{i}"), "echo", json!({}));
    }
    let got = amqp.get("observed", 20, Duration::from_secs(20));
    let inputs: HashSet<&str> = got.iter().filter_map(|m| m.header("echo-of")).collect();
    assert_eq!(
        inputs.len(),
        20,
        "every event before and after the fault was handled"
    );
}

#[test]
fn two_replicas_share_the_work_without_duplicates() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("replicas");
    let a = worker(&vhost.url(), "", "");
    let b = worker(&vhost.url(), "", "");
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    assert_eq!(
        amqp.queue_state("switchboard.worker").map(|q| q.consumers),
        Some(2)
    );
    let sink = amqp.sink("out", "#");
    for i in 0..200 {
        send(&amqp, &format!("r-{i}"), "echo", json!({"i": i}));
    }
    let got = amqp.get(&sink, 200, Duration::from_secs(30));
    assert_eq!(got.len(), 200);
    let inputs: HashSet<&str> = got.iter().filter_map(|m| m.header("echo-of")).collect();
    assert_eq!(inputs.len(), 200, "no event handled twice");
    // Nothing more arrives.
    assert!(amqp.get(&sink, 1, Duration::from_millis(500)).is_empty());
    let (ha, hb) = (handled(&a), handled(&b));
    assert_eq!(ha + hb, 200);
    assert!(ha > 0 && hb > 0, "both replicas worked: {ha} and {hb}");
}

#[test]
fn an_ordered_plugin_has_one_active_consumer_across_replicas_and_keeps_order() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("ordered");
    let a = worker(&vhost.url(), "", "ordered = true");
    let b = worker(&vhost.url(), "", "ordered = true");
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    let sink = amqp.sink("out", "#");
    for i in 0..60 {
        send(&amqp, &format!("o-{i:03}"), "echo", json!({"seq": i}));
    }
    let got = amqp.get(&sink, 60, Duration::from_secs(30));
    let order: Vec<i64> = got
        .iter()
        .map(|m| m.json()["data"]["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(order, (0..60).collect::<Vec<_>>(), "handled in queue order");
    let (ha, hb) = (handled(&a), handled(&b));
    assert!(ha == 0 || hb == 0, "one active consumer: {ha} and {hb}");
    // The other replica takes over when the active one goes.
    let (survivor, leaving) = if ha > 0 { (b, a) } else { (a, b) };
    drop(leaving);
    for i in 60..70 {
        send(&amqp, &format!("o-{i:03}"), "echo", json!({"seq": i}));
    }
    let got = amqp.get(&sink, 10, Duration::from_secs(30));
    assert_eq!(got.len(), 10);
    assert_eq!(handled(&survivor), 10);
}

#[test]
fn a_graceful_stop_leaves_nothing_unacknowledged_and_a_restart_resumes() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("restart");
    let r = worker(&vhost.url(), "", "");
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    for i in 0..100 {
        send(&amqp, &format!("s-{i}"), "sleep", json!({"ms": 5}));
    }
    std::thread::sleep(Duration::from_millis(100));
    let stats = status(&r, "worker").dispatch.unwrap();
    let (spooled, dir) = r.stop_and_keep(Duration::from_secs(10));
    assert_eq!(
        spooled, 0,
        "on RabbitMQ nothing is spooled: the broker keeps it"
    );
    let first = stats.handled.load(std::sync::atomic::Ordering::SeqCst);
    // Whatever was not handled is back in the queue, not lost.
    wait_until("handled + left = published", || {
        amqp.queue_state("switchboard.worker")
            .is_some_and(|q| u64::from(q.messages) + first == 100)
    });
    let left = amqp.queue_state("switchboard.worker").unwrap().messages;
    let r = start_in(dir.path());
    wait_until("the queue to empty after the restart", || {
        amqp.queue_state("switchboard.worker")
            .is_some_and(|q| q.messages == 0)
            && status(&r, "worker")
                .broker
                .is_some_and(|b| b.in_flight == 0)
    });
    assert!(left < 100, "the first run handled some before stopping");
    assert_eq!(
        handled(&r),
        u64::from(left),
        "the second run handled exactly what was left"
    );
}

/// The billing and notification seed plugins on `events`, with the archive on
/// (kept `max_age`), indexed by bill.
fn archived_bills(url: &str, max_age: &str) -> String {
    format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[broker]
url = "{url}"
timeout = "2s"
[defaults]
concurrency = 2
[defaults.backoff]
initial = "200ms"
max = "400ms"
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
[archive]
enabled = true
max_age = "{max_age}"
[[archive.aggregates]]
match = "bill.*"
field = "data.bill_id"
[[archive.aggregates]]
match = "payment.*"
field = "data.bill_id"
"##
    )
}

const BILLING_AND_NOTIFICATION: [(&str, &str); 2] = [
    ("billing.wasm", "billing"),
    ("notification.wasm", "notification"),
];

fn handled_by(r: &Running, plugin: &str) -> u64 {
    status(r, plugin)
        .dispatch
        .map_or(0, |d| d.handled.load(std::sync::atomic::Ordering::SeqCst))
}

fn routing_keys(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["routing_key"].as_str().unwrap())
        .collect()
}

/// On RabbitMQ the archive is a stream on the broker: what the router
/// publishes (ingress, plugin outputs) and what services publish straight to
/// the broker is kept there, in publishing order, and `switchboard events`,
/// `GET /api/events` and every replica read the same history. Edited
/// retention is refused at start with what to do about it.
#[test]
fn the_archive_stream_keeps_each_bills_history_for_the_cli_the_api_and_every_replica() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("archive");
    let url = vhost.url();
    let r = start(&archived_bills(&url, "7d"), &BILLING_AND_NOTIFICATION);
    assert!(r.appliance.is_ready());
    let amqp = Amqp::connect(&url).unwrap();
    assert!(
        amqp.queue_state("switchboard.archive").is_some(),
        "the stream is declared at start"
    );
    let bill = |id: &str| {
        json!({"bill_id": id, "amount": 12, "currency": "EUR",
               "customer": {"name": "Ann", "email": "ann@example.com"}})
    };
    for id in ["B-1", "B-2"] {
        let (code, reply, _) = r.post("events", "bill.created", &bill(id));
        assert_eq!(code, 202, "{reply}");
    }
    // Billing must know the bill before its payment (else it retries).
    wait_until("both bills recorded", || handled_by(&r, "billing") == 2);
    let payment = json!({"id": "pay-1", "type": "payment.success",
                         "data": {"bill_id": "B-1", "payment_id": "P-1"}});
    let (code, reply, _) = r.post("events", "payment.success", &payment);
    assert_eq!(code, 202, "{reply}");
    // bill.paid reaches notification, whose email nobody routes: the stream
    // alone takes it (and keeps it).
    wait_until("the bill paid and notified", || {
        handled_by(&r, "notification") == 1
    });
    // A service publishing to the broker itself, with no AMQP timestamp: the
    // envelope dates it.
    let from_service = json!({"id": "svc-3", "type": "bill.created", "source": "billing-api",
                              "timestamp": "2026-11-22T09:00:00Z", "data": bill("B-3")});
    assert_eq!(
        amqp.publish(&Publish::json("events", "bill.created", &from_service)),
        Confirmed::Routed
    );
    wait_until("the service's bill recorded", || {
        handled_by(&r, "billing") == 4
    });

    // The CLI, on its own connection.
    let (code, history, stderr) = switchboard_tests::cli(&r.dir, &["events", "--aggregate", "B-1"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        routing_keys(&history),
        ["bill.created", "payment.success", "bill.paid"],
        "the bill's history, in publishing order"
    );
    assert_eq!(history[1]["id"], "pay-1");
    assert_eq!(history[1]["body"]["data"]["payment_id"], "P-1");
    assert_eq!(history[2]["causation_id"], "pay-1", "{}", history[2]);
    assert_eq!(history[2]["exchange"], "events");
    let seqs: Vec<u64> = history.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let published = |e: &Value| {
        switchboard::archive::parse_time(e["time"].as_str().unwrap())
            .unwrap_or_else(|why| panic!("{why}: {e}"))
            .timestamp()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now - published(&history[0])).abs() < 60,
        "the router's own publish is dated by its timestamp: {}",
        history[0]
    );
    let (code, b3, stderr) = switchboard_tests::cli(&r.dir, &["events", "--aggregate", "B-3"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(b3.len(), 1);
    assert_eq!(published(&b3[0]), 1_795_338_000, "{}", b3[0]);

    // Replay reads the same stream: billing's part of B-1's history, run
    // offline on a copy of its state, gives the bill.paid production
    // published, with the same id, and publishes nothing.
    let (code, replayed, stderr) = switchboard_tests::cli(
        &r.dir,
        &["replay", "billing", "--aggregate", "B-1", "--dry-run"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        replayed.len(),
        2,
        "bill.created and payment.success: {replayed:?}"
    );
    assert_eq!(replayed[1]["outputs"][0]["type"], "bill.paid");
    assert_eq!(replayed[1]["outputs"][0]["id"], history[2]["id"]);
    let (code, diff, stderr) = switchboard_tests::cli(
        &r.dir,
        &[
            "replay",
            "billing",
            "--diff",
            "--file",
            switchboard_tests::wasm("billing").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(diff[0]["summary"]["events"], 4, "{diff:?}");
    assert_eq!(diff[0]["summary"]["same"], 4);

    // The API: the same records.
    let b1 = r.get("/api/events?aggregate=B-1");
    assert_eq!(b1["items"].as_array().unwrap(), &history);
    // Everything, a page at a time: the next page starts at its position.
    let first = r.get("/api/events?limit=3");
    let first = first["items"].as_array().unwrap().clone();
    let after = first.last().unwrap()["seq"].as_u64().unwrap();
    let rest = r.get(&format!("/api/events?limit=10&after={after}"));
    assert_eq!(rest["next_after"], Value::Null, "{rest}");
    let all: Vec<Value> = first
        .into_iter()
        .chain(rest["items"].as_array().unwrap().iter().cloned())
        .collect();
    assert_eq!(
        routing_keys(&all),
        [
            "bill.created",
            "bill.created",
            "payment.success",
            "bill.paid",
            "notification.email",
            "bill.created"
        ]
    );
    let emails = r.get("/api/events?match=notification.%23");
    assert_eq!(emails["items"].as_array().unwrap().len(), 1);
    // A page past the end is empty (after the broker timeout).
    let beyond = r.get("/api/events?after=1000000");
    assert_eq!(beyond["items"], json!([]), "{beyond}");

    // A replica on the same broker and prefix declares the same stream and
    // reads the same history.
    let replica = start(&archived_bills(&url, "7d"), &BILLING_AND_NOTIFICATION);
    assert!(replica.appliance.is_ready());
    let seen = replica.get("/api/events?aggregate=B-1");
    assert_eq!(seen["items"].as_array().unwrap(), &history);

    // Retention edited: the broker keeps the stream's arguments; the
    // appliance does not start, and says what to do.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let edited = RouterConfig::parse(&archived_bills(&url, "1d"), dir.path()).unwrap();
    let refused = switchboard::appliance::Appliance::start(edited)
        .map(|_| ())
        .unwrap_err();
    let why = format!("{refused:#}");
    assert!(
        why.contains("switchboard.archive") && why.contains("x-max-age"),
        "{why}"
    );
    assert!(
        why.contains("delete the stream") && why.contains("policy"),
        "{why}"
    );
}

/// Retention of the archive stream on the broker, with small segments: what is
/// past `max_size` is gone from the history, oldest first, and so is what is
/// older than `max_age`; the newest events stay, in order.
#[test]
fn the_archive_stream_keeps_only_what_its_retention_allows() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("archive-retention");
    let archive = "[archive]\nenabled = true\nmax_age = \"4s\"\nmax_size = \"64KiB\"\n\
                   segment_size = \"8KiB\"\n";
    let r = start(
        &(config(&vhost.url(), "", "") + archive),
        &[("worker.wasm", "scripted_guest")],
    );
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    let pad = "x".repeat(500);
    let publish = |prefix: &str, n: usize| {
        for i in 0..n {
            send(&amqp, &format!("{prefix}-{i}"), "ok", json!({"pad": pad}));
        }
    };
    let archived = |r: &Running| -> Vec<String> {
        let (code, events, stderr) = switchboard_tests::cli(&r.dir, &["events"]);
        assert_eq!(code, 0, "{stderr}");
        events
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    };

    // By size: about 400 KiB of events into a 64 KiB stream.
    publish("size", 600);
    wait_until("600 handled", || handled(&r) == 600);
    let kept = archived(&r);
    assert!(!kept.is_empty());
    assert!(
        kept.len() < 300,
        "at most max_size and a segment kept, not {} events",
        kept.len()
    );
    let expected: Vec<String> = (600 - kept.len()..600)
        .map(|i| format!("size-{i}"))
        .collect();
    assert_eq!(kept, expected, "the newest events, in order");

    // By age: once max_age has passed, the next segments push the old ones out.
    std::thread::sleep(Duration::from_secs(5));
    publish("age", 60);
    wait_until("660 handled", || handled(&r) == 660);
    let kept = archived(&r);
    assert!(
        kept.iter().all(|id| id.starts_with("age-")),
        "events older than max_age are gone: {:?}",
        &kept[..kept.len().min(5)]
    );
    assert_eq!(kept.last().map(String::as_str), Some("age-59"));
}

/// The event-sourcing example on RabbitMQ: an order's lifecycle through the
/// `orders` plugin, its history read from the archive stream, and its state
/// deleted then rebuilt from that history, byte for byte.
#[test]
fn an_orders_state_is_rebuilt_from_the_archive_stream() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("orders");
    let config = format!(
        r#"
plugins_dir = "plugins"
state_dir = "state"
[broker]
url = "{}"
timeout = "2s"
[[exchanges]]
name = "events"
[plugins.orders]
ordered = true
[[routes]]
exchange = "events"
patterns = ["order.created", "order.paid", "order.shipped", "order.delivered", "order.cancelled"]
plugin = "orders"
[archive]
enabled = true
[[archive.aggregates]]
match = "order.*"
field = "data.order_id"
"#,
        vhost.url()
    );
    let r = start(&config, &[("orders.wasm", "orders")]);
    let lifecycle = [
        (
            "order.created",
            json!({"order_id": "O-7", "items": [{"sku": "B-2", "qty": 1}]}),
        ),
        ("order.paid", json!({"order_id": "O-7", "amount": 19})),
        (
            "order.shipped",
            json!({"order_id": "O-7", "carrier": "DHL"}),
        ),
        ("order.delivered", json!({"order_id": "O-7"})),
    ];
    for (n, (kind, data)) in lifecycle.iter().enumerate() {
        let (code, reply, _) = r.post("events", kind, data);
        assert_eq!(code, 202, "{reply}");
        wait_until(kind, || handled_by(&r, "orders") == n as u64 + 1);
    }
    let state = r.get("/api/kv/orders/order:O-7");
    assert_eq!(state["value"]["status"], "DELIVERED", "{state}");

    let (code, history, stderr) = switchboard_tests::cli(&r.dir, &["events", "--aggregate", "O-7"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        routing_keys(&history),
        lifecycle.iter().map(|(k, _)| *k).collect::<Vec<_>>()
    );

    let (status, body) = r.request("DELETE", "/api/kv/orders/order:O-7", None, None);
    assert_eq!(status, 204, "{body}");
    let (code, written, stderr) = switchboard_tests::cli(
        &r.dir,
        &[
            "replay",
            "orders",
            "--aggregate",
            "O-7",
            "--rebuild",
            "--url",
            &r.url,
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(written.len(), 1, "{written:?}");
    assert_eq!(r.get("/api/kv/orders/order:O-7"), state);

    // Re-delivered through the plugin's queue on the broker: the reducer sees
    // events it has applied (their ids are in the history) and changes nothing.
    let (code, lines, stderr) = switchboard_tests::cli(
        &r.dir,
        &[
            "replay",
            "orders",
            "--aggregate",
            "O-7",
            "--publish",
            "--url",
            &r.url,
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(lines[0]["delivered"], 4, "{lines:?}");
    wait_until("the replay handled", || handled_by(&r, "orders") == 8);
    assert_eq!(r.get("/api/kv/orders/order:O-7"), state);
    let letters = r.appliance.transport().dead_letters("orders", 10).unwrap();
    assert!(letters.is_empty(), "{letters:?}");
}

/// Takes `count` messages from `queue` as they arrive: (message, when it
/// arrived, ms since the epoch), polling every few ms.
fn arrivals(amqp: &Amqp, queue: &str, count: usize, timeout: Duration) -> Vec<(Received, i64)> {
    let until = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < count && Instant::now() < until {
        for m in amqp.get(queue, 1, Duration::from_millis(5)) {
            got.push((m, epoch_ms()));
        }
    }
    got
}

/// Delayed outputs on RabbitMQ wait in the broker's delay ladder: visible
/// while they wait, published no earlier than asked and at most a second
/// late across a restart of the router, and still there after a restart of
/// the broker.
#[test]
fn delayed_outputs_wait_on_the_broker_through_router_and_broker_restarts() {
    if !require_broker() {
        return;
    }
    let node = ThrowawayNode::start();
    let url = node.url();
    let r = start(&config(&url, "", ""), &[("worker.wasm", "scripted_guest")]);
    let amqp = Amqp::connect(&url).unwrap();
    let sink = amqp.declare_sink(Some("delayed-sink"), SinkLife::Durable, "out", "#");

    // A restart of the router while they wait.
    let (first, step) = (4_000i64, 300i64);
    let before = epoch_ms();
    send(
        &amqp,
        "d-1",
        "emit",
        json!({"count": 5, "delay_ms": first, "step_ms": step, "tag": "router"}),
    );
    wait_until("the event handled", || handled(&r) == 1);
    let handled_at = epoch_ms();
    let metrics = r.appliance.metrics_text();
    assert!(
        metrics.contains("switchboard_delayed_outputs_waiting 5"),
        "{metrics}"
    );
    assert_eq!(
        status(&r, "worker")
            .dispatch
            .unwrap()
            .delayed
            .load(std::sync::atomic::Ordering::SeqCst),
        5
    );
    let (_, dir) = r.stop_and_keep(Duration::from_secs(10));
    let r = start_in(dir.path());
    assert!(
        epoch_ms() < before + first,
        "the restart took longer than the first delay"
    );
    let got = arrivals(&amqp, &sink, 5, Duration::from_secs(20));
    assert_eq!(got.len(), 5, "every delayed output arrives");
    for (m, at) in &got {
        let body = m.json();
        assert_eq!(body["data"]["tag"], "router");
        let i = body["data"]["i"].as_i64().unwrap();
        let asked = first + step * i;
        assert!(
            at - before >= asked,
            "output {i} came {} ms early",
            asked - (at - before)
        );
        let late = at - (handled_at + asked);
        assert!(late <= 1_000, "output {i} came {late} ms late");
        assert!(
            !m.headers.keys().any(|k| k.starts_with("switchboard-delay")),
            "the router's delay headers are not published: {:?}",
            m.headers
        );
        assert_eq!(body["source"], "worker");
    }

    // A restart of the broker while they wait.
    let before = epoch_ms();
    send(
        &amqp,
        "d-2",
        "emit",
        json!({"count": 3, "delay_ms": 9_000, "step_ms": 500, "tag": "broker"}),
    );
    // (A new process: its counters start again.)
    wait_until("the event handled", || handled(&r) == 1);
    drop(amqp);
    node.restart();
    wait_until("the router back on the broker", || r.appliance.is_ready());
    let amqp = Amqp::connect(&url).unwrap();
    let got = arrivals(&amqp, &sink, 3, Duration::from_secs(40));
    assert_eq!(
        got.len(),
        3,
        "every delayed output survives the broker restart"
    );
    for (m, at) in &got {
        let body = m.json();
        assert_eq!(body["data"]["tag"], "broker");
        let asked = 9_000 + 500 * body["data"]["i"].as_i64().unwrap();
        assert!(
            at - before >= asked,
            "came {} ms early",
            asked - (at - before)
        );
    }
    assert!(dead_letters(&r).is_empty());
}
