//! Dispatch: the workers that take deliveries from a plugin's queue, run the
//! plugin, publish what it returns and settle the delivery. Knows nothing of
//! which bus it runs on.
//!
//! For one delivery, in order:
//!
//! 1. decode the message into an event — undecodable → dead-letter now;
//! 2. loop guard: an event that has passed through `max_hops` plugins →
//!    dead-letter (`loop`);
//! 3. dedupe: an event id handled within the plugin's window → ack, skip; one
//!    still in flight → wait for it (retry on the same attempt);
//! 4. run the plugin (on this worker thread);
//! 5. success → hand the bus the outputs ([`Settlement::Handled`]): it publishes
//!    them, all or nothing, and acks once they are confirmed. Outputs go to the
//!    exchange they name, else the plugin's output exchange, else back to the
//!    exchange the event came from;
//! 6. failure (the plugin's, or outputs the bus refused) → retry after a backoff
//!    while attempts remain and the failure is transient, else dead-letter with
//!    kind, reason, attempts, plugin version and first-failure time.
//!
//! Every delivery is settled once, through the bus, and counted once, when the
//! bus reports what became of it ([`Settled`]): the worker does not wait for a
//! broker and takes the next delivery meanwhile.
//!
//! A plugin whose events keep breaking its sandbox is paused ([`cooldown`]):
//! its workers take nothing until a probe event shows it works again.
//!
//! Workers are OS threads (guest code is CPU work; a hand-off per event to a
//! blocking pool would cost more than the no-op plugin itself). A worker group
//! lives as long as its plugin is configured; stopping it leaves undelivered
//! messages in the queue. Hot reload swaps the plugin under running workers:
//! an event already started finishes on the version it started with.

mod backoff;
pub mod cooldown;
mod dedupe;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::Serialize;

pub use backoff::Backoff;
pub use cooldown::Cooldown;
use cooldown::{Admit, Breaker, Outcome};
use dedupe::{Claim, DedupeWindow};

use crate::metrics::PluginMetrics;

use crate::bus::{Bus, BusError, Delayed, Delivery, FailureInfo, Outgoing, Settled, Settlement};
use crate::envelope;
use crate::runtime::{Failure, Plugin};

/// How one plugin's deliveries are handled.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchSettings {
    /// Worker threads (events in flight at once).
    pub concurrency: usize,
    /// Attempts before a transient failure is dead-lettered.
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// Plugin hops after which an event is dead-lettered as a loop.
    pub max_hops: u32,
    /// Where outputs go when they name no exchange; `None`: back where the
    /// input came from.
    pub output_exchange: Option<String>,
    /// Drop events whose id was handled within this window.
    pub dedupe: Option<Duration>,
    /// How long publishing outputs may wait for room (embedded bus) or
    /// confirms (RabbitMQ, at most `[broker] timeout`).
    pub publish_timeout: Duration,
    /// When to pause a plugin whose events keep breaking its sandbox.
    pub cooldown: Cooldown,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            concurrency: 2,
            max_attempts: 5,
            backoff: Backoff::default(),
            max_hops: 10,
            output_exchange: None,
            dedupe: None,
            publish_timeout: Duration::from_secs(5),
            cooldown: Cooldown::default(),
        }
    }
}

/// What the workers of one plugin did, for status and metrics.
#[derive(Debug, Default, Serialize)]
pub struct DispatchStats {
    /// Events handled and acked.
    pub handled: AtomicU64,
    /// Outputs published.
    pub outputs: AtomicU64,
    /// Delayed outputs kept for later (`Output::after`).
    pub delayed: AtomicU64,
    /// Deliveries scheduled for a retry.
    pub retried: AtomicU64,
    /// Deliveries dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Duplicates dropped by the dedupe window.
    pub deduplicated: AtomicU64,
    /// Settlements the bus could not carry out: it gave the delivery back to
    /// the broker (requeued after a pause, or through a retry tier), which
    /// delivers it again.
    pub settle_errors: AtomicU64,
    /// Deliveries the broker had already taken back (their channel closed)
    /// before they were settled, or before they were started.
    pub abandoned: AtomicU64,
    /// Cool-down pauses begun (see [`cooldown`]).
    pub pauses: AtomicU64,
    /// Whether the plugin is paused now.
    pub paused: AtomicBool,
}

