//! The consumer inbox: exactly-once effects on top of at-least-once delivery.
//!
//! [`consume`] reads a queue with manual acks and, for each delivery, in **one** database
//! transaction records `(consumer, message_id)` in the inbox table, runs the [`Handler`]
//! with that transaction (it may [`enqueue`](crate::enqueue) outbox rows in it, so
//! consume-then-publish is atomic) and commits; only then does it ack. A message whose id is
//! already recorded is acked without running the handler again.
//!
//! Deliveries already received are applied as a batch, in one transaction, and acked
//! together. If any of them fails the batch is rolled back and each is applied in its own
//! transaction, so one failing message retries alone and never holds back the others.
//!
//! A handler that fails is retried with capped backoff up to `max_attempts`, then the
//! message goes to the dead-letter queue `<queue>.dead` with the error and the attempt count
//! in its headers (`x-outbox-error`, `x-outbox-attempts`); a delivery without a message id,
//! whose body is larger than `prefetch_bytes`, or whose body is not the expected JSON goes
//! there at once. Transient database errors (serialization failures, deadlocks, lock wait
//! timeouts, lost connections, a transaction past `transaction_timeout`) are retried
//! without counting.
//!
//! Nothing is acked unless its effects committed: before COMMIT the transaction must still
//! hold the inbox records it made. A handler that swallowed an SQL error (PostgreSQL then
//! answers the COMMIT with a rollback) fails that check, and the attempt counts as a failed
//! handler.
//!
//! ## PostgreSQL and MySQL
//!
//! [`consume`] takes a `sqlx::Pool` of either backend (see [`Database`]); a [`Handler`] is
//! for PostgreSQL unless it names the backend: `impl Handler<T, sqlx::MySql>` gets a
//! `&mut MySqlConnection`. The schema is `migrations/<backend>/0002_inbox.sql`. What
//! differs on MySQL and MariaDB:
//!
//! - Deduplication is `INSERT IGNORE` on the primary key `(consumer, message_id)`; a
//!   concurrent copy of a message waits on the row lock until the first transaction ends,
//!   then is a duplicate. MySQL has no `RETURNING`: a batch is recorded in one multi-row
//!   statement, and only when some but not all of its ids were recorded before is it redone
//!   a row at a time (within the same transaction) to learn which.
//! - The transaction runs at READ COMMITTED (no gap locks), with `autocommit` off.
//! - The deadline the server enforces is the session's `wait_timeout` (whole seconds,
//!   rounded up) and `innodb_lock_wait_timeout`, both set to `transaction_timeout` when the
//!   transaction begins and restored when it ends (PostgreSQL uses `SET LOCAL
//!   idle_in_transaction_session_timeout`). A connection that could not be restored is closed
//!   instead of returned to the pool.
//! - A failed statement does not abort a MySQL transaction: a handler that swallows an error
//!   commits its other effects. A deadlock (and a lock wait timeout, with
//!   `innodb_rollback_on_timeout`) rolls the transaction back; the check before COMMIT catches
//!   that, and since `autocommit` is off what the handler wrote afterwards is rolled back too.
//! - Transient errors also include lock wait timeouts (1205), deadlocks (1213), killed
//!   connections (1927) and MariaDB's disconnect of an idle client (4031).
//!
//! At shutdown no new attempt starts and retry delays end; a transaction under way finishes
//! within `transaction_timeout`. What was not acked is redelivered by the broker.
//!
//! The consumer opens its own AMQP connections, never the relay's: RabbitMQ blocks
//! publishing connections during resource alarms, and acks must keep flowing. Dead letters
//! are published on a second connection for the same reason.

mod apply_error;
mod batches;
mod database;
mod dead_letter;
mod delivery;
mod session;

pub use database::Database;
pub use session::consume;

use std::future::Future;
use std::time::Duration;

use crate::TableName;
use crate::broker::AmqpTls;

/// The backend a [`Handler`] is for unless it says otherwise.
#[cfg(feature = "postgres")]
type DefaultDatabase = sqlx::Postgres;
#[cfg(not(feature = "postgres"))]
type DefaultDatabase = sqlx::MySql;

/// What a handler may fail with; a retryable `sqlx::Error` inside is not the message's fault.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// A delivery as the handler sees it.
#[derive(Debug, Clone)]
pub struct Incoming<T> {
    /// The AMQP message id (the deduplication key).
    pub message_id: String,
    /// The AMQP `type` property.
    pub message_type: Option<String>,
    /// The routing key it was published with.
    pub routing_key: String,
    /// The broker delivered it before (a previous consumer did not ack it).
    pub redelivered: bool,
    /// The W3C `traceparent` header (the producing transaction's trace), if any.
    pub traceparent: Option<String>,
    /// The W3C `tracestate` header, if any.
    pub tracestate: Option<String>,
    /// The JSON body, decoded.
    pub body: T,
}

