//! The connections to the broker, owned by a supervisor task: one for
//! consuming (and declaring), one for publishing, as RabbitMQ advises. A broker
//! under a resource alarm blocks every connection that publishes, reading
//! nothing more from it; on a shared connection the acks of events already
//! handled would wait too, and no consumer could be told anything. The
//! supervisor connects both (TLS for `amqps://`, an optional custom CA),
//! declares the configured topology, and when either dies reconnects with
//! backoff and declares again. Every other part waits for the next session
//! ([`wait_session`]) rather than failing at once, each wait bounded by
//! `[broker] timeout`. Credentials never reach a log line or an error: library
//! errors are scrubbed of the URL and the password.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::{Connection, ConnectionProperties};

use super::publish::Publishers;
use super::{Inner, RabbitSettings, lock, topology};

/// One connected session: the consuming connection, and the publishing one
/// with its channels.
pub(super) struct Session {
    /// Consumers, acks, declarations and broker queries.
    pub(super) connection: Connection,
    /// Publishes (outputs, retry and dead-letter copies, ingress).
    pub(super) publishing: Connection,
    pub(super) publishers: Publishers,
}

impl Session {
    pub(super) fn live(&self) -> bool {
        self.connection.status().connected() && self.publishing.status().connected()
    }
}

/// Opens a connection (TLS per the URL's scheme, with the custom CA if any).
/// The error is safe to show: the URL's credentials are scrubbed from it.
pub async fn connect(settings: &RabbitSettings, name: &str) -> Result<Connection, String> {
    let url = settings.url.expose();
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let tls = match &settings.ca_file {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read broker.ca_file {}: {e}", path.display()))?;
            lapin::tcp::OwnedTLSConfig {
                identity: None,
                cert_chain: Some(pem),
            }
        }
        None => lapin::tcp::OwnedTLSConfig::default(),
    };
    let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
    let connecting = Connection::connect_with_config(url, properties, tls, runtime);
    match tokio::time::timeout(settings.timeout.max(Duration::from_secs(1)), connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(format!(
            "cannot connect to {}: {}",
            settings.url,
            settings.url.scrub(&refused(&e))
        )),
        Err(_) => Err(format!(
            "cannot connect to {}: no answer within {:?}",
            settings.url, settings.timeout
        )),
    }
}

/// Why a connection could not be opened, in one sentence. `ACCESS_REFUSED`
/// while connecting is the broker refusing the login (RabbitMQ's own text
/// names only the mechanism, "Login was refused using authentication mechanism
/// PLAIN").
fn refused(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            ) =>
        {
            "authentication refused (check the user name and password)".into()
        }
        _ => super::describe(e),
    }
}

/// Waits for a live session, at most until `deadline`.
pub(super) async fn wait_session(
    inner: &Inner,
    deadline: Instant,
) -> Result<Arc<Session>, crate::bus::BusError> {
    use crate::bus::BusError;
    let mut sessions = inner.sessions.subscribe();
    loop {
        if let Some(session) = inner.session.load_full()
            && session.live()
        {
            return Ok(session);
        }
        if inner.closing.load(Ordering::SeqCst) {
            return Err(BusError::Closed);
        }
        let why = lock(&inner.link)
            .error
            .clone()
            .unwrap_or_else(|| "connecting".into());
        match tokio::time::timeout_at(deadline.into(), sessions.changed()).await {
            Err(_) => {
                return Err(BusError::Unavailable(format!(
                    "not connected to the broker ({why})"
                )));
            }
            Ok(Err(_)) => return Err(BusError::Closed),
            Ok(Ok(())) => {}
        }
    }
}

