//! The MySQL and MariaDB store: claims by a plain, non-locking read at READ COMMITTED (no
//! gap or next-key lock can stall the service's own inserts), marks by primary key fenced by
//! the leadership term, leadership by `GET_LOCK` on a dedicated connection that the server
//! ends when it goes silent (`wait_timeout`). MySQL has no notifications: the leader polls
//! adaptively. Every statement has a deadline.
//!
//! Statements whose lists of ids vary (the rows held, the rows confirmed) are sent as text
//! with the ids written in: they are integers, and a prepared statement per list length
//! would fill the statement cache.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlDatabaseError, MySqlPool};
use sqlx::{AssertSqlSafe, Connection, FromRow, SqlStr};

use super::deadline::Work;
use super::migrate::{Migration, history_table, render};
use super::{
    Budget, Claimed, DeadRow, Failure, Inserts, Lease, Lookout, Stats, Store, StoreOptions,
    pool_options, stmt, within,
};
use crate::message::OutboxRow;
use crate::{Error, Result, TableName};

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_outbox.sql",
        sql: include_str!("../../migrations/mysql/0001_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "0002_inbox.sql",
        sql: include_str!("../../migrations/mysql/0002_inbox.sql"),
    },
];

/// How long `outbox migrate` may take (altering a large table takes a while).
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// MySQL's error for a feature a server refuses; some Galera nodes answer `GET_LOCK` with it.
const ER_NOT_SUPPORTED_YET: u16 = 1235;

/// MySQL's error for an unknown system variable.
const ER_UNKNOWN_SYSTEM_VARIABLE: u16 = 1193;

/// Why the relay cannot lead on Galera, in one line.
const GALERA: &str = "this server is a Galera Cluster node (wsrep_on): GET_LOCK there is refused or \
     held by one node only, so relays on two nodes could both lead; keep the outbox table on a \
     server outside Galera";

/// The outbox table on MySQL 8.0.13+ or MariaDB 10.6+.
#[derive(Clone)]
pub struct MyStore {
    /// Connections for claims, marks and the CLI (leadership uses its own).
    pool: MySqlPool,
    /// Table name and retention.
    opts: StoreOptions,
    /// Statements rendered once for the table name.
    sql: Arc<Statements>,
}

/// Every statement the relay runs, with the table name in it. `claim`, `late` and `sent`
/// are completed for each use.
struct Statements {
    claim: String,
    late: String,
    sent: String,
    fence: SqlStr,
    failed: SqlStr,
    stats: SqlStr,
    look: SqlStr,
    lock_name: SqlStr,
    raise_term: SqlStr,
    term: SqlStr,
    blocked_keys: SqlStr,
    purge: SqlStr,
    dead_list: SqlStr,
    dead_page: SqlStr,
    holder: SqlStr,
    dead_retry_all: SqlStr,
    dead_retry_one: SqlStr,
}

/// Seconds since the epoch of a `TIMESTAMP(6)`, as a double.
fn epoch(column: &str) -> String {
    format!("(UNIX_TIMESTAMP({column}) + 0e0)")
}

