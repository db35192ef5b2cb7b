//! The database a relay test runs on, on either backend: [`Db`] creates a database of its own
//! on PostgreSQL or MariaDB/MySQL, migrates it and drops it at the end, and exposes what the
//! tests do to it without naming the backend. Every piece of SQL that differs between the
//! backends is in this file; [`on_both_backends!`](crate::on_both_backends) turns one test
//! body into a test per backend.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Deref;
use std::process::{Command, Output};

use outbox::store::mysql::MyStore;
use outbox::store::postgres::PgStore;
use outbox::{Message, Store, StoreOptions, TableName};
use sqlx::mysql::{MySqlConnection, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, MySql, PgPool, Postgres, Transaction};

use super::{START_HINT, TestDb, outbox_bin, pg_server, unique};

/// Generates, for each `async fn name(backend: Backend) { .. }`, a module `name` holding the
/// tests `postgres` and `mysql`, which run the body on that backend. The attributes written
/// above the function (`#[tokio::test(flavor = "multi_thread")]`, docs) go on both tests.
/// rustfmt leaves the block alone: to format it, write `mod x {` for `on_both_backends! {`,
/// run rustfmt on the file, and write it back.
#[macro_export]
macro_rules! on_both_backends {
    ($(
        $(#[$attr:meta])*
        async fn $name:ident($backend:ident: Backend $(,)?) $body:block
    )*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn test_body($backend: $crate::common::db::Backend) $body

            $(#[$attr])*
            async fn postgres() {
                test_body($crate::common::db::Backend::Postgres).await
            }

            $(#[$attr])*
            async fn mysql() {
                test_body($crate::common::db::Backend::Mysql).await
            }
        }
    )*};
}

/// Runs `body` with the type alias `$store` naming the backend's store type
/// (`PgStore` or `MyStore`): `for_store!(backend, |S| check::<S>(&db).await)`.
#[macro_export]
macro_rules! for_store {
    ($backend:expr, |$store:ident| $body:expr) => {
        match $backend {
            $crate::common::db::Backend::Postgres => {
                type $store = outbox::store::postgres::PgStore;
                $body
            }
            $crate::common::db::Backend::Mysql => {
                type $store = outbox::store::mysql::MyStore;
                $body
            }
        }
    };
}

/// The database server a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL, at `OUTBOX_TEST_PG`.
    Postgres,
    /// MariaDB or MySQL, at `OUTBOX_TEST_MYSQL`.
    Mysql,
}

