//! Hostile and broken guests: every misbehaviour becomes a classified failure of
//! that one event; the host survives, and the next event is handled normally.

use std::time::{Duration, Instant};

use serde_json::json;
use switchboard::runtime::{Failure, Limits, Plugin, RuntimeConfig};
use switchboard_tests::{Harness, data, event};

fn scripted(h: &Harness, limits: Limits) -> Plugin {
    h.load(
        "scripted",
        "scripted_guest",
        &[("greeting", "hello")],
        limits,
    )
}

fn limits() -> Limits {
    Limits {
        timeout: Duration::from_millis(300),
        memory: 32 << 20,
        ..Limits::default()
    }
}

/// After a failure, the same plugin still handles events.
fn still_healthy(plugin: &Plugin) {
    let outputs = plugin
        .handle(&event("after", "echo", json!({"n": 1})))
        .unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].kind, "echoed");
}

#[test]
fn infinite_loop_times_out() {
    let h = Harness::new();
    let plugin = scripted(&h, limits());
    let started = Instant::now();
    let failure = plugin.handle(&event("e1", "loop", json!({}))).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(failure, Failure::Timeout(_)), "{failure:?}");
    assert!(failure.reason().contains("300 ms"), "{failure}");
    assert!(
        took >= Duration::from_millis(300),
        "interrupted early: {took:?}"
    );
    assert!(failure.is_retryable());
    still_healthy(&plugin);
}

#[test]
fn memory_bomb_is_out_of_memory() {
    let h = Harness::new();
    let plugin = scripted(&h, limits());
    let failure = plugin.handle(&event("e1", "oom", json!({}))).unwrap_err();
    assert!(matches!(failure, Failure::OutOfMemory(_)), "{failure:?}");
    assert!(
        failure.reason().contains(&(32u64 << 20).to_string()),
        "{failure}"
    );
    still_healthy(&plugin);
}

#[test]
fn deep_recursion_is_stack_overflow() {
    let h = Harness::new();
    let plugin = scripted(&h, limits());
    let failure = plugin
        .handle(&event("e1", "recurse", json!({})))
        .unwrap_err();
    assert!(matches!(failure, Failure::StackOverflow(_)), "{failure:?}");
    still_healthy(&plugin);
}

#[test]
fn panic_is_classified_and_the_instance_replaced() {
    let h = Harness::new();
    let plugin = scripted(&h, limits());
    let failure = plugin.handle(&event("e1", "panic", json!({}))).unwrap_err();
    assert!(matches!(failure, Failure::Panic(_)), "{failure:?}");
    assert_eq!(failure.kind(), "panic");
    // The reason is the guest's own panic message, with its location.
    assert!(failure.reason().starts_with("panicked at "), "{failure}");
    assert!(failure.reason().ends_with("scripted panic"), "{failure}");
    // The reason is the guest's own panic message, with its location.
    assert!(failure.reason().starts_with("panicked at "), "{failure}");
    assert!(failure.reason().ends_with("scripted panic"), "{failure}");
    // Several in a row: each trapped instance is discarded, never re-entered.
    for i in 0..3 {
        let f = plugin
            .handle(&event(&format!("p{i}"), "panic", json!({})))
            .unwrap_err();
        assert!(matches!(f, Failure::Panic(_)));
    }
    still_healthy(&plugin);
}

#[test]
fn files_are_not_readable() {
    let h = Harness::new();
    let plugin = scripted(&h, limits());
    let failure = plugin
        .handle(&event("e1", "read-file", json!({})))
        .unwrap_err();
    let Failure::Reject(reason) = &failure else {
        panic!("expected a denial, got {failure:?}")
    };
    assert!(reason.starts_with("denied"), "{reason}");
}

#[test]
fn environment_is_empty() {
    let h = Harness::new();
    let plugin = scripted(&h, limits());
    let failure = plugin
        .handle(&event("e1", "read-env", json!({})))
        .unwrap_err();
    let Failure::Reject(reason) = &failure else {
        panic!("expected a denial, got {failure:?}")
    };
    assert!(reason.starts_with("denied"), "{reason}");
}

#[test]
fn sockets_are_refused() {
    let h = Harness::new();
    let plugin = scripted(&h, limits());
    let failure = plugin
        .handle(&event("e1", "socket", json!({})))
        .unwrap_err();
    let Failure::Reject(reason) = &failure else {
        panic!("expected a denial, got {failure:?}")
    };
    assert!(reason.starts_with("denied"), "{reason}");
}

#[test]
fn a_hostile_plugin_does_not_disturb_a_healthy_one() {
    let h = Harness::new();
    let hostile = scripted(&h, limits());
    let healthy = h.load("echo", "scripted_guest", &[], Limits::default());
    std::thread::scope(|s| {
        let bad = s.spawn(|| {
            for kind in ["loop", "oom", "recurse", "panic"] {
                assert!(hostile.handle(&event("bad", kind, json!({}))).is_err());
            }
        });
        for i in 0..200 {
            let outputs = healthy
                .handle(&event(&format!("ok{i}"), "echo", json!({"i": i})))
                .unwrap();
            assert_eq!(data(&outputs[0]), json!({"i": i}));
        }
        bad.join().unwrap();
    });
}