impl Statements {
    fn new(opts: &StoreOptions) -> Self {
        let t = &opts.table;
        let sent = if opts.retention.is_zero() {
            format!("DELETE FROM {t} WHERE id IN")
        } else {
            format!(
                "UPDATE {t} SET state = 'sent', sent_at = NOW(6) WHERE state = 'pending' AND id IN"
            )
        };
        let age = format!("(UNIX_TIMESTAMP(NOW(6)) - {})", epoch("created_at"));
        let dead_list = format!(
            "SELECT message_id, ordering_key, attempts, last_error, exchange, routing_key,
                    {age} AS age_seconds
             FROM {t} WHERE state = 'dead' ORDER BY id"
        );
        Statements {
            // The ordering check reads the index of blocking rows of the key (normally
            // empty); the planner, which sees few such rows, would rather read them all.
            claim: format!(
                "SELECT o.id, o.message_id, o.exchange, o.routing_key, o.ordering_key,
                        o.message_type, CAST(o.payload AS CHAR) AS payload,
                        CAST(o.headers AS CHAR) AS headers,
                        {created_at} AS created_at, o.attempts, NULL AS previous
                 FROM {t} o
                 WHERE o.state = 'pending' AND o.next_attempt_at <= NOW(6)
                   AND (o.ordering_key IS NULL OR NOT EXISTS (
                        SELECT 1 FROM {t} e FORCE INDEX ({t}_blocking_idx)
                        WHERE e.ordering_key = o.ordering_key AND e.blocking = 1
                          AND e.id < o.id))",
                created_at = epoch("o.created_at"),
            ),
            // The latest pending row of each claimed key below the floor, held or not: read
            // off the key's index alone, one range per key. A subquery per claimed row would
            // cost a dive per row; skipping the held rows here would read each of them.
            late: format!(
                "SELECT ordering_key, MAX(id) FROM {t} FORCE INDEX ({t}_key_idx)
                 WHERE state = 'pending'"
            ),
            sent,
            // Locking read: a new leader raising the term waits for a mark under way, and a
            // mark after the raise sees the new term.
            fence: stmt(format!(
                "SELECT term FROM {t}_leader WHERE singleton = 1 AND term = ? LOCK IN SHARE MODE"
            )),
            // MySQL assigns left to right, each assignment seeing the ones before: the state
            // is decided on the attempts before this one.
            failed: stmt(format!(
                "UPDATE {t} SET state = CASE WHEN ? OR attempts + 1 >= ? THEN 'dead' ELSE 'pending' END,
                    attempts = attempts + 1, last_error = ?,
                    next_attempt_at = NOW(6) + INTERVAL ? MICROSECOND
                 WHERE id = ? AND state = 'pending'"
            )),
            stats: stmt(format!(
                "SELECT (SELECT count(*) FROM {t} WHERE state = 'pending') AS pending,
                        COALESCE((SELECT {age} FROM {t} WHERE state = 'pending'
                                  ORDER BY id LIMIT 1), 0e0) AS oldest_pending_age_seconds,
                        (SELECT count(*) FROM {t} WHERE state = 'dead') AS dead,
                        (SELECT {next} - UNIX_TIMESTAMP(NOW(6))
                         FROM {t} WHERE blocking = 1 AND state = 'pending'
                         ORDER BY next_attempt_at LIMIT 1) AS next_retry_in_seconds",
                next = epoch("next_attempt_at"),
            )),
            look: stmt(format!(
                "SELECT (SELECT max(id) FROM {t} WHERE state = 'pending') AS last_pending,
                        EXISTS (SELECT 1 FROM {t} WHERE blocking = 1 AND state = 'pending'
                                  AND next_attempt_at <= NOW(6)) AS retry_due,
                        COALESCE((SELECT {age} FROM {t} WHERE state = 'pending'
                                  ORDER BY id LIMIT 1), 0e0) AS oldest_pending_age_seconds,
                        (SELECT count(*) FROM {t} WHERE state = 'dead') AS dead,
                        IS_USED_LOCK(?) <=> CONNECTION_ID() AS held"
            )),
            // Lock names are server-wide and at most 64 characters: the database and the
            // table, hashed when longer.
            lock_name: stmt(format!(
                "SELECT IF(CHAR_LENGTH(n) <= 64, n, CONCAT(LEFT(n, 24), SHA1(n)))
                 FROM (SELECT CONCAT('outbox:', DATABASE(), '.', '{t}') AS n) x"
            )),
            raise_term: stmt(format!(
                "UPDATE {t}_leader SET term = term + 1, holder = ?, since = NOW(6)
                 WHERE singleton = 1"
            )),
            term: stmt(format!("SELECT term FROM {t}_leader WHERE singleton = 1")),
            blocked_keys: stmt(format!(
                "SELECT DISTINCT ordering_key FROM {t}
                 WHERE blocking = 1 AND ordering_key IS NOT NULL ORDER BY 1"
            )),
            purge: stmt(format!(
                "DELETE FROM {t} WHERE state = 'sent'
                   AND sent_at < NOW(6) - INTERVAL ? MICROSECOND
                 ORDER BY id LIMIT ?"
            )),
            dead_page: stmt(format!("{dead_list} LIMIT ? OFFSET ?")),
            dead_list: stmt(dead_list),
            holder: stmt(format!("SELECT holder FROM {t}_leader WHERE singleton = 1")),
            dead_retry_all: stmt(format!(
                "UPDATE {t} SET state = 'pending', attempts = 0, next_attempt_at = NOW(6)
                 WHERE state = 'dead'"
            )),
            dead_retry_one: stmt(format!(
                "UPDATE {t} SET state = 'pending', attempts = 0, next_attempt_at = NOW(6)
                 WHERE state = 'dead' AND message_id = ?"
            )),
        }
    }

