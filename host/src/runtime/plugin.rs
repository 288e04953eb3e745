//! A loaded plugin: one compiled, type-checked version of a `.wasm` file, and the
//! instances that run its events.
//!
//! Instances are taken from an idle list (or created) per event and put back after
//! a normal return, until they have handled `Limits::instance_reuse` events; an
//! instance that trapped is dropped on the spot, since wasmtime cannot re-enter it.
//! A reload builds a new `Plugin`; events already running finish on the old one,
//! which goes away with its last `Arc`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use wasmtime::component::Component;
use wasmtime::{Engine, Store, Trap};

use super::bindings::{Event, HandlerPre, Output, Verdict};
use super::capability::kv::StoreUnavailable;
use super::failure::Failure;
use super::limits::Limits;
use super::store::{InstanceState, PluginContext};

/// Idle instances kept per plugin; more concurrent events than this create
/// instances that are dropped after use.
const MAX_IDLE: usize = 32;

/// Longest routing key (AMQP short string) and exchange name.
const MAX_NAME: usize = 255;

/// One version of one plugin, ready to handle events from any thread.
pub struct Plugin {
    context: Arc<PluginContext>,
    version: String,
    engine: Engine,
    pre: HandlerPre<InstanceState>,
    limits: Limits,
    /// Wall-time limit in epoch ticks.
    deadline_ticks: u64,
    max_stack: usize,
    idle: Mutex<Vec<Instance>>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name())
            .field("version", &self.version)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

struct Instance {
    store: Store<InstanceState>,
    handler: super::bindings::Handler,
    handled: u32,
}

pub(crate) struct PluginParts {
    pub(crate) context: Arc<PluginContext>,
    pub(crate) version: String,
    pub(crate) engine: Engine,
    pub(crate) pre: HandlerPre<InstanceState>,
    pub(crate) limits: Limits,
    pub(crate) epoch_tick: Duration,
    pub(crate) max_stack: usize,
}