/// The MariaDB/MySQL server the test databases are created on (`OUTBOX_TEST_MYSQL`).
pub fn mysql_server() -> String {
    std::env::var("OUTBOX_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

impl Backend {
    /// The server's URL, without a database.
    pub fn server(self) -> String {
        match self {
            Backend::Postgres => pg_server(),
            Backend::Mysql => mysql_server(),
        }
    }

    /// The server's address: where a fault proxy forwards to.
    pub fn addr(self) -> SocketAddr {
        let url = url::Url::parse(&self.server()).expect("a database server URL");
        let default = match self {
            Backend::Postgres => 5432,
            Backend::Mysql => 3306,
        };
        let host = url.host_str().unwrap_or("127.0.0.1");
        (host, url.port().unwrap_or(default))
            .to_socket_addrs()
            .unwrap()
            .next()
            .unwrap()
    }

    /// The URL scheme of the backend, as `DATABASE_URL` spells it.
    pub fn scheme(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Mysql => "mysql",
        }
    }
}

/// A pool on the test database.
#[derive(Clone, Debug)]
pub enum Pool {
    Pg(PgPool),
    My(MySqlPool),
}

/// A database of its own on `backend`, migrated, dropped when the test ends. It derefs to a
/// [`DbHandle`], the cloneable part that inserts and reads rows.
pub struct Db {
    pub backend: Backend,
    pub name: String,
    pub url: String,
    pub table: TableName,
    handle: DbHandle,
    /// The PostgreSQL database, dropped with it (PostgreSQL only).
    _pg: Option<TestDb>,
    /// Drops the MariaDB database and users (MySQL only).
    _my: Option<MyDrop>,
}

impl Deref for Db {
    type Target = DbHandle;

    fn deref(&self) -> &DbHandle {
        &self.handle
    }
}

impl Db {
    pub async fn new(backend: Backend) -> Self {
        Self::with_table(backend, "outbox").await
    }

    pub async fn with_table(backend: Backend, table: &str) -> Self {
        match backend {
            Backend::Postgres => {
                let pg = TestDb::with_table(table).await;
                Db {
                    backend,
                    name: pg.name.clone(),
                    url: pg.url.clone(),
                    table: pg.table.clone(),
                    handle: DbHandle {
                        backend,
                        table: pg.table.clone(),
                        pool: Pool::Pg(pg.pool.clone()),
                    },
                    _pg: Some(pg),
                    _my: None,
                }
            }
            Backend::Mysql => Self::mysql(table).await,
        }
    }

    async fn mysql(table: &str) -> Self {
        let name = unique("outbox_t");
        let admin = mysql_admin().await;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let guard = MyDrop {
            name: name.clone(),
            users: Default::default(),
        };
        let url = format!("{}/{name}", mysql_server());
        let pool = MySqlPoolOptions::new()
            .max_connections(20)
            .connect(&url)
            .await
            .unwrap();
        let table = TableName::new(table).unwrap();
        let db = Db {
            backend: Backend::Mysql,
            name,
            url,
            table: table.clone(),
            handle: DbHandle {
                backend: Backend::Mysql,
                table,
                pool: Pool::My(pool),
            },
            _pg: None,
            _my: Some(guard),
        };
        db.migrate().await;
        db
    }

    /// Applies the schema with the store's `migrate()`.
    async fn migrate(&self) {
        let opts = self.store_options();
        let applied = match &self.pool {
            Pool::Pg(p) => PgStore::new(p.clone(), opts).migrate().await,
            Pool::My(p) => MyStore::new(p.clone(), opts).migrate().await,
        };
        applied.expect("migrate");
    }

    /// The documented store options for this database's table.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions::new(self.table.clone())
    }

    /// A clone of the part that inserts and reads, for tasks.
    pub fn handle(&self) -> DbHandle {
        self.handle.clone()
    }

    /// The `outbox` binary with `DATABASE_URL` and `OUTBOX_TABLE` set for this database.
    pub fn outbox(&self) -> Command {
        let mut cmd = outbox_bin();
        cmd.env("DATABASE_URL", &self.url)
            .env("OUTBOX_TABLE", self.table.as_str());
        cmd
    }

    /// Runs an `outbox` command to completion against this database.
    pub fn run_outbox(&self, args: &[&str]) -> Output {
        self.outbox().args(args).output().unwrap()
    }

    /// This database's URL with the server's address replaced by `addr` (a fault proxy).
    pub fn url_at(&self, addr: SocketAddr) -> String {
        let server = self.backend.addr();
        let url = url::Url::parse(&self.url).unwrap();
        let at = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
        assert!(
            self.url.contains(&at) && at.parse::<SocketAddr>().ok() == Some(server),
            "test server URL {} must name its address as host:port",
            self.url
        );
        self.url.replacen(&at, &addr.to_string(), 1)
    }

    /// A URL of this database for a user with `password`. PostgreSQL (trust) ignores the
    /// password; on MySQL a user of this test is created with it.
    pub async fn url_with_password(&self, password: &str) -> String {
        let mut url = url::Url::parse(&self.url).unwrap();
        match &self.pool {
            Pool::Pg(_) => {}
            Pool::My(p) => {
                let user = unique("u");
                let user = &user[..30]; // MariaDB user names: at most 80 chars, MySQL 32
                self._my
                    .as_ref()
                    .unwrap()
                    .users
                    .lock()
                    .unwrap()
                    .push(user.into());
                sqlx::query(AssertSqlSafe(format!(
                    "CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"
                )))
                .execute(p)
                .await
                .unwrap();
                sqlx::query(AssertSqlSafe(format!(
                    "GRANT ALL ON {}.* TO '{user}'@'%'",
                    self.name
                )))
                .execute(p)
                .await
                .unwrap();
                url.set_username(user).unwrap();
            }
        }
        url.set_password(Some(password)).unwrap();
        url.to_string()
    }

    /// The PostgreSQL pool, for a PostgreSQL-only check.
    pub fn pg(&self) -> &PgPool {
        match &self.pool {
            Pool::Pg(p) => p,
            Pool::My(_) => panic!("a PostgreSQL-only check ran on MySQL"),
        }
    }

    /// The MySQL pool, for a MySQL-only check.
    pub fn my(&self) -> &MySqlPool {
        match &self.pool {
            Pool::My(p) => p,
            Pool::Pg(_) => panic!("a MySQL-only check ran on PostgreSQL"),
        }
    }

    /// Ends the sessions that hold the table's leadership (as if the leader's host had
    /// vanished and the database had noticed).
    pub async fn end_lease_sessions(&self) {
        match &self.pool {
            Pool::Pg(p) => {
                sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'outbox relay lease' AND datname = current_database()")
                    .execute(p)
                    .await
                    .unwrap();
            }
            Pool::My(p) => {
                // The lease holds a named lock, `outbox:<database>.<table>`.
                let holder: Option<i64> = sqlx::query_scalar(
                    "SELECT CAST(IS_USED_LOCK(CONCAT('outbox:', DATABASE(), '.', ?)) AS SIGNED)",
                )
                .bind(self.table.as_str().to_ascii_lowercase())
                .fetch_one(p)
                .await
                .unwrap();
                if let Some(id) = holder {
                    sqlx::query(AssertSqlSafe(format!("KILL {id}")))
                        .execute(p)
                        .await
                        .unwrap();
                }
            }
        }
    }
}

