//! What the relay asks of a database, as one trait with one implementation per backend.
//!
//! The relay is the only writer of the relay-owned columns, and only the leader (see
//! [`Store::try_lead`]) publishes, so a claim is a plain read: which rows are in flight is
//! kept in the leader's memory, not in the table. That keeps every broker wait outside any
//! database transaction or row lock, and costs the database one read per batch and one
//! write per confirmed batch.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use serde::Serialize;

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
    /// Seconds until the next failed row may be retried (negative: overdue), if any waits.
    pub next_retry_in_seconds: Option<f64>,
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
    /// The table's figures, read on the connection that holds leadership: an answer also
    /// proves leadership is still held, and an error means stop publishing at once.
    fn stats(&mut self) -> impl Future<Output = Result<Stats>> + Send;
}

/// What the leader hears of new rows: the smallest id committed since it last looked, and
/// whether notifications arrive at all (if not, the leader polls).
#[derive(Debug)]
pub struct Inserts {
    /// The smallest id reported since the last [`Inserts::take`]; `i64::MAX` for none.
    from: AtomicI64,
    /// Notifications are being received.
    listening: AtomicBool,
    /// Wakes the leader.
    notify: tokio::sync::Notify,
}

impl Default for Inserts {
    fn default() -> Self {
        Inserts {
            from: AtomicI64::new(i64::MAX),
            listening: AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
        }
    }
}

impl Inserts {
    /// Rows with ids from `from` up may have become claimable (0: look at the whole table).
    pub fn committed(&self, from: i64) {
        self.from.fetch_min(from, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Records whether notifications are being received.
    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::SeqCst);
    }

    /// Whether notifications are being received.
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// The smallest id reported since the last call, if any.
    pub fn take(&self) -> Option<i64> {
        Some(self.from.swap(i64::MAX, Ordering::SeqCst)).filter(|&id| id != i64::MAX)
    }

    /// Resolves at the next report.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
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

    /// Up to `limit` rows due for publishing with ids from `from` up, oldest first, skipping
    /// `held` (rows the leader already has), and holding back every row whose ordering key
    /// has an earlier row that failed (dead, or pending with attempts).
    fn claim(
        &self,
        limit: usize,
        from: i64,
        held: &[i64],
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

    /// Runs until dropped, reporting committed rows to `inserts` and keeping its
    /// `listening` flag true while notifications arrive. A backend without notifications
    /// returns at once: polling covers it.
    fn watch_inserts(&self, inserts: Arc<Inserts>) -> impl Future<Output = ()> + Send;
}
