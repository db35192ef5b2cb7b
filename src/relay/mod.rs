//! The sidecar's loops: leadership, the leader's publish loop, table figures and retention.
//!
//! Any number of relays may run on one table. Each tries to take the table's leadership
//! ([`Store::try_lead`]); the one that holds it publishes, the others stand by and try again
//! every `OUTBOX_LEADER_CHECK`. A leader checks its lease as often and stops publishing the
//! moment it is lost.

mod driver;
mod leader;
#[cfg(test)]
mod model;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::Health;
use crate::config::RelayConfig;
use crate::store::{Inserts, Lease, Store};

/// Rows deleted per retention statement: bounded, so no purge holds locks for long.
const PURGE_BATCH: i64 = 1000;

/// How long the leadership connection may take to answer before leadership counts as lost.
const LEASE_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the relay until `shutdown` is cancelled, then drains (see [`RelayConfig::shutdown_grace`]).
///
/// A database or broker that is down is not an error: the relay retries and `health` says
/// what is missing.
pub async fn run<S: Store>(
    store: S,
    config: RelayConfig,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let figures = tokio::spawn(refresh_stats(
        store.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let mut reported_down = false;
    while !shutdown.is_cancelled() {
        match store.try_lead().await {
            Ok(Some(lease)) => {
                reported_down = false;
                lead(&store, &config, &health, lease, &shutdown).await;
            }
            Ok(None) => tracing::debug!("another relay leads this table: standing by"),
            Err(e) if !reported_down => {
                reported_down = true;
                tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "database unavailable: retrying");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(config.leader_check) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    figures.abort();
}

/// Holds leadership while the publish loop runs; returns when shutdown comes or the lease is lost.
async fn lead<S: Store>(
    store: &S,
    config: &RelayConfig,
    health: &Arc<Health>,
    lease: S::Lease,
    shutdown: &CancellationToken,
) {
    tracing::info!("leading: this relay publishes the table");
    health.set_leader(true);
    let stop = shutdown.child_token();
    let lost = CancellationToken::new();
    let inserts = Arc::new(Inserts::default());
    let helpers = [
        tokio::spawn(keep_lease(
            lease,
            config.leader_check,
            health.clone(),
            inserts.clone(),
            lost.clone(),
            stop.clone(),
        )),
        tokio::spawn(purge_sent(store.clone(), stop.clone())),
        tokio::spawn({
            let (store, inserts, stop) = (store.clone(), inserts.clone(), stop.clone());
            async move {
                tokio::select! {
                    _ = store.watch_inserts(inserts) => {}
                    _ = stop.cancelled() => {}
                }
            }
        }),
    ];
    driver::Driver::new(store.clone(), config.clone(), health.clone(), inserts)
        .run(&stop)
        .await;
    if lost.is_cancelled() {
        tracing::error!("leadership lost (its database connection is gone): publishing stopped");
    }
    stop.cancel();
    for helper in helpers {
        let _ = helper.await;
    }
    health.set_leader(false);
}

/// Reads the table's figures on the lease's connection every `every`: one query both keeps
/// the gauges fresh and checks leadership. When a failed row's retry falls due it tells the
/// leader to look at the whole table. When the lease is gone, cancels `lost` and `stop`;
/// dropping the lease at the end (when `stop` is cancelled) releases leadership.
async fn keep_lease<L: Lease>(
    mut lease: L,
    every: Duration,
    health: Arc<Health>,
    inserts: Arc<Inserts>,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    loop {
        match tokio::time::timeout(LEASE_TIMEOUT, lease.stats()).await {
            Ok(Ok(stats)) => {
                if stats.next_retry_in_seconds.is_some_and(|s| s <= 0.0) {
                    inserts.committed(0);
                }
                health.set_database_ok(true);
                health.set_stats(stats);
            }
            _ => {
                lost.cancel();
                stop.cancel();
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Keeps the gauges and `/readyz` of a standby within a second of the table (a leader reads
/// them in [`keep_lease`]).
async fn refresh_stats<S: Store>(store: S, health: Arc<Health>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if health.is_leader() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => {}
            }
            continue;
        }
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