/// The connection supervisor: connect, declare, serve until the connection
/// dies, and again, with backoff, until the bus closes.
pub(super) async fn supervise(inner: Arc<Inner>) {
    let mut delay = Duration::from_millis(100);
    let mut first = true;
    while !inner.closing.load(Ordering::SeqCst) {
        let connected = match connect(&inner.settings, "switchboard").await {
            Ok(connection) => connect(&inner.settings, "switchboard publisher")
                .await
                .map(|publishing| (connection, publishing)),
            Err(e) => Err(e),
        };
        let (connection, publishing) = match connected {
            Ok(both) => both,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "broker connection failed");
                lock(&inner.link).error = Some(e);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        delay = Duration::from_millis(100);
        let session = Arc::new(Session {
            connection,
            publishing,
            publishers: Publishers::default(),
        });
        let declared = declare(&inner, &session).await;
        {
            let mut link = lock(&inner.link);
            link.connected = true;
            link.declared = declared.is_ok();
            link.error = declared.err();
            if !first {
                link.reconnects += 1;
            }
        }
        first = false;
        tracing::info!(url = %inner.settings.url, "connected to the broker");
        inner.blocked.send_replace(None);
        inner.session.store(Some(session.clone()));
        inner.sessions.send_modify(|g| *g += 1);

        let mut events = futures::stream::select(
            session.connection.events_listener(),
            session.publishing.events_listener(),
        );
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                event = events.next() => match event {
                    // A channel closed by the broker (a publish to a missing
                    // exchange, a passive declare of a missing queue) is that
                    // channel's business, not the connection's.
                    Some(lapin::Event::Error(e)) if e.is_amqp_soft_error() && session.live() => {
                        tracing::debug!(error = %e, "a channel was closed by the broker");
                    }
                    Some(lapin::Event::Error(e)) => {
                        tracing::warn!(error = %inner.settings.url.scrub(&super::describe(&e)), "broker connection lost");
                        break;
                    }
                    Some(lapin::Event::ConnectionBlocked(reason)) => {
                        tracing::warn!(reason = %reason, "the broker blocks publishing (resource alarm); outputs wait");
                        inner.blocked.send_replace(Some(reason));
                    }
                    Some(lapin::Event::ConnectionUnblocked) => {
                        tracing::info!("the broker takes publishes again");
                        inner.blocked.send_replace(None);
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = tick.tick() => {
                    if !session.live() || inner.closing.load(Ordering::SeqCst) {
                        break;
                    }
                }
            }
        }
        if inner.closing.load(Ordering::SeqCst) {
            break;
        }
        // Both go: a session is the pair. A close waits for the broker's
        // answer, which a dead connection never gives: bounded.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = session.connection.close(200, "reconnecting".into()).await;
            let _ = session.publishing.close(200, "reconnecting".into()).await;
        })
        .await;
        {
            let mut link = lock(&inner.link);
            link.connected = false;
            link.declared = false;
            link.error = Some("connection lost; reconnecting".into());
        }
        inner.session.store(None);
        inner.sessions.send_modify(|g| *g += 1);
        tracing::warn!("broker connection lost; reconnecting");
    }
}

/// Declares the desired topology on `session` and records what it declared.
pub(super) async fn declare(inner: &Inner, session: &Session) -> Result<(), String> {
    let desired = lock(&inner.desired).clone();
    let draining = lock(&inner.retired).clone();
    let mut declared = inner.declared.lock().await;
    let deadline = inner.settings.timeout * 4;
    let result = tokio::time::timeout(
        deadline,
        topology::declare(
            &session.connection,
            &inner.names,
            topology::QueueSettings {
                queue_type: inner.settings.queue_type,
                dlq: inner.settings.dlq,
            },
            &desired,
            &draining,
            &declared,
        ),
    )
    .await
    .unwrap_or_else(|_| {
        Err(format!(
            "declaring the topology took longer than {deadline:?}"
        ))
    });
    match result {
        Ok(now) => {
            if let Some(path) = &inner.settings.state_file {
                now.save(path);
            }
            *declared = now;
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "the broker refused the topology");
            Err(e)
        }
    }
}

/// Declares the topology again, in the background, once at a time: something
/// it names went missing on the broker (a queue or exchange deleted by hand).
/// Everything in it is declared idempotently, so this only puts back what is
/// gone.
pub(super) fn redeclare(inner: &Arc<Inner>, why: &str) {
    if inner.redeclaring.swap(true, Ordering::SeqCst) {
        return;
    }
    tracing::warn!(reason = why, "declaring the topology again");
    let inner = inner.clone();
    inner.handle.clone().spawn(async move {
        if let Some(session) = inner.session.load_full().filter(|s| s.live())
            && let Err(e) = declare(&inner, &session).await
        {
            tracing::warn!(error = %e, "could not declare the topology again");
        }
        // At most one declaration a second, however often things go missing.
        tokio::time::sleep(Duration::from_secs(1)).await;
        inner.redeclaring.store(false, Ordering::SeqCst);
    });
}
