//! `/api/*`: the admin API, in JSON, for people and tools that run the router.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{error, fetch_dead_letters};
use crate::appliance::Appliance;
use crate::bus::DeadLetter;
use crate::config::{RouterConfig, duration_text};

/// The routes to `plugin`, as `{exchange, pattern}`.
fn routes_of(config: &RouterConfig, plugin: &str) -> Vec<Value> {
    config
        .routes
        .iter()
        .filter(|r| r.plugin == plugin)
        .flat_map(|r| {
            r.patterns
                .iter()
                .map(|p| json!({"exchange": r.exchange, "pattern": p}))
        })
        .collect()
}

/// `GET /api/plugins`: every configured plugin, with what an operator asks
/// first: which version serves since when, what reaches it, its limits, how it
/// is doing and why it last failed to load.
pub(super) async fn plugins(State(appliance): State<Appliance>) -> Response {
    let listed = tokio::task::spawn_blocking(move || {
        let config = appliance.config();
        appliance
            .statuses()
            .into_iter()
            .map(|status| {
                let settings = config.plugin_settings(&status.name);
                let limits = settings.as_ref().map(|s| {
                    json!({
                        "timeout": duration_text(s.timeout),
                        "memory_bytes": s.memory.as_u64(),
                        "instance_reuse": s.instance_reuse,
                        "concurrency": s.concurrency,
                        "prefetch": s.prefetch,
                        "max_attempts": s.max_attempts,
                        "max_hops": s.max_hops,
                        "queue_capacity": s.queue_capacity,
                        "ordered": s.ordered,
                    })
                });
                json!({
                    "name": status.name,
                    "file": status.file,
                    "content_hash": status.version,
                    "loaded_at": status.loaded_at,
                    "loads": status.loads,
                    "status": status.state,
                    "last_error": status.error,
                    "routes": routes_of(&config, &status.name),
                    "output_exchange": settings.as_ref().and_then(|s| s.output_exchange.clone()),
                    "config": settings.as_ref().map(|s| super::console::masked_config(&s.config)),
                    "limits": limits,
                    "queue": status.queue,
                    "broker": status.broker,
                    "dispatch": status.dispatch,
                })
            })
            .collect::<Vec<Value>>()
    })
    .await;
    match listed {
        Ok(list) => Json(list).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the status task failed"),
    }
}

/// `GET /api/routes`: every (exchange, pattern) → plugin binding.
pub(super) async fn routes(State(appliance): State<Appliance>) -> Response {
    let config = appliance.config();
    let list: Vec<Value> = config
        .routes
        .iter()
        .flat_map(|r| {
            let kind = config.exchange(&r.exchange).map(|e| e.kind);
            let enabled = config.plugins.get(&r.plugin).is_some_and(|p| p.enabled);
            r.patterns.iter().map(move |p| {
                json!({
                    "exchange": r.exchange,
                    "kind": kind,
                    "pattern": p,
                    "plugin": r.plugin,
                    "enabled": enabled,
                })
            })
        })
        .collect();
    Json(list).into_response()
}

#[derive(Debug, Deserialize)]
pub(super) struct Page {
    offset: Option<usize>,
    limit: Option<usize>,
}

/// Most dead letters one page holds.
const MAX_PAGE: usize = 1000;

/// `GET /api/dlq/{plugin}?offset=&limit=`: a page of dead letters, oldest
/// first, each with its reason, attempts and the plugin version that failed.
pub(super) async fn dead_letters(
    State(appliance): State<Appliance>,
    Path(plugin): Path<String>,
    Query(page): Query<Page>,
) -> Response {
    let offset = page.offset.unwrap_or(0);
    let limit = page.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let letters = match fetch_dead_letters(&appliance, &plugin, offset.saturating_add(limit)).await
    {
        Ok(letters) => letters,
        Err(response) => return response,
    };
    let items: Vec<Value> = letters
        .iter()
        .skip(offset)
        .map(DeadLetter::to_json)
        .collect();
    let next = (items.len() == limit).then_some(offset + limit);
    Json(json!({
        "plugin": plugin,
        "offset": offset,
        "limit": limit,
        "items": items,
        "next_offset": next,
    }))
    .into_response()
}

