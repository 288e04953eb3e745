//! A message as a bus carries it: a body and AMQP-style properties. Both buses
//! (embedded and RabbitMQ) move these; `envelope` turns them into events.

use bytes::Bytes;

/// One message on a bus. Cheap to clone (the body is shared), since a topic
/// exchange may deliver one message to several plugin queues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// The payload.
    pub body: Bytes,
    /// MIME type of the body (AMQP `content-type`).
    pub content_type: Option<String>,
    /// AMQP `message-id`.
    pub message_id: Option<String>,
    /// Application headers (AMQP headers table), as text.
    pub headers: Vec<(String, String)>,
}

impl Message {
    /// The value of header `name` (exact match).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}
