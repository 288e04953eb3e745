//! Loading plugins: what is refused and how it is said, the compiled-artifact
//! cache, and the host capabilities as a guest sees them.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use switchboard::kv::{KvError, KvStore};
use switchboard::runtime::{CacheOutcome, Failure, LoadError, PluginSpec, RuntimeConfig};
use switchboard_tests::{Harness, data, event, wasm};

fn load_bytes(h: &Harness, bytes: Vec<u8>) -> LoadError {
    let mut spec = h.spec("broken", "noop_guest");
    spec.wasm = bytes;
    h.runtime.load(spec).unwrap_err()
}

#[test]
fn garbage_bytes_are_refused_clearly() {
    let h = Harness::new();
    let err = load_bytes(&h, b"this is not wasm at all".to_vec());
    assert!(matches!(err, LoadError::NotWasm { .. }));
    assert_eq!(
        err.to_string(),
        "plugin \"broken\": not a WebAssembly file (it does not start with \"\\0asm\")"
    );
}

#[test]
fn core_modules_are_refused_clearly() {
    let h = Harness::new();
    let err = load_bytes(&h, b"\0asm\x01\0\0\0".to_vec());
    assert!(matches!(err, LoadError::CoreModule { .. }));
    assert!(
        err.to_string()
            .contains("core WebAssembly module, not a component"),
        "{err}"
    );
}

