//! The seed topologies under `tests/rabbit/` on the real broker, fed with
//! envelopes in the services' own format: the commerce bus (billing, then
//! notification, with analytics on a fanout and a direct exchange) and the
//! backstage bus.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use serde_json::{Value, json};
use switchboard::config::RouterConfig;
use switchboard_tests::broker::{Amqp, Confirmed, Publish, Received, TestVhost, require_broker};
use switchboard_tests::running::{Running, start};

fn topology(file: &str, url: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("rabbit")
        .join(file);
    let text = std::fs::read_to_string(path).unwrap();
    text.replacen("[broker]\n", &format!("[broker]\nurl = \"{url}\"\n"), 1)
}

fn publish(amqp: &Amqp, exchange: &str, event: &Value) -> Confirmed {
    let key = event["type"].as_str().unwrap();
    amqp.publish(&Publish::json(exchange, key, event))
}

fn handled(r: &Running, plugin: &str) -> u64 {
    r.appliance
        .statuses()
        .into_iter()
        .find(|s| s.name == plugin)
        .and_then(|s| s.dispatch)
        .map_or(0, |d| d.handled.load(std::sync::atomic::Ordering::SeqCst))
}

#[test]
fn the_seed_topologies_parse_as_shipped() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["commerce.toml", "backstage.toml"] {
        let text = topology(file, "amqp://guest:guest@127.0.0.1:5672/%2f");
        RouterConfig::parse(&text, dir.path()).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

#[test]
fn the_commerce_bus_bills_notifies_and_counts() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("commerce");
    let r = start(
        &topology("commerce.toml", &vhost.url()),
        &[
            ("billing.wasm", "billing"),
            ("notification.wasm", "notification"),
            ("analytics.wasm", "analytics"),
        ],
    );
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    let emails = amqp.sink("notifications", "notification.#");
    let paid = amqp.sink("payments", "bill.paid");
    let customer = json!({"name": "Ann Lee", "email": "ann@example.com", "phone": "+33612345678"});

    let bill = json!({"id": "evt-1001", "type": "bill.created", "source": "billing-api",
        "timestamp": "2026-11-22T09:00:00Z", "tenant_id": "acme", "correlation_id": "order-77",
        "data": {"bill_id": "B-1001", "amount": 129.9, "currency": "EUR", "customer": customer}});
    assert_eq!(publish(&amqp, "payments", &bill), Confirmed::Routed);
    let payment = json!({"id": "evt-1002", "type": "payment.success", "source": "payments-api",
        "timestamp": "2026-11-22T09:05:00Z", "tenant_id": "acme", "correlation_id": "order-77",
        "data": {"bill_id": "B-1001", "payment_id": "PAY-1", "amount": 129.9, "currency": "EUR",
                 "customer": customer}});
    // Billing must have recorded the bill first (a payment for an unknown
    // bill is retried): give it a moment, as the services' own order does.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(publish(&amqp, "payments", &payment), Confirmed::Routed);
    let shipped = json!({"id": "evt-1003", "type": "order.shipped", "source": "orders-api",
        "tenant_id": "acme", "correlation_id": "order-77",
        "data": {"order_id": "O-77", "carrier": "DHL", "tracking": "JD0146", "customer": customer}});
    assert_eq!(publish(&amqp, "orders", &shipped), Confirmed::Routed);
    let signup = json!({"id": "evt-1004", "type": "user.created", "source": "accounts-api",
        "tenant_id": "acme", "data": {"user_id": "U-1", "user": {"name": "Ann Lee", "email": "ann@example.com"}}});
    assert_eq!(publish(&amqp, "customers", &signup), Confirmed::Routed);
    // A product event: declared, nobody routes it (yet).
    let product = json!({"id": "evt-1005", "type": "product.updated", "data": {}});
    assert_eq!(publish(&amqp, "products", &product), Confirmed::Unroutable);

    let bill_paid = amqp.get(&paid, 1, Duration::from_secs(20));
    assert_eq!(bill_paid.len(), 1);
    let bill_paid = bill_paid[0].json();
    assert_eq!(bill_paid["source"], "billing");
    assert_eq!(bill_paid["correlation_id"], "order-77");
    assert_eq!(bill_paid["causation_id"], "evt-1002");

    // bill.paid (email + SMS), order.shipped (email), user.created (email).
    let got = amqp.get(&emails, 4, Duration::from_secs(20));
    let mut kinds: Vec<(String, String)> = got
        .iter()
        .map(|m| {
            (
                m.routing_key.clone(),
                m.json()["data"]["template_id"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    kinds.sort();
    assert_eq!(got.len(), 4, "{kinds:?}");
    assert!(got.iter().all(
        |m| m.json()["correlation_id"] == "order-77" || m.json()["causation_id"] == "evt-1004"
    ));
    assert!(got.iter().any(|m| m.routing_key == "notification.sms"));

    // Analytics: a copy on the fanout (any key) and one on the direct exchange.
    let copy =
        json!({"id": "evt-2001", "type": "page.viewed", "source": "web", "data": {"path": "/"}});
    assert_eq!(publish(&amqp, "analytics", &copy), Confirmed::Routed);
    let dead =
        json!({"id": "evt-2002", "type": "order.failed", "source": "orders-api", "data": {}});
    assert_eq!(
        amqp.publish(&Publish::json("deadletter", "dead", &dead)),
        Confirmed::Routed
    );
    assert_eq!(
        amqp.publish(&Publish::json("deadletter", "dead.letter", &dead)),
        Confirmed::Unroutable
    );
    let until = Instant::now() + Duration::from_secs(20);
    while handled(&r, "analytics") < 2 {
        assert!(
            Instant::now() < until,
            "analytics handled {}",
            handled(&r, "analytics")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        r.appliance
            .transport()
            .dead_letters("billing", 10)
            .unwrap()
            .is_empty()
    );
    assert!(
        r.appliance
            .transport()
            .dead_letters("notification", 10)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn the_backstage_bus_notifies_on_posts_and_signups() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("backstage");
    let r = start(
        &topology("backstage.toml", &vhost.url()),
        &[("notification.wasm", "notification")],
    );
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    // The router's own queues carry the backstage prefix.
    assert!(
        amqp.queue_state("backstage.switchboard.notification")
            .is_some()
    );
    let out = amqp.sink("backstage.notifications", "#");
    let post = json!({"id": "post-1", "type": "post.published", "source": "backstage-api",
        "tenant_id": "guild", "correlation_id": "req-9",
        "data": {"post_id": "P-1", "title": "Hello", "author": {"name": "Bo"},
                 "recipient": {"email": "bo@example.com"}}});
    assert_eq!(publish(&amqp, "backstage.events", &post), Confirmed::Routed);
    let signup = json!({"id": "user-1", "type": "user.created", "source": "backstage-api",
        "data": {"user": {"name": "Cy", "email": "cy@example.com"}}});
    assert_eq!(
        publish(&amqp, "backstage.events", &signup),
        Confirmed::Routed
    );
    // `post.*` is one word: a deeper key is not routed.
    let deep = json!({"id": "post-2", "type": "post.comment.added", "data": {}});
    assert_eq!(
        publish(&amqp, "backstage.events", &deep),
        Confirmed::Unroutable
    );

    let got = amqp.get(&out, 2, Duration::from_secs(20));
    let dead = r
        .appliance
        .transport()
        .dead_letters("notification", 10)
        .unwrap();
    assert_eq!(got.len(), 2, "dead letters: {dead:?}");
    let post_mail = got
        .iter()
        .find(|m| m.json()["causation_id"] == "post-1")
        .unwrap()
        .json();
    assert_eq!(post_mail["data"]["recipient"], "bo@example.com");
    assert_eq!(post_mail["data"]["subject"], "New post: Hello");
    assert_eq!(post_mail["data"]["body"], "Bo published \"Hello\".");
    assert_eq!(post_mail["correlation_id"], "req-9");
    drop(r);
}

/// The official CloudEvents Python SDK (with its AMQP and RabbitMQ bindings), in
/// a virtualenv under the target dir, made on first use: its Python, or `None`
/// (outside CI only) when Python or PyPI cannot be had.
fn cloudevents_sdk() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let venv = target.join("py-cloudevents");
    let python = venv.join("bin").join("python");
    let has_sdk = || {
        Command::new(&python)
            .args([
                "-c",
                "import cloudevents.core.bindings.amqp, cloudevents.core.bindings.rabbitmq",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has_sdk() {
        return Some(python);
    }
    let run = |what: &str, command: &mut Command| -> Result<(), String> {
        match command.output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "{what} failed: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => Err(format!("{what} could not run: {e}")),
        }
    };
    let made = run(
        "python3 -m venv",
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
    )
    .and_then(|()| {
        run(
            "pip install cloudevents==2.2.0",
            Command::new(&python).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-cache-dir",
                "cloudevents==2.2.0",
            ]),
        )
    });
    match made {
        Ok(()) if has_sdk() => Some(python),
        outcome => {
            let message = format!(
                "the CloudEvents Python SDK could not be installed in {}: {}",
                venv.display(),
                outcome.err().unwrap_or_else(|| "it does not import".into())
            );
            if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
                panic!("{message}");
            }
            let bar = "!".repeat(78);
            let _ = writeln!(
                std::io::stderr().lock(),
                "\n{bar}\nSKIPPED: {message}\n{bar}"
            );
            None
        }
    }
}

/// An SDK-made header as the AMQP type a client keeps it as: strings as long
/// strings, integers as long longs, booleans as booleans; with `timestamp`, an
/// AMQP timestamp (seconds since the epoch in AMQP 0-9-1; the SDK gives
/// milliseconds, the AMQP 1.0 unit).
fn amqp_value(header: &Value, timestamps: bool) -> AMQPValue {
    let value = &header["value"];
    match header["type"].as_str().unwrap() {
        "int" if timestamps && header["amqp"] == "timestamp" => {
            AMQPValue::Timestamp(value.as_u64().unwrap() / 1000)
        }
        "int" => AMQPValue::LongLongInt(value.as_i64().unwrap()),
        "bool" => AMQPValue::Boolean(value.as_bool().unwrap()),
        "str" => AMQPValue::LongString(value.as_str().unwrap().into()),
        other => panic!("no AMQP type for the SDK's {other} in {header}"),
    }
}

/// Publishes with typed headers, confirmed and mandatory.
fn publish_typed(url: &str, exchange: &str, key: &str, message: &Value, timestamps: bool) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let mut headers = FieldTable::default();
        for header in message["headers"].as_array().unwrap() {
            headers.insert(
                header["name"].as_str().unwrap().into(),
                amqp_value(header, timestamps),
            );
        }
        let mut properties = BasicProperties::default().with_headers(headers);
        if let Some(content_type) = message["content_type"].as_str() {
            properties = properties.with_content_type(content_type.into());
        }
        let confirmation = channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                message["body"].as_str().unwrap().as_bytes(),
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            matches!(confirmation, Confirmation::Ack(None)),
            "{} was not routed",
            message["mode"]
        );
        connection.close(200, "done".into()).await.unwrap();
    });
}