/// A store of the backend's type on a test database.
pub trait TestStore: Store {
    fn open(db: &Db, opts: StoreOptions) -> Self;
}

impl TestStore for PgStore {
    fn open(db: &Db, opts: StoreOptions) -> Self {
        PgStore::new(db.pg().clone(), opts)
    }
}

impl TestStore for MyStore {
    fn open(db: &Db, opts: StoreOptions) -> Self {
        MyStore::new(db.my().clone(), opts)
    }
}

/// Connects to the MariaDB server, or fails saying how to start it.
async fn mysql_admin() -> MySqlPool {
    MySqlPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(&mysql_server())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "MariaDB/MySQL is not reachable at {} ({e}): {START_HINT}",
                mysql_server()
            )
        })
}

/// Drops a MariaDB test database (after ending the sessions still in it) and its users.
struct MyDrop {
    name: String,
    users: std::sync::Mutex<Vec<String>>,
}

impl Drop for MyDrop {
    fn drop(&mut self) {
        let name = self.name.clone();
        let users = std::mem::take(&mut *self.users.lock().unwrap());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Ok(admin) = MySqlPool::connect(&mysql_server()).await else {
                    return;
                };
                // An open transaction in the database would hold DROP DATABASE on its
                // metadata lock: end every session in it first.
                let sessions: Vec<i64> = sqlx::query_scalar(
                    "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST WHERE DB = ? AND ID <> CONNECTION_ID()",
                )
                .bind(&name)
                .fetch_all(&admin)
                .await
                .unwrap_or_default();
                for id in sessions {
                    let _ = sqlx::query(AssertSqlSafe(format!("KILL {id}")))
                        .execute(&admin)
                        .await;
                }
                let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")))
                    .execute(&admin)
                    .await;
                for user in users {
                    let _ = sqlx::query(AssertSqlSafe(format!("DROP USER IF EXISTS '{user}'@'%'")))
                        .execute(&admin)
                        .await;
                }
            })
        })
        .join();
    }
}

/// A row a service writes, with plain SQL. `message_id` and `headers` left `None` take the
/// column defaults.
#[derive(Debug, Clone)]
pub struct Row {
    pub message_id: Option<String>,
    pub exchange: String,
    pub routing_key: String,
    pub ordering_key: Option<String>,
    pub message_type: Option<String>,
    pub payload: serde_json::Value,
    pub headers: Option<serde_json::Value>,
}

impl Row {
    /// A row for the default exchange.
    pub fn new(routing_key: &str, payload: serde_json::Value) -> Self {
        Row {
            message_id: None,
            exchange: String::new(),
            routing_key: routing_key.into(),
            ordering_key: None,
            message_type: None,
            payload,
            headers: None,
        }
    }

    pub fn exchange(mut self, exchange: &str) -> Self {
        self.exchange = exchange.into();
        self
    }