#[test]
fn truncated_components_are_refused_clearly() {
    let h = Harness::new();
    let mut bytes = std::fs::read(wasm("noop_guest")).unwrap();
    bytes.truncate(bytes.len() / 2);
    let err = load_bytes(&h, bytes);
    assert!(matches!(err, LoadError::Invalid { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("plugin \"broken\": invalid component:"),
        "{err}"
    );
}

#[test]
fn the_wrong_world_is_refused_clearly() {
    let h = Harness::new();
    let err = h
        .runtime
        .load(h.spec("other", "wrong_world_guest"))
        .unwrap_err();
    assert!(matches!(err, LoadError::WrongWorld { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(
            "plugin \"other\": does not implement the switchboard:plugin/handler world:"
        ),
        "{message}"
    );
    assert!(message.contains("handle"), "names the export: {message}");
}

#[test]
fn compiled_artifacts_are_cached_and_checked() {
    let cache = tempfile::tempdir().unwrap();
    let config = RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..RuntimeConfig::default()
    };
    let h = Harness::with_config(config.clone());
    let (_, first) = h.runtime.load(h.spec("noop", "noop_guest")).unwrap();
    assert_eq!(first, CacheOutcome::Compiled);
    let (plugin, second) = h.runtime.load(h.spec("noop", "noop_guest")).unwrap();
    assert_eq!(second, CacheOutcome::Hit);
    assert!(
        plugin
            .handle(&event("e1", "anything", json!({})))
            .unwrap()
            .is_empty()
    );

    // A new process (engine) with the same settings reuses the artifact.
    let h2 = Harness::with_config(config);
    assert_eq!(
        h2.runtime.load(h2.spec("noop", "noop_guest")).unwrap().1,
        CacheOutcome::Hit
    );

    // An artifact that is not what this host wrote is never loaded.
    let artifact = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .unwrap();
    let mut bytes = std::fs::read(&artifact).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&artifact, bytes).unwrap();
    let (plugin, outcome) = h2.runtime.load(h2.spec("noop", "noop_guest")).unwrap();
    assert_eq!(
        outcome,
        CacheOutcome::Compiled,
        "tampered artifact must be recompiled"
    );
    assert!(
        plugin
            .handle(&event("e2", "anything", json!({})))
            .unwrap()
            .is_empty()
    );

    // Entries are named by the content hash of the .wasm (then the engine's).
    let content_hash = plugin.version();
    let name = artifact.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with(content_hash), "{name} vs {content_hash}");
}

#[test]
fn versions_are_content_hashes() {
    let h = Harness::new();
    let (a, _) = h.runtime.load(h.spec("a", "noop_guest")).unwrap();
    let (b, _) = h.runtime.load(h.spec("b", "noop_guest")).unwrap();
    let (c, _) = h.runtime.load(h.spec("c", "scripted_guest")).unwrap();
    assert_eq!(a.version().len(), 12);
    assert_eq!(a.version(), b.version());
    assert_ne!(a.version(), c.version());
}

fn kv_call(
    plugin: &switchboard::runtime::Plugin,
    id: &str,
    op: serde_json::Value,
) -> serde_json::Value {
    let outputs = plugin.handle(&event(id, "kv", op)).unwrap();
    data(&outputs[0])
}

#[test]
fn kv_as_a_guest_sees_it() {
    let h = Harness::new();
    let a = h.load("plugin-a", "scripted_guest", &[], Default::default());
    let b = h.load("plugin-b", "scripted_guest", &[], Default::default());
    assert_eq!(
        kv_call(&a, "1", json!({"op": "set", "key": "k", "value": "va"})),
        json!({"ok": true})
    );
    assert_eq!(
        kv_call(&a, "2", json!({"op": "get", "key": "k"})),
        json!({"value": "va"})
    );
    // Namespaces: b cannot see a's key, and has its own.
    assert_eq!(
        kv_call(&b, "3", json!({"op": "get", "key": "k"})),
        json!({"value": null})
    );
    kv_call(&b, "4", json!({"op": "set", "key": "k", "value": "vb"}));
    assert_eq!(
        kv_call(&a, "5", json!({"op": "get", "key": "k"})),
        json!({"value": "va"})
    );
    // Counters.
    assert_eq!(
        kv_call(&a, "6", json!({"op": "incr", "key": "n", "delta": 5})),
        json!({"value": 5})
    );
    assert_eq!(
        kv_call(&a, "7", json!({"op": "incr", "key": "n", "delta": -2})),
        json!({"value": 3})
    );
    let err = kv_call(&a, "8", json!({"op": "incr", "key": "k", "delta": 1}));
    assert!(
        err["error"].as_str().unwrap().starts_with("not-a-number"),
        "{err}"
    );
    // TTL.
    kv_call(
        &a,
        "9",
        json!({"op": "set", "key": "t", "value": "x", "ttl_ms": 50}),
    );
    assert_eq!(
        kv_call(&a, "10", json!({"op": "get", "key": "t"})),
        json!({"value": "x"})
    );
    std::thread::sleep(Duration::from_millis(120));
    assert_eq!(
        kv_call(&a, "11", json!({"op": "get", "key": "t"})),
        json!({"value": null})
    );
    // Delete.
    assert_eq!(
        kv_call(&a, "12", json!({"op": "delete", "key": "k"})),
        json!({"deleted": true})
    );
    assert_eq!(
        kv_call(&a, "13", json!({"op": "delete", "key": "k"})),
        json!({"deleted": false})
    );
    // Misuse is returned to the guest, not trapped.
    let err = kv_call(&a, "14", json!({"op": "get", "key": ""}));
    assert!(
        err["error"].as_str().unwrap().starts_with("invalid-key"),
        "{err}"
    );
    let long = "k".repeat(switchboard::runtime::MAX_KEY + 1);
    let err = kv_call(&a, "15", json!({"op": "set", "key": long, "value": "x"}));
    assert!(
        err["error"].as_str().unwrap().starts_with("invalid-key"),
        "{err}"
    );
    let big = "x".repeat(switchboard::runtime::MAX_VALUE + 1);
    let err = kv_call(&a, "16", json!({"op": "set", "key": "big", "value": big}));
    assert!(
        err["error"].as_str().unwrap().starts_with("too-large"),
        "{err}"
    );
    // Contract 0.1.1: claims and compare-and-set.
    let claim = json!({"op": "set-if-absent", "key": "pay:1", "value": "e1"});
    assert_eq!(kv_call(&a, "17", claim.clone()), json!({"stored": true}));
    assert_eq!(kv_call(&a, "18", claim), json!({"stored": false}));
    assert_eq!(
        kv_call(
            &b,
            "19",
            json!({"op": "set-if-absent", "key": "pay:1", "value": "e2"})
        ),
        json!({"stored": true}),
        "namespaces hold for the new calls too"
    );
    let cas = |expected: Option<&str>, value: &str| json!({"op": "compare-and-set", "key": "pay:1", "expected": expected, "value": value});
    assert_eq!(
        kv_call(&a, "20", cas(Some("e2"), "x")),
        json!({"swapped": false})
    );
    assert_eq!(kv_call(&a, "21", cas(None, "x")), json!({"swapped": false}));
    assert_eq!(
        kv_call(&a, "22", cas(Some("e1"), "done")),
        json!({"swapped": true})
    );
    assert_eq!(
        kv_call(&a, "23", json!({"op": "get", "key": "pay:1"})),
        json!({"value": "done"})
    );
    let err = kv_call(
        &a,
        "24",
        json!({"op": "set-if-absent", "key": "big", "value": "x".repeat(switchboard::runtime::MAX_VALUE + 1)}),
    );
    assert!(
        err["error"].as_str().unwrap().starts_with("too-large"),
        "{err}"
    );
    // A zero ttl: decided, stored, and gone at once.
    assert_eq!(
        kv_call(
            &a,
            "25",
            json!({"op": "set-if-absent", "key": "z", "value": "v", "ttl_ms": 0})
        ),
        json!({"stored": true})
    );
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        kv_call(&a, "26", json!({"op": "get", "key": "z"})),
        json!({"value": null})
    );
}

