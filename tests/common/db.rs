//! The database a test runs on, on either backend: [`Db`] creates a database of its own
//! on PostgreSQL or MariaDB/MySQL, migrates it and drops it at the end, and exposes what the
//! tests do to it without naming the backend. Every piece of SQL that differs between the
//! backends is in this file; [`on_both_backends!`](crate::on_both_backends) turns one test
//! body into a test per backend.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Deref;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use outbox::store::mysql::MyStore;
use outbox::store::postgres::PgStore;
use outbox::{Message, Store, StoreOptions, TableName};
use sqlx::mysql::{MySqlConnection, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::postgres::{PgConnection, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, FromRow, MySql, PgPool, Postgres, Transaction};

use super::{START_HINT, outbox_bin, pg_server, unique};

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

    /// The URL scheme of the backend, as `DATABASE_URL` spells it; also the folder of its
    /// migrations.
    pub fn scheme(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Mysql => "mysql",
        }
    }

    /// Where test databases are created and dropped from.
    fn admin_url(self) -> String {
        match self {
            Backend::Postgres => format!("{}/postgres", pg_server()),
            Backend::Mysql => mysql_server(),
        }
    }

    /// A column type for an increasing id that is the table's primary key.
    pub fn auto_id(self) -> &'static str {
        match self {
            Backend::Postgres => "BIGSERIAL PRIMARY KEY",
            Backend::Mysql => "BIGINT AUTO_INCREMENT PRIMARY KEY",
        }
    }
}

/// A pool on a test database, of either backend.
#[derive(Clone, Debug)]
pub enum Pool {
    Pg(PgPool),
    My(MySqlPool),
}

