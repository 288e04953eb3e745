//! `switchboard-bench delays`: delayed outputs on the embedded bus, as
//! `switchboard run` keeps them (a redb file, `state_dir/timers.redb`, fired by
//! its `switchboard-delays` thread). Three plugins on exchange `events`, in a
//! temporary folder of their own: `delayer` (the scripted guest, routed `emit`:
//! each event asks for `count` outputs `emitted.<i>`, each delayed), `worker`
//! (a second copy of the scripted guest, routed `echo`: one `echoed` output
//! per event) and `sink` (the no-op guest, routed `emitted.#`: every delayed
//! output, once published, is an event for it). `[archive]` is on (as in the
//! shipped router.toml), unless `--no-archive`. Two parts, a fresh process
//! each:
//!
//! 1. **Memory.** The process's resident set (`VmRSS`) idle after start, after
//!    a warm-up (a few `emit` events asking for no output and a few `echo`
//!    events, so that both plugins hold their instances), after the same
//!    `emit` events as below but with no delay (their outputs go to the sink at
//!    once: what handling the events costs by itself), and with `--pending`
//!    delayed outputs waiting (`emit` events of `--per-event` outputs each,
//!    delayed 10 minutes; counted by `/api/plugins` `queue.waiting_delayed`),
//!    each reading `--settle` seconds after the step; and the size of
//!    `timers.redb`. The target (≤ 10 MB) is judged from idle after start.
//! 2. **Firing beside a busy plugin.** `--pending` delayed outputs all due at
//!    one moment, `--lead` seconds after their scheduling ends (the delay of
//!    each `emit` event is computed from the clock when it is posted; the time
//!    scheduling takes is estimated from part 1). From the end of scheduling,
//!    `echo` events for `worker` at `--rate` per second, open loop (as in
//!    `appliance`): each one's latency runs from when it was due to its
//!    `echoed` output seen on `/events/stream`. `/api/plugins` is polled every
//!    10 ms meanwhile: the firing lasts from the due moment until
//!    `waiting_delayed` is 0. Latency is reported per window of the echo
//!    events' due times: before the due moment, during the firing, while the
//!    sink works through what fired, and after.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::ingress::{self, Sent};
use crate::process::{self, Running};
use crate::{percentile, wasm};

/// Clients of the paced `echo` load.
const PACED_CLIENTS: usize = 32;
/// Delay of part 1's outputs: long enough that none fires during the run.
const LONG_DELAY_MS: u64 = 600_000;
/// Target of part 1: what `--pending` delayed outputs may add, in MB.
const TARGET_MB: f64 = 10.0;
/// Between two looks at `/api/plugins` while the outputs fire.
const POLL: Duration = Duration::from_millis(10);

/// Options of `switchboard-bench delays`.
#[derive(clap::Args)]
pub(crate) struct DelaysArgs {
    /// Delayed outputs scheduled in each part.
    #[arg(long, default_value_t = 10_000)]
    pending: usize,
    /// Outputs per `emit` event (at most the plugins' max_outputs, 1000).
    #[arg(long, default_value_t = 100)]
    per_event: usize,
    /// Seconds between the end of scheduling and the due moment (part 2).
    #[arg(long, default_value_t = 5)]
    lead: u64,
    /// `echo` events per second for `worker` (part 2).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seconds of `echo` load after the due moment (part 2).
    #[arg(long, default_value_t = 10)]
    after: u64,
    /// Seconds to let the process settle before each memory reading (part 1).
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// Turn `[archive]` off (it is on by default, as shipped).
    #[arg(long)]
    no_archive: bool,
    /// The `switchboard` binary. Default: target/release/switchboard.
    #[arg(long)]
    switchboard: Option<PathBuf>,
}

/// `router.toml` of the three plugins.
fn config(archive: bool) -> String {
    format!(
        "plugins_dir = \"plugins\"\nstate_dir = \"state\"\n\n\
         [archive]\nenabled = {archive}\n\n\
         [[exchanges]]\nname = \"events\"\nkind = \"topic\"\n\n\
         [plugins.delayer]\nfile = \"delayer.wasm\"\n\n\
         [plugins.worker]\nfile = \"worker.wasm\"\n\n\
         [plugins.sink]\nfile = \"sink.wasm\"\n\n\
         [[routes]]\nexchange = \"events\"\npattern = \"emit\"\nplugin = \"delayer\"\n\n\
         [[routes]]\nexchange = \"events\"\npattern = \"echo\"\nplugin = \"worker\"\n\n\
         [[routes]]\nexchange = \"events\"\npattern = \"emitted.#\"\nplugin = \"sink\"\n"
    )
}

