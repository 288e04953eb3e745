//! Write Switchboard event handlers in Rust.
//!
//! A Switchboard plugin is a WebAssembly component that receives one event at a
//! time and returns the events it produces. With this crate, a plugin is a type,
//! one trait method and one macro:
//!
//! ```
//! use serde::Deserialize;
//! use serde_json::json;
//! use switchboard_plugin::{Event, Failure, Output, Plugin, config, export, kv, log};
//!
//! /// Announces big orders, once per order.
//! pub struct BigOrders;
//!
//! #[derive(Deserialize)]
//! struct Order {
//!     order_id: String,
//!     total_cents: u64,
//! }
//!
//! impl Plugin for BigOrders {
//!     fn handle(event: Event) -> Result<Vec<Output>, Failure> {
//!         if event.kind != "order.created" {
//!             return Ok(vec![]);
//!         }
//!         // Data that does not parse is a reject naming the event and the field.
//!         let order: Order = event.json()?;
//!         let threshold: u64 = config::get_or("threshold_cents", "100000")
//!             .parse()
//!             .map_err(|_| Failure::reject("config threshold_cents is not a number"))?;
//!         if order.total_cents < threshold {
//!             log::debug(format!("order {} is below the threshold", order.order_id));
//!             return Ok(vec![]);
//!         }
//!         // State lives in the host's kv store, never in statics. Setting the same
//!         // key again on a redelivery changes nothing: the handler is idempotent.
//!         kv::set(&format!("big:{}", order.order_id), event.id.as_bytes(), None)?;
//!         let big = json!({ "order_id": order.order_id, "total_cents": order.total_cents });
//!         Ok(vec![Output::json("order.big", &big)?])
//!     }
//! }
//!
//! export!(BigOrders);
//! # fn main() {
//! #     use switchboard_plugin::testing;
//! #     let event = testing::event("order.created", &json!({"order_id": "o-1", "total_cents": 250000}));
//! #     let outputs = BigOrders::handle(event).unwrap();
//! #     assert_eq!(outputs[0].kind, "order.big");
//! # }
//! ```
//!
//! # The contract
//!
//! [`Plugin::handle`] gets one [`Event`] and returns either the [`Output`]s to
//! publish (possibly none) or a [`Failure`]:
//!
//! - Outputs are published all-or-nothing, and only then is the event acknowledged.
//!   The host gives each output an id derived from the input id, the plugin and the
//!   output's position, so a redelivered event yields the same output ids.
//! - [`Failure::Retry`] means "not now": the host retries the event later with
//!   backoff, then dead-letters it. [`Failure::Reject`] means "never": the host
//!   dead-letters it at once.
//! - Delivery is at-least-once: the same event (same id) can arrive again, even
//!   after a handler already wrote state for it. Make handlers idempotent, keeping
//!   what you have applied in [`kv`].
//! - A panic traps the instance; the host counts it as a failure of that event and
//!   retries it. Return a [`Failure`] instead.
//!
//! Capabilities the host grants: [`kv`] (durable state private to the plugin),
//! [`config`] (the plugin's values from `router.toml`) and [`log`] (the host's
//! structured log). There is no stdout, no file system, no network.
//!
//! # Building
//!
//! A plugin crate is a library with both crate types — `cdylib` for the component,
//! `rlib` so that its logic can be tested and benchmarked natively:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib", "rlib"]
//!
//! [dependencies]
//! switchboard-plugin = { path = "../../plugin-sdk" }
//! serde = { version = "1", features = ["derive"] }
//! serde_json = "1"
//! ```
//!
//! Build it for WASI preview 2; the result is already a component:
//!
//! ```sh
//! rustup target add wasm32-wasip2     # once
//! cargo build --release --target wasm32-wasip2
//! # -> target/wasm32-wasip2/release/<crate_name>.wasm
//! ```
//!
//! Drop the `.wasm` into the router's plugins folder and add a route in
//! `router.toml`; the router picks it up without a restart.
//!
//! # Testing natively
//!
//! On non-wasm targets [`kv`], [`config`] and [`log`] use the in-memory host in
//! [`testing`] rather than WIT imports, so `cargo test` runs handler logic
//! directly:
//!
//! ```
//! # use switchboard_plugin::{Event, Failure, Output, Plugin, kv};
//! # struct Counter;
//! # impl Plugin for Counter {
//! #     fn handle(event: Event) -> Result<Vec<Output>, Failure> {
//! #         kv::incr(&format!("count:{}", event.kind), 1)?;
//! #         Ok(vec![])
//! #     }
//! # }
//! use switchboard_plugin::testing;
//!
//! testing::reset();
//! testing::set_config("threshold", "10");
//! let event = testing::event("order.created", &serde_json::json!({"order_id": "o-1"}));
//! assert!(Counter::handle(event).unwrap().is_empty());
//! assert_eq!(testing::kv_dump()["count:order.created"], b"1");
//! ```
//!
//! [`testing`] does not exist on wasm32: when checking the crate for that target
//! too (`cargo clippy --target wasm32-wasip2 --all-targets`), gate the tests with
//! `#[cfg(test)] #[cfg(not(target_arch = "wasm32"))]` (two attributes, so that
//! clippy still sees test code as such).
//!
//! # Layout
//!
//! - [`Plugin`] and [`export!`]: what a plugin implements, and how it becomes the
//!   component's export.
//! - [`Event`], [`Output`], [`Failure`]: the plain types handlers work with.
//! - [`kv`], [`config`], [`log`]: the host's capabilities.
//! - [`testing`] (native only): the in-memory host behind them in tests.
//! - `bindings`, `glue`, `host` (private): the generated WIT bindings, the
//!   conversion to and from them, and the seam choosing the real or the test host.

