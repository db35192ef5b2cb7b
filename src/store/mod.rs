//! What the relay asks of a database, as one trait with one implementation per backend.
//!
//! The relay is the only writer of the relay-owned columns, and only the leader (see
//! [`Store::try_lead`]) publishes, so a claim is a plain read: which rows are in flight is
//! kept in the leader's memory, not in the table. That keeps every broker wait outside any
//! database transaction or row lock, and costs the database one read per batch and one
//! write per confirmed batch.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;

use crate::message::OutboxRow;
use crate::{Result, TableName};

#[cfg(feature = "postgres")]
pub mod postgres;

mod migrate;

/// How a store treats its table.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The outbox table.
    pub table: TableName,
    /// How long sent rows are kept; zero deletes them as soon as they are confirmed.
    pub retention: Duration,
}

/// A publish attempt that failed through the row's own fault (nack, unroutable, timeout).
#[derive(Debug, Clone)]
pub struct Failure {
    /// The row.
    pub id: i64,
    /// What went wrong, kept in `last_error`.
    pub error: String,
    /// When the row may be tried again.
    pub retry_in: Duration,
    /// The row can never succeed as written: it goes dead now, whatever its attempts.
    pub permanent: bool,
}

/// Figures for the gauges and `outbox status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Rows not yet sent and not dead.
    pub pending: i64,
    /// Age of the oldest pending row in seconds (0 when none).
    pub oldest_pending_age_seconds: f64,
    /// Rows in the dead state.
    pub dead: i64,
}

/// A dead row as `outbox dead list` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadRow {
    /// The AMQP message id.
    pub message_id: String,
    /// Its ordering key, blocked until the row is retried.
    pub ordering_key: Option<String>,
    /// Failed attempts.
    pub attempts: i32,
    /// The last failure.
    pub last_error: Option<String>,
    /// Target exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Age in seconds.
    pub age_seconds: f64,
}

/// Leadership of one table, held until dropped or until the database connection is lost.
pub trait Lease: Send + 'static {
    /// Whether leadership is still held; `false` means stop publishing at once.
    fn alive(&mut self) -> impl Future<Output = bool> + Send;
}

/// What the relay and the CLI need from a database.
pub trait Store: Clone + Send + Sync + 'static {
    /// Held by the one relay that publishes.
    type Lease: Lease;

    /// The table and retention this store works with.
    fn options(&self) -> &StoreOptions;

    /// Applies the schema; returns the migrations applied now (none on a second run).
    fn migrate(&self) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// Takes the table's leadership if no other relay holds it.
    fn try_lead(&self) -> impl Future<Output = Result<Option<Self::Lease>>> + Send;

    /// Up to `limit` rows due for publishing, oldest first, skipping `in_flight`, and holding
    /// back every row whose ordering key has an earlier unsent row.
    fn claim(
        &self,
        limit: usize,
        in_flight: &[i64],
    ) -> impl Future<Output = Result<Vec<OutboxRow>>> + Send;

    /// Records confirmed rows as sent and failed attempts, in one transaction.
    fn mark(
        &self,
        sent: &[i64],
        failed: &[Failure],
        max_attempts: u32,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Pending and dead counts and the oldest pending age.
    fn stats(&self) -> impl Future<Output = Result<Stats>> + Send;

    /// Ordering keys held back by a dead row or a row waiting to retry.
    fn blocked_keys(&self) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// Deletes at most `limit` sent rows older than the retention; returns how many.
    fn purge_sent(&self, limit: i64) -> impl Future<Output = Result<u64>> + Send;

    /// The dead rows, oldest first.
    fn dead_list(&self) -> impl Future<Output = Result<Vec<DeadRow>>> + Send;

    /// Puts dead rows (all, or those with these message ids) back to pending with their
    /// attempts reset; returns how many.
    fn dead_retry(
        &self,
        message_ids: Option<&[String]>,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Runs until dropped, calling `wake.notify_one()` when new rows are committed.
    /// A backend without notifications returns at once: polling covers it.
    fn watch_inserts(&self, wake: Arc<Notify>) -> impl Future<Output = ()> + Send;
}
