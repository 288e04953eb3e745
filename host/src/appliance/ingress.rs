//! Ingress: events from outside (HTTP) onto the bus, refused (never dropped)
//! when a destination queue is full or the appliance is shutting down.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Appliance;
use crate::bus::{BusError, Outgoing};
use crate::envelope::{self, EnvelopeError};

/// Why an ingress publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("{0}")]
    BadEvent(#[from] EnvelopeError),
    #[error("exchange {0:?} is not declared")]
    NoSuchExchange(String),
    #[error("queue of plugin {0:?} is full; try again shortly")]
    Full(String),
    #[error("shutting down")]
    Closed,
    #[error("{0}")]
    Bus(BusError),
}

impl Appliance {
    /// Publishes an event from outside (HTTP). Refused, never dropped, when a
    /// destination queue is full or the appliance is shutting down.
    pub fn ingress(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<String, IngressError> {
        self.ingress_with(exchange, routing_key, body, content_type, &[])
    }

    /// [`Appliance::ingress`] with message headers, e.g. the request's W3C
    /// `traceparent` and `tracestate`, which then flow on to every output.
    pub fn ingress_with(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        content_type: Option<&str>,
        headers: &[(String, String)],
    ) -> Result<String, IngressError> {
        if !self.inner.accepting.load(Ordering::SeqCst) {
            return Err(IngressError::Closed);
        }
        let (mut message, id) = envelope::ingress_message(routing_key, body, content_type)?;
        for (name, value) in headers {
            if !message.headers.iter().any(|(k, _)| k == name) {
                message.headers.push((name.clone(), value.clone()));
            }
        }
        let out = Outgoing {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            message,
        };
        match self.inner.bus.as_bus().publish(vec![out], Duration::ZERO) {
            Ok(()) => Ok(id),
            Err(BusError::Full { plugin }) => Err(IngressError::Full(plugin)),
            Err(BusError::NoSuchExchange(e)) => Err(IngressError::NoSuchExchange(e)),
            Err(e) => Err(IngressError::Bus(e)),
        }
    }

    /// Whether ingress is open.
    pub fn accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::SeqCst)
    }

    /// Stops ingress (503 from now on) and ends live streams. Workers go on.
    pub fn stop_ingress(&self) {
        self.inner.accepting.store(false, Ordering::SeqCst);
        self.inner.closing.send_replace(true);
    }

    /// Resolves once ingress has stopped.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static + use<> {
        let mut rx = self.inner.closing.subscribe();
        async move {
            let _ = rx.wait_for(|closing| *closing).await;
        }
    }
}