impl Pool {
    /// A pool of at most `max` connections on `url`, a database of `backend`; fails the test
    /// saying how to start the server when it is not reachable.
    pub async fn connect(backend: Backend, url: &str, max: u32) -> Pool {
        Self::try_connect(backend, url, max, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{backend:?} is not reachable at {url} ({e}): {START_HINT}"))
    }

    async fn try_connect(
        backend: Backend,
        url: &str,
        max: u32,
        timeout: Duration,
    ) -> Result<Pool, sqlx::Error> {
        Ok(match backend {
            Backend::Postgres => Pool::Pg(
                PgPoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(timeout)
                    .connect(url)
                    .await?,
            ),
            Backend::Mysql => Pool::My(
                MySqlPoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(timeout)
                    .connect(url)
                    .await?,
            ),
        })
    }

    /// A pool on `url` that connects only when used (and keeps trying).
    pub fn lazy(backend: Backend, url: &str) -> Pool {
        match backend {
            Backend::Postgres => Pool::Pg(PgPoolOptions::new().connect_lazy(url).unwrap()),
            Backend::Mysql => Pool::My(MySqlPoolOptions::new().connect_lazy(url).unwrap()),
        }
    }

    /// Runs `sql` (one or more statements, no parameters) as plain text, as a database's own
    /// client would.
    pub async fn try_execute(&self, sql: &str) -> Result<(), sqlx::Error> {
        let sql = AssertSqlSafe(sql.to_owned());
        match self {
            Pool::Pg(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
            Pool::My(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
        }
    }

    /// The rows a query answers, as tuples or `FromRow` types.
    pub async fn try_rows<T>(&self, sql: &str) -> Result<Vec<T>, sqlx::Error>
    where
        T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, MySqlRow> + Send + Unpin,
    {
        let sql = AssertSqlSafe(sql.to_owned());
        match self {
            Pool::Pg(p) => sqlx::query_as(sql).fetch_all(p).await,
            Pool::My(p) => sqlx::query_as(sql).fetch_all(p).await,
        }
    }
}

/// A database of its own on `backend`, migrated, dropped when the test ends. It derefs to a
/// [`DbHandle`], the cloneable part that inserts and reads rows.
pub struct Db {
    pub backend: Backend,
    pub name: String,
    pub url: String,
    pub table: TableName,
    handle: DbHandle,
    /// Drops the database and the users (roles) the test created when the test ends.
    dropper: Dropper,
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
        let db = Self::unmigrated(backend, table).await;
        db.migrate().await;
        db
    }

    /// A database of its own with no schema yet, for a test that applies it itself.
    pub async fn unmigrated(backend: Backend, table: &str) -> Self {
        let name = unique("outbox_t");
        let admin = Pool::try_connect(backend, &backend.admin_url(), 1, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{backend:?} is not reachable at {} ({e}): {START_HINT}",
                    backend.server()
                )
            });
        admin
            .try_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let dropper = Dropper {
            backend,
            name: name.clone(),
            users: Mutex::default(),
        };
        let url = format!("{}/{name}", backend.server());
        let table = TableName::new(table).unwrap();
        Db {
            backend,
            name,
            table: table.clone(),
            handle: DbHandle {
                backend,
                table,
                pool: Pool::connect(backend, &url, 20).await,
            },
            url,
            dropper,
        }
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
                self.dropper.users.lock().unwrap().push(user.into());
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

    /// A URL of this database for a new user (a role on PostgreSQL) of this test that holds
    /// only `grants`, each `(privileges, table)`: `("SELECT, UPDATE", "outbox_leader")`.
    pub async fn url_with_grants(&self, grants: &[(&str, &str)]) -> String {
        let user = &unique("u")[..30]; // MariaDB user names: at most 80 chars, MySQL 32
        self.dropper.users.lock().unwrap().push(user.into());
        let (create, to) = match self.backend {
            Backend::Postgres => (format!("CREATE ROLE {user} LOGIN"), user.to_owned()),
            Backend::Mysql => (format!("CREATE USER '{user}'@'%'"), format!("'{user}'@'%'")),
        };
        self.pool.try_execute(&create).await.unwrap();
        for (privileges, table) in grants {
            let grant = format!("GRANT {privileges} ON {table} TO {to}");
            self.pool.try_execute(&grant).await.unwrap();
        }
        let mut url = url::Url::parse(&self.url).unwrap();
        url.set_username(user).unwrap();
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

/// Drops a test database, after ending the sessions still in it (one frozen in a transaction
/// would hold the DROP), and the users (PostgreSQL: roles) the test created.
struct Dropper {
    backend: Backend,
    name: String,
    users: Mutex<Vec<String>>,
}

impl Drop for Dropper {
    fn drop(&mut self) {
        let (backend, name) = (self.backend, self.name.clone());
        let users = std::mem::take(&mut *self.users.lock().unwrap());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(drop_database(backend, name, users))
        })
        .join();
    }
}

async fn drop_database(backend: Backend, name: String, users: Vec<String>) {
    let timeout = Duration::from_secs(5);
    let Ok(admin) = Pool::try_connect(backend, &backend.admin_url(), 1, timeout).await else {
        return;
    };
    let mut drops = Vec::new();
    match backend {
        Backend::Postgres => {
            drops.push(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            drops.extend(users.iter().map(|u| format!("DROP ROLE IF EXISTS {u}")));
        }
        Backend::Mysql => {
            let sessions: Vec<(i64,)> = admin
                .try_rows(&format!(
                    "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST WHERE DB = '{name}' AND ID <> CONNECTION_ID()"
                ))
                .await
                .unwrap_or_default();
            drops.extend(sessions.into_iter().map(|(id,)| format!("KILL {id}")));
            drops.push(format!("DROP DATABASE IF EXISTS {name}"));
            drops.extend(
                users
                    .iter()
                    .map(|u| format!("DROP USER IF EXISTS '{u}'@'%'")),
            );
        }
    }
    for sql in drops {
        let _ = admin.try_execute(&sql).await;
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
    /// The headers object as JSON text, written as is (the database decides what it takes).
    pub headers: Option<String>,
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
        self.headers = Some(headers.to_string());
        self
    }

    /// Headers as JSON text: numbers of any size, repeated names.
    pub fn headers_text(mut self, headers: &str) -> Self {
        self.headers = Some(headers.into());
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
                Some(h) => param(Some(h.clone()), "::jsonb"),
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
        self.scalar(&self.of_row("id", message_id)).await
    }

    /// A row's `created_at` in seconds since the epoch.
    pub async fn created_epoch(&self, message_id: &str) -> f64 {
        let epoch = match self.backend {
            Backend::Postgres => "extract(epoch FROM created_at)::float8",
            Backend::Mysql => "UNIX_TIMESTAMP(created_at) + 0e0",
        };
        let rows: Vec<(f64,)> = self.rows(&self.of_row(epoch, message_id)).await;
        rows.first().expect("the row exists").0
    }

    /// A query of `column` of the row with `message_id` (a UUID, written in as text).
    fn of_row(&self, column: &str, message_id: &str) -> String {
        let id = uuid::Uuid::parse_str(message_id).expect("a message id is a UUID");
        format!(
            "SELECT {column} FROM {} WHERE message_id = '{id}'",
            self.table
        )
    }

    /// Runs one statement of SQL that both backends understand.
    pub async fn execute(&self, sql: &str) {
        self.pool.try_execute(sql).await.unwrap()
    }

    /// The integer a query (SQL that both backends understand) answers.
    pub async fn scalar(&self, sql: &str) -> i64 {
        self.try_scalar(sql).await.unwrap()
    }

    /// The integer a query answers, or the error (a database that is being restarted).
    pub async fn try_scalar(&self, sql: &str) -> Result<i64, sqlx::Error> {
        let rows: Vec<(i64,)> = self.pool.try_rows(sql).await?;
        rows.first().map(|r| r.0).ok_or(sqlx::Error::RowNotFound)
    }

    /// The strings a query answers, one per row.
    pub async fn strings(&self, sql: &str) -> Vec<String> {
        self.try_strings(sql).await.unwrap()
    }

    /// The strings a query answers, or the error (a database that is being restarted).
    pub async fn try_strings(&self, sql: &str) -> Result<Vec<String>, sqlx::Error> {
        let rows: Vec<(String,)> = self.pool.try_rows(sql).await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// The rows a query (SQL that both backends understand) answers, as tuples.
    pub async fn rows<T>(&self, sql: &str) -> Vec<T>
    where
        T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, MySqlRow> + Send + Unpin,
    {
        self.pool.try_rows(sql).await.unwrap()
    }

    /// The tables of the test database, sorted.
    pub async fn tables(&self) -> Vec<String> {
        self.strings(match self.backend {
            Backend::Postgres => {
                "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            }
            Backend::Mysql => {
                "SELECT CAST(table_name AS CHAR) FROM information_schema.tables
                 WHERE table_schema = DATABASE() ORDER BY 1"
            }
        })
        .await
    }

    /// The names of the database's indexes, triggers and functions, sorted (MySQL names
    /// every primary key `PRIMARY`: those are left out).
    pub async fn object_names(&self) -> Vec<String> {
        self.strings(match self.backend {
            Backend::Postgres => {
                "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public'
                 UNION ALL SELECT tgname::text FROM pg_trigger WHERE NOT tgisinternal
                 UNION ALL SELECT proname::text FROM pg_proc
                     WHERE pronamespace = 'public'::regnamespace
                 ORDER BY 1"
            }
            Backend::Mysql => {
                "SELECT DISTINCT CAST(index_name AS CHAR) FROM information_schema.statistics
                     WHERE table_schema = DATABASE() AND index_name <> 'PRIMARY'
                 UNION ALL SELECT CAST(trigger_name AS CHAR) FROM information_schema.triggers
                     WHERE trigger_schema = DATABASE()
                 UNION ALL SELECT CAST(routine_name AS CHAR) FROM information_schema.routines
                     WHERE routine_schema = DATABASE()
                 ORDER BY 1"
            }
        })
        .await
    }

    /// The database's schema as sorted lines: every column (table, name, type, nullability,
    /// default), index, constraint and trigger, with its definition.
    pub async fn schema(&self) -> Vec<String> {
        self.strings(match self.backend {
            Backend::Postgres => {
                "SELECT format('%s.%s %s %s %s', table_name, column_name, data_type, is_nullable,
                               column_default)
                     FROM information_schema.columns WHERE table_schema = 'public'
                 UNION ALL SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'
                 UNION ALL SELECT format('%s %s', conname, pg_get_constraintdef(oid))
                     FROM pg_constraint WHERE connamespace = 'public'::regnamespace
                 UNION ALL SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal
                 ORDER BY 1"
            }
            Backend::Mysql => {
                "SELECT CAST(CONCAT_WS(' ', table_name, column_name, column_type, is_nullable,
                                       column_default, extra) AS CHAR)
                     FROM information_schema.columns WHERE table_schema = DATABASE()
                 UNION ALL SELECT CAST(CONCAT_WS(' ', table_name, index_name, seq_in_index,
                                                 column_name, non_unique) AS CHAR)
                     FROM information_schema.statistics WHERE table_schema = DATABASE()
                 UNION ALL SELECT CAST(CONCAT_WS(' ', constraint_name, check_clause) AS CHAR)
                     FROM information_schema.check_constraints
                     WHERE constraint_schema = DATABASE()
                 UNION ALL SELECT CAST(CONCAT_WS(' ', trigger_name, action_statement) AS CHAR)
                     FROM information_schema.triggers WHERE trigger_schema = DATABASE()
                 ORDER BY 1"
            }
        })
        .await
    }

    /// The columns of `table` in order: name, type and `YES`/`NO` for nullable. The types are
    /// PostgreSQL's `data_type` and MySQL's `column_type`, with MariaDB's JSON (a `longtext`
    /// checked by `json_valid`) reported as `json`, as MySQL reports it.
    pub async fn columns(&self, table: &str) -> Vec<(String, String, String)> {
        let sql = match self.backend {
            Backend::Postgres => {
                "SELECT column_name::text, data_type::text, is_nullable::text
                 FROM information_schema.columns
                 WHERE table_schema = 'public' AND table_name = '{t}' ORDER BY ordinal_position"
            }
            Backend::Mysql => {
                "SELECT CAST(column_name AS CHAR),
                        CAST(IF(data_type = 'longtext' AND EXISTS (
                                SELECT 1 FROM information_schema.check_constraints k
                                WHERE k.constraint_schema = DATABASE()
                                  AND k.check_clause = CONCAT('json_valid(`', c.column_name, '`)')),
                             'json', column_type) AS CHAR),
                        CAST(is_nullable AS CHAR)
                 FROM information_schema.columns c
                 WHERE table_schema = DATABASE() AND table_name = '{t}' ORDER BY ordinal_position"
            }
        };
        self.rows(&sql.replace("{t}", table)).await
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
