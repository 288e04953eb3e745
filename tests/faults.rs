//! The fault suite: every scenario runs the real router (a `switchboard run`
//! process) on the real broker while a publisher keeps publishing with
//! confirms, as a service would, and then accounts for every confirmed input:
//! handled, or dead-lettered with a reason. None may be lost; duplicates only
//! within the in-flight window, under the same output id.
//!
//! - [`restarts`]: graceful restarts, `kill -9`, rolling restarts of two
//!   replicas, a broker restart, id-less payments through billing with
//!   `kill -9`.
//! - [`refusals`]: a deleted or refusing dead-letter queue, unroutable outputs
//!   under the dead-letter policy, a memory alarm longer than the broker
//!   timeout, outputs held by an alarm, a deleted output exchange, a plugin
//!   removed while its retries wait, re-drive.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Held by each scenario for its whole run: they share the machine's two cores
/// with the broker (and start throwaway nodes), and their timings assume they
/// have them to themselves, however many test threads the runner uses.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

#[path = "faults/refusals.rs"]
mod refusals;
#[path = "faults/restarts.rs"]
mod restarts;