mod event;
mod failure;
mod glue;
mod host;
mod output;

pub mod config;
pub mod kv;
pub mod log;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

// wit-bindgen's canonical-ABI glue (raw pointers into linear memory, the import
// and export shims) is unsafe by nature; the allowance stays on this generated
// module, and everything a plugin author touches is safe code.
#[allow(unsafe_code)]
#[doc(hidden)]
pub mod bindings;

pub use event::Event;
pub use failure::Failure;
pub use kv::KvError;
pub use output::{DELAY_HEADER, Output};

/// What a plugin is: a type whose [`handle`](Plugin::handle) turns one event into
/// the events it produces.
///
/// There is no `self`: instances are recycled and replaced at will, so a plugin
/// keeps nothing in memory between events. State goes to [`kv`].
pub trait Plugin {
    /// Handles one event. `Ok` with the outputs to publish (possibly none), or the
    /// [`Failure`] that says whether to retry the event or dead-letter it.
    fn handle(event: Event) -> Result<Vec<Output>, Failure>;
}

/// Makes a [`Plugin`] the component's `handle` export. Invoke it once, in the
/// plugin crate, with the plugin's type:
///
/// ```
/// # use switchboard_plugin::{Event, Failure, Output, Plugin};
/// pub struct Noop;
/// impl Plugin for Noop {
///     fn handle(_event: Event) -> Result<Vec<Output>, Failure> {
///         Ok(vec![])
///     }
/// }
/// switchboard_plugin::export!(Noop);
/// ```
///
/// On wasm32 it generates the component's export functions. On other targets it
/// only checks that the type implements [`Plugin`], so the same crate builds
/// natively for tests (and exports no symbols that could clash when several plugin
/// crates are linked into one test or benchmark binary).
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        const _: fn(
            $crate::Event,
        ) -> ::core::result::Result<::std::vec::Vec<$crate::Output>, $crate::Failure> =
            <$plugin as $crate::Plugin>::handle;

        // The component's export shims (generated by wit-bindgen, in the SDK).
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __SwitchboardGuest;

            impl $crate::__private::Guest for __SwitchboardGuest {
                fn handle(
                    event: $crate::__private::Event,
                ) -> ::core::result::Result<
                    ::std::vec::Vec<$crate::__private::Output>,
                    $crate::__private::Failure,
                > {
                    $crate::__private::handle::<$plugin>(event)
                }
            }

    $crate::bindings::__export_handler!(__SwitchboardGuest with_types_in $crate::bindings);
        };
    };
}

/// What [`export!`] expands to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::{Event, Failure, Guest, Output};
    pub use crate::glue::handle;
}