/// A failed delivery: what kind of failure, why, and whether a retry may help.
struct Failed {
    kind: String,
    reason: String,
    retryable: bool,
}

impl Failed {
    fn permanent(kind: &str, reason: String) -> Self {
        Self {
            kind: kind.into(),
            reason,
            retryable: false,
        }
    }
}

/// The event a settlement concerns, carried to its report: for the log (absent
/// when it did not decode), and whether it holds a dedupe claim to complete or
/// give up.
#[derive(Debug, Clone, Default)]
struct Concerning {
    id: Option<String>,
    correlation_id: Option<String>,
    claimed: bool,
}

struct Shared {
    name: String,
    bus: Arc<dyn Bus>,
    plugin: ArcSwap<Plugin>,
    settings: ArcSwap<DispatchSettings>,
    dedupe: Option<DedupeWindow>,
    stats: Arc<DispatchStats>,
    metrics: PluginMetrics,
    breaker: Breaker,
    /// Never sends: dropping its sender ([`PluginWorkers::stop`]) wakes every
    /// worker waiting on it, and they end.
    stop: Receiver<()>,
}

/// The worker threads of one plugin.
pub struct PluginWorkers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    stop: Sender<()>,
}

impl std::fmt::Debug for PluginWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginWorkers")
            .field("plugin", &self.shared.name)
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

/// Wasm runs on the worker's own stack: leave room above the engine's limit.
const WORKER_STACK: usize = 8 << 20;

impl PluginWorkers {
    /// Starts `settings.concurrency` workers consuming `plugin`'s queue.
    pub fn start(
        bus: Arc<dyn Bus>,
        plugin: Arc<Plugin>,
        settings: DispatchSettings,
        metrics: PluginMetrics,
    ) -> Result<Self, BusError> {
        let name = plugin.name().to_string();
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let shared = Arc::new(Shared {
            dedupe: settings.dedupe.map(DedupeWindow::new),
            name: name.clone(),
            bus,
            plugin: ArcSwap::new(plugin),
            settings: ArcSwap::from_pointee(settings.clone()),
            stats: Arc::default(),
            metrics,
            breaker: Breaker::default(),
            stop: stopped,
        });
        let mut threads = Vec::with_capacity(settings.concurrency);
        for i in 0..settings.concurrency.max(1) {
            let rx = shared.bus.consume(&name)?;
            let worker = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .stack_size(WORKER_STACK)
                .spawn(move || worker.run(rx))
                .map_err(|e| BusError::Unavailable(format!("cannot start a worker: {e}")))?;
            threads.push(thread);
        }
        Ok(Self {
            shared,
            threads,
            stop,
        })
    }

    /// The plugin name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The version now serving.
    pub fn plugin(&self) -> Arc<Plugin> {
        self.shared.plugin.load_full()
    }

    /// Serves new events with `plugin`; events already running finish on the
    /// old version.
    pub fn swap_plugin(&self, plugin: Arc<Plugin>) {
        self.shared.plugin.store(plugin);
    }

    /// Applies new settings that need no new threads (everything but
    /// concurrency and the dedupe window).
    pub fn update_settings(&self, settings: DispatchSettings) {
        self.shared.settings.store(Arc::new(settings));
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<DispatchSettings> {
        self.shared.settings.load_full()
    }

    /// Counters.
    pub fn stats(&self) -> Arc<DispatchStats> {
        self.shared.stats.clone()
    }

    /// Stops the workers after their current event and waits for them. What is
    /// still queued stays in the queue.
    pub fn stop(self) {
        drop(self.stop);
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!(plugin = %self.shared.name, "a worker thread panicked");
            }
        }
        self.shared.bus.stop_consuming(&self.shared.name);
    }
}