/// Applies one message's effects inside the inbox transaction, on the database `DB`
/// (PostgreSQL unless it says otherwise: `impl Handler<T, sqlx::MySql> for ...` gets a
/// `&mut MySqlConnection`).
pub trait Handler<T, DB: Database = DefaultDatabase>: Send + Sync + 'static {
    /// Writes the message's effects through `tx`; the inbox commits them with the record of
    /// the message, or rolls both back on error.
    fn handle<'a>(
        &'a self,
        tx: &'a mut DB::Connection,
        message: &'a Incoming<T>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a;
}

/// The kind of queue [`consume`] declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated over the cluster: survives the loss of a node. The default.
    Quorum,
    /// A single-node queue: lost with its node.
    Classic,
}

/// How a consumer reads its queue.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The broker's nodes; after a lost connection the next one is tried first.
    pub amqp_urls: Vec<String>,
    /// How `amqps://` nodes are verified and this consumer presents itself (the relay's
    /// `OUTBOX_AMQP_*` settings; default: the system's roots, no client certificate).
    pub tls: AmqpTls,
    /// The consumer's name in the inbox table (one per service and purpose).
    pub consumer: String,
    /// The queue to consume; declared with its dead-letter exchange and queue.
    pub queue: String,
    /// `(exchange, routing key)` bindings of the queue; the exchanges must exist.
    pub bindings: Vec<(String, String)>,
    /// Quorum (default) or classic.
    pub queue_type: QueueType,
    /// One connection attempt at most (default 10 s).
    pub connect_timeout: Duration,
    /// Unacked deliveries the broker sends ahead (default 512).
    pub prefetch: u16,
    /// The bytes of message bodies being handled at once, all batches together (default
    /// 16 MiB): a batch stops short of the delivery that would take it past its share. A
    /// body larger than this can never be handled: it is dead-lettered with its size. The
    /// deliveries the broker sent ahead wait in the client beside these: `prefetch` times the
    /// broker's `max_message_size` bounds them.
    pub prefetch_bytes: usize,
    /// Batches handled at once (default 4; 1 keeps the queue's order).
    pub concurrency: usize,
    /// Deliveries applied in one transaction at most (default 128): those already received
    /// form a batch, so a quiet queue still handles each message as it comes.
    pub batch: usize,
    /// Handler attempts before a message is dead-lettered (default 5).
    pub max_attempts: u32,
    /// First retry delay of a failed handler (default 100 ms).
    pub retry_min: Duration,
    /// Cap of the retry delay (default 5 s).
    pub retry_max: Duration,
    /// One inbox transaction at most: begin, record, handler, check and commit (default
    /// 30 s). One that runs out is rolled back, its connection closed (not returned to the
    /// pool), and retried without counting, like a lost connection. Waiting for a pool
    /// connection is bounded by it too, separately; so is each statement of the inbox purge.
    pub transaction_timeout: Duration,
    /// How long applied message ids are remembered (default 7 days). A message replayed
    /// after this window is applied again.
    pub dedup_window: Duration,
    /// The outbox table whose inbox (`<table>_inbox`) this consumer records in.
    pub table: TableName,
    /// Deletes the queues after this long unused (`x-expires`), for tests and demos.
    pub queue_ttl: Option<Duration>,
}

impl ConsumerConfig {
    /// A consumer named `consumer` on `queue` with the documented defaults.
    pub fn new(
        amqp_urls: Vec<String>,
        consumer: impl Into<String>,
        queue: impl Into<String>,
    ) -> Self {
        ConsumerConfig {
            amqp_urls,
            tls: AmqpTls::default(),
            consumer: consumer.into(),
            queue: queue.into(),
            bindings: Vec::new(),
            queue_type: QueueType::Quorum,
            connect_timeout: Duration::from_secs(10),
            prefetch: 512,
            prefetch_bytes: 16 * 1024 * 1024,
            concurrency: 4,
            batch: 128,
            max_attempts: 5,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            transaction_timeout: Duration::from_secs(30),
            dedup_window: Duration::from_secs(7 * 24 * 3600),
            table: TableName::default(),
            queue_ttl: None,
        }
    }

    /// The dead-letter exchange and queue of `queue`.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }
}