    pub fn key(mut self, ordering_key: &str) -> Self {
        self.ordering_key = Some(ordering_key.into());
        self
    }

    pub fn message_type(mut self, message_type: &str) -> Self {
        self.message_type = Some(message_type.into());
        self
    }

    pub fn headers(mut self, headers: serde_json::Value) -> Self {
        self.headers = Some(headers);
        self
    }

    pub fn message_id(mut self, message_id: &str) -> Self {
        self.message_id = Some(message_id.into());
        self
    }
}

/// The columns a service writes, in the order [`insert_sql`] binds them.
const COLUMNS: &str =
    "message_id, exchange, routing_key, ordering_key, message_type, payload, headers";

/// `INSERT INTO table (COLUMNS) VALUES ...` for `rows`, with the values to bind in order (a
/// `None` column of `message_id` and `headers` is written `DEFAULT`, not bound).
fn insert_sql(backend: Backend, table: &TableName, rows: &[Row]) -> (String, Vec<Option<String>>) {
    let mut binds: Vec<Option<String>> = Vec::new();
    let mut param = |value: Option<String>, cast: &str| {
        binds.push(value);
        match backend {
            Backend::Postgres => format!("${}{cast}", binds.len()),
            Backend::Mysql => "?".to_owned(),
        }
    };
    let tuples: Vec<String> = rows
        .iter()
        .map(|r| {
            let id = match &r.message_id {
                Some(id) => param(Some(id.clone()), "::uuid"),
                None => "DEFAULT".into(),
            };
            let exchange = param(Some(r.exchange.clone()), "");
            let routing_key = param(Some(r.routing_key.clone()), "");
            let ordering_key = param(r.ordering_key.clone(), "::text");
            let message_type = param(r.message_type.clone(), "::text");
            let payload = param(Some(r.payload.to_string()), "::jsonb");
            let headers = match &r.headers {
                Some(h) => param(Some(h.to_string()), "::jsonb"),
                None => "DEFAULT".into(),
            };
            format!(
                "({id}, {exchange}, {routing_key}, {ordering_key}, {message_type}, {payload}, {headers})"
            )
        })
        .collect();
    let sql = format!(
        "INSERT INTO {table} ({COLUMNS}) VALUES {}",
        tuples.join(", ")
    );
    (sql, binds)
}

/// Inserts one row through `conn`; returns its message id.
async fn insert_pg(
    conn: &mut PgConnection,
    table: &TableName,
    row: &Row,
) -> Result<String, sqlx::Error> {
    let (sql, binds) = insert_sql(Backend::Postgres, table, std::slice::from_ref(row));
    let mut query = sqlx::query_scalar(AssertSqlSafe(sql + " RETURNING message_id::text"));
    for b in binds {
        query = query.bind(b);
    }
    query.fetch_one(conn).await
}

/// Inserts one row through `conn`; returns its message id (read back by its id when the
/// column default made it, as MySQL has no RETURNING: in the same transaction, or the relay
/// may have published and deleted the row already).
async fn insert_my(
    conn: &mut MySqlConnection,
    table: &TableName,
    row: &Row,
) -> Result<String, sqlx::Error> {
    let (sql, binds) = insert_sql(Backend::Mysql, table, std::slice::from_ref(row));
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for b in binds {
        query = query.bind(b);
    }
    let done = query.execute(&mut *conn).await?;
    if let Some(id) = &row.message_id {
        return Ok(id.clone());
    }
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT message_id FROM {table} WHERE id = ?"
    )))
    .bind(done.last_insert_id())
    .fetch_one(conn)
    .await
}

/// What the tests do to a test database, for either backend; cheap to clone into tasks.
#[derive(Clone, Debug)]
pub struct DbHandle {
    pub backend: Backend,
    pub table: TableName,
    pub pool: Pool,
}

impl DbHandle {
    /// Inserts one row on the default exchange, as a service in any language would; returns
    /// its message id.
    pub async fn insert(
        &self,
        routing_key: &str,
        ordering_key: Option<&str>,
        payload: serde_json::Value,
    ) -> String {
        let mut row = Row::new(routing_key, payload);
        row.ordering_key = ordering_key.map(Into::into);
        self.insert_row(&row).await
    }

    /// Inserts `row` in a transaction of its own; returns its message id.
    pub async fn insert_row(&self, row: &Row) -> String {
        self.try_insert_row(row).await.unwrap()
    }

