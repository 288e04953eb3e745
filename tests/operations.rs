//! What an operator relies on: `/metrics` counting exactly what happened, the
//! admin API and its token, and JSON logs that follow a flow by its correlation
//! id through two plugins.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard_tests::process::Replica;
use switchboard_tests::running::{Running, start};

const TOKEN: &str = "s3cret-admin-token-0123456789";

fn config(extra_http: &str) -> String {
    format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[http]
token = "{TOKEN}"
{extra_http}
[defaults]
concurrency = 2
max_attempts = 3
[defaults.backoff]
initial = "10ms"
max = "20ms"
jitter = 0.0
[[exchanges]]
name = "events"
[plugins.worker]
[[routes]]
exchange = "events"
patterns = ["ok", "fail-until", "reject"]
plugin = "worker"
"##
    )
}

fn worker(extra_http: &str) -> Running {
    start(&config(extra_http), &[("worker.wasm", "scripted_guest")])
}

fn envelope(id: &str, kind: &str, data: Value) -> Value {
    json!({"id": id, "type": kind, "source": "tests", "correlation_id": format!("corr-{id}"), "data": data})
}

/// The samples of `/metrics`, `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn sample(all: &BTreeMap<String, f64>, name: &str) -> f64 {
    all.get(name).copied().unwrap_or(0.0)
}

#[test]
fn metrics_count_exactly_what_a_scripted_run_did() {
    let r = worker("");
    // 12 succeed at once, 5 are retried once then succeed, 3 are rejected.
    let mut sent = 0;
    for i in 0..12 {
        assert_eq!(
            r.post(
                "events",
                "ok",
                &envelope(&format!("ok-{i}"), "ok", json!({}))
            )
            .0,
            401,
            "no token"
        );
        let body = envelope(&format!("ok-{i}"), "ok", json!({}));
        let (status, _) = r.request("POST", "/events/events/ok", Some(TOKEN), Some(&body));
        assert_eq!(status, 202);
        sent += 1;
    }
    for i in 0..5 {
        let body = envelope(&format!("f-{i}"), "fail-until", json!({"succeed_on": 2}));
        let (status, _) = r.request(
            "POST",
            "/events/events/fail-until",
            Some(TOKEN),
            Some(&body),
        );
        assert_eq!(status, 202);
        sent += 1;
    }
    for i in 0..3 {
        let body = envelope(&format!("r-{i}"), "reject", json!({}));
        let (status, _) = r.request("POST", "/events/events/reject", Some(TOKEN), Some(&body));
        assert_eq!(status, 202);
        sent += 1;
    }
    assert_eq!(sent, 20);
    r.wait_idle();

    // W3C trace context from the HTTP request reaches the outputs.
    let mut published = r.appliance.transport().subscribe_stream();
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut response = ureq::post(format!("{}/events/events/fail-until", r.url))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .header("traceparent", parent)
        .send(envelope("traced", "fail-until", json!({"succeed_on": 1})).to_string())
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        202,
        "{}",
        response.body_mut().read_to_string().unwrap()
    );
    r.wait_idle();
    let mut seen = Vec::new();
    while let Ok(p) = published.try_recv() {
        seen.push((
            p.routing_key.clone(),
            p.message.header("traceparent").map(str::to_string),
        ));
    }
    assert!(
        seen.contains(&("fail-until".to_string(), Some(parent.to_string()))),
        "the ingress carries it: {seen:?}"
    );
    assert!(
        seen.contains(&("succeeded".to_string(), Some(parent.to_string()))),
        "the output carries it: {seen:?}"
    );

    let (status, text) = r.request("GET", "/metrics", None, None);
    assert_eq!(status, 200);
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text");
    let m = samples(&text);
    let p = "{plugin=\"worker\"}";
    // 20 events, 5 of them delivered twice, and the traced one.
    assert_eq!(
        sample(&m, &format!("switchboard_events_received_total{p}")),
        26.0,
        "{text}"
    );
    assert_eq!(
        sample(&m, &format!("switchboard_events_succeeded_total{p}")),
        18.0
    );
    assert_eq!(
        sample(&m, &format!("switchboard_events_retried_total{p}")),
        5.0
    );
    assert_eq!(
        sample(
            &m,
            "switchboard_events_failed_total{plugin=\"worker\",reason=\"retry\"}"
        ),
        5.0
    );
    assert_eq!(
        sample(
            &m,
            "switchboard_events_failed_total{plugin=\"worker\",reason=\"reject\"}"
        ),
        3.0
    );
    assert_eq!(
        sample(
            &m,
            "switchboard_events_dead_lettered_total{plugin=\"worker\",reason=\"reject\"}"
        ),
        3.0
    );
    // `fail-until` emits one output when it succeeds; `ok` emits none.
    assert_eq!(
        sample(&m, &format!("switchboard_outputs_published_total{p}")),
        6.0
    );
    assert_eq!(
        sample(
            &m,
            &format!("switchboard_handler_duration_seconds_count{p}")
        ),
        26.0
    );
    assert_eq!(
        sample(&m, &format!("switchboard_queue_dead_letters{p}")),
        3.0
    );
    assert_eq!(sample(&m, &format!("switchboard_queue_messages{p}")), 0.0);
    assert_eq!(sample(&m, &format!("switchboard_queue_consumers{p}")), 2.0);
    assert_eq!(sample(&m, "switchboard_bus_connected"), 1.0);
    assert_eq!(
        sample(
            &m,
            "switchboard_plugin_loads_total{plugin=\"worker\",result=\"ok\"}"
        ),
        1.0
    );
    assert!(sample(&m, "switchboard_last_reload_timestamp_seconds") > 1.7e9);
    for kind in ["counter", "histogram", "gauge"] {
        assert!(text.contains(&format!(" {kind}\n")), "a {kind} is declared");
    }
}