    /// The claim of up to `limit` rows from `from` up, skipping `held`.
    fn claim(&self, limit: usize, from: i64, held: &[i64]) -> String {
        let mut sql = format!("{} AND o.id >= {from}", self.claim);
        if !held.is_empty() {
            sql.push_str(" AND o.id NOT IN ");
            push_ids(&mut sql, held);
        }
        let _ = write!(sql, " ORDER BY o.id LIMIT {limit}");
        sql
    }

    /// The latest pending row below `from` of each of `keys` (bound in order).
    fn late(&self, keys: usize, from: i64) -> String {
        let mut sql = format!("{} AND id < {from} AND ordering_key IN (", self.late);
        for i in 0..keys {
            sql.push_str(if i == 0 { "?" } else { ", ?" });
        }
        sql.push_str(") GROUP BY ordering_key");
        sql
    }
}

/// Appends `(id, id, …)`.
fn push_ids(sql: &mut String, ids: &[i64]) {
    sql.push('(');
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            sql.push(',');
        }
        let _ = write!(sql, "{id}");
    }
    sql.push(')');
}

impl MyStore {
    /// A store on `pool` (which may be lazy: a database that is down is not an error here).
    /// The table name is taken in lower case, as on PostgreSQL, so that every replica
    /// names one table and one lock alike.
    pub fn new(pool: MySqlPool, mut opts: StoreOptions) -> Self {
        opts.table = TableName::new(&opts.table.as_str().to_ascii_lowercase())
            .expect("a valid name in lower case is valid");
        let sql = Arc::new(Statements::new(&opts));
        MyStore { pool, opts, sql }
    }

    /// A store with a small lazy pool for `url` (`mysql://` or `mariadb://`): nothing
    /// connects until first used. Its sessions run at READ COMMITTED, and on MariaDB a
    /// session left idle inside a transaction for `OUTBOX_LEASE_TIMEOUT` is ended by the
    /// server: a mark cut off mid-transaction by a host that vanished would otherwise hold
    /// its share lock on `<table>_leader` for `wait_timeout` (8 h), and no standby could
    /// raise the term.
    pub fn connect_lazy(url: &str, opts: StoreOptions) -> Result<Self> {
        let connect = connect_options(url)?;
        let idle = opts.lease_timeout.as_secs_f64().ceil().max(1.0) as u64;
        let pool = pool_options()
            .max_connections(4)
            .min_connections(2)
            .acquire_timeout(opts.connect_timeout)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    sqlx::raw_sql("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .execute(&mut *conn)
                        .await?;
                    let sql = format!("SET SESSION idle_transaction_timeout = {idle}");
                    match sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *conn).await {
                        // MySQL has no such variable (1193); its marks are fenced all the same.
                        Err(e) if unknown_variable(&e) => Ok(()),
                        done => done.map(drop),
                    }
                })
            })
            .connect_lazy_with(connect);
        Ok(Self::new(pool, opts))
    }

    /// The connection pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Runs `work` on a pooled connection within the query timeout.
    async fn within<T, F>(&self, work: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut MySqlConnection) -> Work<'c, T>,
    {
        within(&self.pool, self.opts.query_timeout, work).await
    }
}

/// The connect options of a `mysql://` or `mariadb://` URL.
pub fn connect_options(url: &str) -> Result<MySqlConnectOptions> {
    let url = match url.strip_prefix("mariadb://") {
        Some(rest) => format!("mysql://{rest}"),
        None => url.to_owned(),
    };
    Ok(url.parse()?)
}

/// Leadership: a named lock (`GET_LOCK`) held by the session of a dedicated connection,
/// released by the server when the session ends; `wait_timeout` ends it when the relay goes
/// silent.
pub struct MyLease {
    /// The connection that holds (or tries to take) the lock.
    conn: MySqlConnection,
    /// The lock's name.
    name: String,
    /// The statements, for the look at the table.
    sql: Arc<Statements>,
    /// Who this relay is, recorded when it takes the leadership.
    holder: String,
}