    /// Inserts `row`, which names its message id, reporting a failure instead of panicking
    /// (a producer during faults).
    pub async fn try_insert_row(&self, row: &Row) -> Result<String, sqlx::Error> {
        match &self.pool {
            Pool::Pg(p) => {
                let mut conn = p.acquire().await?;
                insert_pg(&mut conn, &self.table, row).await
            }
            Pool::My(p) => {
                // A transaction, so that reading the id back finds the row before the relay
                // has published and deleted it.
                let mut tx = p.begin().await?;
                let id = insert_my(&mut tx, &self.table, row).await?;
                tx.commit().await?;
                Ok(id)
            }
        }
    }

    /// Inserts `rows` in one transaction, in order (their ids increase in order), 1000 to a
    /// statement; rows without a message id get a random one. Returns the message ids.
    pub async fn insert_rows(&self, rows: &[Row]) -> Vec<String> {
        let rows: Vec<Row> = rows
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.message_id
                    .get_or_insert_with(|| uuid::Uuid::new_v4().to_string());
                r
            })
            .collect();
        let mut tx = self.begin().await;
        for chunk in rows.chunks(1000) {
            let (sql, binds) = insert_sql(self.backend, &self.table, chunk);
            match &mut tx.tx {
                AnyTx::Pg(t) => {
                    let mut q = sqlx::query(AssertSqlSafe(sql));
                    for b in binds {
                        q = q.bind(b);
                    }
                    q.execute(&mut **t).await.unwrap();
                }
                AnyTx::My(t) => {
                    let mut q = sqlx::query(AssertSqlSafe(sql));
                    for b in binds {
                        q = q.bind(b);
                    }
                    q.execute(&mut **t).await.unwrap();
                }
            }
        }
        tx.commit().await;
        rows.into_iter().map(|r| r.message_id.unwrap()).collect()
    }

    /// Begins a service transaction: what it inserts is published only once it commits.
    pub async fn begin(&self) -> ServiceTx {
        let tx = match &self.pool {
            Pool::Pg(p) => AnyTx::Pg(p.begin().await.unwrap()),
            Pool::My(p) => AnyTx::My(p.begin().await.unwrap()),
        };
        ServiceTx {
            table: self.table.clone(),
            tx,
        }
    }

    /// Rows of the table where `condition` (portable SQL) holds.
    pub async fn count(&self, condition: &str) -> i64 {
        self.scalar(&format!(
            "SELECT count(*) FROM {} WHERE {condition}",
            self.table
        ))
        .await
    }

    /// The message ids of the rows still in the table.
    pub async fn message_ids(&self) -> HashSet<String> {
        self.message_ids_where("1 = 1").await
    }

    /// The message ids of the rows where `condition` (portable SQL) holds.
    pub async fn message_ids_where(&self, condition: &str) -> HashSet<String> {
        let sql = match self.backend {
            Backend::Postgres => "SELECT message_id::text FROM",
            Backend::Mysql => "SELECT message_id FROM",
        };
        self.strings(&format!("{sql} {} WHERE {condition}", self.table))
            .await
            .into_iter()
            .collect()
    }

    /// The `id` of a row.
    pub async fn row_id(&self, message_id: &str) -> i64 {
        let sql = match self.backend {
            Backend::Postgres => "SELECT id FROM {t} WHERE message_id = $1::uuid",
            Backend::Mysql => "SELECT id FROM {t} WHERE message_id = ?",
        };
        let sql = sql.replace("{t}", self.table.as_str());
        match &self.pool {
            Pool::Pg(p) => sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(message_id)
                .fetch_one(p)
                .await
                .unwrap(),
            Pool::My(p) => sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(message_id)
                .fetch_one(p)
                .await
                .unwrap(),
        }
    }

    /// A row's `created_at` in seconds since the epoch.
    pub async fn created_epoch(&self, message_id: &str) -> f64 {
        let sql = match self.backend {
            Backend::Postgres => {
                "SELECT extract(epoch FROM created_at)::float8 FROM {t} WHERE message_id = $1::uuid"
            }
            Backend::Mysql => {
                "SELECT UNIX_TIMESTAMP(created_at) + 0e0 FROM {t} WHERE message_id = ?"
            }
        };
        let sql = sql.replace("{t}", self.table.as_str());
        match &self.pool {
            Pool::Pg(p) => sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(message_id)
                .fetch_one(p)
                .await
                .unwrap(),
            Pool::My(p) => sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(message_id)
                .fetch_one(p)
                .await
                .unwrap(),
        }
    }

    /// Runs one statement of SQL that both backends understand.
    pub async fn execute(&self, sql: &str) {
        let sql = AssertSqlSafe(sql.to_owned());
        match &self.pool {
            Pool::Pg(p) => drop(sqlx::query(sql).execute(p).await.unwrap()),
            Pool::My(p) => drop(sqlx::query(sql).execute(p).await.unwrap()),
        }
    }

    /// The integer a query (SQL that both backends understand) answers.
    pub async fn scalar(&self, sql: &str) -> i64 {
        self.try_scalar(sql).await.unwrap()
    }

    /// The integer a query answers, or the error (a database that is being restarted).
    pub async fn try_scalar(&self, sql: &str) -> Result<i64, sqlx::Error> {
        let sql = AssertSqlSafe(sql.to_owned());
        match &self.pool {
            Pool::Pg(p) => sqlx::query_scalar(sql).fetch_one(p).await,
            Pool::My(p) => sqlx::query_scalar(sql).fetch_one(p).await,
        }
    }

    /// The strings a query answers, one per row.
    pub async fn strings(&self, sql: &str) -> Vec<String> {
        let sql = AssertSqlSafe(sql.to_owned());
        match &self.pool {
            Pool::Pg(p) => sqlx::query_scalar(sql).fetch_all(p).await.unwrap(),
            Pool::My(p) => sqlx::query_scalar(sql).fetch_all(p).await.unwrap(),
        }
    }
}