/// `POST /api/plugins/{name}/reload`: load the plugin's file again. A version
/// that does not load is refused (422) and the running one keeps serving.
pub(super) async fn reload(
    State(appliance): State<Appliance>,
    Path(name): Path<String>,
) -> Response {
    if !appliance.config().plugins.contains_key(&name) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no plugin {name:?} is configured"),
        );
    }
    let done = {
        let appliance = appliance.clone();
        let name = name.clone();
        tokio::task::spawn_blocking(move || appliance.reload_plugin(&name)).await
    };
    match done {
        Ok(Ok(())) => {
            let status = appliance.statuses().into_iter().find(|s| s.name == name);
            Json(json!({
                "plugin": name,
                "content_hash": status.as_ref().and_then(|s| s.version.clone()),
                "loaded_at": status.and_then(|s| s.loaded_at),
            }))
            .into_response()
        }
        Ok(Err(why)) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{why}; the running version keeps serving"),
        ),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the reload task failed"),
    }
}

/// `GET /api/events` parameters (`switchboard events` takes the same).
#[derive(Debug, Deserialize)]
pub(super) struct EventsQuery {
    exchange: Option<String>,
    #[serde(rename = "match")]
    pattern: Option<String>,
    aggregate: Option<String>,
    since: Option<String>,
    until: Option<String>,
    /// Only events after this position (the `next_after` of the last page).
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /api/events`: archived events, oldest first, a page at a time: from
/// the embedded bus's archive, or on RabbitMQ from the archive stream (its own
/// connection, off the async threads).
pub(super) async fn events(
    State(appliance): State<Appliance>,
    Query(q): Query<EventsQuery>,
) -> Response {
    let mut query = match archive_query(&appliance, &q) {
        Ok(query) => query,
        Err((status, why)) => return error(status, why),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    query.limit = Some(limit);
    let read = tokio::task::spawn_blocking(move || read_archive(&appliance, &query));
    match read.await {
        Ok(Ok(items)) => {
            let next = (items.len() == limit).then(|| items.last().map(|e| e.seq));
            Json(json!({"items": items, "next_after": next.flatten()})).into_response()
        }
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the archive: {e}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The archive query `q` asks for (its `limit` aside); `Err` is the status
/// and reason to answer with (no archive here, or a bad parameter).
fn archive_query(
    appliance: &Appliance,
    q: &EventsQuery,
) -> Result<crate::archive::Query, (StatusCode, String)> {
    let config = appliance.config();
    let here = appliance
        .transport()
        .embedded()
        .is_some_and(|b| b.archive().is_some())
        || (appliance.transport().rabbit().is_some() && config.archive.enabled);
    if !here {
        return Err((
            StatusCode::NOT_FOUND,
            "the event archive is not enabled here ([archive] enabled = true)".into(),
        ));
    }
    let mut query = crate::archive::Query::parse(
        q.exchange.as_deref(),
        q.pattern.as_deref(),
        q.aggregate.as_deref(),
        q.since.as_deref(),
        q.until.as_deref(),
    )
    .map_err(|why| (StatusCode::BAD_REQUEST, why))?;
    query.after = q.after;
    Ok(query)
}

/// What `query` selects of the archive: the embedded bus's, or on RabbitMQ
/// the archive stream (its own connection). Blocks.
fn read_archive(
    appliance: &Appliance,
    query: &crate::archive::Query,
) -> anyhow::Result<Vec<crate::archive::ArchivedEvent>> {
    match appliance.transport().embedded().and_then(|b| b.archive()) {
        Some(archive) => Ok(archive.query(query)?),
        None => crate::archive::stream::read(&appliance.config(), query),
    }
}

/// A kv value as the API and `switchboard kv get` show it: JSON when it is
/// JSON, else text when it is UTF-8, else base64.
pub(crate) fn kv_value_json(plugin: &str, key: &str, value: &[u8]) -> Value {
    use base64::Engine as _;
    if let Ok(json) = serde_json::from_slice::<Value>(value) {
        return json!({"plugin": plugin, "key": key, "value": json});
    }
    match std::str::from_utf8(value) {
        Ok(text) => json!({"plugin": plugin, "key": key, "text": text}),
        Err(_) => json!({"plugin": plugin, "key": key,
                         "base64": base64::engine::general_purpose::STANDARD.encode(value)}),
    }
}

/// `GET /api/kv/{plugin}/{key}`: one value of a plugin's state.
pub(super) async fn kv_get(
    State(appliance): State<Appliance>,
    Path((plugin, key)): Path<(String, String)>,
) -> Response {
    if !appliance.config().plugins.contains_key(&plugin) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no plugin {plugin:?} is configured"),
        );
    }
    let read = {
        let (plugin, key) = (plugin.clone(), key.clone());
        tokio::task::spawn_blocking(move || appliance.kv_get(&plugin, &key)).await
    };
    match read {
        Ok(Ok(Some(value))) => Json(kv_value_json(&plugin, &key, &value)).into_response(),
        Ok(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            format!("plugin {plugin:?} keeps nothing under {key:?}"),
        ),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `PUT /api/kv/{plugin}/{key}`: sets one value of a plugin's state (the
/// body), answered once durable. `switchboard replay --rebuild` writes
/// through it while the appliance holds the store.
pub(super) async fn kv_put(
    State(appliance): State<Appliance>,
    Path((plugin, key)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    kv_write(appliance, plugin, key, Some(body)).await
}

/// `DELETE /api/kv/{plugin}/{key}`: 204 once durable, 404 when absent.
pub(super) async fn kv_delete(
    State(appliance): State<Appliance>,
    Path((plugin, key)): Path<(String, String)>,
) -> Response {
    kv_write(appliance, plugin, key, None).await
}

async fn kv_write(
    appliance: Appliance,
    plugin: String,
    key: String,
    value: Option<axum::body::Bytes>,
) -> Response {
    if !appliance.config().plugins.contains_key(&plugin) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no plugin {plugin:?} is configured"),
        );
    }
    // The limits a plugin's own writes have.
    if key.is_empty() || key.len() > crate::runtime::MAX_KEY {
        return error(
            StatusCode::BAD_REQUEST,
            format!("a key is 1 to {} bytes", crate::runtime::MAX_KEY),
        );
    }
    if value
        .as_ref()
        .is_some_and(|v| v.len() > crate::runtime::MAX_VALUE)
    {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a value is at most {} bytes", crate::runtime::MAX_VALUE),
        );
    }
    let written = {
        let (plugin, key) = (plugin.clone(), key.clone());
        tokio::task::spawn_blocking(move || appliance.kv_put(&plugin, &key, value.as_deref())).await
    };
    match written {
        Ok(Ok(true)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Ok(false)) => error(
            StatusCode::NOT_FOUND,
            format!("plugin {plugin:?} keeps nothing under {key:?}"),
        ),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct ReplayQuery {
    /// Names the replay: the `switchboard-replay` header's value.
    id: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct ReplayBody {
    events: Vec<crate::archive::ArchivedEvent>,
}

/// `POST /api/plugins/{name}/replay?id=R` with `{"events": [archived…]}`:
/// puts the events in the plugin's queue again as first attempts, each
/// marked `switchboard-replay: R`. `{"delivered": n}`; 503 with the count
/// when the queue filled first (send the rest later).
pub(super) async fn replay(
    State(appliance): State<Appliance>,
    Path(plugin): Path<String>,
    Query(query): Query<ReplayQuery>,
    Json(body): Json<ReplayBody>,
) -> Response {
    if !appliance.config().plugins.contains_key(&plugin) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no plugin {plugin:?} is configured"),
        );
    }
    let id = query.id.trim();
    if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
        return error(
            StatusCode::BAD_REQUEST,
            "the replay id must be 1 to 128 printable characters",
        );
    }
    let wanted = body.events.len();
    let messages: Vec<crate::bus::Delivered> = body
        .events
        .iter()
        .map(|event| {
            let mut message = event.message();
            message
                .headers
                .retain(|(k, _)| k != crate::envelope::REPLAY_HEADER);
            message
                .headers
                .push((crate::envelope::REPLAY_HEADER.into(), id.to_string()));
            crate::bus::Delivered {
                exchange: event.exchange.clone(),
                routing_key: event.routing_key.clone(),
                message,
                attempt: 1,
                first_failure: None,
            }
        })
        .collect();
    let transport = appliance.transport().clone();
    match tokio::task::spawn_blocking(move || transport.deliver(&plugin, messages)).await {
        Ok(Ok(n)) if n == wanted => Json(json!({"delivered": n})).into_response(),
        Ok(Ok(n)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, "1")],
            Json(json!({"delivered": n, "error": "the plugin's queue is full"})),
        )
            .into_response(),
        Ok(Err(e @ crate::bus::BusError::NoSuchQueue(_))) => error(StatusCode::NOT_FOUND, e),
        Ok(Err(e)) => error(StatusCode::BAD_GATEWAY, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Most events one diff runs (each runs twice).
const MAX_DIFF_EVENTS: usize = 10_000;
/// Archived events read per page while selecting a diff's events.
const DIFF_PAGE: usize = 1000;
/// One diff at a time: each compiles two components and runs every event twice.
static DIFFING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `POST /api/plugins/{name}/diff?aggregate=&match=&…` with a candidate
/// component as the body: `switchboard replay --diff`, run here. The
/// archived events `/api/events` would select (the oldest `limit`, 1000 by
/// default) that the plugin's routes deliver to it go through the running
/// version and the candidate, each offline on a scratch copy of the live
/// state (nothing is published or written). `{"summary", "differing"}`.
pub(super) async fn diff(
    State(appliance): State<Appliance>,
    Path(name): Path<String>,
    Query(q): Query<EventsQuery>,
    body: axum::body::Bytes,
) -> Response {
    let config = appliance.config();
    if !config.plugins.contains_key(&name) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no plugin {name:?} is configured"),
        );
    }
    let mut query = match archive_query(&appliance, &q) {
        Ok(query) => query,
        Err((status, why)) => return error(status, why),
    };
    if body.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "the body must be the candidate component (a .wasm file)",
        );
    }
    let limit = q.limit.unwrap_or(1000).clamp(1, MAX_DIFF_EVENTS);
    if DIFFING.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "a diff is running already: one at a time",
        );
    }
    let run = tokio::task::spawn_blocking(move || {
        let report = (|| -> Result<Value, (StatusCode, String)> {
            let internal = |e: String| (StatusCode::INTERNAL_SERVER_ERROR, e);
            let mut events = Vec::new();
            query.limit = Some(DIFF_PAGE);
            loop {
                let page = read_archive(&appliance, &query)
                    .map_err(|e| internal(format!("cannot read the archive: {e}")))?;
                let full = page.len() == DIFF_PAGE;
                query.after = page.last().map(|e| e.seq);
                let routed = crate::replay::routed_to(&config, &name, page)
                    .map_err(|e| internal(e.to_string()))?;
                events.extend(routed);
                if !full || events.len() >= limit {
                    break;
                }
            }
            events.truncate(limit);
            let file = tempfile::Builder::new()
                .prefix("candidate-")
                .suffix(".wasm")
                .tempfile()
                .and_then(|mut file| {
                    std::io::Write::write_all(&mut file, &body)?;
                    Ok(file)
                })
                .map_err(|e| internal(format!("cannot keep the candidate: {e}")))?;
            let runtime = crate::runtime::Runtime::new(crate::runtime::RuntimeConfig {
                pooling: false,
                ..config.runtime_config()
            })
            .map_err(|e| internal(e.to_string()))?;
            let base = Some(appliance.kv_store());
            let running =
                crate::replay::Offline::load(&runtime, &config, &name, None, base.clone())
                    .map_err(|e| {
                        (
                            StatusCode::CONFLICT,
                            format!("the running version cannot load: {e:#}"),
                        )
                    })?;
            let candidate =
                crate::replay::Offline::load(&runtime, &config, &name, Some(file.path()), base)
                    .map_err(|e| {
                        let why = format!("{e:#}")
                            .replace(&file.path().display().to_string(), "the candidate");
                        (
                            StatusCode::UNPROCESSABLE_ENTITY,
                            format!("the candidate cannot load: {why}"),
                        )
                    })?;
            let report = crate::replay::diff(&running, &candidate, &events);
            Ok(json!({"summary": report.summary, "differing": report.differing}))
        })();
        DIFFING.store(false, std::sync::atomic::Ordering::SeqCst);
        report
    });
    match run.await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err((status, why))) => error(status, why),
        Err(_) => {
            DIFFING.store(false, std::sync::atomic::Ordering::SeqCst);
            error(StatusCode::INTERNAL_SERVER_ERROR, "the diff task failed")
        }
    }
}
