//! The PostgreSQL store: claims by a plain indexed read, leadership by an advisory lock held
//! on a dedicated connection that the server ends when it goes silent, marks fenced by the
//! leadership term, wake-ups by LISTEN/NOTIFY. Every statement has a deadline.

use std::sync::Arc;
use std::time::Duration;

use super::deadline::Work;
use super::migrate::{Migration, history_table, render};
use super::{
    Budget, Claimed, DeadRow, Failure, Inserts, Lease, Lookout, Stats, Store, StoreOptions,
    pool_options, stmt, within,
};
use crate::{Result, TableName};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool};
use sqlx::{AssertSqlSafe, Connection, SqlStr};

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
    Migration {
        version: 4,
        name: "0004_fencing.sql",
        sql: include_str!("../../migrations/postgres/0004_fencing.sql"),
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

/// The payload of the leader's pings to its own listener (row notifications carry an id).
const PING: &str = "ping";

/// How long `outbox migrate` may take (creating an index on a large table takes a while).
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Every statement the relay runs, with the table name in it.
struct Statements {
    claim: SqlStr,
    mark: SqlStr,
    stats: SqlStr,
    look: SqlStr,
    acquire: SqlStr,
    raise_term: SqlStr,
    blocked_keys: SqlStr,
    purge: SqlStr,
    dead_list: SqlStr,
    dead_page: SqlStr,
    holder: SqlStr,
    dead_retry: SqlStr,
}

impl Statements {
    fn new(opts: &StoreOptions) -> Self {
        let t = &opts.table;
        // Every mark checks, in the same statement, that its term is still the table's
        // (`FOR SHARE`: a new leader raising the term waits for a mark already running), and
        // skips the wait for its WAL flush: a mark lost in a database crash only means its
        // rows are published again, which the consumers' inboxes absorb.
        let sent = if opts.retention.is_zero() {
            format!("DELETE FROM {t} WHERE id = ANY($1) AND EXISTS (SELECT 1 FROM fence)")
        } else {
            format!(
                "UPDATE {t} SET state = 'sent', sent_at = now()
                 WHERE id = ANY($1) AND state = 'pending' AND EXISTS (SELECT 1 FROM fence)"
            )
        };
        let dead_list = format!(
            "SELECT message_id::text AS message_id, ordering_key, attempts, last_error,
                    exchange, routing_key,
                    extract(epoch FROM now() - created_at)::float8 AS age_seconds
             FROM {t} WHERE state = 'dead' ORDER BY id"
        );
        Statements {
            // `NOT IN (SELECT unnest($2))` is hashed in custom and generic plans alike, where
            // `<> ALL($2)` is scanned for each row in a generic plan; the ids are never NULL.
            claim: stmt(format!(
                "SELECT o.id, o.message_id::text AS message_id, o.exchange, o.routing_key,
                        o.ordering_key, o.message_type, o.payload::text AS payload,
                        o.headers::text AS headers,
                        extract(epoch FROM o.created_at)::float8 AS created_at, o.attempts,
                        (SELECT max(p.id) FROM {t} p WHERE p.ordering_key = o.ordering_key
                           AND p.state = 'pending' AND p.id < o.id) AS previous
                 FROM {t} o
                 WHERE o.state = 'pending' AND o.id >= $1 AND o.next_attempt_at <= now()
                   AND o.id NOT IN (SELECT unnest($2::bigint[]))
                   AND (o.ordering_key IS NULL OR NOT EXISTS (
                        SELECT 1 FROM {t} e WHERE e.ordering_key = o.ordering_key
                          AND e.id < o.id
                          AND (e.state = 'dead' OR (e.state = 'pending' AND e.attempts > 0))))
                 ORDER BY o.id LIMIT $3"
            )),
            mark: stmt(format!(
                "WITH fence AS MATERIALIZED (SELECT 1 FROM {t}_leader WHERE singleton AND term = $1 FOR SHARE),
                 sent AS ({sent} RETURNING 1),
                 failed AS (
                    UPDATE {t} o SET attempts = o.attempts + 1, last_error = f.error,
                        next_attempt_at = now() + f.retry_ms * interval '1 millisecond',
                        state = CASE WHEN f.permanent OR o.attempts + 1 >= $6
                                     THEN 'dead' ELSE 'pending' END
                    FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::bool[])
                         AS f(id, error, retry_ms, permanent)
                    WHERE o.id = f.id AND o.state = 'pending' AND EXISTS (SELECT 1 FROM fence)
                    RETURNING 1)
                 SELECT EXISTS (SELECT 1 FROM fence),
                        set_config('synchronous_commit', 'off', true) IS NOT NULL,
                        (SELECT count(*) FROM sent) + (SELECT count(*) FROM failed)",
                sent = sent.replace("$1", "$7")
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
            look: stmt(format!(
                "SELECT (SELECT max(id) FROM {t} WHERE state = 'pending') AS last_pending,
                        EXISTS (SELECT 1 FROM {t} WHERE state = 'pending' AND attempts > 0
                                  AND next_attempt_at <= now()) AS retry_due,
                        COALESCE((SELECT extract(epoch FROM now() - created_at)::float8
                                  FROM {t} WHERE state = 'pending' ORDER BY id LIMIT 1), 0)
                            AS oldest_pending_age_seconds,
                        (SELECT count(*) FROM {t} WHERE state = 'dead') AS dead,
                        pg_notify('{t}', '{PING}') IS NULL AS pinged"
            )),
            acquire: stmt(format!(
                "SELECT pg_try_advisory_lock(x'6f757462'::bigint << 32 | '{t}'::regclass::oid::bigint)"
            )),
            raise_term: stmt(format!(
                "UPDATE {t}_leader SET term = term + 1, holder = $1, since = now()
                 WHERE singleton RETURNING term"
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
            dead_page: stmt(format!("{dead_list} LIMIT $1 OFFSET $2")),
            dead_list: stmt(dead_list),
            holder: stmt(format!("SELECT holder FROM {t}_leader WHERE singleton")),
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
    /// The table name is taken in lower case, as PostgreSQL folds unquoted identifiers.
    pub fn new(pool: PgPool, mut opts: StoreOptions) -> Self {
        opts.table = TableName::new(&opts.table.as_str().to_ascii_lowercase())
            .expect("a valid name in lower case is valid");
        let sql = Arc::new(Statements::new(&opts));
        PgStore { pool, opts, sql }
    }

    /// A store with a small lazy pool for `url`: nothing connects until first used.
    ///
    /// Its sessions run with `enable_sort = off` and `enable_seqscan = off`. An outbox that
    /// deletes what it sends is analyzed while nearly empty, and its statements are prepared
    /// and planned while it is empty: to the planner a burst then looks small, and it reads
    /// the whole backlog and sorts it for every claim, or scans the table for every claimed
    /// row's key (0.2 to 1.5 s per 500 rows against 2 ms). Every statement of the relay has
    /// an index to follow in the order it wants. They also run with `jit = off`: a plan's
    /// cost, which `enable_seqscan = off` inflates wherever a scan is unavoidable, would
    /// otherwise have each statement compiled (50 to 350 ms per mark).
    pub fn connect_lazy(url: &str, opts: StoreOptions) -> Result<Self> {
        let connect: PgConnectOptions = url.parse()?;
        let connect = connect.options([
            ("enable_sort", "off"),
            ("enable_seqscan", "off"),
            ("jit", "off"),
        ]);
        // Two connections kept open: a claim and a mark run at once, and opening one (with
        // TLS) takes long enough to show in the publish latency.
        let pool = pool_options()
            .max_connections(4)
            .min_connections(2)
            .acquire_timeout(opts.connect_timeout)
            .connect_lazy_with(connect.application_name("outbox relay"));
        Ok(Self::new(pool, opts))
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs `work` on a pooled connection within the query timeout.
    async fn within<T, F>(&self, work: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> Work<'c, T>,
    {
        within(&self.pool, self.opts.query_timeout, work).await
    }
}

/// Leadership: a session advisory lock keyed by the table's oid, released by PostgreSQL when
/// the session ends; `idle_session_timeout` ends it when the relay goes silent.
pub struct PgLease {
    /// The connection that holds (or tries to take) the lock.
    conn: PgConnection,
    /// The statements, for the look at the table.
    sql: Arc<Statements>,
    /// Who this relay is, recorded when it takes the leadership.
    holder: String,
}

impl Lease for PgLease {
    async fn try_acquire(&mut self) -> Result<Option<i64>> {
        let got: bool = sqlx::query_scalar(self.sql.acquire.clone())
            .fetch_one(&mut self.conn)
            .await?;
        if !got {
            return Ok(None);
        }
        let term = sqlx::query_scalar(self.sql.raise_term.clone())
            .bind(&self.holder)
            .fetch_one(&mut self.conn)
            .await?;
        Ok(Some(term))
    }

    async fn look(&mut self) -> Result<Lookout> {
        let (last_pending, retry_due, oldest_pending_age_seconds, dead, _): (_, _, _, _, bool) =
            sqlx::query_as(self.sql.look.clone())
                .fetch_one(&mut self.conn)
                .await?;
        Ok(Lookout {
            last_pending,
            retry_due,
            oldest_pending_age_seconds,
            dead,
        })
    }
}

impl Store for PgStore {
    type Lease = PgLease;

    fn options(&self) -> &StoreOptions {
        &self.opts
    }

    async fn migrate(&self) -> Result<Vec<String>> {
        let table = self.opts.table.clone();
        within(&self.pool, MIGRATE_TIMEOUT, move |conn| {
            Box::pin(async move { migrate(conn, &table).await })
        })
        .await
    }

    async fn lease(&self) -> Result<PgLease> {
        let options = (*self.pool.connect_options())
            .clone()
            .application_name("outbox relay lease");
        let connect = PgConnection::connect_with(&options);
        let mut conn = tokio::time::timeout(self.opts.connect_timeout, connect)
            .await
            .map_err(|_| crate::Error::Timeout(self.opts.connect_timeout))??;
        let idle = format!(
            "SET idle_session_timeout = {}",
            self.opts.lease_timeout.as_millis()
        );
        let set = sqlx::raw_sql(AssertSqlSafe(idle)).execute(&mut conn);
        match tokio::time::timeout(self.opts.query_timeout, set).await {
            Ok(Ok(_)) => {}
            // PostgreSQL before 14: the lock outlives a vanished host until TCP gives up.
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "idle_session_timeout not available: a leader whose host vanishes keeps the table until its TCP connection times out")
            }
            Err(_) => return Err(crate::Error::Timeout(self.opts.query_timeout)),
        }
        Ok(PgLease {
            conn,
            sql: self.sql.clone(),
            holder: self.opts.holder.clone(),
        })
    }

    async fn claim(&self, limit: usize, from: i64, held: &[i64], bytes: usize) -> Result<Claimed> {
        // Only the held rows the claim could return: ids below `from` never are.
        let held: Vec<i64> = held.iter().copied().filter(|&id| id >= from).collect();
        let sql = self.sql.claim.clone();
        self.within(move |conn| {
            let rows = sqlx::query_as(sql)
                .bind(from)
                .bind(held)
                .bind(limit as i64)
                .fetch(conn);
            Box::pin(Budget::new(bytes).fill(rows))
        })
        .await
    }

    async fn mark(
        &self,
        term: i64,
        sent: &[i64],
        failed: &[Failure],
        max_attempts: u32,
    ) -> Result<()> {
        let ids: Vec<i64> = failed.iter().map(|f| f.id).collect();
        let errors: Vec<String> = failed.iter().map(|f| f.error.clone()).collect();
        let retry_ms: Vec<i64> = failed
            .iter()
            .map(|f| f.retry_in.as_millis() as i64)
            .collect();
        let permanent: Vec<bool> = failed.iter().map(|f| f.permanent).collect();
        let (sql, sent) = (self.sql.mark.clone(), sent.to_vec());
        let (ours, _, _): (bool, bool, i64) = self
            .within(move |conn| {
                Box::pin(
                    sqlx::query_as(sql)
                        .bind(term)
                        .bind(ids)
                        .bind(errors)
                        .bind(retry_ms)
                        .bind(permanent)
                        .bind(max_attempts as i32)
                        .bind(sent)
                        .fetch_one(conn),
                )
            })
            .await?;
        if ours {
            Ok(())
        } else {
            Err(crate::Error::LeaseLost)
        }
    }

    async fn stats(&self) -> Result<Stats> {
        let sql = self.sql.stats.clone();
        self.within(|conn| Box::pin(sqlx::query_as(sql).fetch_one(conn)))
            .await
    }

    async fn blocked_keys(&self) -> Result<Vec<String>> {
        let sql = self.sql.blocked_keys.clone();
        self.within(|conn| Box::pin(sqlx::query_scalar(sql).fetch_all(conn)))
            .await
    }

    async fn purge_sent(&self, limit: i64) -> Result<u64> {
        let sql = self.sql.purge.clone();
        let retention = self.opts.retention.as_millis() as i64;
        let done = self
            .within(|conn| Box::pin(sqlx::query(sql).bind(retention).bind(limit).execute(conn)))
            .await?;
        Ok(done.rows_affected())
    }

    async fn dead_list(&self) -> Result<Vec<DeadRow>> {
        let sql = self.sql.dead_list.clone();
        self.within(|conn| Box::pin(sqlx::query_as(sql).fetch_all(conn)))
            .await
    }

    async fn dead_page(&self, offset: u64, limit: u64) -> Result<Vec<DeadRow>> {
        let sql = self.sql.dead_page.clone();
        let (offset, limit) = (offset as i64, limit as i64);
        self.within(move |conn| {
            Box::pin(sqlx::query_as(sql).bind(limit).bind(offset).fetch_all(conn))
        })
        .await
    }

    async fn leader_holder(&self) -> Result<Option<String>> {
        let sql = self.sql.holder.clone();
        self.within(|conn| Box::pin(sqlx::query_scalar(sql).fetch_optional(conn)))
            .await
            .map(Option::flatten)
    }

    async fn dead_retry(&self, message_ids: Option<&[String]>) -> Result<u64> {
        let (sql, ids) = (
            self.sql.dead_retry.clone(),
            message_ids.map(<[String]>::to_vec),
        );
        let n: i64 = self
            .within(move |conn| Box::pin(sqlx::query_scalar(sql).bind(ids).fetch_one(conn)))
            .await?;
        Ok(n as u64)
    }

    async fn watch_inserts(&self, inserts: Arc<Inserts>, silence: Duration) {
        loop {
            let listened = tokio::time::timeout(self.opts.connect_timeout, self.listen()).await;
            match listened {
                Ok(Ok(mut listener)) => {
                    inserts.set_listening(true);
                    // Rows committed while nobody listened are found by a look at the
                    // whole table.
                    inserts.committed(0);
                    relay_notifications(&mut listener, &inserts, silence).await;
                    inserts.set_listening(false);
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "LISTEN failed"),
                Err(_) => tracing::debug!("LISTEN connection: no answer in time"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

impl PgStore {
    /// A listener on the table's channel, on a connection of its own pool: if its connection
    /// goes silent, dropping it leaves sqlx's cleanup waiting on that connection alone.
    async fn listen(&self) -> Result<PgListener> {
        let pool = pool_options()
            .max_connections(1)
            .acquire_timeout(self.opts.connect_timeout)
            .connect_lazy_with((*self.pool.connect_options()).clone());
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.eager_reconnect(false);
        listener.listen(self.opts.table.as_str()).await?;
        Ok(listener)
    }
}

/// Reports notifications until the connection is lost or silent for `silence` (the leader
/// pings every look, so silence means a dead connection). The payload is the smallest id a
/// statement inserted; anything else but a ping (`outbox dead retry` sends none) asks for
/// the whole table.
async fn relay_notifications(listener: &mut PgListener, inserts: &Inserts, silence: Duration) {
    loop {
        match tokio::time::timeout(silence, listener.try_recv()).await {
            Ok(Ok(Some(n))) if n.payload() == PING => {}
            Ok(Ok(Some(n))) => inserts.committed(n.payload().parse().unwrap_or(0)),
            Ok(_) => return,
            Err(_) => {
                tracing::warn!(
                    ?silence,
                    "no notification, not even the leader's ping: reconnecting the listener"
                );
                return;
            }
        }
    }
}

/// Applies the schema in one transaction, under a lock that serializes concurrent runs.
async fn migrate(conn: &mut PgConnection, table: &TableName) -> Result<Vec<String>, sqlx::Error> {
    let history = history_table(table);
    let mut tx = conn.begin().await?;
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
        sqlx::raw_sql(AssertSqlSafe(render(m.sql, table)))
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
