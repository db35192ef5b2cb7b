//! The sidecar's loops: leadership, the leader's publish loop, table figures and retention.
//!
//! Any number of relays may run on one table. Each keeps a lease connection ([`Lease`]) and
//! tries to take the table's leadership on it every `OUTBOX_LEADER_CHECK`; the one that
//! holds it publishes, the others stand by. A leader looks at the table on that connection
//! every check (which proves the lease) and stops publishing when a look fails or has not
//! answered for half of `OUTBOX_LEASE_TIMEOUT`, before the database ends its silent session
//! and a standby can take over.

mod driver;
mod leader;
mod marks;
#[cfg(test)]
mod model;
mod rows;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::store::{Inserts, Lease, Store};
use crate::{Health, Result};

/// Rows deleted per retention statement: bounded, so no purge holds locks for long.
const PURGE_BATCH: i64 = 1000;

/// Looks the listener may miss (their pings) before its connection counts as dead.
const PINGS_MISSED: u32 = 5;

/// Runs the relay until `shutdown` is cancelled, then drains (see [`RelayConfig::shutdown_grace`]).
///
/// A database or broker that is down is not an error: the relay retries and `health` says
/// what is missing. The one error returned is [`Error::Unsupported`](crate::Error::Unsupported):
/// a database on which no relay could lead the table safely (a Galera node).
pub async fn run<S: Store>(
    store: S,
    config: RelayConfig,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<()> {
    let figures = tokio::spawn(refresh_stats(
        store.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let mut lease = None;
    let mut reported_down = false;
    while !shutdown.is_cancelled() {
        health.turned();
        let attempt = tokio::select! {
            attempt = try_lead(&store, &mut lease) => attempt,
            _ = shutdown.cancelled() => break,
        };
        match attempt {
            Ok(Some(term)) => {
                reported_down = false;
                let lease = lease.take().expect("the lease that took the table");
                lead(&store, &config, &health, lease, term, &shutdown).await;
            }
            Ok(None) => tracing::debug!("another relay leads this table: standing by"),
            Err(e @ crate::Error::Unsupported(_)) => {
                figures.abort();
                return Err(e);
            }
            Err(e) => {
                // The connection may be the broken part: the next attempt opens another.
                lease = None;
                if !reported_down {
                    reported_down = true;
                    tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "database unavailable: retrying");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.leader_check) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    figures.abort();
    Ok(())
}

/// One attempt to take the table's leadership on the lease connection (opened if need be):
/// the new term if taken. Bounded by the connect and query timeouts.
async fn try_lead<S: Store>(store: &S, lease: &mut Option<S::Lease>) -> Result<Option<i64>> {
    let lease = match lease {
        Some(lease) => lease,
        None => lease.insert(store.lease().await?),
    };
    let limit = store.options().query_timeout;
    tokio::time::timeout(limit, lease.try_acquire())
        .await
        .map_err(|_| crate::Error::Timeout(limit))?
}

/// Leads one term: runs the publish loop until shutdown or the lease is lost, then releases
/// the lease (its connection closes, and the database releases the lock).
async fn lead<S: Store>(
    store: &S,
    config: &RelayConfig,
    health: &Arc<Health>,
    lease: S::Lease,
    term: i64,
    shutdown: &CancellationToken,
) {
    tracing::info!(term, "leading: this relay publishes the table");
    health.set_leader(true);
    let stop = shutdown.child_token();
    let inserts = Arc::new(Inserts::default());
    let silence = PINGS_MISSED * config.look_interval();
    let helpers = [
        tokio::spawn(purge_sent(store.clone(), stop.clone())),
        tokio::spawn({
            let (store, inserts, stop) = (store.clone(), inserts.clone(), stop.clone());
            async move {
                tokio::select! {
                    _ = store.watch_inserts(inserts, silence) => {}
                    _ = stop.cancelled() => {}
                }
            }
        }),
    ];
    driver::Driver::new(
        store.clone(),
        config.clone(),
        health.clone(),
        inserts,
        lease,
        term,
    )
    .run(&stop)
    .await;
    stop.cancel();
    for helper in helpers {
        let _ = helper.await;
    }
    health.set_leader(false);
}

/// Keeps the gauges and `/readyz` within a second of the table. A leader's looks read every
/// figure but the pending count, which is read here only while rows are pending.
async fn refresh_stats<S: Store>(store: S, health: Arc<Health>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if !health.is_leader() || health.pending_seen() {
            match store.stats().await {
                Ok(stats) => {
                    health.set_database_ok(true);
                    health.set_stats(stats);
                }
                Err(e) => {
                    health.set_database_ok(false);
                    tracing::debug!(error = %e, "database figures unavailable");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

/// Deletes sent rows past the retention, a bounded batch per statement, every half
/// retention (between 1 s and 1 min). Nothing to do when sent rows are deleted at once.
async fn purge_sent<S: Store>(store: S, stop: CancellationToken) {
    let retention = store.options().retention;
    if retention.is_zero() {
        return;
    }
    let every = (retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let mut deleted = PURGE_BATCH;
        while deleted == PURGE_BATCH && !stop.is_cancelled() {
            deleted = match store.purge_sent(PURGE_BATCH).await {
                Ok(n) => n as i64,
                Err(e) => {
                    tracing::debug!(error = %e, "retention purge failed; retrying later");
                    0
                }
            };
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}
