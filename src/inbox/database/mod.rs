//! What the inbox asks of its database: the statements and behaviours that differ between
//! PostgreSQL and MySQL, behind one sealed trait. Delivery, retries and sessions are shared.

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;

use std::collections::HashSet;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use sqlx::Transaction;
use sqlx::pool::PoolConnection;

use super::ConsumerConfig;

/// A database the inbox can record in: [`sqlx::Postgres`] or [`sqlx::MySql`] (each with
/// its cargo feature).
///
/// Sealed: the SQL behind it is the inbox's own business.
pub trait Database: sqlx::Database + sealed::Backend {}

pub(super) use sealed::Backend;

mod sealed {
    use super::*;

    /// The backend-specific part of the inbox. Every transaction method gets the
    /// connection of a transaction that [`Backend::begin`] started.
    pub trait Backend: sqlx::Database {
        /// A consumer's statements, built once.
        type Statements: Send + Sync + 'static;

        /// The statements for `config`'s table and transaction timeout.
        fn statements(config: &ConsumerConfig) -> Self::Statements;

        /// Starts an inbox transaction that the server ends if its client goes silent for
        /// the transaction timeout (rolling back and releasing the inbox rows' locks).
        fn begin<'c>(
            conn: &'c mut Self::Connection,
            sql: &Self::Statements,
        ) -> impl Future<Output = sqlx::Result<Transaction<'c, Self>>> + Send;

        /// Undoes what [`Backend::begin`] set on the session beyond its transaction, once
        /// that transaction has ended (committed or not).
        fn end(
            conn: &mut Self::Connection,
            sql: &Self::Statements,
        ) -> impl Future<Output = sqlx::Result<()>> + Send;

        /// Records one message id; `true` if it was not recorded before.
        fn record(
            tx: &mut Self::Connection,
            sql: &Self::Statements,
            consumer: &str,
            id: &str,
        ) -> impl Future<Output = sqlx::Result<bool>> + Send;

        /// Records the distinct `ids`; returns those that were not recorded before.
        fn record_all(
            tx: &mut Self::Connection,
            sql: &Self::Statements,
            consumer: &str,
            ids: &[&str],
        ) -> impl Future<Output = sqlx::Result<HashSet<String>>> + Send;

        /// How many of the distinct `ids` the transaction sees recorded.
        fn count_recorded(
            tx: &mut Self::Connection,
            sql: &Self::Statements,
            consumer: &str,
            ids: &[String],
        ) -> impl Future<Output = sqlx::Result<i64>> + Send;

        /// Deletes at most `limit` of the consumer's rows older than `window`, oldest
        /// first, in one statement; returns how many it deleted.
        fn purge(
            conn: &mut Self::Connection,
            sql: &Self::Statements,
            consumer: &str,
            window: Duration,
            limit: u64,
        ) -> impl Future<Output = sqlx::Result<u64>> + Send;

        /// The error says an earlier statement of the transaction failed, so whoever
        /// reports it is not necessarily to blame.
        fn failed_earlier(_e: &sqlx::Error) -> bool {
            false
        }
    }
}

/// A pooled connection for one inbox transaction. Dropped before [`Leased::reset`] (the
/// transaction ran out of time, or its future was dropped midway), it is closed instead of
/// returned to the pool: it may never answer again (and the pool's liveness check has no
/// timeout), and its session may still carry what [`Backend::begin`] set.
pub(super) struct Leased<DB: Backend> {
    /// The connection, in use.
    conn: PoolConnection<DB>,
    /// Its session is as the pool handed it out.
    clean: bool,
}

impl<DB: Backend> Leased<DB> {
    pub(super) fn new(conn: PoolConnection<DB>) -> Self {
        Leased { conn, clean: false }
    }

    /// After the transaction: restores the session, so the connection can go back to the
    /// pool. If that fails it will be closed instead.
    pub(super) async fn reset(&mut self, sql: &DB::Statements) {
        match DB::end(&mut self.conn, sql).await {
            Ok(()) => self.clean = true,
            Err(e) => tracing::debug!(error = %e, "inbox session not reset: connection closed"),
        }
    }
}

impl<DB: Backend> Deref for Leased<DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        &self.conn
    }
}

impl<DB: Backend> DerefMut for Leased<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.conn
    }
}

impl<DB: Backend> Drop for Leased<DB> {
    fn drop(&mut self) {
        if !self.clean {
            self.conn.close_on_drop();
        }
    }
}
