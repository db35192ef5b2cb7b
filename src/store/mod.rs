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

#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;

mod dead_retry;
mod deadline;
mod migrate;

pub use dead_retry::{Refusal, Refused, RetryPlan, plan_retry};

pub(crate) use deadline::{pool_options, within};

/// A statement built at start-up from the table name (a validated identifier) and literals:
/// the only text the relay and the inbox send that is not a constant.
pub(crate) fn stmt(sql: String) -> sqlx::SqlStr {
    sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(sql))
}

/// How a store treats its table.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The outbox table.
    pub table: TableName,
    /// How long sent rows are kept; zero deletes them as soon as they are confirmed.
    pub retention: Duration,
    /// One statement (or transaction) at most, waiting for a pooled connection included
    /// (`OUTBOX_QUERY_TIMEOUT`).
    pub query_timeout: Duration,
    /// One connection attempt at most (`OUTBOX_CONNECT_TIMEOUT`).
    pub connect_timeout: Duration,
    /// The database ends the lease session after this long without a word from it, which
    /// releases leadership (`OUTBOX_LEASE_TIMEOUT`).
    pub lease_timeout: Duration,
    /// Who this relay is, written into `<table>_leader` when it takes the leadership, so
    /// that standbys can name the leader (`OUTBOX_REPLICA_ID`; default host and pid).
    pub holder: String,
}

impl StoreOptions {
    /// The documented defaults for `table`: sent rows deleted at once, 10 s for a statement,
    /// a connection attempt and the lease.
    pub fn new(table: TableName) -> Self {
        StoreOptions {
            table,
            retention: Duration::ZERO,
            query_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            lease_timeout: Duration::from_secs(10),
            holder: holder(),
        }
    }
}

/// Who takes the leadership, as `<table>_leader` records it: host and process.
pub(crate) fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{} pid {}", host.trim(), std::process::id())
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
#[derive(Debug, Clone, Default, Serialize, sqlx::FromRow)]
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

/// What the leader's regular look at the table sees: enough to find rows committed since
/// its last claim whether or not their notification came, and the gauges that cost no
/// count of the backlog. Read from indexes: its cost grows with dead rows, not the backlog.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Lookout {
    /// The highest id of a pending row.
    pub last_pending: Option<i64>,
    /// A failed row's retry has fallen due.
    pub retry_due: bool,
    /// Age of the oldest pending row in seconds (0 when none).
    pub oldest_pending_age_seconds: f64,
    /// Rows in the dead state.
    pub dead: i64,
}

/// A dead row as `outbox dead list` and the status page show it.
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

/// A dedicated connection that may hold the table's leadership, until it is dropped or the
/// database ends its session (which it does after `OUTBOX_LEASE_TIMEOUT` of silence, so a
/// leader whose host vanished loses the table). Callers bound every call with a deadline.
pub trait Lease: Send + 'static {
    /// Takes leadership if no other relay holds it. On success the table's term is raised
    /// and returned: marks carry it, and a mark of an older term changes nothing.
    fn try_acquire(&mut self) -> impl Future<Output = Result<Option<i64>>> + Send;

    /// One look at the table ([`Lookout`]); an answer proves leadership is still held. It
    /// also pings the notification listener, which takes silence for a dead connection.
    fn look(&mut self) -> impl Future<Output = Result<Lookout>> + Send;
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

/// What a claim read.
#[derive(Debug, Default)]
pub struct Claimed {
    /// The rows, in id order.
    pub rows: Vec<OutboxRow>,
    /// It stopped at its byte budget: rows after the last may be claimable.
    pub cut: bool,
}

/// A claim's byte budget: rows are kept, in order, while their sizes ([`OutboxRow::bytes`])
/// fit, and the first one always (a row larger than the budget still goes out, alone).
#[derive(Debug)]
pub struct Budget {
    /// Bytes left.
    left: usize,
    /// What was kept.
    claimed: Claimed,
}

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Self {
        Budget {
            left: bytes,
            claimed: Claimed::default(),
        }
    }

    /// Keeps `row` if it fits; `false` once one does not (the claim stops there).
    pub fn admit(&mut self, row: OutboxRow) -> bool {
        let size = row.bytes();
        if size > self.left && !self.claimed.rows.is_empty() {
            self.claimed.cut = true;
            return false;
        }
        self.left = self.left.saturating_sub(size);
        self.claimed.rows.push(row);
        true
    }

    /// Keeps rows from `rows` while they fit.
    pub async fn fill<E>(
        mut self,
        rows: impl futures_util::Stream<Item = std::result::Result<OutboxRow, E>>,
    ) -> std::result::Result<Claimed, E> {
        use futures_util::TryStreamExt;
        let mut rows = std::pin::pin!(rows);
        while let Some(row) = rows.try_next().await? {
            if !self.admit(row) {
                break;
            }
        }
        Ok(self.claimed)
    }

    /// What was kept.
    pub fn claimed(self) -> Claimed {
        self.claimed
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

    /// Opens a connection for leadership (bounded by the connect timeout).
    fn lease(&self) -> impl Future<Output = Result<Self::Lease>> + Send;

    /// Up to `limit` rows due for publishing with ids from `from` up, oldest first, skipping
    /// `held` (every row the leader has), and holding back every row whose ordering key
    /// has an earlier row that failed (dead, or pending with attempts); read one at a time
    /// and kept while they fit in `bytes` ([`Budget`]). Each row with a key names the
    /// pending row just before it on its key ([`OutboxRow::previous`]), or the latest below
    /// `from`: the rows from `from` up come in this claim in order or are `held`, whose
    /// order the leader keeps itself.
    fn claim(
        &self,
        limit: usize,
        from: i64,
        held: &[i64],
        bytes: usize,
    ) -> impl Future<Output = Result<Claimed>> + Send;

    /// Records confirmed rows as sent and failed attempts, in one transaction, if `term` is
    /// still the table's; otherwise changes nothing and fails with [`Error::LeaseLost`].
    ///
    /// [`Error::LeaseLost`]: crate::Error::LeaseLost
    fn mark(
        &self,
        term: i64,
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

    /// At most `limit` dead rows, oldest first, after skipping `offset` of them.
    fn dead_page(
        &self,
        offset: u64,
        limit: u64,
    ) -> impl Future<Output = Result<Vec<DeadRow>>> + Send;

    /// Who took the table's leadership last, as `<table>_leader` records it (`None` before
    /// any relay has led). The holder may have died since: the lock, not this, is the truth.
    fn leader_holder(&self) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Puts dead rows (all, or those with these message ids) back to pending with their
    /// attempts reset; returns how many.
    fn dead_retry(
        &self,
        message_ids: Option<&[String]>,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Runs until dropped, reporting committed rows to `inserts` and keeping its
    /// `listening` flag true while notifications arrive. The leader's looks ping it, so
    /// `silence` without any notification means its connection is dead: it reconnects and
    /// asks for the whole table. A backend without notifications returns at once: the
    /// looks and polling cover it.
    fn watch_inserts(
        &self,
        inserts: Arc<Inserts>,
        silence: Duration,
    ) -> impl Future<Output = ()> + Send;
}
