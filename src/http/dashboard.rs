//! The status page's routes and its JSON: `GET /` (rendered in `page`), `GET /api/status`
//! and `GET /api/history`, which the page reads every second, and the operations guide,
//! served for the alarm banner's link.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Value, json};

use crate::config::Secret;
use crate::health::Snapshot;
use crate::history::{History, Sample};
use crate::store::Store;
use crate::tally::REASONS;
use crate::{Health, metrics as m};

/// The operations guide, which the alarm banner links to.
const OPERATIONS: &str = include_str!("../../docs/operations.md");
/// How long the page waits for the database before answering without what it asked.
const DB_WAIT: Duration = Duration::from_secs(2);
/// Where the guide explains the watermarks and what to do during an alarm.
pub const ALARM_DOCS: &str = "docs/operations.md#memory-and-disk-alarms";

/// What the status page reads and may change, besides the relay's health.
pub struct Dashboard<S> {
    /// The table, for dead rows, blocked keys and the leader's name.
    pub store: S,
    /// The relay's live state.
    pub health: Arc<Health>,
    /// The last 15 minutes, filled by [`crate::history::sample`].
    pub history: Arc<History>,
    /// This relay's name (`OUTBOX_REPLICA_ID`).
    pub replica_id: String,
    /// The database's URL, redacted.
    pub database: String,
    /// `OUTBOX_ADMIN_TOKEN`: without it the page is read-only.
    pub admin_token: Option<Secret>,
    /// `OUTBOX_DEDUP_WINDOW`: older dead rows are retried only when forced.
    pub dedup_window: Duration,
}

/// The page's routes: `/`, `/api/status`, `/api/history`, the dead rows and the guide.
pub fn router<S: Store>(dashboard: Dashboard<S>) -> Router {
    Router::new()
        .route("/", get(super::page::page::<S>))
        .route("/api/status", get(status::<S>))
        .route("/api/history", get(history::<S>))
        .route("/docs/operations.md", get(operations))
        .merge(super::admin::routes())
        .with_state(Arc::new(dashboard))
}

/// The gauges of the contract and the published count, as `/metrics` has them now.
pub(super) fn gauges(snap: &Snapshot) -> [(&'static str, f64); 7] {
    let flag = |b: bool| f64::from(u8::from(b));
    [
        (m::PENDING, snap.stats.pending as f64),
        (m::OLDEST_PENDING_AGE, snap.stats.oldest_pending_age_seconds),
        (m::DEAD, snap.stats.dead as f64),
        (m::BROKER_CONNECTED, flag(snap.broker_connected)),
        (m::BROKER_BLOCKED, flag(snap.broker_blocked.is_some())),
        (m::LEADER, flag(snap.leader)),
        (m::PUBLISHED, crate::tally::totals().published as f64),
    ]
}

/// What `read` found, unless it failed or the database took over [`DB_WAIT`]: the page
/// answers without it rather than hang while the database is down.
pub(super) async fn quick<T>(read: impl Future<Output = crate::Result<T>>) -> Option<T> {
    tokio::time::timeout(DB_WAIT, read).await.ok()?.ok()
}

/// Which alarm a blocking reason names.
pub(super) fn alarm_kind(reason: &str) -> &'static str {
    match reason {
        r if r.contains("memory") => "memory",
        r if r.contains("disk") => "disk",
        _ => "resource",
    }
}

async fn status<S: Store>(State(d): State<Arc<Dashboard<S>>>) -> Json<Value> {
    let snap = d.health.snapshot();
    let (keys, holder) = tokio::join!(
        quick(d.store.blocked_keys()),
        quick(d.store.leader_holder())
    );
    let metrics: serde_json::Map<String, Value> = gauges(&snap)
        .into_iter()
        .map(|(name, value)| (name.to_owned(), json!(value)))
        .collect();
    let alarm = d
        .history
        .note_blocked(snap.broker_blocked.clone())
        .map(|a| json!({"kind": alarm_kind(&a.reason), "reason": a.reason, "since": a.since}));
    Json(json!({
        "status": snap.status,
        "role": if snap.leader { "leader" } else { "standby" },
        "replica_id": d.replica_id,
        "leader_replica_id": holder.flatten(),
        "database": d.database,
        "database_reachable": snap.database,
        "broker": {
            "node": d.health.broker_node(),
            "connected": snap.broker_connected,
            "blocked": snap.broker_blocked,
        },
        "alarm": alarm,
        "alarm_docs": ALARM_DOCS,
        "metrics": metrics,
        "blocked_ordering_keys": keys,
        "admin": d.admin_token.is_some(),
        "dedup_window_seconds": d.dedup_window.as_secs(),
    }))
}

/// The samples as columns, oldest first; failures only for reasons seen in the window.
async fn history<S: Store>(State(d): State<Arc<Dashboard<S>>>) -> Json<Value> {
    let samples = d.history.samples();
    let column = |f: &dyn Fn(&Sample) -> Value| samples.iter().map(f).collect::<Vec<_>>();
    let failures: serde_json::Map<String, Value> = REASONS
        .iter()
        .enumerate()
        .filter(|(i, _)| samples.iter().any(|s| s.failures[*i] > 0))
        .map(|(i, reason)| (reason.to_string(), column(&|s| json!(s.failures[i])).into()))
        .collect();
    Json(json!({
        "at": column(&|s| json!(s.at)),
        "published": column(&|s| json!(s.published)),
        "failures": failures,
        "pending": column(&|s| json!(s.pending)),
        "oldest_pending_age": column(&|s| json!(s.oldest_pending_age)),
        "p50": column(&|s| json!(s.p50)),
        "p99": column(&|s| json!(s.p99)),
    }))
}

async fn operations() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        OPERATIONS,
    )
}
