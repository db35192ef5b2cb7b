//! The inbox on MySQL and MariaDB: `INSERT IGNORE` dedupes on the primary key (a concurrent
//! duplicate waits on the row lock until the other transaction ends), the transaction runs
//! at READ COMMITTED, and the session's timeouts bound a client that went silent.
//!
//! MySQL has no `RETURNING`: a batch is recorded with one multi-row `INSERT IGNORE`, and only
//! when some but not all of its ids were recorded before is it redone a row at a time, from
//! the savepoint [`Backend::begin`] takes, to learn which.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::mysql::MySqlConnection;
use sqlx::{AssertSqlSafe, MySql, SqlStr, Transaction};

use super::{Backend, Database};
use crate::inbox::ConsumerConfig;
use crate::store::stmt;

/// Message ids per statement: two placeholders each, far below MySQL's 65 535.
const IDS_PER_STATEMENT: usize = 1000;

/// The savepoint every inbox transaction starts with.
const SAVEPOINT: &str = "outbox_inbox_recorded";

impl Database for MySql {}

/// The inbox's statements on one table.
pub struct MySqlStatements {
    /// Saves the session's settings in user variables, sets its `wait_timeout` and
    /// `innodb_lock_wait_timeout` to the transaction timeout (the server then ends a
    /// transaction whose client went silent, rolling back and releasing its locks),
    /// turns `autocommit` off (so statements that follow a rollback by the server, such as a
    /// deadlock's, are rolled back too instead of committed one by one), and starts a READ
    /// COMMITTED transaction (no gap locks) with a savepoint.
    begin: SqlStr,
    /// Restores what `begin` saved.
    end: SqlStr,
    /// One message id, `INSERT IGNORE`.
    record: SqlStr,
    /// `<table>_inbox`, for the statements whose length depends on the batch.
    inbox: String,
    /// Deletes a bounded batch of the oldest rows.
    purge: SqlStr,
}

impl MySqlStatements {
    /// `INSERT IGNORE` of `n` ids.
    fn record_many(&self, n: usize) -> SqlStr {
        let rows = vec!["(?, ?)"; n].join(", ");
        let text = format!(
            "INSERT IGNORE INTO {} (consumer, message_id) VALUES {rows}",
            self.inbox
        );
        stmt(text)
    }

    /// Counts the rows of `n` ids.
    fn recorded(&self, n: usize) -> SqlStr {
        let ids = vec!["?"; n].join(", ");
        let text = format!(
            "SELECT count(*) FROM {} WHERE consumer = ? AND message_id IN ({ids})",
            self.inbox
        );
        stmt(text)
    }
}

impl Backend for MySql {
    type Statements = MySqlStatements;

    fn statements(config: &ConsumerConfig) -> MySqlStatements {
        let inbox = format!("{}_inbox", config.table);
        // Both settings take whole seconds: rounded up, so the server never ends a
        // transaction the client still considers in time.
        let seconds = config
            .transaction_timeout
            .as_micros()
            .div_ceil(1_000_000)
            .max(1);
        MySqlStatements {
            begin: stmt(format!(
                "SET @outbox_wait_timeout = @@SESSION.wait_timeout,
                     @outbox_lock_wait_timeout = @@SESSION.innodb_lock_wait_timeout,
                     @outbox_autocommit = @@SESSION.autocommit;
                 SET SESSION wait_timeout = {seconds}, innodb_lock_wait_timeout = {seconds},
                     autocommit = 0;
                 SET TRANSACTION ISOLATION LEVEL READ COMMITTED;
                 START TRANSACTION;
                 SAVEPOINT {SAVEPOINT}"
            )),
            end: stmt(
                "SET SESSION wait_timeout = @outbox_wait_timeout,
                     innodb_lock_wait_timeout = @outbox_lock_wait_timeout,
                     autocommit = @outbox_autocommit"
                    .into(),
            ),
            record: stmt(format!(
                "INSERT IGNORE INTO {inbox} (consumer, message_id) VALUES (?, ?)"
            )),
            purge: stmt(format!(
                "DELETE FROM {inbox} WHERE consumer = ?
                   AND received_at < NOW(6) - INTERVAL ? MICROSECOND
                 ORDER BY received_at LIMIT ?"
            )),
            inbox,
        }
    }

    async fn begin<'c>(
        conn: &'c mut MySqlConnection,
        sql: &MySqlStatements,
    ) -> sqlx::Result<Transaction<'c, MySql>> {
        sqlx::Connection::begin_with(conn, sql.begin.clone()).await
    }

    async fn end(conn: &mut MySqlConnection, sql: &MySqlStatements) -> sqlx::Result<()> {
        sqlx::raw_sql(sql.end.clone()).execute(conn).await?;
        Ok(())
    }

    async fn record(
        tx: &mut MySqlConnection,
        sql: &MySqlStatements,
        consumer: &str,
        id: &str,
    ) -> sqlx::Result<bool> {
        let done = sqlx::query(sql.record.clone())
            .bind(consumer)
            .bind(id)
            .execute(tx)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_all(
        tx: &mut MySqlConnection,
        sql: &MySqlStatements,
        consumer: &str,
        ids: &[&str],
    ) -> sqlx::Result<HashSet<String>> {
        let mut inserted = 0;
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let mut insert = sqlx::query(sql.record_many(chunk.len()));
            for id in chunk {
                insert = insert.bind(consumer).bind(*id);
            }
            inserted += insert.execute(&mut *tx).await?.rows_affected();
        }
        if inserted == 0 {
            return Ok(HashSet::new());
        }
        if inserted == ids.len() as u64 {
            return Ok(ids.iter().map(|id| id.to_string()).collect());
        }
        // Some were recorded before, and MySQL does not say which: a row at a time.
        let back = AssertSqlSafe(format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}"));
        sqlx::raw_sql(back).execute(&mut *tx).await?;
        let mut fresh = HashSet::new();
        for id in ids {
            if Self::record(tx, sql, consumer, id).await? {
                fresh.insert(id.to_string());
            }
        }
        Ok(fresh)
    }

    async fn count_recorded(
        tx: &mut MySqlConnection,
        sql: &MySqlStatements,
        consumer: &str,
        ids: &[String],
    ) -> sqlx::Result<i64> {
        let mut found = 0;
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let mut count = sqlx::query_scalar::<_, i64>(sql.recorded(chunk.len())).bind(consumer);
            for id in chunk {
                count = count.bind(id);
            }
            found += count.fetch_one(&mut *tx).await?;
        }
        Ok(found)
    }

    async fn purge(
        conn: &mut MySqlConnection,
        sql: &MySqlStatements,
        consumer: &str,
        window: Duration,
        limit: u64,
    ) -> sqlx::Result<u64> {
        let done = sqlx::query(sql.purge.clone())
            .bind(consumer)
            .bind(window.as_micros().min(i64::MAX as u128) as i64)
            .bind(limit)
            .execute(conn)
            .await?;
        Ok(done.rows_affected())
    }
}
