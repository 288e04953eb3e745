//! Load through a running appliance's HTTP ingress, as services send it, and
//! what the appliance reports back: [`flood`] (closed loop, as fast as it
//! accepts), [`paced`] (open loop at a fixed rate, for latency), the outputs
//! seen on `/events/stream`, and how many events each plugin has handled
//! (`/api/plugins`), with how many each should handle per event (`/api/routes`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use switchboard::route::{Binding, ExchangeKind, RouteTable};

/// The routing keys of one event's flow: an `order.created` (see [`order`]),
/// and the `notification.email` the notification plugin renders for it.
pub(crate) const FLOW: [&str; 2] = ["order.created", "notification.email"];

/// An `order.created` envelope with event id `id`, no correlation id (so the
/// flow is correlated by `id`) and a customer email.
pub(crate) fn order(id: &str) -> String {
    json!({"id": id, "type": "order.created", "source": "bench", "tenant_id": "acme",
           "data": {"order_id": id, "total_cents": 12990, "currency": "EUR",
                    "customer": {"name": "Ann Lee", "email": "ann@example.com"}}})
    .to_string()
}

/// A prefix that makes event ids unique across runs.
pub(crate) fn run_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("{}-{millis}", std::process::id())
}

/// An agent per load thread, so that each keeps one keep-alive connection.
fn agent(timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(timeout)
        .build()
        .into()
}

/// The body of request number `k` (each carries an event id of its own).
pub(crate) type Body<'a> = &'a (dyn Fn(u64) -> String + Sync);

/// POSTs `body` as JSON; `Ok(None)` for 202, `Ok(Some(retry after))` for 503.
fn post(agent: &ureq::Agent, url: &str, body: String) -> anyhow::Result<Option<Duration>> {
    let mut response = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body)
        .with_context(|| format!("POST {url}"))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.trim().parse().ok())
        .map(Duration::from_secs);
    // Read to the end, so that the connection is reused.
    let text = response.body_mut().read_to_string()?;
    match status {
        202 => Ok(None),
        503 => Ok(Some(retry_after.unwrap_or(Duration::from_secs(1)))),
        _ => bail!("POST {url}: {status} {text}"),
    }
}

/// Runs `work` on `threads` threads at once; the results in thread order.
fn on_threads<T: Send>(
    threads: usize,
    work: impl Fn() -> anyhow::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads).map(|_| scope.spawn(&work)).collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a load thread panicked"))?)
            .collect()
    })
}

/// What a closed-loop run got back.
pub(crate) struct Flood {
    pub(crate) accepted: u64,
    /// `503` answers: a destination queue was full.
    pub(crate) refused: u64,
    /// From the first request to the last answer.
    pub(crate) elapsed: Duration,
}

/// `connections` clients POSTing `body(k)` to `url`, each as soon as its last
/// answer came, for `duration`. A client refused with `503` waits its
/// `Retry-After` before sending again, as a well-behaved service does.
pub(crate) fn flood(
    url: &str,
    connections: usize,
    duration: Duration,
    body: Body<'_>,
) -> anyhow::Result<Flood> {
    let next = AtomicU64::new(0);
    let start = Instant::now();
    let end = start + duration;
    let counts = on_threads(connections, || {
        let agent = agent(Some(Duration::from_secs(30)));
        let (mut accepted, mut refused) = (0, 0);
        while Instant::now() < end {
            let k = next.fetch_add(1, Ordering::Relaxed);
            if let Some(retry_after) = post(&agent, url, body(k))? {
                refused += 1;
                std::thread::sleep(retry_after.min(end.saturating_duration_since(Instant::now())));
            } else {
                accepted += 1;
            }
        }
        Ok((accepted, refused))
    })?;
    Ok(Flood {
        accepted: counts.iter().map(|c| c.0).sum(),
        refused: counts.iter().map(|c| c.1).sum(),
        elapsed: start.elapsed(),
    })
}

/// One request of a paced run.
pub(crate) struct Sent {
    pub(crate) k: u64,
    /// When the schedule said to send it.
    pub(crate) due: Instant,
    pub(crate) answered: Instant,
    pub(crate) accepted: bool,
}

/// Open loop: request `k` is due at `k / rate` seconds from the start, for
/// `duration`, and goes out on the first of `connections` clients that is
/// free. Latencies count from when a request was due, so a stall delays the
/// requests behind it instead of hiding them (wrk2's schedule).
pub(crate) fn paced(
    url: &str,
    rate: f64,
    duration: Duration,
    connections: usize,
    body: Body<'_>,
) -> anyhow::Result<Vec<Sent>> {
    let total = (rate * duration.as_secs_f64()).ceil() as u64;
    let next = AtomicU64::new(0);
    let start = Instant::now();
    let sent = on_threads(connections, || {
        let agent = agent(Some(Duration::from_secs(30)));
        let mut sent = Vec::new();
        loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            if k >= total {
                return Ok(sent);
            }
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let refused = post(&agent, url, body(k))?;
            sent.push(Sent {
                k,
                due,
                answered: Instant::now(),
                accepted: refused.is_none(),
            });
        }
    })?;
    Ok(sent.into_iter().flatten().collect())
}