impl Lease for MyLease {
    async fn try_acquire(&mut self) -> Result<Option<i64>> {
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 0)")
            .bind(&self.name)
            .fetch_one(&mut self.conn)
            .await
            .map_err(galera)?;
        if got != Some(1) {
            return Ok(None);
        }
        sqlx::query(self.sql.raise_term.clone())
            .bind(&self.holder)
            .execute(&mut self.conn)
            .await?;
        let term = sqlx::query_scalar(self.sql.term.clone())
            .fetch_one(&mut self.conn)
            .await?;
        Ok(Some(term))
    }

    async fn look(&mut self) -> Result<Lookout> {
        let (last_pending, retry_due, oldest_pending_age_seconds, dead, held): (_, i64, _, _, i64) =
            sqlx::query_as(self.sql.look.clone())
                .bind(&self.name)
                .fetch_one(&mut self.conn)
                .await?;
        if held != 1 {
            return Err(Error::LeaseLost);
        }
        Ok(Lookout {
            last_pending,
            retry_due: retry_due != 0,
            oldest_pending_age_seconds,
            dead,
        })
    }
}

/// MySQL's error for a system variable the server does not know.
fn unknown_variable(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.try_downcast_ref::<MySqlDatabaseError>())
        .is_some_and(|db| db.number() == ER_UNKNOWN_SYSTEM_VARIABLE)
}

/// A server refusing `GET_LOCK` is a Galera node: say so in one line, not as a database error.
fn galera(e: sqlx::Error) -> Error {
    let refused = e
        .as_database_error()
        .and_then(|db| db.try_downcast_ref::<MySqlDatabaseError>())
        .is_some_and(|db| db.number() == ER_NOT_SUPPORTED_YET);
    if refused {
        Error::Unsupported(GALERA)
    } else {
        e.into()
    }
}

/// Refuses a Galera node, where MariaDB grants `GET_LOCK` on the node asked alone: a relay
/// on another node would get the same lock.
async fn refuse_galera(conn: &mut MySqlConnection) -> Result<()> {
    let wsrep: Option<(String, String)> = sqlx::query_as("SHOW GLOBAL VARIABLES LIKE 'wsrep_on'")
        .fetch_optional(conn)
        .await?;
    match wsrep {
        Some((_, on)) if on.eq_ignore_ascii_case("ON") => Err(Error::Unsupported(GALERA)),
        _ => Ok(()),
    }
}

impl Store for MyStore {
    type Lease = MyLease;

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

    async fn lease(&self) -> Result<MyLease> {
        let options = self.pool.connect_options();
        let connect = MySqlConnection::connect_with(&options);
        let mut conn = tokio::time::timeout(self.opts.connect_timeout, connect)
            .await
            .map_err(|_| Error::Timeout(self.opts.connect_timeout))??;
        // The server ends a session silent for wait_timeout (whole seconds), and with it
        // the lock: a leader whose host vanished loses the table.
        let seconds = self.opts.lease_timeout.as_secs_f64().ceil().max(1.0) as u64;
        let setup = async {
            sqlx::raw_sql(AssertSqlSafe(format!(
                "SET SESSION wait_timeout = {seconds}"
            )))
            .execute(&mut conn)
            .await?;
            refuse_galera(&mut conn).await?;
            let name: String = sqlx::query_scalar(self.sql.lock_name.clone())
                .fetch_one(&mut conn)
                .await?;
            Ok::<_, Error>(name)
        };
        let name = tokio::time::timeout(self.opts.query_timeout, setup)
            .await
            .map_err(|_| Error::Timeout(self.opts.query_timeout))??;
        Ok(MyLease {
            conn,
            name,
            sql: self.sql.clone(),
            holder: self.opts.holder.clone(),
        })
    }