#[test]
fn cloudevents_from_the_official_sdk_keep_their_identity_in_every_mode() {
    if !require_broker() {
        return;
    }
    let Some(python) = cloudevents_sdk() else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/cloudevents_sdk.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg("sdk")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: Value = serde_json::from_slice(&out.stdout).unwrap();
    let kind = made["event"]["type"].as_str().unwrap();
    let time = made["event"]["time"].as_str().unwrap();

    let vhost = TestVhost::new("cloudevents-sdk");
    let config = format!(
        r##"
plugins_dir = "plugins"
state_dir = "state"
[broker]
url = "{url}"
[[exchanges]]
name = "ce.events"
kind = "topic"
[[exchanges]]
name = "ce.notifications"
kind = "topic"
[plugins.notification]
output_exchange = "ce.notifications"
[plugins.notification.config]
"{kind}.subject" = "{{{{event.id}}}}"
"{kind}.body" = "{{{{event.id}}}}|{{{{event.kind}}}}|{{{{event.source}}}}|{{{{event.time}}}}|{{{{order}}}}"
[[routes]]
exchange = "ce.events"
pattern = "#"
plugin = "notification"
"##,
        url = vhost.url()
    );
    let r = start(&config, &[("notification.wasm", "notification")]);
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    let out = amqp.sink("ce.notifications", "#");

    // The four modes as the SDK made them; the AMQP binding's binary mode twice:
    // `time` as an AMQP timestamp (as the binding means it), and as the plain
    // integer the SDK hands over (milliseconds).
    let mut sent = Vec::new();
    for message in made["messages"].as_array().unwrap() {
        let mode = message["mode"].as_str().unwrap();
        publish_typed(&vhost.url(), "ce.events", kind, message, true);
        sent.push((
            mode.to_string(),
            format!("sdk-{mode}"),
            format!("/sdk/{mode}"),
        ));
        if mode == "amqp-binary" {
            let mut as_int = message.clone();
            let id = "sdk-amqp-binary-int";
            for header in as_int["headers"].as_array_mut().unwrap() {
                if header["name"] == "cloudEvents_id" {
                    header["value"] = id.into();
                }
            }
            publish_typed(&vhost.url(), "ce.events", kind, &as_int, false);
            sent.push((
                format!("{mode} (int time)"),
                id.into(),
                format!("/sdk/{mode}"),
            ));
        }
    }

    let got = amqp.get(&out, sent.len(), Duration::from_secs(20));
    let dead = r
        .appliance
        .transport()
        .dead_letters("notification", 10)
        .unwrap();
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    assert_eq!(got.len(), sent.len(), "outputs: {got:?}");
    for (mode, id, source) in &sent {
        let mail = got
            .iter()
            .map(Received::json)
            .find(|m| m["causation_id"] == id.as_str())
            .unwrap_or_else(|| panic!("{mode}: no output caused by {id}: {got:?}"));
        assert_eq!(
            mail["data"]["body"],
            format!("{id}|{kind}|{source}|{time}|7"),
            "{mode}"
        );
        assert_eq!(mail["data"]["recipient"], "ce@example.com", "{mode}");
    }
    drop(r);
}
