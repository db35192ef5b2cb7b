//! Deadlines on pooled connections. sqlx tests a connection it takes back or hands out with
//! a ping that has no deadline: on a connection that went silent (a NAT forgot it, a host
//! vanished) that ping waits for as long as TCP does, and the pool slot with it.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use sqlx::pool::{PoolConnection, PoolOptions};
use sqlx::{Connection, Database, Pool};

use crate::{Error, Result};

/// A connection idle for longer than this is pinged before use.
const IDLE_CHECK_AFTER: Duration = Duration::from_secs(1);

/// How long that ping may take before the connection is dropped for a fresh one.
const IDLE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Pool options that replace sqlx's unbounded ping before use with one bounded by
/// `IDLE_CHECK_TIMEOUT`, skipped for a connection used within the last second (a drain
/// then saves a round trip per statement).
pub(crate) fn pool_options<DB: Database>() -> PoolOptions<DB> {
    PoolOptions::new()
        .test_before_acquire(false)
        .before_acquire(|conn: &mut DB::Connection, meta| {
            Box::pin(async move {
                if meta.idle_for < IDLE_CHECK_AFTER {
                    return Ok(true);
                }
                let ping = tokio::time::timeout(IDLE_CHECK_TIMEOUT, conn.ping()).await;
                Ok(matches!(ping, Ok(Ok(()))))
            })
        })
}

/// Work on one connection, boxed so that it may borrow it.
pub(crate) type Work<'c, T> = Pin<Box<dyn Future<Output = Result<T, sqlx::Error>> + Send + 'c>>;

/// Runs `work` on a connection of `pool` within `limit`, waiting for the connection
/// included. A connection that did not answer in time is closed, never returned to the pool.
pub(crate) async fn within<DB, T, F>(pool: &Pool<DB>, limit: Duration, work: F) -> Result<T>
where
    DB: Database,
    F: for<'c> FnOnce(&'c mut DB::Connection) -> Work<'c, T>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut conn: PoolConnection<DB> = tokio::time::timeout_at(deadline, pool.acquire())
        .await
        .map_err(|_| Error::Timeout(limit))??;
    match tokio::time::timeout_at(deadline, work(&mut conn)).await {
        Ok(done) => Ok(done?),
        Err(_) => {
            conn.close_on_drop();
            Err(Error::Timeout(limit))
        }
    }
}