/// A temporary folder with the `router.toml` and the three components.
fn folder(archive: bool) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins)?;
    let scripted = wasm("scripted_guest")?;
    std::fs::copy(&scripted, plugins.join("delayer.wasm"))?;
    std::fs::copy(&scripted, plugins.join("worker.wasm"))?;
    std::fs::copy(wasm("noop_guest")?, plugins.join("sink.wasm"))?;
    std::fs::write(dir.path().join("router.toml"), config(archive))?;
    Ok(dir)
}

/// Now, in ms since the Unix epoch (the clock the bus's timers use).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// An HTTP client that reports every status as an answer.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// POSTs `body` to `{base}/events/events/{key}` until it is accepted (a `503`
/// waits its `Retry-After`).
fn post(agent: &ureq::Agent, base: &str, key: &str, body: &str) -> anyhow::Result<()> {
    let url = format!("{base}/events/events/{key}");
    loop {
        let mut response = agent
            .post(&url)
            .header("content-type", "application/json")
            .send(body)
            .with_context(|| format!("POST {url}"))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string()?;
        match status {
            202 => return Ok(()),
            503 => std::thread::sleep(Duration::from_secs(1)),
            _ => bail!("POST {url}: {status} {text}"),
        }
    }
}

fn get_json(agent: &ureq::Agent, url: &str) -> anyhow::Result<Value> {
    let mut response = agent.get(url).call()?;
    let text = response.body_mut().read_to_string()?;
    serde_json::from_str(&text).with_context(|| format!("GET {url}: {text}"))
}

/// What `/api/plugins` says now.
struct Look {
    at: Instant,
    /// The delayer's `queue.waiting_delayed`.
    waiting: u64,
    /// Events handled so far, per plugin.
    handled: HashMap<String, u64>,
}

fn look(agent: &ureq::Agent, base: &str) -> anyhow::Result<Look> {
    let plugins = get_json(agent, &format!("{base}/api/plugins"))?;
    let at = Instant::now();
    let mut waiting = 0;
    let mut handled = HashMap::new();
    for plugin in plugins.as_array().context("/api/plugins is not a list")? {
        let name = plugin["name"].as_str().unwrap_or_default().to_string();
        let dispatch = &plugin["dispatch"];
        if dispatch["dead_lettered"].as_u64().unwrap_or(0) > 0 {
            bail!("plugin {name} dead-lettered events: {dispatch}");
        }
        if name == "delayer" {
            waiting = plugin["queue"]["waiting_delayed"]
                .as_u64()
                .context("no queue.waiting_delayed for delayer in /api/plugins")?;
        }
        handled.insert(name, dispatch["handled"].as_u64().unwrap_or(0));
    }
    Ok(Look {
        at,
        waiting,
        handled,
    })
}

/// `switchboard_delayed_outputs_waiting` of `/metrics`.
fn metric_waiting(agent: &ureq::Agent, base: &str) -> anyhow::Result<u64> {
    let text = agent
        .get(&format!("{base}/metrics"))
        .call()?
        .body_mut()
        .read_to_string()?;
    text.lines()
        .find_map(|l| l.strip_prefix("switchboard_delayed_outputs_waiting "))
        .context("no switchboard_delayed_outputs_waiting in /metrics")?
        .trim()
        .parse::<f64>()
        .map(|v| v as u64)
        .context("switchboard_delayed_outputs_waiting is not a number")
}

/// Waits until the delayer's `waiting_delayed` is `want` (polling every 10 ms,
/// at most `timeout`); returns when it got there.
fn wait_waiting(
    agent: &ureq::Agent,
    base: &str,
    want: u64,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = look(agent, base)?;
        if now.waiting == want {
            return Ok(now.at);
        }
        if Instant::now() > deadline {
            bail!(
                "waiting_delayed is {} after {timeout:?}, not {want}",
                now.waiting
            );
        }
        std::thread::sleep(POLL);
    }
}

