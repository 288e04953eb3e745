//! The real-broker test support itself, against the real RabbitMQ: a test that
//! relies on vhost isolation, on the plain client or on a throwaway node must be
//! able to trust them.

use std::time::Duration;

use serde_json::json;
use switchboard_tests::broker::{
    Amqp, Confirmed, Publish, SinkLife, TestVhost, ThrowawayNode, require_broker,
};

#[test]
fn a_queue_in_one_vhost_is_invisible_in_another() {
    if !require_broker() {
        return;
    }
    let (a, b) = (TestVhost::new("isolation-a"), TestVhost::new("isolation-b"));
    let amqp_a = Amqp::connect(&a.url()).unwrap();
    let amqp_b = Amqp::connect(&b.url()).unwrap();
    amqp_a.declare_exchange("events", "topic");
    amqp_a.declare_sink(Some("work"), SinkLife::Durable, "events", "#");
    assert_eq!(
        amqp_a.publish(&Publish::new("events", "k", "x")),
        Confirmed::Routed
    );

    let state = amqp_a.queue_state("work").unwrap();
    assert_eq!((state.messages, state.consumers), (1, 0));
    assert_eq!(amqp_b.queue_state("work"), None);
    // The failed passive declare did not break the client.
    assert_eq!(amqp_b.queue_state("work"), None);
    amqp_b.declare_exchange("events", "topic");
    assert_eq!(
        amqp_b.publish(&Publish::new("events", "k", "x")),
        Confirmed::Unroutable,
        "the other vhost's binding must not route here"
    );
}

#[test]
fn published_message_comes_back_with_its_properties_and_headers() {
    if !require_broker() {
        return;
    }
    let vhost = TestVhost::new("round-trip");
    let amqp = Amqp::connect(&vhost.url()).unwrap();
    amqp.declare_exchange("events", "topic");
    let sink = amqp.sink("events", "bill.*");
    let body = json!({"id": "evt-1", "type": "bill.created", "data": {"bill_id": "B-1"}});
    let message = Publish::json("events", "bill.created", &body)
        .message_id("evt-1")
        .header("x-tenant", "acme")
        .header("cloudEvents:source", "/billing");
    assert_eq!(amqp.publish(&message), Confirmed::Routed);
    assert_eq!(
        amqp.publish(&Publish::new("events", "order.created", "not bound")),
        Confirmed::Unroutable
    );

    let got = amqp.get(&sink, 2, Duration::from_millis(500));
    assert_eq!(got.len(), 1, "only the bound routing key arrives");
    let got = &got[0];
    assert_eq!(
        (got.exchange.as_str(), got.routing_key.as_str()),
        ("events", "bill.created")
    );
    assert_eq!(got.json(), body);
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(got.message_id.as_deref(), Some("evt-1"));
    assert_eq!(got.delivery_mode, Some(2), "published persistent");
    assert_eq!(got.header("x-tenant"), Some("acme"));
    assert_eq!(got.header("cloudEvents:source"), Some("/billing"));
    assert!(!got.redelivered);
    // Taken messages were acknowledged: the queue is empty, and deleting it says so.
    assert_eq!(amqp.queue_state(&sink).map(|s| s.messages), Some(0));
    assert_eq!(amqp.delete_queue(&sink), 0);
    assert_eq!(amqp.queue_state(&sink), None);
}

#[test]
fn closing_a_vhosts_connections_leaves_other_vhosts_alone() {
    if !require_broker() {
        return;
    }
    let (closed, spared) = (TestVhost::new("close-a"), TestVhost::new("close-b"));
    let victim = Amqp::connect(&closed.url()).unwrap();
    let bystander = Amqp::connect(&spared.url()).unwrap();
    victim.declare_exchange("events", "topic");
    bystander.declare_exchange("events", "topic");

    closed.close_all_connections("test: simulated network failure");
    let dropped = (0..250).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        !victim.is_connected()
    });
    assert!(dropped, "the closed vhost's connection must drop");
    assert!(bystander.is_connected());
    bystander.declare_exchange("events", "topic");
}

#[test]
fn throwaway_node_refuses_connections_between_stop_app_and_start_app() {
    if !require_broker() {
        return;
    }
    let node = ThrowawayNode::start();
    {
        let amqp = Amqp::connect(&node.url()).unwrap();
        amqp.declare_exchange("events", "topic");
        amqp.declare_sink(Some("kept"), SinkLife::Durable, "events", "#");
        assert_eq!(
            amqp.publish(&Publish::new("events", "k", "persistent")),
            Confirmed::Routed
        );
    }

    node.stop_app();
    let refused = Amqp::connect(&node.url());
    assert!(refused.is_err(), "a stopped broker must refuse connections");

    node.start_app();
    let amqp = Amqp::connect(&node.url()).unwrap();
    assert_eq!(amqp.queue_state("kept").map(|s| s.messages), Some(1));

    // A full restart keeps durable queues and persistent messages.
    drop(amqp);
    node.restart();
    let amqp = Amqp::connect(&node.url()).unwrap();
    let got = amqp.get("kept", 1, Duration::from_secs(5));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"persistent");
}
