//! Rust types and glue generated from the WIT world every plugin targets
//! (`plugin-sdk/wit/switchboard.wit`: the one copy of the contract).

wasmtime::component::bindgen!({
    path: "../plugin-sdk/wit",
    world: "handler",
    imports: {
        // A store outage must fail the event, not be handed to the plugin: the kv
        // functions may trap (see `capability::kv`).
        "switchboard:plugin/kv": trappable,
    },
    trappable_error_type: {
        "switchboard:plugin/kv.kv-error" => crate::kv::KvError,
    },
});

pub use self::switchboard::plugin::types::Failure as Verdict;
