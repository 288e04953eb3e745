//! Routing: which plugins an event published to an exchange with a routing key is
//! delivered to — exactly as RabbitMQ would deliver it to their queues, so that the
//! embedded bus and RabbitMQ agree.
//!
//! This module owns the matching rules and nothing else: [`TopicPattern`] (AMQP
//! topic patterns, `*` and `#`, with RabbitMQ's treatment of empty words and of the
//! empty key), [`ExchangeKind`] (topic, fanout, direct) and the [`RouteTable`] built
//! from the configured [`Binding`]s, which answers "where does this event go?" on the
//! per-event path without allocating beyond its answer. Declaring the bindings on a
//! broker belongs to `bus`; delivering to the plugins belongs to `dispatch`.

mod pattern;
#[cfg(test)]
mod reference;
mod table;

pub use pattern::{MAX_PATTERN_LEN, PatternError, TopicPattern};
pub use table::{Binding, ExchangeKind, RouteError, RouteTable, UnknownExchangeKind};
