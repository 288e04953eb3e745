//! The admin token: `Authorization: Bearer <token>` when `[http] token` (or
//! `SWITCHBOARD_ADMIN_TOKEN`) is set. Read from the running configuration on
//! every request, so a reload that rotates the token applies at once.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::appliance::Appliance;

/// Whether `request` carries the configured token (true when none is configured).
fn authorized(appliance: &Appliance, request: &Request) -> bool {
    let config = appliance.config();
    let Some(token) = &config.http.token else {
        return true;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    given.is_some_and(|given| {
        constant_time_eq::constant_time_eq(given.as_bytes(), token.expose().trim().as_bytes())
    })
}

/// The refusal. It also closes the connection, and says so: the request's body
/// was never read, so the connection cannot carry another request, and a client
/// that was not told would send its next one into a closed socket.
fn unauthorized() -> Response {
    let mut response = super::error(
        StatusCode::UNAUTHORIZED,
        "this endpoint needs the admin token: Authorization: Bearer <token>",
    );
    let headers = response.headers_mut();
    headers.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"switchboard\""),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Ingress and everything that changes state.
pub(super) async fn require_for_writes(
    State(appliance): State<Appliance>,
    request: Request,
    next: Next,
) -> Response {
    if authorized(&appliance, &request) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

/// Reads, when `[http] protect_reads` is on.
pub(super) async fn require_for_reads(
    State(appliance): State<Appliance>,
    request: Request,
    next: Next,
) -> Response {
    if !appliance.config().http.protect_reads || authorized(&appliance, &request) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

/// Whether `request` may take an operator action (redrive, reload, replay, a
/// kv write): with a token configured, when it carries the token; without one,
/// when it comes from this machine (loopback), so that an open port does not
/// let anyone on the network act.
pub(super) fn may_act(appliance: &Appliance, request: &Request) -> bool {
    if appliance.config().http.token.is_some() {
        authorized(appliance, request)
    } else {
        super::console::peer(request).is_some_and(|peer| peer.ip().to_canonical().is_loopback())
    }
}

/// Operator actions: see [`may_act`].
pub(super) async fn require_for_actions(
    State(appliance): State<Appliance>,
    request: Request,
    next: Next,
) -> Response {
    if may_act(&appliance, &request) {
        next.run(request).await
    } else if appliance.config().http.token.is_some() {
        unauthorized()
    } else {
        super::error(
            StatusCode::FORBIDDEN,
            "without [http] token, actions (redrive, reload, replay, diff, kv writes) are allowed \
             only from this machine (loopback); set a token to act from elsewhere",
        )
    }
}
