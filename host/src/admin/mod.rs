//! The HTTP interface: event ingress, a live stream of what is published, health
//! for Kubernetes probes, plugin status and dead letters.
//!
//! | method | path | |
//! |---|---|---|
//! | POST | `/events/{exchange}/{routing_key}` | publish an event (envelope, CloudEvent, or any JSON as data) → 202 `{"id"}`; 503 + `Retry-After` when a queue is full |
//! | GET | `/events/stream?exchange=…&match=…` | server-sent events: every message published (ingress and outputs) matching the exchange and topic pattern |
//! | GET | `/healthz` | the process is alive |
//! | GET | `/metrics` | Prometheus metrics (OpenMetrics text) |
//! | GET | `/readyz` | ready for traffic (503 while shutting down) |
//! | GET | `/plugins` | each plugin's state, version, last load error, queue counters |
//! | GET | `/dlq/{plugin}` | the plugin's dead letters with their reasons |
//! | POST | `/dlq/{plugin}/redrive?limit=N` | move dead letters back to the plugin's queue |
//! | GET | `/api/plugins` | each plugin: content hash, loaded at, routes, limits, status, last error |
//! | GET | `/api/routes` | every route: exchange, kind, pattern, plugin |
//! | GET | `/api/dlq/{plugin}?offset=&limit=` | a page of dead letters with their reasons |
//! | POST | `/api/dlq/{plugin}/redrive?limit=N` | as `/dlq/{plugin}/redrive`; with a body `{"ids": [event ids]}`, those letters → `{"redriven", "not_found"}` |
//! | POST | `/api/plugins/{name}/reload` | load the plugin's file again |
//! | GET | `/api/kv/{plugin}/{key}` | one value of a plugin's kv state: `{"plugin", "key", "value"}` (or `"text"`, `"base64"`); `404` when absent |
//! | PUT, DELETE | `/api/kv/{plugin}/{key}` | set (the body is the value) or delete it; `204` once durable |
//! | POST | `/api/plugins/{name}/replay?id=R` | `{"events": [archived…]}` into the plugin's queue again, marked `switchboard-replay: R` (`switchboard replay --publish`) |
//! | POST | `/api/plugins/{name}/diff?aggregate=&match=&since=&until=&limit=` | the body (a candidate `.wasm`) against the running version over archived events, offline: `switchboard replay --diff` → `{"summary", "differing"}` |
//! | GET | `/api/events?exchange=&match=&aggregate=&since=&until=&after=&limit=` | archived events, oldest first (`[archive]`); `next_after` pages on |
//!
//! | GET | `/ui/` | the console (`/` redirects there) |
//! | GET | `/api/console` | for the console: token configured, may this request act, bus, archive |
//! | GET | `/api/routes/match?exchange=E&key=K` | which plugins get E with K, and why not the others |
//! | GET | `/api/plugins/{name}/logs` | the newest lines the plugin logged |
//!
//! With `[http] token`, ingress and every POST need `Authorization: Bearer
//! <token>` (401 without); with `protect_reads` too, every GET but the probes
//! and the console's files. Without a token, operator actions (redrive,
//! reload, replay, kv writes) are taken only from loopback (403 otherwise).

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine as _;
use futures::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

pub(crate) mod api;
mod auth;
mod console;

use crate::appliance::{Appliance, IngressError};
use crate::bus::DeadLetter;
use crate::route::TopicPattern;

/// Largest batch `POST /api/plugins/{name}/replay` takes.
const MAX_REPLAY_BODY: usize = 64 << 20;
/// Largest candidate component `POST /api/plugins/{name}/diff` takes.
const MAX_CANDIDATE: usize = 128 << 20;