#[test]
fn a_refused_post_closes_its_connection_and_says_so() {
    use std::io::{Read, Write};

    let r = worker("");
    let address = r.url.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let body = format!("{{\"padding\":\"{}\"}}", "x".repeat(100_000));
    let head = format!(
        "POST /events/events/ok HTTP/1.1\r\nhost: {address}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer (and close) before the body is all sent.
    let _ = stream.write_all(body.as_bytes());
    let mut response = Vec::new();
    // To the end: the server closes the connection after the answer.
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).to_lowercase();
    assert!(response.starts_with("http/1.1 401"), "{response}");
    assert!(response.contains("\r\nconnection: close\r\n"), "{response}");
}

#[test]
fn the_admin_api_answers_and_the_token_guards_it() {
    let r = worker("");
    for i in 0..3 {
        let body = envelope(&format!("r-{i}"), "reject", json!({}));
        assert_eq!(
            r.request("POST", "/events/events/reject", Some(TOKEN), Some(&body))
                .0,
            202
        );
    }
    r.wait_idle();

    // Mutations: 401 without the token or with a wrong one.
    for token in [None, Some("wrong-token-wrong-token")] {
        for path in [
            "/events/events/ok",
            "/api/dlq/worker/redrive",
            "/dlq/worker/redrive",
            "/api/plugins/worker/reload",
        ] {
            let (status, body) = r.request("POST", path, token, Some(&json!({})));
            assert_eq!(status, 401, "{path} with {token:?}: {body}");
            assert!(body.contains("admin token"), "{body}");
        }
    }
    // Reads are open by default; probes always.
    for path in [
        "/api/plugins",
        "/api/routes",
        "/api/dlq/worker",
        "/metrics",
        "/healthz",
        "/readyz",
        "/plugins",
    ] {
        assert_eq!(r.request("GET", path, None, None).0, 200, "{path}");
    }

    let (_, plugins) = r.request("GET", "/api/plugins", None, None);
    let plugins: Value = serde_json::from_str(&plugins).unwrap();
    let worker = &plugins[0];
    assert_eq!(worker["name"], "worker");
    assert_eq!(worker["status"], "serving");
    assert_eq!(worker["content_hash"].as_str().unwrap().len(), 12);
    assert!(worker["loaded_at"].as_str().unwrap().starts_with("20"));
    assert_eq!(worker["last_error"], Value::Null);
    assert_eq!(worker["limits"]["max_attempts"], 3);
    assert_eq!(worker["limits"]["timeout"], "5s");
    assert_eq!(
        worker["routes"],
        json!([{"exchange": "events", "pattern": "ok"},
               {"exchange": "events", "pattern": "fail-until"},
               {"exchange": "events", "pattern": "reject"}])
    );

    let (_, routes) = r.request("GET", "/api/routes", None, None);
    let routes: Value = serde_json::from_str(&routes).unwrap();
    assert_eq!(routes.as_array().unwrap().len(), 3);
    assert_eq!(
        routes[2],
        json!({"exchange": "events", "kind": "topic", "pattern": "reject", "plugin": "worker", "enabled": true})
    );

    // Dead letters, paged, with their reasons.
    let (_, page) = r.request("GET", "/api/dlq/worker?limit=2", None, None);
    let page: Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["next_offset"], 2);
    assert!(
        page["items"][0].to_string().contains("asked to reject"),
        "{page}"
    );
    let (_, page) = r.request("GET", "/api/dlq/worker?offset=2&limit=2", None, None);
    let page: Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["next_offset"], Value::Null);
    assert_eq!(r.request("GET", "/api/dlq/nobody", None, None).0, 404);

    // With the token: reload, re-drive.
    let (status, body) = r.request("POST", "/api/plugins/worker/reload", Some(TOKEN), None);
    assert_eq!(status, 200, "{body}");
    let reloaded: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reloaded["content_hash"], worker["content_hash"]);
    assert_eq!(
        r.request("POST", "/api/plugins/nobody/reload", Some(TOKEN), None)
            .0,
        404
    );
    let (status, body) = r.request("POST", "/api/dlq/worker/redrive", Some(TOKEN), None);
    assert_eq!((status, body.as_str()), (200, r#"{"redriven":3}"#));
    r.wait_idle();
    // They were rejected again: back in the DLQ.
    let (_, page) = r.request("GET", "/api/dlq/worker", None, None);
    let page: Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 3);

    // protect_reads (applied on reload): reads need the token, probes do not.
    r.write_config(&config("protect_reads = true"));
    r.wait_for("protect_reads to apply", |r| {
        r.request("GET", "/api/plugins", None, None).0 == 401
    });
    for path in [
        "/api/plugins",
        "/api/routes",
        "/api/dlq/worker",
        "/metrics",
        "/plugins",
        "/events/stream",
    ] {
        assert_eq!(r.request("GET", path, None, None).0, 401, "{path}");
    }
    for path in ["/api/plugins", "/api/routes", "/metrics"] {
        assert_eq!(r.request("GET", path, Some(TOKEN), None).0, 200, "{path}");
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(r.request("GET", path, None, None).0, 200, "{path}");
    }
}

