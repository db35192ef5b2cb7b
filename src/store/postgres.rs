//! The PostgreSQL store: claims by a plain indexed read, leadership by an advisory lock held
//! on a dedicated connection, wake-ups by LISTEN/NOTIFY.

use std::sync::Arc;
use std::time::Duration;

use super::migrate::{Migration, history_table, render};
use super::{DeadRow, Failure, Inserts, Lease, Stats, Store, StoreOptions};
use crate::Result;
use crate::message::OutboxRow;
use sqlx::postgres::{PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, SqlSafeStr, SqlStr};

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_outbox.sql",
        sql: include_str!("../../migrations/postgres/0001_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "0002_inbox.sql",
        sql: include_str!("../../migrations/postgres/0002_inbox.sql"),
    },
    Migration {
        version: 3,
        name: "0003_claim_ahead.sql",
        sql: include_str!("../../migrations/postgres/0003_claim_ahead.sql"),
    },
];

/// The outbox table on PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    /// Connections for claims, marks and the CLI (leadership and LISTEN use their own).
    pool: PgPool,
    /// Table name and retention.
    opts: StoreOptions,
    /// Statements rendered once for the table name.
    sql: Arc<Statements>,
}

/// Every statement the relay runs, with the table name in it.
struct Statements {
    claim: SqlStr,
    sent: SqlStr,
    failed: SqlStr,
    stats: SqlStr,
    blocked_keys: SqlStr,
    purge: SqlStr,
    dead_list: SqlStr,
    dead_retry: SqlStr,
}

fn stmt(sql: String) -> SqlStr {
    AssertSqlSafe(sql).into_sql_str()
}

impl Statements {
    fn new(opts: &StoreOptions) -> Self {
        let t = &opts.table;
        let sent = if opts.retention.is_zero() {
            format!("DELETE FROM {t} WHERE id = ANY($1)")
        } else {
            format!("UPDATE {t} SET state = 'sent', sent_at = now() WHERE id = ANY($1)")
        };
        Statements {
            claim: stmt(format!(
                "SELECT o.id, o.message_id::text AS message_id, o.exchange, o.routing_key,
                        o.ordering_key, o.message_type, o.payload::text AS payload,
                        o.headers::text AS headers,
                        extract(epoch FROM o.created_at)::float8 AS created_at, o.attempts
                 FROM {t} o
                 WHERE o.state = 'pending' AND o.id >= $1 AND o.next_attempt_at <= now()
                   AND o.id <> ALL($2)
                   AND (o.ordering_key IS NULL OR NOT EXISTS (
                        SELECT 1 FROM {t} e WHERE e.ordering_key = o.ordering_key
                          AND e.id < o.id
                          AND (e.state = 'dead' OR (e.state = 'pending' AND e.attempts > 0))))
                 ORDER BY o.id LIMIT $3"
            )),
            sent: stmt(sent),
            failed: stmt(format!(
                "UPDATE {t} o SET attempts = o.attempts + 1, last_error = f.error,
                        next_attempt_at = now() + f.retry_ms * interval '1 millisecond',
                        state = CASE WHEN f.permanent OR o.attempts + 1 >= $5
                                     THEN 'dead' ELSE 'pending' END
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bool[])
                      AS f(id, error, retry_ms, permanent)
                 WHERE o.id = f.id AND o.state = 'pending'"
            )),
            stats: stmt(format!(
                "SELECT (SELECT count(*) FROM {t} WHERE state = 'pending') AS pending,
                        COALESCE((SELECT extract(epoch FROM now() - created_at)::float8
                                  FROM {t} WHERE state = 'pending' ORDER BY id LIMIT 1), 0)
                            AS oldest_pending_age_seconds,
                        (SELECT count(*) FROM {t} WHERE state = 'dead') AS dead,
                        (SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
                         FROM {t} WHERE state = 'pending' AND attempts > 0)
                            AS next_retry_in_seconds"
            )),
            blocked_keys: stmt(format!(
                "SELECT DISTINCT ordering_key FROM {t}
                 WHERE ordering_key IS NOT NULL
                   AND (state = 'dead' OR (state = 'pending' AND attempts > 0))
                 ORDER BY 1"
            )),
            purge: stmt(format!(
                "DELETE FROM {t} WHERE id IN (
                    SELECT id FROM {t} WHERE state = 'sent'
                      AND sent_at < now() - $1 * interval '1 millisecond'
                    ORDER BY sent_at LIMIT $2)"
            )),
            dead_list: stmt(format!(
                "SELECT message_id::text AS message_id, ordering_key, attempts, last_error,
                        exchange, routing_key,
                        extract(epoch FROM now() - created_at)::float8 AS age_seconds
                 FROM {t} WHERE state = 'dead' ORDER BY id"
            )),
            dead_retry: stmt(format!(
                "WITH retried AS (
                    UPDATE {t} SET state = 'pending', attempts = 0, next_attempt_at = now()
                    WHERE state = 'dead' AND ($1::uuid[] IS NULL OR message_id = ANY($1::uuid[]))
                    RETURNING 1)
                 SELECT count(*) FROM retried, LATERAL (SELECT pg_notify('{t}', '')) n"
            )),
        }
    }
}

impl PgStore {
    /// A store on `pool` (which may be lazy: a database that is down is not an error here).
    pub fn new(pool: PgPool, opts: StoreOptions) -> Self {
        let sql = Arc::new(Statements::new(&opts));
        PgStore { pool, opts, sql }
    }