/// The router serving every endpoint.
pub fn router(appliance: Appliance) -> Router {
    // Ingress: the token, whenever one is configured.
    let ingress_routes = Router::new()
        .route("/events/{exchange}/{routing_key}", post(ingress))
        .route_layer(middleware::from_fn_with_state(
            appliance.clone(),
            auth::require_for_writes,
        ));
    // Operator actions: the token when one is configured, else only from
    // loopback.
    let actions = Router::new()
        .route("/dlq/{plugin}/redrive", post(redrive))
        .route("/api/dlq/{plugin}/redrive", post(redrive))
        .route("/api/plugins/{name}/reload", post(api::reload))
        .route(
            "/api/plugins/{name}/replay",
            post(api::replay).layer(DefaultBodyLimit::max(MAX_REPLAY_BODY)),
        )
        .route(
            "/api/plugins/{name}/diff",
            post(api::diff).layer(DefaultBodyLimit::max(MAX_CANDIDATE)),
        )
        .route(
            "/api/kv/{plugin}/{key}",
            put(api::kv_put).delete(api::kv_delete),
        )
        .route_layer(middleware::from_fn_with_state(
            appliance.clone(),
            auth::require_for_actions,
        ));
    // Reading: the token when `protect_reads` says so.
    let reads = Router::new()
        .route("/events/stream", get(stream))
        .route("/metrics", get(metrics))
        .route("/plugins", get(plugins))
        .route("/dlq/{plugin}", get(dead_letters))
        .route("/api/plugins", get(api::plugins))
        .route("/api/routes", get(api::routes))
        .route("/api/routes/match", get(console::route_match))
        .route("/api/plugins/{name}/logs", get(console::logs))
        .route("/api/console", get(console::info))
        .route("/api/dlq/{plugin}", get(api::dead_letters))
        .route("/api/events", get(api::events))
        .route("/api/kv/{plugin}/{key}", get(api::kv_get))
        .route_layer(middleware::from_fn_with_state(
            appliance.clone(),
            auth::require_for_reads,
        ));
    // Probes: always open.
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/", get(console::root))
        .route("/ui", get(console::root))
        .route("/ui/", get(|| console::asset(None)))
        .route(
            "/ui/{file}",
            get(|file: Path<String>| console::asset(Some(file))),
        )
        .merge(ingress_routes)
        .merge(actions)
        .merge(reads)
        .with_state(appliance)
}

pub(crate) fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({"error": message.to_string()}))).into_response()
}

async fn ingress(
    State(appliance): State<Appliance>,
    Path((exchange, routing_key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let content_type = content_type.map(str::to_string);
    // W3C trace context rides along as message headers, on to every output.
    let trace: Vec<(String, String)> = crate::envelope::TRACE_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(*name)?.to_str().ok()?.trim();
            (!value.is_empty() && value.len() <= 512)
                .then(|| ((*name).to_string(), value.to_string()))
        })
        .collect();
    // On RabbitMQ an ingress waits for the broker's confirm: off the async threads.
    let accepted = {
        let appliance = appliance.clone();
        tokio::task::spawn_blocking(move || {
            appliance.ingress_with(
                &exchange,
                &routing_key,
                &body,
                content_type.as_deref(),
                &trace,
            )
        })
        .await
    };
    let Ok(accepted) = accepted else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "the ingress task failed");
    };
    match accepted {
        Ok(id) => (StatusCode::ACCEPTED, Json(json!({"id": id}))).into_response(),
        Err(e @ (IngressError::Full(_) | IngressError::Closed)) => {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, e);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
        Err(e @ IngressError::NoSuchExchange(_)) => error(StatusCode::NOT_FOUND, e),
        Err(e @ IngressError::BadEvent(_)) => error(StatusCode::BAD_REQUEST, e),
        Err(e @ IngressError::Bus(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

#[derive(Debug, Deserialize)]
struct StreamQuery {
    exchange: Option<String>,
    #[serde(rename = "match")]
    pattern: Option<String>,
}

async fn stream(
    State(appliance): State<Appliance>,
    Query(query): Query<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>> + use<>>, Response> {
    let pattern = match &query.pattern {
        Some(p) => Some(TopicPattern::parse(p).map_err(|e| error(StatusCode::BAD_REQUEST, e))?),
        None => None,
    };
    let exchange = query.exchange;
    let closed = appliance.closed();
    let events = BroadcastStream::new(appliance.transport().subscribe_stream()).filter_map(move |item| {
        match item {
            Ok(published) => {
                let wanted = exchange.as_ref().is_none_or(|e| *e == published.exchange)
                    && pattern.as_ref().is_none_or(|p| p.matches(&published.routing_key));
                wanted.then(|| {
                    let body = &published.message.body;
                    let data = match serde_json::from_slice::<Value>(body) {
                        Ok(json) => json,
                        Err(_) => json!({"body_base64": base64::engine::general_purpose::STANDARD.encode(body)}),
                    };
                    let line = json!({
                        "exchange": published.exchange,
                        "routing_key": published.routing_key,
                        "message": data,
                    });
                    Ok(SseEvent::default().event(published.routing_key.clone()).data(line.to_string()))
                })
            }
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                Some(Ok(SseEvent::default().comment(format!("lagged: {n} messages skipped"))))
            }
        }
    });
    // Streams never end by themselves: end them when ingress stops, or a
    // graceful shutdown would wait for every watcher to hang up.
    let events = futures::StreamExt::take_until(events, closed);
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

async fn ready(State(appliance): State<Appliance>) -> Response {
    if !appliance.accepting() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let transport = appliance.transport().clone();
    let ready = tokio::task::spawn_blocking(move || match &transport {
        crate::appliance::Transport::Rabbit(bus) if !bus.is_ready() => Err(bus
            .status()
            .error
            .unwrap_or_else(|| "not connected to the broker".into())),
        _ => Ok(()),
    })
    .await;
    match ready {
        Ok(Ok(())) => (StatusCode::OK, "ready").into_response(),
        Ok(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("broker: {why}")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "readiness check failed").into_response(),
    }
}

async fn metrics(State(appliance): State<Appliance>) -> Response {
    // Reading queue figures may ask the broker: off the async threads.
    match tokio::task::spawn_blocking(move || appliance.metrics_text()).await {
        Ok(text) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the metrics task failed"),
    }
}

async fn plugins(State(appliance): State<Appliance>) -> Response {
    match tokio::task::spawn_blocking(move || appliance.statuses()).await {
        Ok(statuses) => Json(statuses).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the status task failed"),
    }
}

#[derive(Debug, Deserialize)]
struct DeadLetterQuery {
    limit: Option<usize>,
}

/// The first `count` dead letters of a configured plugin, read off the async
/// threads (on RabbitMQ it asks the broker); `Err` is the response to give.
pub(crate) async fn fetch_dead_letters(
    appliance: &Appliance,
    plugin: &str,
    count: usize,
) -> Result<Vec<DeadLetter>, Response> {
    if !appliance.config().plugins.contains_key(plugin) {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("no plugin {plugin:?} is configured"),
        ));
    }
    let transport = appliance.transport().clone();
    let plugin = plugin.to_string();
    match tokio::task::spawn_blocking(move || transport.dead_letters(&plugin, count)).await {
        Ok(Ok(letters)) => Ok(letters),
        Ok(Err(e)) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e)),
        Err(_) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the dead-letter task failed",
        )),
    }
}

