//! The boundary: WIT types in, [`Plugin::handle`] on plain SDK types, WIT types
//! out. [`export!`](crate::export) makes the component's `handle` export call
//! [`handle`] here.

use crate::bindings as wit;
use crate::{Event, Failure, Output, Plugin};

/// Runs `P` on one event from the host.
pub fn handle<P: Plugin>(event: wit::Event) -> Result<Vec<wit::Output>, wit::Failure> {
    match P::handle(event_from_wit(event)) {
        Ok(outputs) => Ok(outputs.into_iter().map(output_to_wit).collect()),
        Err(failure) => Err(failure_to_wit(failure)),
    }
}

fn event_from_wit(e: wit::Event) -> Event {
    Event {
        id: e.id,
        kind: e.kind,
        exchange: e.exchange,
        attempt: e.attempt,
        source: e.source,
        time: e.time,
        correlation_id: e.correlation_id,
        causation_id: e.causation_id,
        tenant_id: e.tenant_id,
        content_type: e.content_type,
        data: e.data,
        headers: e.headers,
    }
}

fn output_to_wit(o: Output) -> wit::Output {
    wit::Output {
        kind: o.kind,
        content_type: o.content_type,
        data: o.data,
        exchange: o.exchange,
        headers: o.headers,
    }
}

fn failure_to_wit(f: Failure) -> wit::Failure {
    match f {
        Failure::Retry(m) => wit::Failure::Retry(m),
        Failure::Reject(m) => wit::Failure::Reject(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    impl Plugin for Echo {
        fn handle(event: Event) -> Result<Vec<Output>, Failure> {
            match event.kind.as_str() {
                "fail.retry" => Err(Failure::retry(event.id)),
                "fail.reject" => Err(Failure::reject(event.id)),
                _ => Ok(vec![
                    Output::bytes(
                        format!("{}.echo", event.kind),
                        event.content_type.clone(),
                        event.data.clone(),
                    )
                    .to_exchange(event.exchange.clone())
                    .with_header("attempt", event.attempt.to_string())
                    .with_header("tenant", event.tenant_id.clone().unwrap_or_default())
                    .with_header("causation", event.causation_id.clone().unwrap_or_default()),
                ]),
            }
        }
    }

    fn wit_event(kind: &str) -> wit::Event {
        wit::Event {
            id: "e-7".into(),
            kind: kind.into(),
            exchange: "orders".into(),
            attempt: 3,
            source: "shop".into(),
            time: "2025-05-01T00:00:00Z".into(),
            correlation_id: Some("c".into()),
            causation_id: Some("cause".into()),
            tenant_id: Some("acme".into()),
            content_type: "text/plain".into(),
            data: b"hi".to_vec(),
            headers: vec![("h".into(), "v".into())],
        }
    }

    #[test]
    fn every_field_crosses_the_boundary() {
        let event = event_from_wit(wit_event("order.created"));
        assert_eq!(
            event,
            Event {
                id: "e-7".into(),
                kind: "order.created".into(),
                exchange: "orders".into(),
                attempt: 3,
                source: "shop".into(),
                time: "2025-05-01T00:00:00Z".into(),
                correlation_id: Some("c".into()),
                causation_id: Some("cause".into()),
                tenant_id: Some("acme".into()),
                content_type: "text/plain".into(),
                data: b"hi".to_vec(),
                headers: vec![("h".into(), "v".into())],
            }
        );

        let outputs = handle::<Echo>(wit_event("order.created")).unwrap();
        assert_eq!(outputs.len(), 1);
        let out = &outputs[0];
        assert_eq!(out.kind, "order.created.echo");
        assert_eq!(out.content_type.as_deref(), Some("text/plain"));
        assert_eq!(out.data, b"hi");
        assert_eq!(out.exchange.as_deref(), Some("orders"));
        assert_eq!(
            out.headers,
            vec![
                ("attempt".into(), "3".into()),
                ("tenant".into(), "acme".into()),
                ("causation".into(), "cause".into())
            ]
        );
    }

    #[test]
    fn failures_keep_their_verdict() {
        assert!(matches!(
            handle::<Echo>(wit_event("fail.retry")),
            Err(wit::Failure::Retry(m)) if m == "e-7"
        ));
        assert!(matches!(
            handle::<Echo>(wit_event("fail.reject")),
            Err(wit::Failure::Reject(m)) if m == "e-7"
        ));
    }
}
