//! The console: a page at `/ui/` for people, over the same API as everything
//! else. Its three files are compiled into the binary, so it needs nothing at
//! run time; `SWITCHBOARD_CONSOLE_DIR` serves them from a folder instead, read on
//! each request, for working on them without rebuilding.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{auth, error};
use crate::appliance::Appliance;
use crate::route::{Binding, RouteTable};

/// Each file: its name under `/ui/`, its content type and its text.
const ASSETS: [(&str, &str, &str); 3] = [
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("console/index.html"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("console/console.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("console/console.css"),
    ),
];

/// `GET /`: the console.
pub(super) async fn root() -> Redirect {
    Redirect::to("/ui/")
}

/// `GET /ui/` and `GET /ui/{file}`.
pub(super) async fn asset(file: Option<Path<String>>) -> Response {
    let name = file.map_or_else(|| "index.html".to_string(), |Path(f)| f);
    let Some((name, content_type, embedded)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return error(StatusCode::NOT_FOUND, format!("no console file {name:?}"));
    };
    let text = match std::env::var_os("SWITCHBOARD_CONSOLE_DIR") {
        Some(dir) => match std::fs::read_to_string(std::path::Path::new(&dir).join(name)) {
            Ok(text) => text,
            Err(e) => return error(StatusCode::NOT_FOUND, format!("{name}: {e}")),
        },
        None => (*embedded).to_string(),
    };
    let mut response = text.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'",
        ),
    );
    response
}

/// `GET /api/console`: what the page needs to know about this router and this
/// request: whether a token is configured, whether this request may act
/// (redrive, reload), the bus, whether there is an archive.
pub(super) async fn info(State(appliance): State<Appliance>, request: Request) -> Response {
    let config = appliance.config();
    let bus = match appliance.transport() {
        crate::appliance::Transport::Embedded(_) => "embedded",
        crate::appliance::Transport::Rabbit(_) => "rabbitmq",
        crate::appliance::Transport::Redis(_) => "redis-streams",
    };
    Json(json!({
        "token_required": config.http.token.is_some(),
        "actions_allowed": auth::may_act(&appliance, &request),
        "bus": bus,
        "archive": config.archive.enabled,
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
pub(super) struct MatchQuery {
    exchange: String,
    key: String,
}

/// `GET /api/routes/match?exchange=E&key=K`: which plugins an event published
/// to E with routing key K goes to, through the router's own matcher, and for
/// every other plugin why not.
pub(super) async fn route_match(
    State(appliance): State<Appliance>,
    Query(q): Query<MatchQuery>,
) -> Response {
    let config = appliance.config();
    let Some(exchange) = config.exchange(&q.exchange) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no exchange {:?} in router.toml", q.exchange),
        );
    };
    let kind = exchange.kind;
    // The bindings the bus is given (enabled plugins only), and the table it
    // routes with: the destinations are the router's own answer.
    let bindings: Vec<Binding> = crate::appliance::plan::topology(&config)
        .bindings
        .into_iter()
        .filter(|b| b.exchange == q.exchange)
        .collect();
    let destinations = RouteTable::new(bindings.iter().cloned())
        .map(|t| t.destinations(&q.exchange, &q.key))
        .unwrap_or_default();
    let plugins: Vec<Value> = config
        .plugins
        .iter()
        .map(|(plugin, settings)| {
            let patterns: Vec<&str> = bindings
                .iter()
                .filter(|b| b.plugin == *plugin)
                .map(|b| b.pattern.as_str())
                .collect();
            let matched = destinations.iter().any(|d| **d == **plugin);
            let why = if !settings.enabled {
                "disabled in router.toml (enabled = false)".to_string()
            } else if matched && kind == crate::route::ExchangeKind::Fanout {
                format!("route on {}: a fanout exchange: every key", q.exchange)
            } else if matched {
                // Which of its patterns: each alone through the same matcher.
                let pattern = bindings
                    .iter()
                    .filter(|b| b.plugin == *plugin)
                    .find(|b| {
                        RouteTable::new([(*b).clone()])
                            .is_ok_and(|t| !t.destinations(&q.exchange, &q.key).is_empty())
                    })
                    .map_or("", |b| b.pattern.as_str());
                format!("route on {}: {pattern:?} matches {:?}", q.exchange, q.key)
            } else if patterns.is_empty() {
                format!("no route from exchange {:?}", q.exchange)
            } else {
                format!(
                    "its {} on {} ({}) do not match {:?}",
                    if patterns.len() == 1 {
                        "pattern"
                    } else {
                        "patterns"
                    },
                    q.exchange,
                    patterns
                        .iter()
                        .map(|p| format!("{p:?}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    q.key
                )
            };
            json!({"plugin": plugin, "matched": matched, "why": why})
        })
        .collect();
    Json(json!({
        "exchange": q.exchange,
        "kind": kind,
        "key": q.key,
        "plugins": plugins,
    }))
    .into_response()
}

/// `GET /api/plugins/{name}/logs`: the newest lines the plugin logged (at most
/// [`crate::runtime::RECENT_LINES`]), oldest first, whatever the log filter.
pub(super) async fn logs(State(appliance): State<Appliance>, Path(name): Path<String>) -> Response {
    if !appliance.config().plugins.contains_key(&name) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no plugin {name:?} is configured"),
        );
    }
    Json(json!({"plugin": name, "lines": appliance.recent_logs(&name)})).into_response()
}

/// Whether a config key looks like it holds a secret.
pub(super) fn secret_looking(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "key",
        "credential",
        "auth",
        "private",
        "cert",
        "dsn",
        "url",
    ]
    .iter()
    .any(|word| key.contains(word))
}

/// A plugin's `config`, its secret-looking values masked.
pub(super) fn masked_config(config: &std::collections::BTreeMap<String, String>) -> Value {
    config
        .iter()
        .map(|(k, v)| {
            let shown = if secret_looking(k) {
                "••••"
            } else {
                v.as_str()
            };
            (k.clone(), Value::String(shown.to_string()))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The peer of a connection, when the server recorded it.
pub(super) fn peer(request: &Request) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_looking_keys_are_masked_and_the_rest_shown() {
        let config = [
            ("api_key", "k-123"),
            ("SMTP_PASSWORD", "hunter2"),
            ("webhook_url", "https://user:pw@example.com"),
            ("template", "bill.paid"),
            ("forward", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let shown = masked_config(&config);
        assert_eq!(shown["template"], "bill.paid");
        assert_eq!(shown["forward"], "false");
        for k in ["api_key", "SMTP_PASSWORD", "webhook_url"] {
            assert_eq!(shown[k], "••••", "{k}");
        }
        assert!(!shown.to_string().contains("hunter2"));
    }
}
