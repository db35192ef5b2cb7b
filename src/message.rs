//! The message a service enqueues, and the row the relay reads back.

use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::{Error, Result};

/// A message to write into the outbox inside the caller's transaction.
///
/// ```
/// let msg = outbox::Message::new("order.created", &serde_json::json!({"order_id": 42}))
///     .unwrap()
///     .exchange("orders")
///     .ordering_key("order-42")
///     .message_type("OrderCreated")
///     .header("traceparent", "00-abc-def-01");
/// assert_eq!(msg.routing_key, "order.created");
/// ```
#[derive(Debug, Clone)]
pub struct Message {
    /// The AMQP `message-id`; consumers deduplicate on it. A fresh v4 UUID by default.
    pub message_id: Uuid,
    /// Target exchange; `""` is the default exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Rows sharing a key are published in insertion order; `None` = no order.
    pub ordering_key: Option<String>,
    /// The AMQP `type` property.
    pub message_type: Option<String>,
    /// The JSON body.
    pub payload: Value,
    /// Flat string/number/bool values copied into the AMQP headers.
    pub headers: Map<String, Value>,
}

impl Message {
    /// A message for `routing_key` on the default exchange with `payload` as its JSON body.
    pub fn new(routing_key: impl Into<String>, payload: &impl Serialize) -> Result<Self> {
        Ok(Message {
            message_id: Uuid::new_v4(),
            exchange: String::new(),
            routing_key: routing_key.into(),
            ordering_key: None,
            message_type: None,
            payload: serde_json::to_value(payload).map_err(Error::Json)?,
            headers: Map::new(),
        })
    }

    /// Sets the target exchange.
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Sets the ordering key.
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Sets the AMQP `type` property.
    pub fn message_type(mut self, message_type: impl Into<String>) -> Self {
        self.message_type = Some(message_type.into());
        self
    }

    /// Sets the message id (for a caller that derives it, e.g. from a request id).
    pub fn message_id(mut self, id: Uuid) -> Self {
        self.message_id = id;
        self
    }

    /// Adds an AMQP header (string, number or bool).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}

/// A pending row as the relay claims it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    /// The row's primary key.
    pub id: i64,
    /// The AMQP `message-id`, as text.
    pub message_id: String,
    /// Target exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Ordering key, if any.
    pub ordering_key: Option<String>,
    /// AMQP `type` property, if any.
    pub message_type: Option<String>,
    /// The JSON body, as stored.
    pub payload: String,
    /// The headers object, as JSON text.
    pub headers: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: f64,
    /// Failed attempts before this one.
    pub attempts: i32,
    /// The pending row just before it on its ordering key, or the latest one below the
    /// claim's floor, if any: the leader publishes this row only after that one.
    pub previous: Option<i64>,
}

impl OutboxRow {
    /// The memory its text takes: what `OUTBOX_MAX_IN_FLIGHT_BYTES` counts.
    pub fn bytes(&self) -> usize {
        self.payload.len()
            + self.headers.len()
            + self.message_id.len()
            + self.exchange.len()
            + self.routing_key.len()
            + self.ordering_key.as_ref().map_or(0, String::len)
            + self.message_type.as_ref().map_or(0, String::len)
    }
}

/// A validated table name: a plain SQL identifier, short enough for derived names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName(String);

impl TableName {
    /// Validates `name` as a plain identifier (`[A-Za-z_][A-Za-z0-9_]*`, at most 48 bytes).
    pub fn new(name: &str) -> Result<Self> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if first_ok && rest_ok && name.len() <= 48 {
            Ok(TableName(name.to_owned()))
        } else {
            Err(Error::InvalidTable(name.to_owned()))
        }
    }

    /// The name as written in SQL.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TableName {
    fn default() -> Self {
        TableName("outbox".to_owned())
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_identifiers() {
        assert!(TableName::new("orders_outbox").is_ok());
        assert!(TableName::new("_x1").is_ok());
        for bad in ["", "1abc", "a-b", "a;drop", "a b", "\"x\"", &"x".repeat(49)] {
            assert!(TableName::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
