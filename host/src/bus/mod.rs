//! Buses: where messages come from and where outputs go.

mod message;

pub use message::Message;