/// A service's open transaction.
pub struct ServiceTx {
    table: TableName,
    tx: AnyTx,
}

enum AnyTx {
    Pg(Transaction<'static, Postgres>),
    My(Transaction<'static, MySql>),
}

impl ServiceTx {
    /// Inserts `row` with plain SQL; returns its message id.
    pub async fn insert(&mut self, row: &Row) -> String {
        match &mut self.tx {
            AnyTx::Pg(t) => insert_pg(t, &self.table, row).await.unwrap(),
            AnyTx::My(t) => insert_my(t, &self.table, row).await.unwrap(),
        }
    }

    /// Writes `messages` with the library's `enqueue_all`.
    pub async fn enqueue_all(&mut self, messages: &[Message]) -> outbox::Result<()> {
        match &mut self.tx {
            AnyTx::Pg(t) => outbox::enqueue_all(&mut **t, &self.table, messages).await,
            AnyTx::My(t) => outbox::enqueue_all(&mut **t, &self.table, messages).await,
        }
    }

    /// Writes one message with the library's `enqueue` (into the default table).
    pub async fn enqueue(&mut self, message: &Message) -> outbox::Result<()> {
        match &mut self.tx {
            AnyTx::Pg(t) => outbox::enqueue(&mut **t, message).await,
            AnyTx::My(t) => outbox::enqueue(&mut **t, message).await,
        }
    }

    pub async fn commit(self) {
        match self.tx {
            AnyTx::Pg(t) => t.commit().await.unwrap(),
            AnyTx::My(t) => t.commit().await.unwrap(),
        }
    }

    pub async fn rollback(self) {
        match self.tx {
            AnyTx::Pg(t) => t.rollback().await.unwrap(),
            AnyTx::My(t) => t.rollback().await.unwrap(),
        }
    }
}

/// Where an inbox consumer of a test's messages keeps its records and effects. The inbox is
/// PostgreSQL's: on PostgreSQL it is the test's own database, on MySQL a PostgreSQL database
/// of its own.
pub struct InboxDb {
    pub pool: PgPool,
    _own: Option<TestDb>,
}

impl InboxDb {
    pub async fn for_db(db: &Db) -> Self {
        match &db.pool {
            Pool::Pg(p) => InboxDb {
                pool: p.clone(),
                _own: None,
            },
            Pool::My(_) => {
                let own = TestDb::new().await;
                InboxDb {
                    pool: own.pool.clone(),
                    _own: Some(own),
                }
            }
        }
    }
}