impl Shared {
    fn run(self: Arc<Self>, mut rx: Receiver<Delivery>) {
        loop {
            let cooldown = self.settings.load().cooldown.clone();
            let probe = match self.breaker.admit(&cooldown, Instant::now()) {
                Admit::Go => false,
                Admit::Probe => true,
                Admit::Wait(pause) => {
                    // Paused: wait out the pause, or until the workers stop.
                    if self.stop.recv_timeout(pause) != Err(RecvTimeoutError::Timeout) {
                        return;
                    }
                    continue;
                }
            };
            let outcome = crossbeam_channel::select! {
                recv(self.stop) -> _ => return,
                recv(rx) -> delivery => match delivery {
                    Ok(delivery) => self.process(delivery),
                    // The queue was replaced (resized) or deleted: follow it or end.
                    Err(_) => {
                        match self.bus.consume(&self.name) {
                            Ok(next) => rx = next,
                            Err(_) => {
                                if self.stop.recv_timeout(Duration::from_millis(200))
                                    != Err(RecvTimeoutError::Timeout)
                                {
                                    return;
                                }
                            }
                        }
                        Outcome::Neutral
                    }
                },
            };
            self.cool_down(&cooldown, outcome, probe);
        }
    }

    /// Tells the breaker how an event went; pauses the plugin when it trips.
    fn cool_down(&self, cooldown: &Cooldown, outcome: Outcome, probe: bool) {
        let now = Instant::now();
        if let Some(paused) = self.breaker.record(cooldown, outcome, probe, now) {
            self.stats.pauses.fetch_add(1, Ordering::Relaxed);
            self.metrics.pauses.inc();
            tracing::warn!(
                plugin = %self.name,
                broken_in_a_row = paused.broken_in_a_row,
                pause_ms = u64::try_from(paused.pause.as_millis()).unwrap_or(u64::MAX),
                "plugin keeps breaking its sandbox (timeout, memory, stack, trap or panic); \
                 its events wait in its queue until a probe event succeeds"
            );
        }
        let paused = self.breaker.is_paused(now);
        if self.stats.paused.swap(paused, Ordering::Relaxed) != paused {
            self.metrics.paused.set(i64::from(paused));
            if !paused && outcome == Outcome::Fine {
                tracing::info!(plugin = %self.name, "plugin works again; cool-down over");
            }
        }
    }

    /// A settlement the bus could not carry out: the delivery is back with
    /// the broker and comes again, so a dedupe claim goes.
    fn not_settled(&self, event: &Concerning, settled: &Settled) {
        self.release(event);
        let counter = match settled {
            Settled::Lost(_) => &self.stats.abandoned,
            _ => &self.stats.settle_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            plugin = %self.name,
            event_id = event.id.as_deref().unwrap_or(""),
            outcome = ?settled,
            "delivery not settled; the broker delivers it again"
        );
    }

    fn release(&self, event: &Concerning) {
        if let (Some(window), Some(id), true) = (&self.dedupe, &event.id, event.claimed) {
            window.release(id);
        }
    }

    /// Runs `settle` once the kv writes the plugin made or read for this event
    /// (up to `mark`) are durable, so that nothing it did is published or acked
    /// before a crash could take it back. Events handled meanwhile share the
    /// commit; the worker takes the next event at once. A commit that fails
    /// fails the event as `kv_unavailable` (retried).
    fn once_durable(
        self: &Arc<Self>,
        mark: u64,
        delivery: Delivery,
        plugin: Arc<Plugin>,
        settings: Arc<DispatchSettings>,
        event: Concerning,
        settle: impl FnOnce(&Arc<Self>, Delivery, Arc<Plugin>, Arc<DispatchSettings>, Concerning)
        + Send
        + 'static,
    ) {
        if mark == 0 {
            settle(self, delivery, plugin, settings, event);
            return;
        }
        let shared = self.clone();
        let waiting_on = plugin.clone();
        waiting_on.when_durable(
            mark,
            Box::new(move |durable| match durable {
                Ok(()) => settle(&shared, delivery, plugin, settings, event),
                Err(e) => {
                    let failed = Failed {
                        kind: Failure::KvUnavailable(String::new()).kind().into(),
                        reason: format!("the event's state could not be committed: {e}"),
                        retryable: true,
                    };
                    shared.fail(delivery, &plugin, &settings, event, failed);
                }
            }),
        );
    }

