//! Per-plugin limits, and the memory limiter that enforces one of them.
//!
//! Wall time is enforced by epoch interruption (see `Runtime`), memory by
//! [`MemoryLimiter`], which also records *that* it refused a growth: a refused
//! `memory.grow` makes most guests abort with a plain `unreachable` trap, and only
//! this record lets the host say "out of memory" instead of "panic".

use std::time::Duration;

/// Limits one plugin runs under; defaults suit a typical event handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall time one event may take, guest code and host calls together.
    pub timeout: Duration,
    /// Linear memory one instance may grow to, in bytes.
    pub memory: u64,
    /// Events one instance handles before it is recycled; 1 = a fresh instance
    /// for every event.
    pub instance_reuse: u32,
    /// Most outputs one event may produce.
    pub max_outputs: usize,
    /// Largest total size of one event's outputs, in bytes.
    pub max_output_bytes: usize,
    /// Longest delay an output may ask for (`Output::after`).
    pub max_delay: Duration,
}

/// The default longest delay of an output: 7 days.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            memory: 64 << 20,
            instance_reuse: 1000,
            max_outputs: 1000,
            max_output_bytes: 16 << 20,
            max_delay: DEFAULT_MAX_DELAY,
        }
    }
}

/// Table elements an instance may have; generous for real guests, finite for
/// hostile ones.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// A `wasmtime::ResourceLimiter` that refuses growth beyond the plugin's limit
/// and remembers that it did.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    limit: usize,
    /// Set when a growth was refused during the current call.
    pub(crate) refused: Option<usize>,
}

impl MemoryLimiter {
    pub(crate) fn new(limit: u64) -> Self {
        Self {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            refused: None,
        }
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.refused = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
