//! Switchboard: a WebAssembly-plugin event router.
//!
//! Events arrive on topic exchanges, are routed to sandboxed WebAssembly handler
//! plugins, and what the plugins return is published back onto the bus.
//!
//! # Layout
//!
//! Modules follow the path of one event:
//!
//! - [`config`]: `router.toml`: what to declare, run and route, validated whole.
//! - [`bus`]: where messages come from and go to (the [`bus::Message`] both buses
//!   carry).
//! - [`route`]: which plugins an event goes to (AMQP topic/direct/fanout, as RabbitMQ).
//! - [`envelope`]: bytes and headers on the wire ⇄ the [`runtime::Event`] a plugin
//!   sees, and plugin outputs ⇄ the envelopes published for them.
//! - [`dispatch`]: per-plugin workers: run the plugin, publish its outputs, ack;
//!   retry with backoff or dead-letter on failure.
//! - [`runtime`]: the wasmtime engine, plugin loading and type-checking, limits,
//!   failure classification, and the host capabilities plugins import.
//!
//! Beside the path:
//!
//! - [`appliance`]: a configuration applied to a runtime, a bus and workers, and
//!   re-applied live.
//! - [`watch`]: hot reload of `router.toml` and the plugins folder.
//! - [`admin`]: the HTTP interface (ingress, stream, health, status).
//! - [`kv`]: the stores behind the plugins' key-value capability.
//! - [`archive`]: the event history kept on disk; [`replay`] runs it again
//!   through a plugin.
//! - [`cli`]: the `switchboard` command's subcommands.

pub mod admin;
pub mod appliance;
pub mod archive;
pub mod bus;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod envelope;
pub mod kv;
pub mod metrics;
mod redis_pool;
pub mod replay;
pub mod route;
pub mod runtime;
pub mod watch;