#[test]
fn json_logs_carry_the_correlation_id_through_a_two_plugin_chain() {
    let router_toml = r##"
plugins_dir = "plugins"
state_dir = "state"
[[exchanges]]
name = "events"
[plugins.billing]
[plugins.notification]
[[routes]]
exchange = "events"
patterns = ["bill.created", "payment.success"]
plugin = "billing"
[[routes]]
exchange = "events"
patterns = ["bill.paid"]
plugin = "notification"
"##;
    let replica = Replica::start_with(
        router_toml,
        &[
            ("billing.wasm", "billing"),
            ("notification.wasm", "notification"),
        ],
        &["--log-format", "json"],
        &[("SWITCHBOARD_LOG", "info,plugin=debug")],
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let post = |key: &str, body: Value| {
        let status = agent
            .post(format!("{}/events/events/{key}", replica.url))
            .header("content-type", "application/json")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .send(body.to_string())
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(status, 202);
    };
    post(
        "bill.created",
        json!({"id": "c-1", "type": "bill.created", "source": "tests", "correlation_id": "flow-42",
               "data": {"bill_id": "b-1", "amount": 10, "currency": "EUR",
                        "customer": {"email": "ada@example.com"}}}),
    );
    // The bill first, so that the payment is handled at its first attempt.
    let until = Instant::now() + Duration::from_secs(20);
    while replica.dispatch("billing")["handled"].as_u64().unwrap_or(0) < 1 {
        assert!(
            Instant::now() < until,
            "bill.created never handled:\n{}",
            replica.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    post(
        "payment.success",
        json!({"id": "p-1", "type": "payment.success", "source": "tests", "correlation_id": "flow-42",
               "data": {"bill_id": "b-1", "payment_id": "pay-1"}}),
    );
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let handled = replica.dispatch("notification")["handled"]
            .as_u64()
            .unwrap_or(0);
        if handled >= 1 {
            break;
        }
        assert!(
            Instant::now() < until,
            "notification never handled bill.paid:\n{}",
            replica.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = replica.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    // The plugins' own lines, attributed and inside their event's span.
    let in_flow = |plugin: &str, kind: &str| {
        lines.iter().any(|l| {
            l["target"] == "plugin"
                && l["fields"]["plugin"] == plugin
                && l["span"]["name"] == "event"
                && l["span"]["plugin"] == plugin
                && l["span"]["kind"] == kind
                && l["span"]["correlation_id"] == "flow-42"
        })
    };
    assert!(
        in_flow("billing", "payment.success"),
        "billing's line:\n{log}"
    );
    assert!(
        in_flow("notification", "bill.paid"),
        "notification's line:\n{log}"
    );
    // The span says which attempt, and the event id.
    assert!(
        lines
            .iter()
            .any(|l| l["span"]["id"] == "p-1" && l["span"]["attempt"] == 1),
        "{log}"
    );
}

#[test]
fn metrics_on_rabbitmq_read_the_broker() {
    use switchboard_tests::broker::{Amqp, Confirmed, Publish, TestVhost, require_broker};
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("metrics");
    let r = start(
        &format!(
            r##"
plugins_dir = "plugins"
state_dir = "state"
[broker]
url = "{}"
[defaults]
concurrency = 2
max_attempts = 2
[defaults.backoff]
initial = "100ms"
max = "100ms"
jitter = 0.0
[[exchanges]]
name = "events"
[plugins.worker]
[[routes]]
exchange = "events"
patterns = ["emit", "reject"]
plugin = "worker"
"##,
            vhost.url()
        ),
        &[("worker.wasm", "scripted_guest")],
    );
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    for i in 0..10 {
        let kind = if i < 8 { "emit" } else { "reject" };
        let body = envelope(&format!("m-{i}"), kind, json!({"count": 1}));
        assert_eq!(
            amqp.publish(&Publish::json("events", kind, &body)),
            Confirmed::Routed
        );
    }
    r.wait_for("the events to be settled", |r| {
        let m = samples(&r.request("GET", "/metrics", None, None).1);
        sample(&m, "switchboard_events_succeeded_total{plugin=\"worker\"}") == 8.0
            && sample(&m, "switchboard_queue_dead_letters{plugin=\"worker\"}") == 2.0
    });
    let (_, text) = r.request("GET", "/metrics", None, None);
    let m = samples(&text);
    assert_eq!(sample(&m, "switchboard_bus_connected"), 1.0, "{text}");
    assert_eq!(sample(&m, "switchboard_bus_reconnects_total"), 0.0);
    // One consumer per plugin per replica, whatever the concurrency.
    assert_eq!(
        sample(&m, "switchboard_queue_consumers{plugin=\"worker\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "switchboard_queue_messages{plugin=\"worker\"}"),
        0.0
    );
    assert_eq!(
        sample(
            &m,
            "switchboard_events_dead_lettered_total{plugin=\"worker\",reason=\"reject\"}"
        ),
        2.0
    );
    // Every output and every dead letter waited for a broker confirm.
    assert!(
        sample(&m, "switchboard_bus_confirm_duration_seconds_count") >= 10.0,
        "{text}"
    );
    assert_eq!(
        sample(&m, "switchboard_outputs_published_total{plugin=\"worker\"}"),
        8.0
    );

    vhost.close_all_connections("metrics test");
    r.wait_for("the reconnect to show", |r| {
        let m = samples(&r.request("GET", "/metrics", None, None).1);
        sample(&m, "switchboard_bus_reconnects_total") >= 1.0
            && sample(&m, "switchboard_bus_connected") == 1.0
    });
}