    /// A store with a small lazy pool for `url`: nothing connects until first used.
    pub fn connect_lazy(url: &str, opts: StoreOptions) -> Result<Self> {
        // Two connections kept open: a claim and a mark run at once, and opening one (with
        // TLS) takes long enough to show in the publish latency.
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .min_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(url)?;
        Ok(Self::new(pool, opts))
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn dedicated_connection(&self) -> Result<PgConnection> {
        Ok(PgConnection::connect_with(&self.pool.connect_options()).await?)
    }
}

/// Leadership: a session advisory lock, released by PostgreSQL when the connection ends.
pub struct PgLease {
    /// The connection that holds the lock; losing it loses leadership.
    conn: PgConnection,
    /// The statements, for the figures read on this connection.
    sql: Arc<Statements>,
}

impl Lease for PgLease {
    async fn stats(&mut self) -> Result<Stats> {
        read_stats(&mut self.conn, &self.sql).await
    }
}

async fn read_stats(conn: &mut PgConnection, sql: &Statements) -> Result<Stats> {
    let (pending, oldest_pending_age_seconds, dead, next_retry_in_seconds) =
        sqlx::query_as(sql.stats.clone()).fetch_one(conn).await?;
    Ok(Stats {
        pending,
        oldest_pending_age_seconds,
        dead,
        next_retry_in_seconds,
    })
}

impl Store for PgStore {
    type Lease = PgLease;

    fn options(&self) -> &StoreOptions {
        &self.opts
    }

    async fn migrate(&self) -> Result<Vec<String>> {
        let history = history_table(&self.opts.table);
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(&history)
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {history} (
                version BIGINT PRIMARY KEY,
                name TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )))
        .execute(&mut *tx)
        .await?;
        let done: Vec<i64> =
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT version FROM {history}")))
                .fetch_all(&mut *tx)
                .await?;
        let mut applied = Vec::new();
        for m in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
            sqlx::raw_sql(AssertSqlSafe(render(m.sql, &self.opts.table)))
                .execute(&mut *tx)
                .await?;
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {history} (version, name) VALUES ($1, $2)"
            )))
            .bind(m.version)
            .bind(m.name)
            .execute(&mut *tx)
            .await?;
            applied.push(m.name.to_owned());
        }
        tx.commit().await?;
        Ok(applied)
    }

    async fn try_lead(&self) -> Result<Option<PgLease>> {
        let mut conn = self.dedicated_connection().await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
            .bind(format!("outbox relay {}", self.opts.table))
            .fetch_one(&mut conn)
            .await?;
        Ok(got.then_some(PgLease {
            conn,
            sql: self.sql.clone(),
        }))
    }

    async fn claim(&self, limit: usize, from: i64, held: &[i64]) -> Result<Vec<OutboxRow>> {
        Ok(sqlx::query_as(self.sql.claim.clone())
            .bind(from)
            .bind(held)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn mark(&self, sent: &[i64], failed: &[Failure], max_attempts: u32) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        // A mark lost in a database crash only means its rows are published again (and
        // deduplicated by the consumers' inboxes): it need not wait for its WAL flush, which
        // on a busy disk can take a hundred milliseconds.
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        if !sent.is_empty() {
            sqlx::query(self.sql.sent.clone())
                .bind(sent)
                .execute(&mut *tx)
                .await?;
        }
        if !failed.is_empty() {
            let ids: Vec<i64> = failed.iter().map(|f| f.id).collect();
            let errors: Vec<&str> = failed.iter().map(|f| f.error.as_str()).collect();
            let retry_ms: Vec<i64> = failed
                .iter()
                .map(|f| f.retry_in.as_millis() as i64)
                .collect();
            let permanent: Vec<bool> = failed.iter().map(|f| f.permanent).collect();
            sqlx::query(self.sql.failed.clone())
                .bind(ids)
                .bind(errors)
                .bind(retry_ms)
                .bind(permanent)
                .bind(max_attempts as i32)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn stats(&self) -> Result<Stats> {
        read_stats(&mut *self.pool.acquire().await?, &self.sql).await
    }

    async fn blocked_keys(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(self.sql.blocked_keys.clone())
            .fetch_all(&self.pool)
            .await?)
    }

    async fn purge_sent(&self, limit: i64) -> Result<u64> {
        let done = sqlx::query(self.sql.purge.clone())
            .bind(self.opts.retention.as_millis() as i64)
            .bind(limit)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn dead_list(&self) -> Result<Vec<DeadRow>> {
        Ok(sqlx::query_as(self.sql.dead_list.clone())
            .fetch_all(&self.pool)
            .await?)
    }

    async fn dead_retry(&self, message_ids: Option<&[String]>) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(self.sql.dead_retry.clone())
            .bind(message_ids)
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    async fn watch_inserts(&self, inserts: Arc<Inserts>) {
        let channel = self.opts.table.as_str();
        loop {
            match PgListener::connect_with(&self.pool).await {
                Ok(mut listener) => match listener.listen(channel).await {
                    Ok(()) => {
                        inserts.set_listening(true);
                        // Rows committed while nobody listened are found by a look at the
                        // whole table.
                        inserts.committed(0);
                        // The payload is the smallest id a statement inserted; anything else
                        // (`outbox dead retry` sends none) asks for the whole table.
                        // `try_recv` says when the connection was lost (`recv` would
                        // reconnect silently, losing what was sent meanwhile): start over.
                        while let Ok(Some(n)) = listener.try_recv().await {
                            inserts.committed(n.payload().parse().unwrap_or(0));
                        }
                        inserts.set_listening(false);
                    }
                    Err(e) => tracing::debug!(error = %e, "LISTEN failed"),
                },
                Err(e) => tracing::debug!(error = %e, "LISTEN connection failed"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