impl Plugin {
    pub(crate) fn new(parts: PluginParts) -> Self {
        let tick = parts.epoch_tick.as_micros().max(1);
        // One tick more than the limit: the current tick is already partly gone.
        let deadline_ticks = u64::try_from(parts.limits.timeout.as_micros().div_ceil(tick))
            .unwrap_or(u64::MAX - 1)
            + 1;
        Self {
            context: parts.context,
            version: parts.version,
            engine: parts.engine,
            pre: parts.pre,
            limits: parts.limits,
            deadline_ticks,
            max_stack: parts.max_stack,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The plugin's name (its namespace for state and configuration).
    pub fn name(&self) -> &str {
        &self.context.name
    }

    /// A short content hash of the `.wasm` this version was built from.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The limits this version runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The compiled component (for tests and tools that inspect it).
    pub fn component(&self) -> &Component {
        self.pre.instance_pre().component()
    }

    /// Runs one event. `Ok` holds outputs that passed the host's checks; `Err` says
    /// why the event failed, in at most [`MAX_REASON`](super::MAX_REASON) bytes
    /// (a guest's reason may quote a whole input). Whatever the guest does, the
    /// caller and every other plugin carry on.
    pub fn handle(&self, event: &Event) -> Result<Vec<Output>, Failure> {
        self.handle_marked(event).0
    }

    /// [`Plugin::handle`], with the kv write number the event's outcome waits
    /// for ([`Plugin::when_durable`]): its writes, and the writes it read.
    pub fn handle_marked(&self, event: &Event) -> (Result<Vec<Output>, Failure>, u64) {
        let (result, mark) = self.run(event);
        (result.map_err(Failure::bounded), mark)
    }

    /// Runs `then` once the kv writes up to `mark` are durable (at once when
    /// `mark` is 0 or they already are).
    pub fn when_durable(&self, mark: u64, then: crate::kv::OnDurable) {
        if mark == 0 {
            then(Ok(()));
        } else {
            self.context.kv.store.when_durable(mark, then);
        }
    }

    fn run(&self, event: &Event) -> (Result<Vec<Output>, Failure>, u64) {
        let mut instance = match self.take_idle() {
            Some(instance) => instance,
            None => match self.instantiate() {
                Ok(instance) => instance,
                // Start-up code may have called the store: every write so far.
                Err(failure) => return (Err(failure), self.context.kv.store.written()),
            },
        };
        let (verdict, mark) = self.call(&mut instance, event);
        let verdict = match verdict {
            Ok(verdict) => verdict,
            Err(failure) => return (Err(failure), mark),
        };
        self.put_back(instance);
        let result = match verdict {
            Ok(outputs) => self.check_outputs(outputs),
            Err(Verdict::Retry(reason)) => Err(Failure::Retry(reason)),
            Err(Verdict::Reject(reason)) => Err(Failure::Reject(reason)),
        };
        (result, mark)
    }

    fn take_idle(&self) -> Option<Instance> {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    fn put_back(&self, instance: Instance) {
        if instance.handled >= self.limits.instance_reuse {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(instance);
        }
    }

    fn instantiate(&self) -> Result<Instance, Failure> {
        let state = InstanceState::new(self.context.clone(), self.limits.memory);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        // Instantiation runs guest code (start functions, static constructors):
        // the deadline must be set before it, or the default of 0 interrupts at once.
        store.set_epoch_deadline(self.deadline_ticks);
        match self.pre.instantiate(&mut store) {
            Ok(handler) => Ok(Instance {
                store,
                handler,
                handled: 0,
            }),
            Err(e) => Err(self.classify(&e, store.data())),
        }
    }

    /// Calls `handle` in `instance`; `Err` is a trap (the instance is then
    /// unusable). Also returns the event's kv write number.
    fn call(
        &self,
        instance: &mut Instance,
        event: &Event,
    ) -> (Result<Result<Vec<Output>, Verdict>, Failure>, u64) {
        instance.handled += 1;
        let state = instance.store.data_mut();
        state.limiter.refused = None;
        state.wasi.stderr.clear();
        state.event_id.clone_from(&event.id);
        state.kv_mark = 0;
        instance.store.set_epoch_deadline(self.deadline_ticks);
        let result = instance.handler.call_handle(&mut instance.store, event);
        let state = instance.store.data_mut();
        state.log.finish(&self.context.name, &event.id);
        let mark = state.kv_mark;
        (
            result.map_err(|e| self.classify(&e, instance.store.data())),
            mark,
        )
    }

    fn classify(&self, error: &wasmtime::Error, state: &InstanceState) -> Failure {
        if let Some(wanted) = state.limiter.refused {
            return Failure::out_of_memory(self.limits.memory, wanted);
        }
        if let Some(StoreUnavailable(reason)) = error.downcast_ref::<StoreUnavailable>() {
            return Failure::KvUnavailable(reason.clone());
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => Failure::timeout(self.limits.timeout),
            Some(Trap::StackOverflow) => Failure::StackOverflow(format!(
                "the guest exhausted its {}-byte stack",
                self.max_stack
            )),
            Some(Trap::UnreachableCodeReached) => {
                Failure::Panic(state.wasi.stderr.panic_message().unwrap_or_else(|| {
                    "the guest aborted (a panic, abort() or unreachable was reached)".into()
                }))
            }
            // Rust and C guests keep their own stack in linear memory: when it
            // overflows, this is what the host sees.
            Some(Trap::MemoryOutOfBounds) => Failure::Trap(
                "out-of-bounds memory access (a bad pointer, or the guest's own stack \
                 in linear memory overflowing)"
                    .into(),
            ),
            Some(trap) => Failure::Trap(trap.to_string()),
            None => Failure::Trap(format!("{error:#}")),
        }
    }

    fn check_outputs(&self, outputs: Vec<Output>) -> Result<Vec<Output>, Failure> {
        let invalid = |message: String| Err(Failure::InvalidOutput(message));
        if outputs.len() > self.limits.max_outputs {
            return invalid(format!(
                "{} outputs, over the limit of {}",
                outputs.len(),
                self.limits.max_outputs
            ));
        }
        let mut total = 0usize;
        for (i, output) in outputs.iter().enumerate() {
            if let Err(why) = check_kind(&output.kind) {
                return invalid(format!("output {i}: kind {:?} {why}", output.kind));
            }
            if let Some(exchange) = &output.exchange
                && let Err(why) = check_exchange(exchange)
            {
                return invalid(format!("output {i}: exchange {exchange:?} {why}"));
            }
            if let Some((name, _)) = output
                .headers
                .iter()
                .find(|(k, _)| k.is_empty() || k.len() > MAX_NAME)
            {
                return invalid(format!(
                    "output {i}: header name {name:?} is empty or too long"
                ));
            }
            if let Err(why) = crate::envelope::output_delay(output, self.limits.max_delay) {
                return invalid(format!("output {i}: {why}"));
            }
            total = total.saturating_add(output.data.len());
        }
        if total > self.limits.max_output_bytes {
            return invalid(format!(
                "{total} bytes of output data, over the limit of {}",
                self.limits.max_output_bytes
            ));
        }
        Ok(outputs)
    }
}

fn check_kind(kind: &str) -> Result<(), &'static str> {
    if kind.is_empty() {
        return Err("is empty");
    }
    if kind.len() > MAX_NAME {
        return Err("is longer than 255 bytes");
    }
    if kind.chars().any(char::is_control) {
        return Err("contains control characters");
    }
    Ok(())
}

/// AMQP exchange names: letters, digits, `-`, `_`, `.`, `:`; at most 255 bytes.
fn check_exchange(exchange: &str) -> Result<(), &'static str> {
    if exchange.is_empty() {
        return Err("is empty");
    }
    if exchange.len() > MAX_NAME {
        return Err("is longer than 255 bytes");
    }
    if !exchange
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err("may only contain letters, digits, '-', '_', '.' and ':'");
    }
    Ok(())
}