    /// Hands the outputs to the bus, which publishes them and then acks the
    /// input. Counted once the bus says it is done; outputs it could not
    /// publish fail the event (retry with backoff, or dead letter).
    fn handled(
        self: &Arc<Self>,
        delivery: Delivery,
        (outputs, delayed): (Vec<Outgoing>, Vec<Delayed>),
        plugin: Arc<Plugin>,
        settings: Arc<DispatchSettings>,
        event: Concerning,
    ) {
        let published = outputs.len() as u64;
        let scheduled = delayed.len() as u64;
        let shared = self.clone();
        let settlement = Settlement::Handled {
            outputs,
            delayed,
            timeout: settings.publish_timeout,
        };
        delivery.finish(
            settlement,
            Box::new(move |settled| match settled {
                Settled::Done => {
                    if let (Some(window), Some(id), true) =
                        (&shared.dedupe, &event.id, event.claimed)
                    {
                        window.complete(id);
                    }
                    shared.stats.handled.fetch_add(1, Ordering::Relaxed);
                    shared.stats.outputs.fetch_add(published, Ordering::Relaxed);
                    shared.metrics.outputs.inc_by(published);
                    if scheduled > 0 {
                        shared.stats.delayed.fetch_add(scheduled, Ordering::Relaxed);
                        shared.metrics.delayed.inc_by(scheduled);
                    }
                    shared.metrics.succeeded.inc();
                }
                Settled::Refused { delivery, error } => {
                    shared.fail(*delivery, &plugin, &settings, event, publish_failure(error));
                }
                other => shared.not_settled(&event, &other),
            }),
        );
    }

    fn failure_info(
        &self,
        delivery: &Delivery,
        plugin: &Plugin,
        kind: &str,
        reason: String,
    ) -> FailureInfo {
        FailureInfo {
            kind: kind.into(),
            reason,
            attempts: delivery.delivered.attempt,
            plugin_version: plugin.version().into(),
            first_failure: delivery
                .delivered
                .first_failure
                .clone()
                .unwrap_or_else(envelope::now_rfc3339),
        }
    }

    /// Retry while attempts remain (and the failure allows it), else dead-letter.
    /// Either way the event may come back (retry, re-drive): its dedupe claim,
    /// if it made one, goes.
    fn fail(
        self: &Arc<Self>,
        delivery: Delivery,
        plugin: &Plugin,
        settings: &DispatchSettings,
        event: Concerning,
        failed: Failed,
    ) {
        self.release(&event);
        let Failed {
            kind,
            reason,
            retryable,
        } = failed;
        let info = self.failure_info(&delivery, plugin, &kind, reason);
        let attempt = delivery.delivered.attempt;
        let retry = retryable && attempt < settings.max_attempts;
        let settlement = if retry {
            Settlement::Retry {
                delay: settings.backoff.delay(attempt),
                failure: info.clone(),
            }
        } else {
            Settlement::DeadLetter {
                failure: info.clone(),
            }
        };
        let shared = self.clone();
        delivery.finish(
            settlement,
            Box::new(move |settled| {
                if !matches!(settled, Settled::Done) {
                    shared.not_settled(&event, &settled);
                    return;
                }
                shared.metrics.failed(&kind);
                if retry {
                    shared.stats.retried.fetch_add(1, Ordering::Relaxed);
                    shared.metrics.retried.inc();
                    tracing::debug!(plugin = %shared.name, attempt, kind, reason = %info.reason, "event will be retried");
                } else {
                    shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    shared.metrics.dead_lettered(&kind);
                    tracing::warn!(
                        plugin = %shared.name,
                        event_id = event.id.as_deref().unwrap_or(""),
                        correlation_id = event.correlation_id.as_deref().unwrap_or(""),
                        attempts = attempt,
                        kind,
                        reason = %info.reason,
                        "event dead-lettered"
                    );
                }
            }),
        );
    }