/// A plugin built against contract 0.1.0 (before set-if-absent and
/// compare-and-set) loads and runs unchanged on this host.
#[test]
fn plugins_built_for_contract_0_1_0_keep_working() {
    let bytes = std::fs::read(switchboard_tests::wasm("contract_0_1_0_guest")).unwrap();
    let imports = |version: &str| {
        let name = format!("switchboard:plugin/kv@{version}");
        bytes.windows(name.len()).any(|w| w == name.as_bytes())
    };
    assert!(imports("0.1.0"), "the guest imports kv@0.1.0");
    assert!(!imports("0.1.1"));

    let h = Harness::new();
    let plugin = h.load(
        "old",
        "contract_0_1_0_guest",
        &[("greeting", "hello")],
        Default::default(),
    );
    let mut previous = None;
    for (n, id) in ["a", "b", "c"].into_iter().enumerate() {
        let outputs = plugin.handle(&event(id, "anything", json!({}))).unwrap();
        assert_eq!(outputs.len(), 1);
        assert_eq!(
            data(&outputs[0]),
            json!({"count": n + 1, "greeting": "hello", "last": id, "previous": previous})
        );
        previous = Some(id);
    }
    use switchboard::kv::KvStore as _;
    assert_eq!(
        h.kv.get("old", "count").unwrap().as_deref(),
        Some(&b"3"[..])
    );
}

/// A store that is down.
struct DownStore;

impl KvStore for DownStore {
    fn get(&self, _: &str, _: &str) -> Result<Option<Vec<u8>>, KvError> {
        Err(KvError::Unavailable("connection refused".into()))
    }
    fn set(&self, _: &str, _: &str, _: &[u8], _: Option<Duration>) -> Result<(), KvError> {
        Err(KvError::Unavailable("connection refused".into()))
    }
    fn delete(&self, _: &str, _: &str) -> Result<bool, KvError> {
        Err(KvError::Unavailable("connection refused".into()))
    }
    fn incr(&self, _: &str, _: &str, _: i64) -> Result<i64, KvError> {
        Err(KvError::Unavailable("connection refused".into()))
    }
    fn set_if_absent(
        &self,
        _: &str,
        _: &str,
        _: &[u8],
        _: Option<Duration>,
    ) -> Result<bool, KvError> {
        Err(KvError::Unavailable("connection refused".into()))
    }
    fn compare_and_set(
        &self,
        _: &str,
        _: &str,
        _: Option<&[u8]>,
        _: &[u8],
        _: Option<Duration>,
    ) -> Result<bool, KvError> {
        Err(KvError::Unavailable("connection refused".into()))
    }
}

#[test]
fn a_store_outage_fails_the_event_for_retry() {
    let h = Harness::new();
    let spec = PluginSpec {
        kv: Arc::new(DownStore),
        ..h.spec("scripted", "scripted_guest")
    };
    let (plugin, _) = h.runtime.load(spec).unwrap();
    let failure = plugin
        .handle(&event("e1", "kv", json!({"op": "get", "key": "k"})))
        .unwrap_err();
    assert_eq!(failure, Failure::KvUnavailable("connection refused".into()));
    assert!(failure.is_retryable());
    // Events that do not touch the store still work.
    assert_eq!(
        plugin.handle(&event("e2", "echo", json!(1))).unwrap().len(),
        1
    );
}