/// A few events that produce nothing lasting: an `emit` of no output and an
/// `echo`, each handled, so that both plugins hold their instances.
fn warm_up(agent: &ureq::Agent, base: &str) -> anyhow::Result<()> {
    let before = look(agent, base)?;
    for _ in 0..20 {
        post(agent, base, "emit", r#"{"count": 0}"#)?;
        post(agent, base, "echo", r#"{"warm": true}"#)?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = look(agent, base)?;
        let count = |l: &Look, p: &str| l.handled.get(p).copied().unwrap_or(0);
        let done = |p: &str| count(&now, p) >= count(&before, p) + 20;
        if done("delayer") && done("worker") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the warm-up events were not handled within 30 s");
        }
        std::thread::sleep(POLL);
    }
}

/// Posts `emit` events of `per_event` outputs until `pending` are asked for,
/// each delayed `delay_ms(now)` (from the clock when it is posted) or, without
/// `delay_ms`, not delayed. Returns when the last was accepted, and the events
/// posted.
fn post_emits(
    agent: &ureq::Agent,
    base: &str,
    args: &DelaysArgs,
    delay_ms: Option<&dyn Fn(u64) -> u64>,
) -> anyhow::Result<(Instant, usize)> {
    let mut asked = 0;
    let mut events = 0;
    while asked < args.pending {
        let count = args.per_event.min(args.pending - asked);
        let mut body = json!({"count": count, "step_ms": 0, "tag": format!("bench-{events}")});
        if let Some(delay_ms) = delay_ms {
            body["delay_ms"] = json!(delay_ms(now_ms()));
        }
        post(agent, base, "emit", &body.to_string())?;
        asked += count;
        events += 1;
    }
    Ok((Instant::now(), events))
}

/// [`post_emits`] delayed, then waits until all are stored. Returns when that
/// was, and the events posted.
fn schedule(
    agent: &ureq::Agent,
    base: &str,
    args: &DelaysArgs,
    delay_ms: &dyn Fn(u64) -> u64,
) -> anyhow::Result<(Instant, usize)> {
    let (_, events) = post_emits(agent, base, args, Some(delay_ms))?;
    let done = wait_waiting(agent, base, args.pending as u64, Duration::from_secs(120))?;
    Ok((done, events))
}

/// Part 1's figures.
struct Memory {
    rss_start: u64,
    rss_warm: u64,
    /// After the same `emit` events with no delay (their outputs handled by
    /// the sink at once).
    rss_undelayed: u64,
    rss_pending: u64,
    metric: u64,
    redb_empty: u64,
    redb_pending: u64,
    events: usize,
    scheduling: Duration,
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn memory(args: &DelaysArgs, binary: &Path) -> anyhow::Result<Memory> {
    let dir = folder(!args.no_archive)?;
    let running = Running::start(binary, dir.path(), &[])?;
    let result = (|| -> anyhow::Result<Memory> {
        let base = &running.url;
        let agent = agent();
        let settle = Duration::from_secs(args.settle);
        let timers = dir.path().join("state/timers.redb");
        std::thread::sleep(settle);
        let rss_start = running.rss()?;
        warm_up(&agent, base)?;
        std::thread::sleep(settle);
        let rss_warm = running.rss()?;
        if !timers.exists() {
            bail!(
                "{} does not exist: this build does not keep delayed outputs in state_dir",
                timers.display()
            );
        }
        let redb_empty = file_size(&timers);
        // The same events with no delay: what handling them costs by itself.
        let sink = |l: &Look| l.handled.get("sink").copied().unwrap_or(0);
        let before = sink(&look(&agent, base)?);
        let (_, events) = post_emits(&agent, base, args, None)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while sink(&look(&agent, base)?) < before + args.pending as u64 {
            if Instant::now() > deadline {
                bail!("the sink did not handle the {events} undelayed outputs within 60 s");
            }
            std::thread::sleep(POLL);
        }
        std::thread::sleep(settle);
        let rss_undelayed = running.rss()?;
        let start = Instant::now();
        let (done, events) = schedule(&agent, base, args, &|_| LONG_DELAY_MS)?;
        let scheduling = done.duration_since(start);
        std::thread::sleep(settle);
        let rss_pending = running.rss()?;
        let metric = metric_waiting(&agent, base)?;
        let still = look(&agent, base)?.waiting;
        if still != args.pending as u64 {
            bail!("{still} delayed outputs wait, not {}", args.pending);
        }
        Ok(Memory {
            rss_start,
            rss_warm,
            rss_undelayed,
            rss_pending,
            metric,
            redb_empty,
            redb_pending: file_size(&timers),
            events,
            scheduling,
        })
    })()
    .with_context(|| format!("part 1: its log ends: {}", running.log_tail()))?;
    running.stop()?;
    Ok(result)
}

/// Part 2's figures.
struct Firing {
    /// Scheduling ended this long before the due moment.
    lead: Duration,
    scheduling: Duration,
    /// From the start of the `echo` load.
    load_start: Instant,
    due: Instant,
    /// The first look that saw fewer outputs waiting.
    first_fired: Option<Instant>,
    /// The first look that saw none waiting.
    all_fired: Option<Instant>,
    /// The first look that saw the sink handle every fired output.
    sink_done: Option<Instant>,
    load_end: Instant,
    sent: Vec<Sent>,
    /// When each `echo` event's output was seen, by event number.
    seen: HashMap<u64, Instant>,
}

fn firing(args: &DelaysArgs, binary: &Path, estimate: Duration) -> anyhow::Result<Firing> {
    let dir = folder(!args.no_archive)?;
    let running = Running::start(binary, dir.path(), &[])?;
    let result = fire(args, &running, estimate)
        .with_context(|| format!("part 2: its log ends: {}", running.log_tail()))?;
    running.stop()?;
    Ok(result)
}

fn fire(args: &DelaysArgs, running: &Running, estimate: Duration) -> anyhow::Result<Firing> {
    let base = &running.url;
    let agent = agent();
    warm_up(&agent, base)?;
    let (seen_tx, seen_rx) = mpsc::channel();
    ingress::watch_stream(base, "exchange=events&match=echoed", seen_tx)?;
    let sink_before = look(&agent, base)?
        .handled
        .get("sink")
        .copied()
        .unwrap_or(0);

    // The due moment: scheduling as long as part 1's (with a margin), then the lead.
    let estimate = u64::try_from(estimate.as_millis()).unwrap_or(u64::MAX);
    let due_ms = now_ms() + estimate * 3 / 2 + args.lead * 1000;
    let due = Instant::now() + Duration::from_millis(due_ms.saturating_sub(now_ms()));
    let start = Instant::now();
    let (scheduled, _) = schedule(&agent, base, args, &|now| due_ms.saturating_sub(now).max(1))?;
    let scheduling = scheduled.duration_since(start);
    if scheduled >= due {
        bail!(
            "scheduling took {scheduling:?}, past the due moment; run again (or with a longer --lead)"
        );
    }

    let run = ingress::run_id();
    let prefix = format!("{run}-echo-");
    let load_for = due.saturating_duration_since(Instant::now()) + Duration::from_secs(args.after);
    let body = |k: u64| {
        json!({"id": format!("{prefix}{k}"), "type": "echo", "source": "bench",
               "data": {"k": k, "payload": "x".repeat(64)}})
        .to_string()
    };
    let echo_url = format!("{base}/events/events/echo");
    let pending = args.pending as u64;
    let (load_start, sent, looks) = std::thread::scope(|scope| {
        let load_start = Instant::now();
        let load =
            scope.spawn(|| ingress::paced(&echo_url, args.rate, load_for, PACED_CLIENTS, &body));
        let mut looks = Vec::new();
        let mut error = None;
        while !load.is_finished() {
            match look(&agent, base) {
                Ok(now) => looks.push(now),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
            std::thread::sleep(POLL);
        }
        let sent = load
            .join()
            .map_err(|_| anyhow::anyhow!("the echo load panicked"))
            .and_then(|r| r);
        match error {
            Some(e) => Err(e),
            None => sent.map(|sent| (load_start, sent, looks)),
        }
    })?;
    let load_end = Instant::now();
    let mut looks = looks;
    // Firing or the sink may not be done when the load ends: look on, up to 60 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = look(&agent, base)?;
        let sink = now.handled.get("sink").copied().unwrap_or(0);
        let over = now.waiting == 0 && sink >= sink_before + pending;
        looks.push(now);
        if over {
            break;
        }
        if Instant::now() > deadline {
            bail!("the delayed outputs had not all fired and reached the sink 60 s after the load");
        }
        std::thread::sleep(POLL);
    }
    let first_fired = looks.iter().find(|l| l.waiting < pending).map(|l| l.at);
    let all_fired = looks.iter().find(|l| l.waiting == 0).map(|l| l.at);
    let sink_done = looks
        .iter()
        .find(|l| l.handled.get("sink").copied().unwrap_or(0) >= sink_before + pending)
        .map(|l| l.at);

    // The outputs of the last events: give the watcher a moment.
    let accepted = sent.iter().filter(|s| s.accepted).count();
    let mut seen = HashMap::new();
    let until = Instant::now() + Duration::from_secs(5);
    while seen.len() < accepted {
        let Ok((id, at)) = seen_rx.recv_timeout(until.saturating_duration_since(Instant::now()))
        else {
            break;
        };
        if let Some(k) = id.strip_prefix(&prefix).and_then(|k| k.parse::<u64>().ok()) {
            seen.entry(k).or_insert(at);
        }
    }
    Ok(Firing {
        lead: due.saturating_duration_since(scheduled),
        scheduling,
        load_start,
        due,
        first_fired,
        all_fired,
        sink_done,
        load_end,
        sent,
        seen,
    })
}

/// One window of `echo` events, by when each was due.
struct Window {
    label: String,
    events: usize,
    refused: usize,
    not_seen: usize,
    /// Milliseconds from due to output, sorted.
    ms: Vec<f64>,
}

impl Firing {
    /// Seconds from the due moment (negative before it).
    fn rel(&self, at: Instant) -> f64 {
        if at >= self.due {
            at.duration_since(self.due).as_secs_f64()
        } else {
            -self.due.duration_since(at).as_secs_f64()
        }
    }

    fn window(&self, label: &str, from: Instant, to: Instant) -> Window {
        let sent: Vec<&Sent> = self
            .sent
            .iter()
            .filter(|s| s.due >= from && s.due < to)
            .collect();
        let accepted: Vec<&&Sent> = sent.iter().filter(|s| s.accepted).collect();
        let mut ms: Vec<f64> = accepted
            .iter()
            .filter_map(|s| {
                let seen = self.seen.get(&s.k)?;
                Some(seen.saturating_duration_since(s.due).as_secs_f64() * 1e3)
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        Window {
            label: format!(
                "{label} ({:+.2} s to {:+.2} s)",
                self.rel(from),
                self.rel(to)
            ),
            events: sent.len(),
            refused: sent.len() - accepted.len(),
            not_seen: accepted.len() - ms.len(),
            ms,
        }
    }
}

pub(crate) fn run(args: &DelaysArgs) -> anyhow::Result<()> {
    if args.per_event == 0 || args.pending == 0 {
        bail!("--pending and --per-event must be at least 1");
    }
    let binary = process::binary(args.switchboard.as_deref())?;
    let archive = if args.no_archive { "off" } else { "on" };

    let m = memory(args, &binary)?;
    eprintln!(
        "part 1: RSS {:.1} → {:.1} MB with {} delayed outputs waiting; timers.redb {:.2} MB",
        mb(m.rss_start),
        mb(m.rss_pending),
        args.pending,
        mb(m.redb_pending)
    );
    let f = firing(args, &binary, m.scheduling)?;
    eprintln!(
        "part 2: scheduled in {:.2} s, due {:.2} s later; all fired {} s after the due moment",
        f.scheduling.as_secs_f64(),
        f.lead.as_secs_f64(),
        f.all_fired
            .map_or_else(|| "(not seen)".into(), |t| format!("{:.3}", f.rel(t)))
    );

    let n = args.pending;
    println!(
        "\n### {n} delayed outputs waiting: memory (embedded bus, archive {archive}; MB = 10^6 bytes)\n"
    );
    println!("| what | value |");
    println!("|---|---:|");
    let settle = args.settle;
    println!(
        "| 1. RSS idle after start ({settle} s), MB | {:.1} |",
        mb(m.rss_start)
    );
    println!(
        "| 2. RSS after a warm-up (20 `emit` of no output, 20 `echo`), MB | {:.1} |",
        mb(m.rss_warm)
    );
    println!(
        "| 3. RSS after the same {} `emit` events with no delay (their {n} outputs published at once, to `sink`), MB | {:.1} |",
        m.events,
        mb(m.rss_undelayed)
    );
    println!(
        "| 4. RSS with {n} delayed outputs waiting ({settle} s after the last was stored), MB | {:.1} |",
        mb(m.rss_pending)
    );
    let added = |from: u64| (m.rss_pending as f64 - from as f64) / 1e6;
    let verdict = if added(m.rss_start) <= TARGET_MB {
        "PASS"
    } else {
        "FAIL"
    };
    println!(
        "| **added by {n} waiting: 4 − 1** (target ≤ {TARGET_MB:.0} MB) | **{:+.1} MB: {verdict}** |",
        added(m.rss_start)
    );
    println!("| 4 − 2 | {:+.1} MB |", added(m.rss_warm));
    println!(
        "| 4 − 3 (the waiting outputs alone) | {:+.1} MB |",
        added(m.rss_undelayed)
    );
    println!(
        "| timers.redb, empty → with {n} waiting, MB | {:.2} → {:.2} |",
        mb(m.redb_empty),
        mb(m.redb_pending)
    );
    println!(
        "| scheduling: {} `emit` events of {} outputs, POST of the first → all stored | {:.2} s ({:.0} outputs/s) |",
        m.events,
        args.per_event,
        m.scheduling.as_secs_f64(),
        n as f64 / m.scheduling.as_secs_f64()
    );
    println!(
        "| `/metrics` switchboard_delayed_outputs_waiting | {} |",
        m.metric
    );

    println!(
        "\n### {n} delayed outputs due at one moment, beside `worker` at {:.0} `echo` events/s (embedded bus, archive {archive})\n",
        args.rate
    );
    let fired_at = f.all_fired.unwrap_or(f.load_end);
    let drained_at = f.sink_done.unwrap_or(f.load_end).max(fired_at);
    let mut windows = vec![
        f.window(
            "before the due moment",
            f.load_start + Duration::from_secs(1),
            f.due,
        ),
        f.window("during the firing", f.due, fired_at),
    ];
    if drained_at > fired_at {
        windows.push(f.window("sink working through them", fired_at, drained_at));
    }
    windows.push(f.window("after", drained_at, f.load_end + Duration::from_secs(1)));
    println!(
        "| `echo` events due (s from the due moment) | events | 503 | output not seen | POST → `echoed` p50, ms | p99, ms | max, ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for w in &windows {
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} |",
            w.label,
            w.events,
            w.refused,
            w.not_seen,
            percentile(&w.ms, 0.5),
            percentile(&w.ms, 0.99),
            w.ms.last().copied().unwrap_or(f64::NAN)
        );
    }
    let ms = |t: Option<Instant>| {
        t.map_or_else(
            || "not seen".into(),
            |t| format!("{:+.0} ms", f.rel(t) * 1e3),
        )
    };
    println!(
        "\nScheduling: {n} outputs stored in {:.2} s, {:.2} s before the due moment. From the due moment: first output fired (waiting_delayed below {n}) {}, **all {n} fired (waiting_delayed 0) {}**, the sink had handled all {} (looks at /api/plugins every {} ms).",
        f.scheduling.as_secs_f64(),
        f.lead.as_secs_f64(),
        ms(f.first_fired),
        ms(f.all_fired),
        ms(f.sink_done),
        POLL.as_millis()
    );
    let p99 = |w: &Window| percentile(&w.ms, 0.99);
    println!(
        "p99 during the firing / p99 before: **{:.2}×** ({:.2} ms of {} outputs seen / {:.2} ms of {}){}.",
        p99(&windows[1]) / p99(&windows[0]),
        p99(&windows[1]),
        windows[1].ms.len(),
        p99(&windows[0]),
        windows[0].ms.len(),
        if windows[1].ms.len() < 100 {
            "; of fewer than 100, the p99 is the max"
        } else {
            ""
        }
    );
    Ok(())
}
