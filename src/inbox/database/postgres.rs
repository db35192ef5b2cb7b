//! The inbox on PostgreSQL: `ON CONFLICT DO NOTHING` dedupes, `RETURNING` names the fresh
//! ids of a batch, and `SET LOCAL` bounds the transaction without touching the session.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::postgres::PgConnection;
use sqlx::{Postgres, SqlStr, Transaction};

use super::{Backend, Database};
use crate::inbox::ConsumerConfig;
use crate::store::stmt;

/// PostgreSQL's "current transaction is aborted, commands ignored until end of transaction
/// block".
const IN_FAILED_TRANSACTION: &str = "25P02";

impl Database for Postgres {}

/// The inbox's statements on one table.
pub struct PgStatements {
    /// `BEGIN` with `idle_in_transaction_session_timeout` set for this transaction only:
    /// one frozen with its client (a NAT forgot the flow) would otherwise hold its inbox
    /// rows' locks, and its message's redelivery would wait on them, for hours.
    begin: SqlStr,
    /// One message id, `ON CONFLICT DO NOTHING`.
    record: SqlStr,
    /// Many ids in one statement, returning those inserted now.
    record_all: SqlStr,
    /// Counts the given ids' inbox rows.
    recorded: SqlStr,
    /// Deletes a bounded batch of old rows.
    purge: SqlStr,
}

impl Backend for Postgres {
    type Statements = PgStatements;

    fn statements(config: &ConsumerConfig) -> PgStatements {
        let t = &config.table;
        PgStatements {
            begin: stmt(format!(
                "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {}",
                config.transaction_timeout.as_millis().max(1)
            )),
            record: stmt(format!(
                "INSERT INTO {t}_inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            )),
            record_all: stmt(format!(
                "INSERT INTO {t}_inbox (consumer, message_id) SELECT $1, unnest($2::text[])
                 ON CONFLICT DO NOTHING RETURNING message_id"
            )),
            recorded: stmt(format!(
                "SELECT count(*) FROM {t}_inbox WHERE consumer = $1 AND message_id = ANY($2)"
            )),
            purge: stmt(format!(
                "DELETE FROM {t}_inbox WHERE ctid IN (
                    SELECT ctid FROM {t}_inbox WHERE consumer = $1
                      AND received_at < now() - $2 * interval '1 millisecond' LIMIT $3)"
            )),
        }
    }

    async fn begin<'c>(
        conn: &'c mut PgConnection,
        sql: &PgStatements,
    ) -> sqlx::Result<Transaction<'c, Postgres>> {
        sqlx::Connection::begin_with(conn, sql.begin.clone()).await
    }

    async fn end(_conn: &mut PgConnection, _sql: &PgStatements) -> sqlx::Result<()> {
        Ok(())
    }

    async fn record(
        tx: &mut PgConnection,
        sql: &PgStatements,
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
        tx: &mut PgConnection,
        sql: &PgStatements,
        consumer: &str,
        ids: &[&str],
    ) -> sqlx::Result<HashSet<String>> {
        let fresh: Vec<String> = sqlx::query_scalar(sql.record_all.clone())
            .bind(consumer)
            .bind(ids)
            .fetch_all(tx)
            .await?;
        Ok(fresh.into_iter().collect())
    }

    async fn count_recorded(
        tx: &mut PgConnection,
        sql: &PgStatements,
        consumer: &str,
        ids: &[String],
    ) -> sqlx::Result<i64> {
        sqlx::query_scalar(sql.recorded.clone())
            .bind(consumer)
            .bind(ids)
            .fetch_one(tx)
            .await
    }

    async fn purge(
        conn: &mut PgConnection,
        sql: &PgStatements,
        consumer: &str,
        window: Duration,
        limit: u64,
    ) -> sqlx::Result<u64> {
        let done = sqlx::query(sql.purge.clone())
            .bind(consumer)
            .bind(window.as_millis() as i64)
            .bind(limit as i64)
            .execute(conn)
            .await?;
        Ok(done.rows_affected())
    }

    fn failed_earlier(e: &sqlx::Error) -> bool {
        e.as_database_error()
            .is_some_and(|db| db.code().as_deref() == Some(IN_FAILED_TRANSACTION))
    }
}