async fn dead_letters(
    State(appliance): State<Appliance>,
    Path(plugin): Path<String>,
    Query(query): Query<DeadLetterQuery>,
) -> Response {
    match fetch_dead_letters(&appliance, &plugin, query.limit.unwrap_or(1000)).await {
        Ok(letters) => Json(
            letters
                .iter()
                .map(DeadLetter::to_json)
                .collect::<Vec<Value>>(),
        )
        .into_response(),
        Err(response) => response,
    }
}

#[derive(Debug, Deserialize)]
struct RedriveQuery {
    limit: Option<usize>,
}

/// The body of a redrive: `{"ids": [...]}` picks letters; no body, or one
/// without `ids` (say `{}`), redrives by `limit`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveBody {
    ids: Option<std::collections::BTreeSet<String>>,
}

/// `POST /api/dlq/{plugin}/redrive`: the oldest `limit` letters (all without
/// it), or with a body `{"ids": [...]}` the letters of those events
/// (`{"redriven": n, "not_found": [ids no letter has]}`).
async fn redrive(
    State(appliance): State<Appliance>,
    Path(plugin): Path<String>,
    Query(query): Query<RedriveQuery>,
    body: Bytes,
) -> Response {
    let transport = appliance.transport().clone();
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        RedriveBody::default()
    } else {
        match serde_json::from_slice::<RedriveBody>(&body) {
            Ok(body) => body,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("the body must be {{\"ids\": [\"<event id>\", …]}} or none: {e}"),
                );
            }
        }
    };
    let ids = match body.ids {
        None => {
            let limit = query.limit.unwrap_or(usize::MAX);
            let moved = tokio::task::spawn_blocking(move || transport.redrive(&plugin, limit));
            return match moved.await {
                Ok(Ok(moved)) => Json(json!({"redriven": moved})).into_response(),
                Ok(Err(e)) => redrive_refused(e),
                Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the redrive task failed"),
            };
        }
        Some(_) if query.limit.is_some() => {
            return error(
                StatusCode::BAD_REQUEST,
                "give either ?limit or a body of ids, not both",
            );
        }
        Some(ids) if ids.is_empty() => {
            return error(StatusCode::BAD_REQUEST, "\"ids\" names no letter");
        }
        Some(ids) => ids,
    };
    let done = tokio::task::spawn_blocking(move || {
        let moved = transport.redrive_ids(&plugin, &ids)?;
        let not_found: Vec<&String> = ids.iter().filter(|id| !moved.contains(id)).collect();
        Ok::<_, crate::bus::BusError>(json!({"redriven": moved.len(), "not_found": not_found}))
    });
    match done.await {
        Ok(Ok(reply)) => Json(reply).into_response(),
        Ok(Err(e)) => redrive_refused(e),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the redrive task failed"),
    }
}

fn redrive_refused(e: crate::bus::BusError) -> Response {
    match e {
        e @ crate::bus::BusError::NoSuchQueue(_) => error(StatusCode::NOT_FOUND, e),
        e => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}