    /// A copy of an event whose first copy is still being handled: it comes
    /// back after a pause, on the same attempt (the first copy may yet fail).
    fn wait_for_first_copy(
        self: &Arc<Self>,
        delivery: Delivery,
        plugin: &Plugin,
        settings: &DispatchSettings,
    ) {
        let mut failure = self.failure_info(
            &delivery,
            plugin,
            "in_flight_duplicate",
            "another copy of this event is being handled; this one waits for its outcome".into(),
        );
        failure.attempts = delivery.delivered.attempt.saturating_sub(1);
        let settlement = Settlement::Retry {
            delay: settings.backoff.delay(1),
            failure,
        };
        let shared = self.clone();
        delivery.finish(
            settlement,
            Box::new(move |settled| {
                if !matches!(settled, Settled::Done) {
                    shared.not_settled(&Concerning::default(), &settled);
                }
            }),
        );
    }

    /// Handles one delivery; says whether the plugin ran, and if it broke.
    fn process(self: &Arc<Self>, delivery: Delivery) -> Outcome {
        if !delivery.is_live() {
            self.stats.abandoned.fetch_add(1, Ordering::Relaxed);
            return Outcome::Neutral;
        }
        self.metrics.received.inc();
        let plugin = self.plugin.load_full();
        let settings = self.settings.load_full();
        let d = &delivery.delivered;
        let event = match envelope::decode(&d.exchange, &d.routing_key, &d.message, d.attempt) {
            Ok(event) => event,
            Err(e) => {
                let reason = format!("cannot decode the message: {e}");
                self.fail(
                    delivery,
                    &plugin,
                    &settings,
                    Concerning::default(),
                    Failed::permanent("undecodable", reason),
                );
                return Outcome::Neutral;
            }
        };
        // Every line logged while the event is handled, the plugin's own
        // included, carries these fields (in JSON: `span`).
        let span = tracing::info_span!(
            "event",
            plugin = %self.name,
            kind = %event.kind,
            id = %event.id,
            correlation_id = event.correlation_id.as_deref().unwrap_or(""),
            attempt = event.attempt,
        );
        let _entered = span.enter();

        let mut concerning = Concerning {
            id: Some(event.id.clone()),
            correlation_id: event.correlation_id.clone(),
            claimed: false,
        };
        let hops = envelope::hops(&event);
        if hops >= settings.max_hops {
            let reason = format!(
                "the event has passed through {hops} plugins (max_hops = {})",
                settings.max_hops
            );
            self.fail(
                delivery,
                &plugin,
                &settings,
                concerning,
                Failed::permanent("loop", reason),
            );
            return Outcome::Neutral;
        }
        // A replay re-delivers handled events on purpose: the window would
        // drop every one of them. (Looked for only when there is a window.)
        let replayed = |event: &crate::runtime::Event| {
            event
                .headers
                .iter()
                .any(|(k, _)| k == crate::envelope::REPLAY_HEADER)
        };
        if let Some(window) = self.dedupe.as_ref().filter(|_| !replayed(&event)) {
            match window.claim(&event.id) {
                Claim::Fresh => concerning.claimed = true,
                Claim::Duplicate => {
                    self.stats.deduplicated.fetch_add(1, Ordering::Relaxed);
                    self.metrics.deduplicated.inc();
                    let shared = self.clone();
                    let settlement = Settlement::Handled {
                        outputs: Vec::new(),
                        delayed: Vec::new(),
                        timeout: settings.publish_timeout,
                    };
                    delivery.finish(
                        settlement,
                        Box::new(move |settled| {
                            if !matches!(settled, Settled::Done) {
                                shared.not_settled(&Concerning::default(), &settled);
                            }
                        }),
                    );
                    return Outcome::Neutral;
                }
                Claim::InFlight => {
                    self.wait_for_first_copy(delivery, &plugin, &settings);
                    return Outcome::Neutral;
                }
            }
        }

        let started = std::time::Instant::now();
        let (handled, mark) = plugin.handle_marked(&event);
        self.metrics
            .handler_seconds
            .observe(started.elapsed().as_secs_f64());
        let outputs = match handled {
            Ok(outputs) => outputs,
            Err(failure) => {
                let failed = Failed {
                    kind: failure.kind().into(),
                    reason: failure.reason().into(),
                    retryable: failure.is_retryable(),
                };
                self.once_durable(
                    mark,
                    delivery,
                    plugin,
                    settings,
                    concerning,
                    |shared, d, p, s, c| {
                        shared.fail(d, &p, &s, c, failed);
                    },
                );
                return match failure.kind() {
                    "timeout" => Outcome::TimedOut,
                    kind if cooldown::breaks_the_sandbox(kind) => Outcome::Broken,
                    _ => Outcome::Fine,
                };
            }
        };

        let default_exchange = settings
            .output_exchange
            .as_deref()
            .unwrap_or(&event.exchange);
        let mut batch = Vec::with_capacity(outputs.len());
        let mut delayed = Vec::new();
        for (i, output) in outputs.iter().enumerate() {
            // Checked when the plugin returned (`invalid_output` past max_delay).
            let after = envelope::output_delay(output, Duration::MAX).ok().flatten();
            match envelope::encode_output(&self.name, &event, i, output) {
                Ok(message) => {
                    let out = Outgoing {
                        exchange: output
                            .exchange
                            .clone()
                            .unwrap_or_else(|| default_exchange.to_string()),
                        routing_key: output.kind.clone(),
                        message,
                    };
                    match after {
                        Some(after) => delayed.push(Delayed { after, output: out }),
                        None => batch.push(out),
                    }
                }
                Err(e) => {
                    let failed = Failed::permanent(
                        Failure::InvalidOutput(String::new()).kind(),
                        e.to_string(),
                    );
                    self.once_durable(
                        mark,
                        delivery,
                        plugin,
                        settings,
                        concerning,
                        |shared, d, p, s, c| {
                            shared.fail(d, &p, &s, c, failed);
                        },
                    );
                    return Outcome::Fine;
                }
            }
        }
        self.once_durable(
            mark,
            delivery,
            plugin,
            settings,
            concerning,
            |shared, d, p, s, c| {
                shared.handled(d, (batch, delayed), p, s, c);
            },
        );
        Outcome::Fine
    }
}

/// Why publishing a plugin's outputs failed, as a failure of its input.
fn publish_failure(e: BusError) -> Failed {
    match e {
        BusError::Unroutable {
            exchange,
            routing_key,
        } => Failed::permanent(
            "unroutable",
            format!(
                "no queue is bound for an output to exchange {exchange:?} with routing key \
                 {routing_key:?} ([broker] unroutable = \"dead-letter\")"
            ),
        ),
        BusError::NoSuchExchange(exchange) => Failed::permanent(
            "invalid_output",
            format!("an output names exchange {exchange:?}, which is not declared"),
        ),
        // The same outputs would be just as large on every attempt.
        BusError::TooLarge(why) => Failed::permanent(
            "invalid_output",
            format!("an output cannot be published: {why}"),
        ),
        e => Failed {
            kind: "publish".into(),
            reason: format!("could not publish the outputs: {e}"),
            retryable: true,
        },
    }
}
