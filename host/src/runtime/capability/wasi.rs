//! WASI preview 2, linked because every wasip2 guest imports it (Rust's standard
//! library does, even when unused), and granted nothing: no preopened directories,
//! no environment, no arguments, no stdin, stdout or stderr (they read empty and
//! write nowhere), no network (TCP, UDP and name lookup all refused). Clocks and
//! random numbers are WASI's defaults: they reveal nothing about the host.

use wasmtime::component::{Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::runtime::store::InstanceState;

pub(crate) fn link(linker: &mut Linker<InstanceState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)
}

/// WASI state for one instance: an empty context.
pub(crate) struct WasiState {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl WasiState {
    pub(crate) fn sandboxed() -> Self {
        let ctx = WasiCtx::builder()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            ctx,
            table: ResourceTable::new(),
        }
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.ctx,
            table: &mut self.wasi.table,
        }
    }
}