/// Subscribes to `{base}/events/stream?{query}` and, from a thread of its own
/// until the stream ends, sends the `correlation_id` of every message it shows
/// with the moment it arrived.
pub(crate) fn watch_stream(
    base: &str,
    query: &str,
    seen: mpsc::Sender<(String, Instant)>,
) -> anyhow::Result<()> {
    let url = format!("{base}/events/stream?{query}");
    // The answer's headers come once the stream is subscribed.
    let response = agent(None).get(&url).call()?;
    if response.status() != 200 {
        bail!("GET {url}: {}", response.status());
    }
    let reader = BufReader::new(response.into_body().into_reader());
    std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let at = Instant::now();
            let message: Value = serde_json::from_str(data).unwrap_or_default();
            if let Some(id) = message["message"]["correlation_id"].as_str()
                && seen.send((id.to_string(), at)).is_err()
            {
                return;
            }
        }
    });
    Ok(())
}

fn get_json(base: &str, path: &str) -> anyhow::Result<Value> {
    let url = format!("{base}{path}");
    let mut response = agent(Some(Duration::from_secs(30))).get(&url).call()?;
    let text = response.body_mut().read_to_string()?;
    serde_json::from_str(&text).with_context(|| format!("GET {url}: {text}"))
}

/// Events handled so far per plugin (`dispatch.handled` of `/api/plugins`).
/// Fails if any plugin has dead-lettered an event: it would never catch up.
pub(crate) fn handled(base: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let plugins = get_json(base, "/api/plugins")?;
    let mut handled = BTreeMap::new();
    for plugin in plugins.as_array().context("/api/plugins is not a list")? {
        let name = plugin["name"].as_str().unwrap_or_default().to_string();
        let dispatch = &plugin["dispatch"];
        if dispatch["dead_lettered"].as_u64().unwrap_or(0) > 0 {
            bail!("plugin {name} dead-lettered events: {dispatch}");
        }
        handled.insert(name, dispatch["handled"].as_u64().unwrap_or(0));
    }
    Ok(handled)
}

/// Deliveries retried so far, all plugins together.
pub(crate) fn retried(base: &str) -> anyhow::Result<u64> {
    let plugins = get_json(base, "/api/plugins")?;
    Ok(plugins
        .as_array()
        .context("/api/plugins is not a list")?
        .iter()
        .map(|p| p["dispatch"]["retried"].as_u64().unwrap_or(0))
        .sum())
}

/// How many events each plugin handles per flow: `flow` lists the routing keys
/// of one event and of the outputs it causes, all published to `exchange`; the
/// appliance's own routes (`/api/routes`) decide who gets each.
pub(crate) fn per_flow(
    base: &str,
    exchange: &str,
    flow: &[&str],
) -> anyhow::Result<BTreeMap<String, u64>> {
    let routes = get_json(base, "/api/routes")?;
    let mut bindings = Vec::new();
    for route in routes.as_array().context("/api/routes is not a list")? {
        if route["enabled"] != Value::Bool(true) {
            continue;
        }
        let text = |key: &str| route[key].as_str().unwrap_or_default().to_string();
        bindings.push(Binding {
            exchange: text("exchange"),
            kind: serde_json::from_value::<ExchangeKind>(route["kind"].clone())?,
            pattern: text("pattern"),
            plugin: text("plugin"),
        });
    }
    let table = RouteTable::new(bindings)?;
    let mut per_flow = BTreeMap::new();
    for key in flow {
        for plugin in table.destinations(exchange, key) {
            *per_flow.entry(plugin.to_string()).or_default() += 1;
        }
    }
    Ok(per_flow)
}

/// Waits until every plugin has handled `events` flows more than `before`
/// (polling every 20 ms, at most `timeout`); returns when the last one got there.
pub(crate) fn wait_handled(
    base: &str,
    before: &BTreeMap<String, u64>,
    per_flow: &BTreeMap<String, u64>,
    events: u64,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = handled(base)?;
        let behind: Vec<String> = per_flow
            .iter()
            .filter_map(|(plugin, per)| {
                let want = before.get(plugin).copied().unwrap_or(0) + per * events;
                let got = now.get(plugin).copied().unwrap_or(0);
                (got < want).then(|| format!("{plugin} {got} of {want}"))
            })
            .collect();
        if behind.is_empty() {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("not handled within {timeout:?}: {}", behind.join(", "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
