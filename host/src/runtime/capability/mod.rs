//! The host functions a plugin may import, one module per capability.
//!
//! Each capability does three things: links its WIT interface into the linker,
//! holds the per-instance state it needs, and implements the calls. A plugin sees
//! only its own configuration and its own key-value namespace; WASI is linked with
//! nothing granted (see [`wasi`]).

pub(crate) mod config;
pub(crate) mod kv;
pub(crate) mod logging;
pub(crate) mod wasi;

use wasmtime::component::{HasSelf, Linker};

use super::store::InstanceState;

/// Links every capability into `linker`. Called once per engine.
pub(crate) fn link(linker: &mut Linker<InstanceState>) -> wasmtime::Result<()> {
    wasi::link(linker)?;
    use super::bindings::switchboard::plugin as wit;
    wit::types::add_to_linker::<_, HasSelf<InstanceState>>(linker, |s| s)?;
    wit::logging::add_to_linker::<_, HasSelf<InstanceState>>(linker, |s| s)?;
    wit::config::add_to_linker::<_, HasSelf<InstanceState>>(linker, |s| s)?;
    wit::kv::add_to_linker::<_, HasSelf<InstanceState>>(linker, |s| s)?;
    Ok(())
}

impl super::bindings::switchboard::plugin::types::Host for InstanceState {}