    /// Rows from `from` up; each row with a key names the latest pending row of its key
    /// below `from`, held or not (rows from `from` up come in this claim, in order, or are
    /// held, and the leader keeps the held rows' order).
    async fn claim(&self, limit: usize, from: i64, held: &[i64], bytes: usize) -> Result<Claimed> {
        let above: Vec<i64> = held.iter().copied().filter(|&id| id >= from).collect();
        let claim = self.sql.claim(limit, from, &above);
        let sql = self.sql.clone();
        self.within(move |conn| {
            Box::pin(async move {
                let read = sqlx::raw_sql(AssertSqlSafe(claim))
                    .fetch(&mut *conn)
                    .map(|row| row.and_then(|row| OutboxRow::from_row(&row)));
                let mut claimed = Budget::new(bytes).fill(read).await?;
                let rows = &mut claimed.rows;
                let keys: BTreeSet<&str> = rows
                    .iter()
                    .filter_map(|r| r.ordering_key.as_deref())
                    .collect();
                if from <= 0 || keys.is_empty() {
                    return Ok(claimed);
                }
                let late_sql = sql.late(keys.len(), from);
                let mut query = sqlx::query_as(AssertSqlSafe(late_sql)).persistent(false);
                for key in keys {
                    query = query.bind(key.to_owned());
                }
                let late: HashMap<String, i64> =
                    query.fetch_all(&mut *conn).await?.into_iter().collect();
                for row in rows.iter_mut() {
                    row.previous = row
                        .ordering_key
                        .as_ref()
                        .and_then(|key| late.get(key).copied());
                }
                Ok(claimed)
            })
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
        let sql = self.sql.clone();
        let sent = (!sent.is_empty()).then(|| {
            let mut delete = sql.sent.clone();
            delete.push(' ');
            push_ids(&mut delete, sent);
            delete
        });
        let failed = failed.to_vec();
        let ours = self
            .within(move |conn| {
                Box::pin(async move {
                    let mut tx = conn.begin().await?;
                    let fence: Option<i64> = sqlx::query_scalar(sql.fence.clone())
                        .bind(term)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if fence.is_none() {
                        return Ok(false);
                    }
                    if let Some(sent) = sent {
                        sqlx::raw_sql(AssertSqlSafe(sent)).execute(&mut *tx).await?;
                    }
                    for f in &failed {
                        sqlx::query(sql.failed.clone())
                            .bind(f.permanent)
                            .bind(max_attempts)
                            .bind(&f.error)
                            .bind(f.retry_in.as_micros() as i64)
                            .bind(f.id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    Ok(true)
                })
            })
            .await?;
        if ours { Ok(()) } else { Err(Error::LeaseLost) }
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
        let retention = self.opts.retention.as_micros() as i64;
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
        let sql = self.sql.clone();
        let ids = message_ids.map(<[String]>::to_vec);
        self.within(move |conn| {
            Box::pin(async move {
                let Some(ids) = ids else {
                    let done = sqlx::query(sql.dead_retry_all.clone())
                        .execute(&mut *conn)
                        .await?;
                    return Ok(done.rows_affected());
                };
                let mut tx = conn.begin().await?;
                let mut n = 0;
                for id in ids {
                    let done = sqlx::query(sql.dead_retry_one.clone())
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    n += done.rows_affected();
                }
                tx.commit().await?;
                Ok(n)
            })
        })
        .await
    }

    /// MySQL has no notifications: the leader polls adaptively (again at once after a claim
    /// that found rows, backing off to `OUTBOX_POLL_INTERVAL` when quiet).
    async fn watch_inserts(&self, _inserts: Arc<Inserts>, _silence: Duration) {}
}

/// Applies the schema under a named lock that serializes concurrent runs. MySQL commits
/// each DDL statement at once, so every step is written to be applied again safely.
async fn migrate(
    conn: &mut MySqlConnection,
    table: &TableName,
) -> Result<Vec<String>, sqlx::Error> {
    let history = history_table(table);
    let lock = format!("outbox-migrate:{history}");
    let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(LEFT(?, 64), 60)")
        .bind(&lock)
        .fetch_one(&mut *conn)
        .await?;
    if locked != Some(1) {
        return Err(sqlx::Error::Protocol(format!(
            "another `outbox migrate` held the lock {lock} for 60 s"
        )));
    }
    let applied = apply(conn, &history, table).await;
    sqlx::query("DO RELEASE_LOCK(LEFT(?, 64))")
        .bind(&lock)
        .execute(&mut *conn)
        .await?;
    applied
}

async fn apply(
    conn: &mut MySqlConnection,
    history: &str,
    table: &TableName,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {history} (
            version BIGINT PRIMARY KEY,
            name VARCHAR(255) NOT NULL,
            applied_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
         ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4"
    )))
    .execute(&mut *conn)
    .await?;
    let done: Vec<i64> =
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT version FROM {history}")))
            .fetch_all(&mut *conn)
            .await?;
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        sqlx::raw_sql(AssertSqlSafe(render(m.sql, table)))
            .execute(&mut *conn)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {history} (version, name) VALUES (?, ?)"
        )))
        .bind(m.version)
        .bind(m.name)
        .execute(&mut *conn)
        .await?;
        applied.push(m.name.to_owned());
    }
    Ok(applied)
}
