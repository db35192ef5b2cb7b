//! A MariaDB (or MySQL) database of its own per test, on the server `OUTBOX_TEST_MYSQL`,
//! with `migrations/mysql` applied as any migration tool would; dropped when the test ends.

use std::path::PathBuf;

use sqlx::AssertSqlSafe;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};

use super::{START_HINT, unique};

/// The server the test databases are created on (`OUTBOX_TEST_MYSQL`).
pub fn mysql_server() -> String {
    std::env::var("OUTBOX_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// A database of its own, migrated (default table `outbox`), dropped when the test ends.
pub struct MySqlDb {
    pub name: String,
    pub url: String,
    pub pool: MySqlPool,
}

impl MySqlDb {
    pub async fn new() -> Self {
        let name = unique("outbox_t");
        let admin = MySqlPool::connect(&mysql_server())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "MariaDB is not reachable at {} ({e}): {START_HINT}",
                    mysql_server()
                )
            });
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let url = format!("{}/{name}", mysql_server());
        let db = MySqlDb {
            pool: pool(&url, 20).await,
            name,
            url,
        };
        for (path, sql) in migrations() {
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&db.pool)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        db
    }
}

/// A pool of at most `max` connections on `url`.
pub async fn pool(url: &str, max: u32) -> MySqlPool {
    MySqlPoolOptions::new()
        .max_connections(max)
        .connect(url)
        .await
        .unwrap()
}

/// The files of `migrations/mysql`, in order, with their text.
fn migrations() -> Vec<(PathBuf, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("migrations/mysql");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let sql = std::fs::read_to_string(&p).unwrap();
            (p, sql)
        })
        .collect()
}

impl Drop for MySqlDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(admin) = MySqlPool::connect(&mysql_server()).await {
                    // Its sessions first: one frozen in a transaction would hold the DROP.
                    let sessions: Vec<i64> = sqlx::query_scalar(
                        "SELECT id FROM information_schema.processlist WHERE db = ?",
                    )
                    .bind(&name)
                    .fetch_all(&admin)
                    .await
                    .unwrap_or_default();
                    for id in sessions {
                        let kill = format!("KILL {id}");
                        let _ = sqlx::raw_sql(AssertSqlSafe(kill)).execute(&admin).await;
                    }
                    let drop = format!("DROP DATABASE IF EXISTS {name}");
                    let _ = sqlx::raw_sql(AssertSqlSafe(drop)).execute(&admin).await;
                }
            })
        })
        .join();
    }
}
