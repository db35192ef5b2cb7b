//! # outbox
//!
//! A transactional outbox and its relay. A service writes its business rows and a message
//! row in **one** database transaction; `outbox relay`, a sidecar beside the service,
//! publishes every committed row to RabbitMQ with publisher confirms and marks it sent only
//! after the broker's ack.
//!
//! ## Guarantees
//!
//! - **No loss:** a committed row is published and confirmed eventually, across relay
//!   crashes, broker and database restarts and lost connections.
//! - **Nothing uncommitted:** a rolled-back row is never published.
//! - **Order per key:** rows sharing an `ordering_key` are first published in `id` order.
//! - **At-least-once:** duplicates happen only around crashes and reconnects.
//! - **One leader per table:** any number of relays may run; one publishes.
//! - **Bad rows stay contained:** a failing row is retried with capped, jittered backoff,
//!   then dead; it holds back only its own key.
//! - **Bounded memory:** unconfirmed publishes are capped.
//!
//! ## Layout
//!
//! - [`message`]: the [`Message`] a service enqueues and the row the relay reads back.
//! - [`outbox`](mod@outbox): [`enqueue`] into the caller's transaction.
//! - [`store`]: what the relay asks of a database ([`Store`]), one module per backend.
//! - [`broker`]: AMQP connections over a node list, confirms, returns, blocking.
//! - [`relay`]: leadership and the claim -> publish -> mark loop.
//! - [`inbox`]: consuming with exactly-once effects (the consumer inbox).
//! - [`config`]: the environment, read in one place.
//! - [`http`], [`health`], [`metrics`]: what operators see; [`history`] and [`tally`] feed
//!   the status page's charts; [`telemetry`]: traces (OTLP).
//!
//! ## Quick start
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id, amount) VALUES ($1, $2)")
//!     .bind(42_i64).bind(100_i64).execute(&mut *tx).await?;
//! let msg = outbox::Message::new("order.created", &serde_json::json!({"order_id": 42}))?
//!     .exchange("orders")
//!     .ordering_key("order-42")
//!     .message_type("OrderCreated");
//! outbox::enqueue(&mut *tx, &msg).await?;
//! tx.commit().await?; // the order and its message commit together, or neither does
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod broker;
pub mod config;
mod error;
pub mod health;
pub mod history;
pub mod http;
pub mod inbox;
pub mod message;
pub mod metrics;
pub mod outbox;
pub mod relay;
pub mod store;
pub mod tally;
pub mod telemetry;

pub use error::{Error, Result};
pub use health::Health;
pub use message::{Message, TableName};
pub use outbox::{enqueue, enqueue_all};
pub use store::{Store, StoreOptions};