#[test]
fn plugin_verdicts_pass_through() {
    let h = Harness::new();
    let plugin = scripted(&h, limits());
    let retry = plugin.handle(&event("e1", "retry", json!({}))).unwrap_err();
    assert_eq!(retry, Failure::Retry("asked to retry".into()));
    assert!(retry.is_retryable());
    let reject = plugin
        .handle(&event("e2", "reject", json!({})))
        .unwrap_err();
    assert_eq!(reject, Failure::Reject("asked to reject".into()));
    assert!(!reject.is_retryable());
}

#[test]
fn outputs_over_the_limits_are_refused() {
    let h = Harness::new();
    let plugin = h.load(
        "scripted",
        "scripted_guest",
        &[],
        Limits {
            max_outputs: 100,
            max_output_bytes: 1 << 20,
            ..limits()
        },
    );
    let many = plugin
        .handle(&event("e1", "many-outputs", json!({"count": 101})))
        .unwrap_err();
    assert!(matches!(many, Failure::InvalidOutput(_)), "{many:?}");
    assert!(!many.is_retryable());
    assert_eq!(
        plugin
            .handle(&event("e2", "many-outputs", json!({"count": 100})))
            .unwrap()
            .len(),
        100
    );
    let big = plugin
        .handle(&event("e3", "big-output", json!({"bytes": 2 << 20})))
        .unwrap_err();
    assert!(matches!(big, Failure::InvalidOutput(_)), "{big:?}");
    let empty_kind = plugin
        .handle(&event("e4", "bad-output", json!({})))
        .unwrap_err();
    assert!(
        matches!(empty_kind, Failure::InvalidOutput(ref r) if r.contains("empty")),
        "{empty_kind:?}"
    );
    still_healthy(&plugin);
}

#[test]
fn log_lines_are_capped() {
    let h = Harness::new();
    let plugin = scripted(&h, limits());
    // Five levels and a 1 MiB line: accepted (cut), and the event succeeds.
    assert!(
        plugin
            .handle(&event("e1", "log", json!({})))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn config_is_the_plugins_own() {
    let h = Harness::new();
    let plugin = scripted(&h, limits());
    let out = plugin
        .handle(&event("e1", "config", json!({"key": "greeting"})))
        .unwrap();
    assert_eq!(data(&out[0]), json!({"value": "hello"}));
    let out = plugin
        .handle(&event("e2", "config", json!({"key": "HOME"})))
        .unwrap();
    assert_eq!(data(&out[0]), json!({"value": null}));
}

#[test]
fn fresh_and_reused_instances_behave_alike() {
    for reuse in [1, 1000] {
        let h = Harness::new();
        let plugin = scripted(
            &h,
            Limits {
                instance_reuse: reuse,
                ..limits()
            },
        );
        for i in 0..20 {
            assert_eq!(
                plugin
                    .handle(&event(&format!("e{i}"), "echo", json!(i)))
                    .unwrap()
                    .len(),
                1
            );
        }
        assert!(plugin.handle(&event("x", "panic", json!({}))).is_err());
        still_healthy(&plugin);
    }
}

#[test]
fn on_demand_allocation_works_too() {
    let h = Harness::with_config(RuntimeConfig {
        pooling: false,
        ..RuntimeConfig::default()
    });
    assert!(!h.runtime.pooling());
    let plugin = scripted(&h, limits());
    let failure = plugin.handle(&event("e1", "oom", json!({}))).unwrap_err();
    assert!(matches!(failure, Failure::OutOfMemory(_)), "{failure:?}");
    still_healthy(&plugin);
}

#[test]
fn a_hundred_thousand_outputs_or_a_64_mib_output_are_contained_under_the_default_limits() {
    let h = Harness::new();
    let plugin = h.load("scripted", "scripted_guest", &[], Limits::default());
    let many = plugin
        .handle(&event("e1", "many-outputs", json!({"count": 100_000})))
        .unwrap_err();
    assert!(matches!(many, Failure::InvalidOutput(_)), "{many:?}");
    assert!(many.reason().contains("1000"), "names the limit: {many:?}");
    // 64 MiB of output cannot even be built in a 64 MiB instance: the guest
    // runs out of memory before it returns.
    let big = plugin
        .handle(&event("e2", "big-output", json!({"bytes": 64 << 20})))
        .unwrap_err();
    assert!(
        matches!(big, Failure::OutOfMemory(_) | Failure::InvalidOutput(_)),
        "{big:?}"
    );
    // With room to build it, the output limit (16 MiB) refuses it.
    let roomy = h.load(
        "roomy",
        "scripted_guest",
        &[],
        Limits {
            memory: 256 << 20,
            ..Limits::default()
        },
    );
    let big = roomy
        .handle(&event("e3", "big-output", json!({"bytes": 64 << 20})))
        .unwrap_err();
    assert!(matches!(big, Failure::InvalidOutput(_)), "{big:?}");
    eprintln!("100k outputs: {many}\n64 MiB output: {big}");
    still_healthy(&plugin);
    still_healthy(&roomy);
}
